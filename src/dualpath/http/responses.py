"""OpenAI's Responses API (``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``), text in, text out.

Agent frameworks built on the Responses API keep a conversation on the server: a turn sends only its new input
and ``previous_response_id``, and the server prepends the stored conversation. That is the multi-turn reuse
DualPath serves: the prompt of turn ``i`` is the whole conversation before it, rendered through the model's chat
template, and its reused prefix is a storage hit.

* ``input``: a string (one user message) or a list of message items (``{"role", "content"}``, optionally
  ``"type": "message"``; content a string or ``input_text``/``output_text`` parts). ``instructions`` becomes a
  system message of this response only (as OpenAI does: it is not carried to the next turn). ``function_call``
  and ``function_call_output`` items (an agent resending a call and its result) become an assistant message
  with ``tool_calls`` and a ``tool`` message. Items of other types (reasoning, images, files) get a 400 naming
  the field.
* ``tools``: function tools (``{"type": "function", "name", "description", "parameters", "strict"}``) with
  ``tool_choice`` ``auto`` or ``none``, handled as on ``/v1/chat/completions`` (:mod:`dualpath.http.tools`:
  the definitions reach the prompt, calls are read back from the text); each call is a ``function_call``
  output item (``call_id``, ``name``, ``arguments``) after the message item (present when there is text).
  ``tool_choice`` ``required`` or a named function is enforced by constrained decoding (as on chat). Other tool
  types (web search, file search, ...) get a 400.
* ``previous_response_id``: a stored response (``store``, default true) whose conversation (its inputs, without
  its instructions, and its output) comes before ``input``. An unknown id is a 400
  ``previous_response_not_found``. The store keeps the last ``http.responses_store_max`` responses of this
  server process (in memory; a restart forgets them).
* ``max_output_tokens``, ``temperature``, ``top_p``; the extensions ``top_k``, ``min_p``, ``seed``, ``ignore_eos`` and
  ``chat_template_kwargs`` as on the other endpoints. A response cut by ``max_output_tokens`` has
  ``status: "incomplete"``.
* ``stream``: server-sent events with OpenAI's event types, in order: ``response.created``,
  ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``, one
  ``response.output_text.delta`` per decode step, ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, then ``response.completed`` (or ``response.incomplete``); an error after the
  stream began is a ``response.failed`` event. Each event carries ``sequence_number``. With tools the message
  item opens with its first text, and each call is ``response.output_item.added`` (a ``function_call`` item),
  ``response.function_call_arguments.delta`` (the whole arguments), ``response.function_call_arguments.done``,
  ``response.output_item.done``.

``usage`` has ``input_tokens``, ``input_tokens_details.cached_tokens`` (the storage hit), ``output_tokens`` and
``total_tokens``; the response carries ``x-dualpath-read-path`` as the other endpoints do.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from dualpath.http.backend import GenRequest, GenResult, Job
from dualpath.http.harmony import HarmonyReader
from dualpath.http.reasoning import ReasoningReader, reasoning_tokens
from dualpath.http.schemas import Seed, tool_choice_problem
from dualpath.http.structured import forced_tool_grammar, text_format_grammar
from dualpath.http.tools import FunctionDef, ToolCall, ToolCallReader, ToolDef

_TEXT_PARTS = ("input_text", "output_text", "text")


class InputPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None
    # function_call / function_call_output items
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    # reasoning items (an earlier answer's, sent back) and item references
    id: str | None = None
    summary: list[InputPart] | None = None


class FunctionTool(FunctionDef):
    """A Responses API function tool: the function's fields at the top level."""

    type: Literal["function"]


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses`` (unknown fields are errors, as on the other endpoints)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = False
    store: bool | None = True
    metadata: dict[str, Any] | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None  # function tools are read by function_tools()
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    background: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tool_calls: int | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None
    # extensions (as on the other endpoints)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: Seed | None = None
    ignore_eos: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(field, message)`` of the first value this server cannot honour, or None."""
        for i, t in enumerate(self.tools or []):
            if t.get("type") != "function":
                return f"tools[{i}].type", (f"tools[{i}]: only function tools are supported (got type "
                                            f"{t.get('type')!r})")
            try:
                FunctionTool.model_validate(t)
            except ValueError as exc:
                return f"tools[{i}]", f"tools[{i}]: not a valid function tool: {str(exc).splitlines()[-1].strip()}"
        problem = tool_choice_problem(self.tool_choice, [str(t.get("name")) for t in self.tools or []])
        if problem is not None:
            return "tool_choice", problem
        fmt = (self.text or {}).get("format") or {}
        if fmt.get("type", "text") not in ("text", "json_object", "json_schema"):
            return "text.format", (f"text.format: type must be 'text', 'json_object' or 'json_schema' (got "
                                   f"{fmt.get('type')!r})")
        if fmt.get("type") == "json_schema" and not isinstance(fmt.get("schema", {}), (dict, bool)):
            return "text.format", "text.format: 'schema' must be a JSON schema object"
        if self.background:
            return "background", "background: background responses are not supported"
        if self.truncation not in (None, "disabled", "auto"):
            return "truncation", f"truncation: must be 'auto' or 'disabled' (got {self.truncation!r})"
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                if item.type == "function_call":
                    if not item.call_id or not item.name or item.arguments is None:
                        return f"input[{i}]", f"input[{i}]: a function_call item needs call_id, name and arguments"
                    continue
                if item.type == "function_call_output":
                    if not item.call_id or item.output is None:
                        return f"input[{i}]", f"input[{i}]: a function_call_output item needs call_id and output"
                    continue
                if item.type == "reasoning":  # (its text goes to the template as the next answer's reasoning)
                    continue
                if item.type == "item_reference":  # (resolved against the stored responses: resolve_references)
                    if not item.id:
                        return f"input[{i}].id", f"input[{i}]: an item_reference needs the id of an item"
                    continue
                if item.type not in (None, "message"):
                    return f"input[{i}].type", f"input[{i}]: items of type {item.type!r} are not supported " \
                                               "(only messages, reasoning, function_call, function_call_output " \
                                               "and item_reference)"
                if item.role is None:
                    return f"input[{i}].role", f"input[{i}]: a message needs a role"
                if isinstance(item.content, list):
                    for j, part in enumerate(item.content):
                        if part.type not in _TEXT_PARTS:
                            return (f"input[{i}].content[{j}].type",
                                    f"input[{i}].content[{j}]: only text parts are supported (got {part.type!r})")
        return None

    def logprobs_top(self) -> int | None:
        """How many most likely tokens each output token's logprobs carry (``top_logprobs``) when ``include``
        asks for ``message.output_text.logprobs``; None: no logprobs."""
        if "message.output_text.logprobs" not in (self.include or []):
            return None
        return int(self.top_logprobs or 0)

    def function_tools(self) -> list[ToolDef]:
        """The function tools the model may call (none with ``tool_choice: "none"``), as chat-completions tools."""
        if self.tool_choice == "none":
            return []
        return [ToolDef(type="function", function=FunctionDef.model_validate(
            {k: v for k, v in t.items() if k != "type"})) for t in self.tools or []]

    def messages(self) -> list[dict[str, Any]]:
        """This request's input as chat messages (``developer`` as ``system``), without ``instructions``:
        ``function_call`` items are the ``tool_calls`` of the assistant message just before them (or of one of
        their own), a ``function_call_output`` is a ``tool`` message, and a ``reasoning`` item's text (its
        content, else its summary; an opaque ``encrypted_content`` alone has none) is the ``reasoning_content`` of
        the assistant message it precedes, as chat templates that render earlier thoughts read it."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict[str, Any]] = []
        thoughts: list[str] = []  # reasoning items waiting for the answer they belong to

        def answer(msg: dict[str, Any]) -> dict[str, Any]:
            if thoughts:
                msg["reasoning_content"] = msg.get("reasoning_content", "") + "".join(thoughts)
                thoughts.clear()
            return msg

        for item in self.input:
            if item.type == "reasoning":
                text = _text(item.content) or _text(item.summary)
                if text:
                    thoughts.append(text)
                continue
            if item.type == "function_call":
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant":  # the calls of the answer just before: one turn
                    answer(out[-1]).setdefault("tool_calls", []).append(call)
                else:
                    out.append(answer({"role": "assistant", "content": "", "tool_calls": [call]}))
                continue
            if item.type == "function_call_output":
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
                continue
            role = "system" if item.role == "developer" else str(item.role)
            msg = {"role": role, "content": _text(item.content)}
            out.append(answer(msg) if role == "assistant" else msg)
        return out

    def resolve_references(self, find: Any) -> tuple[str, str] | None:
        """Replace each ``item_reference`` by the item it names (``find(id)``: an item of a stored response's
        output, or None); ``(field, message)`` for one that names no stored item."""
        if isinstance(self.input, str):
            return None
        for i, item in enumerate(self.input):
            if item.type == "item_reference":
                got = find(item.id)
                if got is None:
                    return f"input[{i}].id", f"input[{i}]: no stored response holds an item with id {item.id!r}"
                self.input[i] = InputItem.model_validate(got)
        return None


