"""The scheduler process: registers engine processes, runs the scheduler core on their heartbeats, dispatches
turns over the control plane, and retries a turn whose engine died, within the turn's deadline.

* **Engines** say ``hello`` (role, rank, node, transport address) and then ``heartbeat`` every
  ``serve.heartbeat_s`` with their snapshot. An engine silent for ``serve.dead_after_s`` (or whose socket is
  gone) is declared dead: every request waiting on it fails at once, it leaves the snapshots, and the turns it
  held are aborted on their other engine. A restarted engine says ``hello`` again and rejoins; the engines of
  the other role get its new transport address (``peers``).
* **Scheduling** reuses :class:`~dualpath.scheduler.driver.SchedulerDriver` and the pure core unchanged, over
  :class:`RemoteCluster` (a :class:`~dualpath.scheduler.driver.ClusterLike`): ``snapshots`` from heartbeats
  (``seq``/``tok`` from our own dispatch bookkeeping, which is exact and never stale), ``lookup`` asked of a
  live engine (storage is shared), ``run_turn`` = the turn's life of :mod:`dualpath.cluster.runner` split into
  control messages (``begin`` both -> hit -> ``decode`` DE + ``prefill`` PE -> ``logits`` to the DE ->
  ``finished``).
* **Clients** ``submit`` a turn and get ``result`` (tokens) or ``error`` (code + message): every submitted turn
  ends with one of them by its deadline (``serve.request_deadline_s`` or the client's, whichever is sooner). A
  turn whose engine died or whose transfer failed is re-dispatched (up to ``serve.max_retries``) to live engines,
  on whatever path the scheduler then picks; a turn that can never run (``InvalidTurn``) is not retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import os
import signal
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from dualpath.config import DualPathConfig, load_config
from dualpath.control.channel import PEER_USER, Channel, PeerGone, RemoteError
from dualpath.control.deploy import (
    check_deployable,
    combine_hit,
    create_tokens,
    engine_key_names,
    key_roles,
    load_tokens,
    plan_sides,
    server_curve,
)
from dualpath.control.gauges import process_gauges
from dualpath.control.protocol import (
    MAX_TOKENS,
    PROMPT_LP_FIELDS,
    SAMPLING_FIELDS,
    Message,
    ProtocolError,
    bin_to_tokens,
    sampling_of,
    tokens_to_bin,
)
from dualpath.engine.work import PrefillWork
from dualpath.errors import DualPathError, EngineError, PeerTimeout, SchedulerError, TransportError
from dualpath.scheduler import GlobalScheduler, SchedulerParams, get_policy
from dualpath.scheduler.driver import SchedulerDriver, turn_stored
from dualpath.scheduler.state import EngineSnapshot, RequestInfo
from dualpath.types import PathKind

log = logging.getLogger("dualpath.schedulerd")

#: client connections remembered (by their heartbeats) to be told of an operator's stop
_MAX_CLIENTS = 4096

#: remote error codes after which a turn is re-dispatched (an engine or a transfer failed, not the request)
RETRIABLE_CODES = {"PeerTimeout", "PeerGone", "TransportError", "TransportClosed", "EngineError", "EngineDied",
                   "StorageError", "TimeoutError", "busy"}


class EngineDied(EngineError):
    """An engine process serving the turn died or went silent."""


class DeadlineExceeded(PeerTimeout):
    """The turn did not finish by its deadline."""


class TurnCancelled(SchedulerError):
    """The turn's client cancelled it (``cancel``): it was aborted on its engines."""


@dataclass(eq=False)
class TurnCtx:
    """One submitted turn as the scheduler tracks it: who asked, how to sample, where to stream, cancellation."""

    peer: bytes
    session: int
    sampling: dict[str, Any]  # the submit's sampling fields, passed on to the decode engine
    stream: int = 0  # > 0: forward the DE's tokens to ``peer`` as ``stream`` notices with this id
    notify_stored: bool = False  # (with stream) forward the DE's ``stored`` notice to ``peer`` (``stored: true``)
    cancelled: anyio.Event = field(default_factory=anyio.Event)
    cancelled_by: str = "its client"  # who cancelled it, for the error its client gets ("the operator")
    scope: anyio.CancelScope | None = None
    sent: int = 0  # tokens forwarded to the client (a streamed turn is not retried once the client saw tokens)
    dispatched: int = 0  # RemoteCluster.run_turn calls in progress for it
    done: bool = False  # the submit handler ended
    path: str = ""  # the current dispatch's read path and hit (sent with the first streamed tokens)
    hit_tokens: int = 0
    prompt_lp: dict[str, Any] = field(default_factory=dict)  # the PE's plp_* fields (prompt_logprobs), for the result


@dataclass
class EngineRecord:
    name: str
    role: str
    rank: int
    node: int
    address: str
    pid: int
    ident: bytes
    token_bytes: int
    vocab_size: int
    max_context: int
    last_seen: float
    alive: bool = True
    hb: dict[str, Any] = field(default_factory=dict)
    hb_time: float = 0.0
    seq: int = 0
    tok: int = 0
    reserved: dict[int, tuple[float, int]] = field(default_factory=dict)  # rid -> (t dispatched, kv tokens)
    work_model: PrefillWork | None = None  # a PE's, from its hello (DualPath ranks PEs by predicted work)
    assigned_work: dict[int, tuple[float, int]] = field(default_factory=dict)  # rid -> (t dispatched, work)
    incarnation: int = 0
    fingerprint: str = ""
    epoch: int = 0  # fencing: messages of another epoch are dropped; a declared-dead engine re-registers


@dataclass
class RemoteResult:
    """What :meth:`RemoteCluster.run_turn` returns (the attributes the driver's outcome reads)."""

    tokens: list[int]
    prompt_tokens: int
    hit_tokens: int
    t_first_token: float
    t_second_token: float | None
    t_done: float
    bytes: dict[str, int]
    t_last_token: float = 0.0  # the last token out (the DE's reply also waits for the turn's writes)


