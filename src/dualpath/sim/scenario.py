"""A simulation scenario from explicit numbers (no presets needed), and its result.

Build one from presets with :func:`dualpath.sim.runner.scenario_from_preset`, or by hand for sim-to-real (the
link bandwidths of a ``dualpath run`` and a measured compute profile, :class:`~dualpath.sim.compute.ProfiledCompute`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dualpath.errors import ConfigError
from dualpath.sim.compute import ComputeModel


class TurnLike(Protocol):
    append: int
    gen: int


class TrajectoryLike(Protocol):
    @property
    def turns(self) -> Sequence[Any]: ...


@dataclass
class SimTrajectory:
    """One agent: ``turns`` of (append, gen); ``arrival`` in seconds (offline: 0)."""

    turns: list[tuple[int, int]]
    arrival: float = 0.0
    tid: int = 0


def as_turns(traj: Any) -> list[tuple[int, int]]:
    """(append, gen) pairs of a trajectory (ours, or the workload package's ``Trajectory``)."""
    out = []
    for t in traj.turns:
        if isinstance(t, tuple):
            out.append((int(t[0]), int(t[1])))
        else:
            out.append((int(t.append), int(t.gen)))
    return out


@dataclass
class SimScenario:
    """Everything a simulation needs, as plain numbers.

    Nodes: ``P`` prefill and ``D`` decode nodes of ``gpus_per_node`` engines; bandwidths in bytes/s per direction
    (``snic_bw`` per node, ``cnic_bw`` per engine, ``dram_bw`` per node, counted not enforced). KV:
    ``kv_bytes_per_token`` (all layers), ``block_tokens``. Memory: ``de_kv_tokens`` per DE, ``pe_hbm_kv_tokens``
    per PE (the KV a non-layer-wise batch may hold; None = unlimited), ``dram_buffer_bytes`` per node.
    ``compute``: a :class:`~dualpath.sim.compute.ComputeModel`. ``trajectories``: agents (their ``arrival`` is
    used in online mode). Scheduler: the paper's alpha/beta (seconds of work), compute quota, fetch interval.
    """

    P: int
    D: int
    gpus_per_node: int
    snic_bw: float
    cnic_bw: float
    kv_bytes_per_token: float
    compute: ComputeModel
    de_kv_tokens: int
    trajectories: Sequence[Any]
    dram_bw: float = 500e9
    dram_buffer_bytes: float = 80e9
    pe_hbm_kv_tokens: int | None = None
    block_tokens: int = 64
    kv_share: float = 0.01
    read_slots: int = 8
    alpha_s: float = 3.0
    beta_s: float = 5.0
    quota_s: float = 0.3
    #: never lose: the quota does not cut a PE batch below the compute's saturating batch size (docs/simulator.md)
    quota_floor: bool = True
    #: never lose: Algorithm 1 ranks PEs by their queued work (compute and hit streaming time), not by their prompt
    #: tokens; beta still bounds prompt tokens (docs/simulator.md)
    work_ranking: bool = True
    z_factor: float = 1.05
    fetch_interval_s: float = 0.1
    #: a content-keyed request that shares at least this many tokens past its stored prefix with a request being
    #: prefilled waits for that prefix to be stored, then reads it (GlobalScheduler.hold); None: never waits
    inflight_prefix_min_tokens: int | None = 256
    #: ... at most this long (simulated seconds, from its first hold), then computes it itself (the runtime's
    #: scheduler.inflight_prefix_wait_s); None: until that prefix is stored
    inflight_prefix_wait_s: float | None = 30.0
    #: the MoE all-to-all of each forward as HIGH traffic on the compute NICs (sim/traffic.py)
    ep_traffic: bool = True
    #: the traffic manager: HIGH before KV on the compute NICs (off: one class, fair sharing)
    traffic_isolation: bool = True
    max_batch_tokens: int = 16384
    mode: str = "offline"
    horizon_s: float | None = None
    warmup_s: float = 0.0
    ttft_slo_s: float = 4.0
    tpot_slo_s: float = 0.05
    name: str = "custom"
    balance_window_s: float = 10.0
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for k in ("P", "D", "gpus_per_node", "de_kv_tokens", "block_tokens", "read_slots", "max_batch_tokens"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"sim scenario: {k} must be > 0, got {getattr(self, k)}")
        for k in ("snic_bw", "cnic_bw", "kv_bytes_per_token", "dram_buffer_bytes", "quota_s", "fetch_interval_s"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"sim scenario: {k} must be > 0, got {getattr(self, k)}")
        if self.mode not in ("offline", "online"):
            raise ConfigError(f"sim scenario: mode must be offline or online, got {self.mode!r}")
        if not self.trajectories:
            raise ConfigError("sim scenario: no trajectories")
