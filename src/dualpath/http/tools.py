"""Tool (function) calling for ``/v1/chat/completions``: the request's tool definitions, how they reach the
prompt, and how calls are read back out of the generated text.

**Definitions.** ``tools`` is a list of ``{"type": "function", "function": {"name", "description",
"parameters", "strict"}}`` (:class:`ToolDef`, validated like every request field). ``tool_choice`` ``"auto"``
(the default when tools are given) lets the model answer or call; ``"none"`` leaves the tools out of the prompt
and reads no call. ``"required"`` (a call to any of the tools) and a named function (``{"type": "function",
"function": {"name": ...}}``; the Responses API's ``{"type": "function", "name": ...}``) are enforced by
constrained decoding (:func:`tool_call_grammar`, :mod:`dualpath.engine.grammar`): the answer is one call in the
parser's format (several, one after another, when ``parallel_tool_calls`` is not false, hermes only), whose
``arguments`` follow the function's ``parameters`` schema.

**Into the prompt.** A chat template that uses a ``tools`` variable (Qwen2.5/3, Llama 3.1+, Hermes, Mistral
templates...) gets the definitions as ``apply_chat_template(..., tools=...)``: the checkpoint's own format.
A template without one (the embedded SmolLM2's, for one) would drop them silently, so the definitions go into
the system message instead (:func:`fallback_system_text`: the JSON schemas and the ``<tool_call>`` format), and
an earlier assistant turn's calls are written into its text in the same format, so the model sees its own
history.

**Out of the text.** Which format is read is :func:`parser_for` (``http.tool_parser``; ``auto`` by default):

* ``hermes``: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the text;
  what is outside the tags is the message's content. An unclosed last call (the generation ended inside it, or
  inside its closing tag) is still a call if its JSON is complete.
* ``llama3_json``: the whole answer is one JSON object ``{"name": ..., "parameters": {...}}`` (or several
  separated by ``;``), optionally after ``<|python_tag|>``; anything else is content.
* ``deepseek_v31`` / ``deepseek_v3``: DeepSeek's tool-call markers (:mod:`dualpath.http.tools_deepseek`).
* ``mistral``: ``[TOOL_CALLS]`` and what follows it, in either generation's shape (:mod:`dualpath.http.tools_mistral`).
* ``harmony``: gpt-oss's commentary messages to ``functions.NAME`` (:mod:`dualpath.http.harmony`).

A call is kept only if it parses as JSON, names a declared function and has object arguments; otherwise its text
stays in the content, unchanged: nothing the model wrote is dropped. :class:`ToolCallReader` works on the text as
it streams: content is passed on as soon as it cannot be the start of a call (a possible tag prefix is held
back, as stop strings are), and each call is handed out once its closing tag (or the end) is seen, with its
whole arguments in one delta. When at least one call was read, a ``stop`` finish becomes ``tool_calls``. A forced answer (``required`` or a
named function) that ``max_tokens`` cut inside a call still answers with it, its arguments as far as they were
written, and finishes ``length`` (:mod:`dualpath.http.partial_calls`), as OpenAI does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dualpath.http.harmony import CHANNEL as HARMONY_CHANNEL
from dualpath.http.harmony import TAGS as HARMONY_TAGS
from dualpath.http.harmony import HarmonyCallSource, HarmonyReader, harmony_grammar
from dualpath.http.markers import cut_at, drop_partial_tag
from dualpath.http.tools_deepseek import (
    DEEPSEEK_TAGS,
    DeepSeekCallReader,
    deepseek_grammar,
    deepseek_style,
    is_deepseek_template,
)
from dualpath.http.tools_mistral import (
    MISTRAL_TAGS,
    MistralCallReader,
    is_mistral_template,
    mistral_array_grammar,
    mistral_grammar,
    special_literal,
    uses_args_token,
)

#: values of ``http.tool_parser``
TOOL_PARSERS = ("auto", "hermes", "llama3_json", "deepseek_v3", "deepseek_v31", "mistral", "harmony")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a ``tools`` variable (else the definitions would be dropped by it)."""
    return bool(template) and "tools" in str(template)


