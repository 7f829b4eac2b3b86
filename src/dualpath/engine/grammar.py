"""Constrained decoding: the decode engine picks only tokens a grammar allows (structured outputs).

A turn's :class:`~dualpath.engine.sampling.SamplingParams` may carry ``grammar``: an llguidance grammar (from
:func:`json_schema_grammar`, or any grammar llguidance reads: Lark, regex, a JSON schema). The decode engine
builds one :class:`Constraint` per request from it and the model's own tokenizer; before each pick the sampler
sets every token the grammar does not allow next to ``-inf`` (after the ``min_tokens`` mask, before temperature
and filtering), and feeds the picked token to the grammar after. Once the grammar is complete only the
end-of-sequence token is allowed, so the request stops there; a request whose ``max_tokens`` ends first is cut
(``finish_reason: length``), as in OpenAI's API.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (the Rust matcher vLLM, SGLang
and llama.cpp use): a token mask costs well under a millisecond per step. Its tokenizer view is built once per
tokenizer (about 0.5 s for a 49k vocabulary) and cached. The HTTP layer checks a grammar against the same
tokenizer before submitting (:func:`check_grammar`), so a bad schema is a 400 naming the field, not a failed turn.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualpath.errors import ModelError

_lock = threading.Lock()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a dependency of the model extra
        raise ModelError("constrained decoding (response_format) needs llguidance: pip install 'dualpath[model]'"
                         ) from exc
    return llguidance


def tokenizer_source(config: Any) -> str | None:
    """Where a config's model keeps its tokenizer (a checkpoint directory or file), None for a model without one
    (synthetic)."""
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.embedded import checkpoint_path

    model = getattr(config, "model", None)
    return str(checkpoint_path(model.path)) if isinstance(model, LlamaModelConfig) else None


@functools.lru_cache(maxsize=4)
def _lltokenizer_from_source(source: str) -> Any:
    from dualpath.model.loader import load_tokenizer

    with _lock:  # the same checkpoint's tokenizer already seen in this process (an in-process server's): reuse it
        got = _by_path.get(os.path.realpath(source))
    if got is not None:
        return got
    tok = load_tokenizer(Path(source))
    if tok is None:
        raise ModelError(f"constrained decoding needs the model's tokenizer; {source} has none")
    return lltokenizer(tok)


_by_tokenizer: dict[int, tuple[Any, Any]] = {}
_by_path: dict[str, Any] = {}  # a tokenizer's checkpoint (its name_or_path, resolved) -> its LLTokenizer


def lltokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face (fast) tokenizer, built once per tokenizer object."""
    with _lock:
        got = _by_tokenizer.get(id(tokenizer))
        if got is not None and got[0] is tokenizer:
            return got[1]
    llg = _llguidance()
    try:
        lt = llg.hf.from_tokenizer(tokenizer)
    except ValueError as exc:
        raise ModelError(f"constrained decoding needs a fast tokenizer: {exc}") from None
    where = getattr(tokenizer, "name_or_path", "")
    with _lock:
        _by_tokenizer[id(tokenizer)] = (tokenizer, lt)
        if where and os.path.isdir(where):
            _by_path[os.path.realpath(where)] = lt
    return lt


#: whitespace allowed between JSON tokens: one line break and an indent (pretty-printing to a depth of 12 at two
#: spaces), never a run of blank lines: JSON's own rule (any whitespace) lets a weak model, or a strong one at a
#: high temperature, emit whitespace until ``max_tokens``, a known failure of constrained JSON decoding
JSON_WHITESPACE = "[\\n\\r]?[ \\t]{0,24}"


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")


