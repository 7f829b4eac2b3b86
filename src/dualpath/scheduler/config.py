"""Config of the scheduler policies."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dualpath._configbase import Section

PolicyName = Literal["basic", "layerwise", "round_robin", "dualpath", "split", "pe_only", "de_only", "oracle"]


class SchedulerConfig(Section):
    """Policy and the paper's constants (alpha, beta in seconds of work; compute quota; Z factor)."""

    policy: PolicyName = Field(default="dualpath", description=(
        "how turns are placed and read: basic (PE reads only), layerwise, round_robin, dualpath, split, "
        "pe_only, de_only, oracle (no storage time)"
    ))
    layerwise: bool = Field(default=True, description=(
        "prefill streams KV layer by layer (the paper's layer-wise prefill); false: whole blocks before the "
        "forward"
    ))
    alpha_s: float = Field(
        default=3.0, gt=0, description="short-read-queue threshold: tokens readable in alpha_s"
    )
    beta_s: float = Field(
        default=5.0, gt=0, description="unfinished-token cap: tokens one GPU processes in beta_s"
    )
    compute_quota_s: float = Field(
        default=0.3, gt=0, description="predicted attention time per PE forward batch"
    )
    z_factor: float = Field(default=1.05, gt=0, description=(
        "the DE high-token threshold Z = z_factor x mean tokens per DE of the group (paper: 1.05)"
    ))
    work_ranking: bool = Field(
        default=True,
        description="DualPath's policies rank the prefill engines of a class by predicted work (the model's time "
                    "model) instead of prompt tokens; basic, layerwise and round_robin always rank by tokens",
    )
    fetch_interval_s: float = Field(default=0.005, gt=0, description=(
        "how often the scheduler fetches queued turns for assignment"
    ))
    inflight_prefix_min_tokens: int = Field(
        default=256, ge=1,
        description="a turn sharing at least this many tokens past its stored prefix with a turn being prefilled "
                    "waits for that prefix to be stored (inflight_prefix_wait_s), then reads it",
    )
    inflight_prefix_wait_s: float = Field(
        default=30.0, ge=0,
        description="the longest a turn waits for a shared prefix another turn is computing; 0 never waits",
    )