def parser_for(kind: str, template: str | None) -> str:
    """The output format to read: ``kind`` unless ``auto``; ``auto`` is ``hermes`` for a template that does not
    render tools (the fallback system text asks for ``<tool_call>`` tags), DeepSeek's markers for a template that
    writes them (:mod:`dualpath.http.tools_deepseek`: ``deepseek_v3`` when it fences the arguments, else
    ``deepseek_v31``), ``llama3_json`` for a Llama 3 template (it speaks of ``<|python_tag|>`` / ``ipython``) and
    ``hermes`` otherwise (the ``<tool_call>`` tags that Qwen2.5/3 and Hermes templates ask for)."""
    if kind != "auto":
        return kind
    t = str(template or "")
    if not template_takes_tools(t):
        return "hermes"
    if is_deepseek_template(t):
        return deepseek_style(t)
    if is_mistral_template(t):
        return "mistral"
    if HARMONY_CHANNEL in t and "to=functions" in t:  # gpt-oss
        return "harmony"
    if HERMES_OPEN not in t and (PYTHON_TAG in t or "ipython" in t):
        return "llama3_json"
    return "hermes"


def tool_dicts(tools: list[ToolDef]) -> list[dict[str, Any]]:
    """The definitions as a chat template expects them (OpenAI's shape, unset keys left out)."""
    return [t.model_dump(exclude_none=True) for t in tools]


def fallback_system_text(tools: list[ToolDef]) -> str:
    """What a template without tool support gets in its system message: the schemas and the call format."""
    specs = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return ("You can call the functions below. Each line is one function's JSON schema:\n"
            f"{specs}\n"
            "To call one or more of them, answer with one block per call, each exactly\n"
            f'{HERMES_OPEN}{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}{HERMES_CLOSE}\n'
            "and nothing else. Otherwise answer normally.")


