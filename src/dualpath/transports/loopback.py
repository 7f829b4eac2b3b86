"""In-process transport: ``copy_`` from the sender's tensor into the receiver's exposed slot.

Endpoints meet in a :class:`LoopbackFabric` (a name -> endpoint table; one default per process). Between two
GPUs the copy is a device-to-device ``copy_`` (NVLink/P2P); on a CPU box it is a memcpy. Early writes are held
at the sender (no extra memory) until the receiver exposes the tag or ``pending_timeout_s`` passes.
"""

from __future__ import annotations

import anyio
import torch

from dualpath.errors import TransportError
from dualpath.transports.base import Transport
from dualpath.transports.landing import Rejected
from dualpath.transports.wire import checksum_of


class LoopbackFabric:
    """Where loopback endpoints of one process find each other by name."""

    def __init__(self) -> None:
        self.endpoints: dict[str, LoopbackTransport] = {}

    def add(self, ep: LoopbackTransport) -> None:
        old = self.endpoints.get(ep.name)
        if old is not None and old is not ep and not old._closed:
            raise TransportError(f"loopback endpoint name {ep.name!r} is already in use on this fabric")
        self.endpoints[ep.name] = ep

    def remove(self, ep: LoopbackTransport) -> None:
        if self.endpoints.get(ep.name) is ep:
            del self.endpoints[ep.name]


DEFAULT_FABRIC = LoopbackFabric()
_copy_limiter: anyio.CapacityLimiter | None = None


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()


def device_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Blocking copy of bytes between any two devices; returns when the bytes are in ``dst``."""
    if not (dst.is_cuda or src.is_cuda):  # host to host: a memcpy
        dst.copy_(src)
        return
    dst.copy_(src, non_blocking=dst.is_cuda and src.is_cuda)
    _sync(dst)
    if src.device != dst.device:
        _sync(src)


async def copy_bytes(dst: torch.Tensor, src: torch.Tensor, inline_bytes: int) -> None:
    """:func:`device_copy`, on the event loop when small, in a worker thread otherwise."""
    global _copy_limiter
    if dst.numel() <= inline_bytes:
        device_copy(dst, src)
        return
    if _copy_limiter is None:
        _copy_limiter = anyio.CapacityLimiter(4)
    await anyio.to_thread.run_sync(device_copy, dst, src, limiter=_copy_limiter)


class LoopbackTransport(Transport):
    kind = "loopback"

    def __init__(self, name: str, *, fabric: LoopbackFabric | None = None, inline_copy_bytes: int = 4 << 20,
                 **common: object) -> None:
        super().__init__(name, **common)  # type: ignore[arg-type]
        self.fabric = DEFAULT_FABRIC if fabric is None else fabric
        self.inline_copy_bytes = inline_copy_bytes
        self._peers: dict[str, str] = {}

    @property
    def address(self) -> str:
        return self.name

    async def start(self) -> None:
        self._check_open()
        self.fabric.add(self)
        await super().start()

    async def close(self) -> None:
        self.fabric.remove(self)
        await super().close()

    async def connect(self, peer: str, address: str) -> None:
        self._check_open()
        self._peers[peer] = address

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        _, data = self._prepare_write(tag, src)
        address = self._peers.get(peer)
        if address is None:
            raise TransportError(f"{self.name}: peer {peer!r} is not connected (call connect first)")
        nbytes = data.numel()
        if checksum is None and nbytes <= self.inline_copy_bytes:
            # fast path: the landing is exposed, the copy is small: done without suspending
            ep = self.fabric.endpoints.get(address)
            if ep is not None and not ep._closed:
                try:
                    slot = ep._landings.claim(tag, nbytes)
                except Rejected as exc:
                    ep._landings.reject(self.name, str(exc))
                    ep.stats.rejected += 1
                    raise
                if slot is not None:
                    try:
                        device_copy(slot.view, data)
                    except Exception as exc:
                        ep._landings.finish(slot, TransportError(f"{ep.name}: copy failed: {exc!r}"))
                        raise TransportError(f"{self.name}: copy into {peer!r} failed: {exc!r}") from exc
                    ep._landings.finish(slot)
                    ep.stats.arrivals += 1
                    ep.stats.bytes_received += nbytes
                    self.stats.writes += 1
                    self.stats.bytes_sent += nbytes
                    return

        async def deliver() -> None:
            ep = self.fabric.endpoints.get(address)
            if ep is None or ep._closed:
                raise TransportError(f"{self.name}: peer {peer!r} at {address!r} is not running")
            landings = ep._landings
            try:
                slot = await landings.claim_wait(tag, data.numel())
            except Rejected as exc:
                landings.reject(self.name, str(exc))
                ep.stats.rejected += 1
                raise
            try:
                if ep.checksum:
                    expect = checksum if checksum is not None else None
                    if expect is not None and checksum_of(data) != expect:
                        raise Rejected(f"{ep.name}: checksum mismatch for tag {tag!r}; arrival discarded")
                await copy_bytes(slot.view, data, self.inline_copy_bytes)
            except BaseException as exc:
                err = exc if isinstance(exc, TransportError) else TransportError(f"{ep.name}: copy failed: {exc!r}")
                if isinstance(exc, Rejected):
                    landings.reject(self.name, str(exc))
                landings.finish(slot, err)
                raise
            landings.finish(slot)
            ep.stats.arrivals += 1
            ep.stats.bytes_received += data.numel()

        await self._guarded(f"write of {tag!r} to {peer!r}", timeout, deliver)
        self.stats.writes += 1
        self.stats.bytes_sent += data.numel()
