"""The client API of a running deployment: connect to the scheduler, submit turns, replay trajectories.

``ServeClient`` implements :class:`dualpath.runtime.clients.TurnService`, so the offline and online clients
(:func:`~dualpath.runtime.clients.run_offline`, :func:`~dualpath.runtime.clients.run_online_into`) drive a
multi-process deployment exactly as they drive the in-process cluster::

    async with await connect("tcp://127.0.0.1:7460") as c:
        out = await c.run_turn(session=1, prompt_ids=[1, 2, 3], gen_tokens=8)
        res = await run_offline(c, trajectories, vocab_size=32000)

**Streaming and sampling.** ``run_turn(..., sampling=SamplingParams(...), on_token=cb)`` has the decode engine
sample with :mod:`dualpath.engine.sampling` (the in-process code: a seeded turn gives the same tokens in both
modes) and calls ``cb(token)`` for each token in order as the decode engine produces it (the engine sends each
decode step's tokens; the scheduler forwards them). The final result stays authoritative: tokens it holds that
no stream notice brought are delivered from it, so ``cb`` sees exactly the returned tokens.
:meth:`ServeClient.stream_turn` is the same as an async iterator. A turn cancelled here (its task cancelled, or
an iterator closed early) is cancelled at the scheduler too, which aborts it on both engines.

Times in the returned :class:`~dualpath.runtime.clients.TurnOutcome` are on this process's clock
(``perf_counter``), built from the durations the scheduler measured, so they are valid across hosts. A turn
ends with its tokens or raises: :class:`~dualpath.control.channel.RemoteError` (the scheduler's code and
message: ``DeadlineExceeded``, ``SchedulerError``, ``InvalidTurn``, ...) or
:class:`~dualpath.errors.PeerTimeout` when the scheduler itself does not answer by the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dualpath.config import DualPathConfig
from dualpath.control.channel import AuthFailed, Channel, CurveKeys, PeerGone
from dualpath.control.deploy import client_curve
from dualpath.control.protocol import (
    MAX_FRAME_BYTES,
    Message,
    bin_to_logprobs,
    sampling_body,
    tokens_to_bin,
    with_ranks,
)
from dualpath.errors import DualPathError, PeerTimeout
from dualpath.runtime.clients import TurnOutcome
from dualpath.types import TokenLogprob

log = logging.getLogger("dualpath.client")


class SchedulerLost(PeerGone):
    """The scheduler died or stopped answering: every turn waiting on it failed explicitly."""


class _Stream:
    """One streamed turn's receiving side: delivers tokens to ``on_token`` once each, in order."""

    def __init__(self, on_token: Callable[[int], None], on_info: Callable[[str, int], None] | None,
                 on_logprob: Callable[[TokenLogprob], None] | None = None,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.on_token = on_token
        self.on_info = on_info
        self.on_logprob = on_logprob
        self.on_stored = on_stored  # (called once, then cleared)
        self.next = 0  # tokens delivered so far
        # offset -> tokens (and their logprobs) that arrived ahead of a gap
        self.early: dict[int, tuple[list[int], list[TokenLogprob] | None]] = {}
        self.closed = False

    def deliver(self, offset: int, tokens: Sequence[int], lps: Sequence[TokenLogprob] | None = None) -> None:
        if self.closed:
            return
        if offset > self.next:
            if len(self.early) < 4096:
                self.early[offset] = (list(tokens), None if lps is None else list(lps))
            return
        skip = self.next - offset
        self._emit(tokens[skip:], None if lps is None else lps[skip:])
        while self.early:
            at = min(self.early)
            if at > self.next:
                break
            toks, early_lps = self.early.pop(at)
            skip = self.next - at
            self._emit(toks[skip:], None if early_lps is None else early_lps[skip:])

    def _emit(self, tokens: Sequence[int], lps: Sequence[TokenLogprob] | None = None) -> None:
        for i, t in enumerate(tokens):
            self.next += 1
            try:
                if lps is not None and self.on_logprob is not None:
                    self.on_logprob(lps[i])
                self.on_token(int(t))
            except Exception:  # a listener's bug must not break the connection
                log.exception("on_token listener failed")


class ServeClient:
    """One connection to a deployment's scheduler (see the module docstring).

    Liveness: the client pings the scheduler every ``heartbeat_s``; a dropped connection, or ``misses`` pings in
    a row without an answer, fails every turn in flight at once with :class:`SchedulerLost` (so a dead scheduler
    is noticed within ``misses`` heartbeats, not at the turn's deadline). Later calls wait for the connection
    to come back (a restarted scheduler on the same address) up to ``serve.handshake_timeout_s``."""

    def __init__(self, address: str, *, curve: CurveKeys | None = None, deadline_s: float = 120.0,
                 max_message_bytes: int = MAX_FRAME_BYTES, heartbeat_s: float | None = 0.5, misses: int = 3,
                 handshake_timeout: float = 5.0) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self.channel = Channel(f"client-{os.getpid()}", connect=address, curve=curve, hello="ping",
                               max_message_bytes=max_message_bytes, handshake_timeout=handshake_timeout)
        self.channel.on_disconnect = self._on_disconnect
        self.channel.handler = self._on_message  # the scheduler's ``stream`` notices
        self._stream_ids = itertools.count(1)
        self._streams: dict[int, _Stream] = {}
        self._bg: set[asyncio.Task[Any]] = set()  # cancels sent for turns cancelled here
        self.last_path: dict[int, str] = {}
        self.heartbeat_s = heartbeat_s
        self.misses = misses
        self.lost = 0  # times the scheduler was found gone
        self.stopped = False  # the scheduler said its operator stopped the deployment (``ctl stop``)
        self.drained_at: float | None = None  # when the scheduler said its operator drained it (``ctl drain``)
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_config(cls, address: str | None, config: DualPathConfig) -> ServeClient:
        sc = config.serve
        # a scheduler is given up on no sooner than the launcher would replace it (serve.hung_after_s): a busy
        # one that paused 0.8 s had its requests failed with 503 by a client counting 3 heartbeats (0.6 s)
        misses = max(3, math.ceil(sc.hung_after_s() / sc.heartbeat_s) + 1)
        return cls(address or sc.scheduler_address(), curve=client_curve(config), deadline_s=sc.request_deadline_s,
                   max_message_bytes=sc.max_message_bytes, heartbeat_s=sc.heartbeat_s, misses=misses,
                   handshake_timeout=sc.handshake_timeout_s)

    async def start(self) -> ServeClient:
        await self.channel.start()
        if self.heartbeat_s:
            self._watch = asyncio.get_running_loop().create_task(self._watchdog(self.heartbeat_s))
        return self

    async def close(self) -> None:
        self._closing = True
        if self._bg:  # cancels of turns cancelled here: let them reach the scheduler (each has a deadline)
            await asyncio.wait(set(self._bg), timeout=5.0)
        if self._watch is not None:
            self._watch.cancel()  # (a cancel can be swallowed by a wait_for finishing at that instant: bounded)
            await asyncio.wait({self._watch}, timeout=2.0)
        await self.channel.close()

    async def _on_message(self, peer: bytes, msg: Message) -> None:
        if msg.type == "shutdown":  # the operator stopped the deployment (this notice may come before the reply
            self.stopped = True  # to the operator's own ``shutdown``: nothing in flight is failed here; the
            return None  # connection's end or the heartbeats fail what is left)
        if msg.type == "drain":
            self.drained_at = time.monotonic()
            return None
        if msg.type == "stream":
            st = self._streams.get(int(msg.body["stream"]))
            if st is not None:
                if st.on_info is not None and "path" in msg.body:
                    info, st.on_info = st.on_info, None
                    try:
                        info(str(msg.body["path"]), int(msg.body.get("hit_tokens", 0)))
                    except Exception:
                        log.exception("on_info listener failed")
                lps = None
                if "lp_width" in msg.body:
                    lps = bin_to_logprobs(int(msg.body["lp_width"]), msg.body.get("lp_ids", b""),
                                          msg.body.get("lp_vals", b""), msg.body["tokens"], where="stream")
                if msg.body["tokens"]:
                    st.deliver(int(msg.body["offset"]), msg.body["tokens"], lps)
                if msg.body.get("stored") and st.on_stored is not None and not st.closed:
                    stored, st.on_stored = st.on_stored, None
                    try:
                        stored()
                    except Exception:
                        log.exception("on_stored listener failed")
        return None

    def _send_cancel(self, session: int) -> None:
        """Tell the scheduler to cancel ``session``'s turn (from a cancelled task: in the background)."""
        task = asyncio.get_running_loop().create_task(self._cancel_quietly(session))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _cancel_quietly(self, session: int) -> None:
        try:
            await self.cancel(session, timeout=5.0)
        except (DualPathError, OSError) as exc:
            log.debug("cancel of session %d not delivered: %s", session, exc)

    def _lose(self, why: str) -> None:
        n = self.channel.fail_all(SchedulerLost(f"the scheduler at {self.address} {why}"))
        if n:
            self.lost += 1

    def _on_disconnect(self) -> None:
        self._lose("closed the connection (it died or was stopped); the turns in flight were failed")

    async def _watchdog(self, period: float) -> None:
        missed = 0
        loop = asyncio.get_running_loop()
        t_next = loop.time() + period
        while not self._closing:
            # one ping per period (an unanswered one already took its period: the next goes at once)
            await asyncio.sleep(max(0.0, t_next - loop.time()))
            t_next = loop.time() + period
            if not self.channel.pending:  # nothing waits on the scheduler: no need to ask
                missed = 0
                continue
            try:
                await self.channel.request(None, "ping", {}, period)
                missed = 0
            except (PeerTimeout, PeerGone, AuthFailed):
                missed += 1
                if missed >= self.misses:
                    self._lose(f"did not answer {missed} heartbeats ({missed * period:g} s); the turns in flight "
                               "were failed")
                    missed = 0
            except Exception:  # a closing channel
                return

    async def __aenter__(self) -> ServeClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- API ---------------------------------------------------------------------------------------------
    async def run_turn(self, session: int, prompt_ids: Any, gen_tokens: int, *,
                       deadline_s: float | None = None, sampling: Any = None,
                       on_token: Callable[[int], None] | None = None,
                       on_info: Callable[[str, int], None] | None = None,
                       on_logprob: Callable[[TokenLogprob], None] | None = None,
                       on_stored: Callable[[], None] | None = None, salt: str | None = None) -> TurnOutcome:
        """Submit one turn (the whole prompt) and return once its tokens are out.

        ``sampling``: a :class:`~dualpath.engine.sampling.SamplingParams` (default greedy); ``on_token``: called
        with each token, in order, as the decode engine produces it (see the module docstring); ``on_info``:
        called once, before the first streamed token, with the read path and the hit (prompt tokens read from
        storage) of the dispatch that streams; ``on_logprob`` (with ``sampling.logprobs`` set and ``on_token``):
        called with each streamed token's :class:`~dualpath.engine.sampling.TokenLogprob` just before the token
        (a token that reaches the client only through the final result, never streamed, has none); ``on_stored``
        (with ``on_token``): called once the decode engine has stored the prompt's Full Blocks (a turn sharing
        this prompt's prefix, sent after, loads it), usually before the turn ends; never called when the notice is
        lost or the turn fails before its write; ``salt``: a cache salt (the turn shares stored and in-flight
        prefixes only with turns of the same salt)."""
        budget = self.deadline_s if deadline_s is None else deadline_s
        body: dict[str, Any] = {
            "session": int(session), "prompt": tokens_to_bin(np.asarray(prompt_ids, dtype=np.int64)),
            "gen": int(gen_tokens), "deadline_s": float(budget), **sampling_body(sampling),
        }
        if salt is not None:
            body["salt"] = str(salt)
        stream: _Stream | None = None
        if on_token is not None:
            sid = next(self._stream_ids)
            stream = self._streams[sid] = _Stream(on_token, on_info, on_logprob, on_stored)
            body["stream"] = sid
            if on_stored is not None:
                body["notify_stored"] = True
        t0 = time.perf_counter()
        try:
            # the scheduler answers by the deadline; the margin covers the wire
            reply = await self.channel.request(None, "submit", body, budget + 10.0)
        except asyncio.CancelledError:
            self._send_cancel(int(session))  # the turn is aborted on its engines, not left to run
            raise
        finally:
            if stream is not None:
                self._streams.pop(int(body["stream"]), None)
        t_end = time.perf_counter()
        b = reply.body
        tokens = [int(x) for x in b["tokens"]]
        if stream is not None:  # the result is authoritative: what no notice brought (yet) comes from it
            stream.early.clear()
            if stream.on_info is not None:
                stream.on_info(str(b["path"]), int(b["hit_tokens"]))
            if stream.next > len(tokens):
                log.warning("session %d: %d tokens streamed but the result holds %d", session, stream.next,
                            len(tokens))
            stream._emit(tokens[stream.next:])
            stream.closed = True
        offset = max(0.0, (t_end - t0) - b["total_s"]) / 2  # half the wire time, each way
        t_first = t0 + offset + b["ttft_s"]
        prompt_lps = None
        if "plp_width" in b:
            prompt_lps = bin_to_logprobs(int(b["plp_width"]), b.get("plp_ids", b""), b.get("plp_vals", b""),
                                         [int(x) for x in np.asarray(prompt_ids).reshape(-1)[1:]], where="result")
            if "plp_ranks" in b:
                prompt_lps = with_ranks(prompt_lps, b["plp_ranks"], where="result")
        out = TurnOutcome(
            session=int(session), tokens=tokens, prompt_tokens=int(b["prompt_tokens"]),
            hit_tokens=int(b["hit_tokens"]), t_submit=t0, t_first_token=t_first,
            t_second_token=t_first + b["tpot_s"] if len(tokens) > 1 else None,
            t_done=t_end, path=str(b["path"]), pe=int(b["pe"]), de=int(b["de"]), t_scheduled=None,
        )
        if "last_s" in b:  # the last token (the result also waited for the turn's writes)
            out.timings.t_last_token = t0 + offset + float(b["last_s"])
        out.prompt_logprobs = prompt_lps
        return out

    def stream_turn(self, session: int, prompt_ids: Any, gen_tokens: int, **kw: Any) -> TurnStream:
        """:meth:`run_turn` as an async iterator of tokens (``async for tok in client.stream_turn(...)``);
        the :class:`TurnOutcome` is ``.outcome`` once it is exhausted; ``aclose()`` early cancels the turn."""
        return TurnStream(self, session, prompt_ids, gen_tokens, kw)

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = await self.channel.request(None, "stats", {}, timeout)
        return dict(reply.body["data"])

    async def ping(self, timeout: float = 5.0) -> bool:
        reply = await self.channel.request(None, "ping", {}, timeout)
        return reply.type == "pong"

    async def shutdown(self, timeout: float = 10.0, *, token: str | None = None) -> None:
        """Stop the deployment (the operator role: its CURVE key, or ``token`` from ``serve.token_file``). A
        scheduler that closes the connection before its reply arrives has stopped, as asked: that is success (a
        refused token is still an error: it is a reply)."""
        try:
            await self.channel.request(None, "shutdown", {"token": token} if token else {}, timeout)
        except SchedulerLost:
            log.info("the scheduler at %s closed the connection while stopping (before its reply)", self.address)

    async def cancel(self, session: int, timeout: float = 10.0, *, token: str | None = None) -> int:
        """End this client's turn(s) of ``session`` now: each fails with a ``cancelled`` error. The operator
        (its CURVE key, or ``token`` from ``serve.token_file``) ends the session's turns of every client.
        Returns how many turns it ended."""
        body: dict[str, Any] = {"session": int(session)}
        if token:
            body["token"] = token
        reply = await self.channel.request(None, "cancel", body, timeout)
        return int(reply.body.get("cancelled", 0))

    async def drain(self, timeout: float = 10.0, *, token: str | None = None) -> None:
        """Refuse new turns, let the ones in flight finish (the operator role)."""
        await self.channel.request(None, "drain", {"token": token} if token else {}, timeout)


class TurnStream:
    """A streamed turn as an async iterator (see :meth:`ServeClient.stream_turn`)."""

    def __init__(self, client: ServeClient, session: int, prompt_ids: Any, gen_tokens: int,
                 kw: dict[str, Any]) -> None:
        self.outcome: TurnOutcome | None = None
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._args = (client, session, prompt_ids, gen_tokens, kw)
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def _run(self) -> None:
        client, session, prompt_ids, gen_tokens, kw = self._args
        try:
            self.outcome = await client.run_turn(session, prompt_ids, gen_tokens, on_token=self._queue.put_nowait,
                                                 **kw)
        except Exception as exc:
            self._error = exc
        finally:
            self._queue.put_nowait(None)

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> int:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        tok = await self._queue.get()  # (run_turn has the deadline: it ends, and puts None, by then)
        if tok is None:
            self._queue.put_nowait(None)
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return tok

    async def aclose(self) -> None:
        """Cancel the turn if it is still running (at the scheduler too)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._task}, timeout=5.0)

    async def __aenter__(self) -> TurnStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def connect(address: str | None = None, config: DualPathConfig | None = None, **kw: Any) -> ServeClient:
    """A started :class:`ServeClient` for ``address`` (default: the config's scheduler address)."""
    if config is not None:
        client = ServeClient.from_config(address, config)
    else:
        if address is None:
            raise ValueError("connect: give an address or a config")
        client = ServeClient(address, **kw)
    return await client.start()


async def wait_ready(client: ServeClient, engines: int, timeout: float) -> dict[str, Any]:
    """Until ``engines`` engines are alive at the scheduler (or :class:`TimeoutError` after ``timeout``)."""
    import anyio

    with anyio.fail_after(timeout):
        while True:
            try:
                st = await client.stats(timeout=2.0)
                if int(st.get("engines_alive", 0)) >= engines:
                    return st
            except Exception:  # the scheduler is still starting
                pass
            await anyio.sleep(0.1)


async def replay(address: str | None, trajectories: Sequence[Any], *, config: DualPathConfig, vocab_size: int,
                 seed: int = 0) -> Any:
    """Replay ``trajectories`` offline against the deployment at ``address``; returns the ClientResult."""
    from dualpath.runtime.clients import run_offline

    async with await connect(address, config) as client:
        return await run_offline(client, trajectories, vocab_size=vocab_size, seed=seed)


def run_serve_command(args: Any) -> int:
    """`dualpath run --serve ADDR`: replay the configured trace against a running deployment."""
    import json
    import sys

    import anyio

    from dualpath.errors import DualPathError
    from dualpath.runtime.app import RunRequest, prepare
    from dualpath.runtime.clients import ClientResult, run_offline_into, run_online_into
    from dualpath.runtime.runner import online_arrivals

    req = RunRequest(config=args.config, policies=None, trace=args.trace, trace_format=args.trace_format,
                     max_requests=getattr(args, "max_requests", None), repeat=getattr(args, "repeat", None),
                     time_scale=getattr(args, "time_scale", None), agents=args.agents, mode=args.mode, rate=args.rate, capacity=False, sim=False,
                     json_out=args.json_out, plot=None, progress=False)
    cfg, _policies, trajs = prepare(req)  # the trace is checked here (clear errors with file and line)
    vocab = cfg.model.vocab_size if cfg.model.kind == "synthetic" else 49152
    w = cfg.workload

    res = ClientResult([], time.perf_counter(), 0.0, 0, len(trajs))  # filled as turns finish: kept on failure

    async def main() -> ClientResult:
        async with await connect(args.serve, cfg) as client:
            if w.mode == "online":
                # a trace at its own timestamps, a generator as a Poisson process (dualpath run's rule)
                arrivals = online_arrivals(trajs, w.rate_aps, w.seed, w.trace is not None)
                await run_online_into(client, trajs, arrivals, res,
                                      vocab_size=vocab, seed=w.seed)
                return res
            await run_offline_into(client, trajs, res, vocab_size=vocab, seed=w.seed)
            return res

    failure: str | None = None
    try:
        anyio.run(main)
    except BaseException as exc:  # a lost scheduler, an auth refusal, a failed turn: one line + what finished
        from dualpath.engine.request import unwrap

        leaf = unwrap(exc) if not isinstance(exc, KeyboardInterrupt) else exc
        if isinstance(leaf, KeyboardInterrupt):
            failure = "interrupted"
        elif isinstance(leaf, DualPathError):
            failure = str(leaf).splitlines()[0] if str(leaf) else type(leaf).__name__
        else:
            raise
        res.t_end = max(res.t_end, time.perf_counter())
    recs = res.records
    toks = sum(len(r.outcome.tokens) for r in recs)
    ttft = [r.outcome.ttft for r in recs]
    run = {"mode": f"serve-{w.mode}", "address": args.serve, "turns": len(recs), "agents": len(trajs),
           "jct_s": res.jct, "turns_per_s": len(recs) / res.jct if res.jct > 0 else None,
           "tokens_per_s": toks / res.jct if res.jct > 0 else None,
           "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
           "hit_rate": (sum(r.outcome.hit_tokens for r in recs) / max(1, sum(r.outcome.prompt_tokens for r in recs)))}
    from dualpath.runtime.workload import workload_source

    print(f"workload: {workload_source(cfg, trajs)}", file=sys.stdout)
    print(f"dualpath run --serve {args.serve}: {len(recs)} turns of {len(trajs)} agents in {res.jct:.2f} s "
          f"({run['turns_per_s'] or 0:.2f} turns/s, mean TTFT {1e3 * (run['ttft_mean_s'] or 0):.1f} ms, "
          f"hit rate {100 * run['hit_rate']:.0f}%)" + (" (partial)" if failure else ""), file=sys.stdout)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runs": [{**run, "complete": failure is None}]}, f, indent=2)
    if failure is not None:
        print(f"dualpath: error: {failure} ({len(recs)} turns finished, shown above)", file=sys.stderr)
        return 2
    return 0
