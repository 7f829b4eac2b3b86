"""Penalties and logit bias in the decode engine's sampler, against independent references: transformers'
``RepetitionPenaltyLogitsProcessor`` for the repetition penalty, OpenAI's published formula for the frequency and
presence penalties, over several steps of picks; the wire keeps every field."""

from __future__ import annotations

import pytest
import torch

from dualpath.control.protocol import ProtocolError, decode, encode, sampling_body, sampling_of
from dualpath.engine.sampling import Sampler, SamplingParams
from dualpath.errors import ModelError

transformers = pytest.importorskip("transformers")


def _reference(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams) -> torch.Tensor:
    x = logits.clone().float()
    for tid, b in p.logit_bias:
        x[tid] += b
    seen = torch.tensor([prompt + generated])
    x = transformers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, x[None])[0]
    for tid in set(generated):  # OpenAI: mu[j] - c[j] * a_frequency - float(c[j] > 0) * a_presence
        x[tid] -= generated.count(tid) * p.frequency_penalty + p.presence_penalty
    return x


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(frequency_penalty=0.8, presence_penalty=0.5),
    SamplingParams(presence_penalty=-1.0, repetition_penalty=0.7),
    SamplingParams(logit_bias=((3, 5.0), (9, -100.0)), frequency_penalty=2.0, repetition_penalty=2.0),
])
def test_greedy_picks_follow_the_references(params: SamplingParams) -> None:
    g = torch.Generator().manual_seed(1)
    vocab, prompt = 12, [1, 2, 2, 5]
    sampler = Sampler(params, prompt=prompt)
    generated: list[int] = []
    plain = []
    for _ in range(30):
        logits = torch.randn(vocab, generator=g) * 2
        want = int(_reference(logits, prompt, generated, params).argmax())
        got = sampler(logits, len(generated))
        assert got == want
        generated.append(got)
        plain.append(int(logits.argmax()))
    assert generated != plain  # (the adjustments changed the picks)


def test_validation_and_the_wire() -> None:
    sp = SamplingParams(temperature=0.5, seed=1, presence_penalty=0.5, frequency_penalty=-0.25,
                        repetition_penalty=1.5, logit_bias=((7, 2.5), (11, -100.0)))
    body = {"session": 1, "prompt": b"\1" + b"\0" * 7, "gen": 2, **sampling_body(sp)}
    assert sampling_of(decode(encode("submit", body)).body, "submit") == sp
    with pytest.raises(ProtocolError, match="bias_vals"):
        sampling_of({**body, "bias_vals": body["bias_vals"][:4]}, "submit")
    for bad in ({"presence_penalty": 2.5}, {"repetition_penalty": 0.0}, {"logit_bias": ((1, 101.0),)}):
        with pytest.raises(ModelError):
            SamplingParams(**bad)
