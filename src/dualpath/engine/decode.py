"""The decode engine: DE-side reads and streaming, prompt KV assembly, paged pool, batched decode and
persistence of every block that becomes full (see engine/base.py)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from dualpath.engine.base import Engine, EngineContext, allocating
from dualpath.engine.host_buffer import HostRegion
from dualpath.engine.prefill import wait_arrival
from dualpath.engine.request import Turn, wait_event
from dualpath.engine.sampling import Sampler, TokenLogprob
from dualpath.errors import CapacityError, ModelError, PeerTimeout
from dualpath.model.kv_pool import KVPool
from dualpath.paths.de_read import de_host_blocks, de_read, stream_layers
from dualpath.types import BlockKey, EngineId, Role

log = logging.getLogger("dualpath.engine")


@dataclass(eq=False)
class DecodeSeq:
    """A request on the decode engine: its pool pages and the tokens so far."""

    turn: Turn
    pages: list[int]
    kv_len: int  # positions whose KV is in the pool
    target_kv: int  # KV positions when done (prompt + gen - 1, or + gen when that fills a block)
    tokens: list[int]  # prompt + generated
    generated: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when sampling asks
    keys: list[BlockKey] = field(default_factory=list)  # keys of the full blocks known so far
    pending: int = 0
    idle: anyio.Event = field(default_factory=anyio.Event)  # set when no persistence is pending
    prompt_stored: anyio.Event = field(default_factory=anyio.Event)  # the prompt's new blocks are written (or failed)
    done: anyio.Event = field(default_factory=anyio.Event)
    sampler: Sampler | None = None  # None = greedy
    stopped: bool = False  # a stop token ended generation before gen_tokens

    @property
    def finished(self) -> bool:
        return (self.stopped or len(self.generated) >= self.turn.gen_tokens) and self.kv_len >= self.target_kv

    @property
    def generating(self) -> bool:
        return not self.stopped and len(self.generated) < self.turn.gen_tokens

    def pick(self, logits: torch.Tensor) -> int:
        return int(torch.argmax(logits)) if self.sampler is None else self.sampler(logits, len(self.generated))

    def accept(self, tok: int, block_tokens: int) -> None:
        """Append a generated token, tell the turn's listener, stop early on a stop token."""
        self.generated.append(tok)
        self.tokens.append(tok)
        lp = self.sampler.take() if self.sampler is not None else None
        if lp is not None:
            self.logprobs.append(lp)
            self._tell(self.turn.on_logprob, lp, "on_logprob")
        self._tell(self.turn.on_token, tok, "on_token")
        if (self.sampler is not None and (tok in self.sampler.stop_ids or self.sampler.done)
                and len(self.generated) < self.turn.gen_tokens):
            self.stopped = True
            self.target_kv = kv_target(self.turn.prompt_len, len(self.generated), block_tokens)


    def _tell(self, listener: Callable[[Any], None] | None, value: Any, what: str) -> None:
        if listener is not None:
            try:
                listener(value)
            except Exception:  # a listener's bug must not stop the batch
                log.exception("%s listener of turn %d failed", what, self.turn.rid)

    def mark_stored(self) -> None:
        """The prompt's new Full Blocks are written (or their write failed, or there were none): set
        :attr:`prompt_stored` and tell the turn's ``on_stored`` listener (once)."""
        if self.prompt_stored.is_set():
            return
        self.prompt_stored.set()
        listener, self.turn.on_stored = self.turn.on_stored, None
        if listener is not None:
            try:
                listener()
            except Exception:  # a listener's bug must not stop the engine
                log.exception("on_stored listener of turn %d failed", self.turn.rid)


def kv_target(prompt: int, gen: int, block_tokens: int) -> int:
    """KV positions a turn leaves behind: every token but the last generated one, plus that one when it
    completes a block (so the next turn's hit covers every full block of this turn's context)."""
    return prompt + gen - (0 if (prompt + gen) % block_tokens == 0 else 1)


