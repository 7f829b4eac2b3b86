"""Agentic coding traces in the kv-cache-tester ("Weka") format: captured Claude Code sessions with content keys.

The format (Weka's kv-cache-tester, and SemiAnalysis's ``cc-traces-weka`` datasets on the Hugging Face hub, which
NVIDIA AIPerf replays) holds one conversation per JSON object::

    {"id": "...", "block_size": 64, "hash_id_scope": "local", "tool_tokens": ..., "system_tokens": ...,
     "requests": [{"t": 0.0, "type": "n", "in": 21000, "out": 310, "hash_ids": [...], "think_time": ...,
                   "api_time": ..., ...},
                  {"t": 41.2, "type": "subagent", "agent_id": "...", "requests": [{"t": ..., "type": "s", ...}]},
                  ...]}

A file may be one such object (pretty-printed), a JSON array of them, or one per line (JSONL; a Parquet table of
them arrives that way). Every API call (``type`` ``n`` or ``s``) is one request whose ``in`` tokens are its whole
prompt and whose ``hash_ids`` are the content keys of that prompt's ``block_size``-token blocks, as in Mooncake.
So a conversation's requests are grouped into sessions exactly as a Mooncake trace's are
(:func:`dualpath.workload.loaders.group_by_hash_prefix`): a request continues the session whose last prompt's full
blocks start its own and whose context (input + output) it extends; side calls (a title, a summary, a compacted
history) become sessions of their own. A subagent's calls are grouped the same way (they are the trace's own
requests, at their own times; a call time before the subagent's spawn time is read as relative to it).

``hash_id_scope: local`` (the published traces) means a hash id names content within its conversation only, so
each conversation's ids are mapped one-to-one into a space of its own (keyed by its ``id``, which a dataset's
files do not repeat); ``global`` ids are shared across conversations.
Times ``t`` are seconds; online replay sends each call not before its time (counted from the earliest call of
the file). Errors name the file, the line and the conversation's request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from dualpath.errors import WorkloadError
from dualpath.workload.compressed import parse_json, read_trace_text
from dualpath.workload.trajectory import Trajectory, is_id_list

_MIX = 0x9E3779B97F4A7C15  # odd: h -> h * _MIX mod 2**64 is one-to-one
_M64 = (1 << 64) - 1
_SNIFF_REQUESTS = re.compile(rb'"requests"\s*:\s*\[')
_SNIFF_BLOCK = re.compile(rb'"block_size"\s*:\s*\d')
_EPS = 1e-6


def looks_like_weka(head: bytes) -> bool:
    """Whether a file starting with ``head`` holds kv-cache-tester conversations."""
    return _SNIFF_REQUESTS.search(head) is not None and _SNIFF_BLOCK.search(head) is not None


def _documents(p: str) -> list[tuple[int, Any]]:
    """``(line, object)`` of every conversation: one per line (JSONL), or a whole-file object or array (line 1)."""
    text = read_trace_text(p)
    lines = text.splitlines()
    first = next((k for k, raw in enumerate(lines) if raw.strip()), None)
    if first is None:
        raise WorkloadError("empty trace: no request in the file", path=p, line=1)
    try:
        head = json.loads(lines[first])
    except (json.JSONDecodeError, RecursionError):
        head = None
    if isinstance(head, dict):  # JSON lines: a conversation per line
        return [(no, parse_json(raw, p, no)) for no, raw in enumerate(lines, start=1) if raw.strip()]
    doc = parse_json(text, p)
    return [(first + 1, d) for d in (doc if isinstance(doc, list) else [doc])]


def _num(obj: dict[str, Any], key: str, where: str, p: str, no: int, minimum: float | None = None) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or (minimum is not None and v < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise WorkloadError(f"{where}: field {key!r} must be a number{bound}, got {v!r}" if key in obj
                            else f"{where}: missing field {key!r}", path=p, line=no)
    return float(v)


def _count(obj: dict[str, Any], keys: tuple[str, str], where: str, p: str, no: int, minimum: int) -> int:
    key = keys[0] if keys[0] in obj else keys[1]
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise WorkloadError(f"{where}: field {key!r} must be an integer >= {minimum}, got {v!r}" if key in obj
                            else f"{where}: missing field {keys[0]!r}", path=p, line=no)
    return v


def _scope(key: str | None) -> int:
    """The 64-bit mask of a conversation's local hash ids (None: global ids, unchanged)."""
    if key is None:
        return 0
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _call(req: Any, where: str, p: str, no: int, scope: int,
          t_base: float | None) -> tuple[float, int, int, list[int]]:
    """(time, input, output, hash ids in the conversation's scope) of one API call."""
    if not isinstance(req, dict):
        raise WorkloadError(f"{where}: expected an object", path=p, line=no)
    t = _num(req, "t", where, p, no)
    if t_base is not None and t + _EPS < t_base:  # a subagent call timed relative to its spawn
        t += t_base
    inp = _count(req, ("in", "input_length"), where, p, no, 1)
    out = _count(req, ("out", "output_length"), where, p, no, 0)
    hids = req.get("hash_ids", [])
    if not is_id_list(hids):
        raise WorkloadError(f"{where}: field 'hash_ids' must be a list of integers", path=p, line=no)
    if scope:  # one-to-one within a conversation; two conversations' ids meet with probability 2**-64
        hids = [((h * _MIX) & _M64) ^ scope for h in hids]
    return t, inp, out, hids


