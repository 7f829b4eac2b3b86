"""``min_p`` sampling against transformers' own warpers (temperature, top-k, top-p, then min-p, as its
``generate`` orders them), and on the wire between processes."""

from __future__ import annotations

import pytest
import torch

from dualpath.control.protocol import decode, encode, sampling_body, sampling_of
from dualpath.engine.sampling import Sampler, SamplingParams, filtered_probs
from dualpath.errors import ModelError

lp = pytest.importorskip("transformers.generation.logits_process")


def _reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = logits[None].clone().float()
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = lp.TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = lp.TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = lp.TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p:
        x = lp.MinPLogitsWarper(p.min_p)(ids, x)
    return torch.softmax(x, dim=-1)[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.7, min_p=0.05, top_k=20),
    SamplingParams(temperature=1.3, min_p=0.2, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=1.0),
])
def test_min_p_keeps_the_tokens_transformers_keeps(params: SamplingParams) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        logits = torch.randn(300, generator=g) * 3
        got, want = filtered_probs(logits, params), _reference(logits, params)
        assert torch.equal(got > 0, want > 0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert (got > 0).sum() < 300  # (the filter dropped tokens)


def test_min_p_one_is_greedy_and_the_wire_keeps_it() -> None:
    g = torch.Generator().manual_seed(5)
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=1.0, seed=9))
    for i in range(10):
        logits = torch.randn(50, generator=g)
        assert sampler(logits, i) == int(logits.argmax())
    sp = SamplingParams(temperature=0.8, min_p=0.25, seed=1)
    body = {"session": 1, "prompt": b"\1" + b"\0" * 7, "gen": 2, **sampling_body(sp)}
    assert sampling_of(decode(encode("submit", body)).body, "submit") == sp
    for bad in (-0.1, 1.5):
        with pytest.raises(ModelError, match="min_p"):
            SamplingParams(min_p=bad)
