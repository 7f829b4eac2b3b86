"""Workloads: agent trajectories, dataset generators (paper Table 2), trace loaders, arrival processes."""

from __future__ import annotations

from dualpath.workload.arrivals import SLO, offline_arrivals, poisson_arrivals, with_arrivals
from dualpath.workload.config import WorkloadConfig
from dualpath.workload.generators import DATASETS, TABLE2, dataset_stats, fill_random_ids, generate_dataset
from dualpath.workload.loaders import load_jsonl, load_mooncake, write_jsonl
from dualpath.workload.trajectory import Trajectory, Turn

__all__ = [
    "DATASETS",
    "SLO",
    "TABLE2",
    "Trajectory",
    "Turn",
    "build_workload",
    "dataset_stats",
    "fill_random_ids",
    "generate_dataset",
    "load_jsonl",
    "load_mooncake",
    "offline_arrivals",
    "poisson_arrivals",
    "with_arrivals",
    "write_jsonl",
]


def build_workload(cfg: WorkloadConfig, max_len: int | None = None) -> list[Trajectory]:
    """The trajectories a :class:`WorkloadConfig` names: ``n_agents`` from the trace (cycled when it holds fewer)
    or the ``dataset`` generator, truncated to ``max_turns`` / ``max_len``, with offline or Poisson arrivals."""
    if cfg.trace is not None:
        base = load_jsonl(cfg.trace) if cfg.trace_format == "jsonl" else load_mooncake(cfg.trace)
        if not base:
            from dualpath.errors import WorkloadError

            raise WorkloadError("trace holds no trajectory", path=cfg.trace)
        trajs = [Trajectory(i, base[i % len(base)].turns) for i in range(cfg.n_agents)]
    else:
        trajs = generate_dataset(cfg.dataset, cfg.n_agents, seed=cfg.seed, max_len=max_len)
    if cfg.max_turns is not None or max_len is not None:
        trajs = [t.truncated(max_len, cfg.max_turns) for t in trajs]
    arrivals = (
        offline_arrivals(len(trajs))
        if cfg.mode == "offline"
        else poisson_arrivals(len(trajs), cfg.rate_aps, seed=cfg.seed)
    )
    return with_arrivals(trajs, arrivals)
