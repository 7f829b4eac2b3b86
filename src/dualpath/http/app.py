"""The ASGI app (FastAPI on uvicorn): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/responses`` (:mod:`dualpath.http.responses`), ``/metrics`` and ``/health`` over a :class:`~dualpath.http.backend.Backend`.

A request's life: the body is validated by the pydantic models of :mod:`dualpath.http.schemas` (400 with an
OpenAI-style error object naming the field); the prompt is rendered (chat template) and tokenized; a prompt
that cannot fit the model's context with its ``max_tokens`` is refused (400 naming the limit); a request beyond
``http.max_inflight`` gets 429 and ``Retry-After``; a backend that is not ready gets 503 and ``Retry-After``.
The turn is submitted and the response waits for its first token, so an error before it still gets a proper
status; the response then carries ``x-dualpath-read-path`` (``pe``, ``de``, ``split`` or ``recompute``: where
the prompt's hit was read) and streams each token as the decode engine produces it (server-sent events) or
returns the whole completion. A client that goes away (or a stop sequence) cancels the turn, which frees its KV
and buffers on both engines.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dualpath.engine.sampling import SamplingParams
from dualpath.errors import CapacityError, DualPathError, ModelError, PeerTimeout
from dualpath.http.backend import Backend, Cancelled, GenRequest, GenResult, Job, ServerStopping, stop_ids_of
from dualpath.http.config import HttpConfig
from dualpath.http.harmony import HarmonyReader, is_harmony
from dualpath.http.metrics import CONTENT_TYPE, HttpMetrics
from dualpath.http.reasoning import ReasoningReader, reasoning_enabled, starts_in_reasoning
from dualpath.http.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    describe_validation,
    error_body,
)
from dualpath.http.tools import (
    ToolCallReader,
    ToolDef,
    chosen_function,
    parser_for,
    template_takes_tools,
    tool_dicts,
    with_tools_in_text,
)
from dualpath.http.unicode_check import lone_surrogate_path
from dualpath.model.chat_format import template_messages

log = logging.getLogger("dualpath.http")


class ApiError(Exception):
    """An error answered with an OpenAI-style error object."""

    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.etype, self.param, self.code = status, message, etype, param, code
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(error_body(self.message, self.etype, param=self.param, code=self.code),
                            status_code=self.status, headers=headers)


class _ClientGone(Exception):
    pass


# --- text ------------------------------------------------------------------------------------------------------
class Detokenizer:
    """Turns generated ids into text deltas: holds back an incomplete UTF-8 character and any tail that could be
    the start of a stop sequence; ends at a stop token or stop sequence (neither is part of the text, unless
    ``include_stop``: then the matched stop sequence, or the stop token's text unless ``skip_special`` drops it,
    ends the text, as vLLM's ``include_stop_str_in_output``). ``min_tokens`` (vLLM's rule): a stop sequence is
    only looked for once more than ``min_tokens`` tokens were generated, and must end in the text after theirs.
    ``skip_special``: leave special tokens out of the text.

    Incremental, as vLLM's and TGI's detokenizers: each token decodes a short window (from the token before the
    last complete piece of text) rather than the whole answer again, so a token costs the same at the 8,000th as at
    the first (decoding the whole answer per token cost 2.3 ms per token at 8,000 tokens with SmolLM2's tokenizer,
    18 s of event loop for one answer). The text equals the whole answer's decode for tokenizers whose decode
    of a longer sequence extends that of a shorter one (byte-level BPE; SentencePiece with byte fallback)."""

    def __init__(self, tokenizer: Any, stops: list[str], stop_ids: frozenset[int], *, min_tokens: int = 0,
                 include_stop: bool = False, skip_special: bool = True) -> None:
        self.tok = tokenizer
        self.stops = stops
        self.stop_ids = stop_ids
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.skip_special = skip_special
        self.ids: list[int] = []  # every generated id (the stop token included)
        self.text = ""
        self.emitted = 0
        self._dec: list[int] = []  # the ids whose text is decoded (the stop token only when include_stop)
        self._prefix = 0  # self._dec[_prefix:_read]: the window of already decoded ids a new token decodes after
        self._read = 0
        self._searched = 0  # the text before this was searched for stop sequences
        self.floor = 0  # length of the text of the first min_tokens tokens: no stop sequence may end inside it
        self.finish: str | None = None
        self._partial = [_StopPrefix(s) for s in stops]  # how much of each stop sequence the text ends with

    def push(self, tok: int) -> str:
        if self.finish is not None:
            return ""
        self.ids.append(tok)
        if tok in self.stop_ids:
            self.finish = "stop"
            if self.include_stop and self.tok is not None:  # the stop token's text, unless skipped as special
                self._extend(tok)
            return self._take(len(self.text))
        if self.tok is None:
            return ""
        if not self._extend(tok):
            return ""  # an incomplete UTF-8 character: wait for the rest
        text = self.text
        if len(self.ids) <= self.min_tokens:
            self.floor = len(text)
        elif self.stops:
            found = [(i, i + len(s)) for s in self.stops
                     if (i := text.find(s, max(0, self.floor - len(s) + 1, self._searched - len(s) + 1))) >= 0]
            self._searched = len(text)
            if found:
                start, end = min(found)
                cut = end if self.include_stop else start
                self.text = text[:cut]
                self.finish = "stop"
                return self._take(cut)
        if self.include_stop:  # nothing is cut before a stop sequence: nothing to hold back
            return self._take(len(text))
        hold = max((p.held(text) for p in self._partial), default=0)
        return self._take(len(text) - hold)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=self.skip_special))

    def _extend(self, tok: int) -> bool:
        """Append ``tok``'s text to :attr:`text`; False while the text would end in an incomplete character (the
        token waits in the window for the rest). Decodes the window from the token before the last complete piece,
        so the new piece is cut from text decoded in context (a SentencePiece word's leading space included)."""
        dec = self._dec
        dec.append(tok)
        start, read = self._prefix, self._read
        before = self._decode(dec[start:read]) if read > start else ""
        now = self._decode(dec[start:])
        if now.endswith("\ufffd"):
            return False
        if len(now) > len(before):
            self.text += now[len(before):]
            self._prefix, self._read = read, len(dec)
        return True

    def _take(self, upto: int) -> str:
        out = self.text[self.emitted : max(self.emitted, upto)]
        self.emitted = max(self.emitted, upto)
        return out

    def flush(self) -> str:
        return self._take(len(self.text))


class _StopPrefix:
    """The longest proper prefix of one stop sequence that a growing text ends with (the text to hold back while
    that stop may be completing), kept as the text grows: Knuth-Morris-Pratt, O(1) amortized per new character
    (ending the text with each prefix in turn cost O(len(stop)^2) per token)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        border = [0] * len(stop)  # border[i]: the longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = border[k - 1]
            if stop[i] == stop[k]:
                k += 1
            border[i] = k
        self.border = border
        self.matched = 0  # the text fed so far ends with stop[:matched]
        self.fed = 0  # characters of the text fed

    def held(self, text: str) -> int:
        stop, border, m = self.stop, self.border, self.matched
        for c in text[self.fed:]:
            if m == len(stop):  # (a whole match the caller did not stop at: inside the min_tokens floor)
                m = border[m - 1]
            while m and stop[m] != c:
                m = border[m - 1]
            if stop[m] == c:
                m += 1
        self.matched, self.fed = m, len(text)
        return border[m - 1] if m == len(stop) else m


T = TypeVar("T")


# --- the app ---------------------------------------------------------------------------------------------------
class Server:
    """The state behind the routes (one per app)."""

    def __init__(self, backend: Backend, config: HttpConfig) -> None:
        self.backend = backend
        self.config = config
        self.metrics = HttpMetrics(backend)
        self.ready = False
        self.created = int(time.time())
        self.startup_error: BaseException | None = None
        self._tokenizing: anyio.CapacityLimiter | None = None  # (off_loop's: made on the event loop)
        self._token_text: Any = None
        from dualpath.http.prefix_share import InflightPrefixes

        self.prefixes = InflightPrefixes(config.shared_prefill_min_tokens, config.inflight_prefix_wait_s,
                                         self.metrics.prefix_waits.inc)
        # what the served tokenizer speaks, decided once per tokenizer (its vocabulary takes tens of ms to list)
        self._speaks: tuple[Any, bool, bool] | None = None

    def _tokenizer_speaks(self) -> tuple[bool, bool]:
        """``(harmony, reasoning tags parsed)`` for the served tokenizer, cached while it stays the same."""
        tok = self.backend.tokenizer
        if self._speaks is None or self._speaks[0] is not tok:
            self._speaks = (tok, tok is not None and is_harmony(tok),
                            reasoning_enabled(self.config.reasoning_parser, tok))
        return self._speaks[1], self._speaks[2]

    @property
    def token_text(self) -> Any:
        """Token ids' text and bytes for log-probabilities (:class:`dualpath.http.logprobs.TokenText`, its cache
        kept for the server's life)."""
        from dualpath.http.logprobs import TokenText

        if self._token_text is None or self._token_text.tok is not self.backend.tokenizer:
            self._token_text = TokenText(self.backend.tokenizer)
        return self._token_text

    @property
    def model_name(self) -> str:
        return self.config.model_name or self.backend.model_name

    # --- checks --------------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """401 unless the request carries one of ``http.api_key``'s keys (an open server admits all). Every key
        is compared in full, whichever matches (no timing says which). The matching key's tenant tag (a hash of
        it, never the key) is kept on ``request.state`` for :meth:`cache_salt`."""
        keys = self.config.api_keys
        if not keys:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        given = token.strip().encode()
        match = [secrets.compare_digest(given, k.encode()) for k in keys]
        if scheme.lower() != "bearer" or not any(match):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")
        key = keys[match.index(True)]
        request.state.tenant = hashlib.sha256(b"dualpath-tenant\0" + key.encode()).hexdigest()[:32]

    def cache_salt(self, request: Request, own: str | None) -> str | None:
        """The cache salt a request's turns run with: its own ``cache_salt``, under its API key's tenant tag
        with ``http.isolate_keys`` (so each key shares stored KV only with itself)."""
        tenant = getattr(request.state, "tenant", None) if self.config.isolate_keys else None
        if tenant is None:
            return own
        return f"key:{tenant}" if own is None else f"key:{tenant}|{own}"

    def check(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        """A request naming another model gets 404 ``model_not_found`` (as OpenAI answers; the model is optional);
        a standard field whose value cannot be honoured gets 400 naming it."""
        self.check_model(req.model)
        bad = req.unsupported()
        if bad is not None:
            raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")

    def check_model(self, model: str | None) -> None:
        """404 ``model_not_found`` for a request naming another model than the one served."""
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model {model!r} does not exist; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, one at a time: tokenizing and rendering a large request (tens of MB of
        prompt, 100k messages) took the event loop for seconds, stalling every stream and ``/health``."""
        if self._tokenizing is None:
            self._tokenizing = anyio.CapacityLimiter(1)  # (as on the loop: one at a time, the tokenizer unshared)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenizing)

    def admit(self, count: int = 1) -> None:
        """Refuse a request whose ``count`` generations would not be admitted now (503 starting, 429 full)."""
        if not self.ready:
            raise ApiError(503, "the server is starting", "server_error", code="not_ready",
                           retry_after=self.config.retry_after_s)
        if self.backend.inflight + count > self.config.max_inflight:
            raise ApiError(429, f"too many requests in flight ({self.config.max_inflight}, http.max_inflight); "
                                "retry later", "rate_limit_exceeded", code="overloaded",
                           retry_after=self.config.retry_after_s)

    def sampling(self, req: ChatCompletionRequest | CompletionRequest | Any, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The request's sampling; ``logprobs`` / ``prompt_logprobs``: record each generated / prompt token's
        logprobs with this many most likely."""
        b = self.backend
        # a field the request leaves out: the checkpoint's generation_config.json value (http.generation_config
        # auto), else this server's default; an explicitly configured http.default_temperature wins over the file
        gen = b.generation.sampling() if self.config.generation_config == "auto" else {}
        if "default_temperature" in self.config.model_fields_set:
            gen.pop("temperature", None)
        temp = req.temperature if req.temperature is not None else \
            float(gen.get("temperature", self.config.default_temperature))
        top_p = req.top_p if req.top_p is not None else float(gen.get("top_p", 1.0))
        top_k = req.top_k if req.top_k is not None else int(gen.get("top_k", 0))
        top_k = max(top_k, 0)  # (-1, vLLM's spelling of "off", is 0 here)
        min_p = getattr(req, "min_p", None)
        min_p = float(min_p if min_p is not None else gen.get("min_p", 0.0))
        rep = getattr(req, "repetition_penalty", None)
        rep = float(rep if rep is not None else gen.get("repetition_penalty", 1.0))
        stop_ids = set(() if req.ignore_eos else stop_ids_of(b.tokenizer, b.generation.eos_ids))
        for tid in getattr(req, "stop_token_ids", None) or ():
            if b.vocab_size and tid >= b.vocab_size:
                raise ApiError(400, f"stop_token_ids: token id {tid} is outside the vocabulary of {b.vocab_size}",
                               param="stop_token_ids")
            stop_ids.add(int(tid))
        min_tokens = int(getattr(req, "min_tokens", 0) or 0)
        bias = tuple(sorted((int(k), float(v)) for k, v in (getattr(req, "logit_bias", None) or {}).items()))
        for tid, _ in bias:
            if b.vocab_size and tid >= b.vocab_size:
                raise ApiError(400, f"logit_bias: token id {tid} is outside the vocabulary of {b.vocab_size}",
                               param="logit_bias", code="unsupported_parameter")
        allowed = tuple(sorted({int(t) for t in getattr(req, "allowed_token_ids", None) or ()}))
        if allowed and b.vocab_size and allowed[-1] >= b.vocab_size:
            raise ApiError(400, f"allowed_token_ids: token id {allowed[-1]} is outside the vocabulary of "
                                f"{b.vocab_size}", param="allowed_token_ids")
        try:
            return SamplingParams(temperature=temp, top_p=top_p, top_k=top_k,
                                  min_p=min_p, seed=req.seed, stop_ids=tuple(sorted(stop_ids)),
                                  min_tokens=min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  presence_penalty=float(getattr(req, "presence_penalty", None) or 0.0),
                                  frequency_penalty=float(getattr(req, "frequency_penalty", None) or 0.0),
                                  repetition_penalty=rep,
                                  logit_bias=bias, allowed_ids=allowed,
                                  bad_words=self.bad_word_ids(getattr(req, "bad_words", None) or ()))
        except ModelError as exc:
            raise ApiError(400, str(exc)) from None

    def limit(self, n_prompt: int, requested: int | None, param: str) -> int:
        ctx = self.backend.max_context
        if requested == 0:  # (echo only: one token is generated and dropped)
            requested = 1
        if requested is None:
            default = self.config.max_tokens_default
            gen_new = self.backend.generation.max_new_tokens
            if gen_new is not None and self.config.generation_config == "auto" and \
                    "max_tokens_default" not in self.config.model_fields_set:
                default = gen_new  # the checkpoint's generation_config.json max_new_tokens, as vLLM reads it
            requested = max(1, min(default, ctx - n_prompt)) if ctx else default
        if ctx and n_prompt + requested > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} in the "
                                f"completion). Please reduce the prompt or {param}.",
                           param=param, code="context_length_exceeded")
        return requested

    def bad_word_ids(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's ``bad_words`` as token sequences: each word as it starts a text and, where that is a different
        word token of the same length, as it follows a space (so it is banned at the start and inside the text)."""
        if not words:
            return ()
        tok = self.backend.tokenizer
        if tok is None:
            raise ApiError(400, "bad_words: the served model has no tokenizer; send logit_bias", param="bad_words")
        out: list[tuple[int, ...]] = []
        for word in words:
            bare = tuple(tok.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(tok.encode(" " + word.lstrip(), add_special_tokens=False))
            if not bare:
                raise ApiError(400, f"bad_words: {word!r} has no tokens", param="bad_words")
            out.append(bare)
            if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
                out.append(spaced)
        from dualpath.control.protocol import MAX_BAD_IDS

        if sum(len(w) for w in out) > MAX_BAD_IDS:  # (what a deployment's control messages carry)
            raise ApiError(400, f"bad_words: more than {MAX_BAD_IDS} tokens in all", param="bad_words")
        return tuple(out)

    # --- prompts ------------------------------------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if req.continue_final_message:
            if req.add_generation_prompt:
                raise ApiError(400, "add_generation_prompt: must be false with continue_final_message: true (the "
                                    "answer continues the final message instead of starting a new one)",
                               param="add_generation_prompt")
            last = req.messages[-1]
            if last.role != "assistant":
                raise ApiError(400, f"continue_final_message: the final message must be an assistant message to "
                                    f"continue (got role {last.role!r})", param="continue_final_message")
            if not last.text().strip():
                raise ApiError(400, "continue_final_message: the final assistant message is empty (nothing to "
                                    "continue; send add_generation_prompt: true instead)",
                               param="continue_final_message")
        messages, native = self.tool_prompt([m.template_dict() for m in req.messages], req.active_tools())
        return self.render_chat(messages, "messages", add_generation_prompt=req.add_generation_prompt,
                                continue_final_message=req.continue_final_message,
                                template_kwargs=with_effort(req.chat_template_kwargs, req.reasoning_effort),
                                tools=native, documents=req.documents,
                                add_special_tokens=bool(req.add_special_tokens))

    def tool_prompt(self, messages: list[dict[str, Any]],
                    tools: list[ToolDef]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """``messages`` and the ``tools`` argument of the chat template for a request with ``tools``: a template
        that renders tools gets them; for one that does not they go into the system message
        (:mod:`dualpath.http.tools`)."""
        if not tools:
            return messages, None
        if template_takes_tools(getattr(self.backend.tokenizer, "chat_template", None)):
            return messages, tool_dicts(tools)
        return with_tools_in_text(messages, tools), None

    def tool_reader(self, tools: list[ToolDef], max_calls: int | None = None,
                    choice: str | dict[str, Any] | None = None) -> ToolCallReader | None:
        """What reads the calls out of the answer to a request with ``tools`` (None without); ``max_calls``: at
        most this many calls are read (the legacy ``functions`` API answers with one); ``choice``: the request's
        ``tool_choice`` (a forced one is answered with calls even when the limit cuts them)."""
        if not tools:
            return None
        template = getattr(self.backend.tokenizer, "chat_template", None)
        return ToolCallReader(parser_for(self.config.tool_parser, template), [t.function.name for t in tools],
                              max_calls, forced=choice not in (None, "auto", "none"), only=chosen_function(choice))

    def answer_readers(self, prompt_ids: list[int], tools: list[ToolDef], max_calls: int | None = None,
                       choice: str | dict[str, Any] | None = None
                       ) -> tuple[ToolCallReader | None, ReasoningReader | HarmonyReader | None]:
        """What reads one chat answer: its tool calls (None without ``tools``) and its reasoning (None when not
        parsed). A harmony model (gpt-oss) gets one :class:`~dualpath.http.harmony.HarmonyReader` for both,
        whatever ``http.reasoning_parser`` says: its raw markup is no answer."""
        if self._tokenizer_speaks()[0]:
            harmony = HarmonyReader(frozenset(t.function.name for t in tools))
            reader = ToolCallReader("harmony", harmony.names, max_calls, harmony) if tools else None
            return reader, harmony
        return self.tool_reader(tools, max_calls, choice), self.reasoning_reader(prompt_ids)

    def keeps_specials(self, tags: tuple[str, ...]) -> bool:
        """Whether an answer read for ``tags`` (tool-call or reasoning markers) must be decoded with its special
        tokens: one of the tags is a special token of this tokenizer (some checkpoints mark ``<tool_call>`` or
        ``<think>`` special), which ``skip_special_tokens`` would drop before the reader could see it."""
        decoder = getattr(self.backend.tokenizer, "added_tokens_decoder", None) or {}
        special = {getattr(t, "content", None) for t in decoder.values() if getattr(t, "special", False)}
        return any(tag in special for tag in tags)

    def reasoning_reader(self, prompt_ids: list[int]) -> ReasoningReader | None:
        """What splits a chat answer's reasoning from its content (None when ``http.reasoning_parser`` is off
        for this tokenizer); the prompt's own text says whether the answer starts inside a ``<think>`` block."""
        tok = self.backend.tokenizer
        if not self._tokenizer_speaks()[1]:
            return None
        tail = str(tok.decode(prompt_ids[-64:], skip_special_tokens=False))
        return ReasoningReader(starts_in_reasoning(tail))

    def render_chat(self, messages: list[dict[str, Any]], param: str, *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None, documents: list[dict[str, str]] | None = None,
                    add_special_tokens: bool = False) -> list[int]:
        """The prompt ids of ``messages`` rendered by the checkpoint's chat template (``param``: the field an
        error names). ``continue_final_message``: the rendering ends with the final message's content (the
        template's end-of-turn text after it is cut, as transformers and vLLM do). ``template_kwargs``
        (``chat_template_kwargs``): extra variables of the template; one of the call's own arguments is refused.
        ``tools``: tool definitions for a template that renders them; ``documents``: retrieval documents for one
        that renders them; ``add_special_tokens``: the tokenizer's own (a BOS the template did not write) too."""
        tok = self.backend.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(400, "the served model has no chat template; use /v1/completions", param=param)
        extra = dict(template_kwargs or {})
        reserved = _reserved_template_args(tok) if extra else frozenset()
        for key in list(extra):
            if key in reserved:
                raise ApiError(400, f"chat_template_kwargs.{key}: {key!r} is set by the server (it is an argument "
                                    "of apply_chat_template, not a template variable)",
                               param=f"chat_template_kwargs.{key}")
        try:
            if tools:
                extra["tools"] = tools
            if documents:
                extra["documents"] = documents
            text = tok.apply_chat_template(template_messages(tok, messages), tokenize=False,
                                           add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **extra)
        except Exception as exc:  # the template's own checks (e.g. roles must alternate) raise jinja errors
            raise ApiError(400, f"{param}: the model's chat template refused them: {exc}", param=param) from None
        return list(tok.encode(str(text), add_special_tokens=add_special_tokens))

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt of a completions request (one, or a batch)."""
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            items: list[Any] = [p]
        else:
            items = list(p)
        out = []
        for i, item in enumerate(items):
            where = "prompt" if len(items) == 1 else f"prompt[{i}]"
            if isinstance(item, list):
                ids = [int(x) for x in item]
                if self.backend.vocab_size and max(ids) >= self.backend.vocab_size:
                    raise ApiError(400, f"{where}: token id {max(ids)} is outside the vocabulary of "
                                        f"{self.backend.vocab_size}", param="prompt")
                out.append(ids)
                continue
            tok = self.backend.tokenizer
            if tok is None:
                raise ApiError(400, "the served model has no tokenizer; send the prompt as token ids", param="prompt")
            special = True if req.add_special_tokens is None else req.add_special_tokens
            out.append(list(tok.encode(str(item), add_special_tokens=special)))
        return out


#: ``apply_chat_template`` arguments a request sets through its own fields (or the server sets): never
#: ``chat_template_kwargs`` keys (the tokenizer's signature adds any others it has)
_RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})


_reserved_by_type: dict[Any, frozenset[str]] = {}


def with_effort(template_kwargs: dict[str, Any] | None, effort: str | None) -> dict[str, Any] | None:
    """``chat_template_kwargs`` with the request's reasoning effort as the template's ``reasoning_effort``
    variable (gpt-oss's template reads it; others ignore it), unless the kwargs set it themselves."""
    if effort is None:
        return template_kwargs
    return {"reasoning_effort": effort, **(template_kwargs or {})}


def _reserved_template_args(tok: Any) -> frozenset[str]:
    """The names a ``chat_template_kwargs`` key must not take: :data:`_RESERVED_TEMPLATE_ARGS` and every named
    argument of ``tok``'s ``apply_chat_template``."""
    got = _reserved_by_type.get(type(tok))
    if got is not None:
        return got
    import inspect

    try:
        params = inspect.signature(tok.apply_chat_template).parameters
        own = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    except (TypeError, ValueError):  # pragma: no cover - not introspectable
        own = set()
    got = _reserved_by_type[type(tok)] = _RESERVED_TEMPLATE_ARGS | own
    return got


async def _watch_disconnect(request: Request, jobs: list[Job]) -> None:
    """Cancel ``jobs`` when the client goes away (the request body has been read: only a disconnect comes next)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            return


def _map_error(exc: BaseException, retry_after: int) -> ApiError:
    from dualpath.control.channel import PeerGone, RemoteError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PeerGone):  # the scheduler died or hung (the launcher replaces it): try again shortly
        return ApiError(503, f"the scheduler was lost while serving this request; retry: {exc}", "server_error",
                        code="scheduler_unavailable", retry_after=retry_after)
    if isinstance(exc, RemoteError):
        code = getattr(exc, "code", "")
        msg = str(exc)
        if code == "TurnCancelled" or (code == "SchedulerError" and exc.remote_message.startswith("cancelled:")):
            # (the operator's ``dualpath ctl cancel``: not a 503, which clients retry, undoing the cancel)
            return ApiError(499, msg, "server_error", code="cancelled")
        if code == "SchedulerError" and "draining" in msg:
            return ApiError(503, f"the deployment is draining (dualpath ctl drain): it accepts no new requests; "
                                 f"{msg}", "server_error", code="draining", retry_after=retry_after)
        if code == "SchedulerError" and "submit:" in msg and "exceed the context" in msg:
            return ApiError(400, msg, code="context_length_exceeded")
        if code in ("InvalidTurn", "ProtocolError", "CapacityError") or (code == "SchedulerError" and "submit:" in msg):
            return ApiError(400, msg)
        if code == "SchedulerError" and "busy" in msg:
            return ApiError(429, msg, "rate_limit_exceeded", code="overloaded", retry_after=retry_after)
        return ApiError(503, msg, "server_error", code=code or None, retry_after=retry_after)
    if isinstance(exc, (ModelError, CapacityError)):  # (a request no engine of this deployment can ever hold)
        return ApiError(400, str(exc))
    if isinstance(exc, ServerStopping):  # (before its grace period ran out: the client may retry elsewhere)
        return ApiError(503, f"the server is shutting down: {exc}", "server_error", code="server_shutting_down",
                        retry_after=retry_after)
    if isinstance(exc, Cancelled):
        return ApiError(499, str(exc), "server_error", code="cancelled")
    msg = str(exc)
    if isinstance(exc, DualPathError) and ("needs more KV memory" in msg or "exceeds" in msg
                                           or "needs" in msg and "blocks" in msg):
        return ApiError(400, msg)
    if isinstance(exc, PeerTimeout) and "no handshake" in msg:  # no scheduler at the address (yet)
        return ApiError(503, f"the scheduler is not reachable; retry: {msg}", "server_error",
                        code="scheduler_unavailable", retry_after=retry_after)
    if isinstance(exc, (PeerTimeout, TimeoutError)):
        return ApiError(503, f"the turn did not finish in time: {msg}", "server_error", code="timeout",
                        retry_after=retry_after)
    log.warning("request failed: %s: %s", type(exc).__name__, msg)
    return ApiError(503 if isinstance(exc, DualPathError) else 500, msg or type(exc).__name__, "server_error",
                    retry_after=retry_after)


def create_app(backend: Backend, config: HttpConfig | None = None) -> FastAPI:
    """The ASGI app over ``backend`` (started and closed by the app's lifespan)."""
    cfg = config or HttpConfig()
    server = Server(backend, cfg)
    backend.timeout_s = cfg.request_timeout_s

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await backend.start()
        except Exception as exc:
            server.startup_error = exc  # serve_app raises it once uvicorn has given up
            raise
        server.ready = True
        try:
            yield
        finally:
            server.ready = False
            await backend.close()

    async def refuse_lone_surrogates(request: Request) -> None:
        """400 for a body whose text holds a lone UTF-16 surrogate (:mod:`dualpath.http.unicode_check`), before
        it is validated or served (the body is read once: the route reuses it)."""
        if request.method in ("POST", "PUT", "PATCH"):
            where = lone_surrogate_path(await request.body())
            if where is not None:
                raise ApiError(400, f"{where or 'the body'}: not valid Unicode text (a lone UTF-16 surrogate, "
                                    "\\ud800 to \\udfff, with no pair)", param=where or None)

    app = FastAPI(title="dualpath", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(refuse_lone_surrogates)])
    from dualpath.http.bodylimit import BodyLimit

    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes, timeout_s=cfg.body_timeout_s)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = describe_validation(list(exc.errors()))
        server.metrics.requests.labels(endpoint=request.url.path, code="400").inc()
        return JSONResponse(error_body(msg, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        server.metrics.requests.labels(endpoint=request.url.path, code=str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # (a bug: still an OpenAI-shaped body)
        log.exception("%s %s failed", request.method, request.url.path)
        server.metrics.requests.labels(endpoint=request.url.path, code="500").inc()
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = str(exc.detail)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404 and msg == "Not Found":  # no such route: OpenAI's words, then what is served
            msg = f"Invalid URL ({where}): this server generates text; it serves {_SERVED}"
        elif exc.status_code == 405:
            msg = f"Invalid method ({where}): this server serves {_SERVED}"
        return JSONResponse(error_body(msg, etype), status_code=exc.status_code, headers=exc.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        if isinstance(backend, _remote_type()):
            await backend.stats()  # type: ignore[attr-defined]
        h = backend.health() if server.ready else {"status": "starting"}
        ok = server.ready and h.get("status") == "ok"
        return JSONResponse(h, status_code=200 if ok else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> JSONResponse:  # (vLLM's and SageMaker's liveness probe: /health's answer)
        return await health()

    @app.get("/version")
    async def version() -> JSONResponse:  # (vLLM's: what a client checks before it benchmarks)
        from dualpath import __version__

        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        if isinstance(backend, _remote_type()):
            await backend.stats()  # type: ignore[attr-defined]
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [
            _model_card(server)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        server.authorize(request)
        if model_id != server.model_name:
            raise ApiError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(_model_card(server))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        server.authorize(request)
        server.check(body)
        server.admit()
        ids = await server.off_loop(server.chat_prompt, body)
        return await serve(server, request, "chat", body, [ids])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.authorize(request)
        server.check(body)
        if backend.tokenizer is None:
            # no text can be made: the generated ids are the answer; a stop string could never be matched
            if body.stops():  # (an empty list asks for nothing)
                raise ApiError(400, "stop: the served model has no tokenizer, so a stop string cannot be matched; "
                                    "send stop_token_ids", param="stop")
            body.return_token_ids = True
        p = body.prompt
        check_choices(body, 1 if isinstance(p, str) or (p and isinstance(p[0], int)) else len(p))
        server.admit()
        return await serve(server, request, "completion", body, await server.off_loop(server.completion_prompts, body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        """vLLM's: the token ids a prompt (or chat) becomes, as the completion endpoints would count them."""
        server.authorize(request)
        server.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of prompt and messages", param="prompt")
        tok = backend.tokenizer
        if tok is None:
            raise ApiError(400, "the served model has no tokenizer", param="prompt")
        if body.messages is not None:
            chat = ChatCompletionRequest(messages=body.messages, tools=body.tools,
                                         add_generation_prompt=body.add_generation_prompt,
                                         continue_final_message=body.continue_final_message,
                                         chat_template_kwargs=body.chat_template_kwargs)
            ids = await server.off_loop(server.chat_prompt, chat)
        else:
            ids = await server.off_loop(lambda: list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)))
        out: dict[str, Any] = {"count": len(ids), "max_model_len": backend.max_context, "tokens": ids,
                               "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
        server.authorize(request)
        server.check_model(body.model)
        tok = backend.tokenizer
        if tok is None:
            raise ApiError(400, "the served model has no tokenizer", param="tokens")
        bad = [t for t in body.tokens if t < 0 or (backend.vocab_size and t >= backend.vocab_size)]
        if bad:
            raise ApiError(400, f"tokens: id {bad[0]} is outside the vocabulary of {backend.vocab_size}",
                           param="tokens")
        return JSONResponse({"prompt": tok.decode(body.tokens)})

    from dualpath.http.completions import check_choices, serve
    from dualpath.http.responses import add_routes

    add_routes(app, server)  # /v1/responses
    return app


#: the endpoints, as an error for an unknown one names them
_SERVED = ("POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (GET and DELETE /v1/responses/{id}), "
           "GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics, GET /version")


def _model_card(server: Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "dualpath",
            "max_model_len": server.backend.max_context}


def _remote_type() -> type:
    from dualpath.http.backend import RemoteBackend

    return RemoteBackend


@dataclass(eq=False)
class Choice:
    """One generation of a request: its job, the text so far, and what its response needs."""

    index: int
    job: Job
    detok: Detokenizer
    reader: ToolCallReader | None = None  # reads tool calls out of the text (a chat request with tools)
    thinking: ReasoningReader | HarmonyReader | None = None  # splits reasoning from content (http.reasoning_parser)
    first: tuple[str, Any] | None = None  # the job's first event
    result: GenResult | None = None
    t_first: float = 0.0
    t_last: float = 0.0
    n_calls: int = 0  # tool calls streamed so far
    text_offset: int = 0  # characters of the text whose logprobs were streamed (completions' text_offset)


async def serve_choices(server: Server, request: Request, endpoint: str, specs: list[tuple[GenRequest, Detokenizer]],
                        stream: bool, on_stream: Callable[[list[Choice]], AsyncIterator[bytes]],
                        on_full: Callable[[list[Choice]], dict[str, Any]], *,
                        readers: list[ToolCallReader | None] | None = None,
                        thinkers: list[ReasoningReader | HarmonyReader | None] | None = None) -> Response:
    """Submit one job per ``(GenRequest, Detokenizer)`` of ``specs`` and answer once each has its first event:
    an error status (the first choice's error; every job is cancelled), a stream (``on_stream(choices)``: the
    body's server-sent events, which then own the jobs) or, once every job ended, the JSON body
    ``on_full(choices)``. A client that goes away cancels every job (499).

    Choices of one prompt share its prefill (a prompt of ``http.shared_prefill_min_tokens`` or more): the first
    is submitted at once, the others once the decode engine says it has stored the prompt's Full Blocks
    (``Job.stored``: after its first token, while it decodes; or at its end), so each of them loads the
    prompt's KV instead of computing it again (``n`` / ``best_of``: one prefill of the prompt, not ``n``). A shorter prompt's choices all start at once: its prefill costs less
    than the later choices' wait. Separate requests do the same through ``server.prefixes``
    (:mod:`dualpath.http.prefix_share`): a prompt sharing a long prefix with a request being prefilled is
    submitted once that request's prefix is stored."""
    m = server.metrics
    slots: list[Choice | None] = [None] * len(specs)
    jobs: list[Job] = []
    followers: dict[int, list[int]] = {}  # the first choice of a prompt -> the later choices of the same prompt
    first_of: dict[tuple[int, ...], int] = {}
    share = server.config.shared_prefill_min_tokens
    seen: dict[tuple[int, ...], int] = {}
    followed: set[int] = set()  # first choices that later choices of the same prompt wait for
    for i, (g, _) in enumerate(specs):
        if len(g.prompt_ids) >= share and (head := seen.setdefault(tuple(g.prompt_ids), i)) != i:
            followed.add(head)

    def submit(i: int, keys: list[int] | None = None) -> None:
        gen, detok = specs[i]
        c = Choice(i, server.backend.submit(gen), detok, readers[i] if readers else None,
                   thinkers[i] if thinkers else None)
        slots[i] = c
        jobs.append(c.job)
        lead = server.prefixes.lead(keys or [])
        if lead is not None:
            c.job.on_prefix_stored.append(lambda: server.prefixes.done(lead))
        c.job.wants_stored = lead is not None or i in followed  # (before its task's first step)

    watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, jobs))
    m.inflight.inc()
    handed_off = False
    retry = server.config.retry_after_s
    try:
        for i, (gen, _) in enumerate(specs):
            # (choices of one prompt share one salt: the request's)
            lead = first_of.setdefault(tuple(gen.prompt_ids), i) if len(gen.prompt_ids) >= share else i
            if lead == i:
                recomputes = gen.sampling is not None and gen.sampling.prompt_logprobs is not None
                keys = [] if recomputes else await server.prefixes.admit(gen.prompt_ids, gen.cache_salt)
                if watcher.done():  # the client went away while this waited for another request's prefix
                    raise _ClientGone()
                submit(i, keys)
            else:
                followers.setdefault(lead, []).append(i)
        for i in range(len(specs)):
            c = slots[i]
            assert c is not None  # (a later choice of a prompt is submitted when its first choice starts)
            c.first = first = await c.job.queue.get()
            if first[0] == "error":
                if c.job.client_cancelled:
                    raise _ClientGone()
                raise _map_error(first[1], retry)
            c.t_first = c.t_last = time.perf_counter()
            if i in followers:
                await c.job.stored.wait()  # (or its end)
                for j in followers.pop(i):
                    submit(j)
        choices = [c for c in slots if c is not None]
        headers = {"x-dualpath-read-path": str(choices[0].job.path or "")}
        if stream:
            watcher.cancel()
            handed_off = True
            return StreamingResponse(on_stream(choices), media_type="text/event-stream", headers=headers)
        for c in choices:
            assert c.first is not None
            c.result, c.t_last = await _drain(c.job, c.detok, c.first, retry)
            if c.job.client_cancelled and c.detok.finish is None:
                raise _ClientGone()
        body = on_full(choices)
        res = choices[0].result
        headers["x-dualpath-read-path"] = str(choices[0].job.path or (res.path if res else ""))
        m.requests.labels(endpoint=endpoint, code="200").inc()
        return JSONResponse(body, headers=headers)
    except _ClientGone:
        m.cancelled.inc()
        m.requests.labels(endpoint=endpoint, code="499").inc()
        return Response(status_code=499)
    finally:
        if not handed_off:
            for job in jobs:
                job.cancel()  # (idempotent: a finished job is left alone)
            watcher.cancel()
            m.inflight.dec()


async def serve_job(server: Server, request: Request, endpoint: str, gen: GenRequest, stops: list[str],
                    stream: bool, on_stream: Any, on_full: Any, *, include_stop: bool = False,
                    skip_special: bool = True) -> Response:
    """:func:`serve_choices` for one generation: ``on_stream(job, detok, first, t_first)`` and ``on_full(job,
    detok, result, t_first, t_last)``. ``include_stop`` / ``skip_special``: see :class:`Detokenizer`
    (``min_tokens`` comes from the sampling)."""
    assert gen.sampling is not None
    detok = Detokenizer(server.backend.tokenizer, stops, frozenset(gen.sampling.stop_ids),
                        min_tokens=gen.sampling.min_tokens, include_stop=include_stop, skip_special=skip_special)

    def streamed(choices: list[Choice]) -> AsyncIterator[bytes]:
        c = choices[0]
        return cast("AsyncIterator[bytes]", on_stream(c.job, c.detok, c.first, c.t_first))

    def whole(choices: list[Choice]) -> dict[str, Any]:
        c = choices[0]
        return cast("dict[str, Any]", on_full(c.job, c.detok, c.result, c.t_first, c.t_last))

    return await serve_choices(server, request, endpoint, [(gen, detok)], stream, streamed, whole)


def _awaits_prompt_lps(job: Job) -> bool:
    """Whether ``job`` computes its prompt's log-probabilities and they have not come back yet."""
    sampling = job.request.sampling
    return sampling is not None and sampling.prompt_logprobs is not None and job.prompt_logprobs is None


async def _drain(job: Job, detok: Detokenizer, first: tuple[str, Any],
                 retry_after: int) -> tuple[GenResult | None, float]:
    """Consume a job to its end (non-streaming); a stop sequence cancels the rest of the turn, unless the prompt's
    log-probabilities (``prompt_logprobs``, echo with ``logprobs``) are still to come: they come with the turn's
    result, so the turn then runs on, its tokens past the stop not read."""
    ev = first
    t_last = time.perf_counter()
    while True:
        kind, val = ev
        if kind == "token":
            live = detok.finish is None
            detok.push(val)
            if live:
                t_last = time.perf_counter()
            if detok.finish is not None and val not in detok.stop_ids and not _awaits_prompt_lps(job):
                job.cancel()  # a stop string: end the turn now
                return None, t_last
        elif kind == "done":
            return val, t_last
        else:
            if detok.finish is not None or job.client_cancelled:
                return None, t_last
            raise _map_error(val, retry_after)
        ev = await job.queue.get()


def _observe(server: Server, job: Job, ids: list[int], detok: Detokenizer, result: GenResult | None,
             t_first: float, t_last: float) -> None:
    n = len(detok.ids)
    server.metrics.observe_turn(
        prompt=len(ids), cached=result.cached_tokens if result is not None else job.cached, completion=n,
        path=job.path or (result.path if result else "unknown"), ttft_s=t_first - job.t_submit,
        tpot_s=(t_last - t_first) / (n - 1) if n > 1 else None)


def coalesce(job: Job, detok: Detokenizer, val: int,
             keep_ids: bool) -> tuple[str, list[int], tuple[str, Any] | None, bool]:
    """Push token ``val`` and every token already waiting in ``job``'s queue: one stream event per decode step (a
    backend that delivers a turn's tokens at once gets them coalesced). Returns the text delta, the ids pushed
    while the text was live (``keep_ids``), the first non-token event taken from the queue (or None) and whether
    a stop string ended the text."""
    delta, tids, pending, stop_string = "", [], None, False
    while True:
        live = detok.finish is None
        delta += detok.push(val)
        if live and keep_ids:
            tids.append(val)
        stop_string = live and detok.finish is not None and val not in detok.stop_ids
        if stop_string or job.queue.empty():
            break
        nxt = job.queue.get_nowait()
        if nxt[0] != "token":
            pending = nxt
            break
        val = nxt[1]
    return delta, tids, pending, stop_string
