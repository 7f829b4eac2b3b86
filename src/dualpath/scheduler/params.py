"""Numeric parameters of the scheduler core, in tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dualpath.errors import SchedulerError
from dualpath.scheduler.config import SchedulerConfig


@dataclass(frozen=True)
class SchedulerParams:
    """``alpha_tokens``: short-read-queue threshold (a node whose read queue holds <= alpha tokens is preferred);
    ``beta_tokens``: unfinished-token cap per engine (above it an engine is overloaded and gets no work);
    ``z_factor``: the DE high-token threshold factor (1.05 in the paper); ``block_tokens``: KV block size.
    """

    alpha_tokens: int
    beta_tokens: int
    z_factor: float = 1.05
    block_tokens: int = 64

    def __post_init__(self) -> None:
        if self.alpha_tokens < 0 or self.beta_tokens <= 0:
            raise SchedulerError(
                f"alpha_tokens must be >= 0 and beta_tokens > 0, got {self.alpha_tokens}, {self.beta_tokens}"
            )
        if self.z_factor <= 0 or self.block_tokens <= 0:
            raise SchedulerError(
                f"z_factor and block_tokens must be > 0, got {self.z_factor}, {self.block_tokens}"
            )

    @classmethod
    def from_rates(
        cls,
        storage_tokens_per_s: float,
        gpu_tokens_per_s: float,
        alpha_s: float = 3.0,
        beta_s: float = 5.0,
        z_factor: float = 1.05,
        block_tokens: int = 64,
    ) -> SchedulerParams:
        """Paper appendix A.4: alpha = tokens one node's storage NIC reads in ``alpha_s`` (read_q is per node),
        beta = tokens one GPU (engine) prefills in ``beta_s``."""
        if storage_tokens_per_s <= 0 or gpu_tokens_per_s <= 0:
            raise SchedulerError("storage_tokens_per_s and gpu_tokens_per_s must be > 0")
        return cls(
            alpha_tokens=max(0, math.floor(storage_tokens_per_s * alpha_s)),
            beta_tokens=max(1, math.floor(gpu_tokens_per_s * beta_s)),
            z_factor=z_factor,
            block_tokens=block_tokens,
        )

    @classmethod
    def from_config(
        cls,
        cfg: SchedulerConfig,
        storage_tokens_per_s: float,
        gpu_tokens_per_s: float,
        block_tokens: int = 64,
    ) -> SchedulerParams:
        return cls.from_rates(
            storage_tokens_per_s, gpu_tokens_per_s, cfg.alpha_s, cfg.beta_s, cfg.z_factor, block_tokens
        )

    def kv_need(self, prompt_tokens: int, gen_tokens: int) -> int:
        """KV tokens a DE reserves for a request: prompt + generation, rounded up to whole blocks."""
        b = self.block_tokens
        return -(-(prompt_tokens + gen_tokens) // b) * b
