"""The ``http`` section of the root config: the OpenAI-compatible front door (``dualpath serve --http``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dualpath._configbase import Section


class HttpConfig(Section):
    """Where the HTTP API listens, what it calls its model, and how much it accepts at once.

    ``mode``: ``process`` (default) fronts a multi-process deployment (``dualpath serve``: the scheduler and
    one process per engine); ``inprocess`` runs the emulated cluster inside the HTTP server's process (for
    notebooks and tests). Binds to loopback unless ``host`` is set. With ``api_key`` set every ``/v1/*``
    request needs ``Authorization: Bearer <api_key>`` (``/health`` and ``/metrics`` stay open)."""

    host: str = Field(default="127.0.0.1", description="bind address (loopback by default)")
    port: int = Field(default=8000, ge=0, le=65535, description="port; 0 picks a free one")
    mode: Literal["process", "inprocess"] = Field(default="process", description="multi-process or in-process")
    api_key: str | list[str] | None = Field(
        default=None, description="required Bearer token for /v1/* (none by default); a list: any of them")
    isolate_keys: bool = Field(
        default=False,
        description="each API key's requests share stored KV only with that key's: a cache salt per key (from a "
                    "hash of the key), combined with a request's own cache_salt; needs api_key. Without it, all "
                    "keys share one prefix cache, as in vLLM")
    model_name: str | None = Field(default=None, description="the id /v1/models reports (default from the model)")
    max_inflight: int = Field(default=256, ge=1, description="requests served at once; more get 429")
    max_tokens_default: int = Field(default=256, ge=1, description="max_tokens when a request gives none")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After on 429/503")
    request_timeout_s: float = Field(default=300.0, gt=0, description="a request ends by this deadline")
    default_temperature: float = Field(default=1.0, ge=0.0, le=2.0,
                                       description="temperature when a request gives none (OpenAI's default); "
                                                   "set here, it wins over the checkpoint's generation_config.json")
    generation_config: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: a request that gives no temperature / top_p / top_k / min_p / repetition_penalty / "
                    "max_tokens gets the checkpoint's generation_config.json value (max_new_tokens for max_tokens; "
                    "as vLLM does by default; a configured default_temperature / max_tokens_default wins); none: this "
                    "server's "
                    "defaults (temperature default_temperature, no cut, no penalty). The checkpoint's "
                    "end-of-sequence ids end answers either way (dualpath.model.generation_config)")
    responses_store_max: int = Field(default=1024, ge=0,
                                     description="stored /v1/responses conversations (previous_response_id), "
                                                 "in memory, least recently used dropped; 0 stores none")
    max_body_bytes: int = Field(default=32 << 20, ge=1024,
                                description="a request body larger than this gets 413 before it is read")
    body_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                                  description="a request body not received whole within this many seconds of its "
                                              "request's start gets 408 and the connection is closed (a client "
                                              "trickling its body held a connection, and its descriptor, forever)")
    shared_prefill_min_tokens: int = Field(
        default=256, ge=0,
        description="choices of one prompt at least this long (n, best_of) share its prefill: the first is "
                    "computed, the others start once its prompt's KV is stored and load it from storage; "
                    "0 shares every prompt's; also the least prefix separate requests arriving together must share "
                    "for the later ones to wait for the first's (inflight_prefix_wait_s)")
    inflight_prefix_wait_s: float = Field(
        default=30.0, ge=0,
        description="a request sharing a prefix of at least shared_prefill_min_tokens (and 64) tokens with a "
                    "request being prefilled waits for that prefix to be stored, at most this long, then loads it "
                    "instead of computing it again (dualpath.http.prefix_share); 0 never waits")
    tool_parser: Literal["auto", "hermes", "llama3_json", "deepseek_v3", "deepseek_v31", "mistral"] = Field(
        default="auto",
        description="how tool calls are read from the generated text (dualpath.http.tools): hermes "
                    "(<tool_call> JSON blocks: Qwen2.5/3, Hermes, and the fallback for templates without tools), "
                    "llama3_json (a bare JSON object), deepseek_v3 / deepseek_v31 (DeepSeek's tool-call markers), mistral "
                    "([TOOL_CALLS]), "
                    "auto (picked from the chat template)")
    reasoning_parser: Literal["none", "auto", "think"] = Field(
        default="none",
        description="chat answers' <think>...</think> text as the message's reasoning_content (and reasoning), "
                    "apart from its content (dualpath.http.reasoning): none (the default: all content, as written), "
                    "think (always), auto (when the tokenizer has both tags as tokens: Qwen3, QwQ, DeepSeek-R1 / "
                    "V3.1+, GLM-4.5, SmolLM3)")

    @field_validator("api_key")
    @classmethod
    def _keys(cls, v: str | list[str] | None) -> str | list[str] | None:
        keys = [v] if isinstance(v, str) else v or []
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of keys would admit nobody; leave api_key unset for an open server")
        if any(not k.strip() for k in keys):
            raise ValueError("a key must be a non-empty string")
        return v

    @model_validator(mode="after")
    def _isolation_needs_keys(self) -> HttpConfig:
        if self.isolate_keys and self.api_key is None:
            raise ValueError("isolate_keys needs api_key (the keys are what requests are isolated by)")
        return self

    @property
    def api_keys(self) -> list[str]:
        """The accepted keys (none: an open server)."""
        return [self.api_key] if isinstance(self.api_key, str) else list(self.api_key or [])
