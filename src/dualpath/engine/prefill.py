"""The prefill engine: PE-side reads and layer-wise prefill over batches of requests (see engine/base.py).

Chunked prefill (paper 7.5). When the compute quota (``cluster.prefill_quota_s``) is set and the model predicts
its forward time, the PE packs its FIFO queue with :func:`~dualpath.scheduler.batching.pack_forward_batch`, the
packer the simulator uses: a request the quota cuts runs its first ``n`` new tokens in this forward and heads the
queue for the next one. A chunk computes prompt tokens ``[start, end)`` over the KV of ``[0, start)``:

* the first chunk loads the storage hit as an unchunked request does (layer-wise H2D of the PE-read blocks, the
  DE-streamed blocks' arrival); the DE streams each layer once, so nothing is read twice;
* after each layer of a chunk that is not the last, the PE keeps the request's rows ``[0, end)`` of that layer in
  a per-request device buffer (``Turn.pe_kv``, ``[n_layers, blocks, bt, bytes]``); a later chunk copies its prefix
  rows from there into the scratch slot before computing the layer;
* only the final chunk ships KV to the DE, produces the first-token logits and sets ``prefill_done``: by then
  each layer's scratch slot holds every row of the prompt, so what is shipped (``Turn.ship_ranges``) and the DE's
  side of the protocol are those of an unchunked request. The PE host buffer region (``pe_host``) is freed
  once the first chunk has loaded the hit onto the device (later chunks read ``pe_kv``), ``pe_kv`` when the
  request's prefill ends or it fails (``release``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import anyio
import torch

from dualpath.engine.base import Engine, EngineContext
from dualpath.engine.model_api import PrefillSeq
from dualpath.engine.request import Turn, unwrap
from dualpath.engine.sampling import rows_logprobs
from dualpath.engine.work import PrefillWork
from dualpath.errors import CapacityError, EngineError, ModelError
from dualpath.paths.pe_read import LayerPrefetch, h2d_layer, pe_read
from dualpath.scheduler.batching import PendingPrefill, pack_forward_batch
from dualpath.scheduler.state import EngineSnapshot
from dualpath.transports.base import Region, Transport
from dualpath.types import EngineId, Role

log = logging.getLogger("dualpath.engine")


async def wait_arrival(turn: Turn, transport: Transport, tag: str, timeout: float) -> None:
    """``transport.wait(tag)``, cut short (and the landing withdrawn) as soon as the turn fails."""
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:

        async def _watch() -> None:
            await turn.failed.wait()
            tg.cancel_scope.cancel()

        async def _wait() -> None:
            nonlocal error
            try:
                await transport.wait(tag, timeout)
            except Exception as exc:
                error = exc
            tg.cancel_scope.cancel()

        tg.start_soon(_watch)
        tg.start_soon(_wait)
    if turn.error is not None:
        transport.cancel(tag)
        turn.check()
    if error is not None:
        raise error


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """One request's share of a PE forward: prompt tokens ``[start, end)`` over the KV of ``[0, start)``. ``first``:
    the request's first forward (its storage hit is loaded now); the final chunk ends at the prompt's end."""

    turn: Turn
    start: int
    end: int
    first: bool

    @property
    def final(self) -> bool:
        return self.end == self.turn.prompt_len

    @property
    def whole(self) -> bool:
        return self.first and self.final


class PrefillEngine(Engine):
    """Layer-wise prefill (see :mod:`dualpath.engine.base`)."""

    role = Role.PREFILL

    def __init__(self, eid: EngineId, ctx: EngineContext) -> None:
        super().__init__(eid, ctx)
        cfg = ctx.config
        bt = self.layout.block_tokens
        n_layers = self.layout.n_layers
        self.ring = min(cfg.layers_ahead, n_layers - 1) + 1 if cfg.layerwise else n_layers
        rows = min(cfg.prefill_max_batch_tokens, self.model.max_context)
        self.slot_blocks = -(-rows // bt) + cfg.prefill_max_batch
        #: what a ring slot may grow to (``_grow``): a prompt of the model's whole context
        self.max_slot_blocks = max(self.slot_blocks, -(-self.model.max_context // bt) + 1)
        self.scratch_grows = 0
        self.scratch: torch.Tensor | None = None
        self.scratch_region: Region | None = None
        self.queue: deque[Turn] = deque()
        self._wake = anyio.Event()
        self.forwards = 0
        self.chunks = 0  # forwards' shares of requests that were cut by the quota (every piece of a cut request)
        self.chunk_bytes = 0  # device bytes held now by chunked requests' KV between their chunks
        self._min_tokens: int | None = None  # the model's efficient batch size (the quota's floor), on first use
        self._inflight: list[Turn] = []  # the batch of the forward in progress
        # the PE-read hit staged a layer ahead in pinned memory (pe_read.LayerPrefetch): None = on a GPU only; tests
        # turn it on for a CPU engine (unpinned there) to check the staged bytes, benchmarks off for a baseline
        self.stage_h2d: bool | None = None
        self.h2d_staged = 0  # layers of PE-read hit that came through the staging
        #: set (by the cluster or the engine host): the engine tracks its predicted work (engine/work.py) and
        #: reports it in its snapshot, what DualPath ranks PEs by; None: it reports none (ranked by tokens)
        self.work_model: PrefillWork | None = None
        self.queued_work = 0  # predicted work (us) of assigned requests' parts whose forwards have not started
        self._fwd_work = 0  # the forward in progress: its parts' predicted work (us), and when it started
        self._fwd_t0 = 0.0

    @property
    def layer_bytes(self) -> int:
        return self.layout.layer_block_bytes

    async def start(self) -> None:
        await super().start()
        self.scratch = torch.zeros(
            (self.ring, self.slot_blocks, self.layout.block_tokens, self.layout.bytes_per_token_layer),
            dtype=torch.uint8,
            device=self.device,
        )
        self.scratch_region = self.ctx.transport.register(self.scratch)

    def check_fits(self, prompt_tokens: int) -> None:
        need = -(-prompt_tokens // self.layout.block_tokens)
        if need > self.max_slot_blocks - 1:
            raise CapacityError(
                f"{self.name}: a prompt of {prompt_tokens} tokens needs {need} blocks of one-layer scratch but the "
                f"prefill engine holds at most {self.max_slot_blocks - 1} (the model's context of "
                f"{self.model.max_context} tokens)"
            )

    def _grow(self, need: int) -> None:
        """Make each ring slot hold ``need`` blocks (between forwards: nothing is exposed in the scratch or copied
        into it then). The scratch starts sized for ``prefill_max_batch_tokens``; a longer prompt (a long agent
        context, mostly cached) grows it up to the model's context, at least doubling, and it stays grown. The
        new scratch is registered before the old one is let go, so a region count never dips."""
        assert self.scratch is not None and self.scratch_region is not None
        blocks = min(self.max_slot_blocks, max(need, 2 * self.slot_blocks))
        try:
            scratch = torch.zeros((self.ring, blocks, *self.scratch.shape[2:]), dtype=torch.uint8,
                                  device=self.device)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            raise EngineError(
                f"{self.name}: a prompt needs {need} blocks of one-layer scratch; growing it from "
                f"{self.slot_blocks} blocks failed ({exc}); lower cluster.layers_ahead or the prompt"
            ) from exc
        region = self.ctx.transport.register(scratch)
        old = self.scratch_region
        self.scratch, self.scratch_region, self.slot_blocks = scratch, region, blocks
        self.ctx.transport.deregister(old)
        self.scratch_grows += 1
        log.info("%s: one-layer scratch grown to %d blocks per layer (a prompt of %d blocks)", self.name, blocks,
                 need)

    # --- PE read path ------------------------------------------------------------------------------------
    async def read(self, turn: Turn) -> int:
        return await pe_read(self.ctx.storage, self.ctx.links, self.name, self.host, turn, self.cfg.deadline_s)

    def release(self, turn: Turn) -> None:
        """Free what the PE holds for ``turn`` (its host buffer region, its chunk KV); idempotent."""
        if turn.pe_host is not None:
            self.host.free(turn.pe_host)
            turn.pe_host = None
        if turn.pe_kv is not None:
            self.chunk_bytes -= turn.pe_kv.numel() * turn.pe_kv.element_size()
            turn.pe_kv = None

    # --- queue -------------------------------------------------------------------------------------------
    def assign(self, turn: Turn) -> None:
        self.seq += 1
        self.tok += turn.prompt_len
        if self.work_model is not None:  # (the hit its plan expects: what the scheduler predicted it with)
            hit = min(turn.stored_blocks * turn.bt, turn.prompt_len)
            turn.pe_work = self.work_model.work(hit, turn.prompt_len - hit)
            self.queued_work += turn.pe_work

    def unassign(self, turn: Turn) -> None:
        self.seq -= 1
        self.tok -= turn.prompt_len
        self.queued_work -= turn.pe_work  # (what its forwards did not take: all of it when it failed before)
        turn.pe_work = 0

    def work_now(self) -> int:
        """Predicted work (us) until the engine has done what it holds: its queue's, plus what is left of the
        forward in progress (engine/work.py)."""
        left = self._fwd_work - (time.perf_counter() - self._fwd_t0) * 1e6 if self._inflight else 0.0
        return self.queued_work + max(0, round(left))

    def snapshot(self) -> EngineSnapshot:
        snap = super().snapshot()
        return snap if self.work_model is None else replace(snap, work=self.work_now())

    def _start_work(self, batch: list[PrefillChunk]) -> None:
        """A forward starts: each part's share of its request's predicted work (by new tokens) leaves the queue
        and becomes the forward's."""
        self._fwd_work = 0
        self._fwd_t0 = time.perf_counter()
        for c in batch:
            t = c.turn
            if t.pe_work <= 0:
                continue
            share = t.pe_work if c.final else t.pe_work * (c.end - c.start) // (t.prompt_len - c.start)
            t.pe_work -= share
            self.queued_work -= share
            self._fwd_work += share

    def submit(self, turn: Turn) -> None:
        self.queue.append(turn)
        self._wake.set()

    def _take_batch(self) -> list[PrefillChunk]:
        """The next forward batch, FIFO, within the scratch size and ``prefill_max_batch(_tokens)`` (whole
        requests: a request over those limits waits, or runs alone if it heads the queue) and, when
        ``prefill_quota_s`` is set and the model can predict its time, the compute quota (paper 7.5, via
        :func:`~dualpath.scheduler.batching.pack_forward_batch`): the request the quota cuts gets a chunk (at least
        one token when it heads the queue) and ends the batch; :meth:`run` puts it back at the queue's head."""
        batch: list[PrefillChunk] = []
        blocks = 0
        new_tokens = 0
        while self.queue and len(batch) < self.cfg.prefill_max_batch:
            t = self.queue[0]
            if t.error is not None:
                self.queue.popleft()
                self.release(t)
                t.pe_released.set()
                continue
            start = t.prefilled or t.hit_tokens
            left = t.prompt_len - start
            nb = t.prompt_blocks
            if batch and (blocks + nb > self.slot_blocks or new_tokens + left > self.cfg.prefill_max_batch_tokens):
                break
            n = self._quota_tokens(batch, start, left)
            if n <= 0:
                break
            self.queue.popleft()
            batch.append(PrefillChunk(t, start, start + n, first=t.prefilled == 0))
            blocks += nb
            new_tokens += n
            if n < left:  # cut by the quota: nothing after it in this forward (FIFO)
                break
        return batch

    def _quota_tokens(self, batch: list[PrefillChunk], cached: int, left: int) -> int:
        """New tokens of the next request (``cached`` tokens with KV, ``left`` to compute) that fit the compute
        quota after ``batch``: ``left`` without a quota or a time prediction, 0 when none fit."""
        quota = self.cfg.prefill_quota_s
        if quota is None:
            return left
        predict = self.model.predict_prefill_s
        if predict(0, 1) is None:
            return left
        pending = [PendingPrefill(i, c.start, c.end - c.start) for i, c in enumerate(batch)]
        pending.append(PendingPrefill(len(batch), cached, left))
        if self._min_tokens is None:  # never lose: the quota does not cut a batch below the efficient size
            self._min_tokens = self.model.efficient_prefill_tokens(self.cfg.prefill_max_batch_tokens)
        fb = pack_forward_batch(pending, quota, lambda c, n: predict(c, n) or 0.0, min_tokens=self._min_tokens,
                                more_queued=len(self.queue) > 1)
        return fb.chunks[-1].new if len(fb.chunks) == len(pending) else 0

    async def run(self) -> None:
        while True:
            if not self.queue:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            batch = self._take_batch()
            if not batch:
                continue
            self._inflight = [c.turn for c in batch]
            self._start_work(batch)
            try:
                need = sum(c.turn.prompt_blocks for c in batch)
                if need > self.slot_blocks:  # (a request longer than the scratch runs alone)
                    self._grow(need)
                await self._forward(batch)
            except Exception as exc:  # a model error fails the batch, not the engine
                log.exception("%s: forward failed", self.name)
                for c in batch:
                    c.turn.fail(exc)
            finally:
                self._settle(batch)

    def _settle(self, batch: list[PrefillChunk]) -> None:
        """After the forward of ``batch``: a request whose prefill ended (or failed) is released; the rest of a
        request the quota cut goes back to the head of the queue (FIFO order kept)."""
        for c in reversed(batch):
            t = c.turn
            if c.final or t.error is not None:
                self.release(t)
                t.pe_released.set()
            else:
                t.prefilled = c.end
                if c.first and t.pe_host is not None:  # only a first chunk reads the hit from the host buffer
                    self.host.free(t.pe_host)
                    t.pe_host = None
                self.queue.appendleft(t)
        self.forwards += 1
        self.chunks += sum(not c.whole for c in batch)
        self._inflight = []

    # --- layer-wise forward ------------------------------------------------------------------------------
    async def _forward(self, chunks: list[PrefillChunk]) -> None:
        assert self.scratch is not None and self.scratch_region is not None
        cfg = self.cfg
        transport = self.ctx.transport
        scratch_region = self.scratch_region
        n_layers = self.layout.n_layers
        bt = self.layout.block_tokens
        ring = self.ring
        lb = self.layer_bytes
        offs: list[int] = []
        seqs: list[PrefillSeq] = []
        off = 0
        now = time.perf_counter()
        for c in chunks:
            t = c.turn
            offs.append(off)
            table = torch.arange(off, off + -(-c.end // bt), dtype=torch.int32)
            seqs.append(PrefillSeq(t.prompt[c.start : c.end], c.start, table))
            off += t.prompt_blocks
            if not c.final and t.pe_kv is None:  # room for the rows a later chunk attends to
                shape = (n_layers, -(-(t.prompt_len - 1) // bt), bt, self.layout.bytes_per_token_layer)
                t.pe_kv = torch.empty(shape, dtype=torch.uint8, device=self.device)
                self.chunk_bytes += t.pe_kv.numel()
            if c.first:
                t.timings.t_prefill_start = now
                t.prefill_started.set()
        total_blocks = off
        # only the final chunk of each request ships KV to its DE (then every row of the prompt is in the slot)
        final = [(c.turn, o) for c, o in zip(chunks, offs, strict=True) if c.final]
        ship_turns, ship_offs = [t for t, _ in final], [o for _, o in final]
        slot_free = [anyio.Event() for _ in range(ring)]
        for ev in slot_free:
            ev.set()
        exposed_upto = -1

        def expose(layer: int) -> None:
            slot = layer % ring
            for c, o in zip(chunks, offs, strict=True):
                t = c.turn
                if c.first and t.de_hit_blocks and t.error is None:
                    first = (slot * self.slot_blocks + o + t.pe_hit_blocks) * lb
                    transport.expose(t.tag("hit", layer), scratch_region, first, t.de_hit_blocks * lb,
                                     sender=f"de{t.de}")
                    t.exposed[layer].set()

        state = await self.model.prefill_begin(seqs)
        async with anyio.create_task_group() as ships:
            # on a GPU the PE-read hit is staged a layer ahead in pinned memory (gathers run in this group)
            cuda = self.device.type == "cuda"
            staged = cuda if self.stage_h2d is None else self.stage_h2d
            prefetch = LayerPrefetch(ships, pin=cuda) if staged else None
            if prefetch is not None:
                for c in chunks:
                    if c.first and c.turn.error is None:
                        prefetch.start(c.turn, 0)
            for layer in range(n_layers):
                for j in range(exposed_upto + 1, min(n_layers, layer + ring)):
                    await slot_free[j % ring].wait()
                    slot_free[j % ring] = anyio.Event()
                    expose(j)
                    exposed_upto = j
                slot = self.scratch[layer % ring]
                if cfg.layerwise:
                    await self._load_layer(chunks, offs, layer, prefetch)
                elif layer == 0:  # the 'basic' baseline: every layer's hit KV on the device first
                    for j in range(n_layers):
                        await self._load_layer(chunks, offs, j, prefetch)
                kv = self.layout.as_kv(slot[:total_blocks])
                fwd = self.model.prefill_layer(state, layer, kv)
                ep = getattr(cfg, "ep_bytes_per_token", 0)
                if ep:  # this layer's MoE all-to-all on the PE's CNIC (HIGH; fair-shared without isolation)
                    await self.ctx.links.collective(self.name, ep * sum(s.new for s in seqs) // n_layers, fwd,
                                                    isolated=cfg.traffic_isolation)
                else:
                    await fwd
                self._keep_layer(chunks, offs, layer, slot)
                ships.start_soon(self._ship_layer, ship_turns, ship_offs, layer, slot, slot_free[layer % ring])
        if prefetch is not None:
            self.h2d_staged += prefetch.gathered
        logits = await self.model.prefill_end(state)
        for i, c in enumerate(chunks):
            if c.turn.sampling is not None and c.turn.sampling.prompt_logprobs is not None and c.turn.error is None:
                await self._prompt_logprobs(state, i, c)
        done = time.perf_counter()
        for i, c in enumerate(chunks):
            t = c.turn
            if c.final and t.error is None:
                t.first_logits = logits[i].detach().to("cpu", torch.float32)
                t.timings.t_prefill_done = done
                t.prefill_done.set()

    async def _prompt_logprobs(self, state: Any, index: int, c: PrefillChunk) -> None:
        """Record the logprobs of prompt tokens ``c.start + 1 .. c.end`` (each predicted by the row before it) for
        chunk ``c``, sequence ``index`` of the forward; a request whose prompt is then incomplete fails."""
        t = c.turn
        assert t.sampling is not None and t.sampling.prompt_logprobs is not None
        stop = min(c.end, t.prompt_len - 1)  # (the last position predicts the first generated token)
        try:
            if len(t.prompt_lps) != c.start:
                raise ModelError(f"turn {t.rid}: prompt log-probabilities need every prompt position computed, but "
                                 f"positions before {c.start} were not (their KV was read, not recomputed)")
            for a in range(c.start, stop, 512):  # (a bounded [rows, vocab] at a time)
                b = min(stop, a + 512)
                rows = await self.model.logits_at(state, index, a - c.start, b - c.start)
                t.prompt_lps += rows_logprobs(rows, t.prompt[a + 1: b + 1], t.sampling.prompt_logprobs)
        except ModelError as exc:
            t.fail(exc)

    def _keep_layer(self, chunks: list[PrefillChunk], offs: list[int], layer: int, slot: torch.Tensor) -> None:
        """After layer ``layer`` of a chunk that is not its request's last, keep the request's rows ``[0, end)``
        of that layer (the hit and every chunk so far) in its device buffer for the later chunks."""
        bt = self.layout.block_tokens
        copied = False
        for c, o in zip(chunks, offs, strict=True):
            t = c.turn
            if c.final or t.error is not None or t.pe_kv is None:
                continue
            b0 = 0 if c.first else c.start // bt  # (earlier blocks are in the buffer already)
            b1 = -(-c.end // bt)
            t.pe_kv[layer, b0:b1].copy_(slot[o + b0 : o + b1], non_blocking=True)
            copied = True
        if copied and slot.device.type == "cuda":  # kept before the slot is reused for a later layer
            torch.cuda.current_stream(slot.device).synchronize()

    async def _load_layer(self, chunks: list[PrefillChunk], offs: list[int], layer: int,
                          prefetch: LayerPrefetch | None = None) -> None:
        """Bring layer ``layer``'s cached KV of every chunk into its scratch slot. A first chunk: H2D of the
        PE-read hit blocks, then the DE-streamed blocks' arrival (a failed or late arrival fails that turn only).
        A later chunk: the rows ``[0, start)`` its request's earlier chunks kept on the device."""
        assert self.scratch is not None
        bt = self.layout.block_tokens
        slot = self.scratch[layer % self.ring]
        for c, o in zip(chunks, offs, strict=True):
            t = c.turn
            if t.error is not None:
                continue
            if not c.first:
                if t.pe_kv is not None:
                    n = -(-c.start // bt)
                    slot[o : o + n].copy_(t.pe_kv[layer, :n], non_blocking=True)
            elif t.pe_hit_blocks:
                await h2d_layer(self.ctx.links, self.name, t, layer, slot[o : o + t.pe_hit_blocks], prefetch)
        for c in chunks:
            t = c.turn
            if c.first and t.error is None and t.de_hit_blocks:
                try:
                    await wait_arrival(t, self.ctx.transport, t.tag("hit", layer), self.cfg.deadline_s)
                except Exception as exc:
                    t.fail(exc)

    async def _ship_layer(
        self, batch: list[Turn], offs: list[int], layer: int, slot: torch.Tensor, free: anyio.Event
    ) -> None:
        """Write the rows each DE lacks for ``layer`` (PE CNIC out -> DE CNIC in), then free the slot."""
        bt = self.layout.block_tokens
        rows = slot.view(self.slot_blocks * bt, self.layout.bytes_per_token_layer)
        b = self.layout.bytes_per_token_layer
        try:
            async with anyio.create_task_group() as tg:
                for t, o in zip(batch, offs, strict=True):
                    if t.error is not None:
                        continue
                    for part, (s, e) in enumerate(t.ship_ranges()):
                        src = rows[o * bt + s : o * bt + e]
                        tg.start_soon(self._ship_one, t, layer, part, src, (e - s) * b)
        finally:
            free.set()

    async def _ship_one(self, t: Turn, layer: int, part: int, src: torch.Tensor, nbytes: int) -> None:
        de_name = f"de{t.de}"
        try:
            io = self.ctx.transport.write(de_name, t.tag("kv", layer, part), src, self.cfg.deadline_s)
            await self.ctx.links.send(self.name, de_name, t, nbytes, io)
        except Exception as exc:
            t.fail(unwrap(exc))
