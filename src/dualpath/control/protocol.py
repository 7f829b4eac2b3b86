"""The control-plane wire format: versioned msgpack envelopes, validated field by field before use.

One message is one ZeroMQ frame holding a msgpack map::

    {"v": 1, "t": "<type>", "id": <int>, "re": <int>, "b": {<fields of the type>}, "inc": <int>, "to": <int>}

``id`` numbers the sender's messages; ``re`` is the ``id`` of the request a reply answers (0 = not a reply).
``inc`` and ``to`` (optional, 0 when absent) fence a restarted server: a server stamps everything it sends with
its incarnation (``inc``, random at its start), a client stamps what it sends with the last incarnation it heard
from (``to``), and a server drops what was addressed to another incarnation (a message that sat in a client's
socket while its server died and restarted on the same address; see :mod:`dualpath.control.channel`).
Decoding (:func:`decode`) checks, in this order and before anything is allocated for the payload: the frame
size, then msgpack with per-object limits (string, binary, array and map lengths bounded; extension types
refused; map keys must be strings), then the envelope, then the type's schema (:data:`SCHEMAS`): every field's
type, range and length; unknown fields and missing required fields are errors. No pickle, ever: only msgpack's
plain types cross the wire. A bad message raises :class:`ProtocolError` naming the field; the receiver logs it,
answers ``error`` when it can identify the sender and keeps running.

Token ids travel as little-endian int64 ``bin`` (``tokens_to_bin``/``bin_to_tokens``); logits as float32 ``bin``.
Per-token log-probabilities (a turn whose sampling asks for ``logprobs``) ride on the ``tokens`` and ``stream``
notices: ``lp_width`` entries per token (the picked token, then its ``logprobs`` most likely), their ids as int32
``lp_ids`` and their values as float32 ``lp_vals`` (``logprobs_to_bin``/``bin_to_logprobs``). A prompt's
(``prompt_logprobs``) go the same way as ``plp_width``/``plp_ids``/``plp_vals`` on the PE's ``prefilled`` reply
and the scheduler's ``result``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from dualpath.errors import DualPathError

VERSION = 1
MAX_FRAME_BYTES = 64 << 20  # default frame cap (config: serve.max_message_bytes)
MAX_STR = 4096
MAX_ARRAY = 1 << 16
MAX_MAP = 256
MAX_TOKENS = 1 << 20  # tokens of one prompt
MAX_BIN = MAX_TOKENS * 8
U63 = (1 << 63) - 1
MAX_BIAS = 1 << 12  # logit_bias entries of one request
MAX_ALLOWED = 1 << 18  # allowed token ids of one request
MAX_BAD_IDS = 1 << 14  # tokens of one request's bad words, all together
MAX_LP_WIDTH = 21  # logprob entries per streamed token: the picked one and up to 20 most likely
MAX_LP_BIN = (1 << 16) * MAX_LP_WIDTH * 4  # a notice's tokens (at most 2^16), each with MAX_LP_WIDTH entries
MAX_PLP_BIN = MAX_TOKENS * MAX_LP_WIDTH * 4  # a prompt's tokens, each with MAX_LP_WIDTH entries (the frame cap rules)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")


class ProtocolError(DualPathError, ValueError):
    """A control message is malformed (size, encoding, envelope, field type, range or length)."""


@dataclass(frozen=True)
class F:
    """One field: ``kind`` in int, float, str, bin, bool, ints (list of int), strs (list of str), map (str->int).

    ``lo``/``hi`` bound numbers (and list items for ``ints``); ``max_len`` bounds str/bin/list lengths;
    ``choices`` restricts str values; ``pattern`` must match str values; ``multiple`` = bin length multiple."""

    kind: str
    required: bool = True
    lo: float | None = None
    hi: float | None = None
    max_len: int | None = None
    choices: tuple[str, ...] | None = None
    pattern: re.Pattern[str] | None = None
    multiple: int = 1


_RID = F("int", lo=0, hi=U63)
_ENGINE = F("int", lo=0, hi=1 << 16)
_NAME = F("str", max_len=128, pattern=_NAME_RE)
_REASON = F("str", max_len=MAX_STR)
_TIME = F("float", lo=0.0, hi=1e12)

#: a prompt's log-probabilities (prompt tokens 1 .. n-1; sampling's ``prompt_logprobs``): PE -> scheduler on
#: ``prefilled``, scheduler -> client on ``result``
PROMPT_LP_FIELDS: dict[str, F] = {
    "plp_width": F("int", required=False, lo=1, hi=MAX_LP_WIDTH),
    "plp_ids": F("bin", required=False, max_len=MAX_PLP_BIN, multiple=4),
    "plp_vals": F("bin", required=False, max_len=MAX_PLP_BIN, multiple=4),
    "plp_ranks": F("bin", required=False, max_len=MAX_TOKENS * 4, multiple=4),  # each token's rank, int32
}

#: message type -> its fields
SCHEMAS: dict[str, dict[str, F]] = {
    # --- generic ---
    "ping": {},
    "pong": {"role": F("str", required=False, max_len=32)},
    "ok": {"cancelled": F("int", required=False, lo=0, hi=U63)},  # (a cancel's reply: turns it ended)
    "error": {"code": F("str", max_len=64, pattern=_NAME_RE), "message": _REASON},
    # --- client -> scheduler ---
    "submit": {
        "session": F("int", lo=0, hi=U63),
        "prompt": F("bin", max_len=MAX_BIN, multiple=8),
        "gen": F("int", lo=1, hi=1 << 20),
        "deadline_s": F("float", required=False, lo=0.001, hi=86400.0),
    },
    "stream": {  # scheduler -> client notice: tokens of a streamed turn, in order (``offset`` = index of the first)
        "stream": F("int", lo=1, hi=U63),  # the submit's stream id
        "offset": F("int", lo=0, hi=1 << 20),
        "tokens": F("ints", max_len=1 << 16, lo=0, hi=(1 << 31) - 1),
        "path": F("str", required=False, max_len=16),  # on the first notice: where the hit is read
        "hit_tokens": F("int", required=False, lo=0, hi=MAX_TOKENS),  # ... and how many prompt tokens it holds
        "lp_width": F("int", required=False, lo=1, hi=MAX_LP_WIDTH),  # logprob entries per token (see above)
        "lp_ids": F("bin", required=False, max_len=MAX_LP_BIN, multiple=4),
        "lp_vals": F("bin", required=False, max_len=MAX_LP_BIN, multiple=4),
    },
    "result": {
        "session": F("int", lo=0, hi=U63),
        "tokens": F("ints", max_len=1 << 20, lo=0, hi=(1 << 31) - 1),
        "prompt_tokens": F("int", lo=0, hi=MAX_TOKENS),
        "hit_tokens": F("int", lo=0, hi=MAX_TOKENS),
        "path": F("str", max_len=16),
        "pe": _ENGINE,
        "de": _ENGINE,
        "ttft_s": F("float", lo=0.0, hi=1e9),
        "tpot_s": F("float", lo=0.0, hi=1e9),
        "total_s": F("float", lo=0.0, hi=1e9),
        "last_s": F("float", required=False, lo=0.0, hi=1e9),  # submit -> the last token (total_s: -> the end)
        "retries": F("int", lo=0, hi=1 << 16),
    },
    "cancel": {  # client: end its own turn(s) of this session now; operator (token or key): anyone's
        "session": F("int", lo=0, hi=U63),
        "token": F("str", required=False, max_len=128),
    },
    "stats": {},
    "stats_reply": {"data": F("map", max_len=MAX_MAP)},
    "shutdown": {"token": F("str", required=False, max_len=128)},  # operator (token: without CURVE)
    "drain": {"token": F("str", required=False, max_len=128)},  # operator: refuse new turns, finish the others
    # --- engine <-> scheduler ---
    "hello": {
        "role": F("str", choices=("prefill", "decode")),
        "rank": _ENGINE,
        "node": _ENGINE,
        "address": F("str", max_len=1024),
        "pid": F("int", lo=0, hi=1 << 31),
        "fingerprint": F("str", max_len=256),
        "token_bytes": F("int", lo=1, hi=1 << 40),
        "vocab_size": F("int", lo=1, hi=1 << 31),
        "max_context": F("int", lo=1, hi=1 << 31),
        "token": F("str", required=False, max_len=128),  # the engine token (without CURVE)
        "epoch": F("int", required=False, lo=0, hi=U63),  # the incarnation this process had (0: none yet)
        "holds": F("ints", required=False, max_len=1 << 16, lo=0, hi=U63),  # turns (rids) it still holds
        "stored_blocks": F("int", required=False, lo=0, hi=U63),  # blocks in its storage index
        "work_model": F("map", required=False, max_len=16),  # a PE's predicted-work model (engine/work.py)
    },
    "welcome": {"peers": F("strs", max_len=1024), "heartbeat_s": F("float", lo=0.001, hi=3600.0),
                "epoch": F("int", required=False, lo=0, hi=U63)},  # this incarnation's epoch (fencing)
    "heartbeat": {
        "epoch": F("int", required=False, lo=0, hi=U63),
        "seq": F("int", lo=0, hi=U63),
        "tok": F("int", lo=0, hi=U63),
        "read_q": F("int", lo=0, hi=U63),
        "free_kv_tokens": F("int", lo=0, hi=U63),
        "inflight": F("int", lo=0, hi=U63),
        "rss": F("int", lo=0, hi=U63),
        "fds": F("int", lo=0, hi=1 << 24),
        "tasks": F("int", lo=0, hi=1 << 24),
        "regions": F("int", lo=0, hi=1 << 24),
        "host_used": F("int", required=False, lo=0, hi=U63),  # bytes of the engine's host buffer in use
        "stream_messages": F("int", required=False, lo=0, hi=U63),  # DE: ``tokens`` messages sent so far
        "work": F("int", required=False, lo=0, hi=U63),  # PE: predicted work (us) of what it holds (engine/work.py)
    },
    "peers": {"peers": F("strs", max_len=1024)},  # "name=address" entries
    "begin": {  # both engines: create the turn, run this side's read; reply read_done
        "rid": _RID,
        "session": F("int", lo=0, hi=U63),
        "prompt": F("bin", max_len=MAX_BIN, multiple=8),
        "gen": F("int", lo=1, hi=1 << 20),
        "path": F("str", choices=("pe", "de", "split", "recompute")),
        "pe": _ENGINE,
        "de": _ENGINE,
        "pe_blocks": F("int", lo=0, hi=MAX_TOKENS),
        "stored_blocks": F("int", lo=0, hi=MAX_TOKENS),
        "deadline_s": F("float", lo=0.001, hi=86400.0),
    },
    "lookup": {"prompt": F("bin", max_len=MAX_BIN, multiple=8)},  # any engine: stored prefix of the prompt
    "looked_up": {"blocks": F("int", lo=0, hi=MAX_TOKENS)},
    "read_done": {"rid": _RID, "ok_blocks": F("int", lo=0, hi=MAX_TOKENS)},
    "prefill": {"rid": _RID, "hit_blocks": F("int", lo=0, hi=MAX_TOKENS)},  # PE: reply prefilled
    "prefilled": {"rid": _RID, "logits": F("bin", max_len=1 << 26, multiple=4), "t_prefill_s": _TIME},
    "decode": {"rid": _RID, "hit_blocks": F("int", lo=0, hi=MAX_TOKENS)},  # DE: reply finished
    "started": {"rid": _RID},  # PE -> scheduler -> DE notice: the PE began the turn's forward
    "stored": {"rid": _RID},  # DE -> scheduler notice (begin's ``notify_stored``): the prompt's blocks are stored
    "logits": {"rid": _RID, "logits": F("bin", max_len=1 << 26, multiple=4)},  # scheduler -> DE notice
    "finished": {
        "rid": _RID,
        "tokens": F("ints", max_len=1 << 20, lo=0, hi=(1 << 31) - 1),
        "hit_tokens": F("int", lo=0, hi=MAX_TOKENS),
        "link_bytes": F("map", max_len=MAX_MAP),
        "after_last_s": F("float", required=False, lo=0.0, hi=1e9),  # last token -> this reply (the turn's writes)
    },
    "tokens": {  # DE -> scheduler notice: one decode step's tokens (or more) of its streamed turns
        "rids": F("ints", max_len=1 << 12, lo=0, hi=U63),
        "offsets": F("ints", max_len=1 << 12, lo=0, hi=1 << 20),  # index of each turn's first token here
        "counts": F("ints", max_len=1 << 12, lo=1, hi=1 << 16),  # tokens of each turn, in order, in ``tokens``
        "tokens": F("ints", max_len=1 << 16, lo=0, hi=(1 << 31) - 1),
        "lp_width": F("ints", required=False, max_len=1 << 12, lo=0, hi=MAX_LP_WIDTH),  # per turn; 0 = none
        "lp_ids": F("bin", required=False, max_len=MAX_LP_BIN, multiple=4),
        "lp_vals": F("bin", required=False, max_len=MAX_LP_BIN, multiple=4),
    },
    "abort": {"rid": _RID, "reason": _REASON},
    "reregister": {"epoch": F("int", required=False, lo=0, hi=U63)},  # scheduler -> engine notice: you were declared dead; drop your turns and say hello again  # notice: fail the turn locally, free its resources
}


#: how the decode engine picks tokens (optional on ``submit`` and ``begin``; absent = greedy, no early stop):
#: the fields of :class:`dualpath.engine.sampling.SamplingParams`, range-checked again by it
SAMPLING_FIELDS: dict[str, F] = {
    "temperature": F("float", required=False, lo=0.0, hi=100.0),
    "top_p": F("float", required=False, lo=0.0, hi=1.0),
    "top_k": F("int", required=False, lo=0, hi=(1 << 31) - 1),
    "min_p": F("float", required=False, lo=0.0, hi=1.0),
    "seed": F("int", required=False, lo=0, hi=U63),
    "stop_ids": F("ints", required=False, max_len=256, lo=0, hi=(1 << 31) - 1),
    "min_tokens": F("int", required=False, lo=0, hi=(1 << 31) - 1),  # no stop id before this many tokens
    "logprobs": F("int", required=False, lo=0, hi=MAX_LP_WIDTH - 1),  # record logprobs, with this many top ones
    "prompt_logprobs": F("int", required=False, lo=0, hi=MAX_LP_WIDTH - 1),  # the prompt's too (PE; recomputed)
    "grammar": F("bin", required=False, max_len=1 << 20),  # UTF-8 llguidance grammar (constrained decoding)
    "presence_penalty": F("float", required=False, lo=-2.0, hi=2.0),
    "frequency_penalty": F("float", required=False, lo=-2.0, hi=2.0),
    "repetition_penalty": F("float", required=False, lo=1e-6, hi=10.0),
    "bias_ids": F("ints", required=False, max_len=MAX_BIAS, lo=0, hi=(1 << 31) - 1),  # logit_bias: token ids
    "bias_vals": F("bin", required=False, max_len=MAX_BIAS * 4, multiple=4),  # ... and float32 biases
    "allowed_ids": F("ints", required=False, max_len=MAX_ALLOWED, lo=0, hi=(1 << 31) - 1),  # only these tokens
    "bad_ids": F("ints", required=False, max_len=MAX_BAD_IDS, lo=0, hi=(1 << 31) - 1),  # bad words' tokens, joined
    "bad_lens": F("ints", required=False, max_len=MAX_BIAS, lo=1, hi=MAX_BAD_IDS),  # ... and each word's length
}
SCHEMAS["submit"].update(SAMPLING_FIELDS)
SCHEMAS["submit"]["stream"] = F("int", required=False, lo=0, hi=U63)  # > 0: send ``stream`` notices with this id
# a cache salt (kv/keys.py): the turn's blocks are keyed apart; it travels to both engines' lookup and begin
for _t in ("submit", "lookup", "begin"):
    SCHEMAS[_t]["salt"] = F("str", required=False, max_len=1024)
# with ``stream``: a ``stream`` notice with ``stored: true`` (and no tokens) tells once the prompt's blocks are stored
SCHEMAS["submit"]["notify_stored"] = F("bool", required=False)
SCHEMAS["stream"]["stored"] = F("bool", required=False)
SCHEMAS["begin"].update(SAMPLING_FIELDS)
SCHEMAS["begin"]["stream"] = F("bool", required=False)  # the DE sends ``tokens`` notices for this turn
SCHEMAS["begin"]["notify_stored"] = F("bool", required=False)  # the DE sends ``stored`` once the prompt is stored
SCHEMAS["prefilled"].update(PROMPT_LP_FIELDS)
SCHEMAS["result"].update(PROMPT_LP_FIELDS)


def sampling_body(params: Any) -> dict[str, Any]:
    """The wire fields of a :class:`~dualpath.engine.sampling.SamplingParams` (``None``: none, greedy)."""
    if params is None:
        return {}
    out: dict[str, Any] = {"temperature": float(params.temperature), "top_p": float(params.top_p),
                           "top_k": int(params.top_k), "stop_ids": [int(t) for t in params.stop_ids]}
    if params.min_p:
        out["min_p"] = float(params.min_p)
    if params.seed is not None:
        out["seed"] = int(params.seed)
    if params.min_tokens:
        out["min_tokens"] = int(params.min_tokens)
    if params.logprobs is not None:
        out["logprobs"] = int(params.logprobs)
    if params.prompt_logprobs is not None:
        out["prompt_logprobs"] = int(params.prompt_logprobs)
    if params.grammar is not None:
        out["grammar"] = params.grammar.encode()
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(params, name):
            out[name] = float(getattr(params, name))
    if params.repetition_penalty != 1.0:
        out["repetition_penalty"] = float(params.repetition_penalty)
    if params.logit_bias:
        out["bias_ids"] = [int(t) for t, _ in params.logit_bias]
        out["bias_vals"] = np.asarray([b for _, b in params.logit_bias], dtype="<f4").tobytes()
    if params.allowed_ids:
        out["allowed_ids"] = [int(t) for t in params.allowed_ids]
    if params.bad_words:
        out["bad_ids"] = [int(t) for w in params.bad_words for t in w]
        out["bad_lens"] = [len(w) for w in params.bad_words]
    return out


def sampling_of(body: Mapping[str, Any], where: str) -> Any:
    """The :class:`~dualpath.engine.sampling.SamplingParams` a message asks for, ``None`` when it names none;
    a bad combination raises :class:`ProtocolError` naming the field."""
    if not any(k in body for k in SAMPLING_FIELDS):
        return None
    from dualpath.engine.sampling_params import SamplingParams
    from dualpath.errors import ModelError

    try:
        return SamplingParams(temperature=float(body.get("temperature", 0.0)), top_p=float(body.get("top_p", 1.0)),
                              top_k=int(body.get("top_k", 0)), min_p=float(body.get("min_p", 0.0)),
                              seed=body.get("seed"),
                              stop_ids=tuple(int(t) for t in body.get("stop_ids", ())),
                              min_tokens=int(body.get("min_tokens", 0)),
                              logprobs=None if body.get("logprobs") is None else int(body["logprobs"]),
                              prompt_logprobs=None if body.get("prompt_logprobs") is None
                              else int(body["prompt_logprobs"]),
                              grammar=_utf8(body["grammar"], f"{where}: grammar") if "grammar" in body else None,
                              presence_penalty=float(body.get("presence_penalty", 0.0)),
                              frequency_penalty=float(body.get("frequency_penalty", 0.0)),
                              repetition_penalty=float(body.get("repetition_penalty", 1.0)),
                              logit_bias=_bias(body, where),
                              allowed_ids=tuple(int(t) for t in body.get("allowed_ids", ())),
                              bad_words=_bad_words(body, where))
    except ModelError as exc:
        raise ProtocolError(f"{where}: {exc}") from None


def _bias(body: Mapping[str, Any], where: str) -> tuple[tuple[int, float], ...]:
    ids, vals = body.get("bias_ids", []), body.get("bias_vals", b"")
    if len(vals) != 4 * len(ids):
        raise ProtocolError(f"{where}: bias_vals must hold one float32 per entry of bias_ids")
    return tuple(zip((int(t) for t in ids), (float(v) for v in np.frombuffer(vals, dtype="<f4")), strict=True))


def _bad_words(body: Mapping[str, Any], where: str) -> tuple[tuple[int, ...], ...]:
    ids, lens = body.get("bad_ids", []), body.get("bad_lens", [])
    if sum(lens) != len(ids):
        raise ProtocolError(f"{where}: bad_lens must add up to the length of bad_ids")
    out, at = [], 0
    for n in lens:
        out.append(tuple(int(t) for t in ids[at:at + n]))
        at += n
    return tuple(out)


def _utf8(data: bytes, where: str) -> str:
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{where}: not UTF-8") from None


def _check(name: str, spec: F, value: Any) -> None:
    kind = spec.kind
    where = f"field {name!r}"
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{where}: expected int, got {type(value).__name__}")
        _range(where, spec, value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{where}: expected float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ProtocolError(f"{where}: must be finite")
        _range(where, spec, value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected bool, got {type(value).__name__}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected str, got {type(value).__name__}")
        _length(where, spec, len(value))
        if spec.choices is not None and value not in spec.choices:
            raise ProtocolError(f"{where}: {value[:40]!r} is not one of {list(spec.choices)}")
        if spec.pattern is not None and not spec.pattern.match(value):
            raise ProtocolError(f"{where}: {value[:40]!r} has characters outside {spec.pattern.pattern}")
    elif kind == "bin":
        if not isinstance(value, (bytes, bytearray)):
            raise ProtocolError(f"{where}: expected bin, got {type(value).__name__}")
        _length(where, spec, len(value))
        if len(value) % spec.multiple:
            raise ProtocolError(f"{where}: length {len(value)} is not a multiple of {spec.multiple}")
    elif kind == "ints":
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected a list of int, got {type(value).__name__}")
        _length(where, spec, len(value))
        for i, v in enumerate(value):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ProtocolError(f"{where}[{i}]: expected int, got {type(v).__name__}")
            _range(f"{where}[{i}]", spec, v)
    elif kind == "strs":
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected a list of str, got {type(value).__name__}")
        _length(where, spec, len(value))
        for i, v in enumerate(value):
            if not isinstance(v, str) or len(v) > 2048:
                raise ProtocolError(f"{where}[{i}]: expected a str of at most 2048 characters")
    elif kind == "map":
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        _length(where, spec, len(value))
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > 256:
                raise ProtocolError(f"{where}: keys must be str of at most 256 characters")
            if isinstance(v, bool) or not isinstance(v, (int, float, str)) or (isinstance(v, str) and len(v) > 4096):
                raise ProtocolError(f"{where}[{k[:40]!r}]: values must be numbers or short strings")
    else:  # pragma: no cover - schema bug
        raise ProtocolError(f"{where}: unknown field kind {kind}")


def _range(where: str, spec: F, value: float) -> None:
    if spec.lo is not None and value < spec.lo:
        raise ProtocolError(f"{where}: {value} is below {spec.lo}")
    if spec.hi is not None and value > spec.hi:
        raise ProtocolError(f"{where}: {value} is above {spec.hi}")


def _length(where: str, spec: F, n: int) -> None:
    if spec.max_len is not None and n > spec.max_len:
        raise ProtocolError(f"{where}: length {n} exceeds {spec.max_len}")


def validate(mtype: str, body: Mapping[str, Any]) -> None:
    """Check ``body`` against the schema of ``mtype``; raise :class:`ProtocolError` naming the field."""
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise ProtocolError(f"unknown message type {mtype[:40]!r}")
    if not isinstance(body, Mapping):
        raise ProtocolError(f"{mtype}: body must be a map")
    for name in body:
        if name not in schema:
            raise ProtocolError(f"{mtype}: unknown field {str(name)[:40]!r}")
    for name, spec in schema.items():
        if name not in body:
            if spec.required:
                raise ProtocolError(f"{mtype}: missing field {name!r}")
            continue
        try:
            _check(name, spec, body[name])
        except ProtocolError as exc:
            raise ProtocolError(f"{mtype}: {exc}") from None


@dataclass(frozen=True)
class Message:
    """A decoded, validated control message."""

    type: str
    body: dict[str, Any]
    id: int = 0
    re: int = 0
    inc: int = 0  # the sending server's incarnation
    to: int = 0  # the server incarnation the sender addressed (0: none heard of yet)


def encode(mtype: str, body: Mapping[str, Any] | None = None, *, mid: int = 0, re_: int = 0,
           max_bytes: int = MAX_FRAME_BYTES, inc: int = 0, to: int = 0) -> bytes:
    """Validate and pack one message (a sender bug is caught here, before the peer sees it)."""
    body = dict(body or {})
    validate(mtype, body)
    env: dict[str, Any] = {"v": VERSION, "t": mtype, "id": int(mid), "re": int(re_), "b": body}
    if inc:
        env["inc"] = int(inc)
    if to:
        env["to"] = int(to)
    data = msgpack.packb(env, use_bin_type=True)
    if len(data) > max_bytes:
        raise ProtocolError(f"{mtype}: message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    return data


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def decode(frame: bytes | memoryview, *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Size check, bounded msgpack unpack, envelope and schema check (see the module docstring)."""
    n = len(frame)
    if n > max_bytes:
        raise ProtocolError(f"message of {n} bytes exceeds the {max_bytes}-byte limit")
    if n == 0:
        raise ProtocolError("empty message")
    try:
        obj = msgpack.unpackb(
            bytes(frame), raw=False, strict_map_key=True, ext_hook=_no_ext, use_list=True,
            max_str_len=max(MAX_STR, 2048), max_bin_len=max_bytes, max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP, max_ext_len=0,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, FormatError, ...)
        raise ProtocolError(f"not a valid msgpack message: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"envelope must be a map, got {type(obj).__name__}")
    extra = set(obj) - {"v", "t", "id", "re", "b", "inc", "to"}
    if extra:
        raise ProtocolError(f"envelope: unknown keys {sorted(str(k)[:20] for k in extra)}")
    v = obj.get("v")
    if v != VERSION:
        raise ProtocolError(f"envelope: protocol version {v!r} is not supported (this side speaks {VERSION})")
    mtype = obj.get("t")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"envelope: unknown message type {str(mtype)[:40]!r}")
    mid, re_, inc, to = obj.get("id", 0), obj.get("re", 0), obj.get("inc", 0), obj.get("to", 0)
    for name, val in (("id", mid), ("re", re_), ("inc", inc), ("to", to)):
        if not isinstance(val, int) or isinstance(val, bool) or not 0 <= val <= U63:
            raise ProtocolError(f"envelope: {name!r} must be an int in [0, 2^63)")
    body = obj.get("b", {})
    validate(mtype, body)
    return Message(mtype, body, mid, re_, inc, to)


