"""The PE read path (paper section 3.2, Fig. 4a): storage -> PE node SNIC -> PE buffer -> (per layer) H2D.

Steps done here: (1-2) read the request's PE-side hit Full Blocks into the PE host buffer, charging the PE
node's storage NIC; (3-4) per layer, copy that layer's Layer Blocks into the PE's one-layer scratch cache on
the device, charging the PE's compute NIC (``in``: the CNIC-assisted H2D). Steps 5-7 (shipping the layer's
full KV to the DE) are the prefill engine's (:mod:`dualpath.engine.prefill`).
"""

from __future__ import annotations

import anyio
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


async def h2d_layer(links: LinkSet, engine: str, turn: Turn, layer: int, dst: torch.Tensor) -> None:
    """Copy layer ``layer`` of the PE-read hit blocks into ``dst`` (uint8 ``[pe_hit_blocks, bt, bytes]`` on the
    device), charging ``cnic.in``."""
    n = turn.pe_hit_blocks
    if n == 0:
        return
    src = pe_host_blocks(turn)[:n, layer]
    await links.h2d(engine, turn, n * turn.layout.layer_block_bytes)
    dst.copy_(src, non_blocking=dst.device.type == "cuda")
