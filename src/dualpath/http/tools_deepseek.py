"""DeepSeek's tool-call format (DeepSeek-V3, V3.1 and the V3.2 checkpoints that keep V3.1's template), read from the
generated text and enforced by grammar.

A DeepSeek model calls tools in one block of special-looking markers (U+FF5C ``｜`` and U+2581 ``▁``)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

That is V3.1's shape (``deepseek_v31``); V3 (``deepseek_v3``) writes ``function<｜tool▁sep｜>NAME`` and the arguments
in a fenced ```` ```json ```` block on the next lines. The reader accepts either shape in any call; the grammar of a
forced ``tool_choice`` writes the shape of the checkpoint's chat template. Text before the block is content; so is
text after it. A call whose name was not declared, or whose arguments are not a JSON object, stays in the content
as written.
"""

from __future__ import annotations

import json
import re
from typing import Any

from dualpath.http.markers import cut_at, drop_partial_tag, held_prefix

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DEEPSEEK_TAGS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.S)


def is_deepseek_template(template: str) -> bool:
    """Whether a chat template writes DeepSeek's tool-call markers."""
    return "tool▁calls▁begin" in template


def deepseek_style(template: str) -> str:
    """``deepseek_v3`` for a template that fences the arguments (V3), else ``deepseek_v31``."""
    return "deepseek_v3" if "```json" in template else "deepseek_v31"


def parse_call(body: str, names: frozenset[str]) -> tuple[str, str] | None:
    """``(name, arguments as JSON text)`` of one call's text between its markers, in either shape; None if it is
    not a call to a declared function with object arguments."""
    left, sep, right = body.partition(SEP)
    if not sep:
        return None
    name, args = left.strip(), right.strip()
    if name == "function" and "\n" in right:  # V3: function<sep>NAME\n```json\n{...}\n```
        first, _, rest = right.partition("\n")
        name, args = first.strip(), rest
    fenced = _FENCE.match(args)
    if fenced:
        args = fenced.group(1)
    try:
        obj = json.loads(args)
    except ValueError:
        return None
    if name not in names or not isinstance(obj, dict):
        return None
    return name, json.dumps(obj, ensure_ascii=False)


class DeepSeekCallReader:
    """Streams content and completed calls out of DeepSeek-format text: :meth:`step` (``final`` at the end;
    ``budget``: how many more calls may be read, None for any)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.buf = ""
        self.in_block = False
        self._block_calls = 0  # calls read in the open block (none yet: its opening marker is still owed as text)

    def step(self, final: bool, budget: int | None) -> tuple[str, list[tuple[str, str]]]:
        out: list[str] = []
        calls: list[tuple[str, str]] = []
        while True:
            if not self.in_block:
                if budget is not None and len(calls) >= budget:
                    out.append(self.buf)
                    self.buf = ""
                    break
                text, self.buf, found = cut_at(self.buf, CALLS_BEGIN, final)
                out.append(text)
                if not found:
                    break
                self.in_block, self._block_calls = True, 0
                continue
            head = self.buf.lstrip()
            if head.startswith(CALLS_END):
                self.buf, self.in_block = head[len(CALLS_END):], False
                continue
            if head.startswith(CALL_BEGIN) and (budget is None or len(calls) < budget):
                j = head.find(CALL_END)
                if j < 0 and not final:
                    break  # the call is not whole yet
                body = head[len(CALL_BEGIN): j] if j >= 0 else drop_partial_tag(head[len(CALL_BEGIN):], CALL_END)
                raw = head[: j + len(CALL_END)] if j >= 0 else head
                self.buf = head[len(raw):]
                got = parse_call(body, self.names)
                if got is not None:
                    calls.append(got)
                    self._block_calls += 1
                else:  # not a call we can answer: its text is content, as written
                    out.append(("" if self._block_calls else CALLS_BEGIN) + raw)
                    self._block_calls += 1
                continue
            if not final and (not head or held_prefix(head, (CALL_BEGIN, CALLS_END)) == len(head)):
                break  # blank, or the start of a marker: wait for more
            # anything else (or the end): the block is over; what follows is content, as written
            out.append(self.buf if self._block_calls else CALLS_BEGIN + self.buf)
            self.buf, self.in_block = "", False
            break
        return "".join(out), calls


def deepseek_grammar(options: list[tuple[str, dict[str, Any]]], style: str, parallel: bool) -> str:
    """The Lark grammar (llguidance's dialect) of one DeepSeek tool-call block holding one call (several when
    ``parallel``) to one of ``options`` (``(name, arguments schema)``), in ``style``'s shape."""
    rules = []
    for i, (name, schema) in enumerate(options):
        if style == "deepseek_v3":
            head = json.dumps(f"{CALL_BEGIN}function{SEP}{name}\n```json\n")
            tail = json.dumps(f"\n```{CALL_END}")
        else:
            head, tail = json.dumps(f"{CALL_BEGIN}{name}{SEP}"), json.dumps(CALL_END)
        rules.append(f"c{i}: {head} a{i} {tail}\na{i}: %json {json.dumps(schema)}")
    more = " call*" if parallel else ""
    return (f"start: {json.dumps(CALLS_BEGIN)} call{more} {json.dumps(CALLS_END)}\n"
            f"call: {' | '.join(f'c{i}' for i in range(len(options)))}\n" + "\n".join(rules))
