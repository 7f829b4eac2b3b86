"""gpt-oss's harmony answers through a real server and the official ``openai`` client: the analysis channel as
``reasoning_content``, the final channel as content, a commentary message to ``functions.NAME`` as a tool call,
whole and streamed, and the Responses API's reasoning item. The tokenizer is the embedded one with harmony's
markers added as special tokens (as gpt-oss's are) and a harmony-style template of our own; what the model says is
scripted (:class:`ScriptedBackend` of ``test_http_tools``)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from test_http_tools import TOOLS, ScriptedBackend, _calls, _with_server

openai = pytest.importorskip("openai")

MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>"]
TEMPLATE = ("<|start|>system<|message|>Reasoning: {{ reasoning_effort or 'medium' }}<|end|>"
            "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] or '' }}<|end|>{% endfor %}"
            "{% if tools %}<|start|>developer<|message|># Tools\nnamespace functions: "
            "{% for t in tools %} type {{ t.function.name }} = (_: any) => any; {% endfor %} "
            "(calls: <|channel|>commentary to=functions.NAME){% endif %}<|start|>assistant")
CALL = ('<|channel|>analysis<|message|>Need the weather in Paris.<|end|><|start|>assistant<|channel|>commentary '
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
ANSWER = "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>It is 4."


@pytest.fixture(scope="module")
def harmony_tok():
    from dualpath import load_tokenizer

    tok = copy.deepcopy(load_tokenizer())
    tok.add_tokens(MARKERS, special_tokens=True)
    tok.chat_template = TEMPLATE
    return tok


def _extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name)


@pytest.mark.anyio
async def test_a_call_after_the_analysis_whole_and_streamed(harmony_tok):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=300)
        m = r.choices[0].message
        assert _extra(m, "reasoning_content") == "Need the weather in Paris."
        assert _calls(m.tool_calls) == [("get_weather", {"city": "Paris"})] and not m.content
        assert r.choices[0].finish_reason == "tool_calls"
        thoughts, content, calls = "", "", []
        stream = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=300,
                                                      stream=True)
        async for chunk in stream:
            for ch in chunk.choices:
                thoughts += _extra(ch.delta, "reasoning_content") or ""
                content += ch.delta.content or ""
                calls += [(tc.function.name, json.loads(tc.function.arguments)) for tc in ch.delta.tool_calls or []]
        assert thoughts == "Need the weather in Paris." and content == ""
        assert calls == [("get_weather", {"city": "Paris"})]

    from dualpath.http.backend import stop_ids_of

    backend = ScriptedBackend(harmony_tok, CALL)
    stops = stop_ids_of(harmony_tok)  # a call ends gpt-oss's turn (<|call|>), as an answer does (<|return|>)
    assert {harmony_tok.convert_tokens_to_ids(t) for t in ("<|call|>", "<|return|>")} <= set(stops)
    await _with_server(backend, body)
    assert "namespace functions" in harmony_tok.decode(backend.prompts[0])


@pytest.mark.anyio
async def test_final_channel_is_the_content_and_the_responses_api(harmony_tok):
    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", max_tokens=300,
                                                 messages=[{"role": "user", "content": "2+2?"}])
        m = r.choices[0].message
        assert m.content == "It is 4." and _extra(m, "reasoning_content") == "Simple."
        r = await client.responses.create(model="scripted", input="2+2?", max_output_tokens=300)
        assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "It is 4."
        assert r.output[0].content[0].text == "Simple."
        n_think = r.usage.output_tokens_details.reasoning_tokens
        assert 0 < n_think < r.usage.output_tokens

    backend = ScriptedBackend(harmony_tok, ANSWER)
    await _with_server(backend, body)
    assert "Reasoning: medium" in harmony_tok.decode(backend.prompts[0])

    async def effort(client: Any) -> None:  # the request's effort reaches the template's reasoning_effort
        await client.chat.completions.create(model="scripted", max_tokens=5, reasoning_effort="high",
                                             messages=[{"role": "user", "content": "2+2?"}])
        await client.responses.create(model="scripted", input="2+2?", max_output_tokens=5,
                                      reasoning={"effort": "low"})

    backend = ScriptedBackend(harmony_tok, ANSWER)
    await _with_server(backend, effort)
    assert ["Reasoning: high" in harmony_tok.decode(p) for p in backend.prompts] == [True, False]
    assert "Reasoning: low" in harmony_tok.decode(backend.prompts[1])
