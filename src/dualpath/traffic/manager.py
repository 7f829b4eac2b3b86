"""Per-engine traffic manager: charges every byte an engine moves to the links it crosses.

The paper's CNIC-centric rule: storage I/O crosses the node's storage NIC (SNIC, shared by the engines of a
node); every byte into or out of the engine's device (host-to-device and device-to-host copies included, and
transfers to other engines) crosses the engine's compute NIC (CNIC), per direction. The real I/O runs
concurrently with the link emulation; an operation completes when both have. The node's storage read queue
(bytes and tokens of reads in flight) lives on the SNIC read link, so every engine of the node sees it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio

from dualpath.traffic.link import Link
from dualpath.types import TrafficClass

T = TypeVar("T")


async def _charged(io: Awaitable[T] | None, charges: list[tuple[Link, int, TrafficClass, int, bool]]) -> T | None:
    """Run ``io`` while every ``(link, nbytes, cls, tokens, track)`` transfer runs; result of ``io``."""
    result: T | None = None
    error: BaseException | None = None
    async with anyio.create_task_group() as tg:
        for link, nbytes, cls, tokens, track in charges:
            tg.start_soon(_transfer, link, nbytes, cls, tokens, track)
        if io is not None:
            try:
                result = await io
            except Exception as exc:  # stop the emulation, re-raise the I/O's own error (not a group)
                error = exc
                tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


async def _transfer(link: Link, nbytes: int, cls: TrafficClass, tokens: int, track: bool) -> None:
    await link.transfer(nbytes, cls, tokens=tokens, track=track)


class TrafficManager:
    """One per engine. ``snic`` is the node's storage NIC read direction (shared by its engines), ``snic_out``
    its write direction (default: the same link, a half-duplex model); ``cnic_in``/``cnic_out`` are this
    engine's compute NIC directions (into / out of the device)."""

    def __init__(self, engine: str, snic: Link, cnic_in: Link, cnic_out: Link, *, snic_out: Link | None = None) -> None:
        self.engine = engine
        self.snic = snic
        self.snic_out = snic if snic_out is None else snic_out
        self.cnic_in = cnic_in
        self.cnic_out = cnic_out

    async def storage_read(self, nbytes: int, tokens: int, io: Awaitable[T] | None = None) -> T | None:
        """Charge a storage read of ``nbytes`` (``tokens`` tokens) to the SNIC; counted in the node's read
        queue until both the real I/O ``io`` and the emulated transfer are done. Returns ``io``'s result."""
        with self.snic.track(nbytes, tokens):
            return await _charged(io, [(self.snic, nbytes, TrafficClass.KV, tokens, False)])

    async def storage_write(self, nbytes: int, io: Awaitable[T] | None = None) -> T | None:
        """Charge a storage write (host DRAM -> storage) to the SNIC's write direction."""
        return await _charged(io, [(self.snic_out, nbytes, TrafficClass.KV, 0, True)])

    async def h2d(self, nbytes: int, io: Awaitable[T] | None = None, cls: TrafficClass = TrafficClass.KV) -> T | None:
        """Host to device: through this engine's CNIC (inbound), as the paper routes local copies."""
        return await _charged(io, [(self.cnic_in, nbytes, cls, 0, True)])

    async def d2h(self, nbytes: int, io: Awaitable[T] | None = None, cls: TrafficClass = TrafficClass.KV) -> T | None:
        """Device to host: through this engine's CNIC (outbound)."""
        return await _charged(io, [(self.cnic_out, nbytes, cls, 0, True)])

    async def send(self, dst: TrafficManager, nbytes: int, cls: TrafficClass = TrafficClass.KV,
                   io: Awaitable[T] | None = None) -> T | None:
        """To another engine: this CNIC out and ``dst``'s CNIC in, concurrently (with the real transfer ``io``)."""
        return await _charged(io, [(self.cnic_out, nbytes, cls, 0, True), (dst.cnic_in, nbytes, cls, 0, True)])

    async def collective(self, nbytes: int, io: Awaitable[T] | None = None, *, isolated: bool = True) -> T | None:
        """Model-execution traffic of a forward (the MoE all-to-all: ``nbytes`` out of and into this engine's
        device over its CNIC, concurrently with the forward ``io``): the HIGH class, ahead of KV (paper 5.1).
        ``isolated=False`` (no traffic manager) sends it as ordinary traffic, sharing the links fairly with KV;
        the forward then waits for its all-to-all as long as KV transfers slow it down."""
        cls = TrafficClass.HIGH if isolated else TrafficClass.KV
        return await _charged(io, [(self.cnic_out, nbytes, cls, 0, True), (self.cnic_in, nbytes, cls, 0, True)])

    def read_queue(self) -> tuple[int, int]:
        """(bytes, tokens) of storage reads in flight on this engine's node."""
        return self.snic.queued_bytes, self.snic.queued_tokens

    def counters(self) -> dict[str, Any]:
        links = {"snic_in": self.snic, "snic_out": self.snic_out, "cnic_in": self.cnic_in, "cnic_out": self.cnic_out}
        return {k: {"link": v.name, **v.stats.as_dict()} for k, v in links.items()}
