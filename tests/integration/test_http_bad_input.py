"""Bodies a careless or hostile client sends, against the shared real-model server: each gets an OpenAI-shaped 400
naming what is wrong, and the connection it came on keeps serving."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(embedded_http):  # type: ignore[no-untyped-def]
    return embedded_http[0]


def _error(r):  # type: ignore[no-untyped-def]
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


LONE = [
    ("/v1/chat/completions", '{"max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800 hi"}]}',
     "messages.0.content"),
    ("/v1/completions", '{"max_tokens": 2, "prompt": ["fine", "\\udfff"]}', "prompt.1"),
    ("/tokenize", '{"prompt": "x \\uD83D"}', "prompt"),
    ("/v1/responses", '{"max_output_tokens": 2, "input": "\\udc00"}', "input"),
]


def test_a_lone_surrogate_is_a_400_naming_its_field_and_the_connection_goes_on(server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server, timeout=120) as cl:
        for path, body, where in LONE:
            e = _error(cl.post(path, content=body, headers={"content-type": "application/json"}))
            assert e["param"] == where and "lone UTF-16 surrogate" in e["message"], (path, e)
            ok = cl.post("/tokenize", json={"prompt": "still here"})  # the same keep-alive connection
            assert ok.status_code == 200, ok.text
        pair = cl.post("/v1/chat/completions", headers={"content-type": "application/json"},
                       content='{"max_tokens": 1, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
        assert pair.status_code == 200, pair.text  # a pair is an emoji


def test_malformed_bodies_and_messages_are_named(server) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": "hi"}]
    with httpx.Client(base_url=server, timeout=120) as cl:
        e = _error(cl.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"}))
        assert e["message"] == "the request body is empty: send a JSON object"
        e = _error(cl.post("/v1/chat/completions", content=b'{"messages": []}', headers={"content-type": "text/plain"}))
        assert "Content-Type: application/json" in e["message"]
        e = _error(cl.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text"}]}]}))
        assert e["param"] == "messages.0.content.0" and "needs its 'text'" in e["message"], e
        e = _error(cl.post("/v1/chat/completions", json={"max_tokens": 1, "messages": [
            *msgs, {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42"}]}))
        assert e["param"] == "messages.2" and "tool_call_id" in e["message"], e
        e = _error(cl.post("/v1/chat/completions", json={"max_tokens": 1, "messages": msgs,
                                                         "logit_bias": {"99999999": 1}}))
        assert e["param"] == "logit_bias" and e["code"] == "unsupported_parameter"
        e = _error(cl.post("/v1/chat/completions", json={"max_tokens": 1, "messages": msgs,
                                                         "stream_options": {"include_usage": True}}))
        assert e["param"] == "stream_options"
        # a stop string of a megabyte held the event loop for seconds per token: at most 4,096 characters
        e = _error(cl.post("/v1/completions", json={"max_tokens": 1, "prompt": "hi", "stop": ["x", "é" * 4097]}))
        assert e["param"] == "stop" and "4096 characters" in e["message"], e
        ok = cl.post("/v1/completions", json={"max_tokens": 2, "prompt": "hi", "stop": ["é" * 4096]})
        assert ok.status_code == 200, ok.text
        # a top_k past the control protocol's int32 keeps every token (it was a 503, which clients retry)
        ok = cl.post("/v1/completions", json={"max_tokens": 2, "prompt": "hi", "top_k": 1 << 40})
        assert ok.status_code == 200, ok.text
        # a one-token prompt's log-probabilities: its first token has none (it was a 503 "lost in transit")
        one = cl.post("/v1/completions", json={"max_tokens": 1, "prompt": [9906], "prompt_logprobs": 1,
                                               "echo": True, "logprobs": 1})
        assert one.status_code == 200, one.text
        ch = one.json()["choices"][0]
        assert ch["prompt_logprobs"] == [None] and ch["logprobs"]["token_logprobs"][0] is None, ch
