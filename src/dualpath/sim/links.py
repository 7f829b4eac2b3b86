"""Fluid links: a bandwidth shared by concurrent flows, with two traffic classes.

Within a class, active flows share the class's rate equally (processor sharing), computed exactly with a
per-class *virtual time*: ``V_c`` advances by the per-flow rate, and a flow of ``size`` bytes started at
``V_c = v0`` finishes when ``V_c`` reaches ``v0 + size``. Flows finish in tag order (a heap), so a start or a
finish costs O(log n) and only touches this link (rates are recomputed lazily, on this link's own events).

Classes (paper section 5.3): model-execution traffic (``HIGH``) and KV traffic (``KV``). When both are active the
link is split by weighted round robin, ``1 - kv_share`` to HIGH and ``kv_share`` to KV (~99% / ~1%); a class alone
gets the whole link (KV uses idle bandwidth opportunistically).

Inference traffic that runs at a demanded rate for an interval (the MoE all-to-all of a forward or a decode step)
is a HIGH *reservation* (:meth:`Link.reserve` / :meth:`Link.release`) rather than a flow. With traffic isolation
(the paper's traffic manager, default) it takes its demand, up to ``1 - kv_share`` of the link while KV flows are
active, and KV shares what is left. Without isolation (``isolation=False``: one class, fair sharing) it is one
flow among the KV flows: it gets at most ``bw / (n_kv + 1)``, and :meth:`Link.high_rate_for` tells the engine how
much of its demand it gets (a forward whose all-to-all cannot keep up takes longer).

A flow that crosses several links is modelled per hop (each hop runs its own flow; the transfer completes when
every hop has), which is exact for one bottleneck hop and optimistic when two hops are equally loaded.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from dualpath.sim.events import EventLoop

HIGH, KV = 0, 1


class Link:
    """A fluid link of ``bw`` bytes/s. ``start(size, cls, fn, *args)`` calls ``fn(*args)`` when the flow is done."""

    __slots__ = (
        "loop", "name", "bw", "kv_share", "_v", "_heaps", "_t", "_ver", "_seq", "bytes", "busy_s",
        "window_s", "windows", "_n", "high_rate", "isolation", "high_bytes",
    )

    def __init__(self, loop: EventLoop, name: str, bw: float, kv_share: float = 0.01, window_s: float = 0.0) -> None:
        if bw <= 0:
            raise ValueError(f"link {name}: bandwidth must be > 0, got {bw}")
        self.loop = loop
        self.name = name
        self.bw = float(bw)
        self.kv_share = float(kv_share)
        self._v = [0.0, 0.0]
        self._heaps: list[list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]]] = [[], []]
        self._t = 0.0
        self._ver = 0
        self._seq = 0
        self._n = 0
        self.bytes = [0.0, 0.0]  # bytes carried per class (counted when a flow starts)
        self.busy_s = 0.0  # time with at least one active flow
        self.window_s = window_s  # > 0: keep bytes per time window (for max/avg balance)
        self.windows: dict[int, float] = {}
        self.high_rate = 0.0  # reserved HIGH demand, bytes/s
        self.isolation = True
        self.high_bytes = 0.0  # bytes carried by reservations

    # -- rates ----------------------------------------------------------------------------------------------
    def _reserved(self, n1: int) -> float:
        """Rate the HIGH reservations get now (``n1`` active KV flows)."""
        d = self.high_rate
        if d <= 0:
            return 0.0
        if not n1:
            return min(d, self.bw)
        if self.isolation:
            return min(d, self.bw * (1.0 - self.kv_share))
        return min(d, self.bw / (n1 + 1))

    def _rates(self) -> tuple[float, float]:
        n0, n1 = len(self._heaps[0]), len(self._heaps[1])
        bw = self.bw - self._reserved(n1) if self.high_rate > 0 else self.bw
        if n0 and n1:
            return bw * (1.0 - self.kv_share) / n0, bw * self.kv_share / n1
        if n0:
            return bw / n0, 0.0
        if n1:
            return 0.0, bw / n1
        return 0.0, 0.0

    def _advance(self, t: float) -> None:
        dt = t - self._t
        if dt <= 0:
            return
        if self.high_rate > 0:
            self.high_bytes += self._reserved(len(self._heaps[1])) * dt
        if self._n:
            r0, r1 = self._rates()
            self._v[0] += r0 * dt
            self._v[1] += r1 * dt
            self.busy_s += dt
            if self.window_s > 0:
                self._spread(self._t, t, r0 * len(self._heaps[0]) + r1 * len(self._heaps[1]))
        self._t = t

    def _spread(self, t0: float, t1: float, rate: float) -> None:
        w = self.window_s
        i = int(t0 / w)
        while t0 < t1:
            end = min(t1, (i + 1) * w)
            self.windows[i] = self.windows.get(i, 0.0) + rate * (end - t0)
            t0 = end
            i += 1

    @property
    def active(self) -> int:
        return self._n

    # -- inference traffic (HIGH reservations) --------------------------------------------------------------
    def reserve(self, rate: float) -> None:
        """Add ``rate`` bytes/s of HIGH demand from now on (until :meth:`release`)."""
        if rate <= 0:
            return
        self._advance(self.loop.now)
        self._t = self.loop.now
        self.high_rate += rate
        self._reschedule()

    def release(self, rate: float, reschedule: bool = True) -> None:
        """Remove ``rate`` bytes/s of HIGH demand (``reschedule=False``: the caller reschedules, e.g. by a
        :meth:`reserve` at the same instant, which saves a stale event)."""
        if rate <= 0:
            return
        self._advance(self.loop.now)
        self._t = self.loop.now
        self.high_rate = max(0.0, self.high_rate - rate)
        if self.high_rate < 1e-9 * self.bw:
            self.high_rate = 0.0
        if reschedule:
            self._reschedule()

    def high_rate_for(self, demand: float) -> float:
        """The rate a new HIGH demand of ``demand`` bytes/s would get now (isolation: all of it, up to the link)."""
        n1 = len(self._heaps[1])
        if self.isolation or not n1:
            return min(demand, self.bw * (1.0 - self.kv_share) if n1 else self.bw)
        return min(demand, self.bw / (n1 + 1 + (1 if self.high_rate > 0 else 0)))

    # -- flows ----------------------------------------------------------------------------------------------
    def start(self, size: float, cls: int, fn: Callable[..., Any], *args: Any) -> None:
        """Start a flow of ``size`` bytes in class ``cls`` (HIGH or KV); ``fn(*args)`` runs when it is done."""
        loop = self.loop
        if size <= 0:
            loop.at(loop.now, fn, *args)
            return
        self._advance(loop.now)
        if self._n == 0:
            self._v = [0.0, 0.0]  # idle link: restart virtual time (keeps float precision)
        self.bytes[cls] += size
        self._seq += 1
        heapq.heappush(self._heaps[cls], (self._v[cls] + size, self._seq, fn, args))
        self._n += 1
        self._reschedule()

    def _reschedule(self) -> None:
        self._ver += 1
        if not self._n:
            return
        r = self._rates()
        best = float("inf")
        for c in (0, 1):
            h = self._heaps[c]
            if h and r[c] > 0:
                dt = (h[0][0] - self._v[c]) / r[c]
                if dt < best:
                    best = dt
        self.loop.at(self._t + max(0.0, best), self._fire, self._ver)

    def _fire(self, ver: int) -> None:
        if ver != self._ver:
            return
        now = self.loop.now
        self._advance(now)
        done = []
        rates = self._rates()
        for c in (0, 1):
            h = self._heaps[c]
            v = self._v[c]
            r = rates[c]
            # done: within the byte tolerance, or so close that the clock cannot advance to its end (late in a
            # long run a sub-byte remainder at tens of GB/s is below the time's resolution; waiting for it
            # would fire this event at the same instant forever)
            while h and (h[0][0] - v <= 1e-6 * (1.0 + h[0][0]) or (r > 0 and now + (h[0][0] - v) / r <= now)):
                _, _, fn, args = heapq.heappop(h)
                self._n -= 1
                done.append((fn, args))
        self._reschedule()
        for fn, args in done:
            fn(*args)

    def utilisation(self, horizon_s: float) -> float:
        """Mean carried rate over ``horizon_s`` as a fraction of the bandwidth."""
        return (self.bytes[0] + self.bytes[1] + self.high_bytes) / (self.bw * horizon_s) if horizon_s > 0 else 0.0
