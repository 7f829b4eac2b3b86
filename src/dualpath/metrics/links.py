"""Per-link byte counters sampled over time, their utilisation timelines and the storage-NIC balance."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from dualpath.errors import DualPathError

LINK_KINDS = ("snic", "cnic_in", "cnic_out")


@dataclass
class LinkSeries:
    """Samples ``(t, cumulative_bytes)`` of one link (non-decreasing in both), and its capacity in bytes/s."""

    name: str
    kind: str
    capacity_bytes_per_s: float | None = None
    t: list[float] = field(default_factory=list)
    cum: list[float] = field(default_factory=list)

    def add(self, t: float, cumulative_bytes: float) -> None:
        if self.t and (t < self.t[-1] or cumulative_bytes < self.cum[-1]):
            raise DualPathError(
                f"link {self.name}: samples must not go back (t {self.t[-1]} -> {t}, "
                f"bytes {self.cum[-1]} -> {cumulative_bytes})"
            )
        self.t.append(float(t))
        self.cum.append(float(cumulative_bytes))

    @property
    def total_bytes(self) -> float:
        return self.cum[-1] - self.cum[0] if self.cum else 0.0

    def window_bytes(self, edges: np.ndarray) -> np.ndarray:
        """Bytes moved in each window ``[edges[k], edges[k+1])``, interpolating the cumulative counter linearly
        between samples (constant before the first sample and after the last)."""
        if not self.t:
            return np.zeros(max(0, len(edges) - 1))
        c = np.interp(edges, np.asarray(self.t), np.asarray(self.cum))
        return np.diff(c)


def window_edges(t0: float, t1: float, window_s: float) -> np.ndarray:
    if window_s <= 0:
        raise DualPathError(f"window_s must be > 0, got {window_s}")
    n = max(1, int(np.ceil((t1 - t0) / window_s - 1e-9)))
    return t0 + window_s * np.arange(n + 1)


def span(series: Mapping[str, LinkSeries]) -> tuple[float, float]:
    ts = [s.t for s in series.values() if s.t]
    if not ts:
        return 0.0, 0.0
    return min(t[0] for t in ts), max(t[-1] for t in ts)


def storage_balance(
    timelines: Mapping[str, LinkSeries], window_s: float, min_fraction: float = 0.0
) -> float | None:
    """Max/avg storage-NIC traffic over short windows (paper section 9.6; 1.0 is perfect balance).

    Precisely: the common span of all samples is cut into windows of ``window_s``; in window k every SNIC i moved
    ``b[i, k]`` bytes; ``r_k = max_i b[i, k] / mean_i b[i, k]``; the result is the mean of ``r_k`` over the windows
    whose total traffic is above ``min_fraction`` times the busiest window's (all windows with traffic when 0).
    None when no window qualifies. Pass only the SNIC series.
    """
    if not timelines:
        return None
    t0, t1 = span(timelines)
    if t1 <= t0:
        return None
    edges = window_edges(t0, t1, window_s)
    b = np.stack([s.window_bytes(edges) for s in timelines.values()])
    tot = b.sum(axis=0)
    if tot.max() <= 0:
        return None
    keep = (tot > 0) & (tot >= min_fraction * tot.max())
    ratios = b[:, keep].max(axis=0) / b[:, keep].mean(axis=0)
    return float(ratios.mean())
