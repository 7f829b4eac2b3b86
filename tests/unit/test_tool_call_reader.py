"""Tool calls read out of generated text (``dualpath.http.tools``): whole and streamed in pieces of every size,
the same calls and content either way; malformed or undeclared calls stay content; the fallback system text for
templates without tools; the parser picked for a template."""

from __future__ import annotations

import json

import pytest

from dualpath.http.tools import (
    ToolCallReader,
    ToolDef,
    parser_for,
    template_takes_tools,
    with_tools_in_text,
)

NAMES = ["get_weather", "search"]
B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"  # DeepSeek's markers (U+FF5C, U+2581)
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def read(parser: str, text: str, piece: int | None = None,
         max_calls: int | None = None) -> tuple[str, list[tuple[str, dict]]]:
    r = ToolCallReader(parser, NAMES, max_calls)
    out = []
    pieces = [text] if piece is None else [text[i:i + piece] for i in range(0, len(text), piece)]
    for p in pieces:
        content, calls = r.feed(p)
        out.append(content)
        assert all(c in r.calls for c in calls)
    content, _ = r.finish()
    out.append(content)
    return "".join(out), [(c.name, json.loads(c.arguments)) for c in r.calls]


CASES = [
    # (parser, text, content, calls)
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>{"name": "search", "arguments": {"q": "a<b"}}</tool_call>\n'
               '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
     "", [("search", {"q": "a<b"}), ("get_weather", {"city": "Oslo"})]),
    # the generation ended inside the call, its JSON whole: still a call
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n', "", [("search", {"q": "x"})]),
    # unknown function, broken JSON, non-object arguments: the text stays, unchanged
    ("hermes", 'a <tool_call>{"name": "rm", "arguments": {}}</tool_call> b',
     'a <tool_call>{"name": "rm", "arguments": {}}</tool_call> b', []),
    ("hermes", 'x <tool_call>{"name": "search", "arguments": {"q": </tool_call>',
     'x <tool_call>{"name": "search", "arguments": {"q": </tool_call>', []),
    ("hermes", '<tool_call>{"name": "search", "arguments": [1]}', '<tool_call>{"name": "search", "arguments": [1]}',
     []),
    # blank text after a call only separates it from what follows
    ("hermes", 'Sure.<tool_call>{"name": "search", "arguments": {}}</tool_call>\n\n  Done.', "Sure.Done.",
     [("search", {})]),
    # no call at all, with text that looks like the start of a tag
    ("hermes", "use <tool or <tool_cal and < signs", "use <tool or <tool_cal and < signs", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Rome"}}', "",
     [("get_weather", {"city": "Rome"})]),
    ("llama3_json", '<|python_tag|>{"name": "search", "parameters": {"q": "}{"}}; {"name": "get_weather", '
                    '"parameters": {}}', "", [("search", {"q": "}{"}), ("get_weather", {})]),
    ("llama3_json", "The weather is fine.", "The weather is fine.", []),
    ("llama3_json", '{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    ("llama3_json", '{"not": "a call"} trailing', '{"not": "a call"} trailing', []),
    # DeepSeek-V3.1's markers (either parser reads both shapes)
    ("deepseek_v31", 'Let me check.' + B + CB + 'get_weather' + SEP + '{"city": "Paris"}' + CE
                     + CB + 'search' + SEP + '{"q": "a<b"}' + CE + E + ' Done.',
     "Let me check. Done.", [("get_weather", {"city": "Paris"}), ("search", {"q": "a<b"})]),
    # DeepSeek-V3's: function<sep>NAME, then the arguments fenced as json
    ("deepseek_v3", B + CB + 'function' + SEP + 'search\n```json\n{"q": "x"}\n```' + CE + E, "",
     [("search", {"q": "x"})]),
    # an undeclared function stays content (markers and all); the generation ending inside a whole call
    ("deepseek_v31", 'a ' + B + CB + 'rm' + SEP + '{}' + CE + E + ' b', 'a ' + B + CB + 'rm' + SEP + '{}' + CE + ' b',
     []),
    ("deepseek_v31", B + CB + 'search' + SEP + '{"q": "y"}', "", [("search", {"q": "y"})]),
    ("deepseek_v3", "no block, only <｜tool and ｜> signs", "no block, only <｜tool and ｜> signs", []),
    # Mistral before v11: one JSON array after [TOOL_CALLS]; text after it stays content
    ("mistral", 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "search", '
                '"arguments": {"q": "a]b"}}] done', "Sure. done",
     [("get_weather", {"city": "Paris"}), ("search", {"q": "a]b"})]),
    # v11+: NAME[ARGS]{...} per call (a [CALL_ID] may come first)
    ("mistral", 'Hi[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]search[CALL_ID]a1B2c3D4e[ARGS]{"q": "}"}',
     "Hi", [("get_weather", {"city": "Rome"}), ("search", {"q": "}"})]),
    ("mistral", '[TOOL_CALLS]rm[ARGS]{"path": "/"} ok', '[TOOL_CALLS]rm[ARGS]{"path": "/"} ok', []),
    ("mistral", "[TOOL_CALLS] not json at all", "[TOOL_CALLS] not json at all", []),
    ("mistral", "a [TOOL_CALL or [TOOLS] text", "a [TOOL_CALL or [TOOLS] text", []),
]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_calls_and_content_whole_and_streamed_in_every_piece_size(parser, text, content, calls):
    assert read(parser, text) == (content, calls)
    for piece in range(1, len(text) + 1):
        assert read(parser, text, piece) == (content, calls), piece