# --- payload helpers ------------------------------------------------------------------------------------------
def tokens_to_bin(tokens: Any) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ProtocolError("token ids must be one-dimensional")
    if arr.size > MAX_TOKENS:
        raise ProtocolError(f"a prompt of {arr.size} tokens exceeds the {MAX_TOKENS}-token limit")
    return arr.astype("<i8", copy=False).tobytes()


def bin_to_tokens(data: bytes, *, field: str = "prompt") -> np.ndarray:
    arr = np.frombuffer(data, dtype="<i8")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << 31):
        raise ProtocolError(f"field {field!r}: token ids must lie in [0, 2^31)")
    return arr.astype(np.int64)


def logprobs_to_bin(lps: Sequence[Any]) -> tuple[int, bytes, bytes]:
    """``(lp_width, lp_ids, lp_vals)`` of a turn's :class:`~dualpath.engine.sampling.TokenLogprob` list (all of
    one turn, so of one width: 1 + the number of most likely tokens each carries)."""
    width = 1 + len(lps[0].top) if lps else 1
    ids = np.empty((len(lps), width), dtype="<i4")
    vals = np.empty((len(lps), width), dtype="<f4")
    for i, lp in enumerate(lps):
        if 1 + len(lp.top) != width:
            raise ProtocolError(f"logprobs: token {i} carries {len(lp.top)} most likely tokens, not {width - 1}")
        ids[i, 0], vals[i, 0] = lp.token, lp.logprob
        for j, (tid, val) in enumerate(lp.top, start=1):
            ids[i, j], vals[i, j] = tid, val
    return width, ids.tobytes(), vals.tobytes()


