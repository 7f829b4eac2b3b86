"""Reasoning apart from content (``http.reasoning_parser``) through a real server and the official ``openai``
client: chat whole and streamed (with tool calls after the thoughts), a prompt that opens the block itself,
the Responses API whole and streamed, an earlier answer's thoughts resent by the client, and the default (off)
leaving the text as written. What the model says is scripted (:class:`ScriptedBackend` of ``test_http_tools``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_http_tools import CALL_TEXT, TOOLS, WANT, ScriptedBackend, _calls, _with_server

from dualpath.http.config import HttpConfig

openai = pytest.importorskip("openai")

THOUGHTS = "\nThe user wants the weather; <b>call</b> the tool.\n"
TEXT = f"<think>{THOUGHTS}</think>\n\n{CALL_TEXT}"
ON = HttpConfig(port=0, reasoning_parser="think")
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def _extra(obj: Any, name: str) -> Any:
    return (obj.model_extra or {}).get(name, getattr(obj, name, None))


@pytest.mark.anyio
async def test_chat_whole_and_streamed_with_tools_after_the_thoughts(tokenizer):
    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=300)
        m = r.choices[0].message
        assert _extra(m, "reasoning_content") == _extra(m, "reasoning") == THOUGHTS
        assert m.content == "\n\nI will look it up.\n" and _calls(m.tool_calls) == WANT
        assert r.choices[0].finish_reason == "tool_calls"
        thoughts, content, calls = "", "", {}
        stream = await client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=300,
                                                      stream=True)
        async for chunk in stream:
            for ch in chunk.choices:
                d = ch.delta
                thoughts += _extra(d, "reasoning_content") or ""
                assert not (_extra(d, "reasoning_content") and d.content)  # one or the other per chunk
                content += d.content or ""
                for tc in d.tool_calls or []:
                    slot = calls.setdefault(tc.index, ["", ""])
                    slot[0] += tc.function.name or ""
                    slot[1] += tc.function.arguments or ""
        assert thoughts == THOUGHTS and content == "\n\nI will look it up.\n" and len(calls) == 2

    await _with_server(ScriptedBackend(tokenizer, TEXT), body, ON)


@pytest.mark.anyio
async def test_off_by_default_and_a_prompt_that_opens_the_block(tokenizer):
    tok = copy.deepcopy(tokenizer)  # a DeepSeek-R1-like template: the prompt ends inside <think>, and it renders
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"  # resent thoughts
                         "{% if m.reasoning_content %}[thought: {{ m.reasoning_content }}]{% endif %}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    backend = ScriptedBackend(tok, "Just 4.\n</think>\n\nIt is 4.")

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", max_tokens=100, messages=[
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "easy"},
            {"role": "user", "content": "and again?"}])
        m = r.choices[0].message
        assert _extra(m, "reasoning_content") == "Just 4.\n" and m.content == "\n\nIt is 4."
        r = await client.chat.completions.create(model="scripted", max_tokens=4, messages=MSGS)  # cut short
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "length" and m.content is None
        assert _extra(m, "reasoning_content") == tok.decode(backend.script[:4])

    await _with_server(backend, body, ON)
    assert "[thought: easy]" in tok.decode(backend.prompts[0])

    async def off(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=300)
        m = r.choices[0].message
        assert m.content == TEXT and _extra(m, "reasoning_content") is None

    await _with_server(ScriptedBackend(tokenizer, TEXT), off)


@pytest.mark.anyio
async def test_responses_api_reasoning_item_whole_and_streamed(tokenizer):
    answer = f"<think>{THOUGHTS}</think>It is sunny."

    async def body(client: Any) -> None:
        r = await client.responses.create(model="scripted", input="Weather?", max_output_tokens=300)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == THOUGHTS and r.output_text == "It is sunny."
        n_think = r.usage.output_tokens_details.reasoning_tokens
        assert 0 < n_think < r.usage.output_tokens
        assert tokenizer.decode(ScriptedBackend(tokenizer, answer).script[:n_think]).endswith("</think>")
        events = []
        stream = await client.responses.create(model="scripted", input="Weather?", max_output_tokens=300,
                                               stream=True)
        async for ev in stream:
            events.append(ev)
        kinds = [e.type for e in events]
        assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THOUGHTS
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "It is sunny."
        added = [e for e in events if e.type == "response.output_item.added"]
        assert [(e.output_index, e.item.type) for e in added] == [(0, "reasoning"), (1, "message")]
        done = events[-1].response
        assert done.status == "completed" and [o.type for o in done.output] == ["reasoning", "message"]
        assert done.output[0].content[0].text == THOUGHTS and done.output_text == "It is sunny."
        # tools after the thoughts: reasoning, the message, then one item per call
        r = await client.responses.create(model="scripted", input="Weather?", max_output_tokens=300,
                                          tools=[{"type": "function", **t["function"]} for t in TOOLS])
        assert [o.type for o in r.output][:2] == ["reasoning", "message"]

    await _with_server(ScriptedBackend(tokenizer, answer), body, ON)


@pytest.mark.anyio
async def test_responses_api_takes_its_own_output_back_reasoning_and_references(tokenizer):
    """A stateless agent sends the previous response's output items back as input (store off, as the Agents
    SDK and Codex do): the reasoning item's text reaches the template as the next assistant message's
    ``reasoning_content`` (this template renders it as ``[thought: ...]``); a summary-only item gives its
    summary, an opaque ``encrypted_content`` alone nothing. An ``item_reference`` to a stored response's item
    is that item; one that names nothing stored is a 400 naming its id."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{% if m.reasoning_content %}[thought: {{ m.reasoning_content }}]{% endif %}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = ScriptedBackend(tok, f"<think>{THOUGHTS}</think>It is sunny.")

    async def body(client: Any) -> None:
        r1 = await client.responses.create(model="scripted", input="Weather?", max_output_tokens=300)
        assert [o.type for o in r1.output] == ["reasoning", "message"]
        back = [{"role": "user", "content": "Weather?"}, *[o.model_dump(exclude_none=True) for o in r1.output],
                {"role": "user", "content": "And tomorrow?"}]
        await client.responses.create(model="scripted", input=back, max_output_tokens=300, store=False)
        sent = tok.decode(backend.prompts[-1])
        assert f"It is sunny.[thought: {THOUGHTS}]" in sent and sent.endswith("And tomorrow?<|im_end|>\n"
                                                                             "<|im_start|>assistant\n")
        summary = {"type": "reasoning", "id": "rs_x", "summary": [{"type": "summary_text", "text": "short"}]}
        opaque = {"type": "reasoning", "id": "rs_y", "summary": [], "encrypted_content": "gAAAA"}
        for item, want in ((summary, "[thought: short]"), (opaque, "It is sunny.<|im_end|>")):
            await client.responses.create(model="scripted", max_output_tokens=300, input=[
                back[0], item, {"role": "assistant", "content": "It is sunny."}, back[-1]])
            assert want in tok.decode(backend.prompts[-1])
        # an item_reference is the stored item itself: the same prompt as sending it
        ref = [back[0], {"type": "item_reference", "id": r1.output[0].id},
               {"type": "item_reference", "id": r1.output[1].id}, back[-1]]
        await client.responses.create(model="scripted", input=ref, max_output_tokens=300)
        assert backend.prompts[-1] == backend.prompts[1]
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="scripted", max_output_tokens=5,
                                          input=[{"type": "item_reference", "id": "msg_nowhere"}])
        assert e.value.body["param"] == "input[0].id"

    await _with_server(backend, body, ON)
