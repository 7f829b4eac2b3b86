"""Memory that a retired I/O call may still write into: held back from reuse until the call returns.

A storage read whose caller's deadline fired is abandoned (:mod:`dualpath.storage.iopool`). A worker that is
inside ``preadv`` at that moment (a hung network mount) cannot be stopped from user space: when, if ever, the
system call returns, the kernel has written into the caller's buffer. If the caller had meanwhile freed that
buffer and handed it to another request, the late bytes would land in that request's KV: corrupt data served.

So the pool records the destination's address range here, with a probe that says whether any stuck item is
still inside its system call. An allocator of reusable memory (:class:`~dualpath.engine.host_buffer.HostBuffer`)
asks :meth:`LateWrites.busy` before putting a freed region back and keeps a busy one aside (quarantined) until
the probe says the call has returned. A tensor the caller allocated itself needs nothing: the abandoned job
keeps a reference to it, so its memory is not reused while a worker may still write there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Hold:
    start: int
    end: int
    pending: Callable[[], bool]  # True while a retired call may still write into [start, end)


class LateWrites:
    """A thread-safe set of address ranges that retired I/O calls may still write into."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: list[_Hold] = []

    def hold(self, start: int, nbytes: int, pending: Callable[[], bool]) -> None:
        """Record that ``[start, start + nbytes)`` may be written while ``pending()`` is true."""
        if nbytes <= 0:
            return
        with self._lock:
            self._holds.append(_Hold(start, start + nbytes, pending))

    def _prune(self) -> list[_Hold]:
        with self._lock:
            self._holds = [h for h in self._holds if h.pending()]
            return self._holds

    def busy(self, start: int, nbytes: int) -> bool:
        """Whether a retired call may still write anywhere in ``[start, start + nbytes)``."""
        end = start + nbytes
        return any(h.start < end and start < h.end for h in self._prune())


#: the process's one registry (the kernel writes into process memory, whoever allocated it)
LATE_WRITES = LateWrites()
