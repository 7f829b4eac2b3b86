"""What the HTTP layer generates with: the in-process cluster, or a multi-process deployment's scheduler.

Both backends take a :class:`GenRequest` (prompt token ids, ``max_tokens``, sampling) and return a
:class:`Job`: the generation in flight. Its queue yields ``("token", id)`` as the decode engine produces each
token, then ``("done", GenResult)`` or ``("error", exception)``. :meth:`Job.cancel` (a client that went away, a
stop sequence) ends the turn: on the in-process backend the turn is cancelled on both engines, which frees its
host buffers and KV pool pages (``Cluster.run_turn``'s cleanup); a turn still waiting in the scheduler's queue
is withdrawn from it.

* :class:`InProcessBackend`: the emulated cluster (:class:`~dualpath.cluster.Cluster`) under the scheduler
  driver, in this process; sampling and streaming happen in the decode engine.
* :class:`RemoteBackend`: a running ``dualpath serve`` deployment through :class:`~dualpath.control.client.
  ServeClient`. The sampling parameters travel in the ``submit`` to the decode engine process, which samples
  with the same code (a seeded request gives the same tokens in both modes) and sends each decode step's tokens
  to the scheduler, which forwards them here: they stream as they are decoded. A cancelled job (a client that
  went away) sends ``cancel``: the scheduler aborts the turn on both engines, freeing its KV and buffers.
  A scheduler that dies or hangs fails every job in flight with ``SchedulerLost`` (the client's connection
  monitor and heartbeats); the connection comes back by itself when the launcher's replacement binds the same
  address, and :meth:`RemoteBackend.health` reports ``unavailable`` in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from dualpath.config import DualPathConfig
from dualpath.engine.request import unwrap
from dualpath.engine.sampling import SamplingParams
from dualpath.errors import EngineError, PeerTimeout
from dualpath.model.generation_config import GenerationDefaults, read_generation_defaults, stop_ids_of

__all__ = ["Backend", "Cancelled", "GenRequest", "GenResult", "InProcessBackend", "Job", "RemoteBackend",
           "ServerStopping", "stop_ids_of"]
from dualpath.types import PathKind, TokenLogprob

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("dualpath.http")


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams | None = None
    cache_salt: str | None = None  # its KV is shared only with requests of the same salt


@dataclass
class GenResult:
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was loaded from storage (the hit)
    path: str
    ttft_s: float
    t_done: float


class ServerStopping(EngineError):
    """A request ended because the server is shutting down (an HTTP 503 its client may retry elsewhere)."""


class Cancelled(EngineError):
    """The turn was cancelled (the client went away, or a stop sequence ended it)."""


@dataclass(eq=False)
class Job:
    """One generation in flight (see the module docstring)."""

    session: int
    request: GenRequest
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    path: str | None = None
    cached: int = 0  # hit tokens, known once the turn is scheduled (the result's figure wins)
    task: asyncio.Task[None] | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    finished: bool = False
    timed_out: bool = False  # cancelled by its deadline (http.request_timeout_s), not by the client
    ending: Exception | None = None  # why the server ended it (it is shutting down), not the client
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens so far (sampling.logprobs set)
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1.. (sampling.prompt_logprobs), once done
    #: called once, when the decode engine says the prompt's Full Blocks are stored, or at the job's end
    on_prefix_stored: list[Callable[[], None]] = field(default_factory=list)
    stored: asyncio.Event = field(default_factory=asyncio.Event)  # set at the same moment
    #: someone waits for :attr:`stored` (set before the job's task starts): a deployment asks its decode engine
    #: for the notice only then (in process it costs nothing and always comes)
    wants_stored: bool = False

    def put(self, ev: tuple[str, Any]) -> None:
        """Queue an event for the response."""
        self.queue.put_nowait(ev)
        if ev[0] != "token":  # its end: whatever was going to be stored is
            self.prefix_stored()

    def prefix_stored(self) -> None:
        """Set :attr:`stored` and run the :attr:`on_prefix_stored` callbacks (once: later calls do nothing)."""
        self.stored.set()
        hooks, self.on_prefix_stored = self.on_prefix_stored, []
        for hook in hooks:
            hook()

    @property
    def client_cancelled(self) -> bool:
        """Cancelled by the client (gone, or a stop sequence), not by the request's deadline."""
        return self.cancelled.is_set() and not self.timed_out and self.ending is None

    def on_token(self, tok: int) -> None:
        self.put(("token", int(tok)))

    def on_logprob(self, lp: TokenLogprob) -> None:
        """A token's logprobs (the sampling asked for them), heard just before the token itself."""
        self.logprobs.append(lp)

    def cancel(self) -> None:
        """End the turn early (idempotent; a finished job is left alone)."""
        if self.finished:
            return
        self.cancelled.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _ended(job: Job) -> None:
    """A job's task is done. One cancelled before it ever ran (its client was gone before the handler's first
    await: the watcher saw the disconnect first) never reached :meth:`Backend._drive`, so nothing told the
    handler waiting on its queue, which then waited for ever (a leaked handler and in-flight gauge per such
    request): its end is queued here."""
    if not job.finished:
        job.finished = True
        job.put(("error", job.ending or Cancelled(f"request {job.session} was cancelled before it started")))
    job.prefix_stored()  # (once: a no-op when its end was queued already)


