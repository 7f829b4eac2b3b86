"""The PE/DE host buffer: one preallocated DRAM arena per engine, carved into regions per request.

The arena is allocated once (pinned when CUDA is present) so a transport can register it once; a region is a
contiguous uint8 view. ``alloc`` waits (with a deadline) while the arena is full and raises
:class:`~dualpath.errors.EngineError` at once when a request can never fit.

A freed region that a storage read abandoned at its deadline may still be written by a system call stuck in the
kernel (:mod:`dualpath.storage.latewrites`): ``free`` then quarantines it, and it returns to the free list only
once that call has returned, so late bytes never land in another request's region.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import anyio
import torch

from dualpath.errors import CapacityError, EngineError, PeerTimeout
from dualpath.storage.latewrites import LATE_WRITES

_ALIGN = 64
_QUARANTINE_POLL_S = 0.05  # how often a waiting ``alloc`` looks whether a quarantined region came free


@dataclass(frozen=True)
class HostRegion:
    offset: int
    nbytes: int
    data: torch.Tensor  # uint8 [nbytes] view of the arena


def tokens_that_fit(capacity_bytes: int, full_block_bytes: int, block_tokens: int) -> int:
    """The longest prompt whose KV (whole Full Blocks) a host buffer of ``capacity_bytes`` holds in one region: what
    bounds a turn on an engine, whose prompt KV passes through its host buffer on either read path."""
    return (int(capacity_bytes) // full_block_bytes) * block_tokens


class HostBuffer:
    """First-fit allocator over one DRAM arena of ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, name: str = "host buffer") -> None:
        if capacity_bytes <= 0:
            raise EngineError(f"{name}: capacity must be positive, got {capacity_bytes}")
        self.name = name
        # (whole alignment units: a region is rounded up to one, so a request of up to the capacity always fits)
        self.capacity = math.ceil(int(capacity_bytes) / _ALIGN) * _ALIGN
        buf = torch.empty(self.capacity, dtype=torch.uint8)
        if torch.cuda.is_available():
            with contextlib.suppress(RuntimeError):  # pinning can fail on small hosts
                buf = buf.pin_memory()
        self.data = buf
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # sorted (offset, size)
        self._used = 0
        self._changed = anyio.Event()
        self._base = buf.data_ptr()
        self._quarantined: list[HostRegion] = []  # freed, but a stuck read may still write into them
        self._live: dict[int, int] = {}  # offset -> size of the regions handed out and not freed

    @property
    def used_bytes(self) -> int:
        return self._used

    def tokens_that_fit(self, full_block_bytes: int, block_tokens: int) -> int:
        """:func:`tokens_that_fit` of this buffer."""
        return tokens_that_fit(self.capacity, full_block_bytes, block_tokens)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self._used

    @property
    def quarantined_bytes(self) -> int:
        """Bytes freed but held back because a storage read stuck in the kernel may still write there."""
        self._reap()
        return sum(r.nbytes for r in self._quarantined)

    def _reap(self) -> None:
        """Put back the quarantined regions whose late writer has returned."""
        if not self._quarantined:
            return
        keep = []
        for region in self._quarantined:
            if LATE_WRITES.busy(self._base + region.offset, region.nbytes):
                keep.append(region)
            else:
                self._release(region)
        self._quarantined = keep

    def _try_alloc(self, nbytes: int) -> HostRegion | None:
        size = max(_ALIGN, math.ceil(nbytes / _ALIGN) * _ALIGN)
        for i, (off, sz) in enumerate(self._free):
            if sz >= size:
                if sz == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, sz - size)
                self._used += size
                self._live[off] = size
                return HostRegion(off, size, self.data[off : off + nbytes])
        return None

    async def alloc(self, nbytes: int, deadline_s: float) -> HostRegion:
        """A region of at least ``nbytes``; waits up to ``deadline_s`` for space."""
        if nbytes > self.capacity:
            raise CapacityError(
                f"{self.name}: a request needs {nbytes} bytes but the buffer holds {self.capacity} "
                "(raise cluster.host_buffer_bytes)"
            )
        with anyio.move_on_after(deadline_s) as scope:
            while True:
                self._reap()
                region = self._try_alloc(max(nbytes, 1))
                if region is not None:
                    return region
                event = self._changed
                if self._quarantined:  # a late writer's return sets no event: look again shortly
                    with anyio.move_on_after(_QUARANTINE_POLL_S):
                        await event.wait()
                else:
                    await event.wait()
        assert scope.cancelled_caught
        raise PeerTimeout(f"{self.name}: no room for {nbytes} bytes within {deadline_s}s ({self._used} in use)")

    def free(self, region: HostRegion) -> None:
        """Give ``region`` back (quarantined first while a stuck storage read may still write into it). A region
        this buffer did not hand out, or one freed already, is an :class:`EngineError`: taking it back would let two
        requests share bytes."""
        if self._live.get(region.offset) != region.nbytes:
            raise EngineError(f"{self.name}: region at offset {region.offset} ({region.nbytes} bytes) is not one this "
                              "buffer handed out, or was freed already")
        del self._live[region.offset]
        if LATE_WRITES.busy(self._base + region.offset, region.nbytes):
            self._quarantined.append(region)
            return
        self._release(region)
        self._reap()

    def _release(self, region: HostRegion) -> None:
        size = region.nbytes
        self._used -= size
        self._free.append((region.offset, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, sz in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz)
            else:
                merged.append((off, sz))
        self._free = merged
        self._changed.set()
        self._changed = anyio.Event()