def with_tools_in_text(messages: list[dict[str, Any]], tools: list[ToolDef]) -> list[dict[str, Any]]:
    """``messages`` for a template without tool support: the fallback text joins (or becomes) the system message
    and each assistant message's earlier calls are written into its content as ``<tool_call>`` blocks."""
    text = fallback_system_text(tools)
    out = [dict(m) for m in messages]
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            blocks = [_call_text(c) for c in calls]
            m["content"] = "\n".join([m["content"], *blocks]) if m.get("content") else "\n".join(blocks)
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content') or ''}\n\n{text}".lstrip()
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args_obj = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        args_obj = args
    return f"{HERMES_OPEN}{json.dumps({'name': fn.get('name'), 'arguments': args_obj}, ensure_ascii=False)}{HERMES_CLOSE}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (as far as it was written when ``cut``)
    cut: bool = False  # a forced call the token limit cut short (:mod:`dualpath.http.partial_calls`)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _parse_call(text: str, names: frozenset[str]) -> ToolCall | None:
    """One call from its JSON text, or None if it is not one (not JSON, unknown name, arguments not an object)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallReader:
    """Reads calls out of generated text as it arrives: :meth:`feed` each text delta, then :meth:`finish`; each
    returns ``(content, calls)``: the content that can be passed on now and the calls completed now."""

    def __init__(self, parser: str, names: list[str] | frozenset[str], max_calls: int | None = None,
                 harmony: HarmonyReader | None = None, forced: bool = False, only: str | None = None) -> None:
        if parser not in TOOL_PARSERS or parser == "auto":
            raise ValueError(f"tool parser {parser!r}: expected one of {TOOL_PARSERS[1:]}")
        self.parser = parser
        self.names = frozenset(names)
        #: calls read at most (the legacy ``functions`` API answers with one); text past them is content
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        #: the answer is constrained to be calls (``tool_choice`` required, or ``only``, a named function): cut
        #: by the limit, it still answers with them (:meth:`finish`)
        self.forced, self.only = forced, only
        self._buf = ""
        self._in_call = False
        self._after_call = False  # blank text right after a call only separates calls: not content
        self._json_mode: bool | None = None  # llama3_json: decided by the first non-blank text
        # the formats read by a module of their own (harmony: the answer's reader, when it already splits reasoning)
        self._format: DeepSeekCallReader | MistralCallReader | HarmonyCallSource | None = None
        if parser.startswith("deepseek"):
            self._format = DeepSeekCallReader(self.names)
        elif parser == "mistral":
            self._format = MistralCallReader(self.names)
        elif parser == "harmony":
            self._format = HarmonyCallSource(self.names, harmony)

    @property
    def tags(self) -> tuple[str, ...]:
        """The markers this reader looks for in the text (they must survive decoding: see
        :meth:`dualpath.http.app.Server.keeps_specials`)."""
        if self._format is not None:
            return {"mistral": MISTRAL_TAGS, "harmony": HARMONY_TAGS}.get(self.parser, DEEPSEEK_TAGS)
        return (HERMES_OPEN, HERMES_CLOSE) if self.parser == "hermes" else (PYTHON_TAG,)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        if self._format is not None:
            return self._marked(final=False)
        if self.parser == "hermes":
            return self._hermes(final=False)
        return self._llama(final=False)

    def finish(self, cut: bool = False) -> tuple[str, list[ToolCall]]:
        """The rest of the answer, which ended there; ``cut``: by the token limit. A forced answer cut inside a
        call still gives that call, its arguments as far as they were written (:mod:`dualpath.http.partial_calls`);
        cut before the call's name, it gives the calls before it (the fragment is markup), or, with none, the text."""
        if self._format is not None:
            text, calls = self._marked(final=True)
        elif self.parser == "hermes":
            text, calls = self._hermes(final=True)
        else:
            text, calls = self._llama(final=True)
        if not (cut and self.forced and text.strip()):
            return text, calls
        from dualpath.http.partial_calls import cut_calls

        got = cut_calls(text, self.parser, self.names, self.only)
        if self.max_calls is not None:
            got = got[:max(0, self.max_calls - len(self.calls))]
        if not got and not self.calls:
            return text, calls  # nothing read as a call (required, cut before a name): the text, as written
        # (with calls read, an unread end is the start of one more whose name was not written: markup, not content)
        last = len(got) - 1
        return "", calls + self._done([ToolCall(name, args, cut=i == last) for i, (name, args) in enumerate(got)])

    def _marked(self, final: bool) -> tuple[str, list[ToolCall]]:
        assert self._format is not None
        self._format.buf += self._buf
        self._buf = ""
        budget = None if self.max_calls is None else self.max_calls - len(self.calls)
        text, got = self._format.step(final, budget)
        return text, self._done([ToolCall(name, args) for name, args in got])

    def _done(self, calls: list[ToolCall]) -> list[ToolCall]:
        self.calls.extend(calls)
        return calls

    def _hermes(self, final: bool) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []

        def text(seg: str) -> None:
            if self._after_call:
                seg = seg.lstrip()
                self._after_call = not seg
            out.append(seg)

        def call(c: ToolCall) -> None:
            calls.append(c)
            self._after_call = True

        while True:
            if not self._in_call:
                if self.max_calls is not None and len(self.calls) + len(calls) >= self.max_calls:
                    text(self._buf)  # no further call is read: the rest is content, as written
                    self._buf = ""
                    break
                before, self._buf, found = cut_at(self._buf, HERMES_OPEN, final)
                text(before)
                if not found:
                    break
                self._in_call = True
            j = self._buf.find(HERMES_CLOSE)
            if j < 0:
                if final:  # the generation ended inside a call: a call if its JSON is whole, else text
                    got = _parse_call(drop_partial_tag(self._buf, HERMES_CLOSE).strip(), self.names)
                    if got is not None:
                        call(got)
                    else:
                        text(HERMES_OPEN + self._buf)
                    self._buf, self._in_call = "", False
                break
            body, self._buf = self._buf[:j], self._buf[j + len(HERMES_CLOSE):]
            self._in_call = False
            got = _parse_call(body.strip(), self.names)
            if got is not None:
                call(got)
            else:
                text(HERMES_OPEN + body + HERMES_CLOSE)
        return "".join(out), self._done(calls)

    def _llama(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self._json_mode is None:
            head = self._buf.lstrip()
            if not head:
                return "", []
            if head.startswith(PYTHON_TAG) or head.startswith("{"):
                self._json_mode = True
            elif PYTHON_TAG.startswith(head) and not final:
                return "", []  # maybe the tag, not whole yet
            else:
                self._json_mode = False
        if not self._json_mode:
            text, self._buf = self._buf, ""
            return text, []
        if not final:
            return "", []
        body = self._buf.strip()
        raw, self._buf = self._buf, ""
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].strip()
        calls: list[ToolCall] = []
        for part in _split_objects(body):
            call = _parse_call(part, self.names)
            if call is None:
                return raw, []
            calls.append(call)
        if self.max_calls is not None and len(calls) > self.max_calls:
            return raw, []  # more calls than may be answered: the text as it is
        return ("", self._done(calls)) if calls else (raw, [])


