"""Config of the workload replayed by clients."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dualpath._configbase import Section


class WorkloadConfig(Section):
    """A built-in generator (``dataset``) or a trace file, replayed offline or online."""

    dataset: str = Field(default="tiny", description="built-in generator: 32k, 48k, 64k, or a scaled one")
    trace: str | None = None
    trace_format: Literal["jsonl", "mooncake"] = "jsonl"
    n_agents: int = Field(default=8, ge=1)
    mode: Literal["offline", "online"] = "offline"
    rate_aps: float = Field(default=1.0, gt=0, description="online: agent arrivals per second")
    ttft_slo_s: float = Field(default=4.0, gt=0)
    tpot_slo_s: float = Field(default=0.05, gt=0)
    seed: int = 0
    max_turns: int | None = Field(default=None, ge=1)
