"""Request bodies of the OpenAI-compatible API, validated by pydantic (unknown fields are errors), and the
OpenAI-style error object.

Every field the OpenAI API defines is accepted; a value this server cannot honour (a ``tool_choice`` naming no
tool, ``response_format`` other than text, ``echo`` with ``logprobs`` streamed, ...) is refused with a 400 naming
the field rather than silently ignored (:meth:`_Sampling.unsupported`); an unknown field is a 400 too. ``n``,
``best_of``, ``logprobs``/``top_logprobs`` and batches of prompts: :mod:`dualpath.http.completions`.

Extensions, as vLLM spells them (what serving benchmarks, Qwen3 users and agent frameworks send through the
``openai`` client's ``extra_body``):

* both endpoints: ``ignore_eos`` (generate ``max_tokens`` tokens even past the end-of-sequence token),
  ``return_token_ids`` (each choice carries ``token_ids``, the generated ids; always, on a server whose model
  has no tokenizer: its text is empty), ``stop_token_ids`` (more ids that end the answer, besides the model's
  end-of-sequence ids; ``ignore_eos`` leaves these in force), ``min_tokens`` (no stop token and
  no stop string ends the answer before this many tokens: the stop ids are masked in the decode engine's
  sampler, stop strings are only looked for in the text after the first ``min_tokens`` tokens; at most the max
  tokens), ``include_stop_str_in_output`` (a matched stop string stays at the end of the text),
  ``skip_special_tokens`` (default true; false keeps special tokens in the text), ``repetition_penalty`` (Hugging
  Face's definition, in (0, 10]);
* both endpoints: ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and
  ``structured_outputs`` (vLLM's structured outputs; at most one, :meth:`_Sampling.guided`; enforced by the decode
  engine's grammar, :mod:`dualpath.engine.grammar`);
* chat (and ``/v1/responses`` for the first): ``chat_template_kwargs`` (extra keyword arguments of the chat
  template, e.g. Qwen3's ``enable_thinking``; a key that is one of ``apply_chat_template``'s own arguments is
  refused naming ``chat_template_kwargs.<key>``), ``add_generation_prompt`` (default true) and ``continue_final_message``
  (default false: the answer continues the final, assistant, message; needs ``add_generation_prompt: false``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from dualpath.http.tools import FunctionDef, ToolDef

#: stop sequences per request: OpenAI allows 4, vLLM any number; clients written for either send more than 4
#: (lm-eval's HumanEval task sends 5), and each costs a check per generated token, hence a bound
MAX_STOPS = 32
#: characters per stop sequence (each is searched for in the text as it grows; a megabyte-long one cost seconds of
#: the event loop per token)
MAX_STOP_CHARS = 4096
#: ``stop_token_ids`` per request (the control protocol carries at most 256 stop ids, end-of-sequence ids included)
MAX_STOP_TOKEN_IDS = 64
MAX_ALLOWED_IDS = 1 << 18  # allowed_token_ids entries (any vocabulary this side of 262K)
MAX_BAD_WORDS = 256
#: a request's ``seed``: any 64-bit integer, as vLLM takes it (UIs send -1), folded into the sampler's
#: [0, 2^63) (the same seed, the same draws)
Seed = Annotated[int, Field(ge=-(1 << 63), le=(1 << 64) - 1), AfterValidator(lambda s: s % (1 << 63))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    #: (vLLM's) with include_usage: every chunk carries its choice's usage so far
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # accepted; this server adds no obfuscation padding


class ContentPart(BaseModel):
    """A content part; only text parts can be served (other keys of a part, e.g. ``cache_control``, are ignored)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError(f"only text content parts are supported (got type {v!r})")
        return v

    @model_validator(mode="after")
    def _has_text(self) -> ContentPart:
        if self.text is None:
            raise ValueError("a text part needs its 'text'")
        return self

    @property
    def value(self) -> str:
        return self.text or ""