def _text(c: str | list[InputPart] | None) -> str:
    return c if isinstance(c, str) else "".join(p.text or "" for p in c) if c else ""


class ResponseStore:
    """The conversations of the last ``max_items`` stored responses (in memory, LRU)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = OrderedDict()

    def get(self, rid: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        got = self._items.get(rid)
        if got is not None:
            self._items.move_to_end(rid)
        return got

    def put(self, rid: str, conversation: list[dict[str, Any]], body: dict[str, Any]) -> None:
        if self.max_items <= 0:
            return
        self._items[rid] = (conversation, body)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """The output item ``item_id`` of a stored response (newest first), or None."""
        for _, body in reversed(self._items.values()):
            for item in body.get("output", ()):
                if item.get("id") == item_id:
                    return dict(item)
        return None


def add_routes(app: FastAPI, server: Any) -> None:
    """``/v1/responses`` on ``app`` (``server``: the app's :class:`~dualpath.http.app.Server`)."""
    from dualpath.http.app import ApiError, with_effort

    store = ResponseStore(server.config.responses_store_max)

    @app.post("/v1/responses")
    async def create(body: ResponsesRequest, request: Request) -> Response:
        server.authorize(request)
        if body.model is not None and body.model != server.model_name:
            raise ApiError(404, f"The model {body.model!r} does not exist; this server serves "
                                f"{server.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        # (the items referenced are then checked as if sent; a stored output holds no item_reference)
        bad = body.unsupported() or body.resolve_references(store.find_item) or body.unsupported()
        if bad is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            prev = store.get(body.previous_response_id)
            if prev is None:
                raise ApiError(400, f"Previous response with id {body.previous_response_id!r} not found.",
                               param="previous_response_id", code="previous_response_not_found")
            history = prev[0]
        conversation = history + body.messages()
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        server.admit()
        tools = body.function_tools()
        effort = (body.reasoning or {}).get("effort")
        kwargs = with_effort(body.chat_template_kwargs, effort if isinstance(effort, str) else None)

        head = list(itertools.takewhile(lambda m: m["role"] == "system", conversation))  # (kept, as instructions)

        def render(start: int) -> list[int]:
            """The prompt of the conversation from item ``start`` on (after the instructions)."""
            kept = conversation if start == 0 else head + conversation[start:]
            messages, native = server.tool_prompt(system + kept, tools)
            return server.render_chat(messages, "input", tools=native, template_kwargs=kwargs)

        ids = await server.off_loop(render, 0)
        ctx = server.backend.max_context
        if body.truncation == "auto" and ctx and len(ids) + (body.max_output_tokens or 1) > ctx:
            ids = await server.off_loop(_truncated, render, conversation, ctx - (body.max_output_tokens or 1), ids)
        limit = server.limit(len(ids), body.max_output_tokens, "max_output_tokens")
        return await _serve(server, store, request, body, conversation, ids, limit, tools)

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> JSONResponse:
        server.authorize(request)
        got = store.get(response_id)
        if got is None:
            raise ApiError(404, f"Response with id {response_id!r} not found.", "not_found_error",
                           param="response_id")
        return JSONResponse(got[1])

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> JSONResponse:
        server.authorize(request)
        if not store.delete(response_id):
            raise ApiError(404, f"Response with id {response_id!r} not found.", "not_found_error",
                           param="response_id")
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


def _truncated(render: Any, conversation: list[dict[str, Any]], budget: int, full: list[int]) -> list[int]:
    """``truncation: "auto"``: the prompt without the fewest leading turns (a turn starts at a user message, so
    a tool result never loses its call and the conversation still starts with the user; system and developer
    messages before the first turn stay) that leaves it at most
    ``budget`` tokens; the last turn is always kept (a prompt still too long then is the usual 400). Dropping
    more turns never lengthens the prompt, so the cut is found by bisection over the turns' starts."""
    starts = [i for i, m in enumerate(conversation) if i > 0 and m.get("role") == "user"]
    lo, hi, best = 0, len(starts) - 1, full
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = render(starts[mid])
        if len(ids) <= budget:
            best, hi = ids, mid - 1
        else:
            lo = mid + 1
    if best is full and starts:
        best = render(starts[-1])  # (still too long: the shortest prompt, for the error that follows)
    return list(best)


def _call_item(call: ToolCall) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": "incomplete" if call.cut else "completed"}


def _reasoning_item(rsid: str, thoughts: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": rsid, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": thoughts}]}


