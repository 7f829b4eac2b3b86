"""``/v1/chat/completions`` and ``/v1/completions``: choices, streamed or whole, with their log-probabilities.

One request makes one generation per choice, all submitted at once (they run concurrently on the engines, each
prefilling the prompt: none has stored its blocks when the others start):

* ``n`` choices per prompt. With a ``seed``, choice ``j`` samples with ``seed + j``: the choices differ and a
  request repeated with the same seed gives the same choices. Greedy choices are identical, as in OpenAI's API.
* completions: a batch of prompts (a list of strings, or a list of token-id lists); prompt ``p``'s choices have
  indices ``p * n`` to ``p * n + n - 1``.
* completions ``best_of``: ``best_of`` generations per prompt, of which the ``n`` with the highest cumulative
  log-probability are returned (not with ``stream``, as in OpenAI's API). The usage counts every generation.
* ``logprobs`` (chat: ``logprobs``/``top_logprobs``; completions: ``logprobs: k``): each choice carries its
  tokens' log-probabilities (:mod:`dualpath.http.logprobs`), the stop token's included, as ``token_ids`` does;
  a streamed chunk carries those of its own tokens.

Streaming interleaves the choices' chunks as their tokens come (each chunk names its ``index``); the usage chunk
(``stream_options.include_usage``) and ``[DONE]`` come once every choice has finished. An error on any choice
ends the stream with an error event; a client that goes away cancels every choice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response

from dualpath.engine.sampling import MAX_SEED
from dualpath.http.app import (
    ApiError,
    Choice,
    Detokenizer,
    Server,
    _map_error,
    _observe,
    coalesce,
    serve_choices,
)
from dualpath.http.backend import GenRequest
from dualpath.http.logprobs import (
    chat_entries,
    completion_logprobs,
    generated_logprobs,
    prompt_logprob_entries,
)
from dualpath.http.schemas import ChatCompletionRequest, CompletionRequest, error_body
from dualpath.http.structured import constrained, request_grammar
from dualpath.http.tools import ToolCall

MAX_CHOICES = 128  # generations of one request (prompts x n, or x best_of)


def check_choices(req: ChatCompletionRequest | CompletionRequest, prompts: int) -> int:
    """The generations per prompt of ``req`` (``n``, or ``best_of``); a 400 when ``prompts`` of them make more than
    :data:`MAX_CHOICES` (checked before a prompt is tokenized too: a batch of 20k prompts was tokenized first)."""
    per_prompt = max(int(req.n or 1), int(getattr(req, "best_of", None) or 1))
    if per_prompt * prompts > MAX_CHOICES:
        raise ApiError(400, f"n: {prompts} prompt(s) x {per_prompt} generations exceeds the limit of "
                            f"{MAX_CHOICES} per request", param="n")
    return per_prompt


async def serve(server: Server, request: Request, kind: str, req: ChatCompletionRequest | CompletionRequest,
                prompts: list[list[int]]) -> Response:
    """Answer a validated chat (``kind`` ``chat``) or completions request whose prompts are ``prompts``."""
    if req.truncate_prompt_tokens is not None:  # (vLLM's) keep each prompt's last k tokens
        ctx = server.backend.max_context
        k = ctx if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
        if ctx and k > ctx:
            raise ApiError(400, f"truncate_prompt_tokens: {k} exceeds the model's context of {ctx} tokens",
                           param="truncate_prompt_tokens")
        if k == 0:
            raise ApiError(400, "truncate_prompt_tokens: 0 would leave no prompt", param="truncate_prompt_tokens")
        prompts = [ids[-k:] for ids in prompts]
    per_prompt = check_choices(req, len(prompts))
    server.admit(per_prompt * len(prompts))
    top = _top(req)
    want_lp = top is not None or per_prompt > int(req.n or 1)  # best_of ranks by cumulative logprob
    echo = bool(getattr(req, "echo", False))
    prompt_top = top if echo else None  # echo with logprobs: the prompt's too (computed once per prompt)
    if req.prompt_logprobs is not None:  # (vLLM's) the same, reported apart
        prompt_top = max(prompt_top or 0, req.prompt_logprobs)
    base = server.sampling(req, logprobs=(top or 0) if want_lp else None)
    if constrained(req):  # (compiled in a worker thread: a complex schema takes a while)
        tok, parser = server.backend.tokenizer, server.config.tool_parser
        grammar = await anyio.to_thread.run_sync(lambda: request_grammar(tok, parser, req))
        if grammar is not None:
            base = replace(base, grammar=grammar)
    tools = req.active_tools() if isinstance(req, ChatCompletionRequest) else []
    out = _Answer(server, kind, req, prompts, per_prompt, top)
    choice = req.tool_choice if isinstance(req, ChatCompletionRequest) else None
    pairs = [server.answer_readers(ids, tools, 1 if out.legacy else None, choice) if kind == "chat" else (None, None)
             for ids in prompts for _ in range(per_prompt)]
    readers, thinkers = [r for r, _ in pairs], [t for _, t in pairs]
    out.reasoning = any(t is not None for t in thinkers)
    # the markers the answer is read for must survive decoding (a checkpoint may mark them special)
    tags = (*(readers[0].tags if readers[0] is not None else ()), *(thinkers[0].tags if thinkers[0] else ()))
    skip_special = req.skip_special_tokens and not server.keeps_specials(tags)
    specs: list[tuple[GenRequest, Detokenizer]] = []
    limits = [server.limit(len(ids), req.limit(), "max_tokens") for ids in prompts]
    if req.min_tokens > min(limits):
        raise ApiError(400, f"min_tokens: must be at most the max tokens ({min(limits)}); got {req.min_tokens}",
                       param="min_tokens")
    for ids, limit in zip(prompts, limits, strict=True):
        for j in range(per_prompt):
            sampling = base if base.seed is None or j == 0 else replace(base, seed=(base.seed + j) % (MAX_SEED + 1))
            if j == 0 and prompt_top is not None:
                sampling = replace(sampling, prompt_logprobs=prompt_top)
            detok = Detokenizer(server.backend.tokenizer, req.stops(), frozenset(sampling.stop_ids),
                                min_tokens=sampling.min_tokens, include_stop=req.include_stop_str_in_output,
                                skip_special=skip_special)
            specs.append((GenRequest(ids, limit, sampling, server.cache_salt(request, req.cache_salt)), detok))
    return await serve_choices(server, request, request.url.path, specs, bool(req.stream), out.stream, out.full,
                               readers=readers, thinkers=thinkers)


def _as_token_ids(tid: int) -> tuple[str, list[int]]:
    """A token named as vLLM's ``return_tokens_as_token_ids`` names it in log-probabilities."""
    s = f"token_id:{int(tid)}"
    return s, list(s.encode())