def closed_objects(schema: Any, *, in_all_of: bool = False) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that lists ``properties`` and says
    nothing of other ones, as vLLM's default backend (xgrammar's strict mode) and OpenAI's strict structured
    outputs generate: what is generated stays valid under the schema as given, and a small model cannot wander
    off into invented keys until ``max_tokens``. Left open: an object that says how other properties are
    treated, one combined by ``allOf`` or ``$ref`` (a branch closed on its own would refuse its siblings'
    properties), and one whose ``properties`` are empty."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k in _SUBSCHEMA_LISTS and isinstance(v, list):
            out[k] = [closed_objects(x, in_all_of=k == "allOf") for x in v]
        elif k in _SUBSCHEMA and isinstance(v, dict):
            out[k] = closed_objects(v)
        elif k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: closed_objects(x) for name, x in v.items()}
        else:
            out[k] = v
    props = schema.get("properties")
    if isinstance(props, dict) and props and not in_all_of and not any(k in schema for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The llguidance grammar of JSON values valid under ``schema`` (``{"type": "object"}``: any object), with
    :data:`JSON_WHITESPACE` between tokens (a schema's own ``x-guidance`` options win) and its objects'
    properties those it lists (:func:`closed_objects`)."""
    llg = _llguidance()
    try:
        return str(llg.LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(schema)),
                                                          defaults={"whitespace_pattern": JSON_WHITESPACE}))
    except ValueError as exc:
        raise ModelError(f"not a JSON schema: {exc}") from None


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: ``%json {schema}`` embeds a JSON schema)."""
    return str(_llguidance().LLMatcher.grammar_from_lark(lark))


def regex_grammar(regex: str) -> str:
    """The llguidance grammar of text matching ``regex`` (Rust regex syntax, anchored at both ends)."""
    return str(_llguidance().LLMatcher.grammar_from_regex(regex))


def choice_grammar(choices: list[str]) -> str:
    """The llguidance grammar of exactly one of ``choices`` (literal strings)."""
    return lark_grammar("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def ebnf_grammar(text: str) -> str:
    """The llguidance grammar of a Lark grammar or a GBNF/EBNF one (``root ::= ...``, as llama.cpp and vLLM write
    them; converted by llguidance)."""
    _llguidance()
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return lark_grammar(str(any_to_lark(text)))
    except Exception as exc:  # the converter's own errors (unbalanced rules, unknown syntax)
        raise ModelError(f"not a Lark or GBNF grammar: {exc}") from None


def check_grammar(grammar: str, tokenizer: Any) -> str:
    """'' when ``grammar`` compiles against ``tokenizer`` (a Hugging Face tokenizer), else llguidance's error."""
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer(tokenizer))
    if is_error:
        return "; ".join(messages)
    # a grammar that compiles may still admit no text at all (a schema whose $ref only refers to itself): the
    # decode engine would find no token allowed at its first step
    matcher = llg.LLMatcher(lltokenizer(tokenizer), grammar)
    first = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)  # (an error shows once it is computed)
    if matcher.is_error() or not first.any():
        why = (matcher.get_error() or "").strip().splitlines()  # (its first line; the rest is the parser's state)
        return f"it admits no text: no token can start it ({why[0] if why else 'dead end'})"
    return ""


class Constraint:
    """One request's grammar state on the decode engine (see the module docstring)."""

    def __init__(self, grammar: str, source: str | None) -> None:
        if source is None:
            raise ModelError("constrained decoding needs the model's tokenizer (this model has none)")
        llg = _llguidance()
        self.tok = _lltokenizer_from_source(source)
        self.matcher = llg.LLMatcher(self.tok, grammar)
        if self.matcher.is_error():
            raise ModelError(f"grammar: {self.matcher.get_error()}")
        self.vocab = int(self.tok.vocab_size)
        eos = getattr(self.tok, "eos_token", None)
        #: the end-of-sequence token, the only one a complete grammar allows
        self.eos: int | None = int(eos) if isinstance(eos, int) and 0 <= eos < self.vocab else None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row) with every token the grammar does not allow next at ``-inf``."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)
        if self.matcher.is_error() or not allowed.any():
            raise ModelError(f"grammar: no token is allowed ({self.matcher.get_error() or 'dead end'})")
        flat = logits.reshape(-1)
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        n = min(self.vocab, flat.numel())
        keep[:n] = torch.from_numpy(allowed[:n])
        return flat.masked_fill(~keep.to(flat.device), float("-inf"))

    def allows(self, token: int) -> bool:
        """Whether the grammar allows ``token`` next (a few microseconds: no mask is computed)."""
        return bool(self.matcher.validate_tokens([int(token)]) == 1)

    def accept(self, token: int) -> None:
        """Feed the picked token to the grammar."""
        if not self.matcher.consume_token(int(token)):
            raise ModelError(f"grammar: token {token} was not allowed ({self.matcher.get_error()})")

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and accepts nothing more but the end of the sequence."""
        return bool(self.matcher.is_stopped())
