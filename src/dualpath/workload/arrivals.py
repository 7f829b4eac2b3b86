"""Arrival processes of agents and the online SLO (paper section 9.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dualpath.errors import WorkloadError
from dualpath.workload.trajectory import Trajectory


@dataclass(frozen=True)
class SLO:
    """Online service-level objective: TTFT <= ``ttft_s`` and TPOT <= ``tpot_s`` (the paper: 4 s, 50 ms)."""

    ttft_s: float = 4.0
    tpot_s: float = 0.05

    def met(self, ttft: float | None, tpot: float | None) -> bool:
        """Whether one request met both bounds (a missing TPOT, e.g. one generated token, counts as met)."""
        return ttft is not None and ttft <= self.ttft_s and (tpot is None or tpot <= self.tpot_s)


def offline_arrivals(n: int) -> list[float]:
    """Offline (RL rollout): ``n`` agents start together at t = 0, no gaps between turns."""
    if n < 0:
        raise WorkloadError(f"n must be >= 0, got {n}")
    return [0.0] * n


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Online: ``n`` agent arrival times (s) of a Poisson process of ``rate`` agents/s; the first at one gap."""
    if n < 0 or rate <= 0:
        raise WorkloadError(f"need n >= 0 and rate > 0, got n={n}, rate={rate}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [float(x) for x in np.cumsum(gaps)]


def with_arrivals(trajs: Sequence[Trajectory], arrivals: Sequence[float]) -> list[Trajectory]:
    """Copies of ``trajs`` with the given arrival times."""
    if len(trajs) != len(arrivals):
        raise WorkloadError(f"{len(trajs)} trajectories but {len(arrivals)} arrival times")
    return [Trajectory(t.tid, t.turns, a, t.origin) for t, a in zip(trajs, arrivals, strict=True)]
