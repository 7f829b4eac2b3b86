"""An emulated link: a fluid, priority-aware processor-sharing model of a NIC direction.

Two traffic classes (:class:`~dualpath.types.TrafficClass`): ``HIGH`` (model execution) and ``KV``. When both
are active, ``HIGH`` gets ``1 - kv_share`` of the bandwidth and ``KV`` gets ``kv_share`` (the paper's ~99%/1%
weighted round robin); a class alone gets everything (KV uses what HIGH leaves idle). Within a class, active
transfers share its rate equally. Rates are recomputed on every arrival and completion; the elapsed time is
replayed exactly (piecewise) so late timer wake-ups never lose capacity. :class:`FluidLink` is the pure model
(no I/O, usable by the simulator); :class:`Link` drives it in real (or virtual) time with one timer per link.
``bandwidth=None`` means unlimited (physical deployments): transfers return at once and are only counted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from dualpath.traffic.clock import Clock, RealClock
from dualpath.types import TrafficClass

_EPS_BYTES = 1e-3
_MIN_STEP_S = 1e-9


@dataclass(eq=False)
class _Flow:
    id: int
    cls: TrafficClass
    nbytes: int
    remaining: float


@dataclass
class LinkStats:
    """Counters of one link."""

    bytes: dict[str, int] = field(default_factory=lambda: {c.value: 0 for c in TrafficClass})
    transfers: dict[str, int] = field(default_factory=lambda: {c.value: 0 for c in TrafficClass})
    busy_time: float = 0.0
    queued_bytes: int = 0  # bytes of transfers (and tracked operations) in progress
    queued_tokens: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "bytes": dict(self.bytes), "transfers": dict(self.transfers), "busy_time_s": self.busy_time,
            "queued_bytes": self.queued_bytes, "queued_tokens": self.queued_tokens,
        }


class FluidLink:
    """The pure model: flows in, completions out, time given by the caller."""

    def __init__(self, bandwidth: float, kv_share: float = 0.01, *, t0: float = 0.0, bucket_s: float = 0.01) -> None:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth!r}")
        if not 0 < kv_share <= 1:
            raise ValueError(f"kv_share must be in (0, 1], got {kv_share!r}")
        self.bandwidth = float(bandwidth)
        self.kv_share = kv_share
        self.t = t0
        self.bucket_s = bucket_s
        self.flows: dict[TrafficClass, dict[int, _Flow]] = {c: {} for c in TrafficClass}
        self.delivered: dict[TrafficClass, float] = dict.fromkeys(TrafficClass, 0.0)
        self.busy_time = 0.0
        self.buckets: dict[int, list[float]] = {}  # bucket index -> [high bytes, kv bytes]

    def class_rates(self) -> dict[TrafficClass, float]:
        hi, kv = bool(self.flows[TrafficClass.HIGH]), bool(self.flows[TrafficClass.KV])
        if hi and kv:
            return {TrafficClass.HIGH: self.bandwidth * (1 - self.kv_share), TrafficClass.KV: self.bandwidth * self.kv_share}
        return {TrafficClass.HIGH: self.bandwidth if hi else 0.0, TrafficClass.KV: self.bandwidth if kv else 0.0}

    def _flow_rates(self) -> dict[TrafficClass, float]:
        rates = self.class_rates()
        return {c: (rates[c] / len(self.flows[c]) if self.flows[c] else 0.0) for c in TrafficClass}

    def active(self) -> int:
        return sum(len(f) for f in self.flows.values())

    def add(self, fid: int, nbytes: int, cls: TrafficClass, now: float) -> list[int]:
        done = self.advance(now)
        self.flows[cls][fid] = _Flow(fid, cls, nbytes, float(nbytes))
        return done

    def remove(self, fid: int, now: float) -> list[int]:
        done = self.advance(now)
        for flows in self.flows.values():
            flows.pop(fid, None)
        return done

    def next_completion(self) -> float | None:
        rates = self._flow_rates()
        best: float | None = None
        for cls, flows in self.flows.items():
            if flows:
                dt = min(f.remaining for f in flows.values()) / rates[cls]
                best = dt if best is None else min(best, dt)
        return None if best is None else self.t + best

    def advance(self, now: float) -> list[int]:
        """Replay the model up to ``now``; returns the ids of the flows that completed."""
        done: list[int] = []
        while self.t < now:
            if not self.active():
                self.t = now
                break
            rates = self._flow_rates()
            step = now - self.t
            for cls, flows in self.flows.items():
                if flows:
                    step = min(step, min(f.remaining for f in flows.values()) / rates[cls])
            for cls, flows in self.flows.items():
                if not flows:
                    continue
                carried = rates[cls] * step
                for f in flows.values():
                    f.remaining -= carried
                self._account(cls, carried * len(flows), self.t, step)
            self.busy_time += step
            self.t += step
            done.extend(self._reap())
        done.extend(self._reap())
        return done

    def _reap(self) -> list[int]:
        # A flow is done when what is left is below float noise in bytes, or would take less than 1 ns at its
        # rate: at large clock values a smaller time step does not advance ``t`` at all (t + dt == t), and
        # such a leftover would otherwise never drain.
        out = []
        rates = self._flow_rates()
        for cls, flows in self.flows.items():
            tiny = rates[cls] * _MIN_STEP_S
            for fid in [fid for fid, f in flows.items() if f.remaining <= max(_EPS_BYTES + 1e-12 * f.nbytes, tiny)]:
                del flows[fid]
                out.append(fid)
        return out

    def _account(self, cls: TrafficClass, nbytes: float, t0: float, dt: float) -> None:
        self.delivered[cls] += nbytes
        idx = 0 if cls is TrafficClass.HIGH else 1
        if dt <= 0:
            self.buckets.setdefault(int(t0 // self.bucket_s), [0.0, 0.0])[idx] += nbytes
            return
        rate = nbytes / dt
        t, end = t0, t0 + dt
        while t < end:
            b = int(t // self.bucket_s)
            if (b + 1) * self.bucket_s <= t:  # float edge of floor division
                b += 1
            seg_end = min(end, (b + 1) * self.bucket_s)
            if seg_end <= t:
                seg_end = end
            self.buckets.setdefault(b, [0.0, 0.0])[idx] += rate * (seg_end - t)
            t = seg_end


class Link:
    """A bandwidth-limited link with two traffic classes, driven in real time (or a :class:`VirtualClock`)."""

    def __init__(self, name: str, bandwidth: float | None, kv_share: float = 0.01, *, clock: Clock | None = None,
                 bucket_s: float = 0.01, lookahead_s: float | None = None) -> None:
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"link {name}: bandwidth must be > 0 bytes/s or None (unlimited), got {bandwidth!r}")
        self.name = name
        self.bandwidth = bandwidth
        self.kv_share = kv_share
        self.clock: Clock = clock or RealClock()
        # Completions due within the timer granularity (asyncio sleeps in whole milliseconds) are delivered at
        # once and the model runs that much ahead of real time, so streams of small transfers keep the rate.
        self.lookahead_s = (1e-3 if isinstance(self.clock, RealClock) else 0.0) if lookahead_s is None else lookahead_s
        self.bucket_s = bucket_s
        self.stats = LinkStats()
        self._model: FluidLink | None = None
        self._ids = itertools.count(1)
        self._wake: dict[int, anyio.Event] = {}
        self._done: set[int] = set()
        self._leader: int | None = None
        self._kick = anyio.Event()
        self._unlimited_buckets: dict[int, list[float]] = {}
        self._credit_until = -math.inf

    def _fluid(self) -> FluidLink:
        if self._model is None:
            assert self.bandwidth is not None
            self._model = FluidLink(self.bandwidth, self.kv_share, t0=self.clock.now(), bucket_s=self.bucket_s)
        return self._model

    # --- counters ------------------------------------------------------------------------------------------
    @property
    def queued_bytes(self) -> int:
        return self.stats.queued_bytes

    @property
    def queued_tokens(self) -> int:
        return self.stats.queued_tokens

    @property
    def busy_time(self) -> float:
        if self._model is not None:
            self._finish(self._model.advance(self.clock.now()))
            return self._model.busy_time
        return 0.0

    def carried(self, cls: TrafficClass) -> float:
        """Bytes of class ``cls`` carried so far (aborted transfers' partial bytes included)."""
        if self._model is None:
            return float(self.stats.bytes[TrafficClass(cls).value])
        self._finish(self._model.advance(self.clock.now()))
        return self._model.delivered[TrafficClass(cls)]

    def utilisation(self, t0: float | None = None, t1: float | None = None) -> float:
        """Busy fraction of [t0, t1] from the timeline (whole history by default)."""
        tl = self.timeline()
        if not tl or self.bandwidth is None:
            return 0.0
        lo = tl[0][0] if t0 is None else t0
        hi = tl[-1][0] + self.bucket_s if t1 is None else t1
        carried = sum(h + k for t, h, k in tl if lo <= t < hi)
        return carried / (self.bandwidth * max(hi - lo, 1e-12))

    def timeline(self) -> list[tuple[float, float, float]]:
        """``(bucket start time, high bytes, kv bytes)`` per ``bucket_s`` bucket in which bytes moved."""
        buckets = self._model.buckets if self._model is not None else self._unlimited_buckets
        if self._model is not None:
            self._finish(self._model.advance(self.clock.now()))
        return [(b * self.bucket_s, v[0], v[1]) for b, v in sorted(buckets.items())]

    @contextmanager
    def track(self, nbytes: int, tokens: int = 0) -> Iterator[None]:
        """Count an operation as queued on this link while the block runs (e.g. a storage read in flight)."""
        self.stats.queued_bytes += nbytes
        self.stats.queued_tokens += tokens
        try:
            yield
        finally:
            self.stats.queued_bytes -= nbytes
            self.stats.queued_tokens -= tokens

    # --- the model -----------------------------------------------------------------------------------------
    async def transfer(self, nbytes: int, cls: TrafficClass = TrafficClass.KV, *, tokens: int = 0,
                       track: bool = True) -> None:
        """Return when the link has carried ``nbytes`` of class ``cls`` under sharing (at once if unlimited).
        While in progress the transfer counts in ``queued_bytes``/``queued_tokens`` (unless ``track=False``)."""
        if nbytes < 0:
            raise ValueError(f"link {self.name}: nbytes must be >= 0, got {nbytes}")
        cls = TrafficClass(cls)
        self.stats.transfers[cls.value] += 1
        if self.bandwidth is None or nbytes == 0:
            self.stats.bytes[cls.value] += nbytes
            b = int(self.clock.now() // self.bucket_s)
            self._unlimited_buckets.setdefault(b, [0.0, 0.0])[0 if cls is TrafficClass.HIGH else 1] += nbytes
            await anyio.lowlevel.checkpoint()
            return
        if track:
            self.stats.queued_bytes += nbytes
            self.stats.queued_tokens += tokens
        model = self._fluid()
        fid = next(self._ids)
        self._wake[fid] = anyio.Event()
        try:
            now = self.clock.now()
            if not model.active() and model.t < now <= self._credit_until:
                now = model.t
            self._finish(model.add(fid, nbytes, cls, now))
            self._kick.set()
            while fid not in self._done:
                if self._leader is None:
                    self._leader = fid
                    try:
                        await self._lead(fid)
                    finally:
                        self._leader = None
                        self._handoff()
                else:
                    ev = self._wake[fid]
                    await ev.wait()
                    if ev.is_set() and fid not in self._done:
                        self._wake[fid] = anyio.Event()
        finally:
            if fid not in self._done:  # cancelled
                self._finish(model.remove(fid, self.clock.now()))
                self._kick.set()
            else:
                self.stats.bytes[cls.value] += nbytes
            self._done.discard(fid)
            self._wake.pop(fid, None)
            if track:
                self.stats.queued_bytes -= nbytes
                self.stats.queued_tokens -= tokens

    async def _lead(self, me: int) -> None:
        model = self._fluid()
        while me not in self._done:
            nxt = model.next_completion()
            now = self.clock.now()
            if nxt is not None and nxt - now <= self.lookahead_s:
                self._finish(model.advance(nxt))
                await anyio.lowlevel.checkpoint()
                continue
            self._kick = anyio.Event()
            await self.clock.wait_until(self._kick, nxt)
            now = self.clock.now()
            if nxt is not None and now > nxt and self.lookahead_s > 0:
                # woke late: complete what was due at nxt; if that idles the link, keep the model at nxt and
                # let a transfer issued right away start there (our timer, not the client, was late)
                self._finish(model.advance(nxt))
                if not model.active():
                    self._credit_until = now + self.lookahead_s + (now - nxt)
                    continue
            self._finish(model.advance(now))

    def _handoff(self) -> None:
        for fid, ev in self._wake.items():
            if fid not in self._done:
                ev.set()
                return

    def _finish(self, done: list[int]) -> None:
        for fid in done:
            self._done.add(fid)
            ev = self._wake.get(fid)
            if ev is not None:
                ev.set()
        if self._model is not None:
            self.stats.busy_time = self._model.busy_time
