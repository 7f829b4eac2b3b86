"""A forced tool call cut by the token limit (``dualpath.http.partial_calls`` through ``ToolCallReader.finish(cut=
True)``): for every prefix of a forced answer, in every parser's format and streamed in pieces, the reader gives the
calls written so far, each with its name and its arguments as far as they were written (a prefix of the whole
answer's arguments), and no content; an answer not forced, or not cut, keeps the rules it had."""

from __future__ import annotations

import json

import pytest

from dualpath.http.tools import ToolCallReader

NAMES = ["get_weather", "search"]
CB, CE, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
B, E = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
W_ARGS, S_ARGS = '{"city": "Paris \\"Île\\"", "days": [1, 2]}', '{"q": "events"}'

# (parser, a whole forced answer of two calls (one for llama3_json), where each call's arguments start in it)
ANSWERS = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W_ARGS}}}\n</tool_call>\n'
               f'<tool_call>\n{{"name": "search", "arguments": {S_ARGS}}}\n</tool_call>'),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {W_ARGS}}}'),
    ("deepseek_v31", f"{B}{CB}get_weather{SEP}{W_ARGS}{CE}{CB}search{SEP}{S_ARGS}{CE}{E}"),
    ("deepseek_v3", f"{B}{CB}function{SEP}get_weather\n```json\n{W_ARGS}\n```{CE}"
                    f"{CB}function{SEP}search\n```json\n{S_ARGS}\n```{CE}{E}"),
    ("mistral", f"[TOOL_CALLS]get_weather[ARGS]{W_ARGS}[TOOL_CALLS]search[ARGS]{S_ARGS}"),
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {W_ARGS}}}, '
                f'{{"name": "search", "arguments": {S_ARGS}}}]'),
]
WHOLE = [("get_weather", W_ARGS), ("search", S_ARGS)]


def cut_answer(parser: str, text: str, only: str | None, piece: int | None = None,
               forced: bool = True, cut: bool = True) -> tuple[str, list[tuple[str, str, bool]]]:
    r = ToolCallReader(parser, NAMES, forced=forced, only=only)
    content = []
    for i in range(0, len(text), piece or max(1, len(text))):
        content.append(r.feed(text[i:i + (piece or len(text))])[0])
    content.append(r.finish(cut=cut)[0])
    return "".join(content), [(c.name, c.arguments, c.cut) for c in r.calls]


def _same_args(got: str, want: str) -> bool:
    return json.loads(got) == json.loads(want)


@pytest.mark.parametrize("piece", [None, 3])
@pytest.mark.parametrize(("parser", "text"), ANSWERS, ids=[f"{p}{i}" for i, (p, _) in enumerate(ANSWERS)])
def test_every_prefix_of_a_forced_answer_gives_its_calls_so_far(parser: str, text: str, piece: int | None) -> None:
    """``required``: from the first call's whole name on, the calls so far (whole ones whole, the last one's
    arguments a prefix of what was written), never content; before it, the text as written. The calls grow with
    the prefix, and the whole answer gives both calls, not marked cut."""
    n_calls = text.count("get_weather") + text.count("search")
    seen = 0
    for k in range(1, len(text) + 1):
        content, calls = cut_answer(parser, text[:k], None, piece)
        if not calls:
            assert seen == 0 and content == text[:k], (k, content)
            continue
        assert content == "", (k, content)
        assert len(calls) >= seen, k
        seen = len(calls)
        for i, (name, args, cut) in enumerate(calls):
            assert name == WHOLE[i][0], (k, calls)
            if i < len(calls) - 1:
                assert _same_args(args, WHOLE[i][1]) and not cut, (k, calls)
            elif cut:
                assert WHOLE[i][1].startswith(args), (k, args)
            else:
                assert _same_args(args, WHOLE[i][1]), (k, calls)
    assert seen == n_calls
    assert [c[2] for c in cut_answer(parser, text, None, piece)[1]] == [False] * n_calls


@pytest.mark.parametrize(("parser", "text"), ANSWERS[:5], ids=[p for p, _ in ANSWERS[:5]])
def test_a_named_choice_names_its_call_from_the_first_token(parser: str, text: str) -> None:
    """A named choice: the first call is answered at every prefix, its name known before it is written."""
    first = text[: text.index("get_weather") + len("get_weather")]
    for k in range(1, len(first) + 1):
        content, calls = cut_answer(parser, text[:k], "get_weather")
        assert content == "" and calls[:1] == [("get_weather", "", True)], (k, content, calls)


def test_not_forced_or_not_cut_keeps_the_text() -> None:
    """``auto`` (not forced) or an answer that ended otherwise (a stop string): the unfinished call stays content,
    as written; an unfinished call whose JSON is whole is a call either way, also when the limit fell inside its
    closing tag."""
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    for forced, cut in ((False, True), (True, False)):
        assert cut_answer("hermes", text, None, forced=forced, cut=cut) == (text, [])
    whole = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_'
    for forced in (False, True):
        assert cut_answer("hermes", whole, None, forced=forced) == ("", [("get_weather", '{"city": "Paris"}', False)])
    ds = f'{B}{CB}get_weather{SEP}{{"city": "Paris"}}{CE[:5]}'
    assert cut_answer("deepseek_v31", ds, None, forced=False) == ("", [("get_weather", '{"city": "Paris"}', False)])


def test_an_undeclared_name_or_the_legacy_single_call() -> None:
    """A cut call naming no declared function stays text; the legacy ``functions`` API reads one call at most."""
    text = '<tool_call>\n{"name": "delete_all", "arguments": {"x'
    assert cut_answer("hermes", text, None) == (text, [])
    r = ToolCallReader("hermes", NAMES, max_calls=1, forced=True, only=None)
    two = ANSWERS[0][1][:-20]
    r.feed(two)
    assert r.finish(cut=True)[0] == "" and [c.name for c in r.calls] == ["get_weather"]