def _split_objects(body: str) -> list[str]:
    """Top-level JSON objects of ``body`` separated by ``;`` (or one object); [] if it is not that shape."""
    parts: list[str] = []
    depth, start, in_str, esc = 0, 0, False, False
    for i, ch in enumerate(body):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            if depth == 0:
                if body[start:i].strip() not in ("", ";"):
                    return []
                start = i
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return []
            if depth == 0:
                parts.append(body[start:i + 1])
                start = i + 1
    if depth != 0 or body[start:].strip() not in ("", ";"):
        return []
    return parts


def chosen_function(choice: str | dict[str, Any] | None) -> str | None:
    """The function a named ``tool_choice`` forces (chat's ``{"type": "function", "function": {"name"}}`` or the
    Responses API's ``{"type": "function", "name"}``), None for a string choice."""
    if not isinstance(choice, dict):
        return None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
    return name if isinstance(name, str) else ""


def _rebase_refs(schema: Any, at: str) -> Any:
    """``schema`` with every local ``$ref`` (``#``, ``#/...``) rewritten as if the schema sat at pointer ``at``."""
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
                out[k] = at + v[1:]
            else:
                out[k] = _rebase_refs(v, at)
        return out
    if isinstance(schema, list):
        return [_rebase_refs(v, at) for v in schema]
    return schema


def tool_call_grammar(tools: list[ToolDef], parser: str, only: str | None = None, parallel: bool = True,
                      tokenizer: Any = None) -> str:
    """The Lark grammar (llguidance's dialect) of an answer that is a call to one of ``tools`` (to ``only``, when
    named) in ``parser``'s format, its arguments valid under the function's ``parameters``: ``hermes`` tags one
    or more calls (one when not ``parallel``), ``llama3_json`` is one bare object."""
    from dualpath.engine.grammar import JSON_WHITESPACE, closed_objects

    key = "parameters" if parser == "llama3_json" else "arguments"
    options = []
    chosen = [t for t in tools if only is None or t.function.name == only]
    v11 = parser == "mistral" and uses_args_token(tokenizer)  # (else Mistral's JSON array of calls, below)
    if parser.startswith("deepseek") or v11 or parser == "harmony":  # the arguments object alone, between markers
        pairs = []
        for t in chosen:
            params = t.function.parameters if t.function.parameters is not None else {"type": "object"}
            args = dict(closed_objects(params))
            args["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}
            pairs.append((t.function.name, args))
        if v11:  # (its markers are the tokenizer's special tokens)
            return mistral_grammar(tokenizer, pairs, parallel)
        if parser == "harmony":  # one call: gpt-oss ends its turn with <|call|>
            return harmony_grammar(tokenizer, pairs, special_literal)
        return deepseek_grammar(pairs, parser, parallel)
    for i, t in enumerate(chosen):
        params = t.function.parameters if t.function.parameters is not None else {"type": "object"}
        # the parameters move inside the call's schema: their local references ("#/$defs/User", pydantic's
        # nested models) must point where they now are
        at = f"#/properties/{key}" if len(chosen) == 1 else f"#/anyOf/{i}/properties/{key}"
        options.append({"type": "object", "properties": {"name": {"const": t.function.name},
                                                         key: _rebase_refs(closed_objects(params), at)},
                        "required": ["name", key], "additionalProperties": False})

    schema: dict[str, Any] = dict(options[0]) if len(options) == 1 else {"anyOf": options}
    schema["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}  # (no endless whitespace: see there)
    if parser == "mistral":  # before v11: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]
        return mistral_array_grammar(tokenizer, schema, parallel)
    if parser == "llama3_json":
        return "start: %json " + json.dumps(schema)
    more = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{more}\n"
            f'call: "{HERMES_OPEN}\\n" body "\\n{HERMES_CLOSE}"\n'
            f"body: %json {json.dumps(schema)}")
