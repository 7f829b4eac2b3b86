"""The prefill engine: PE-side reads and layer-wise prefill over batches of requests (see engine/base.py)."""

from __future__ import annotations

import logging
import time
from collections import deque

import anyio
import torch

from dualpath.engine.base import Engine, EngineContext
from dualpath.engine.model_api import PrefillSeq
from dualpath.engine.request import Turn, unwrap
from dualpath.errors import EngineError
from dualpath.paths.pe_read import h2d_layer, pe_read
from dualpath.scheduler.batching import PendingPrefill, pack_forward_batch
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
        self.scratch: torch.Tensor | None = None
        self.scratch_region: Region | None = None
        self.queue: deque[Turn] = deque()
        self._wake = anyio.Event()
        self.forwards = 0
        self._inflight: list[Turn] = []  # the batch of the forward in progress

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
        if need > self.slot_blocks - 1:
            raise EngineError(
                f"{self.name}: a prompt of {prompt_tokens} tokens needs {need} blocks of one-layer scratch but the "
                f"prefill engine holds {self.slot_blocks - 1} (raise cluster.prefill_max_batch_tokens)"
            )

    # --- PE read path ------------------------------------------------------------------------------------
    async def read(self, turn: Turn) -> int:
        return await pe_read(self.ctx.storage, self.ctx.links, self.name, self.host, turn, self.cfg.deadline_s)

    def release(self, turn: Turn) -> None:
        if turn.pe_host is not None:
            self.host.free(turn.pe_host)
            turn.pe_host = None

    # --- queue -------------------------------------------------------------------------------------------
    def assign(self, turn: Turn) -> None:
        self.seq += 1
        self.tok += turn.prompt_len

    def unassign(self, turn: Turn) -> None:
        self.seq -= 1
        self.tok -= turn.prompt_len

    def submit(self, turn: Turn) -> None:
        self.queue.append(turn)
        self._wake.set()

    def _take_batch(self) -> list[Turn]:
        """The next forward batch: whole requests, FIFO, within the scratch size, ``prefill_max_batch(_tokens)``
        and, when ``prefill_quota_s`` is set and the model can predict its time, the compute quota (paper 7.5,
        via :func:`~dualpath.scheduler.batching.pack_forward_batch`). A request the quota would cut is not
        chunked here: it waits for the next batch, or runs alone if it heads the queue (the simulator applies
        chunked prefill; the runtime keeps each request's prefill in one forward)."""
        batch: list[Turn] = []
        blocks = 0
        new_tokens = 0
        while self.queue and len(batch) < self.cfg.prefill_max_batch:
            t = self.queue[0]
            if t.error is not None:
                self.queue.popleft()
                t.pe_released.set()
                continue
            nb = t.prompt_blocks
            if batch and (blocks + nb > self.slot_blocks
                          or new_tokens + t.prompt_len - t.hit_tokens > self.cfg.prefill_max_batch_tokens
                          or not self._within_quota(batch, t)):
                break
            batch.append(self.queue.popleft())
            blocks += nb
            new_tokens += t.prompt_len - t.hit_tokens
        return batch

    def _within_quota(self, batch: list[Turn], t: Turn) -> bool:
        quota = self.cfg.prefill_quota_s
        if quota is None:
            return True
        predict = self.model.predict_prefill_s
        if predict(0, 1) is None:
            return True
        pending = [PendingPrefill(i, x.hit_tokens, x.prompt_len - x.hit_tokens) for i, x in enumerate([*batch, t])]
        fb = pack_forward_batch(pending, quota, lambda cached, new: predict(cached, new) or 0.0)
        return len(fb.chunks) == len(pending) and fb.chunks[-1].new == pending[-1].remaining

    async def run(self) -> None:
        while True:
            if not self.queue:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            batch = self._take_batch()
            if not batch:
                continue
            self._inflight = batch
            try:
                await self._forward(batch)
            except Exception as exc:  # a model error fails the batch, not the engine
                log.exception("%s: forward failed", self.name)
                for t in batch:
                    t.fail(exc)
            finally:
                for t in batch:
                    self.release(t)
                    t.pe_released.set()
                self.forwards += 1
                self._inflight = []

    # --- layer-wise forward ------------------------------------------------------------------------------
    async def _forward(self, batch: list[Turn]) -> None:
        assert self.scratch is not None and self.scratch_region is not None
        cfg = self.cfg
        transport = self.ctx.transport
        scratch_region = self.scratch_region
        n_layers = self.layout.n_layers
        ring = self.ring
        lb = self.layer_bytes
        offs: list[int] = []
        seqs: list[PrefillSeq] = []
        off = 0
        now = time.perf_counter()
        for t in batch:
            offs.append(off)
            table = torch.arange(off, off + t.prompt_blocks, dtype=torch.int32)
            seqs.append(PrefillSeq(t.prompt[t.hit_tokens :], t.hit_tokens, table))
            off += t.prompt_blocks
            t.timings.t_prefill_start = now
            t.prefill_started.set()
        total_blocks = off
        slot_free = [anyio.Event() for _ in range(ring)]
        for ev in slot_free:
            ev.set()
        exposed_upto = -1

        def expose(layer: int) -> None:
            slot = layer % ring
            for t, o in zip(batch, offs, strict=True):
                if t.de_hit_blocks and t.error is None:
                    first = (slot * self.slot_blocks + o + t.pe_hit_blocks) * lb
                    transport.expose(t.tag("hit", layer), scratch_region, first, t.de_hit_blocks * lb)
                    t.exposed[layer].set()

        state = await self.model.prefill_begin(seqs)
        async with anyio.create_task_group() as ships:
            for layer in range(n_layers):
                for j in range(exposed_upto + 1, min(n_layers, layer + ring)):
                    await slot_free[j % ring].wait()
                    slot_free[j % ring] = anyio.Event()
                    expose(j)
                    exposed_upto = j
                slot = self.scratch[layer % ring]
                if cfg.layerwise:
                    await self._load_layer(batch, offs, layer)
                elif layer == 0:  # the 'basic' baseline: every layer's hit KV on the device first
                    for j in range(n_layers):
                        await self._load_layer(batch, offs, j)
                kv = self.layout.as_kv(slot[:total_blocks])
                fwd = self.model.prefill_layer(state, layer, kv)
                ep = getattr(cfg, "ep_bytes_per_token", 0)
                if ep:  # this layer's MoE all-to-all on the PE's CNIC (HIGH; fair-shared without isolation)
                    await self.ctx.links.collective(self.name, ep * sum(s.new for s in seqs) // n_layers, fwd,
                                                    isolated=cfg.traffic_isolation)
                else:
                    await fwd
                ships.start_soon(self._ship_layer, batch, offs, layer, slot, slot_free[layer % ring])
        logits = await self.model.prefill_end(state)
        done = time.perf_counter()
        for i, t in enumerate(batch):
            if t.error is None:
                t.first_logits = logits[i].detach().to("cpu", torch.float32)
                t.timings.t_prefill_done = done
                t.prefill_done.set()

    async def _load_layer(self, batch: list[Turn], offs: list[int], layer: int) -> None:
        """Bring layer ``layer``'s hit KV of every turn into its scratch slot: H2D of the PE-read blocks, then
        the DE-streamed blocks' arrival (a failed or late arrival fails that turn only)."""
        assert self.scratch is not None
        slot = self.scratch[layer % self.ring]
        for t, o in zip(batch, offs, strict=True):
            if t.error is None and t.pe_hit_blocks:
                await h2d_layer(self.ctx.links, self.name, t, layer, slot[o : o + t.pe_hit_blocks])
        for t in batch:
            if t.error is None and t.de_hit_blocks:
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
