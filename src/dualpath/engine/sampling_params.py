"""A request's sampling parameters (:class:`SamplingParams`), checked field by field; how the decode engine
applies them is :mod:`dualpath.engine.sampling`. Apart from it so that the scheduler process, which checks a
submit's fields, never imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from dualpath.errors import ModelError

__all__ = ["MAX_LOGPROBS", "MAX_SEED", "SamplingParams"]

MAX_SEED = (1 << 63) - 1
MAX_LOGPROBS = 20  # most likely tokens reported with each generated token (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    """How a request picks each token (see :mod:`dualpath.engine.sampling`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's probability (0 = off)
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # no stop id is picked before this many tokens are generated
    logprobs: int | None = None  # None: off; k: record each token's logprob and the k most likely tokens'
    prompt_logprobs: int | None = None  # None: off; k: the prompt tokens' logprobs, computed by the PE
    grammar: str | None = None  # an llguidance grammar the tokens must follow (dualpath.engine.grammar)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated before
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    repetition_penalty: float = 1.0  # a prompt or generated token's logit divided (> 0) or multiplied (< 0) by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    allowed_ids: tuple[int, ...] = ()  # non-empty: only these tokens may be picked
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never generated (module docstring)

    @property
    def adjusts(self) -> bool:
        """Any penalty, bias or mask is set (the logits are adjusted before each pick)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_ids or self.bad_words)

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ModelError(f"sampling.temperature must lie in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ModelError(f"sampling.top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ModelError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ModelError(f"sampling.min_p must lie in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ModelError(f"sampling.seed must lie in [0, 2^63), got {self.seed}")
        if self.min_tokens < 0:
            raise ModelError(f"sampling.min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ModelError(f"sampling.{name} must lie in [-2, 2], got {v}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ModelError(f"sampling.repetition_penalty must lie in (0, 10], got {self.repetition_penalty}")
        for tid, bias in self.logit_bias:
            if tid < 0 or not -100.0 <= bias <= 100.0:
                raise ModelError(f"sampling.logit_bias: token {tid} bias {bias}: ids are >= 0, biases in [-100, 100]")
        if any(t < 0 for t in self.allowed_ids):
            raise ModelError("sampling.allowed_ids: token ids are >= 0")
        if any(not w or any(t < 0 for t in w) for w in self.bad_words):
            raise ModelError("sampling.bad_words: each word is a non-empty sequence of token ids >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ModelError(f"sampling.{name} must lie in [0, {MAX_LOGPROBS}] (or be None), got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