class _StreamingCluster:
    """The cluster as the scheduler driver sees it, with each turn's sampling, token listener and cancellation
    attached by session id (every HTTP request gets its own session id)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.jobs: dict[int, Job] = {}

    def snapshots(self) -> Any:
        return self.cluster.snapshots()

    def work_predictor(self) -> Any:
        return self.cluster.work_predictor()

    def lookup(self, prompt_ids: Any, salt: str | None = None) -> int:
        return int(self.cluster.lookup(prompt_ids, salt))

    async def run_turn(self, session: int, prompt_ids: Any, gen_tokens: int, pe: int, de: int, path: PathKind,
                       pe_blocks: int | None = None, salt: str | None = None) -> Any:
        job = self.jobs.get(session)
        if job is None or job.cancelled.is_set():
            raise Cancelled(f"request {session} was cancelled before it started")
        job.path = PathKind(path).value
        if PathKind(path) is not PathKind.RECOMPUTE:
            job.cached = int(self.cluster.lookup(prompt_ids, salt))
        result: Any = None
        try:
            async with anyio.create_task_group() as tg:

                async def _watch() -> None:
                    await job.cancelled.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(_watch)
                try:
                    result = await self.cluster.run_turn(str(session), prompt_ids, gen_tokens, pe, de, path,
                                                         pe_blocks, sampling=job.request.sampling,
                                                         on_token=job.on_token, on_logprob=job.on_logprob,
                                                         on_stored=job.prefix_stored, salt=salt)
                    job.prompt_logprobs = result.prompt_logprobs
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as eg:  # the turn's own error, not the group around it
            raise unwrap(eg) from None
        if result is None:
            raise Cancelled(f"request {session} was cancelled")
        return result


class Backend:
    """Common surface of both backends."""

    model_name: str = "dualpath"
    max_context: int = 0
    vocab_size: int = 0
    tokenizer: Any = None
    generation: GenerationDefaults = GenerationDefaults()  # the checkpoint's end-of-sequence ids, sampling defaults
    streams_tokens: bool = True

    def __init__(self) -> None:
        self._sessions = itertools.count(1)
        self.inflight = 0
        self.timeout_s = 300.0  # a request's deadline (http.request_timeout_s)
        self._live: set[Job] = set()  # submitted, not ended
        self._stopping: str | None = None  # why no job starts any more (the server is shutting down)

    def stop_jobs(self, reason: str) -> int:
        """End every job still running with :class:`ServerStopping` (``reason``): the server is shutting down,
        and its handlers answer their clients with a 503 (or a stream's error event) while they still can,
        instead of being cut off when the server's grace period ends. A job submitted from now on (a request
        that was waiting for another one's prefix, a later choice of ``n``) ends the same way at once. Returns
        how many were running."""
        self._stopping = reason
        live = [j for j in self._live if not j.finished]
        for job in live:
            job.ending = ServerStopping(f"request {job.session}: {reason}")
            job.cancel()
        return len(live)

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def _generate(self, job: Job) -> Any:
        raise NotImplementedError

    def submit(self, req: GenRequest) -> Job:
        job = Job(next(self._sessions), req)
        if self._stopping is not None:
            job.ending = ServerStopping(f"request {job.session}: {self._stopping}")
            _ended(job)  # (it never starts: its end is queued at once)
            return job
        job.task = asyncio.get_running_loop().create_task(self._drive(job))
        self._live.add(job)

        def done(_t: asyncio.Task[None]) -> None:
            self._live.discard(job)
            _ended(job)

        job.task.add_done_callback(done)
        return job

    async def _drive(self, job: Job) -> None:
        self.inflight += 1
        try:
            res: Any = None
            # (only this deadline is the request's timeout: a TimeoutError from inside, such as no handshake
            # with a scheduler, is the backend's error and keeps its own message)
            with anyio.move_on_after(self.timeout_s) as deadline:
                res = await self._generate(job)
            if deadline.cancelled_caught:
                job.timed_out = True
                job.cancelled.set()  # the turn, if already running, is cancelled on its engines
                raise PeerTimeout(f"request {job.session} did not finish within {self.timeout_s:g} s "
                                  "(http.request_timeout_s)")
            job.put(("done", res))
        except asyncio.CancelledError:
            job.put(("error", job.ending or Cancelled(f"request {job.session} was cancelled")))
        except Exception as exc:
            job.put(("error", exc))
        finally:
            job.finished = True
            self.inflight -= 1

    # --- observation -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def gauges(self) -> dict[str, Any]:
        """Live figures for /metrics (see :mod:`dualpath.http.metrics`)."""
        return {}


def _model_setup(config: DualPathConfig) -> tuple[Any, Any, str, GenerationDefaults]:
    """(llama model config, tokenizer, model name, the checkpoint's generation defaults) for a llama config; the
    embedded model when no path."""
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.embedded import checkpoint_path
    from dualpath.model.loader import load_tokenizer

    mcfg = config.model if isinstance(config.model, LlamaModelConfig) else LlamaModelConfig()
    path = checkpoint_path(mcfg.path)
    if mcfg.path is None:
        name = "SmolLM2-135M-Instruct"
    else:
        name = path.stem if path.is_file() else path.name
    return mcfg, load_tokenizer(path), name, read_generation_defaults(path)


#: the in-process server's default KV store cap, bytes (memory storage, with no config file)
INPROCESS_KV_CAPACITY = 1 << 30


def inprocess_overrides() -> dict[str, Any]:
    """Config defaults of the in-process HTTP server with no config file: the embedded real model, small blocks
    so multi-turn chats hit early, room for many concurrent streams."""
    return {
        "model": {"kind": "llama"},
        # the KV store in memory, capped: uncapped, a long-running server kept every block (~0.7 MB per 16 tokens
        # of the embedded model) and its RSS only grew; least recently used blocks go first
        "storage": {"kind": "memory", "capacity_bytes": INPROCESS_KV_CAPACITY},
        "cluster": {"block_tokens": 16, "snic_gbps": None, "cnic_gbps": None, "kv_pool_tokens": 65536,
                    "host_buffer_bytes": 768 << 20, "prefill_max_batch_tokens": 8192, "prefill_max_batch": 32,
                    "decode_max_batch": 64},
    }


class InProcessBackend(Backend):
    """The emulated cluster in this process (see the module docstring)."""

    def __init__(self, config: DualPathConfig, *, model: Any = None, tokenizer: Any = None,
                 model_name: str | None = None) -> None:
        super().__init__()
        self.config = config
        self._model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or "dualpath"
        self.cluster: Any = None
        self.driver: Any = None
        self.adapter: _StreamingCluster | None = None

    async def start(self) -> None:
        from dualpath.api import create_scheduler
        from dualpath.cluster import Cluster
        from dualpath.engine.model_api import LlamaAdapter
        from dualpath.scheduler import get_policy
        from dualpath.scheduler.driver import SchedulerDriver

        cfg = self.config
        factory: Any = self._model
        if factory is None and cfg.model.kind == "llama":
            from dualpath.model.loader import load_model

            mcfg, tok, name, self.generation = _model_setup(cfg)
            model, tok2 = await anyio.to_thread.run_sync(lambda: load_model(mcfg, "cpu"))
            self.tokenizer = self.tokenizer or tok2 or tok
            if self.model_name == "dualpath":
                self.model_name = name
            bt = cfg.cluster.block_tokens

            def factory(device: Any) -> Any:
                return LlamaAdapter(model if str(device) == "cpu" else model.to(device), bt)

        self.cluster = Cluster(cfg, model=factory)
        await self.cluster.start()
        try:
            self.max_context = int(self.cluster.max_context)
            self.vocab_size = int(self.cluster.vocab_size)
            # as `dualpath run` builds it; a real model's prefill rate comes from its calibrated time model
            gpu_tps = None if cfg.model.kind == "synthetic" else self.cluster.prefill_tokens_per_s()
            sched = create_scheduler(cfg, policy=get_policy(cfg.scheduler.policy, layerwise=cfg.scheduler.layerwise),
                                     gpu_tokens_per_s=gpu_tps, cluster=self.cluster)
            self.adapter = _StreamingCluster(self.cluster)
            self.driver = SchedulerDriver(self.adapter, sched, fetch_interval_s=cfg.scheduler.fetch_interval_s,
                                          max_request_tokens=cfg.cluster.kv_pool_tokens,
                                          work_ranking=cfg.scheduler.work_ranking)
            await self.driver.__aenter__()
        except BaseException:
            await self.cluster.close()
            raise

    async def close(self) -> None:
        # (no shielding scope here: the driver and the cluster exit task groups they entered in start())
        if self.driver is not None:
            driver, self.driver = self.driver, None
            await driver.__aexit__(None, None, None)
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.close()

    async def _generate(self, job: Job) -> GenResult:
        assert self.adapter is not None and self.driver is not None
        self.adapter.jobs[job.session] = job
        try:
            out = await self.driver.run_turn(job.session, job.request.prompt_ids, job.request.max_tokens,
                                             salt=job.request.cache_salt)
        finally:
            self.adapter.jobs.pop(job.session, None)
        ttft = out.ttft if math.isfinite(out.t_first_token) else 0.0
        return GenResult(tokens=list(out.tokens), prompt_tokens=out.prompt_tokens, cached_tokens=out.hit_tokens,
                         path=out.path, ttft_s=ttft, t_done=out.t_done)

    # --- observation -------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        ok = self.cluster is not None and self.driver is not None
        return {"status": "ok" if ok else "starting", "mode": "inprocess",
                "engines": {e.name: 1 if ok else 0 for e in (self.cluster.pes + self.cluster.des)} if ok else {}}

    def gauges(self) -> dict[str, Any]:
        c = self.cluster
        if c is None:
            return {}
        links = {name: {"bytes": sum(link.stats.bytes.values()), "bandwidth": link.bandwidth,
                        "busy_s": link.busy_time} for name, link in c.links().items()}
        read_q: dict[str, float] = {}
        for e in [*c.pes, *c.des]:
            node = f"{'pnode' if e.name.startswith('pe') else 'dnode'}{e.eid.node}"
            read_q[node] = max(read_q.get(node, 0.0), float(c.linkset.read_q_tokens(e.name)))
        alive = {e.name: 1 for e in [*c.pes, *c.des]}
        return {"links": links, "read_q_tokens": read_q, "engines_alive": alive,
                "scheduler_queue": int(self.driver.scheduler.waiting()) if self.driver is not None else 0,
                "free_kv_tokens": {e.name: e.free_kv_tokens() for e in c.des},
                "host_used_bytes": {e.name: e.host.used_bytes for e in [*c.pes, *c.des]},
                "turns_assigned": {e.name: e.seq for e in [*c.pes, *c.des]},
                "failed_turns": c.failed_turns}


#: how long /health waits for the scheduler's stats; a scheduler silent this long reads as unavailable
STATS_WAIT_S = 1.0


class RemoteBackend(Backend):
    """A ``dualpath serve`` deployment's scheduler (see the module docstring)."""

    def __init__(self, config: DualPathConfig, address: str | None = None, *,
                 stats_every_s: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.address = address
        self.client: Any = None
        self._stats: dict[str, Any] = {}
        self._stats_t = 0.0
        self._stats_error: str | None = "no answer from the scheduler yet"
        self._stats_since: float | None = None  # a stats request in flight since (a stalled scheduler: not ready)
        self._stats_task: asyncio.Task[None] | None = None
        self._model_context = 0  # the checkpoint's context, as the front read it (0: not known)
        self._gone = False  # the scheduler is known to be gone (until a stats request succeeds)
        self.stats_every_s = stats_every_s

    async def start(self) -> None:
        from dualpath.control.client import connect

        if self.config.model.kind == "llama":
            from dualpath.model.spec import load_spec

            mcfg, tok, name, self.generation = _model_setup(self.config)
            self.tokenizer, self.model_name = tok, name
            with contextlib.suppress(Exception):  # the scheduler checks the context again
                from dualpath.model.embedded import checkpoint_path

                p = checkpoint_path(mcfg.path)
                if p.is_dir():
                    spec = load_spec(p / "config.json", max_context=getattr(mcfg, "max_context", None))
                    self.max_context = int(spec.context_limit)
                    self.vocab_size = int(spec.vocab_size)
        else:
            mc = self.config.model
            self.max_context = int(mc.max_context)  # type: ignore[union-attr]
            self.vocab_size = int(mc.vocab_size)  # type: ignore[union-attr]
            self.model_name = "synthetic"
        self.client = await connect(self.address, self.config)
        # the connection dropped (the scheduler died or is being replaced): not ready until it answers again
        prev = self.client.channel.on_disconnect

        def _gone() -> None:
            self._scheduler_gone("the scheduler closed the connection (it died or is being replaced)")
            if prev is not None:
                prev()

        self.client.channel.on_disconnect = _gone
        self._model_context = self.max_context
        await self.stats()  # (the engines' served context, when the scheduler answers now; else at the next stats)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.client is not None:
            with anyio.CancelScope(shield=True):
                await self.client.close()
            self.client = None

    async def _generate(self, job: Job) -> GenResult:
        assert self.client is not None
        # (the client cancels the turn at the scheduler when this task is cancelled: Job.cancel, the deadline)
        out = await self.client.run_turn(job.session, job.request.prompt_ids, job.request.max_tokens,
                                         sampling=job.request.sampling, on_token=job.on_token,
                                         on_logprob=job.on_logprob, on_info=lambda path, hit: _set_info(job, path, hit),
                                         on_stored=job.prefix_stored if job.wants_stored else None,
                                         deadline_s=self.timeout_s,
                                         salt=job.request.cache_salt)
        job.path = out.path
        job.prompt_logprobs = out.prompt_logprobs
        return GenResult(tokens=list(out.tokens), prompt_tokens=out.prompt_tokens, cached_tokens=out.hit_tokens,
                         path=out.path, ttft_s=out.ttft, t_done=out.t_done)

    def _scheduler_gone(self, why: str) -> None:
        self._stats, self._stats_t, self._stats_error, self._gone = {}, 0.0, why, True

    async def stats(self, wait_s: float = STATS_WAIT_S) -> dict[str, Any]:
        """The scheduler's counters (for /health and /metrics), refreshed at most every ``stats_every_s`` in a
        task of its own: this waits for the refresh at most ``wait_s``, and not at all while the scheduler is
        known to be gone (its connection dropped, or it did not answer): /health says so at once."""
        now = time.monotonic()
        task = self._stats_task
        if task is None and self.client is not None and now - self._stats_t > self.stats_every_s:
            self._stats_t = self._stats_since = now
            task = self._stats_task = asyncio.get_running_loop().create_task(self._refresh())
        if task is not None and not self._gone:
            await asyncio.wait({task}, timeout=wait_s)
        return self._stats

    async def _refresh(self) -> None:
        try:
            assert self.client is not None
            asked = time.monotonic()
            self._stats = await self.client.stats(timeout=min(2.0, 2 * self.stats_every_s))
            self._stats_error, self._gone = None, False
            served = int(self._stats.get("max_context", 0))
            if served > 0:  # the engines' context (cut to their host buffers): what a request is checked against
                self.max_context = min(self._model_context, served) if self._model_context else served
            drained = self.client.drained_at
            if drained is not None and drained < asked and not int(self._stats.get("draining", 0)):
                self.client.drained_at = None  # a scheduler that is not draining answered since (a failover)
        except Exception as exc:  # the scheduler may be restarting
            log.debug("stats failed: %s", exc)
            self._scheduler_gone(f"no answer from the scheduler ({type(exc).__name__}: {exc})")
        finally:
            self._stats_t = time.monotonic()
            self._stats_since = None
            self._stats_task = None

    def health(self) -> dict[str, Any]:
        """``ok`` only while the scheduler answers, is not draining, and has an engine alive."""
        st = self._stats
        n = int(st.get("engines_alive", 0)) if st else 0
        out: dict[str, Any] = {"mode": "process", "engines_alive": n}
        pending = self._stats_since
        if pending is not None and time.monotonic() - pending >= STATS_WAIT_S:
            return {**out, "status": "unavailable", "engines_alive": 0,
                    "reason": f"the scheduler has not answered for {time.monotonic() - pending:.1f} s"}
        if self._stats_error is not None or not st:
            return {**out, "status": "unavailable", "engines_alive": 0,
                    "reason": self._stats_error or "no answer from the scheduler"}
        if int(st.get("draining", 0)) or (self.client is not None and self.client.drained_at is not None):
            return {**out, "status": "draining", "reason": "the scheduler is draining (dualpath ctl drain): "
                                                             "no new requests"}
        if n == 0:
            return {**out, "status": "degraded", "reason": "no engine is alive"}
        return {**out, "status": "ok"}

    def gauges(self) -> dict[str, Any]:
        st = self._stats
        alive = {k[: -len(".alive")]: int(v) for k, v in st.items() if k.endswith(".alive")}
        read_q: dict[str, float] = {}
        for k, v in st.items():
            if k.endswith(".read_q") and not k.startswith("peak."):
                read_q[k[: -len(".read_q")]] = float(v)
        return {"engines_alive": alive, "read_q_tokens": read_q,
                "scheduler_queue": int(st.get("inflight", 0)) if st else 0}


def _set_info(job: Job, path: str, hit: int) -> None:
    job.path, job.cached = path, hit


BackendFactory = Callable[[], Backend]
