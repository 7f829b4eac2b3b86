"""The reasoning reader (``dualpath.http.reasoning``): what is reasoning and what is content, whole and streamed in
pieces of every size (the same split however the text arrives)."""

from __future__ import annotations

import pytest

from dualpath.http.reasoning import ReasoningReader, reasoning_enabled, reasoning_tokens, starts_in_reasoning

CASES = [
    # (text, prompt opened the block, reasoning, content)
    ("<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", False, "\nLet me see: 2+2.\n", "\n\nIt is 4."),
    ("\n <think>a < b </thin k></think>ok", False, "a < b </thin k>", "ok"),  # leading space; tag-like text
    ("It is 4. <think>no</think>", False, "", "It is 4. <think>no</think>"),  # not at the start: all content
    ("<thi", False, "", "<thi"),  # an unfinished tag at the end is content
    ("Let me see.\n</think>\n\n4", True, "Let me see.\n", "\n\n4"),  # DeepSeek-R1: the prompt opened it
    ("<think>again</think>4", True, "again", "4"),  # the model repeats the opening tag: dropped once
    ("cut short by max_tokens </thi", True, "cut short by max_tokens </thi", ""),  # never closed: all reasoning
    ("<think></think>", False, "", ""),
    ("", True, "", ""),
]


def _split(text: str, in_reasoning: bool, step: int, reader: object = None) -> tuple[str, str]:
    """``text`` fed to a reader (a :class:`ReasoningReader` by default) ``step`` characters at a time."""
    r: object = reader if reader is not None else ReasoningReader(in_reasoning)
    got = ["", ""]
    for i in range(0, len(text), step):
        a, b = r.feed(text[i:i + step])  # type: ignore[attr-defined]
        got[0] += a
        got[1] += b
    a, b = r.finish()  # type: ignore[attr-defined]
    assert (r.reasoning, r.content) == (got[0] + a, got[1] + b)  # type: ignore[attr-defined]
    return got[0] + a, got[1] + b


@pytest.mark.parametrize("text,opened,reasoning,content", CASES)
def test_whole_and_streamed_splits_agree(text, opened, reasoning, content):
    for step in (max(1, len(text)), 1, 2, 3, 5):
        assert _split(text, opened, step) == (reasoning, content), step


def test_held_text_is_only_a_possible_tag():
    """Reasoning is passed on as it comes except a suffix that may start ``</think>``; content once it is content."""
    r = ReasoningReader(True)
    assert r.feed("abc </") == ("abc ", "")
    assert r.feed("b> more") == ("</b> more", "")
    assert r.feed("</think>x") == ("", "x")
    assert r.feed("<think>y") == ("", "<think>y")


def test_prompt_and_tokenizer_decide():
    assert starts_in_reasoning("<|User|>hi<|Assistant|><think>\n")
    assert not starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not starts_in_reasoning("no tags")

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def decode(self, ids, skip_special_tokens=False):
            return "".join(self.vocab_inv[i] for i in ids)

    tagged, plain = Tok({"<think>": 5, "</think>": 6, "a": 1}), Tok({"a": 1})
    assert reasoning_enabled("auto", tagged) and not reasoning_enabled("auto", plain)
    assert reasoning_enabled("think", plain) and not reasoning_enabled("none", tagged)
    assert not reasoning_enabled("auto", None)
    tagged.vocab_inv = {v: k for k, v in tagged.vocab.items()}
    r = ReasoningReader(False)
    r.feed("<think>aa</think>a")
    assert reasoning_tokens(tagged, [5, 1, 1, 6, 1], r) == 4
    assert reasoning_tokens(tagged, [5, 1, 1, 6, 1], None) == 0
    open_r = ReasoningReader(True)
    open_r.feed("aaa")
    assert reasoning_tokens(tagged, [1, 1, 1], open_r) == 3


HARMONY = [
    # (text, reasoning, content, calls)
    ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.",
     "Think.", "It is 4.", []),
    # the recipient after the role, the body unclosed (<|call|> is a stop token, so the text ends there)
    ('<|channel|>analysis<|message|>a<|end|><|start|>assistant to=functions.search<|channel|>commentary json'
     '<|message|>{"q": "x"}', "a", "", [("search", '{"q": "x"}')]),
    # a preamble in commentary is content; an undeclared function's body too
    ('<|channel|>commentary<|message|>Checking. <|end|><|start|>assistant<|channel|>commentary to=functions.rm '
     '<|constrain|>json<|message|>{"p": 1}', "", 'Checking. {"p": 1}', []),
    ("no markup at all <|", "", "no markup at all <|", []),
]


@pytest.mark.parametrize("text,reasoning,content,calls", HARMONY)
def test_harmony_whole_and_streamed(text, reasoning, content, calls):
    from dualpath.http.harmony import HarmonyReader

    for step in (len(text), 1, 2, 7):
        r = HarmonyReader(frozenset({"search", "get_weather"}))
        assert (*_split(text, False, step, r), r.calls) == (reasoning, content, calls), step
