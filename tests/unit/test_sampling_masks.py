"""The sampler's ``allowed_ids`` and ``bad_words`` (vLLM's ``allowed_token_ids`` and ``bad_words``) against masks
written out here in plain torch, greedy and seeded; and both on the control wire (a deployment's decode engine
gets them), a bad combination refused by field."""

from __future__ import annotations

import pytest
import torch

from dualpath.control.protocol import ProtocolError, decode, encode, sampling_body, sampling_of
from dualpath.engine.sampling import Sampler, SamplingParams
from dualpath.errors import ModelError

V = 16


def _steps(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V, generator=g) * 3 for _ in range(n)]


def _reference(steps: list[torch.Tensor], allowed: tuple[int, ...] = (),
               bad: tuple[tuple[int, ...], ...] = ()) -> list[int]:
    out: list[int] = []
    for logits in steps:
        x = logits.clone()
        if allowed:
            x[[t for t in range(V) if t not in allowed]] = float("-inf")
        for w in bad:
            if len(w) == 1 or out[-(len(w) - 1):] == list(w[:-1]):
                x[w[-1]] = float("-inf")
        out.append(int(x.argmax()))
    return out


def test_allowed_ids_mask_every_other_token_greedy_and_sampled() -> None:
    steps = _steps(40)
    allowed = (2, 5, 11)
    s = Sampler(SamplingParams(allowed_ids=allowed))
    assert [s(x, i) for i, x in enumerate(steps)] == _reference(steps, allowed=allowed)
    s = Sampler(SamplingParams(temperature=2.0, seed=7, allowed_ids=allowed))
    picks = [s(x, i) for i, x in enumerate(steps)]
    assert set(picks) <= set(allowed) and len(set(picks)) > 1  # (sampled: more than one of them)


def test_bad_words_ban_one_token_words_always_and_longer_ones_after_their_start() -> None:
    # a logit table whose greedy path is 3, 5, 3, 5, ...: the two-token word (3, 5) is never completed
    steps = []
    for i in range(12):
        x = torch.zeros(V)
        x[3 if i % 2 == 0 else 5] = 5.0
        x[9] = 4.0
        steps.append(x)
    plain = Sampler(SamplingParams())
    assert [plain(x, i) for i, x in enumerate(steps)][:2] == [3, 5]
    for bad in (((3, 5),), ((9,),), ((3, 5), (9,)), ((7, 3, 5),)):
        s = Sampler(SamplingParams(bad_words=bad))
        got = [s(x, i) for i, x in enumerate(steps)]
        assert got == _reference(steps, bad=bad), bad
    s = Sampler(SamplingParams(bad_words=((3, 5),)))
    got = [s(x, i) for i, x in enumerate(steps)]
    assert all(got[i:i + 2] != [3, 5] for i in range(len(got) - 1)) and got[:2] == [3, 9]
    # random logits, several words, against the reference
    steps = _steps(60, seed=1)
    bad = ((4,), (1, 2), (6, 6, 6))
    s = Sampler(SamplingParams(bad_words=bad, allowed_ids=tuple(range(10))))
    assert [s(x, i) for i, x in enumerate(steps)] == _reference(steps, allowed=tuple(range(10)), bad=bad)


def test_masks_travel_on_the_control_wire_and_bad_ones_are_refused() -> None:
    p = SamplingParams(temperature=0.5, seed=2, allowed_ids=(1, 4, 9), bad_words=((3,), (5, 6, 7)))
    body = {"session": 1, "prompt": b"\x01" + b"\0" * 7, "gen": 4, **sampling_body(p)}
    assert sampling_of(decode(encode("submit", body)).body, "submit") == p
    assert "allowed_ids" not in sampling_body(SamplingParams()) and "bad_ids" not in sampling_body(SamplingParams())
    with pytest.raises(ProtocolError, match="bad_lens"):
        sampling_of({**body, "bad_lens": [1, 2]}, "submit")
    with pytest.raises(ProtocolError, match="allowed_ids"):
        encode("submit", {**body, "allowed_ids": [-1]})
    with pytest.raises(ModelError, match="bad_words"):
        SamplingParams(bad_words=((),))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_masks_that_exclude_every_token_are_the_requests_error_never_a_masked_pick(temperature: float) -> None:
    """``allowed_ids`` all among one-token ``bad_words``, or a stop id alone allowed while ``min_tokens`` masks it:
    no token is left, and the sampler says so naming the fields (greedy once picked token 0, masked; sampled
    failed inside torch.multinomial). A token still left is picked as before."""
    x = torch.randn(V, generator=torch.Generator().manual_seed(3))
    s = Sampler(SamplingParams(temperature=temperature, seed=1, allowed_ids=(4, 9), bad_words=((4,), (9,))))
    with pytest.raises(ModelError, match=r"token 1 of the answer: allowed_token_ids, bad_words exclude every token"):
        s(x, 0)
    s = Sampler(SamplingParams(temperature=temperature, seed=1, allowed_ids=(7,), stop_ids=(7,), min_tokens=2))
    with pytest.raises(ModelError, match=r"token 2 .*allowed_token_ids, min_tokens exclude"):
        s(x, 1)
    assert s(x, 2) == 7  # min_tokens reached: the stop id is allowed again
    left = Sampler(SamplingParams(temperature=temperature, seed=1, allowed_ids=(4, 9), bad_words=((4,),)))
    assert left(x, 0) == 9
