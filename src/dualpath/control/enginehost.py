"""One engine per process: an :class:`EngineHost` owns one prefill or decode engine with its own model, storage
handle, transport endpoint and links, and speaks the control protocol with the scheduler process.

The in-process cluster coordinates a turn's two engines through one shared :class:`~dualpath.engine.request.Turn`
(events and fields). Here each host keeps its own ``Turn`` for the same request id (so transport tags agree),
and the few coordination points travel as control messages, relayed by the scheduler:

* ``begin`` (both): create the turn, run this side's storage read; reply ``read_done`` (usable blocks);
* ``decode`` (DE): set the hit, expose the receive landings, stream the DE-read hit to the PE once the PE has
  started (``started`` notice), receive the prompt KV, wait for the first token's ``logits`` notice, copy the
  KV into the pool, decode and persist; reply ``finished`` (generated tokens);
* ``prefill`` (PE): set the hit, queue the turn for a layer-wise forward batch; send ``started`` when its
  forward begins; reply ``prefilled`` (first-token logits) once done;
* ``abort`` (either): fail the turn locally (wakes every wait of it), withdraw landings, free buffers/pages.

On the DE path the PE exposes a layer's landing a bounded window ahead; across processes the DE writes each
layer as soon as the PE started and the transport holds early arrivals (``max_pending_bytes``) until exposed.

A heartbeat every ``serve.heartbeat_s`` carries the engine's snapshot (``seq``, ``tok``, ``read_q``, free KV; a
PE's predicted ``work`` when DualPath ranks PEs by it, whose model its ``hello`` carries: :mod:`dualpath.engine.work`)
and resource gauges (RSS, open fds, asyncio tasks, registered regions, turns held, host buffer bytes in use) that the load run watches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from dualpath.config import DualPathConfig, load_config
from dualpath.control.channel import Channel, PeerGone
from dualpath.control.deploy import check_deployable, engine_curve, engine_name, engine_names, token_for
from dualpath.control.gauges import process_gauges
from dualpath.control.protocol import (
    Message,
    ProtocolError,
    bin_to_tokens,
    logprobs_to_bin,
    ranks_to_bin,
    sampling_of,
)
from dualpath.engine.grammar import tokenizer_source
from dualpath.engine.request import Turn, unwrap, wait_event
from dualpath.errors import ConfigError, DualPathError, EngineError, ModelError, PeerTimeout
from dualpath.types import EngineId, PathKind, Role, TokenLogprob

log = logging.getLogger("dualpath.enginehost")


class InvalidTurn(EngineError):
    """A turn this engine can never run (bad token ids, too long, does not fit, sampling masks that exclude every
    token, a grammar's dead end): not retried elsewhere."""


@dataclass(eq=False)
class _Held:
    """A turn this host holds, with what it needs to clean up."""

    turn: Turn
    deadline: float
    logits_ready: anyio.Event = field(default_factory=anyio.Event)
    submitted: bool = False
    seq: Any = None
    streamed: int = 0  # tokens handed to the stream buffer so far (a streamed turn on a DE)
    notify_stored: bool = False  # a DE tells the scheduler once the prompt's blocks are stored (``stored``)


class EngineHost:
    """One engine in this process (see the module docstring)."""

    def __init__(self, config: DualPathConfig, role: Role, rank: int, scheduler: str | None = None) -> None:
        self.config = check_deployable(config)
        names = {(r, k): n for r, k, n in engine_names(self.config)}
        if (role, rank) not in names:
            count = sum(1 for r, _ in names if r is role)
            raise ConfigError(f"--rank {rank}: the config has {count} {role.value} engine(s) (ranks 0..{count - 1})")
        self.role = role
        self.rank = rank
        self.node = names[(role, rank)]
        self.name = engine_name(role, rank)
        self.scheduler = scheduler or self.config.serve.scheduler_address()
        self.turns: dict[int, _Held] = {}
        self.engine: Any = None
        self.transport: Any = None
        self.storage: Any = None
        self.channel: Channel | None = None
        self._stop = anyio.Event()
        self.epoch = 0  # this incarnation's epoch, from the scheduler's welcome (0: not registered)
        self.registrations = 0
        self._registering = False
        # streamed turns' tokens not yet sent: rid -> (index of the first, tokens); flushed once per decode step
        # streamed turns' tokens not sent yet: rid -> (offset of the first, tokens, their logprobs when asked)
        self._out: dict[int, tuple[int, list[int], list[TokenLogprob]]] = {}
        self._lp: dict[int, TokenLogprob] = {}  # a token's logprobs, heard just before the token itself
        self._out_ready = anyio.Event()
        self.stream_messages = 0

    # --- construction (mirrors Cluster.start for one engine) ---------------------------------------------
    async def _build(self) -> None:
        from dualpath.cluster.devices import resolve_devices
        from dualpath.cluster.runner import build_model
        from dualpath.engine.base import EngineContext
        from dualpath.engine.decode import DecodeEngine
        from dualpath.engine.links import LinkSet
        from dualpath.engine.prefill import PrefillEngine
        from dualpath.engine.work import PrefillWork
        from dualpath.kv.keys import BlockKeyer, KeyNamespace
        from dualpath.kv.layout import KVLayout
        from dualpath.scheduler.policies import get_policy
        from dualpath.storage import create_storage
        from dualpath.transports import create_transport

        cfg, cc = self.config, self.config.cluster
        all_engines = engine_names(cfg)
        index = [(r, k) for r, k, _ in all_engines].index((self.role, self.rank))
        device = resolve_devices(cc.devices, len(all_engines))[index]
        model = build_model(cfg, device)
        layout = KVLayout(model.kv_spec, cc.block_tokens)
        namespace = KeyNamespace.for_layout(model.fingerprint, layout)
        self.fingerprint = namespace.digest.hex()
        links = LinkSet(cc.kv_share)
        for prefix, nodes in (("pnode", cc.prefill_nodes), ("dnode", cc.decode_nodes)):
            for i in range(nodes):
                links.add_link(f"{prefix}{i}.snic.read", cc.snic_gbps)
                links.add_link(f"{prefix}{i}.snic.write", cc.snic_gbps)
        for r, k, _n in all_engines:
            nm = engine_name(r, k)
            links.add_link(f"{nm}.cnic.in", cc.cnic_gbps)
            links.add_link(f"{nm}.cnic.out", cc.cnic_gbps)
        from dualpath.traffic.nodelink import share_node_links

        # the node's storage NIC is one set of links for all its engines, also across processes (link service)
        self._node_links = await share_node_links(
            links, f"{'pnode' if self.role is Role.PREFILL else 'dnode'}{self.node}", self.rank % cc.engines_per_node,
            self.scheduler, cc.engines_per_node)
        for r, k, n in all_engines:  # stand-ins for the peers' links: only our own are charged for real
            nm = engine_name(r, k)
            links.add_engine(nm, f"{'pnode' if r is Role.PREFILL else 'dnode'}{n}.snic", f"{nm}.cnic")
        self.storage = create_storage(cfg.storage, layout, namespace)
        await self.storage.start()
        self.transport = create_transport(cfg.transport, self.name)
        await self.transport.start()
        ctx = EngineContext(cc, device, model, layout, BlockKeyer(namespace), self.storage, self.transport, links,
                            tokenizer_source(cfg))
        eid = EngineId(self.role, self.rank, self.node)
        self.engine = PrefillEngine(eid, ctx) if self.role is Role.PREFILL else DecodeEngine(eid, ctx)
        await self.engine.start()
        self.layout = layout
        sched = cfg.scheduler
        if (isinstance(self.engine, PrefillEngine) and sched.work_ranking
                and get_policy(sched.policy, layerwise=sched.layerwise).smart_assign):
            # DualPath ranks PEs by predicted work: this PE tracks its own and tells the scheduler how to predict it
            tm = await anyio.to_thread.run_sync(model.layer_time_model)  # (a real model may calibrate first)
            if tm is not None:
                self.engine.work_model = PrefillWork.for_engine(tm, cc, layout.spec.bytes_per_token)

    async def _close_io(self) -> None:
        with anyio.CancelScope(shield=True):
            node_links = getattr(self, "_node_links", None)  # the node's link service or its client
            if node_links is not None:
                await node_links.close()
            if self.transport is not None:
                await self.transport.close()
            if self.storage is not None:
                await self.storage.close()

    # --- main --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Build the engine, register with the scheduler, serve until ``shutdown`` or SIGTERM. A stop while the
        engine is still starting ends the start too (it used to register on, retrying for ``startup_timeout_s``
        with its scheduler gone, until the launcher SIGKILLed it)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._cancel_on_stop, tg.cancel_scope)
                await self._build()
                sc = self.config.serve
                # an unguessable routing identity: no peer can squat it (and the scheduler refuses a second
                # connection with a taken identity: no ROUTER_HANDOVER takeover)
                self.channel = Channel(self.name, connect=self.scheduler,
                                       identity=f"{self.name}.{secrets.token_hex(8)}".encode(),
                                       curve=engine_curve(self.config), handler=self._handle,
                                       max_message_bytes=sc.max_message_bytes,
                                       handshake_timeout=sc.handshake_timeout_s)
                self._token = token_for(self.config, "engine") if not sc.curve else None
                async with self.channel:
                    await self._hello(sc.startup_timeout_s)
                    log.info("%s: registered with %s (pid %d)", self.name, self.scheduler, os.getpid())
                    async with anyio.create_task_group() as work:  # until stop() cancels it all
                        work.start_soon(self.engine.run)
                        work.start_soon(self._heartbeat)
                        work.start_soon(self._reaper)
                        if self.role is Role.DECODE:
                            work.start_soon(self._stream_flusher)
        finally:
            await self._close_io()

    async def _cancel_on_stop(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        scope.cancel()

    def stop(self) -> None:
        self._stop.set()

    async def _hello(self, timeout: float) -> None:
        """Register (again) with the scheduler, retrying until ``timeout``; adopts the epoch it assigns."""
        assert self.channel is not None
        body: dict[str, Any] = {
            "role": self.role.value, "rank": self.rank, "node": self.node,
            "address": self.transport.address, "pid": os.getpid(), "fingerprint": self.fingerprint,
            "token_bytes": self.layout.spec.bytes_per_token_layer * self.layout.n_layers,
            "vocab_size": self.engine.model.vocab_size, "max_context": self.engine.served_context(),
            "epoch": self.epoch, "holds": sorted(self.turns)[: 1 << 16],
            "stored_blocks": len(getattr(getattr(self.storage, "_index", None), "entries", ())),
        }
        if self._token is not None:
            body["token"] = self._token
        work_model = getattr(self.engine, "work_model", None)
        if work_model is not None:
            body["work_model"] = work_model.to_wire()
        t_end = time.monotonic() + timeout
        while True:
            try:
                welcome = await self.channel.request(None, "hello", body, max(0.1, t_end - time.monotonic()))
                break
            except (PeerTimeout, PeerGone) as exc:  # the scheduler is (re)starting: try again until the deadline
                if time.monotonic() >= t_end:
                    raise
                log.info("%s: hello not answered (%s); retrying", self.name, exc)
                await anyio.sleep(0.2)
        self.epoch = int(welcome.body.get("epoch", 0))
        self.registrations += 1
        await self._connect_peers(welcome.body["peers"])

    async def _reregister(self, epoch: int | None) -> None:
        """The scheduler fenced our epoch (declared us dead, or restarted): drop our turns, register again.
        A notice for an epoch we already left is stale and ignored (one failure, one re-registration)."""
        if self._registering or (epoch is not None and epoch != self.epoch):
            return
        self._registering = True
        try:
            for rid in list(self.turns):
                await self._abort(rid, "the scheduler fenced this engine's epoch")
            await self._hello(self.config.serve.startup_timeout_s)
            log.warning("%s: registered again (epoch %d)", self.name, self.epoch)
        except Exception as exc:
            log.error("%s: could not register again (%s); exiting so the launcher restarts it", self.name, exc)
            self.stop()
        finally:
            self._registering = False

    async def _connect_peers(self, peers: list[str]) -> None:
        mine = "pe" if self.role is Role.PREFILL else "de"
        for entry in peers:
            name, _, address = entry.partition("=")
            if name[:2] != mine and address:
                await self.transport.connect(name, address)

    async def _heartbeat(self) -> None:
        assert self.channel is not None
        period = self.config.serve.heartbeat_s
        while True:
            snap = self.engine.snapshot()
            body = {"epoch": self.epoch, "seq": max(0, snap.seq), "tok": max(0, snap.tok),
                    "read_q": max(0, int(snap.read_q)),
                    "free_kv_tokens": max(0, int(snap.free_kv_tokens)), "inflight": len(self.turns),
                    "tasks": len(asyncio.all_tasks()), "regions": self.transport.registered_regions,
                    "host_used": self.engine.host.used_bytes,
                    **process_gauges()}
            if self.role is Role.DECODE:
                body["stream_messages"] = self.stream_messages
            elif snap.work >= 0:
                body["work"] = snap.work
            try:
                await self.channel.notify(None, "heartbeat", body, timeout=period)
            except Exception as exc:  # the scheduler may be restarting; keep beating
                log.debug("%s: heartbeat not sent: %s", self.name, exc)
            await anyio.sleep(period)

    async def _reaper(self) -> None:
        """Fail turns held past their deadline (a scheduler that vanished never sends abort)."""
        while True:
            await anyio.sleep(1.0)
            now = time.monotonic()
            for rid, held in list(self.turns.items()):
                if now > held.deadline + 5.0:
                    log.warning("%s: turn %d passed its deadline; dropping it", self.name, rid)
                    await self._abort(rid, "deadline passed")

    # --- token streaming (DE) ----------------------------------------------------------------------------
    def _on_token(self, rid: int, tok: int) -> None:
        """The decode engine produced ``tok`` for turn ``rid`` (synchronously, inside its step): buffer it."""
        held = self.turns.get(rid)
        if held is None:
            return
        entry = self._out.get(rid)
        if entry is None:
            entry = self._out[rid] = (held.streamed, [], [])
        entry[1].append(int(tok))
        lp = self._lp.pop(rid, None)
        if lp is not None:
            entry[2].append(lp)
        held.streamed += 1
        self._out_ready.set()

    async def _stream_flusher(self) -> None:
        """Send the buffered tokens after each decode step: one ``tokens`` message for every streamed turn
        that produced tokens since the last one (the step's tokens batched, not a message per token)."""
        while True:
            await self._out_ready.wait()
            self._out_ready = anyio.Event()
            await self._flush_tokens()

    async def _flush_tokens(self) -> None:
        if not self._out or self.channel is None:
            return
        out, self._out = self._out, {}
        step = 1 << 15  # (message limits: 2^16 tokens, 2^12 turns)
        parts = [(rid, offset + j, toks[j: j + step], lps[j: j + step])
                 for rid, (offset, toks, lps) in out.items() for j in range(0, len(toks), step)]
        timeout = max(1.0, 10 * self.config.serve.heartbeat_s)
        while parts:
            batch: list[tuple[int, int, list[int], list[TokenLogprob]]] = []
            n = 0
            while parts and len(batch) < (1 << 12) and n + len(parts[0][2]) <= (1 << 16):
                batch.append(parts.pop(0))
                n += len(batch[-1][2])
            body: dict[str, Any] = {
                "rids": [b[0] for b in batch], "offsets": [b[1] for b in batch], "counts": [len(b[2]) for b in batch],
                "tokens": [x for b in batch for x in b[2]]}
            if any(b[3] for b in batch):  # turns that asked for logprobs: every one of their tokens has them
                wire = [logprobs_to_bin(b[3]) if len(b[3]) == len(b[2]) else (0, b"", b"") for b in batch]
                body.update(lp_width=[w[0] for w in wire], lp_ids=b"".join(w[1] for w in wire),
                            lp_vals=b"".join(w[2] for w in wire))
            try:
                await self.channel.notify(None, "tokens", body, timeout=timeout)
                self.stream_messages += 1
            except Exception as exc:  # the scheduler is gone: its final result carries every token anyway
                log.debug("%s: streamed tokens not sent: %s", self.name, exc)

    # --- control messages --------------------------------------------------------------------------------
    async def _handle(self, peer: bytes, msg: Message) -> tuple[str, dict[str, Any]] | None:
        b = msg.body
        t = msg.type
        if t == "ping":
            return "pong", {"role": self.role.value}
        if t == "peers":
            await self._connect_peers(b["peers"])
            return None
        if t == "begin":
            return await self._begin(b)
        if t == "lookup":
            ids = bin_to_tokens(b["prompt"])
            keys = self.engine.ctx.keyer.keys(ids, salt=b.get("salt"))
            usable = min(len(keys), max(0, (len(ids) - 1) // self.layout.block_tokens))
            return "looked_up", {"blocks": int(self.storage.lookup(keys[:usable]))}
        if t == "prefill" and self.role is Role.PREFILL:
            return await self._prefill(b["rid"], b["hit_blocks"])
        if t == "decode" and self.role is Role.DECODE:
            return await self._decode(b["rid"], b["hit_blocks"])
        if t == "started" and self.role is Role.DECODE:
            held = self.turns.get(b["rid"])
            if held is not None:
                held.turn.prefill_started.set()
                for ev in held.turn.exposed:
                    ev.set()
            return None
        if t == "logits" and self.role is Role.DECODE:
            held = self.turns.get(b["rid"])
            if held is not None:
                held.turn.first_logits = torch.frombuffer(bytearray(b["logits"]), dtype=torch.float32)
                held.turn.prefill_done.set()
                held.logits_ready.set()
            return None
        if t == "reregister":
            await self._reregister(b.get("epoch"))
            return None
        if t == "abort":
            await self._abort(b["rid"], b["reason"])
            return "ok", {}
        if t == "shutdown":
            self.stop()
            return "ok", {}
        raise EngineError(f"{self.name}: unexpected message {t!r} for a {self.role.value} engine")

    async def _begin(self, b: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        rid = b["rid"]
        if rid in self.turns:
            raise EngineError(f"{self.name}: turn {rid} already exists")
        ids = [int(x) for x in bin_to_tokens(b["prompt"])]
        eng = self.engine
        n_pe = self.config.cluster.prefill_nodes * self.config.cluster.engines_per_node
        n_de = self.config.cluster.decode_nodes * self.config.cluster.engines_per_node
        if not ids or b["pe"] >= n_pe or b["de"] >= n_de:
            raise InvalidTurn(f"{self.name}: turn {rid}: empty prompt or engine out of range")
        if max(ids) >= eng.model.vocab_size or len(ids) + b["gen"] > eng.served_context():
            raise InvalidTurn(f"{self.name}: turn {rid}: token id or length outside the model")
        try:
            if self.role is Role.PREFILL:
                eng.check_fits(len(ids))
            else:
                eng.check_fits(len(ids), b["gen"])
        except EngineError as exc:
            raise InvalidTurn(str(exc)) from None
        keys = eng.ctx.keyer.keys(ids, salt=b.get("salt"))
        if b["stored_blocks"] > len(keys) or b["pe_blocks"] > b["stored_blocks"]:
            raise InvalidTurn(f"{self.name}: turn {rid}: plan of {b['stored_blocks']} blocks exceeds the prompt")
        turn = Turn(str(b["session"]), ids, b["gen"], b["pe"], b["de"], PathKind(b["path"]), keys,
                    b["stored_blocks"], b["pe_blocks"], self.layout)
        turn.rid = rid  # both hosts use the scheduler's request id: transport tags agree
        try:  # the same sampling code as in-process (engine/sampling.py: the DE samples, the PE reads
            turn.sampling = sampling_of(b, "begin")  # prompt_logprobs)
        except ProtocolError as exc:
            raise InvalidTurn(f"{self.name}: turn {rid}: {exc}") from None
        if self.role is Role.DECODE and b.get("stream"):
            turn.on_token = lambda tok, _rid=rid: self._on_token(_rid, tok)
            if turn.sampling is not None and turn.sampling.logprobs is not None:
                turn.on_logprob = lambda lp, _rid=rid: self._lp.__setitem__(_rid, lp)
        held = _Held(turn, time.monotonic() + b["deadline_s"], notify_stored=bool(b.get("notify_stored")))
        self.turns[rid] = held
        eng.assign(turn)
        try:
            with anyio.fail_after(b["deadline_s"]):
                ok = await eng.read(turn)
        except BaseException as exc:
            await self._abort(rid, f"read failed: {exc!r}")
            if isinstance(exc, TimeoutError):
                raise PeerTimeout(f"{self.name}: turn {rid}: storage read passed its deadline") from None
            raise
        return "read_done", {"rid": rid, "ok_blocks": int(ok)}

    async def _notify_stored(self, rid: int) -> None:
        """The ``stored`` notice (turns waiting for this prompt's prefix may go); lost, they go at its end."""
        assert self.channel is not None
        try:
            await self.channel.notify(None, "stored", {"rid": rid})
        except DualPathError as exc:
            log.debug("%s: stored notice of turn %s not sent: %s", self.name, rid, exc)

    def _held(self, rid: int) -> _Held:
        held = self.turns.get(rid)
        if held is None:
            raise EngineError(f"{self.name}: no turn {rid} (aborted or never begun)")
        return held

    async def _prefill(self, rid: int, hit: int) -> tuple[str, dict[str, Any]]:
        held = self._held(rid)
        turn, eng = held.turn, self.engine
        turn.hit_blocks = min(hit, turn.stored_blocks)
        eng.submit(turn)
        held.submitted = True
        remaining = max(0.001, held.deadline - time.monotonic())
        try:
            with anyio.fail_after(remaining):
                await wait_event(turn, turn.prefill_started, float("inf"), "prefill start")
                assert self.channel is not None
                await self.channel.notify(None, "started", {"rid": rid})
                await wait_event(turn, turn.prefill_done, float("inf"), "prefill")
            turn.check()
            assert turn.first_logits is not None
            logits = turn.first_logits.to(torch.float32).contiguous().numpy().tobytes()
            t_prefill = max(0.0, turn.timings.t_prefill_done - turn.timings.t_prefill_start)
        except BaseException as exc:
            await self._abort(rid, f"prefill failed: {unwrap(exc)!r}")
            raise _as_engine_error(self.name, rid, exc) from None
        await self._finish_pe(rid)
        out: dict[str, Any] = {"rid": rid, "logits": logits, "t_prefill_s": t_prefill}
        if turn.sampling is not None and turn.sampling.prompt_logprobs is not None and turn.prompt_lps:
            width, ids, vals = logprobs_to_bin(turn.prompt_lps)
            out.update(plp_width=width, plp_ids=ids, plp_vals=vals)
            ranks = ranks_to_bin(turn.prompt_lps)
            if ranks is not None:
                out["plp_ranks"] = ranks
        return "prefilled", out

    async def _finish_pe(self, rid: int) -> None:
        held = self.turns.pop(rid, None)
        if held is None:
            return
        turn, eng = held.turn, self.engine
        if held.submitted:
            with anyio.move_on_after(self.config.cluster.deadline_s):
                await turn.pe_released.wait()
        eng.release(turn)
        eng.unassign(turn)

    async def _decode(self, rid: int, hit: int) -> tuple[str, dict[str, Any]]:
        held = self._held(rid)
        turn, eng = held.turn, self.engine
        turn.hit_blocks = min(hit, turn.stored_blocks)
        remaining = max(0.001, held.deadline - time.monotonic())
        seq = None
        try:
            with anyio.fail_after(remaining):
                await eng.expose_receive(turn)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_guard, turn, eng.stream, turn)
                    tg.start_soon(_guard, turn, eng.receive, turn)
                    tg.start_soon(_guard, turn, wait_event, turn, held.logits_ready, float("inf"), "first token")
                turn.check()
                seq = held.seq = await eng.begin_decode(turn)  # (it stores the prompt's blocks)
                if held.notify_stored:  # (the decode steps go on meanwhile)
                    await wait_event(turn, seq.prompt_stored, float("inf"), "the prompt's write")
                    await self._notify_stored(rid)
                await wait_event(turn, seq.done, float("inf"), "decode")
                t_last = time.perf_counter()
                turn.check()
                tokens = list(seq.generated)
                held.seq = None
                await eng.finish(seq)
                seq = None
                await self._flush_tokens()  # the last streamed tokens go out before the result
                after_last = time.perf_counter() - t_last  # (the writes the turn's end waits for)
        except BaseException as exc:
            await self._abort(rid, f"decode failed: {unwrap(exc)!r}")
            if seq is not None:  # aborted while joining the batch (begin_decode): its pages are ours to free
                with anyio.CancelScope(shield=True):
                    await self._drop_seq(seq)
            raise _as_engine_error(self.name, rid, exc) from None
        if self.turns.pop(rid, None) is not None:  # (an abort that came as it finished unassigned it already)
            eng.unassign(turn)
        return "finished", {"rid": rid, "tokens": tokens, "hit_tokens": turn.hit_tokens, "after_last_s": after_last,
                            "link_bytes": {k: int(v) for k, v in turn.link_bytes.items()}}

    async def _abort(self, rid: int, reason: str) -> None:
        """Fail the turn here and free everything it holds (idempotent)."""
        held = self.turns.pop(rid, None)
        self._out.pop(rid, None)
        self._lp.pop(rid, None)
        if held is None:
            return
        turn, eng = held.turn, self.engine
        turn.on_token = turn.on_logprob = None
        turn.fail(EngineError(f"turn {rid} aborted: {reason}"))
        with anyio.CancelScope(shield=True):
            if self.role is Role.PREFILL:
                for layer in range(self.layout.n_layers):
                    self.transport.cancel(turn.tag("hit", layer))
                if held.submitted:
                    with anyio.move_on_after(self.config.cluster.deadline_s):
                        await turn.pe_released.wait()
                await self.transport.settle()  # nothing lands in a cancelled landing once it is freed
                eng.release(turn)
            else:
                if turn.de_recv is not None or turn.hit_blocks:
                    eng.cancel_receive(turn)
                    await self.transport.settle()
                eng.release(turn)
                if held.seq is not None:
                    await self._drop_seq(held.seq)
            eng.unassign(turn)

    async def _drop_seq(self, seq: Any) -> None:
        """Take a decoding request out of the batch and free its pool pages (idempotent)."""
        await self.engine.drop(seq)  # (after the decode step holding it, if one is in flight)


def _as_engine_error(name: str, rid: int, exc: BaseException) -> BaseException:
    leaf = unwrap(exc)
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return exc
    if isinstance(leaf, TimeoutError) and not isinstance(leaf, PeerTimeout):
        return PeerTimeout(f"{name}: turn {rid} passed its deadline")
    if isinstance(leaf, EngineError):
        return leaf
    if isinstance(leaf, ModelError):  # the request's own error (its sampling masks, its grammar): as in process
        return InvalidTurn(f"{name}: turn {rid}: {leaf}")
    return EngineError(f"{name}: turn {rid} failed: {leaf}")


async def _guard(turn: Turn, fn: Any, *args: Any) -> None:
    try:
        await fn(*args)
    except Exception as exc:
        turn.fail(unwrap(exc))


# --- process entry -------------------------------------------------------------------------------------------
async def serve_engine(config: DualPathConfig, role: Role, rank: int, scheduler: str | None) -> None:
    host = EngineHost(config, role, rank, scheduler)

    def _on_signal(*_: object) -> None:
        host.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal)
    await host.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dualpath.control.enginehost")
    p.add_argument("--config")
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--scheduler")
    a = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DUALPATH_LOG", "WARNING"))
    cfg = load_config(a.config)
    try:
        anyio.run(serve_engine, cfg, Role(a.role), a.rank, a.scheduler)
    except PeerGone as exc:  # pragma: no cover
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    from dualpath.procexit import exit_with

    exit_with(main())