def ranks_to_bin(lps: Sequence[Any]) -> bytes | None:
    """``plp_ranks``: each :class:`~dualpath.types.TokenLogprob`'s rank as int32 (None when one has none)."""
    if not lps or any(lp.rank is None for lp in lps):
        return None
    return np.asarray([lp.rank for lp in lps], dtype="<i4").tobytes()


def with_ranks(lps: list[Any], ranks: bytes, *, where: str) -> list[Any]:
    """``lps`` with the ranks of ``plp_ranks`` (one int32 >= 1 per entry, else :class:`ProtocolError`)."""
    import dataclasses

    r = np.frombuffer(ranks, dtype="<i4")
    if r.size != len(lps) or (r.size and int(r.min()) < 1):
        raise ProtocolError(f"{where}: plp_ranks must hold one rank >= 1 for each of {len(lps)} tokens")
    return [dataclasses.replace(lp, rank=int(k)) for lp, k in zip(lps, r.tolist(), strict=True)]


def bin_to_logprobs(width: int, ids: bytes, vals: bytes, tokens: Sequence[int], *, where: str) -> list[Any]:
    """The :class:`~dualpath.engine.sampling.TokenLogprob` of each of ``tokens`` from their wire form; a length,
    id or value that does not fit (a NaN or positive log-probability, an entry not for its token) raises
    :class:`ProtocolError` naming ``where``."""
    from dualpath.types import TokenLogprob

    n = len(tokens)
    if len(ids) != n * width * 4 or len(vals) != n * width * 4:
        raise ProtocolError(f"{where}: lp_ids and lp_vals must hold {width} entries for each of {n} tokens")
    a = np.frombuffer(ids, dtype="<i4").reshape(n, width)
    v = np.frombuffer(vals, dtype="<f4").reshape(n, width)
    if n and (int(a.min()) < 0 or bool(np.isnan(v).any()) or float(v.max()) > 0.0):
        raise ProtocolError(f"{where}: a logprob entry has a negative id or a NaN or positive value")
    if n and not np.array_equal(a[:, 0], np.asarray(tokens, dtype=np.int64)):
        raise ProtocolError(f"{where}: the first logprob entry of each token must be that token")
    return [TokenLogprob(int(a[i, 0]), float(v[i, 0]),
                         tuple((int(a[i, j]), float(v[i, j])) for j in range(1, width))) for i in range(n)]
