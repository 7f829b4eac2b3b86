"""The simulator's clock and event queue: a binary heap of ``(time, seq, callback, args)``.

Events at equal times run in scheduling order (``seq``). Cancellation is by versioning in the caller (a stale
event checks its version and returns), which keeps the heap free of deletions.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventLoop:
    """A discrete-event clock. ``at(t, fn, *args)`` schedules; ``run(until)`` processes in time order."""

    __slots__ = ("now", "_heap", "_seq", "events", "_stop")

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0
        self._stop = False

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        if t < self.now:
            t = self.now
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, dt: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def stop(self) -> None:
        self._stop = True

    def run(self, until: float | None = None) -> float:
        """Process events until the queue empties, ``until`` is passed, or :meth:`stop` is called."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        limit = float("inf") if until is None else until
        self._stop = False
        while heap and not self._stop:
            if heap[0][0] > limit:
                self.now = limit
                break
            t, _, fn, args = pop(heap)
            self.now = t
            fn(*args)
            n += 1
        self.events += n
        return self.now

    def __len__(self) -> int:
        return len(self._heap)
