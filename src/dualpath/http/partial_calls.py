"""A forced tool call cut short by the token limit, read as far as it was written.

With ``tool_choice`` ``required`` or a named function the answer is constrained to be calls
(:func:`dualpath.http.tools.tool_call_grammar`), so an answer stopped by ``max_tokens`` ends inside one. OpenAI
answers such a request with the call anyway (and vLLM a named choice): its name, and its arguments as far as they
were written, which need not be valid JSON, with ``finish_reason`` ``length``. A client that forced a call thus
always finds ``tool_calls``, and learns from the finish that they are cut.

:func:`cut_calls` reads the unfinished end of such an answer (the text a reader could not read as calls) in each
parser's format and returns ``(name, arguments as written)`` for every call in it: whole ones as they are, the last
one as far as it goes. Its name must be whole and declared; while it is not, only a named choice can name the call
(with no arguments yet), and under ``required`` the cut call adds nothing (the calls before it stand). Nothing
read returns ``[]``: the text then stays the message's content, as for any text that is not a call. The ``harmony``
format (gpt-oss) is not read here: its reader owns the answer's text.
"""

from __future__ import annotations

import json
import re

from dualpath.http.markers import drop_partial_tag
from dualpath.http.tools import HERMES_CLOSE, HERMES_OPEN, PYTHON_TAG
from dualpath.http.tools_deepseek import CALL_BEGIN, CALL_END, SEP
from dualpath.http.tools_deepseek import parse_call as deepseek_call
from dualpath.http.tools_mistral import ARGS, BOT, CALL_ID

#: a call object's start: its name (whole), then maybe the key of its arguments
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"(\s*,\s*"(?:arguments|parameters)"\s*:\s*)?', re.S)
_FENCE = "```json\n"
_FENCE_HEAD = re.compile(r"^```(?:json)?[ \t]*\n?")
_DECODER = json.JSONDecoder()

Call = tuple[str, str]


def cut_calls(tail: str, parser: str, names: frozenset[str], only: str | None) -> list[Call]:
    """The calls in ``tail``, the unread end of a forced answer cut by the limit (see the module docstring);
    ``only``: the function a named ``tool_choice`` forces (None for ``required``)."""
    if parser == "hermes":
        i = tail.rfind(HERMES_OPEN)
        if i < 0:
            return _unnamed(only)
        return _json_calls(drop_partial_tag(tail[i + len(HERMES_OPEN):], HERMES_CLOSE), names, only, ",;\n")
    if parser == "llama3_json":
        body = tail.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        return _json_calls(body, names, only, ";")
    if parser.startswith("deepseek"):
        return _deepseek(tail, names, only)
    if parser == "mistral":
        return _mistral(tail, names, only)
    return []


def _unnamed(only: str | None) -> list[Call]:
    """A call whose name was not written yet: the named choice's, with no arguments; none for ``required``."""
    return [(only, "")] if only else []


def _named(name: str, args: str, names: frozenset[str], only: str | None) -> list[Call]:
    if name not in names or (only is not None and name != only):
        return []
    return [(name, args.strip())]


def _json_calls(text: str, names: frozenset[str], only: str | None, seps: str) -> list[Call]:
    """Call objects one after another (``seps`` between them): the whole ones, then the cut one. A cut one whose
    name is not whole yet adds nothing (a named choice's name, when it is alone)."""
    calls: list[Call] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in seps):
            pos += 1
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            break
        args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict | str):
            return []
        got = _named(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                     names, only)
        if not got:
            return []
        calls += got
    rest = text[pos:]
    m = _HEAD.match(rest)
    if m is None:
        return calls or _unnamed(only)
    try:
        name = json.loads(f'"{m.group(1)}"')
    except ValueError:
        return []
    got = _named(name, rest[m.end():] if m.group(2) else "", names, only)
    return calls + got if got else []


def _deepseek(tail: str, names: frozenset[str], only: str | None) -> list[Call]:
    i = tail.rfind(CALL_BEGIN)
    if i < 0:
        return _unnamed(only)
    body = drop_partial_tag(tail[i + len(CALL_BEGIN):], CALL_END)
    whole = deepseek_call(body, names)
    if whole is not None:
        return _named(*whole, names, only)
    left, sep, right = body.partition(SEP)
    if not sep:
        return _unnamed(only)
    name, args = left.strip(), right
    if name == "function":  # V3: function<sep>NAME\n```json\n{...
        if "\n" not in right:
            return _unnamed(only)
        first, _, args = right.partition("\n")
        name, args = first.strip(), args.lstrip()
        args = "" if _FENCE.startswith(args) else drop_partial_tag(_FENCE_HEAD.sub("", args, count=1), "\n```")
    return _named(name, args, names, only)


def _mistral(tail: str, names: frozenset[str], only: str | None) -> list[Call]:
    i = tail.rfind(BOT)
    if i < 0:
        return _unnamed(only)
    body = tail[i + len(BOT):]
    if body.lstrip().startswith("["):  # before v11: one JSON array of call objects
        inner = body.lstrip()[1:]
        return _json_calls(inner, names, only, ",")
    head, sep, args = body.partition(ARGS)
    if not sep:
        return _unnamed(only)
    return _named(head.split(CALL_ID)[0].strip(), args, names, only)
