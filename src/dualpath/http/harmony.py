"""gpt-oss answers in OpenAI's harmony format, read into reasoning, content and tool calls.

gpt-oss writes its answer as harmony messages after the prompt's ``<|start|>assistant``: a header naming the
channel, then ``<|message|>`` and the body, then ``<|end|>`` (or the stop tokens ``<|return|>`` / ``<|call|>``)::

    <|channel|>analysis<|message|>Thoughts.<|end|><|start|>assistant<|channel|>final<|message|>The answer.

* ``analysis``: the chain of thought: the message's ``reasoning_content`` (never its content);
* ``final``: the answer: ``content``;
* ``commentary`` addressed to a function (``to=functions.NAME``, in the channel header or after the role, with an
  optional ``<|constrain|>json``): a tool call whose arguments are the body; other commentary (a preamble) is
  content.

A body is passed on as it streams (reasoning or content); a call once its message ends. A call to an undeclared
function, or whose body is not a JSON object, is content, as the body was written. An answer without harmony
markup is all content. The markers are special tokens of gpt-oss's tokenizer: the answer is decoded with them
(:meth:`dualpath.http.app.Server.keeps_specials`). Harmony parsing is on whenever the tokenizer and its chat
template speak harmony, whatever ``http.reasoning_parser`` says (the markup itself is no answer, as vLLM parses
gpt-oss always).
"""

from __future__ import annotations

import json
import re
from typing import Any

from dualpath.http.markers import held_prefix

START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
TAGS = (START, CHANNEL, MESSAGE, END, CONSTRAIN, CALL, RETURN)
_ENDS = (END, CALL, RETURN, START)
_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_.\-]+)")


def is_harmony(tokenizer: Any) -> bool:
    """Whether the tokenizer has harmony's markers and its chat template writes them (gpt-oss)."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    if CHANNEL not in template:
        return False
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return False
    return CHANNEL in vocab and MESSAGE in vocab


class HarmonyReader:
    """Streams one answer's reasoning and content (:meth:`feed` / :meth:`finish`, as
    :class:`~dualpath.http.reasoning.ReasoningReader`) and collects its tool calls (:meth:`take_calls`)."""

    tags = TAGS

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self.names = names
        self.buf = ""
        self.state = "start"  # start (harmony or plain?) | header | body | plain
        self.channel = ""
        self.recipient: str | None = None
        self.body = ""  # a call's body so far
        self.reasoning = ""
        self.content = ""
        self.calls: list[tuple[str, str]] = []
        self._taken = 0
        self.analysis_done = False  # an analysis message has ended (for reasoning_tokens)

    def _emit(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if self.recipient is not None:
            self.body += text
        elif self.channel == "analysis":
            out[0] += text
        else:
            out[1] += text

    def _close(self, out: list[str]) -> None:
        """The current message ended: a call's body becomes a call (or content)."""
        if self.recipient is not None:
            try:
                args = json.loads(self.body)
            except ValueError:
                args = None
            if self.recipient in self.names and isinstance(args, dict):
                self.calls.append((self.recipient, json.dumps(args, ensure_ascii=False)))
            else:
                out[1] += self.body
        if self.channel == "analysis":
            self.analysis_done = True
        self.recipient, self.body, self.channel = None, "", ""

    def _step(self, final: bool) -> tuple[str, str]:
        out = ["", ""]
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith((CHANNEL, START)):
                    self.state = "header"
                    continue
                if not final and (CHANNEL.startswith(head) or START.startswith(head)):
                    break
                if final and not head:
                    break
                self.state = "plain"
                continue
            if self.state == "plain":
                out[1] += self.buf
                self.buf = ""
                break
            if self.state == "header":
                i = self.buf.find(MESSAGE)
                if i < 0:
                    if final:  # a header that never opened its body: its text, as written
                        out[1] += self.buf
                        self.buf = ""
                    break
                header, self.buf = self.buf[:i], self.buf[i + len(MESSAGE):]
                channel = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
                self.channel = channel.split(CONSTRAIN)[0].split()[0] if channel.split() else ""
                m = _RECIPIENT.search(header)
                self.recipient = m.group(1) if m else None
                self.state = "body"
                continue
            # body: up to the message's end (or the next message's start)
            cut = [(j, tag) for tag in _ENDS if (j := self.buf.find(tag)) >= 0]
            if cut:
                j, tag = min(cut)
                self._emit(self.buf[:j], out)
                self._close(out)
                self.buf = self.buf[j:] if tag == START else self.buf[j + len(tag):]
                self.state = "start"  # (the next message's header, or text after the messages)
                continue
            keep = 0 if final else held_prefix(self.buf, TAGS)
            self._emit(self.buf[:len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
            if final:
                self._close(out)
            break
        self.reasoning += out[0]
        self.content += out[1]
        return out[0], out[1]

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        return self._step(False)

    def finish(self) -> tuple[str, str]:
        return self._step(True)

    def take_calls(self) -> list[tuple[str, str]]:
        """The calls completed since the last take."""
        got, self._taken = self.calls[self._taken:], len(self.calls)
        return got


class HarmonyCallSource:
    """The tool-call side of :class:`HarmonyReader` for :class:`~dualpath.http.tools.ToolCallReader` (its
    ``buf`` / ``step`` interface): with ``shared``, the reader that already split the answer (its content passes
    through, its calls are taken); without, a reader of its own whose reasoning and content both become content."""

    def __init__(self, names: frozenset[str], shared: HarmonyReader | None = None) -> None:
        self.reader = shared if shared is not None else HarmonyReader(names)
        self.own = shared is None
        self.buf = ""

    def step(self, final: bool, budget: int | None) -> tuple[str, list[tuple[str, str]]]:
        text, self.buf = self.buf, ""
        if self.own:
            r, c = self.reader.feed(text)
            text = r + c
            if final:
                r, c = self.reader.finish()
                text += r + c
        got = self.reader.take_calls()
        if budget is not None and len(got) > budget:  # calls past those that may be answered: their text, as content
            text += "".join(json.dumps({"name": n, "arguments": json.loads(a)}, ensure_ascii=False)
                            for n, a in got[budget:])
            got = got[:budget]
        return text, got


def harmony_grammar(tokenizer: Any, options: list[tuple[str, dict[str, Any]]], literal: Any) -> str:
    """The Lark grammar of one harmony tool call to one of ``options`` (``(name, arguments schema)``):
    ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`` (``literal`` spells a marker
    as the special token it is)."""
    ch, con, msg = literal(tokenizer, CHANNEL), literal(tokenizer, CONSTRAIN), literal(tokenizer, MESSAGE)
    rules = [f"c{i}: {ch} {json.dumps(f'commentary to=functions.{name} ')} {con} \"json\" {msg} a{i}\n"
             f"a{i}: %json {json.dumps(schema)}" for i, (name, schema) in enumerate(options)]
    return f"start: {' | '.join(f'c{i}' for i in range(len(options)))}\n" + "\n".join(rules)
