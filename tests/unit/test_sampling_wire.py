"""Every sampling parameter reaches a deployment's engine processes: each field of
:class:`~dualpath.engine.sampling.SamplingParams`, set away from its default, survives the control wire
(``sampling_body`` -> ``encode`` -> ``decode`` -> ``sampling_of``). A field added to the dataclass but not to the
wire fails here, before a deployment silently samples differently from the in-process cluster."""

from __future__ import annotations

import dataclasses
import random

import pytest

from dualpath.control.protocol import decode, encode, sampling_body, sampling_of
from dualpath.engine.sampling import SamplingParams

#: a value away from the default for every field (each one checked to differ from it below)
AWAY = {
    "temperature": 0.7, "top_p": 0.85, "top_k": 40, "min_p": 0.05, "seed": 1234, "stop_ids": (2, 7),
    "min_tokens": 3, "logprobs": 4, "prompt_logprobs": 2, "grammar": 'start: "yes" | "no"',
    "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.3,
    "logit_bias": ((5, -100.0), (9, 2.5)), "allowed_ids": (3, 5, 9, 11), "bad_words": ((4,), (6, 8)),
}


def _roundtrip(p: SamplingParams) -> SamplingParams:
    body = {"session": 1, "prompt": b"\x01" + b"\0" * 7, "gen": 4, **sampling_body(p)}
    return sampling_of(decode(encode("submit", body)).body, "submit")


def test_every_field_is_listed_and_away_from_its_default() -> None:
    default = SamplingParams()
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sorted(AWAY) == sorted(names), "a SamplingParams field is missing from this test (and maybe the wire)"
    for name in names:
        assert AWAY[name] != getattr(default, name), name


@pytest.mark.parametrize("name", sorted(AWAY))
def test_each_field_alone_survives_the_wire(name: str) -> None:
    extra = {"temperature": 0.7} if name in ("top_p", "top_k", "min_p", "seed") else {}
    p = SamplingParams(**{name: AWAY[name], **extra})
    assert _roundtrip(p) == p


def test_all_fields_together_and_random_mixes_survive_the_wire() -> None:
    assert _roundtrip(SamplingParams(**AWAY)) == SamplingParams(**AWAY)
    rng = random.Random(0)
    for _ in range(200):
        chosen = {k: v for k, v in AWAY.items() if rng.random() < 0.5}
        p = SamplingParams(**chosen)
        assert _roundtrip(p) == p, chosen
