"""Structured outputs at the HTTP layer: which grammar a request asks for, compiled and checked before it is
submitted (the decode engine enforces it: :mod:`dualpath.engine.grammar`).

* chat ``response_format``: ``json_object`` (any JSON object) or ``json_schema`` (its ``schema``); the Responses
  API's ``text.format`` the same way;
* ``tool_choice`` ``required`` or a named function (chat and Responses): a call in the served model's tool-call
  format (:func:`dualpath.http.tools.tool_call_grammar`);
* vLLM's extensions on chat and completions: ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
  ``guided_grammar`` and ``structured_outputs`` (:meth:`dualpath.http.schemas._Sampling.guided`).

Every grammar is checked against the served tokenizer: one the engine cannot enforce is a 400 naming the field.
Compiling a complex schema can take up to a second: callers run :func:`request_grammar` in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dualpath.errors import ModelError
from dualpath.http.tools import ToolDef, chosen_function, parser_for, tool_call_grammar


def _api_error(message: str, param: str) -> Exception:
    from dualpath.http.app import ApiError

    return ApiError(400, message, param=param)


def compile_grammar(tokenizer: Any, param: str, *, schema: dict[str, Any] | bool | None = None,
                    lark: str | None = None, built: str | None = None) -> str:
    """The llguidance grammar of JSON values valid under ``schema`` (or of the Lark grammar ``lark``, or the grammar
    ``built`` already), checked against ``tokenizer``; ``param``: the field a 400 names."""
    from dualpath.engine.grammar import check_grammar, json_schema_grammar, lark_grammar

    if tokenizer is None:
        raise _api_error(f"{param}: structured output needs the model's tokenizer (this model has none)", param)
    try:
        if built is not None:
            grammar = built
        elif lark is not None:
            grammar = lark_grammar(lark)
        else:
            grammar = json_schema_grammar(schema if schema is not None else {})
        problem = check_grammar(grammar, tokenizer)
    except ModelError as exc:
        raise _api_error(f"{param}: {exc}", param) from None
    if problem:
        raise _api_error(f"{param}: the schema cannot be enforced: {problem}", param)
    return grammar


def response_format_grammar(tokenizer: Any, rf: dict[str, Any] | None) -> str | None:
    """The grammar a chat ``response_format`` asks for: None for text."""
    kind = (rf or {}).get("type", "text")
    if kind == "json_object":
        return compile_grammar(tokenizer, "response_format", schema={"type": "object"})
    if kind == "json_schema":
        assert rf is not None
        return compile_grammar(tokenizer, "response_format.json_schema.schema",
                               schema=rf["json_schema"].get("schema", {}))
    return None


def text_format_grammar(tokenizer: Any, fmt: dict[str, Any]) -> str | None:
    """The grammar of the Responses API's ``text.format``: None for text."""
    if fmt.get("type") == "json_object":
        return compile_grammar(tokenizer, "text.format", schema={"type": "object"})
    if fmt.get("type") == "json_schema":
        return compile_grammar(tokenizer, "text.format.schema", schema=fmt.get("schema", {}))
    return None


def guided_grammar(tokenizer: Any, req: Any) -> str | None:
    """The grammar of the vLLM structured-output extension ``req`` sets, None without."""
    from dualpath.engine.grammar import choice_grammar, ebnf_grammar, regex_grammar

    guided = req.guided()
    if guided is None:
        return None
    param, kind, value = guided
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise _api_error(f"{param}: not JSON", param) from None
        return compile_grammar(tokenizer, param, schema=value)
    if kind == "json_object":
        return compile_grammar(tokenizer, param, schema={"type": "object"})
    build: dict[str, Callable[[Any], str]] = {"regex": regex_grammar, "choice": choice_grammar, "grammar": ebnf_grammar}
    try:
        return compile_grammar(tokenizer, param, built=build[kind](value))
    except ModelError as exc:
        raise _api_error(f"{param}: {exc}", param) from None


def forced_tool_grammar(tokenizer: Any, tool_parser: str, tools: list[ToolDef], choice: str | dict[str, Any] | None,
                        parallel: bool | None) -> str | None:
    """The grammar a ``tool_choice`` of ``required`` or a named function enforces (None for ``auto``/``none``):
    ``required`` allows several calls unless ``parallel_tool_calls`` is false; a named function is called exactly
    once (as OpenAI and vLLM answer a named ``tool_choice``)."""
    if choice in (None, "auto", "none"):
        return None
    template = getattr(tokenizer, "chat_template", None)
    only = chosen_function(choice)
    lark = tool_call_grammar(tools, parser_for(tool_parser, template), only, parallel is not False and only is None,
                             tokenizer)
    return compile_grammar(tokenizer, "tool_choice", lark=lark)


def constrained(req: Any) -> bool:
    """Whether a chat or completions request asks for any grammar (so :func:`request_grammar` is worth a thread)."""
    from dualpath.http.schemas import ChatCompletionRequest

    if req.guided() is not None:
        return True
    return isinstance(req, ChatCompletionRequest) and bool(
        (req.response_format or {}).get("type", "text") != "text" or req.tool_choice not in (None, "auto", "none"))


def request_grammar(tokenizer: Any, tool_parser: str, req: Any) -> str | None:
    """The grammar a chat or completions request asks for (at most one: the schemas refuse two), None without."""
    from dualpath.http.schemas import ChatCompletionRequest

    if isinstance(req, ChatCompletionRequest):
        forced = forced_tool_grammar(tokenizer, tool_parser, req.tools or [], req.tool_choice, req.parallel_tool_calls)
        if forced is not None:
            return forced
        by_format = response_format_grammar(tokenizer, req.response_format)
        if by_format is not None:
            return by_format
    return guided_grammar(tokenizer, req)