def _top(req: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many most likely tokens to report with each token; None: no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return int(req.top_logprobs or 0) if req.logprobs else None
    return None if req.logprobs is None else int(req.logprobs)


class _Answer:
    """The response to one request: whole (:meth:`full`) or streamed (:meth:`stream`)."""

    def __init__(self, server: Server, kind: str, req: ChatCompletionRequest | CompletionRequest,
                 prompts: list[list[int]], per_prompt: int, top: int | None) -> None:
        self.server, self.kind, self.req, self.prompts = server, kind, req, prompts
        self.per_prompt, self.n, self.top = per_prompt, int(req.n or 1), top
        self.rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{req.request_id or uuid.uuid4().hex}"
        self.obj = ("chat.completion" if kind == "chat" else "text_completion")
        self.namer = _as_token_ids if req.return_tokens_as_token_ids else server.token_text
        self.text = self.namer if top is not None else None
        self.echo = bool(getattr(req, "echo", False))
        self.zero = req.max_tokens == 0  # (completions with echo: the one token generated is dropped)
        self.created = int(time.time())
        #: the legacy ``functions`` API: a call is answered as ``function_call`` (one), not ``tool_calls``
        self.legacy = isinstance(req, ChatCompletionRequest) and req.legacy_functions
        #: http.reasoning_parser is on for this answer: messages carry reasoning_content (dualpath.http.reasoning)
        self.reasoning = False

    # --- shared -------------------------------------------------------------------------------------------
    def _lps(self, c: Choice, start: int, count: int) -> list[Any]:
        return generated_logprobs(c.job, start, count, f"choice {c.index}: ")

    def _logprobs(self, c: Choice, start: int, count: int) -> dict[str, Any] | None:
        """The ``logprobs`` object of tokens ``start`` .. ``start + count - 1`` of choice ``c``."""
        if self.top is None or self.text is None:
            return None
        lps = self._lps(c, start, count)
        if self.kind == "chat":
            return {"content": chat_entries(self.text, lps, self.top), "refusal": None}
        got = completion_logprobs(self.text, lps, self.top, c.text_offset)
        c.text_offset += sum(len(t) for t in got["tokens"])
        return got

    def usage(self, choices: list[Choice]) -> dict[str, Any]:
        n_prompt = sum(len(p) for p in self.prompts)
        cached = 0
        for p in range(len(self.prompts)):
            c = choices[p * self.per_prompt]
            cached += c.result.cached_tokens if c.result is not None else c.job.cached
        n_out = 0 if self.zero else sum(len(c.detok.ids) for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                "prompt_tokens_details": {"cached_tokens": int(cached)}}

    def _observe(self, choices: list[Choice]) -> None:
        for c in choices:
            _observe(self.server, c.job, c.job.request.prompt_ids, c.detok, c.result, c.t_first, c.t_last)

    # --- whole -------------------------------------------------------------------------------------------
    def full(self, choices: list[Choice]) -> dict[str, Any]:
        kept = self._best(choices)
        out = []
        for index, c in enumerate(kept):
            c.detok.flush()
            text = "" if self.zero else c.detok.text
            n_gen = 0 if self.zero else len(c.detok.ids)
            choice: dict[str, Any] = {"index": index, "finish_reason": "", "logprobs": None}
            if self.kind == "chat":
                thoughts = None
                if c.thinking is not None:
                    thoughts, text = c.thinking.feed(text)
                    more = c.thinking.finish()
                    thoughts, text = (thoughts + more[0]) or None, text + more[1]
                message: dict[str, Any] = {"role": "assistant", "content": text or (None if thoughts else "")}
                if c.reader is not None:
                    content, _ = c.reader.feed(text)
                    content += c.reader.finish(cut=_cut(c))[0]
                    if c.reader.calls and self.legacy:
                        message = {"role": "assistant", "content": content or None,
                                   "function_call": c.reader.calls[0].as_dict()["function"]}
                    elif c.reader.calls:
                        message = {"role": "assistant", "content": content or None,
                                   "tool_calls": [call.as_dict() for call in c.reader.calls]}
                if self.reasoning:
                    message.update(reasoning_content=thoughts, reasoning=thoughts)
                choice["message"] = message
            else:
                echoed = self._echo(c)
                choice["text"] = echoed + text
                if self.echo and self.top is not None:
                    choice["logprobs"] = self._echo_logprobs(c, choices, n_gen)
            if choice["logprobs"] is None:
                choice["logprobs"] = self._logprobs(c, 0, n_gen)
            if self.req.prompt_logprobs is not None and self.kind != "chat":
                choice["prompt_logprobs"] = self._prompt_logprobs(c, choices)
            choice["finish_reason"] = "length" if self.zero else _finish_reason(c, self.legacy)
            if self.req.return_token_ids:
                choice["token_ids"] = list(c.detok.ids[:n_gen])
            out.append(choice)
        self._observe(choices)
        body = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.server.model_name,
                "choices": out, "usage": self.usage(choices), "system_fingerprint": None}
        if self.req.prompt_logprobs is not None and self.kind == "chat":  # (vLLM's: one prompt, on the response)
            body["prompt_logprobs"] = self._prompt_logprobs(choices[0], choices)
        return body

    def _echo(self, c: Choice) -> str:
        """The prompt's text when echoed (completions' ``echo``), else ''."""
        tok = self.server.backend.tokenizer
        if not self.echo or tok is None:
            return ""
        return str(tok.decode(c.job.request.prompt_ids, skip_special_tokens=self.req.skip_special_tokens))

    def _prompt_lps(self, c: Choice, choices: list[Choice]) -> list[Any]:
        """The log-probabilities of choice ``c``'s prompt tokens 1.. (its prompt's first choice computed them); a
        503 when they did not come back whole (a misaligned list is never served)."""
        if len(c.job.request.prompt_ids) <= 1:  # (a one-token prompt: only its first token, which has none)
            return []
        source = choices[(c.index // self.per_prompt) * self.per_prompt]
        got = source.job.prompt_logprobs
        if got is None or len(got) != len(c.job.request.prompt_ids) - 1:
            raise ApiError(503, f"choice {c.index}: the prompt's log-probabilities did not come back; retry",
                           "server_error", code="logprobs_lost")
        return list(got)

    def _prompt_logprobs(self, c: Choice, choices: list[Choice]) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs`` of choice ``c``'s prompt."""
        assert self.req.prompt_logprobs is not None
        return prompt_logprob_entries(self.namer, self._prompt_lps(c, choices), self.req.prompt_logprobs)

    def _echo_logprobs(self, c: Choice, choices: list[Choice], n_gen: int) -> dict[str, Any]:
        """Completions ``logprobs`` over the echoed prompt and the generated tokens: the first prompt token has
        none (``null``), as in OpenAI's API."""
        assert self.text is not None and self.top is not None
        ids = c.job.request.prompt_ids
        first = self.text(ids[0])[0]
        rest = completion_logprobs(self.text, self._prompt_lps(c, choices), self.top, len(first))
        c.text_offset = len(first) + sum(len(t) for t in rest["tokens"])
        gen = self._logprobs(c, 0, n_gen)
        assert gen is not None
        return {"tokens": [first, *rest["tokens"], *gen["tokens"]],
                "token_logprobs": [None, *rest["token_logprobs"], *gen["token_logprobs"]],
                "top_logprobs": [None, *rest["top_logprobs"], *gen["top_logprobs"]],
                "text_offset": [0, *rest["text_offset"], *gen["text_offset"]]}

    def _best(self, choices: list[Choice]) -> list[Choice]:
        """Each prompt's ``n`` choices: all of them, or with ``best_of`` the ``n`` most likely."""
        if self.per_prompt == self.n:
            return choices
        kept: list[Choice] = []
        for p in range(len(self.prompts)):
            group = choices[p * self.per_prompt: (p + 1) * self.per_prompt]
            ranked = sorted(group, key=lambda c: -sum(lp.logprob for lp in self._lps(c, 0, len(c.detok.ids))))
            kept += sorted(ranked[: self.n], key=lambda c: c.index)
        return kept

    # --- streamed ----------------------------------------------------------------------------------------
    def _chunk(self, c: Choice, delta: str | None, finish: str | None = None, *, role: bool = False,
               token_ids: list[int] | None = None, calls: list[ToolCall] | None = None,
               logprobs: dict[str, Any] | None = None, reasoning: str | None = None) -> bytes:
        if self.kind == "chat":
            d: dict[str, Any] = {}
            if role:
                d["role"] = "assistant"
            if reasoning is not None:
                d["reasoning_content"] = d["reasoning"] = reasoning
            if delta is not None:
                d["content"] = delta
            if calls and self.legacy:  # (one call at most: the reader reads no more)
                d["function_call"] = calls[0].as_dict()["function"]
            elif calls:
                d["tool_calls"] = [{"index": c.n_calls - len(calls) + i, **call.as_dict()}
                                   for i, call in enumerate(calls)]
            choice: dict[str, Any] = {"index": c.index, "delta": d, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": c.index, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        data: dict[str, Any] = {"id": self.rid, "object": self.obj + (".chunk" if self.kind == "chat" else ""),
                                "created": self.created, "model": self.server.model_name, "choices": [choice]}
        if self._include_usage:
            data["usage"] = None
            if self.req.stream_options.continuous_usage_stats:  # type: ignore[union-attr]
                n_prompt, n_out = len(c.job.request.prompt_ids), 0 if self.zero else len(c.detok.ids)
                data["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                 "total_tokens": n_prompt + n_out}
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    @property
    def _include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)

    def _text_chunks(self, c: Choice, delta: str, tids: list[int], final: bool = False) -> list[bytes]:
        """The chunks of a text delta (and of the tokens ``tids`` it came from): as it is, or through the
        tool-call reader (content as it can be passed on, then one chunk per complete call)."""
        out_ids = tids if self.req.return_token_ids and tids else None
        lp = self._logprobs(c, len(c.detok.ids) - len(tids), len(tids)) if tids else None
        out: list[bytes] = []
        if c.thinking is not None:  # reasoning first, in a chunk of its own (with these tokens' ids and logprobs)
            thoughts, delta = c.thinking.feed(delta)
            if final:
                held = c.thinking.finish()
                thoughts, delta = thoughts + held[0], delta + held[1]
            if thoughts:
                out.append(self._chunk(c, None, token_ids=out_ids, logprobs=lp, reasoning=thoughts))
                out_ids = lp = None
        if c.reader is None:
            return out + ([self._chunk(c, delta, token_ids=out_ids, logprobs=lp)] if delta or out_ids or lp else [])
        content, calls = c.reader.feed(delta)
        if final:
            more, last = c.reader.finish(cut=_cut(c))
            content, calls = content + more, calls + last
        if content or out_ids or lp:
            out.append(self._chunk(c, content, token_ids=out_ids, logprobs=lp))
        if calls:
            c.n_calls += len(calls)
            out.append(self._chunk(c, None, calls=calls))
        return out

    async def _produce(self, c: Choice, out: asyncio.Queue[tuple[Choice, bytes | ApiError | None]]) -> None:
        """Choice ``c``'s chunks into ``out``, then None (or the error that ended it)."""
        job, detok = c.job, c.detok
        try:
            if self.kind == "chat":
                out.put_nowait((c, self._chunk(c, "", role=True)))
            elif self.echo:
                out.put_nowait((c, self._chunk(c, self._echo(c))))
            assert c.first is not None
            ev = c.first
            while True:
                k, val = ev
                if k == "token" and self.zero:  # (max_tokens 0: the one token generated is not the answer's)
                    ev = await job.queue.get()
                    continue
                if k == "token":
                    delta, tids, pending, stop_string = coalesce(job, detok, val, True)
                    c.t_last = time.perf_counter()
                    for b in self._text_chunks(c, delta, tids):
                        out.put_nowait((c, b))
                    if stop_string:
                        job.cancel()  # a stop string: the rest of the turn is not needed
                        break
                    ev = pending if pending is not None else await job.queue.get()
                    continue
                if k == "done":
                    c.result = val
                elif detok.finish is None and not job.client_cancelled:
                    raise _map_error(val, self.server.config.retry_after_s)
                break
            for b in self._text_chunks(c, detok.flush(), [], final=True):
                out.put_nowait((c, b))
            finish = "length" if self.zero else _finish_reason(c, self.legacy)
            out.put_nowait((c, self._chunk(c, None if self.kind == "chat" else "", finish)))
            out.put_nowait((c, None))
        except ApiError as err:
            out.put_nowait((c, err))

    async def stream(self, choices: list[Choice]) -> AsyncIterator[bytes]:
        """Server-sent events: every choice's chunks as they come, the usage chunk, ``[DONE]``."""
        m = self.server.metrics
        queue: asyncio.Queue[tuple[Choice, bytes | ApiError | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._produce(c, queue)) for c in choices]
        code = "200"
        try:
            left = len(choices)
            while left:
                _, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, ApiError):
                    code = str(item.status)
                    yield f"data: {json.dumps(error_body(item.message, item.etype, code=item.code))}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    return
                else:
                    yield item
            if self._include_usage:
                data = {"id": self.rid, "object": self.obj + (".chunk" if self.kind == "chat" else ""),
                        "created": self.created, "model": self.server.model_name, "choices": [],
                        "usage": self.usage(choices)}
                yield f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
            yield b"data: [DONE]\n\n"
            self._observe(choices)
        except BaseException:
            code = "499"
            m.cancelled.inc()
            raise
        finally:
            for t in tasks:
                t.cancel()
            for c in choices:
                c.job.cancel()
            m.inflight.dec()
            m.requests.labels(endpoint="/v1/chat/completions" if self.kind == "chat" else "/v1/completions",
                              code=code).inc()


def _cut(c: Choice) -> bool:
    """Whether choice ``c``'s answer was cut by its token limit."""
    return (c.detok.finish or "length") == "length"


def _finish_reason(c: Choice, legacy: bool = False) -> str:
    reason = c.detok.finish or "length"
    if reason == "stop" and c.reader is not None and c.reader.calls:
        return "function_call" if legacy else "tool_calls"
    return reason

