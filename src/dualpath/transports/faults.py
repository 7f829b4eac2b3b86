"""A fault-injecting wrapper around any transport, for tests (seeded, so runs repeat).

Per write, in this order: a peer that is **cut off** never receives anything (the write fails with
:class:`PeerTimeout` at its deadline, the receiver's wait times out); a **dropped** write is lost the same way;
a **delayed** write waits ``delay_s`` first (within its deadline); a **corrupted** write sends a copy of the
source with one byte flipped together with the original's checksum, so a receiver with ``checksum`` on
rejects it and both sides see :class:`TransportError` (with checksums off, the corrupt bytes land: that is
what the checksum option is for). Everything else is delegated to the wrapped transport.
"""

from __future__ import annotations

import random

import anyio
import torch

from dualpath.errors import PeerTimeout
from dualpath.transports.base import Region, Transport, byte_view
from dualpath.transports.config import FaultsTransportConfig
from dualpath.transports.wire import checksum_of


class FaultyTransport(Transport):
    kind = "faults"

    def __init__(self, inner: Transport, config: FaultsTransportConfig | None = None) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.config = config or FaultsTransportConfig()
        self.rng = random.Random(self.config.seed)
        self.cut_peers: set[str] = set(self.config.cut_peers)
        self.drop_rate = self.config.drop_rate
        self.corrupt_rate = self.config.corrupt_rate
        self.delay_s = self.config.delay_s
        self.injected = {"cut": 0, "drop": 0, "delay": 0, "corrupt": 0}
        self.stats = inner.stats
        self.checksum = inner.checksum

    def cut(self, peer: str) -> None:
        self.cut_peers.add(peer)

    def heal(self, peer: str) -> None:
        self.cut_peers.discard(peer)

    @property
    def address(self) -> str:
        return self.inner.address

    async def start(self) -> None:
        await self.inner.start()
        await super().start()

    async def close(self) -> None:
        await super().close()
        await self.inner.close()

    def register(self, buf: torch.Tensor) -> Region:
        return self.inner.register(buf)

    def deregister(self, region: Region) -> None:
        self.inner.deregister(region)

    def find_region(self, t: torch.Tensor) -> Region | None:
        return self.inner.find_region(t)

    def expose(self, tag: str, region: Region, offset: int, nbytes: int, *, sender: str | None = None) -> None:
        self.inner.expose(tag, region, offset, nbytes, sender=sender)

    async def wait(self, tag: str, timeout: float) -> None:
        await self.inner.wait(tag, timeout)

    def cancel(self, tag: str) -> None:
        self.inner.cancel(tag)

    async def settle(self) -> None:
        await self.inner.settle()

    async def connect(self, peer: str, address: str) -> None:
        await self.inner.connect(peer, address)

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        self._check_open()
        lost = None
        if peer in self.cut_peers:
            lost = "cut"
        elif self.drop_rate and self.rng.random() < self.drop_rate:
            lost = "drop"
        corrupt = bool(self.corrupt_rate) and self.rng.random() < self.corrupt_rate
        if lost is not None:
            self.injected[lost] += 1

            async def black_hole() -> None:
                await anyio.sleep_forever()

            try:
                await self._guarded(f"write of {tag!r} to {peer!r}", timeout, black_hole)
            except PeerTimeout as exc:
                raise PeerTimeout(f"{exc} [faults: {lost}]") from None
            return
        start = anyio.current_time()
        if self.delay_s:
            self.injected["delay"] += 1
            if self.delay_s >= timeout:
                await anyio.sleep(timeout)
                raise PeerTimeout(f"{self.name}: write of {tag!r} to {peer!r} not delivered within {timeout:g} s "
                                  "[faults: delay]")
            await anyio.sleep(self.delay_s)
        left = max(0.0, timeout - (anyio.current_time() - start))
        if corrupt:
            self.injected["corrupt"] += 1
            data = byte_view(src)
            original = checksum if checksum is not None else checksum_of(data)
            bad = data.clone()
            i = self.rng.randrange(bad.numel())
            bad[i] ^= 0xFF
            # backends that write from registered memory (nixl) get the corrupt copy registered for this write
            temp = self.inner.register(bad) if self.inner.find_region(data) is not None else None
            try:
                await self.inner.write(peer, tag, bad, left, checksum=original)
            finally:
                if temp is not None:
                    self.inner.deregister(temp)
            return
        await self.inner.write(peer, tag, src, left, checksum=checksum)
