"""The PE read path (paper section 3.2, Fig. 4a): storage -> PE node SNIC -> PE buffer -> (per layer) H2D.

Steps done here: (1-2) read the request's PE-side hit Full Blocks into the PE host buffer, charging the PE
node's storage NIC; (3-4) per layer, copy that layer's Layer Blocks into the PE's one-layer scratch cache on
the device, charging the PE's compute NIC (``in``: the CNIC-assisted H2D). Steps 5-7 (shipping the layer's
full KV to the DE) are the prefill engine's (:mod:`dualpath.engine.prefill`).
"""

from __future__ import annotations

import anyio
import anyio.abc
import torch

from dualpath.engine.host_buffer import HostBuffer
from dualpath.engine.links import LinkSet
from dualpath.engine.request import Turn
from dualpath.storage.base import BlockStatus, Storage


def leading_ok(statuses: list[BlockStatus]) -> int:
    """Number of leading blocks read correctly (a missing/corrupt/failed block ends the usable prefix)."""
    n = 0
    for s in statuses:
        if s is not BlockStatus.OK:
            break
        n += 1
    return n


async def read_blocks(
    storage: Storage,
    links: LinkSet,
    engine: str,
    turn: Turn,
    first: int,
    count: int,
    into: torch.Tensor,
    deadline_s: float,
) -> int:
    """Read blocks ``[first, first + count)`` of ``turn`` into ``into`` through ``engine``'s node SNIC;
    returns how many leading blocks are usable. A read that passes ``deadline_s`` counts as failed (0)."""
    if count == 0:
        return 0
    keys = turn.keys[first : first + count]
    statuses: list[BlockStatus] | None = None
    with anyio.move_on_after(deadline_s):
        statuses = await links.storage_read(
            engine, turn, count * turn.layout.full_block_bytes, count * turn.bt, storage.read(keys, into)
        )
    return leading_ok(statuses) if statuses is not None and len(statuses) == count else 0


async def pe_read(
    storage: Storage, links: LinkSet, engine: str, host: HostBuffer, turn: Turn, deadline_s: float
) -> int:
    """PE-side read of blocks ``[0, pe_blocks)`` into a PE host region (kept in ``turn.pe_host``)."""
    n = turn.pe_blocks
    if n == 0:
        return 0
    layout = turn.layout
    region = await host.alloc(n * layout.full_block_bytes, deadline_s)
    turn.pe_host = region
    fb = region.data.view(n, *layout.full_block_shape)
    return await read_blocks(storage, links, engine, turn, 0, n, fb, deadline_s)


def pe_host_blocks(turn: Turn) -> torch.Tensor:
    """The PE host region of ``turn`` as Full Blocks ``[pe_blocks, L, bt, bytes]``."""
    return turn.pe_host.data.view(turn.pe_blocks, *turn.layout.full_block_shape)


def _gather_pinned(src: torch.Tensor, pin: bool) -> torch.Tensor:
    """``src`` (strided Layer Blocks of the host buffer) copied into a fresh contiguous tensor, pinned if ``pin``
    (from torch's caching host allocator: a block handed to an asynchronous copy is not reused before that copy
    ends, so the tensor may be dropped right after the copy is queued)."""
    out = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
    out.copy_(src)
    return out


class _Gather:
    __slots__ = ("done", "error", "out")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.out: torch.Tensor | None = None
        self.error: BaseException | None = None


class LayerPrefetch:
    """Layer-ahead staging of the PE-read hit for a GPU: while layer ``i`` computes, a worker thread gathers layer
    ``i + 1``'s Layer Blocks (strided in the Full Block buffer) into a contiguous pinned tensor, so the layer's H2D
    is one asynchronous copy from pinned memory instead of a synchronous gather into pageable memory (which torch
    does for a strided host source, holding the event loop and leaving the GPU idle).

    Gathers run in ``tg`` (the forward's task group, which waits for any still running when the forward ends);
    ``pin`` is whether to pin (``True`` for a CUDA destination; the tests use ``False`` on CPU)."""

    def __init__(self, tg: anyio.abc.TaskGroup, pin: bool = True) -> None:
        self._tg = tg
        self._pin = pin
        self._jobs: dict[tuple[int, int], _Gather] = {}
        self.gathered = 0  # layers staged (a test's witness that the staged path ran)

    def start(self, turn: Turn, layer: int) -> None:
        """Begin gathering ``layer`` of ``turn``'s PE-read hit (no-op past the last layer or if begun)."""
        key = (id(turn), layer)
        if layer >= turn.layout.n_layers or key in self._jobs or turn.pe_hit_blocks == 0:
            return
        job = self._jobs[key] = _Gather()
        src = pe_host_blocks(turn)[: turn.pe_hit_blocks, layer]
        self._tg.start_soon(self._gather, src, job)

    async def _gather(self, src: torch.Tensor, job: _Gather) -> None:
        try:
            job.out = await anyio.to_thread.run_sync(_gather_pinned, src, self._pin)
        except BaseException as exc:  # the taker raises it (the forward's other turns go on)
            job.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            job.done.set()

    async def take(self, turn: Turn, layer: int) -> torch.Tensor:
        """``layer``'s staged Layer Blocks (gathered now if not begun); begins the next layer's gather."""
        key = (id(turn), layer)
        if key not in self._jobs:
            self.start(turn, layer)
        job = self._jobs.pop(key)
        self.start(turn, layer + 1)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.out is not None
        self.gathered += 1
        return job.out


async def h2d_layer(links: LinkSet, engine: str, turn: Turn, layer: int, dst: torch.Tensor,
                    prefetch: LayerPrefetch | None = None) -> None:
    """Copy layer ``layer`` of the PE-read hit blocks into ``dst`` (uint8 ``[pe_hit_blocks, bt, bytes]`` on the
    device), charging ``cnic.in``. With ``prefetch`` (the engine passes one on a GPU) the layer comes staged in
    pinned memory and the next layer's gather starts; without, the strided host view is copied directly."""
    n = turn.pe_hit_blocks
    if n == 0:
        return
    if prefetch is not None:
        src = await prefetch.take(turn, layer)
    else:
        src = pe_host_blocks(turn)[:n, layer]
    await links.h2d(engine, turn, n * turn.layout.layer_block_bytes)
    dst.copy_(src, non_blocking=dst.device.type == "cuda")