def load_weka(path: str | os.PathLike[str]) -> list[Trajectory]:
    """Sessions of every conversation in a kv-cache-tester trace file (see the module docstring)."""
    from dualpath.workload.loaders import MooncakeRow, group_by_hash_prefix

    p = str(path)
    convs: list[tuple[int, int, list[tuple[float, int, int, list[int], str]]]] = []  # (line, block, calls)
    for k, (no, doc) in enumerate(_documents(p)):
        where = f"conversation #{k}"
        if not isinstance(doc, dict):
            raise WorkloadError(f"{where}: expected a JSON object with 'requests'", path=p, line=no)
        if doc.get("id") is not None:
            where = f"conversation {doc['id']!r}"
        block = doc.get("block_size")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise WorkloadError(f"{where}: field 'block_size' must be an integer >= 1, got {block!r}", path=p,
                                line=no)
        scope = doc.get("hash_id_scope", "local")
        if scope not in ("local", "global"):
            raise WorkloadError(f"{where}: field 'hash_id_scope' must be 'local' or 'global', got {scope!r}",
                                path=p, line=no)
        scope_mask = _scope(f"id:{doc['id']}" if doc.get("id") is not None else f"{p}#{k}") \
            if scope == "local" else 0
        reqs = doc.get("requests")
        if not isinstance(reqs, list):
            raise WorkloadError(f"{where}: missing field 'requests' (a list)", path=p, line=no)
        calls: list[tuple[float, int, int, list[int], str]] = []
        for j, req in enumerate(reqs):
            at = f"{where}, request #{j}"
            kind = req.get("type", "n") if isinstance(req, dict) else None
            if kind == "subagent":
                spawn = _num(req, "t", at, p, no)
                inner = req.get("requests")
                if not isinstance(inner, list):
                    raise WorkloadError(f"{at}: a subagent needs 'requests' (a list)", path=p, line=no)
                for i, r in enumerate(inner):
                    calls.append((*_call(r, f"{at}, call #{i}", p, no, scope_mask, spawn), f"{at}, call #{i}"))
            elif kind in ("n", "s"):
                calls.append((*_call(req, at, p, no, scope_mask, None), at))
            else:
                raise WorkloadError(f"{at}: field 'type' must be 'n', 's' or 'subagent', got {kind!r}", path=p,
                                    line=no)
        convs.append((no, block, calls))
    t0 = min((c[0] for _, _, calls in convs for c in calls), default=0.0)
    out: list[Trajectory] = []
    for no, block, calls in convs:
        order = sorted(range(len(calls)), key=lambda i: (calls[i][0], i))
        rows = [MooncakeRow(calls[i][0] - t0, calls[i][1], calls[i][2], calls[i][3], no) for i in order]
        group_by_hash_prefix(rows, block, out=out)
    if not out:
        raise WorkloadError("empty trace: no request in the file", path=p, line=1)
    return out