def test_content_before_a_call_streams_before_the_call_ends():
    r = ToolCallReader("hermes", NAMES)
    assert r.feed("Checking the weather <tool") == ("Checking the weather ", [])  # '<tool' held: may be a tag
    assert r.feed('_call>{"name": "get_weather", ') == ("", [])
    content, calls = r.feed('"arguments": {"city": "Lima"}}</tool_call>')
    assert content == "" and [c.name for c in calls] == ["get_weather"]
    assert calls[0].id.startswith("call_") and calls[0].as_dict()["type"] == "function"


def test_parser_for_a_template():
    qwen = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> <tool_call>{% endif %}"
    llama = "{% if tools %}Environment: ipython ... <|python_tag|>{% endif %}"
    assert parser_for("auto", qwen) == "hermes" and template_takes_tools(qwen)
    assert parser_for("auto", llama) == "llama3_json"
    assert parser_for("auto", "{{ messages }}") == "hermes" and not template_takes_tools("{{ messages }}")
    assert parser_for("llama3_json", qwen) == "llama3_json"
    # DeepSeek templates: V3 fences the arguments, V3.1 does not; a template that renders no tools gets the
    # fallback system text, whose format is hermes
    v31 = "{% for tool in tools %}{{ tool.function.name }}{% endfor %}<｜tool▁calls▁begin｜><｜tool▁sep｜>"
    assert parser_for("auto", v31) == "deepseek_v31"
    assert parser_for("auto", v31 + "```json") == "deepseek_v3"
    assert parser_for("auto", "<｜tool▁calls▁begin｜>{{ messages }}") == "hermes"
    assert parser_for("auto", "ipython <|python_tag|>{{ messages }}") == "hermes"
    assert parser_for("auto", "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS][TOOL_CALLS]") == "mistral"
    assert parser_for("auto", "{{ tools }}<|start|>assistant<|channel|>commentary to=functions.x") == "harmony"
    with pytest.raises(ValueError, match="tool parser"):
        ToolCallReader("auto", NAMES)


def test_a_template_without_tools_gets_them_in_the_system_message_and_its_history_calls_in_text():
    tools = [ToolDef.model_validate({"type": "function", "function": {
        "name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}})]
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]
    out = with_tools_in_text(msgs, tools)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert "tool_calls" not in out[2] and msgs[1]["tool_calls"]  # the caller's messages are not changed
    # the model's own format reads back as the same call
    assert read("hermes", out[2]["content"]) == ("", [("get_weather", {"city": "Paris"})])
    sys_first = with_tools_in_text([{"role": "system", "content": "Be brief."}, msgs[0]], tools)
    assert sys_first[0]["content"].startswith("Be brief.\n\n") and len(sys_first) == 2


def test_tool_definitions_are_validated():
    with pytest.raises(ValueError):
        ToolDef.model_validate({"type": "function", "function": {"name": "bad name!"}})
    with pytest.raises(ValueError):
        ToolDef.model_validate({"type": "retrieval", "function": {"name": "x"}})
    with pytest.raises(ValueError):
        ToolDef.model_validate({"type": "function", "function": {"name": "x", "bogus": 1}})


@pytest.mark.parametrize("piece", [None, 1, 7])
def test_max_calls_leaves_later_calls_as_content(piece: int | None) -> None:
    # the legacy functions API answers with one call: a second one stays in the content, as written
    second = '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
    text = 'Sure.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n' + second + " ok"
    assert read("hermes", text, piece, max_calls=1) == ("Sure.\n" + second + " ok", [("get_weather", {"city": "Oslo"})])
    assert read("hermes", text, piece)[1] == [("get_weather", {"city": "Oslo"}), ("search", {"q": "x"})]
    two = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "search", "parameters": {}}'
    assert read("llama3_json", two, piece, max_calls=1) == (two, [])
    assert read("llama3_json", two.split(";")[0], piece, max_calls=1)[1] == [("get_weather", {"city": "Oslo"})]
    ds = B + CB + 'search' + SEP + '{"q": "x"}' + CE + CB + 'get_weather' + SEP + '{}' + CE + E + "!"
    assert read("deepseek_v31", ds, piece, max_calls=1) == (CB + 'get_weather' + SEP + '{}' + CE + E + "!",
                                                           [("search", {"q": "x"})])
