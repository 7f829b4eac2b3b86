"""Workloads: agent trajectories, dataset generators (paper Table 2), trace loaders, arrival processes."""

from __future__ import annotations

from dualpath.workload.arrivals import SLO, offline_arrivals, poisson_arrivals, with_arrivals
from dualpath.workload.config import WorkloadConfig
from dualpath.workload.generators import DATASETS, TABLE2, dataset_stats, fill_random_ids, generate_dataset
from dualpath.workload.loaders import load_jsonl, load_mooncake, write_jsonl
from dualpath.workload.traces import (
    TraceWorkload,
    hash_prompt_tokens,
    ideal_hit_rate,
    load_trace,
    trace_stats,
)
from dualpath.workload.trajectory import Trajectory, Turn

__all__ = [
    "DATASETS",
    "SLO",
    "TABLE2",
    "TraceWorkload",
    "Trajectory",
    "Turn",
    "build_workload",
    "dataset_stats",
    "fill_random_ids",
    "generate_dataset",
    "hash_prompt_tokens",
    "ideal_hit_rate",
    "load_jsonl",
    "load_mooncake",
    "load_trace",
    "offline_arrivals",
    "poisson_arrivals",
    "trace_stats",
    "with_arrivals",
    "write_jsonl",
]


def build_workload(cfg: WorkloadConfig, max_len: int | None = None) -> list[Trajectory]:
    """The trajectories a :class:`WorkloadConfig` names.

    A trace: every request of it, as it is (:func:`dualpath.workload.traces.load_trace`: ``max_requests`` /
    ``max_agents`` take a prefix, ``repeat`` copies; never cycled to reach ``n_agents``), offline (all sessions
    at t = 0) or online at the trace's own times. A generator: ``n_agents`` trajectories of ``dataset``,
    truncated to ``max_turns`` / ``max_len``, with offline or Poisson arrivals.
    """
    if cfg.trace is not None:
        from dualpath.workload.traces import load_trace

        w = load_trace(cfg.trace, cfg.trace_format, max_requests=cfg.max_requests, max_agents=cfg.max_agents,
                       repeat=cfg.repeat, time_scale=cfg.time_scale)
        if cfg.mode == "offline":
            return with_arrivals(w.trajectories, offline_arrivals(len(w.trajectories)))
        return w.trajectories
    trajs = generate_dataset(cfg.dataset, cfg.n_agents, seed=cfg.seed, max_len=max_len)
    if cfg.max_turns is not None or max_len is not None:
        trajs = [t.truncated(max_len, cfg.max_turns) for t in trajs]
    arrivals = (
        offline_arrivals(len(trajs))
        if cfg.mode == "offline"
        else poisson_arrivals(len(trajs), cfg.rate_aps, seed=cfg.seed)
    )
    return with_arrivals(trajs, arrivals)
