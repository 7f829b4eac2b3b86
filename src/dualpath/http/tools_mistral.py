"""Mistral's tool-call format (``tool_parser: mistral``), read from the generated text.

Mistral models call tools after a ``[TOOL_CALLS]`` control token, in one of two shapes by tokenizer generation:

* before v11 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct): one JSON array of calls,
  ``[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]``;
* v11 and later (Mistral-Small-3.1/3.2, Devstral, Magistral, Ministral 3): each call as
  ``[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}`` (some write ``[CALL_ID]<id>`` before ``[ARGS]``), one after
  another.

``[TOOL_CALLS]``, ``[ARGS]`` and ``[CALL_ID]`` are special tokens of these tokenizers; the answer is decoded with
them when it is read for calls (:meth:`dualpath.http.app.Server.keeps_specials`). Text before the first
``[TOOL_CALLS]`` is content, and so is text after the calls. A call to an undeclared function, or whose arguments
are not a JSON object, stays in the content as written. A call is handed out once its JSON is complete.
"""

from __future__ import annotations

import json

from dualpath.http.markers import cut_at

BOT, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
MISTRAL_TAGS = (BOT, ARGS, CALL_ID)
_DECODER = json.JSONDecoder()


def is_mistral_template(template: str) -> bool:
    """Whether a chat template writes Mistral's ``[TOOL_CALLS]`` control token."""
    return BOT in template


def _value(text: str) -> tuple[object, int] | None:
    """The JSON value at the start of ``text`` (after blanks) and where it ends, or None if it is not whole."""
    start = len(text) - len(text.lstrip())
    try:
        value, end = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    return value, end


def _args(value: object) -> str | None:
    if isinstance(value, str):  # (arguments given as JSON text)
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


class MistralCallReader:
    """Streams content and completed ``(name, arguments)`` calls out of Mistral-format text (:meth:`step`)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.buf = ""
        self.after_bot = False  # the text in buf follows a [TOOL_CALLS] not yet read

    def step(self, final: bool, budget: int | None) -> tuple[str, list[tuple[str, str]]]:
        out: list[str] = []
        calls: list[tuple[str, str]] = []
        while True:
            if not self.after_bot:
                if budget is not None and len(calls) >= budget:
                    out.append(self.buf)
                    self.buf = ""
                    break
                text, self.buf, found = cut_at(self.buf, BOT, final)
                out.append(text)
                if not found:
                    break
                self.after_bot = True
                continue
            got = self._read(final, None if budget is None else budget - len(calls))
            if got is None:  # not whole yet
                break
            done, rest, text = got
            calls += done
            if text:
                out.append(text)
            self.buf, self.after_bot = rest, False
        return "".join(out), calls

    def _read(self, final: bool, budget: int | None) -> tuple[list[tuple[str, str]], str, str] | None:
        """The calls after one ``[TOOL_CALLS]`` (``buf`` starts after it): ``(calls, the rest, text to keep as
        content)``, or None to wait for more text."""
        raw = BOT + self.buf
        head = self.buf.lstrip()
        if not head:
            return ([], "", raw) if final else None
        if head[0] == "[":  # before v11: one JSON array of {"name", "arguments"}
            got = _value(self.buf)
            if got is None:
                return ([], "", raw) if final else None
            value, end = got
            calls = []
            for item in value if isinstance(value, list) else [None]:
                name = item.get("name") if isinstance(item, dict) else None
                args = _args(item.get("arguments", item.get("parameters", {}))) if isinstance(item, dict) else None
                if name not in self.names or args is None:
                    return [], self.buf[end:], BOT + self.buf[:end]  # not calls we can answer: content, as written
                calls.append((str(name), args))
            if budget is not None and len(calls) > budget:
                return [], self.buf[end:], BOT + self.buf[:end]
            return calls, self.buf[end:], ""
        # v11+: NAME [CALL_ID]id [ARGS] {...}
        j = self.buf.find("{")
        if j < 0:
            if final:
                return [], "", raw
            return None
        name = self.buf[:j]
        if ARGS in name:
            name = name[: name.index(ARGS)]
        if CALL_ID in name:
            name = name[: name.index(CALL_ID)]
        name = name.strip()
        got = _value(self.buf[j:])
        if got is None:
            return ([], "", raw) if final else None
        value, end = got
        args = _args(value)
        if name not in self.names or args is None or (budget is not None and budget < 1):
            return [], self.buf[j + end:], BOT + self.buf[: j + end]
        return [(name, args)], self.buf[j + end:], ""


def special_literal(tokenizer: object, tag: str) -> str:
    """A Lark item for ``tag``: the special token itself (``<[id]>``) when the tokenizer has it as one, else text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tid, tok in decoder.items():
        if getattr(tok, "content", None) == tag and getattr(tok, "special", False):
            return f"<[{int(tid)}]>"
    return json.dumps(tag)


def uses_args_token(tokenizer: object) -> bool:
    """Whether the tokenizer is of the v11+ generation (it has ``[ARGS]``: calls as ``[TOOL_CALLS]NAME[ARGS]{...}``)."""
    try:
        return ARGS in tokenizer.get_vocab()  # type: ignore[attr-defined]
    except Exception:
        return False


def mistral_grammar(tokenizer: object, options: list[tuple[str, dict[str, object]]], parallel: bool) -> str:
    """The Lark grammar (llguidance's dialect) of one call (several when ``parallel``) to one of ``options``
    (``(name, arguments schema)``) in the v11+ shape, ``[TOOL_CALLS]NAME[ARGS]{...}``."""
    bot, args = special_literal(tokenizer, BOT), special_literal(tokenizer, ARGS)
    more = " call*" if parallel else ""
    rules = [f"c{i}: {bot} {json.dumps(name)} {args} a{i}\na{i}: %json {json.dumps(schema)}"
             for i, (name, schema) in enumerate(options)]
    return f"start: call{more}\ncall: {' | '.join(f'c{i}' for i in range(len(options)))}\n" + "\n".join(rules)


def mistral_array_grammar(tokenizer: object, call_schema: dict[str, object], parallel: bool) -> str:
    """The same before v11: ``[TOOL_CALLS] [`` one call object (several when ``parallel``) valid under
    ``call_schema`` (``{"name", "arguments"}``) ``]``."""
    more = ' (", " call)*' if parallel else ""
    return f'start: {special_literal(tokenizer, BOT)} " [" call{more} "]"\ncall: %json {json.dumps(call_schema)}'