def _response(server: Any, rid: str, mid: str, created: int, body: ResponsesRequest, *, status: str,
              text: str | None, usage: dict[str, Any] | None, error: dict[str, Any] | None = None,
              calls: list[ToolCall] | None = None, logprobs: list[dict[str, Any]] | None = None,
              reasoning: tuple[str, str] | None = None) -> dict[str, Any]:
    """The response object; its output is the reasoning item (``reasoning``: its id and text, with
    ``http.reasoning_parser`` on), the message (``text``; left out when None, or empty beside calls or
    reasoning) and then one ``function_call`` item per call."""
    output = []
    if reasoning is not None:
        output.append(_reasoning_item(*reasoning))
    if text is not None and (text or not (calls or reasoning)):
        item_status = "completed" if status in ("completed", "incomplete") else "in_progress"
        output.append({"type": "message", "id": mid, "status": item_status, "role": "assistant",
                       "content": [{"type": "output_text", "text": text, "annotations": [],
                                    "logprobs": logprobs or []}]})
    output += [_call_item(c) for c in calls or []]
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": server.model_name,
        "output": output, "parallel_tool_calls": bool(body.parallel_tool_calls if body.parallel_tool_calls
                                                      is not None else True),
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "store": bool(body.store if body.store is not None else True),
        "temperature": body.temperature if body.temperature is not None else server.config.default_temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}}, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": body.truncation or "disabled", "usage": usage,
        "user": body.user, "metadata": body.metadata or {},
    }


