"""Clocks the emulated links run on: the event loop's (real) or a virtual one that jumps when all tasks wait."""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

import anyio


class Clock(Protocol):
    def now(self) -> float: ...

    async def wait_until(self, event: anyio.Event, deadline: float | None) -> None:
        """Return when ``event`` is set or the clock reaches ``deadline`` (None: no deadline)."""


class RealClock:
    """The event loop's monotonic clock."""

    def now(self) -> float:
        return anyio.current_time()

    async def wait_until(self, event: anyio.Event, deadline: float | None) -> None:
        if deadline is None:
            await event.wait()
            return
        with anyio.move_on_at(deadline):
            await event.wait()


class VirtualClock:
    """Virtual time for exact, instant tests: run :meth:`autojump` in a task; whenever every task is blocked,
    time jumps to the earliest pending deadline."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.t

    async def wait_until(self, event: anyio.Event, deadline: float | None) -> None:
        if deadline is not None:
            if deadline <= self.t:
                return
            heapq.heappush(self._timers, (deadline, next(self._seq), event))
        await event.wait()

    async def sleep(self, seconds: float) -> None:
        await self.wait_until(anyio.Event(), self.t + seconds)

    async def autojump(self) -> None:
        while True:
            await anyio.wait_all_tasks_blocked()
            while self._timers and self._timers[0][2].is_set():
                heapq.heappop(self._timers)
            if not self._timers:
                await anyio.sleep(0.0005)
                continue
            deadline, _, event = heapq.heappop(self._timers)
            self.t = max(self.t, deadline)
            event.set()
