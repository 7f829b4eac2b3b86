"""Reasoning ("thinking") text of ``/v1/chat/completions`` answers, apart from their content.

Reasoning models write their thoughts between ``<think>`` and ``</think>`` before the answer: Qwen3 and QwQ,
DeepSeek-R1 and DeepSeek-V3.1 / V3.2 in thinking mode, GLM-4.5, SmolLM3. Many of their chat templates open the
block in the prompt (DeepSeek-R1 ends it with ``<think>\\n``), so the answer starts inside it and only closes it.
With ``http.reasoning_parser`` on, the answer's message carries the thoughts as ``reasoning_content`` (the name
DeepSeek's API and vLLM use; ``reasoning`` too, as newer clients read it) and ``content`` keeps only what follows
``</think>``; streamed, each chunk's ``delta`` carries one or the other. Tool calls are read from the content only.

* ``none`` (the default, as vLLM without ``--reasoning-parser``): the text is the content, tags and all.
* ``think``: always parse.
* ``auto``: parse when the tokenizer has both tags as tokens of their own (the models above).

What is reasoning (:class:`ReasoningReader`): when the prompt ends inside an open block (its last ``<think>`` comes
after its last ``</think>``), the answer starts in reasoning; otherwise it does when its text, after leading
whitespace, starts with ``<think>``. Reasoning ends at the first ``</think>``; everything after it is content, as
written. An answer that starts with anything else is all content (a ``<think>`` later in it is not parsed), and one
that never closes its block (cut by ``max_tokens``) is all reasoning. The tags themselves are dropped; nothing else
the model wrote is. The reader works on the text as it streams: text that may still turn out to be the start of a
tag is held back until it cannot (the same text comes out, whole or streamed).
"""

from __future__ import annotations

from typing import Any

from dualpath.http.markers import held_prefix

#: values of ``http.reasoning_parser``
REASONING_PARSERS = ("none", "auto", "think")
OPEN, CLOSE = "<think>", "</think>"
TAGS = (OPEN, CLOSE)


def reasoning_enabled(parser: str, tokenizer: Any) -> bool:
    """Whether answers are split into reasoning and content under ``parser`` for this tokenizer."""
    if parser == "none" or tokenizer is None:
        return False
    if parser == "think":
        return True
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary to look at: no parsing
        return False
    return OPEN in vocab and CLOSE in vocab


def starts_in_reasoning(prompt_text: str) -> bool:
    """Whether a prompt (its rendered text) leaves a ``<think>`` block open for the answer to continue."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


class ReasoningReader:
    """Splits one answer's text, as it streams, into reasoning and content (see the module docstring).

    ``feed(text)`` returns ``(reasoning, content)``: what of each can be passed on now; ``finish()`` returns what
    was held back at the end. ``reasoning`` and ``content`` accumulate everything passed on."""

    tags = TAGS

    def __init__(self, in_reasoning: bool) -> None:
        self.state = "reasoning" if in_reasoning else "start"
        self._strip_open = in_reasoning  # a model may write the block's <think> again although the prompt opened it
        self._buf = ""
        self.reasoning = ""
        self.content = ""

    def feed(self, text: str) -> tuple[str, str]:
        buf, r_out, c_out = self._buf + text, "", ""
        while True:
            if self.state == "start" or self._strip_open:
                s = buf.lstrip()
                if s.startswith(OPEN):
                    self.state, self._strip_open, buf = "reasoning", False, s[len(OPEN):]
                    continue
                if OPEN.startswith(s):  # nothing but whitespace yet, or the start of <think>: wait for more
                    break
                if self.state == "start":
                    self.state = "content"
                self._strip_open = False
                continue
            if self.state == "reasoning":
                i = buf.find(CLOSE)
                if i >= 0:
                    r_out += buf[:i]
                    buf, self.state = buf[i + len(CLOSE):], "content"
                    continue
                k = held_prefix(buf, (CLOSE,))
                r_out, buf = r_out + buf[:len(buf) - k], buf[len(buf) - k:]
                break
            c_out, buf = c_out + buf, ""
            break
        self._buf = buf
        self.reasoning += r_out
        self.content += c_out
        return r_out, c_out

    def finish(self) -> tuple[str, str]:
        """What was held back: reasoning when the answer ended inside its block, else content."""
        buf, self._buf = self._buf, ""
        if self.state == "reasoning":
            self.reasoning += buf
            return buf, ""
        self.content += buf
        return "", buf


def reasoning_tokens(tokenizer: Any, ids: list[int], reader: Any) -> int:
    """How many of an answer's tokens ``ids`` are its reasoning: those up to and including the one that completes
    ``</think>`` (harmony: the analysis message's ``<|end|>``; every token when the answer ended inside its
    reasoning); 0 without reasoning."""
    if reader is None or not reader.reasoning:
        return 0
    close = CLOSE
    if isinstance(reader, ReasoningReader):
        if reader.state == "reasoning":
            return len(ids)
    else:  # a HarmonyReader
        if not reader.analysis_done:
            return len(ids)
        close = "<|end|>"
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds the closing tag
    while lo < hi:
        mid = (lo + hi) // 2
        if close in str(tokenizer.decode(ids[:mid], skip_special_tokens=False)):
            hi = mid
        else:
            lo = mid + 1
    return lo