def _usage(ids: list[int], n_out: int, result: GenResult | None, job: Job, n_reasoning: int = 0) -> dict[str, Any]:
    cached = result.cached_tokens if result is not None else job.cached
    return {"input_tokens": len(ids), "input_tokens_details": {"cached_tokens": int(cached)},
            "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": n_reasoning},
            "total_tokens": len(ids) + n_out}


def _entries(server: Any, body: ResponsesRequest, job: Job, start: int, count: int) -> list[dict[str, Any]] | None:
    """The output logprob entries of tokens ``start .. start + count - 1`` (None when not asked for)."""
    from dualpath.http.logprobs import chat_entries, generated_logprobs

    top = body.logprobs_top()
    if top is None or not count:
        return None
    return chat_entries(server.token_text, generated_logprobs(job, start, count), top)


def _turn(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The answer as the conversation keeps it (the next turn's history)."""
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = [c.as_dict() for c in calls]
    return msg


async def _serve(server: Any, store: ResponseStore, request: Request, body: ResponsesRequest,
                 conversation: list[dict[str, Any]], ids: list[int], limit: int, tools: list[ToolDef]) -> Response:
    from dualpath.http.app import _observe, serve_job

    rid, mid, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
    reader, thinking = server.answer_readers(ids, tools, choice=body.tool_choice if tools else None)

    def stream(job: Job, detok: Any, first: tuple[str, Any], t_first: float) -> AsyncIterator[bytes]:
        return _events(server, store, job, detok, first, body, conversation, ids, rid, mid, created, t_first,
                       reader, thinking)

    def full(job: Job, detok: Any, result: GenResult | None, t_first: float, t_last: float) -> dict[str, Any]:
        detok.flush()
        text, calls, thought = detok.text, [], None
        if thinking is not None:
            r, text = thinking.feed(text)
            held = thinking.finish()
            text = text + held[1]
            thought = (f"rs_{uuid.uuid4().hex}", r + held[0]) if r + held[0] else None
        if reader is not None:
            text = reader.feed(text)[0] + reader.finish(cut=detok.finish is None)[0]
            calls = reader.calls
        status = "incomplete" if detok.finish is None else "completed"
        n_think = reasoning_tokens(server.backend.tokenizer, detok.ids, thinking)
        out = _response(server, rid, mid, created, body, status=status, text=text,
                        usage=_usage(ids, len(detok.ids), result, job, n_think), calls=calls,
                        logprobs=_entries(server, body, job, 0, len(detok.ids)), reasoning=thought)
        if body.store is not False:
            store.put(rid, [*conversation, _turn(text, calls)], out)
        _observe(server, job, ids, detok, result, t_first, t_last)
        return out

    sampling = server.sampling(body, logprobs=body.logprobs_top())
    fmt = (body.text or {}).get("format") or {}

    def compile_grammar() -> str | None:  # (in a worker thread: a complex schema takes a while to compile)
        tok = server.backend.tokenizer
        forced = forced_tool_grammar(tok, server.config.tool_parser, tools, body.tool_choice, body.parallel_tool_calls)
        return forced if forced is not None else text_format_grammar(tok, fmt)

    if body.tool_choice not in (None, "auto", "none") or fmt.get("type", "text") != "text":
        grammar = await anyio.to_thread.run_sync(compile_grammar)
        if grammar is not None:
            sampling = replace(sampling, grammar=grammar)
    tags = (*(reader.tags if reader is not None else ()), *(thinking.tags if thinking is not None else ()))
    return await serve_job(server, request, "/v1/responses", GenRequest(ids, limit, sampling,
                                                                        server.cache_salt(request, None)), [],
                           bool(body.stream), stream, full, skip_special=not server.keeps_specials(tags))


async def _events(server: Any, store: ResponseStore, job: Job, detok: Any, first: tuple[str, Any],
                  body: ResponsesRequest, conversation: list[dict[str, Any]], ids: list[int], rid: str, mid: str,
                  created: int, t_first: float, reader: ToolCallReader | None = None,
                  thinking: ReasoningReader | HarmonyReader | None = None) -> AsyncIterator[bytes]:
    """The stream of a response (see the module docstring for the events and their order). With tools
    (``reader``) the message item opens with its first text and the calls follow it. With reasoning
    (``thinking``) a reasoning item comes first (``response.reasoning_text.delta`` events) and the message item
    opens with the first text after it."""
    from dualpath.http.app import _map_error, _observe, coalesce

    m = server.metrics
    seq = 0

    def event(etype: str, **fields: Any) -> bytes:
        nonlocal seq
        data = {"type": etype, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {etype}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    result: GenResult | None = None
    t_last = t_first
    code = "200"
    opened = False
    text = ""  # the message's text (without the calls' text when tools are read)
    rsid, thoughts, thinking_open, thought_done = f"rs_{uuid.uuid4().hex}", "", False, False
    rwhere = {"item_id": rsid, "output_index": 0, "content_index": 0}

    def close_thoughts() -> list[bytes]:
        nonlocal thought_done
        if not thinking_open or thought_done:
            return []
        thought_done = True
        return [event("response.reasoning_text.done", **rwhere, text=thoughts),
                event("response.output_item.done", output_index=0, item=_reasoning_item(rsid, thoughts))]

    def open_message() -> list[bytes]:
        nonlocal opened
        opened = True
        where["output_index"] = 1 if thinking_open else 0
        return [*close_thoughts(), event("response.output_item.added", output_index=where["output_index"],
                      item={"type": "message", "id": mid, "status": "in_progress", "role": "assistant",
                            "content": []}),
                event("response.content_part.added", **where,
                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    held: list[dict[str, Any]] = []  # logprob entries of tokens whose text is not out yet
    sent: list[dict[str, Any]] = []

    def deltas(delta: str, final: bool = False, n_tokens: int = 0) -> list[bytes]:
        nonlocal text, thoughts, thinking_open
        if n_tokens:
            held.extend(_entries(server, body, job, len(detok.ids) - n_tokens, n_tokens) or [])
        out: list[bytes] = []
        if thinking is not None:
            r, delta = thinking.feed(delta)
            if final:
                last = thinking.finish()
                r, delta = r + last[0], delta + last[1]
            if r:
                if not thinking_open:
                    thinking_open = True
                    out += [event("response.output_item.added", output_index=0,
                                  item={**_reasoning_item(rsid, "", "in_progress"), "content": []}),
                            event("response.content_part.added", **rwhere, part={"type": "reasoning_text",
                                                                                  "text": ""})]
                thoughts += r
                out.append(event("response.reasoning_text.delta", **rwhere, delta=r))
        if reader is not None:
            delta = reader.feed(delta)[0] + (reader.finish(cut=detok.finish is None)[0] if final else "")
        if not delta:
            return out
        text += delta
        lps = list(held)
        held.clear()
        sent.extend(lps)
        return [*out, *([] if opened else open_message()),
                event("response.output_text.delta", **where, delta=delta, logprobs=lps)]

    try:
        yield event("response.created", response=_response(server, rid, mid, created, body, status="in_progress",
                                                            text=None, usage=None))
        yield event("response.in_progress", response=_response(server, rid, mid, created, body,
                                                                status="in_progress", text=None, usage=None))
        if reader is None and thinking is None:  # plain text: the message item opens at once
            for e in open_message():
                yield e
        ev = first
        while True:
            k, val = ev
            if k == "token":
                delta, tids, pending, _stop = coalesce(job, detok, val, True)  # (no stop strings here)
                t_last = time.perf_counter()
                for e in deltas(delta, n_tokens=len(tids)):
                    yield e
                ev = pending if pending is not None else await job.queue.get()
                continue
            if k == "done":
                result = val
                break
            if job.client_cancelled:
                break
            err = _map_error(val, server.config.retry_after_s)
            code = str(err.status)
            failed = _response(server, rid, mid, created, body, status="failed", text=text, usage=None,
                               error={"code": err.code or "server_error", "message": err.message})
            yield event("response.failed", response=failed)
            return
        for e in deltas(detok.flush(), final=True):
            yield e
        calls = reader.calls if reader is not None else []
        for e in close_thoughts():
            yield e
        if opened or not (calls or thinking_open):
            if not opened:  # an empty answer: still one (empty) message item
                for e in open_message():
                    yield e
            every = sent + held
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": every}
            yield event("response.output_text.done", **where, text=text, logprobs=every)
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=where["output_index"],
                        item={"type": "message", "id": mid, "status": "completed", "role": "assistant",
                              "content": [part]})
        for i, call in enumerate(calls, start=int(opened) + int(thinking_open)):
            item = _call_item(call)
            yield event("response.output_item.added", output_index=i, item={**item, "arguments": "",
                                                                             "status": "in_progress"})
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                        delta=call.arguments)
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                        arguments=call.arguments)
            yield event("response.output_item.done", output_index=i, item=item)
        status = "incomplete" if detok.finish is None else "completed"
        out = _response(server, rid, mid, created, body, status=status, text=text,
                        usage=_usage(ids, len(detok.ids), result, job,
                                     reasoning_tokens(server.backend.tokenizer, detok.ids, thinking)),
                        calls=calls, logprobs=sent + held, reasoning=(rsid, thoughts) if thinking_open else None)
        if body.store is not False:
            store.put(rid, [*conversation, _turn(text, calls)], out)
        yield event(f"response.{status}", response=out)
        _observe(server, job, ids, detok, result, t_first, t_last)
    except BaseException:
        code = "499"
        m.cancelled.inc()
        raise
    finally:
        job.cancel()
        m.inflight.dec()
        m.requests.labels(endpoint="/v1/responses", code=code).inc()