class DecodeEngine(Engine):
    """See :mod:`dualpath.engine.base`."""

    role = Role.DECODE

    def __init__(self, eid: EngineId, ctx: EngineContext) -> None:
        super().__init__(eid, ctx)
        bt = self.layout.block_tokens
        with allocating("cluster.kv_pool_tokens", ctx.config.kv_pool_tokens, "tokens"):
            self.pool = KVPool(self.layout.spec, max(1, ctx.config.kv_pool_tokens // bt), bt, self.device)
        self.running: list[DecodeSeq] = []
        self.persist_skipped = 0  # prompts not persisted: not one block fitted beside their own regions
        self.persist_chunked = 0  # prompts persisted in chunks (their copy did not fit beside their own regions)
        self._batch: list[DecodeSeq] = []  # the requests of the decode step in flight (its forward writes their pages)
        self._step_done = anyio.Event()  # set (and replaced) at the end of every step
        self._wake = anyio.Event()
        self._pool_freed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.steps = 0
        self.persisted_blocks = 0

    def free_kv_tokens(self) -> int:
        return self.pool.num_free * self.layout.block_tokens

    def pool_blocks_for(self, prompt: int, gen: int) -> int:
        return -(-kv_target(prompt, gen, self.layout.block_tokens) // self.layout.block_tokens)

    def check_fits(self, prompt: int, gen: int) -> None:
        need = self.pool_blocks_for(prompt, gen)
        if need > self.pool.num_blocks:
            raise CapacityError(
                f"{self.name}: a turn of {prompt} prompt + {gen} generated tokens needs {need} KV pool blocks of "
                f"{self.layout.block_tokens} tokens, but the pool has {self.pool.num_blocks} "
                f"(cluster.kv_pool_tokens={self.cfg.kv_pool_tokens})"
            )

    def assign(self, turn: Turn) -> None:
        self.seq += 1
        self.tok += turn.prompt_len

    def unassign(self, turn: Turn) -> None:
        self.seq -= 1
        self.tok -= turn.prompt_len

    # --- DE read path ------------------------------------------------------------------------------------
    async def read(self, turn: Turn) -> int:
        return await de_read(self.ctx.storage, self.ctx.links, self.name, self.host, turn, self.cfg.deadline_s)

    async def stream(self, turn: Turn) -> None:
        """Stream the DE-read hit to the PE once it has started the turn's forward."""
        if turn.de_hit_blocks == 0:
            return
        await wait_event(turn, turn.prefill_started, float("inf"), "prefill start")
        await stream_layers(
            self.ctx.transport, self.ctx.links, self.host, self.name, f"pe{turn.pe}", turn, self.cfg.deadline_s,
        )

    # --- receiving the prompt's KV -----------------------------------------------------------------------
    async def expose_receive(self, turn: Turn) -> None:
        """Allocate the layer-major receive area ``[L, ship_rows, bytes]`` and expose one landing per layer
        and ship range."""
        assert self.host_region is not None
        b = self.layout.bytes_per_token_layer
        rows = turn.ship_rows
        region = await self.host.alloc(self.layout.n_layers * rows * b, self.cfg.deadline_s)
        turn.de_recv = region
        recv = self.recv_rows(turn)
        for layer in range(self.layout.n_layers):
            off = 0
            for part, (s, e) in enumerate(turn.ship_ranges()):
                view = recv[layer, off : off + (e - s)]
                self.ctx.transport.expose(turn.tag("kv", layer, part), self.host_region, self.host_offset(view),
                                          (e - s) * b, sender=f"pe{turn.pe}")
                off += e - s

    def recv_rows(self, turn: Turn) -> torch.Tensor:
        rows = turn.ship_rows
        b = self.layout.bytes_per_token_layer
        return turn.de_recv.data[: self.layout.n_layers * rows * b].view(self.layout.n_layers, rows, b)

    async def receive(self, turn: Turn) -> None:
        await wait_event(turn, turn.prefill_started, float("inf"), "prefill start")
        t = self.ctx.transport
        first = await self._first_arrival_deadline(turn)
        for layer in range(self.layout.n_layers):
            for part in range(len(turn.ship_ranges())):
                await wait_arrival(turn, t, turn.tag("kv", layer, part), first if layer == 0 else self.cfg.deadline_s)

    async def _first_arrival_deadline(self, turn: Turn) -> float:
        """The deadline of the first layer's KV. Under the compute quota the PE may chunk the turn, and only its
        final chunk ships KV, so the first layer can come the turn's whole prefill after it started: the deadline
        then adds twice the predicted prefill time (the same time model the PE's quota uses)."""
        d = self.cfg.deadline_s
        if self.cfg.prefill_quota_s is None:
            return d
        new = max(1, turn.prompt_len - turn.hit_tokens)
        pred = await anyio.to_thread.run_sync(self.model.predict_prefill_s, turn.hit_tokens, new)
        return d + 2.0 * pred if pred else d

    def cancel_receive(self, turn: Turn) -> None:
        for layer in range(self.layout.n_layers):
            for part in range(len(turn.ship_ranges())):
                self.ctx.transport.cancel(turn.tag("kv", layer, part))

    def release(self, turn: Turn) -> None:
        for attr in ("de_host", "de_recv"):
            region: HostRegion | None = getattr(turn, attr)
            if region is not None:
                self.host.free(region)
                setattr(turn, attr, None)

    # --- pool --------------------------------------------------------------------------------------------
    async def _alloc_pages(self, n: int, turn: Turn) -> list[int]:
        with anyio.move_on_after(self.cfg.deadline_s):
            while self.pool.num_free < n:
                ev = self._pool_freed
                await wait_event(turn, ev, float("inf"), "KV pool space")
            return self.pool.allocate(n)
        raise PeerTimeout(f"{self.name}: no room for {n} KV pool blocks within {self.cfg.deadline_s} s")

    def free_pages(self, pages: list[int]) -> None:
        self.pool.free(pages)
        self._pool_freed.set()
        self._pool_freed = anyio.Event()

    async def _sampler(self, turn: Turn) -> Sampler | None:
        """The turn's sampler (None: greedy), with its grammar's constraint (made from this model's tokenizer, in
        a worker thread: a complex grammar takes up to a second to build, and the decode loop must not wait)."""
        sp = turn.sampling
        if sp is None:
            return None
        constraint = None
        if sp.grammar is not None:
            from dualpath.engine.grammar import Constraint

            constraint = await anyio.to_thread.run_sync(Constraint, sp.grammar, self.ctx.tokenizer_source)
        return Sampler(sp, constraint, prompt=turn.prompt_ids)

    async def begin_decode(self, turn: Turn) -> DecodeSeq:
        """Copy the prompt KV from the DE buffer into the pool (H2D), give out the first token, start persisting the
        prompt's new Full Blocks (:meth:`_persist_prompt`, in the background) and join the decode batch. Needs the
        PE's first-token logits and the whole prompt KV received."""
        layout = self.layout
        bt, b, n_layers = layout.block_tokens, layout.bytes_per_token_layer, layout.n_layers
        target = kv_target(turn.prompt_len, turn.gen_tokens, bt)
        sampler = await self._sampler(turn)  # (before any page is taken: a bad grammar fails the turn here)
        pages = await self._alloc_pages(-(-target // bt), turn)
        try:
            await self.ctx.links.h2d(self.name, turn, turn.prompt_len * n_layers * b)
            recv = self.recv_rows(turn)
            de_n = turn.de_hit_blocks
            de_fb = de_host_blocks(turn)[:de_n] if de_n else None
            ids = torch.tensor(pages, dtype=torch.int64)
            dev = self.pool.device
            nb = dev.type == "cuda"
            for layer in range(n_layers):
                if de_fb is not None:
                    p0 = turn.pe_hit_blocks
                    staged = de_fb[:, layer : layer + 1].to(dev, non_blocking=nb)
                    self.pool.write_blocks(layer, ids[p0 : p0 + de_n], staged)
                off = 0
                for s, e in turn.ship_ranges():
                    rows = recv[layer, off : off + (e - s)]
                    off += e - s
                    nfull, rem, b0 = (e - s) // bt, (e - s) % bt, s // bt
                    if nfull:
                        staged = rows[: nfull * bt].view(nfull, bt, b).to(dev, non_blocking=nb)
                        self.pool.write_blocks(layer, ids[b0 : b0 + nfull], staged)
                    if rem:
                        page = self.pool.layer(layer)[pages[b0 + nfull]]
                        page.view(torch.uint8).view(bt, b)[:rem].copy_(rows[nfull * bt :], non_blocking=nb)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            assert turn.first_logits is not None
            seq = DecodeSeq(turn, pages, turn.prompt_len, target, list(turn.prompt_ids), keys=list(turn.keys),
                            sampler=sampler)
            seq.accept(seq.pick(turn.first_logits), bt)
            if self.cfg.keep_logits:
                seq.logits.append(turn.first_logits)
            seq.idle.set()
            await self._persist_prompt(seq)
        except BaseException:
            self.free_pages(pages)
            raise
        finally:
            self.release(turn)
        turn.timings.t_first_token = time.perf_counter()  # (streamed already: seq.accept told the listener)
        # the decode steps do not wait for the prompt's write: who shares the prompt's prefix waits for
        # ``on_stored`` (seq.prompt_stored), and the turn's end for ``seq.idle`` (finish)
        if seq.finished:
            seq.done.set()
        else:
            self.running.append(seq)
            self._wake.set()
        return seq

    # --- persistence -------------------------------------------------------------------------------------
    async def _persist_prompt(self, seq: DecodeSeq) -> None:
        """Persist the prompt's new Full Blocks ``[hit, prompt // bt)`` from the DE buffer (no D2H): copied out of
        the receive area here (it is released at once), written to storage in the background: neither the first
        token nor the decode steps wait for storage. The turn's end does (:meth:`finish` waits for ``seq.idle``),
        so its next turn finds them stored. :meth:`DecodeSeq.mark_stored` (``seq.prompt_stored``, the turn's
        ``on_stored``) tells once they are written, or the write failed (persistence is best effort: a next turn
        recomputes what is missing): a request sharing the prefix may then go and load it. A prompt whose copy does
        not fit the host buffer beside the turn's own regions is persisted in chunks first
        (:meth:`_persist_in_chunks`)."""
        turn = seq.turn
        layout = self.layout
        bt = layout.block_tokens
        first, last = turn.hit_blocks, turn.prompt_len // bt
        n = last - first
        if n <= 0 or not self.cfg.persist:
            seq.mark_stored()
            return
        # this turn's own regions (its receive area, its DE-read blocks) stay held while the copy is made: a copy
        # that cannot sit beside them would wait for this turn itself (until the deadline, then fail the turn)
        held = sum(r.nbytes for r in (turn.de_recv, turn.de_host) if r is not None)
        fits = (self.host.capacity - held) // layout.full_block_bytes
        if fits < n:
            await self._persist_in_chunks(seq, first, last, fits)
            return
        region = await self.host.alloc(n * layout.full_block_bytes, self.cfg.deadline_s)
        try:
            out = region.data.view(n, *layout.full_block_shape)
            self._copy_blocks(turn, first, last, out)
        except BaseException:
            self.host.free(region)
            raise
        seq.pending += 1
        seq.idle = anyio.Event()
        if self._tg is None:  # (an engine whose loop is not running: write now)
            await self._write_prompt(seq, region, turn.keys[first:last], out)
        else:
            self._tg.start_soon(self._write_prompt, seq, region, turn.keys[first:last], out)

    def _copy_blocks(self, turn: Turn, a: int, b: int, out: torch.Tensor) -> None:
        """Prompt blocks ``[a, b)`` (all past the turn's hits) from the layer-major receive area into Full Blocks."""
        bt = self.layout.block_tokens
        recv = self.recv_rows(turn)
        # row offset of token hit*bt inside the receive area: the rows of the ranges before it
        off = 0
        first = turn.hit_blocks * bt
        for s, e in turn.ship_ranges():
            if s <= first < e:
                off += first - s
                break
            off += e - s
        off += (a - turn.hit_blocks) * bt
        n = b - a
        for layer in range(self.layout.n_layers):
            out[:, layer].copy_(recv[layer, off : off + n * bt].view(n, bt, -1))

    async def _persist_in_chunks(self, seq: DecodeSeq, first: int, last: int, k: int) -> None:
        """Persist blocks ``[first, last)`` ``k`` at a time while the turn still holds its receive area: what a
        prompt whose copy does not fit beside it needs (its next token waits for these writes; other requests do
        not). With no room for one block it is not persisted (best effort), and said."""
        turn, layout = seq.turn, self.layout
        try:
            if k < 1:
                self.persist_skipped += 1
                log.warning("%s: turn %d: no room in the host buffer (%d bytes) beside the turn's own regions for one "
                            "block of its prompt: not persisted (raise cluster.host_buffer_bytes)", self.name,
                            turn.rid, self.host.capacity)
                return
            self.persist_chunked += 1
            for a in range(first, last, k):
                b = min(last, a + k)
                region = await self.host.alloc((b - a) * layout.full_block_bytes, self.cfg.deadline_s)
                try:
                    out = region.data.view(b - a, *layout.full_block_shape)
                    self._copy_blocks(turn, a, b, out)
                    await self._write(turn, turn.keys[a:b], out)
                finally:
                    self.host.free(region)
        except Exception:  # persistence is best effort: the next turn recomputes what is missing
            log.exception("%s: persisting the prompt of turn %d failed", self.name, turn.rid)
        finally:
            seq.mark_stored()

    async def _write_prompt(self, seq: DecodeSeq, region: Any, keys: list[BlockKey], blocks: torch.Tensor) -> None:
        turn = seq.turn
        try:
            await self._write(turn, keys, blocks)
        except Exception:  # persistence is best effort: the next turn recomputes what is missing
            log.exception("%s: persisting the prompt of turn %d failed", self.name, turn.rid)
        finally:
            self.host.free(region)
            seq.mark_stored()
            seq.pending -= 1
            if seq.pending == 0:
                seq.idle.set()

    async def _write(self, turn: Turn, keys: list[BlockKey], blocks: torch.Tensor) -> None:
        nbytes = len(keys) * self.layout.full_block_bytes
        statuses = await self.ctx.links.storage_write(self.name, turn, nbytes, self.ctx.storage.write(keys, blocks))
        assert statuses is not None
        bad = [i for i, s in enumerate(statuses) if s.value != "ok"]
        if bad:
            log.warning("%s: %d of %d blocks not persisted (turn %d)", self.name, len(bad), len(keys), turn.rid)
        self.persisted_blocks += len(keys) - len(bad)

    async def _persist_decoded(self, seq: DecodeSeq, block: int, host: torch.Tensor) -> None:
        try:
            await self._write(seq.turn, [seq.keys[block]], host)
        except Exception:  # persistence is best effort: the next turn recomputes what is missing
            log.exception("%s: persisting block %d of turn %d failed", self.name, block, seq.turn.rid)
        finally:
            seq.pending -= 1
            if seq.pending == 0:
                seq.idle.set()

    async def _block_filled(self, seq: DecodeSeq, block: int) -> None:
        """A decode step filled ``block``: key it, copy it D2H (DE CNIC out) and write it in the background."""
        bt = self.layout.block_tokens
        parent = seq.keys[block - 1] if block > 0 else None
        seq.keys.extend(self.ctx.keyer.keys(seq.tokens[block * bt : (block + 1) * bt], parent=parent))
        if not self.cfg.persist:
            return
        host = torch.empty((1, *self.layout.full_block_shape), dtype=torch.uint8)
        await self.ctx.links.d2h(self.name, seq.turn, self.layout.full_block_bytes)
        page = seq.pages[block]
        for layer in range(self.layout.n_layers):
            host[0, layer].copy_(self.pool.layer(layer)[page].view(torch.uint8).reshape(bt, -1))
        seq.pending += 1
        seq.idle = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._persist_decoded, seq, block, host)

    # --- decode loop -------------------------------------------------------------------------------------
    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            while True:
                if not self.running:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                try:
                    await self._step()
                except Exception as exc:
                    log.exception("%s: decode step failed", self.name)
                    for s in self.running:
                        s.turn.fail(exc)
                        s.done.set()
                    self.running.clear()

    def _remove(self, s: DecodeSeq) -> None:
        with contextlib.suppress(ValueError):  # (dropped already)
            self.running.remove(s)
        s.done.set()

    async def drop(self, seq: DecodeSeq) -> None:
        """Take a failed or cancelled request out of decoding and free its pool pages (idempotent). Never while a
        decode step that includes it is in flight: that step's forward still writes the request's new KV into its
        pages, which another request could be given meanwhile (and the step's end would find it gone from the
        batch: removing it under the step failed every request of the engine). Waits for such a step to end (at
        most ``deadline_s``; past it the pages stay allocated rather than freed under a forward), then for its
        background writes, then frees its pages."""
        while seq in self._batch:
            ev = self._step_done
            with anyio.move_on_after(self.cfg.deadline_s) as scope:
                await ev.wait()
            if scope.cancelled_caught:
                log.warning("%s: a decode step holding turn %d did not end within %g s; its pages stay allocated",
                            self.name, seq.turn.rid, self.cfg.deadline_s)
                return
        self._remove(seq)
        if seq.pages:
            with anyio.move_on_after(self.cfg.deadline_s):
                await seq.idle.wait()
            if seq.pages:
                self.free_pages(seq.pages)
                seq.pages = []

    async def _step(self) -> None:
        batch = [s for s in self.running[: self.cfg.decode_max_batch] if s.turn.error is None]
        for s in self.running[: self.cfg.decode_max_batch]:
            if s.turn.error is not None:
                self._remove(s)
        if not batch:
            return
        self._batch = batch
        try:
            await self._step_batch(batch)
        finally:
            self._batch = []
            self._step_done.set()
            self._step_done = anyio.Event()

    async def _step_batch(self, batch: list[DecodeSeq]) -> None:
        # rotate so every running request gets steps when there are more than the batch holds
        self.running = self.running[len(batch) :] + batch
        bt = self.layout.block_tokens
        width = max(len(s.pages) for s in batch)
        tables = torch.zeros((len(batch), width), dtype=torch.int32)
        for i, s in enumerate(batch):
            tables[i, : len(s.pages)] = torch.tensor(s.pages, dtype=torch.int32)
        tokens = torch.tensor([s.tokens[s.kv_len] for s in batch], dtype=torch.int64)
        lens = [s.kv_len + 1 for s in batch]
        step = self.model.decode_step(tokens, lens, tables, self.pool.layers)
        ep = getattr(self.cfg, "ep_bytes_per_token", 0)
        if ep:  # the step's MoE all-to-all on this engine's CNIC (HIGH; fair-shared with KV without isolation)
            out = await self.ctx.links.collective(self.name, ep * len(batch), step, isolated=self.cfg.traffic_isolation)
            assert out is not None
            logits = out
        else:
            logits = await step
        self.steps += 1
        now = time.perf_counter()
        for i, s in enumerate(batch):
            s.kv_len += 1
            if s.kv_len % bt == 0:
                await self._block_filled(s, s.kv_len // bt - 1)
            if s.generating:
                try:
                    s.accept(s.pick(logits[i]), bt)
                except ModelError as exc:  # this request's own (its grammar): it fails, the batch goes on
                    s.turn.fail(exc)
                    self._remove(s)
                    continue
                if self.cfg.keep_logits:
                    s.logits.append(logits[i].detach().to("cpu", torch.float32))
                if len(s.generated) == 2:
                    s.turn.timings.t_second_token = now
            if s.finished:
                self._remove(s)

    async def finish(self, seq: DecodeSeq) -> None:
        """Wait for the request's persistence, then free its pool pages."""
        try:
            with anyio.move_on_after(self.cfg.deadline_s):
                await seq.idle.wait()
        finally:
            self.free_pages(seq.pages)
            seq.pages = []
