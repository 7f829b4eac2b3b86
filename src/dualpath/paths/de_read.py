"""The DE read path (paper section 3.3, Fig. 4b): storage -> DE node SNIC -> DE buffer -> (per layer, a bounded
number of layers ahead) DE CNIC -> PE CNIC -> PE scratch.

Steps done here: (1-2) read the request's DE-side hit Full Blocks into the DE host buffer, charging the DE
node's storage NIC; (3-5) for each layer, once the PE has exposed that layer's landing (the PE exposes at most
``layers_ahead`` layers beyond the one it computes, which bounds both the stream and the PE's memory), gather
the layer's Layer Blocks (one contiguous message: doorbell batching) and write them to the PE, charging DE
``cnic.out`` and PE ``cnic.in``. The miss return (PE -> DE) is the prefill engine's ship.
"""

from __future__ import annotations

import anyio
import torch

from dualpath.engine.host_buffer import HostBuffer
from dualpath.engine.links import LinkSet
from dualpath.engine.request import Turn, wait_event
from dualpath.paths.pe_read import read_blocks
from dualpath.storage.base import Storage
from dualpath.transports.base import Transport


def de_blocks_planned(turn: Turn) -> int:
    return turn.stored_blocks - turn.pe_blocks


async def de_read(
    storage: Storage, links: LinkSet, engine: str, host: HostBuffer, turn: Turn, deadline_s: float
) -> int:
    """DE-side read of blocks ``[pe_blocks, stored_blocks)`` into a DE host region (``turn.de_host``)."""
    n = de_blocks_planned(turn)
    if n <= 0:
        return 0
    layout = turn.layout
    region = await host.alloc(n * layout.full_block_bytes, deadline_s)
    turn.de_host = region
    fb = region.data.view(n, *layout.full_block_shape)
    return await read_blocks(storage, links, engine, turn, turn.pe_blocks, n, fb, deadline_s)


def de_host_blocks(turn: Turn) -> torch.Tensor:
    """The DE-read hit blocks of ``turn`` as Full Blocks ``[n, L, bt, bytes]`` (block ``pe_blocks`` first)."""
    return turn.de_host.data.view(de_blocks_planned(turn), *turn.layout.full_block_shape)


_INLINE_GATHER_BYTES = 1 << 20


async def _gather(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy strided Layer Blocks into a contiguous staging slot (large copies in a worker thread)."""
    if dst.numel() <= _INLINE_GATHER_BYTES:
        dst.copy_(src)
    else:
        await anyio.to_thread.run_sync(dst.copy_, src)


async def stream_layers(
    transport: Transport,
    links: LinkSet,
    host: HostBuffer,
    de_name: str,
    pe_name: str,
    turn: Turn,
    deadline_s: float,
) -> None:
    """Send each layer of the usable DE-read hit blocks to the PE, as the PE exposes landings for them.

    A layer's Layer Blocks are strided in the Full Block buffer; they are gathered into one of two staging
    slots of the (pinned, registered) DE buffer, the next layer's gather overlapping the current layer's
    write, so the stream keeps ahead of the PE's compute."""
    n = turn.de_hit_blocks
    if n == 0:
        return
    layout = turn.layout
    fb = de_host_blocks(turn)[:n]
    nbytes = n * layout.layer_block_bytes
    region = await host.alloc(2 * nbytes, deadline_s)
    try:
        slots = [region.data[i * nbytes : (i + 1) * nbytes].view(n, layout.block_tokens, -1) for i in range(2)]
        await _gather(slots[0], fb[:, 0])
        for layer in range(layout.n_layers):
            await wait_event(turn, turn.exposed[layer], deadline_s, f"PE landing of layer {layer}")
            io = transport.write(pe_name, turn.tag("hit", layer), slots[layer % 2], deadline_s)
            async with anyio.create_task_group() as tg:
                if layer + 1 < layout.n_layers:
                    tg.start_soon(_gather, slots[(layer + 1) % 2], fb[:, layer + 1])
                await links.send(de_name, pe_name, turn, nbytes, io)
    finally:
        host.free(region)