_TEMPLATE_ROLES = {"developer": "system", "function": "tool"}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # what clients resend of an earlier turn (an assistant's tool calls, a tool's answer): passed to the chat
    # template, which renders them if it knows how
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    annotations: list[Any] | None = None
    # an earlier answer's thoughts as this API returns them (http.reasoning_parser), resent by the client: given to
    # the chat template as reasoning_content (Qwen3's renders or drops it as it was trained to)
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _tool_answer_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as a chat template expects it: ``developer`` is rendered as ``system``; the legacy
        function-calling turns as tool-calling ones (an assistant's ``function_call`` as its one tool call, a
        ``function`` message as a ``tool`` message that keeps the function's ``name``)."""
        role = _TEMPLATE_ROLES.get(self.role, self.role)
        d: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        elif self.function_call:
            d["tool_calls"] = [{"id": "call_0", "type": "function", "function": self.function_call}]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        thoughts = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if thoughts is not None:
            d["reasoning_content"] = d["thinking"] = thoughts  # (gpt-oss's template reads "thinking")
        return d

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.value for p in self.content)


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # (a top_k past any vocabulary keeps every token, as vLLM reads it: past 2^31 - 1, the control protocol's
    # bound, it was a 503 that clients retried)
    top_k: Annotated[int, AfterValidator(lambda k: min(k, (1 << 31) - 1))] | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # (vLLM / SGLang / llama.cpp extension)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=1, ge=1, le=128)  # null: OpenAI's default, 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # standard fields with nothing to do here (accepted, ignored)
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    # extensions (vLLM's; see the module docstring)
    ignore_eos: bool = False
    return_token_ids: bool = False
    stop_token_ids: list[NonNegativeInt] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    min_tokens: int = Field(default=0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    repetition_penalty: float | None = None
    allowed_token_ids: list[NonNegativeInt] | None = Field(default=None, min_length=1, max_length=MAX_ALLOWED_IDS)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_BAD_WORDS)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the prompt's last k tokens (-1: context)
    add_special_tokens: bool | None = None  # tokenizing the prompt text (default: completions yes, chat no)
    request_id: str | None = Field(default=None, max_length=256)  # the response's id (after its prefix)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>"
    spaces_between_special_tokens: bool = True  # (a slow tokenizer's decoding option: fast ones have none)
    priority: int = 0  # (scheduling is first come, first served: only 0)
    #: its prompt's KV is shared only with requests of the same salt (stored and in flight: dualpath.kv.keys)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    guided_decoding_backend: str | None = None  # (accepted: this server has one grammar engine)
    guided_whitespace_pattern: str | None = None  # (accepted, as structured_outputs.whitespace_pattern)
    #: the prompt tokens' log-probabilities (and their ranks), with this many most likely each (the turn is
    #: recomputed: a prompt position whose KV is loaded has no logits)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # vLLM's fields this server cannot honour: only their "off" values are accepted (else a 400 naming them)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # vLLM's structured-output extensions (at most one; dualpath.engine.grammar)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def guided(self) -> tuple[str, str, Any] | None:
        """``(field, kind, value)`` of the structured-output extension set (kind: json, regex, choice, grammar,
        json_object), or None; more than one is a ValueError naming the second."""
        found: list[tuple[str, str, Any]] = []
        for kind in ("json", "regex", "choice", "grammar"):
            v = getattr(self, f"guided_{kind}")
            if v is not None:
                found.append((f"guided_{kind}", kind, v))
        for kind, v in (self.structured_outputs or {}).items():
            if kind in ("json", "regex", "choice", "grammar") and v is not None:
                found.append((f"structured_outputs.{kind}", kind, v))
            elif kind == "json_object" and v:
                found.append(("structured_outputs.json_object", "json_object", True))
            elif v is not None and kind not in ("disable_fallback", "disable_any_whitespace",
                                                "disable_additional_properties", "whitespace_pattern"):
                raise ValueError(f"structured_outputs.{kind}")
        if len(found) > 1:
            raise ValueError(found[1][0])
        return found[0] if found else None

    def unsupported(self) -> tuple[str, str] | None:
        """``(field, message)`` of the first standard field whose value this server cannot honour (a 400), or
        None."""
        if self.repetition_penalty is not None and not 0.0 < self.repetition_penalty <= 10.0:
            return "repetition_penalty", f"repetition_penalty: must lie in (0, 10] (got {self.repetition_penalty})"
        for key, bias in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                return "logit_bias", f"logit_bias: keys are token ids (got {key!r})"
            if not -100.0 <= bias <= 100.0:
                return "logit_bias", f"logit_bias: {key}: biases lie in [-100, 100] (got {bias})"
        if len(self.logit_bias or {}) > 4096:
            return "logit_bias", "logit_bias: at most 4096 entries"
        if any(not w.strip() for w in self.bad_words or ()):
            return "bad_words", "bad_words: each word must be non-empty"
        if self.priority != 0:
            return "priority", (f"priority: this server schedules first come, first served; only 0 is accepted (got "
                                f"{self.priority})")
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs: not supported with stream (send stream: false)"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options: only allowed with stream: true"
        refused = {
            "use_beam_search": (self.use_beam_search, "beam search is not supported"),
            "length_penalty": (self.length_penalty != 1.0, "only applies to beam search, which is not supported"),
            "kv_transfer_params": (bool(self.kv_transfer_params), "not supported (this server moves KV itself)"),
            "vllm_xargs": (bool(self.vllm_xargs), "not supported (no custom logits processors)"),
            "mm_processor_kwargs": (bool(self.mm_processor_kwargs), "not supported (text only)"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                return name, f"{name}: {why}"
        try:
            guided = self.guided()
        except ValueError as exc:
            return str(exc), f"{exc}: not supported, or a second structured-output constraint (send one)"
        if guided is not None and guided[1] == "choice" and not all(isinstance(c, str) and c for c in guided[2]):
            return guided[0], f"{guided[0]}: a list of non-empty strings"
        return None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif isinstance(v, str) and not v:
            raise ValueError("a stop sequence must be non-empty")
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None  # function calling: dualpath.http.tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # the deprecated function calling: read as ``tools`` / ``tool_choice`` (:meth:`_from_functions`), answered in
    # its own shape (``message.function_call``, finish ``function_call``)
    functions: list[FunctionDef] | None = Field(default=None, min_length=1)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # the chat template's reasoning_effort variable (gpt-oss's template reads it; others ignore it)
    reasoning_effort: str | None = None
    # hints that cannot change this server's answer (accepted, ignored)
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # extensions (vLLM's; see the module docstring)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None  # (RAG documents for a template that renders them)
    chat_template: str | None = None  # (refused: the checkpoint's template is the one served)
    echo: bool = False  # (refused when true)

    _legacy: bool = PrivateAttr(default=False)
    _legacy_problem: tuple[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _from_functions(self) -> ChatCompletionRequest:
        """``functions`` becomes ``tools`` and ``function_call`` ``tool_choice`` (``{"name": f}``: that function),
        with at most one call in the answer; mixed with ``tools``/``tool_choice`` it is refused (:meth:`unsupported`)."""
        if self.functions is None and self.function_call is None:
            return self
        if self.tools is not None or self.tool_choice is not None:
            field = "functions" if self.functions is not None else "function_call"
            self._legacy_problem = (field, f"{field}: the legacy function calling cannot be mixed with tools / "
                                           "tool_choice; send one of them")
            return self
        fc = self.function_call
        if isinstance(fc, dict):
            name = fc.get("name")
            if set(fc) != {"name"} or not isinstance(name, str):
                self._legacy_problem = ("function_call", "function_call: must be 'none', 'auto' or {\"name\": "
                                                         f"<a function>}} (got {fc!r})")
                return self
            fc = {"type": "function", "function": {"name": name}}
        self._legacy = True
        self.tools = [ToolDef(type="function", function=f) for f in self.functions or []]
        self.tool_choice = fc
        self.parallel_tool_calls = False
        return self

    @property
    def legacy_functions(self) -> bool:
        """Whether the request used the legacy ``functions`` / ``function_call`` (the answer takes their shape)."""
        return self._legacy

    def unsupported(self) -> tuple[str, str] | None:
        bad = super().unsupported()
        if bad is not None:
            return bad
        if self._legacy_problem is not None:
            return self._legacy_problem
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs: needs logprobs: true"
        if self.response_format is not None:
            problem = response_format_problem(self.response_format)
            if problem is not None:
                return "response_format", problem
        problem = tool_choice_problem(self.tool_choice, [t.function.name for t in self.tools or []])
        if problem is not None:
            if self._legacy:
                return "function_call", "function_call" + problem[len("tool_choice"):]
            return "tool_choice", problem
        guided = self.guided()
        if guided is not None and (self.tool_choice not in (None, "none", "auto")
                                   or (self.response_format or {}).get("type", "text") != "text"):
            return guided[0], f"{guided[0]}: a second structured-output constraint (with response_format or a " \
                              "forced tool call; send one)"
        if self.tool_choice not in (None, "none", "auto") and (self.response_format or {}).get("type", "text") \
                != "text":
            return "tool_choice", "tool_choice: a forced call cannot also follow response_format (send one of them)"
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return "modalities", f"modalities: only text output is supported (got {self.modalities})"
        if self.audio is not None:
            return "audio", "audio: audio output is not supported"
        if self.web_search_options is not None:
            return "web_search_options", "web_search_options: web search is not supported"
        if self.chat_template is not None:
            return "chat_template", ("chat_template: not accepted per request (the checkpoint's template is the one "
                                     "served; chat_template_kwargs sets its variables)")
        if self.echo:
            return "echo", "echo: not supported on chat completions (the completions endpoint echoes the prompt)"
        return None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def active_tools(self) -> list[ToolDef]:
        """The tools the model may call: none with ``tool_choice: "none"``."""
        return [] if self.tool_choice == "none" else list(self.tools or [])


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="text, token ids, or a batch of either")
    max_tokens: int | None = Field(default=None, ge=0)  # 0: only with echo (score the prompt, generate nothing)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI's limit is 5, vLLM's default 20
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        bad = super().unsupported()
        if bad is not None:
            return bad
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens: 0 needs echo: true (the prompt is the whole answer)"
        if self.echo and self.logprobs is not None and self.stream:
            return "logprobs", ("logprobs: not supported with echo and stream (the prompt's log-probabilities come "
                                "with the whole answer; send stream: false)")
        if self.best_of is not None and self.best_of < (self.n or 1):
            return "best_of", f"best_of: must be at least n ({self.n}); got {self.best_of}"
        if self.best_of is not None and self.best_of > (self.n or 1) and self.stream:
            return "best_of", "best_of: must equal n when streaming (the best ones are known only at the end)"
        if self.suffix:
            return "suffix", "suffix: not supported"
        return None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt is empty")
            if all(isinstance(x, str) for x in v):
                if any(not x for x in v):
                    raise ValueError("a prompt of the batch is empty")
            elif all(isinstance(x, list) for x in v):
                for i, ids in enumerate(v):
                    if not ids:
                        raise ValueError(f"prompt {i} of the batch is empty")
                    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in ids):
                        raise ValueError(f"prompt {i} of the batch: token ids must be non-negative integers")
            elif any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
                raise ValueError("token ids must be non-negative integers")
        elif not v:
            raise ValueError("the prompt is empty")
        return v

    def limit(self) -> int | None:
        return self.max_tokens


def tool_choice_problem(choice: str | dict[str, Any] | None, names: list[str]) -> str | None:
    """Why a ``tool_choice`` cannot be honoured with the tools ``names`` (None: it can)."""
    from dualpath.http.tools import chosen_function

    if choice in (None, "none", "auto"):
        return None
    if choice == "required":
        return None if names else "tool_choice: 'required' needs tools"
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = chosen_function(choice)
        if name in names:
            return None
        return f"tool_choice: the function {name!r} is not among the tools ({names})"
    return f"tool_choice: must be 'none', 'auto', 'required' or a function (got {choice!r})"


def response_format_problem(rf: dict[str, Any]) -> str | None:
    """Why a chat ``response_format`` cannot be honoured (None: it can): ``text``, ``json_object`` or
    ``json_schema`` with a ``json_schema.schema`` object."""
    kind = rf.get("type", "text")
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        return f"response_format: type must be 'text', 'json_object' or 'json_schema' (got {kind!r})"
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        return "response_format: json_schema must be an object whose 'schema' is a JSON schema object"
    return None


def error_body(message: str, etype: str = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def _union_tag(part: Any) -> bool:
    """A ``loc`` element naming the member of a union (``str``, ``list[ContentPart]``), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict") or "[" in part)


def describe_validation(errors: list[Any]) -> tuple[str, str | None]:
    """One line for pydantic's errors (first one named by its field path) and the offending parameter."""
    if not errors:
        return "invalid request", None
    first = {"json_invalid": 0, "value_error": 1, "extra_forbidden": 2}  # a validator's own message over the
    errors = sorted(errors, key=lambda e: first.get(e.get("type", ""), 3))  # type mismatches of union members
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _union_tag(p)]
    where = ".".join(loc)
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        msg = f"unknown field {where!r}"
    elif kind == "json_invalid":
        msg = f"malformed JSON: {e.get('msg', '')}"
        where = ""
    elif kind == "missing" and not where:
        msg = "the request body is empty: send a JSON object"
    elif kind == "missing":
        msg = f"missing field {where!r}"
    elif kind in ("model_attributes_type", "dict_type") and not where and isinstance(e.get("input"), bytes | str):
        msg = "the request body must be a JSON object, sent as Content-Type: application/json"
    else:
        msg = f"{where}: {e.get('msg', 'invalid value')}" if where else str(e.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return msg + more, where or None


class TokenizeRequest(_Strict):
    """vLLM's ``POST /tokenize``: a ``prompt`` (completions) or ``messages`` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