class RemoteCluster:
    """The engine processes as a :class:`~dualpath.scheduler.driver.ClusterLike` (see the module docstring)."""

    def __init__(self, daemon: SchedulerDaemon) -> None:
        self.d = daemon
        self._rids = itertools.count(1)
        self._lookup_rr = 0
        self._pe_released: dict[int, bool] = {}  # rid -> the PE's share was given back (its prefill is done)
        self.turn_pairs: dict[int, tuple[str, str]] = {}
        self.streams: dict[int, TurnCtx] = {}  # rid -> the turn whose DE tokens are forwarded to its client
        self.on_stored: dict[int, Callable[[], None]] = {}  # rid -> the driver's turn_stored, until the DE's notice
        self.work_ranked = False  # the driver ranks PEs by predicted work (work_predictor)

    @property
    def block_tokens(self) -> int:
        return self.d.block_tokens

    @property
    def persists(self) -> bool:
        return bool(self.d.config.cluster.persist)

    def prompt_keys(self, prompt_ids: Any, salt: str | None = None) -> tuple[list[int], int]:
        """Keys of a prompt's Full Blocks for the driver's in-flight prefixes (chained hashes of the token blocks:
        equal keys, equal prefixes, barring a 64-bit collision, which only costs a wait; not storage's keys), and
        how many of them a turn may hit; a cache ``salt`` starts the chain (its turns wait only on their own)."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        bt = self.d.block_tokens
        n = int(ids.size) // bt
        keys: list[int] = []
        h = 0 if salt is None else hash(("salt", salt))
        raw = ids[: n * bt].tobytes()
        step = bt * 8
        for i in range(n):
            h = hash((h, raw[i * step:(i + 1) * step]))
            keys.append(h)
        return keys, min(n, max(0, (int(ids.size) - 1) // bt))

    def work_predictor(self) -> Callable[[RequestInfo], int]:
        """``GlobalScheduler.pe_work`` for DualPath's ranking by predicted work (:mod:`dualpath.engine.work`): the
        work model a live PE sent in its hello, in the unit its heartbeats report; a request's tokens while no PE
        has sent one (their snapshots then report tokens too)."""
        self.work_ranked = True
        return self._pe_work

    def _work_model(self) -> PrefillWork | None:
        return next((r.work_model for r in self.d.engines.values()
                     if r.alive and r.role == "prefill" and r.work_model is not None), None)

    def _pe_work(self, r: RequestInfo) -> int:
        model = self._work_model()
        return r.tokens if model is None else model(r)

    def snapshots(self) -> tuple[list[EngineSnapshot], list[EngineSnapshot]]:
        pes: list[EngineSnapshot] = []
        des: list[EngineSnapshot] = []
        for rec in self.d.engines.values():
            if not rec.alive:
                continue
            free = int(rec.hb.get("free_kv_tokens", 0))
            free -= sum(need for t, need in rec.reserved.values() if t >= rec.hb_time)
            work = -1
            if self.work_ranked and rec.work_model is not None:  # its last heartbeat's, and what was sent since
                work = max(0, int(rec.hb.get("work", 0)))
                work += sum(w for t, w in rec.assigned_work.values() if t >= rec.hb_time)
            snap = EngineSnapshot(rec.rank, rec.node, rec.seq, rec.tok, int(rec.hb.get("read_q", 0)), max(0, free),
                                  work)
            (pes if rec.role == "prefill" else des).append(snap)
        return pes, des

    async def lookup(self, prompt_ids: Any, salt: str | None = None) -> int:
        live = [r for r in self.d.engines.values() if r.alive]
        if not live:
            return 0
        self._lookup_rr += 1
        rec = live[self._lookup_rr % len(live)]
        try:
            body: dict[str, Any] = {"prompt": tokens_to_bin(prompt_ids)}
            if salt is not None:
                body["salt"] = salt
            reply = await self.d.request(rec, "lookup", body, 5.0)
        except DualPathError as exc:
            log.warning("lookup at %s failed (%s); treating the prompt as a miss", rec.name, exc)
            return 0
        return int(reply.body["blocks"]) * self.d.block_tokens

    async def run_turn(self, session: int, prompt_ids: Any, gen_tokens: int, pe: int, de: int, path: PathKind,
                       pe_blocks: int | None = None, salt: str | None = None) -> RemoteResult:
        d = self.d
        deadline = d.deadline_of(prompt_ids)
        ctx = d.ctx_of(prompt_ids)
        if ctx is not None and ctx.cancelled.is_set():
            raise TurnCancelled(f"cancelled: session {session}'s turn was cancelled by {ctx.cancelled_by}")
        pe_rec, de_rec = d.engine("pe", pe), d.engine("de", de)
        if pe_rec is None or de_rec is None:
            raise EngineDied(f"engine pe{pe} or de{de} is not alive")
        rid = next(self._rids)
        prompt = tokens_to_bin(prompt_ids)
        n = len(prompt) // 8
        kv_need = -(-(n + gen_tokens) // d.block_tokens) * d.block_tokens
        pe_rec.seq += 1
        pe_rec.tok += n
        de_rec.seq += 1
        de_rec.tok += n
        de_rec.reserved[rid] = (time.monotonic(), kv_need)
        self.turn_pairs[rid] = (pe_rec.name, de_rec.name)
        if ctx is not None:
            ctx.dispatched += 1
            if ctx.stream:
                self.streams[rid] = ctx
        stored_cb = turn_stored.get()
        if stored_cb is not None:
            self.on_stored[rid] = stored_cb
        result: list[RemoteResult] = []
        try:
            async with anyio.create_task_group() as watch:
                if ctx is not None:
                    watch.start_soon(_cancel_on, ctx.cancelled, watch.cancel_scope)
                result.append(await self._dispatch(rid, session, prompt, gen_tokens, pe, de, path, pe_blocks, salt,
                                                   pe_rec, de_rec, deadline, n, ctx))
                watch.cancel_scope.cancel()
            if not result:  # the client cancelled it: abort it on both engines (below), answer the client
                d.stats["cancelled_on_engines"] += 1
                by = ctx.cancelled_by if ctx is not None else "its client"
                raise TurnCancelled(f"cancelled: session {session}'s turn was cancelled by {by}")
            return result[0]
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                for rec in (pe_rec, de_rec):
                    if rec.alive:
                        with contextlib.suppress(DualPathError):
                            await d.notify(rec, "abort", {"rid": rid, "reason": f"{type(_leaf(exc)).__name__}"})
            raise _classify(exc, pe_rec, de_rec) from None
        finally:
            if not self._pe_released.pop(rid, False):  # (else _dispatch gave it back once the prefill was done)
                pe_rec.seq -= 1
                pe_rec.tok -= n
            de_rec.seq -= 1
            de_rec.tok -= n
            de_rec.reserved.pop(rid, None)
            pe_rec.assigned_work.pop(rid, None)
            self.turn_pairs.pop(rid, None)
            self.streams.pop(rid, None)
            self.on_stored.pop(rid, None)
            if ctx is not None:
                ctx.dispatched -= 1

    async def _dispatch(self, rid: int, session: int, prompt: bytes, gen_tokens: int, pe: int, de: int,
                        path: PathKind, pe_blocks: int | None, salt: str | None, pe_rec: EngineRecord, de_rec: EngineRecord,
                        deadline: float, n: int, ctx: TurnCtx | None) -> RemoteResult:
        """The turn's control messages (begin both -> decode DE + prefill PE -> logits to the DE -> finished)."""
        d = self.d
        remaining = _left(deadline)
        stored = 0
        if ctx is not None and "prompt_logprobs" in ctx.sampling:
            path = PathKind.RECOMPUTE  # every prompt position is computed (a loaded position has no logits)
        if path is not PathKind.RECOMPUTE:
            looked = await d.request(pe_rec, "lookup", {"prompt": prompt, **({} if salt is None else {"salt": salt})},
                                     min(remaining, 10.0))
            stored = int(looked.body["blocks"])
        plan = plan_sides(stored, path, pe_blocks)
        if self.work_ranked and pe_rec.work_model is not None:  # counted until a heartbeat reports it
            hit = min(stored * d.block_tokens, n)  # (as the PE charges it: stored stays 0 for a recompute)
            pe_rec.assigned_work[rid] = (time.monotonic(), pe_rec.work_model.work(hit, n - hit))
        pe_extra: dict[str, Any] = {}
        if ctx is not None and "prompt_logprobs" in ctx.sampling:  # the PE computes them (the turn is recomputed)
            pe_extra["prompt_logprobs"] = ctx.sampling["prompt_logprobs"]
        begin = {"rid": rid, "session": int(session), "prompt": prompt, "gen": int(gen_tokens),
                 "path": path.value, "pe": pe, "de": de, "pe_blocks": plan.pe_blocks,
                 "stored_blocks": plan.stored_blocks, "deadline_s": max(0.001, _left(deadline))}
        if salt is not None:
            begin["salt"] = salt
        de_begin = begin if ctx is None else {**begin, **ctx.sampling, "stream": bool(ctx.stream)}
        if rid in self.on_stored or (ctx is not None and ctx.stream and ctx.notify_stored):
            de_begin = {**de_begin, "notify_stored": True}
        ok: dict[str, int] = {}

        async def _begin(side: str, rec: EngineRecord) -> None:
            body = de_begin if side == "de" else {**begin, **pe_extra}
            r = await d.request(rec, "begin", body, _left(deadline))
            ok[side] = int(r.body["ok_blocks"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(_begin, "pe", pe_rec)
            tg.start_soon(_begin, "de", de_rec)
        hit = combine_hit(ok["pe"], ok["de"], plan.pe_blocks)
        if ctx is not None:
            ctx.path, ctx.hit_tokens = path.value, hit * d.block_tokens
        out: dict[str, Message] = {}
        t_first = math.nan

        async def _decode() -> None:
            out["de"] = await d.request(de_rec, "decode", {"rid": rid, "hit_blocks": hit}, _left(deadline))

        async with anyio.create_task_group() as tg:
            tg.start_soon(_decode)
            pre = await d.request(pe_rec, "prefill", {"rid": rid, "hit_blocks": hit}, _left(deadline))
            t_first = time.perf_counter()
            pe_rec.seq -= 1
            pe_rec.tok -= n
            pe_rec.assigned_work.pop(rid, None)
            self._pe_released[rid] = True
            await d.notify(de_rec, "logits", {"rid": rid, "logits": pre.body["logits"]})
            if ctx is not None and pe_extra:
                ctx.prompt_lp = {k: pre.body[k] for k in PROMPT_LP_FIELDS if k in pre.body}
        fin = out["de"].body
        d.stats["paths." + path.value] += 1
        t_done = time.perf_counter()
        return RemoteResult(tokens=list(fin["tokens"]), prompt_tokens=n, hit_tokens=int(fin["hit_tokens"]),
                            t_first_token=t_first, t_second_token=None, t_done=t_done,
                            bytes={str(k): int(v) for k, v in fin["link_bytes"].items()},
                            t_last_token=max(t_first, t_done - float(fin.get("after_last_s", 0.0))))


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _leaf(exc: BaseException) -> BaseException:
    from dualpath.engine.request import unwrap

    return unwrap(exc)


def _classify(exc: BaseException, pe: EngineRecord, de: EngineRecord) -> BaseException:
    leaf = _leaf(exc)
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return exc
    if not pe.alive or not de.alive or isinstance(leaf, PeerGone):
        dead = ",".join(r.name for r in (pe, de) if not r.alive) or "?"
        return EngineDied(f"engine {dead} died during the turn: {leaf}")
    return leaf


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, RemoteError):
        return exc.code in RETRIABLE_CODES
    return isinstance(exc, (EngineDied, PeerTimeout, PeerGone, TransportError)) and not isinstance(
        exc, DeadlineExceeded)


class SchedulerDaemon:
    """The scheduler process's state and handlers (see the module docstring)."""

    def __init__(self, config: DualPathConfig, *, bind: str | None = None) -> None:
        self.config = check_deployable(config)
        sc = self.config.serve
        self.bind = bind or f"tcp://{sc.host}:{sc.port}"
        self.engines: dict[str, EngineRecord] = {}
        self.by_ident: dict[bytes, str] = {}
        self.block_tokens = self.config.cluster.block_tokens
        self.stats: Counter[str] = Counter()
        self.cluster = RemoteCluster(self)
        self.channel: Channel | None = None
        self.driver: SchedulerDriver | None = None
        self._deadlines: dict[int, float] = {}
        self._stop = anyio.Event()
        self._inflight = 0
        self.peak: dict[str, int] = {}
        self.draining = False
        self._clients: OrderedDict[bytes, None] = OrderedDict()  # client connections seen (told of a stop)
        self._operator_stop = False
        self._cancels: dict[tuple[bytes, int], list[TurnCtx]] = {}  # (peer, session) -> its turns
        self._ctx: dict[int, TurnCtx] = {}  # id(prompt array) -> its turn (the driver passes the array through)
        self._epochs = itertools.count(time.time_ns() // 1000)  # unique across scheduler restarts
        self._rereg_sent: dict[bytes, float] = {}  # peer -> when we last asked it to register (rate limit)
        self.key_roles = key_roles(self.config) if sc.curve else {}
        self.engine_keys = engine_key_names(self.config) if sc.curve else {}  # key -> the engine it may be
        self.tokens: dict[str, str] | None = None
        if not sc.curve:
            if sc.token_file is not None:
                self.tokens = load_tokens(sc.token_file)
            else:  # a standalone scheduler: make a deployment secret; engines need serve.token_file set to it
                path = os.path.join(tempfile.mkdtemp(prefix="dualpath-control-"), "control.token")
                self.tokens = create_tokens(path)
                log.warning("no serve.token_file and no CURVE: engine/operator tokens written to %s; set "
                            "serve.token_file to it for the engines and the operator", path)
        elif not sc.curve_engine_public_key and not sc.curve_engine_keys:
            log.warning("serve.curve_engine_public_key is not set: engines use the client key pair, so any "
                        "client could register as an engine; give the engines their own pair")
        elif not sc.curve_engine_keys:
            log.warning("serve.curve_engine_keys is not set: every engine shares one key pair, so any engine "
                        "could register as another; give each engine its own pair")

    # --- plumbing ----------------------------------------------------------------------------------------
    def engine(self, prefix: str, rank: int) -> EngineRecord | None:
        rec = self.engines.get(f"{prefix}{rank}")
        return rec if rec is not None and rec.alive else None

    def ctx_of(self, prompt_ids: Any) -> TurnCtx | None:
        return self._ctx.get(id(prompt_ids))

    def deadline_of(self, prompt_ids: Any) -> float:
        return self._deadlines.get(id(prompt_ids), time.monotonic() + self.config.serve.request_deadline_s)

    async def request(self, rec: EngineRecord, mtype: str, body: dict[str, Any], timeout: float) -> Message:
        assert self.channel is not None
        if not rec.alive:
            raise EngineDied(f"{rec.name} is dead")
        try:
            return await self.channel.request(rec.ident, mtype, body, timeout)
        except PeerGone as exc:
            self._declare_dead(rec, f"its socket is gone ({exc})")
            raise EngineDied(f"{rec.name} died: {exc}") from None

    async def notify(self, rec: EngineRecord, mtype: str, body: dict[str, Any]) -> None:
        assert self.channel is not None
        try:
            await self.channel.notify(rec.ident, mtype, body)
        except PeerGone as exc:
            self._declare_dead(rec, f"its socket is gone ({exc})")
            raise EngineDied(f"{rec.name} died: {exc}") from None

    def _make_driver(self) -> SchedulerDriver:
        cfg = self.config
        token_bytes = max((r.token_bytes for r in self.engines.values()), default=1)
        snic = cfg.cluster.snic_gbps
        storage_tps = (snic * 1e9 / token_bytes) if snic else 1e9
        mc = cfg.model
        gpu_tps = mc.device_tflops * 1e12 / max(1.0, mc.linear_flops_per_token) if mc.kind == "synthetic" else 2000.0
        params = SchedulerParams.from_config(cfg.scheduler, storage_tps, gpu_tps, self.block_tokens)
        sched = GlobalScheduler(get_policy(cfg.scheduler.policy, layerwise=cfg.scheduler.layerwise), params)
        return SchedulerDriver(self.cluster, sched, fetch_interval_s=cfg.scheduler.fetch_interval_s,
                               max_request_tokens=cfg.cluster.kv_pool_tokens,
                               inflight_prefix_min_tokens=cfg.scheduler.inflight_prefix_min_tokens,
                               inflight_prefix_wait_s=cfg.scheduler.inflight_prefix_wait_s,
                               work_ranking=cfg.scheduler.work_ranking)

    # --- main --------------------------------------------------------------------------------------------
    async def run(self, *, address_file: str | None = None) -> None:
        sc = self.config.serve
        self.channel = Channel("scheduler", bind=self.bind, curve=server_curve(self.config), handler=self._handle,
                               max_message_bytes=sc.max_message_bytes, max_tasks=sc.max_inflight + 1024)
        async with self.channel:
            if address_file:
                tmp = f"{address_file}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(self.channel.address)
                os.replace(tmp, address_file)
            log.info("scheduler listening at %s", self.channel.address)
            self.driver = self._make_driver()
            async with self.driver, anyio.create_task_group() as tg:
                tg.start_soon(self._monitor)
                await self._stop.wait()
                if self._operator_stop:  # clients (an HTTP front) learn it was a stop, not a crash; told first,
                    await self._tell_clients("shutdown")  # before the engines exit and the launcher reacts
                for rec in list(self.engines.values()):
                    if rec.alive:
                        with contextlib.suppress(DualPathError):
                            await self.notify(rec, "shutdown", {})
                tg.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _tell_clients(self, what: str) -> None:
        """Tell every client connection seen (an HTTP front's too) of the operator's ``shutdown`` or ``drain``;
        best effort, within 1 s."""
        channel = self.channel
        if channel is None:
            return
        with anyio.move_on_after(1.0):
            for client in list(self._clients):
                with contextlib.suppress(DualPathError, OSError):
                    await channel.notify(client, what, {}, timeout=0.2)

    async def _monitor(self) -> None:
        sc = self.config.serve
        while True:
            await anyio.sleep(min(sc.heartbeat_s, sc.dead_after_s / 4))
            now = time.monotonic()
            for rec in list(self.engines.values()):
                if rec.alive and now - rec.last_seen > sc.dead_after_s:
                    self._declare_dead(rec, f"no heartbeat for {now - rec.last_seen:.1f} s")
            g = process_gauges()
            for k, v in g.items():
                self.peak[f"scheduler.{k}"] = max(self.peak.get(f"scheduler.{k}", 0), v)

    def _declare_dead(self, rec: EngineRecord, why: str) -> None:
        if not rec.alive:
            return
        rec.alive = False
        self.stats["engine_deaths"] += 1
        log.warning("engine %s (pid %d, epoch %d) declared dead: %s", rec.name, rec.pid, rec.epoch, why)
        assert self.channel is not None
        self.channel.fail_peer(rec.ident, PeerGone(f"engine {rec.name} died ({why})"))

    # --- roles -------------------------------------------------------------------------------------------
    def _key_has(self, role: str) -> bool:
        """With CURVE: the sender's authenticated key has ``role``."""
        return role in self.key_roles.get(PEER_USER.get() or "", frozenset())

    def _token_ok(self, role: str, token: str | None) -> bool:
        want = self.tokens.get(role) if self.tokens else None
        return want is not None and token is not None and hmac.compare_digest(want, token)

    def _bound(self, peer: bytes) -> EngineRecord | None:
        """The registered engine this connection is (an engine's identity is bound at its hello)."""
        name = self.by_ident.get(peer)
        rec = self.engines.get(name) if name else None
        return rec if rec is not None and rec.ident == peer else None

    def _refuse(self, peer: bytes, t: str, role: str) -> SchedulerError:
        self.stats["refused_messages"] += 1
        who = PEER_USER.get() or peer.hex()[:16]
        log.warning("refused %r from %s: only the %s role may send it", t, who, role)
        how = (f"the sender's CURVE key is not the {role} key (serve.curve_{role}_public_key)"
               if self.config.serve.curve else
               f"no valid {role} token: set serve.token_file to the deployment's token file")
        return SchedulerError(f"unauthorized: {t!r} needs the {role} role ({how})")

    def _check_engine_key(self, b: dict[str, Any]) -> None:
        """With CURVE: a per-engine key (``serve.curve_engine_keys``) registers only as its own engine, and an
        engine that has its own key registers only with it (not with a shared engine key)."""
        name = f"{'pe' if b['role'] == 'prefill' else 'de'}{b['rank']}"
        user = PEER_USER.get() or ""
        owner = self.engine_keys.get(user)
        if owner is None and name not in self.config.serve.curve_engine_keys:
            return  # a shared engine key (legacy) for an engine without its own
        if owner == name:
            return
        self.stats["refused_messages"] += 1
        if owner is not None:
            why = (f"the CURVE key {user} is {owner}'s (serve.curve_engine_keys.{owner}), so it may register only "
                   f"as {owner}")
        else:
            why = (f"{name} has its own key in serve.curve_engine_keys.{name}; the key {user} may not register as it")
        log.warning("refused a hello as %s: %s", name, why)
        raise SchedulerError(f"unauthorized: 'hello' as {name} needs {name}'s engine key ({why})")

    async def _ask_register(self, peer: bytes, epoch: int) -> None:
        """Tell a connection that beats without a live registration to say hello (at most once per
        dead_after_s per connection)."""
        now = time.monotonic()
        if now - self._rereg_sent.get(peer, -1e9) < self.config.serve.dead_after_s:
            return
        if len(self._rereg_sent) > 4096:
            self._rereg_sent.clear()
        self._rereg_sent[peer] = now
        with contextlib.suppress(DualPathError):
            await self.channel.notify(peer, "reregister", {"epoch": epoch})  # type: ignore[union-attr]

    # --- handlers ----------------------------------------------------------------------------------------
    async def _handle(self, peer: bytes, msg: Message) -> tuple[str, dict[str, Any]] | None:
        t, b = msg.type, msg.body
        curve = self.config.serve.curve
        if t in ("heartbeat", "started", "stored") and curve and not self._key_has("engine"):  # engine messages only
            raise self._refuse(peer, t, "engine")
        if t in ("ping", "stats", "submit", "cancel") and self._bound(peer) is None:
            self._clients[peer] = None  # a client's connection, remembered to be told of a stop (bounded)
            self._clients.move_to_end(peer)
            if len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)
        if t == "heartbeat":
            rec = self._bound(peer)
            epoch = int(b.get("epoch", 0))
            if rec is None or not rec.alive or epoch != rec.epoch:
                # fenced: a stale incarnation (declared dead), or a scheduler restarted since it registered;
                # its message is dropped and it is asked (once) to register again
                self.stats["stale_messages"] += 1
                await self._ask_register(peer, epoch)
                return None
            rec.last_seen = time.monotonic()
            rec.hb = dict(b)
            rec.hb_time = rec.last_seen
            for k in ("rss", "fds", "tasks", "regions", "inflight", "read_q"):
                key = f"{rec.name}.{k}"
                self.peak[key] = max(self.peak.get(key, 0), int(b[k]))
            return None
        if t == "hello":
            if not (self._key_has("engine") if curve else self._token_ok("engine", b.get("token"))):
                raise self._refuse(peer, t, "engine")
            if curve:
                self._check_engine_key(b)
            return await self._hello(peer, b)
        if t == "started":
            pair = self.cluster.turn_pairs.get(b["rid"])
            rec = self._bound(peer)
            name = rec.name if rec is not None and rec.alive else None
            if pair is not None and name == pair[0]:
                de = self.engines.get(pair[1])
                if de is not None and de.alive:
                    await self.notify(de, "started", {"rid": b["rid"]})
            return None
        if t == "stored":  # from the turn's DE only: turns waiting for its prompt's prefix may go
            pair = self.cluster.turn_pairs.get(b["rid"])
            rec = self._bound(peer)
            if pair is not None and rec is not None and rec.alive and rec.name == pair[1]:
                cb = self.cluster.on_stored.pop(b["rid"], None)
                if cb is not None:
                    cb()
                ctx = self.cluster.streams.get(b["rid"])
                if ctx is not None and ctx.notify_stored and not ctx.cancelled.is_set():
                    assert self.channel is not None
                    with contextlib.suppress(DualPathError):  # (the client went away: nothing to tell)
                        await self.channel.notify(ctx.peer, "stream", {"stream": ctx.stream, "offset": ctx.sent,
                                                                       "tokens": [], "stored": True}, timeout=5.0)
            return None
        if t == "submit":  # clients only (not an engine's connection, not another key)
            if (curve and not self._key_has("client")) or self._bound(peer) is not None:
                raise self._refuse(peer, t, "client")
            if self.draining:
                raise SchedulerError("draining: the scheduler accepts no new turns (serve drain)")
            turn_key = (peer, int(b["session"]))
            ctx = TurnCtx(peer, int(b["session"]), {k: b[k] for k in SAMPLING_FIELDS if k in b},
                          stream=int(b.get("stream", 0)), notify_stored=bool(b.get("notify_stored", False)))
            with anyio.CancelScope() as scope:
                ctx.scope = scope
                self._cancels.setdefault(turn_key, []).append(ctx)
                try:
                    return await self._submit(b, ctx)
                finally:
                    ctx.done = True
                    ctxs = self._cancels.get(turn_key, [])
                    if ctx in ctxs:
                        ctxs.remove(ctx)
                    if not ctxs:
                        self._cancels.pop(turn_key, None)
            self.stats["cancelled"] += 1
            raise SchedulerError(f"cancelled: session {b['session']}'s turn was cancelled by {ctx.cancelled_by}")
        if t == "cancel":  # a client ends only its own turns (same connection, same session); the operator any
            operator = ((curve and self._key_has("operator")) or self._token_ok("operator", b.get("token")))
            if b.get("token") is not None and not operator:
                raise self._refuse(peer, t, "operator")
            if not operator and ((curve and not self._key_has("client")) or self._bound(peer) is not None):
                raise self._refuse(peer, t, "client")
            session = int(b["session"])
            if operator:
                ctxs = [c for (_p, s), cs in self._cancels.items() if s == session for c in cs]
                log.warning("the operator cancels session %d (%d turns)", session, len(ctxs))
            else:
                ctxs = list(self._cancels.get((peer, session), []))
            for c in ctxs:
                if operator:
                    c.cancelled_by = "the operator (dualpath ctl cancel)"
                c.cancelled.set()  # a dispatched turn is aborted on both engines (RemoteCluster.run_turn)
                if c.scope is not None:
                    c.scope.cancel()  # the submit answers ``cancelled`` now
            # answer once the turns are aborted on their engines (bounded: a stuck engine is the reaper's job)
            with anyio.move_on_after(min(5.0, self.config.serve.request_deadline_s)):
                while any(not c.done or c.dispatched for c in ctxs):
                    await anyio.sleep(0.005)
            return "ok", {"cancelled": len(ctxs)}
        if t == "tokens":  # a decode engine's streamed tokens: forwarded to the turns' clients, in order
            if curve and not self._key_has("engine"):
                raise self._refuse(peer, t, "engine")
            await self._forward_tokens(peer, b)
            return None
        if t == "ping":
            return "pong", {"role": "scheduler"}
        if t == "stats":
            return "stats_reply", {"data": self.stats_dict()}
        if t in ("shutdown", "drain"):
            if not ((curve and self._key_has("operator")) or self._token_ok("operator", b.get("token"))):
                raise self._refuse(peer, t, "operator")
            log.warning("%s requested by the operator", t)
            if t == "shutdown":
                self._operator_stop = True
                self.stop()
            else:
                self.draining = True
                await self._tell_clients("drain")  # so a front's /health says draining now, not at its next poll
            return "ok", {}
        raise SchedulerError(f"unexpected message {t!r} at the scheduler")

    async def _hello(self, peer: bytes, b: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        role, rank = b["role"], b["rank"]
        name = f"{'pe' if role == 'prefill' else 'de'}{rank}"
        n = (self.config.cluster.prefill_nodes if role == "prefill" else self.config.cluster.decode_nodes)
        if rank >= n * self.config.cluster.engines_per_node:
            raise SchedulerError(f"hello from {name}: the config has no such engine")
        if b["node"] != rank // self.config.cluster.engines_per_node:  # (its node decides its storage read side)
            raise SchedulerError(f"hello from {name}: node {b['node']}, but {name} is on node "
                                 f"{rank // self.config.cluster.engines_per_node} (cluster.engines_per_node)")
        bound = self.by_ident.get(peer)
        if bound is not None and bound != name and self.engines[bound].alive:
            raise SchedulerError(f"hello from {name}: this connection is registered as {bound}")
        others = [r for r in self.engines.values() if r.alive and r.name != name]
        if any(r.fingerprint != b["fingerprint"] for r in others):
            raise SchedulerError(f"hello from {name}: model/layout fingerprint differs from the other engines")
        old = self.engines.get(name)
        if old is not None and old.alive and old.ident == peer and old.pid == b["pid"]:
            # the same live incarnation saying hello again (a late reregister notice): idempotent, no declaration
            return "welcome", {"peers": [f"{r.name}={r.address}" for r in self.engines.values() if r.alive],
                               "heartbeat_s": self.config.serve.heartbeat_s, "epoch": old.epoch}
        if old is not None and old.alive:
            self._declare_dead(old, f"replaced by a new registration (pid {b['pid']})")
        epoch = next(self._epochs)
        work_model = None
        if role == "prefill" and b.get("work_model") is not None:
            try:
                work_model = PrefillWork.from_wire(b["work_model"])
            except SchedulerError as exc:
                raise SchedulerError(f"hello from {name}: {exc}") from None
        rec = EngineRecord(name, role, rank, b["node"], b["address"], b["pid"], peer, b["token_bytes"],
                           b["vocab_size"], b["max_context"], time.monotonic(),
                           incarnation=(old.incarnation + 1) if old else 0, fingerprint=b["fingerprint"],
                           epoch=epoch, work_model=work_model)
        if old is not None:
            self.stats["engine_rejoins"] += 1
            if self.by_ident.get(old.ident) == name:
                del self.by_ident[old.ident]
        elif b.get("epoch", 0):
            self.stats["engines_recovered"] += 1  # registered with an earlier scheduler process
        holds = list(b.get("holds", []))
        if holds:  # turns of an earlier incarnation or scheduler: their clients got an explicit error already
            self.stats["orphan_turns_reported"] += len(holds)
        self._rereg_sent.pop(peer, None)
        self.engines[name] = rec
        self.by_ident[peer] = name
        log.info("engine %s registered (epoch %d, pid %d, holds %d turns, %d stored blocks)", name, epoch, b["pid"],
                 len(holds), int(b.get("stored_blocks", 0)))
        peers = [f"{r.name}={r.address}" for r in self.engines.values() if r.alive]
        for r in self.engines.values():  # the other role learns the (new) transport address
            if r.alive and r.role != role:
                with contextlib.suppress(DualPathError):
                    await self.notify(r, "peers", {"peers": [f"{name}={b['address']}"]})
        return "welcome", {"peers": peers, "heartbeat_s": self.config.serve.heartbeat_s, "epoch": epoch}

    async def _forward_tokens(self, peer: bytes, b: dict[str, Any]) -> None:
        rec = self._bound(peer)
        if rec is None or not rec.alive or rec.role != "decode":
            self.stats["stale_messages"] += 1
            return
        rids, offsets, counts, tokens = b["rids"], b["offsets"], b["counts"], b["tokens"]
        if not len(rids) == len(offsets) == len(counts) or sum(counts) != len(tokens):
            raise ProtocolError("tokens: rids, offsets and counts must have one entry per turn and counts must "
                                "add up to the length of tokens")
        widths = b.get("lp_width") or [0] * len(rids)
        lp_ids, lp_vals = b.get("lp_ids", b""), b.get("lp_vals", b"")
        if len(widths) != len(rids) or len(lp_ids) != len(lp_vals) or \
                len(lp_ids) != 4 * sum(c * w for c, w in zip(counts, widths, strict=True)):
            raise ProtocolError("tokens: lp_width needs one entry per turn, and lp_ids and lp_vals 4 bytes for each "
                                "of its turns' entries")
        at = lp_at = 0
        assert self.channel is not None
        for rid, offset, count, width in zip(rids, offsets, counts, widths, strict=True):
            part, at = tokens[at: at + count], at + count
            lp_end = lp_at + 4 * count * width
            lp_part, lp_at = (lp_ids[lp_at:lp_end], lp_vals[lp_at:lp_end]), lp_end
            ctx = self.cluster.streams.get(rid)
            pair = self.cluster.turn_pairs.get(rid)
            if ctx is None or pair is None or pair[1] != rec.name or ctx.cancelled.is_set():
                continue  # a turn that ended (or was cancelled) meanwhile, or not this engine's
            body: dict[str, Any] = {"stream": ctx.stream, "offset": offset, "tokens": part}
            if width:
                body.update(lp_width=width, lp_ids=lp_part[0], lp_vals=lp_part[1])
            if not ctx.sent:
                body.update(path=ctx.path, hit_tokens=min(ctx.hit_tokens, MAX_TOKENS))
            ctx.sent = max(ctx.sent, offset + count)
            self.stats["streamed_tokens"] += count
            with contextlib.suppress(DualPathError):  # the client went away: its turn ends by cancel or deadline
                await self.channel.notify(ctx.peer, "stream", body, timeout=5.0)

    def _drop_ctx(self, key: int, ctx: TurnCtx) -> None:
        if self._ctx.get(key) is ctx:
            self._ctx.pop(key, None)

    def _validate_submit(self, prompt: np.ndarray, gen: int) -> None:
        live = [r for r in self.engines.values() if r.alive]
        if prompt.size == 0:
            raise SchedulerError("submit: the prompt is empty")
        if prompt.size > MAX_TOKENS:
            raise SchedulerError(f"submit: prompt of {prompt.size} tokens exceeds {MAX_TOKENS}")
        if live:
            vocab = min(r.vocab_size for r in live)
            ctx = min(r.max_context for r in live)
            if int(prompt.max()) >= vocab:
                raise SchedulerError(f"submit: token id {int(prompt.max())} is outside the vocabulary of {vocab}")
            if prompt.size + gen > ctx:
                raise SchedulerError(f"submit: {prompt.size} prompt + {gen} generated tokens exceed the context of {ctx} "
                                     "tokens the engines serve (the model's, cut to what a host buffer holds)")

    async def _submit(self, b: dict[str, Any], ctx: TurnCtx) -> tuple[str, dict[str, Any]]:
        sc = self.config.serve
        if self._inflight >= sc.max_inflight:
            self.stats["busy"] += 1
            raise SchedulerError(f"busy: {self._inflight} turns in flight (serve.max_inflight)")
        prompt = bin_to_tokens(b["prompt"])
        gen = int(b["gen"])
        self._validate_submit(prompt, gen)
        try:
            sampling = sampling_of(b, "submit")
        except ProtocolError as exc:
            raise SchedulerError(str(exc)) from None
        vocab = min((r.vocab_size for r in self.engines.values() if r.alive), default=0)
        if sampling is not None and vocab and any(t >= vocab for t in sampling.stop_ids):
            raise SchedulerError(f"submit: field 'stop_ids': a token id is outside the vocabulary of {vocab}")
        budget = min(sc.request_deadline_s, float(b.get("deadline_s", sc.request_deadline_s)))
        t0 = time.perf_counter()
        deadline = time.monotonic() + budget
        self.stats["submitted"] += 1
        self._inflight += 1
        retries = 0
        key = id(prompt)
        self._deadlines[key] = deadline
        self._ctx[key] = ctx
        assert self.driver is not None
        outcome = None
        try:
            while True:
                outcome = None
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    try:
                        outcome = await self.driver.run_turn(int(b["session"]), prompt, gen, salt=b.get("salt"))
                    except Exception as exc:
                        if (not _retriable(exc) or retries >= sc.max_retries or time.monotonic() >= deadline
                                or ctx.sent or ctx.cancelled.is_set()):  # (a client saw tokens: no re-run)
                            self.stats["failed"] += 1
                            raise
                        retries += 1
                        self.stats["retries"] += 1
                        log.warning("turn of session %d failed (%s: %s); retry %d", b["session"],
                                    type(exc).__name__, exc, retries)
                        await anyio.sleep(min(0.05 * retries, 0.5))
                        continue
                if outcome is None:
                    self.stats["failed"] += 1
                    self.stats["deadline_exceeded"] += 1
                    raise DeadlineExceeded(f"session {b['session']}: the turn did not finish within {budget:g} s "
                                           f"({retries} retries)")
                break
        finally:
            self._inflight -= 1
            self._deadlines.pop(key, None)
            if outcome is None:  # failed, cancelled or late: a dispatch still running is aborted on its engines
                ctx.cancelled.set()
                # (kept a moment: the driver may have started the turn just before it was withdrawn)
                asyncio.get_running_loop().call_later(2.0, self._drop_ctx, key, ctx)
            else:
                self._drop_ctx(key, ctx)
        self.stats["completed"] += 1
        total = time.perf_counter() - t0
        ttft = max(0.0, outcome.t_first_token - outcome.t_submit) if math.isfinite(outcome.t_first_token) else total
        n = len(outcome.tokens)
        tpot = (outcome.t_last_token - outcome.t_first_token) / (n - 1) if n > 1 and math.isfinite(
            outcome.t_first_token) else 0.0
        last = min(total, max(0.0, outcome.t_last_token - t0))
        return "result", {"session": int(b["session"]), "tokens": [int(x) for x in outcome.tokens],
                          "prompt_tokens": outcome.prompt_tokens, "hit_tokens": outcome.hit_tokens,
                          "path": outcome.path, "pe": outcome.pe, "de": outcome.de, "ttft_s": ttft,
                          "tpot_s": max(0.0, tpot), "total_s": total, "last_s": last, "retries": retries,
                          **ctx.prompt_lp}

    def stats_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: int(v) for k, v in self.stats.items()}
        out["inflight"] = self._inflight
        out["draining"] = int(self.draining)
        out["engines_alive"] = sum(1 for r in self.engines.values() if r.alive)
        served = [r.max_context for r in self.engines.values() if r.alive]
        if served:  # the longest turn every live engine takes (its model's context, cut to its host buffer)
            out["max_context"] = min(served)
        out["held"] = self.driver.stats.held if self.driver is not None else 0  # waited for a prefix in flight
        out["rejected_messages"] = self.channel.rejected if self.channel else 0
        out["refused_peers"] = self.channel.refused if self.channel else 0
        out["stale_messages"] = self.channel.stale if self.channel else 0  # meant for a previous scheduler process
        out["scheduler.tasks"] = len(asyncio.all_tasks())
        out.update({f"scheduler.{k}": v for k, v in process_gauges().items()})
        for rec in self.engines.values():
            out[f"{rec.name}.alive"] = int(rec.alive)
            out[f"{rec.name}.pid"] = rec.pid
            out[f"{rec.name}.assigned"] = rec.seq
            for k, v in rec.hb.items():
                out[f"{rec.name}.{k}"] = v
        for k, v in self.peak.items():
            out[f"peak.{k}"] = v
        return dict(list(out.items())[:250])


# --- process entry -------------------------------------------------------------------------------------------
async def serve_scheduler(config: DualPathConfig, *, bind: str | None = None, address_file: str | None = None) -> None:
    daemon = SchedulerDaemon(config, bind=bind)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop)
    await daemon.run(address_file=address_file)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dualpath.control.schedulerd")
    p.add_argument("--config")
    p.add_argument("--bind")
    p.add_argument("--address-file")
    p.add_argument("--standby", action="store_true",
                   help="load everything, then wait for a line on stdin before binding (the launcher's warm spare)")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DUALPATH_LOG", "WARNING"))
    config = load_config(a.config)
    if a.standby:
        import sys

        check_deployable(config)  # (this module's imports, the heavy part of a start, are done already)
        if not sys.stdin.readline():  # EOF: the launcher went away without needing us
            return 0
        try:  # the launcher niced the standby while it waited; serve at normal priority if allowed
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            log.warning("standby scheduler keeps niceness %d (no permission to raise its priority)",
                        os.getpriority(os.PRIO_PROCESS, 0))
        log.warning("standby scheduler taking over at %s", a.bind)
    anyio.run(lambda: serve_scheduler(config, bind=a.bind, address_file=a.address_file))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from dualpath.procexit import exit_with

    exit_with(main())
