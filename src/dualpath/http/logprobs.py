"""Token log-probabilities in the OpenAI API's two shapes.

The decode engine records each generated token's :class:`~dualpath.types.TokenLogprob` (the picked token's
log-probability under the model and the ``k`` most likely tokens'; :mod:`dualpath.engine.sampling`) when the
request asks for them; this module writes them out:

* chat (``logprobs: true``, ``top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...]}, ...], "refusal": null}``;
* completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``;
  as in vLLM, each ``top_logprobs`` map holds the ``k`` most likely tokens and the picked one, so it may have
  ``k + 1`` entries.

A token's text is its bytes decoded as UTF-8 (an incomplete character shows as U+FFFD); ``bytes`` are the token's
exact bytes, so a client can join the tokens of a character split across several. They come from the vocabulary:
byte-level BPE (GPT-2's byte-to-character map), SentencePiece (``▁`` is a space, ``<0xNN>`` one byte) or, for
any other tokenizer, the UTF-8 of ``decode([id])``. A log-probability of ``-inf`` (a token the model rules out) is
written as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from dualpath.types import TokenLogprob

#: a token id's text and bytes in log-probabilities (a :class:`TokenText`, or vLLM's ``token_id:<id>`` naming)
TokenNamer = Callable[[int], tuple[str, list[int]]]

FLOOR = -9999.0  # what -inf is written as

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for themselves, every
    other byte for the code point 256 + its rank among those others."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    out = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _decoder_kind(tokenizer: Any) -> str:
    """``byte_level``, ``sentencepiece`` or ``other``: how the tokenizer's pieces map to bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    desc = repr(decoder) if decoder is not None else ""
    if "ByteLevel" in desc:
        return "byte_level"
    if "ByteFallback" in desc or "Metaspace" in desc or "▁" in desc:
        return "sentencepiece"
    return "other"


class TokenText:
    """A token id's text and exact bytes, from ``tokenizer``'s vocabulary (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.kind = _decoder_kind(tokenizer) if tokenizer is not None else "none"
        self.special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
        self._byte_map = _byte_level_map() if self.kind == "byte_level" else {}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        got = self._cache.get(tid)
        if got is None:
            raw = self._bytes(tid)
            got = self._cache[tid] = (raw.decode("utf-8", errors="replace"), list(raw))
        return got

    def _bytes(self, tid: int) -> bytes:
        if self.tok is None:
            return f"<{tid}>".encode()  # no tokenizer (prompt ids in, ids out): the id itself
        piece = self.tok.convert_ids_to_tokens(int(tid))
        if isinstance(piece, str) and tid not in self.special:
            if self.kind == "byte_level" and all(c in self._byte_map for c in piece):
                return bytes(self._byte_map[c] for c in piece)
            if self.kind == "sentencepiece":
                m = _BYTE_TOKEN.match(piece)
                return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        if isinstance(piece, str) and tid in self.special:
            return piece.encode()
        return str(self.tok.decode([int(tid)], skip_special_tokens=False)).encode()


def _value(x: float) -> float:
    return FLOOR if math.isinf(x) and x < 0 else max(FLOOR, float(x))


def generated_logprobs(job: Any, start: int, count: int, who: str = "") -> list[TokenLogprob]:
    """The log-probabilities of generated tokens ``start .. start + count - 1`` of ``job`` (an HTTP backend's
    job); a 503 (``logprobs_lost``) when some did not come with their tokens: a misaligned list is never served.
    ``who`` names the choice in the message."""
    got: list[TokenLogprob] = job.logprobs[start: start + count]
    if len(got) < count:
        from dualpath.http.app import ApiError

        raise ApiError(503, f"{who}the log-probabilities of tokens {start}..{start + count - 1} were lost in "
                            "transit; retry", "server_error", code="logprobs_lost")
    return got


def chat_entries(text: TokenNamer, lps: list[TokenLogprob], top: int) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` entries of ``lps`` with their ``top`` most likely tokens."""
    out = []
    for lp in lps:
        s, b = text(lp.token)
        alts = []
        for tid, v in lp.top[:top]:
            ts, tb = text(tid)
            alts.append({"token": ts, "logprob": _value(v), "bytes": tb})
        out.append({"token": s, "logprob": _value(lp.logprob), "bytes": b, "top_logprobs": alts})
    return out


def prompt_logprob_entries(text: TokenNamer, lps: list[TokenLogprob], top: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: ``None`` for the first prompt token, then per token a map from token id (a
    string) to ``{"logprob", "rank", "decoded_token"}``: the token itself first (its rank among the vocabulary),
    then the ``top`` most likely (ranks 1..``top``)."""
    out: list[dict[str, Any] | None] = [None]
    for lp in lps:
        entry = {str(lp.token): {"logprob": _value(lp.logprob), "rank": lp.rank, "decoded_token": text(lp.token)[0]}}
        for r, (tid, v) in enumerate(lp.top[:top], start=1):
            entry.setdefault(str(tid), {"logprob": _value(v), "rank": r, "decoded_token": text(tid)[0]})
        out.append(entry)
    return out


def completion_logprobs(text: TokenNamer, lps: list[TokenLogprob], top: int, offset: int) -> dict[str, Any]:
    """The completions ``logprobs`` object of ``lps`` (``top`` most likely tokens each), the first token's text
    starting at character ``offset`` of the choice's text."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        s, _ = text(lp.token)
        tokens.append(s)
        values.append(_value(lp.logprob))
        alts: dict[str, float] = {}
        for tid, v in lp.top[:top]:
            alts.setdefault(text(tid)[0], _value(v))
        alts.setdefault(s, _value(lp.logprob))
        tops.append(alts)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

