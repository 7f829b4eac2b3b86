"""Config of the workload replayed by clients."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dualpath._configbase import Section


class WorkloadConfig(Section):
    """A built-in generator (``dataset``) or a trace file, replayed offline or online.

    A trace is served as it is: every request once. ``n_agents`` applies to generators only; a trace takes a
    prefix with ``max_requests`` / ``max_agents`` and copies only with ``repeat``. Online, a trace's requests
    keep its timestamps (``rate_aps`` is for generators).
    """

    dataset: str = Field(default="tiny", description="built-in generator: tiny, small, 32k, 48k or 64k (the "
                         "paper's Table 2), or agentic-cpu (dualpath run's embedded default)")
    trace: str | None = Field(default=None, description=(
        "a trace file or folder of shards to serve as it is (instead of dataset); see trace_format"
    ))
    trace_format: Literal["auto", "jsonl", "mooncake", "bailian", "csv", "sharegpt", "weka"] = Field(
        default="auto",
        description="format of `trace`: auto (from its first line), jsonl, mooncake, bailian, csv, sharegpt or weka")
    n_agents: int = Field(default=8, ge=1, description=(
        "agents a generator makes (a trace is never replayed to reach it: see max_agents)"
    ))
    mode: Literal["offline", "online"] = Field(default="offline", description=(
        "offline: every session at t = 0, each turn when the previous one ends; online: a trace at its own "
        "times, a generator at rate_aps"
    ))
    rate_aps: float = Field(default=1.0, gt=0, description="online: agent arrivals per second")
    ttft_slo_s: float = Field(default=4.0, gt=0, description=(
        "the SLO on time to first token (online capacity search)"
    ))
    tpot_slo_s: float = Field(default=0.05, gt=0, description=(
        "the SLO on time per output token (online capacity search)"
    ))
    seed: int = Field(default=0, ge=0, description="seed of the generator and of the online arrivals")
    max_turns: int | None = Field(default=None, ge=1, description=(
        "a generator's trajectories cut to this many turns"
    ))
    max_requests: int | None = Field(default=None, ge=1, description="trace: serve only its first N requests")
    max_agents: int | None = Field(default=None, ge=1, description="trace: serve only its first N sessions")
    repeat: int = Field(default=1, ge=1, description="trace: serve K copies (no shared content between copies)")
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                              description="trace, online: replay its times this many times faster (2: twice its "
                                          "request rate, 0.5: half)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from dualpath.workload.generators import DATASETS

        if name.lower() not in DATASETS and name != "agentic-cpu":
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join([*DATASETS, 'agentic-cpu'])} "
                             "(a trace file goes in `trace`)")
        return name
