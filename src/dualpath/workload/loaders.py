"""Trace files: our JSONL trajectories, the Mooncake (FAST'25) request trace and the Qwen-Bailian traces
(ATC'25, "KVCache Cache in the Wild": explicit sessions through ``chat_id``/``parent_chat_id``).

Our format, one trajectory per line::

    {"id": 3, "arrival": 0.5, "turns": [{"append": 812, "gen": 40, "ids": [1, 2, ...]}, ...]}

``arrival`` (s, default 0), ``ids`` (the appended token ids, exactly ``append`` of them), ``at`` (the turn's
time in the trace, seconds; online replay does not send the turn earlier) and ``think`` (seconds after the
previous turn ended before online replay sends this one) are optional.
Blank lines, CRLF line ends and a leading UTF-8 byte-order mark are fine. Any malformed line raises :class:`WorkloadError` naming the file and the line.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from dualpath.errors import WorkloadError
from dualpath.workload.compressed import open_trace
from dualpath.workload.trajectory import Trajectory, Turn, interned, is_id_list


def _int_field(obj: dict[str, Any], key: str, where: str, path: str, line: int, minimum: int = 0) -> int:
    if key not in obj:
        raise WorkloadError(f"{where}missing field {key!r}", path=path, line=line)
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise WorkloadError(
            f"{where}field {key!r} must be an integer >= {minimum}, got {v!r}", path=path, line=line
        )
    return v


def _lines(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    """``(line number, object)`` of every non-blank line. Bytes that are not UTF-8, JSON nested too deeply to
    parse and a line that is not an object are errors naming the file and the line."""
    p = str(path)
    with open_trace(p) as f:
        for no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise WorkloadError(f"not UTF-8 text (byte {e.start} of the line)", path=p, line=no) from None
            if no == 1 and text.startswith("\ufeff"):  # a UTF-8 byte-order mark (editors on Windows write one)
                text = text[1:]
            if text.strip():
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise WorkloadError(f"not valid JSON ({e.msg})", path=p, line=no) from None
                except RecursionError:
                    raise WorkloadError("JSON nested too deeply", path=p, line=no) from None
                if not isinstance(obj, dict):
                    raise WorkloadError("expected a JSON object", path=p, line=no)
                yield no, obj


def load_jsonl(path: str | os.PathLike[str]) -> list[Trajectory]:
    """Trajectories from our JSONL format (see the module docstring)."""
    p = str(path)
    out: list[Trajectory] = []
    seen: set[int] = set()
    for no, obj in _lines(p):
        if "turns" not in obj and "input_length" in obj and "hash_ids" in obj:
            raise WorkloadError("a Mooncake request (input_length, hash_ids), not a trajectory: use "
                                "--trace-format mooncake", path=p, line=no)
        turns0 = obj.get("turns")
        if "id" not in obj and isinstance(turns0, list) and turns0 and isinstance(turns0[0], dict) \
                and "append" not in turns0[0] and any(k in turns0[0] for k in ("text", "texts")):
            raise WorkloadError("an AIPerf multi_turn conversation (turns of 'text'), not a trajectory: it gives "
                                "prompts, not a trace's output lengths; write it as Mooncake rows ('session_id', "
                                "'text_input', 'output_length', 'delay') or as our JSONL ('id', 'turns' of "
                                "'append'/'gen')", path=p, line=no)
        tid = _int_field(obj, "id", "", p, no)
        if tid in seen:
            raise WorkloadError(f"duplicate trajectory id {tid}", path=p, line=no)
        seen.add(tid)
        turns_raw = obj.get("turns")
        if not isinstance(turns_raw, list):
            raise WorkloadError("missing field 'turns' (a list)", path=p, line=no)
        arrival = obj.get("arrival", 0.0)
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or arrival < 0:
            raise WorkloadError(f"field 'arrival' must be a number >= 0, got {arrival!r}", path=p, line=no)
        turns: list[Turn] = []
        for k, t in enumerate(turns_raw):
            where = f"turns[{k}]: "
            if not isinstance(t, dict):
                raise WorkloadError(f"{where}expected an object", path=p, line=no)
            append = _int_field(t, "append", where, p, no)
            gen = _int_field(t, "gen", where, p, no)
            ids = t.get("ids")
            if ids is not None:
                if not isinstance(ids, list) or not all(isinstance(x, int) and x >= 0 for x in ids):
                    raise WorkloadError(f"{where}field 'ids' must be a list of token ids", path=p, line=no)
                if len(ids) != append:
                    raise WorkloadError(f"{where}'ids' has {len(ids)} tokens, 'append' says {append}", path=p,
                                        line=no)  # fmt: skip
            at = t.get("at")
            if at is not None and (isinstance(at, bool) or not isinstance(at, (int, float)) or not at >= 0):
                raise WorkloadError(f"{where}field 'at' must be a number of seconds >= 0, got {at!r}", path=p,
                                    line=no)  # fmt: skip
            think = t.get("think")
            if think is not None and (isinstance(think, bool) or not isinstance(think, (int, float))
                                      or not think >= 0):
                raise WorkloadError(f"{where}field 'think' must be a number of seconds >= 0, got {think!r}",
                                    path=p, line=no)
            turns.append(Turn(append, gen, ids, None if at is None else float(at), line=no,
                              think=None if think is None else float(think)))
        out.append(Trajectory(tid, turns, float(arrival)))

    return out


def write_jsonl(trajs: list[Trajectory], path: str | os.PathLike[str]) -> None:
    """Write ``trajs`` in our JSONL format (atomically: a temporary file, then a rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for t in trajs:
            turns: list[dict[str, Any]] = []
            for u in t.turns:
                d: dict[str, Any] = {"append": u.append, "gen": u.gen}
                if u.append_ids is not None:
                    d["ids"] = u.append_ids
                if u.at is not None:
                    d["at"] = u.at
                if u.think is not None:
                    d["think"] = u.think
                turns.append(d)
            f.write(json.dumps({"id": t.tid, "arrival": t.arrival, "turns": turns}) + "\n")
    os.replace(tmp, p)


@dataclass
class _Tail:
    traj: Trajectory
    input_len: int
    output_len: int
    key: tuple[int, ...]


@dataclass(frozen=True)
class MooncakeRow:
    """One request of a Mooncake trace: its time (s from the trace's first request; None when the file has no
    timestamps), its input and output lengths, its blocks' hash ids and its line in the file."""

    t: float | None
    input_len: int
    output_len: int
    hash_ids: list[int]
    line: int


#: block sizes (tokens per hash id) a content-hashed trace may use; the file's is inferred from its rows
HASH_BLOCKS = (16, 32, 64, 128, 256, 512, 1024)


class HashBlockVotes:
    """:func:`infer_hash_block` row by row: for each candidate of :data:`HASH_BLOCKS`, how many rows have
    ``len(hash_ids) == ceil(input_length / block)`` (so a file streamed once, and cut to a prefix, infers what the
    whole file says)."""

    def __init__(self) -> None:
        self.n = dict.fromkeys(HASH_BLOCKS, 0)

    def add(self, inp: int, k: int) -> None:
        for b in HASH_BLOCKS:
            if k == -(-inp // b):
                self.n[b] += 1

    def best(self, default: int = 512) -> int:
        """The candidate most rows fit (ties: the larger block); ``default`` when no row is conclusive."""
        best, best_n = default, 0
        for b in HASH_BLOCKS:
            if self.n[b] > best_n or (self.n[b] == best_n and best_n > 0 and b > best):
                best, best_n = b, self.n[b]
        return best


def infer_hash_block(rows: Iterable[tuple[int, int]], default: int = 512) -> int:
    """Tokens per hash id of a trace, from ``(input_length, len(hash_ids))`` pairs: the candidate of
    :data:`HASH_BLOCKS` for which most rows have ``len(hash_ids) == ceil(input_length / block)`` (ties: the
    larger block); ``default`` when no row is conclusive. Mooncake's public traces use 512, Qwen-Bailian's 16."""
    votes = HashBlockVotes()
    for inp, k in rows:
        votes.add(inp, k)
    return votes.best(default)


_Row = TypeVar("_Row", bound=tuple[Any, ...])


def earliest(rows: Iterable[_Row], n: int | None, keep: Any = None) -> tuple[list[_Row], int]:
    """Rows ``(time, line, ...)`` in time order (ties: line order), all of them or the ``n`` earliest (kept as they
    stream by: memory for ``n`` rows, whatever the file's length), and how many rows there were. ``keep``: applied
    to a row when it is kept (a trace's hash ids interned then, not for rows passed over)."""
    def kept_(r: _Row) -> _Row:
        return r if keep is None else cast(_Row, keep(r))

    if n is None:
        out = [kept_(r) for r in rows]
        out.sort(key=lambda r: (r[0], r[1]))
        return out, len(out)
    heap: list[tuple[tuple[float, int], _Row]] = []  # (the negated (time, line): the latest kept row on top)
    total = 0
    for r in rows:
        total += 1
        key = (-r[0], -r[1])
        if len(heap) < n:
            heapq.heappush(heap, (key, kept_(r)))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, kept_(r)))
    kept = [r for _, r in heap]
    kept.sort(key=lambda r: (r[0], r[1]))
    return kept, total


class _AIPerfRow(Exception):
    """A row of AIPerf's Mooncake shape met while streaming FAST'25 rows: the file is read again as such."""


def read_mooncake(path: str | os.PathLike[str], max_requests: int | None = None,
                  objs: Iterable[tuple[int, dict[str, Any]]] | None = None) -> list[MooncakeRow]:
    """The requests of a Mooncake trace in time order (ties: file order); the first ``max_requests`` if set.
    Timestamps may be left out of every row (file order then), not out of some. ``objs``: the file's
    ``(line, object)`` rows when already read."""
    return read_mooncake_counted(path, max_requests, objs)[0]


def read_mooncake_counted(path: str | os.PathLike[str], max_requests: int | None = None,
                          objs: Iterable[tuple[int, dict[str, Any]]] | None = None,
                          votes: HashBlockVotes | None = None,
                          stop_at_aiperf: bool = False,
                          origin: list[float] | None = None) -> tuple[list[MooncakeRow], int, bool]:
    """:func:`read_mooncake`, with how many rows the file has and whether it has timestamps; the first
    ``max_requests`` are kept as the rows stream by (memory for that many rows: a trace of millions of rows cut
    to a prefix is never held whole). ``votes`` counts every row's hash-id block fit; ``stop_at_aiperf`` raises
    :class:`_AIPerfRow` at a row of AIPerf's shape; ``origin`` (a list) gets the time, in seconds of the trace's
    clock, that the rows' times count from (their first), when they have times."""
    p = str(path)
    ids: dict[int, int] = {}
    timed: list[bool | None] = [None]
    rows, total = earliest(_fast25_rows(p, _lines(p) if objs is None else objs, timed, votes, stop_at_aiperf),
                           max_requests, keep=lambda r: (*r[:4], interned(r[4], ids)))
    t0 = rows[0][0] if rows else 0.0
    if origin is not None and rows and timed[0]:
        origin.append(t0 / 1000.0)
    return ([MooncakeRow((ts - t0) / 1000.0 if timed[0] else None, inp, outp, hids, no)
             for ts, no, inp, outp, hids in rows], total, bool(timed[0]))


def _fast25_rows(p: str, objs: Iterable[tuple[int, dict[str, Any]]], timed: list[bool | None],
                 votes: HashBlockVotes | None,
                 stop_at_aiperf: bool = False) -> Iterator[tuple[float, int, int, int, list[int]]]:
    """The validated ``(timestamp, line, input, output, hash_ids)`` of each FAST'25 row (``timed[0]``: whether the
    first row had a timestamp); with ``stop_at_aiperf``, :class:`_AIPerfRow` at a row of AIPerf's shape."""
    from dualpath.workload.mooncake_sessions import is_extended

    for no, obj in objs:
        if stop_at_aiperf and is_extended(obj):
            raise _AIPerfRow
        ts = obj.get("timestamp")
        if timed[0] is None:
            timed[0] = ts is not None
        if ts is None and not timed[0]:
            ts = 0.0
        elif isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise WorkloadError(f"field 'timestamp' must be a finite number, got {ts!r}" if "timestamp" in obj
                                else "missing field 'timestamp' (the first row has one)", path=p,
                                line=no)  # fmt: skip
        elif not timed[0]:
            raise WorkloadError("field 'timestamp' on a row when the first row has none: give every row a "
                                "timestamp or none", path=p, line=no)
        inp = _int_field(obj, "input_length", "", p, no, minimum=1)
        outp = _int_field(obj, "output_length", "", p, no)
        hids = obj.get("hash_ids")
        if not is_id_list(hids):
            raise WorkloadError(
                "missing field 'hash_ids'"
                if "hash_ids" not in obj
                else "field 'hash_ids' must be a list of integers",
                path=p,
                line=no,
            )
        if votes is not None:
            votes.add(inp, len(hids))
        yield float(ts), no, inp, outp, hids


def _block_ids(hash_ids: list[int], start: int, stop: int, block_tokens: int, vocab: int) -> list[int]:
    from dualpath.workload.traces import hash_prompt_tokens

    return hash_prompt_tokens(hash_ids, stop, block_tokens, vocab)[start:stop].tolist()


def load_mooncake(
    path: str | os.PathLike[str],
    block_tokens: int | None = None,
    with_ids: bool = False,
    vocab_size: int = 32000,
    max_requests: int | None = None,
) -> list[Trajectory]:
    """Trajectories from a Mooncake-format trace: :func:`load_mooncake_trace` without its count of restarted
    sessions."""
    return load_mooncake_trace(path, block_tokens, with_ids, vocab_size, max_requests)[0]


def load_mooncake_trace(
    path: str | os.PathLike[str],
    block_tokens: int | None = None,
    with_ids: bool = False,
    vocab_size: int = 32000,
    max_requests: int | None = None,
) -> tuple[list[Trajectory], int]:
    """:func:`mooncake_trace` without the file's request count."""
    trajs, restarted, _ = mooncake_trace(path, block_tokens, with_ids, vocab_size, max_requests)
    return trajs, restarted


def mooncake_trace(
    path: str | os.PathLike[str],
    block_tokens: int | None = None,
    with_ids: bool = False,
    vocab_size: int = 32000,
    max_requests: int | None = None,
    origin: list[float] | None = None,
) -> tuple[list[Trajectory], int, int]:
    """Trajectories from a Mooncake-format trace, how many rows had to start a session of their own, and how many
    requests the file has. FAST'25 rows cut to ``max_requests`` are cut as they stream by: whatever the file's
    length, only that many rows are kept (the sessions of the first requests are grouped from those requests
    alone, as a request only continues an earlier one).

    Rows with sessions, text or messages inputs, think times, or without ``hash_ids`` (AIPerf's
    ``mooncake_trace`` rows) are read by :mod:`dualpath.workload.mooncake_sessions` (``with_ids`` does not
    apply; ``max_requests`` keeps the first requests in time order, else in file order). Otherwise the
    file is a Mooncake FAST'25 trace (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids`` of the input's ``block_tokens``-token blocks; equal hash ids mean equal content). A
    ``hash_ids`` list whose length is not ``ceil(input_length / block_tokens)`` is accepted as it is.

    Every request becomes one turn (``max_requests``: the first that many in time order). Each turn keeps the
    request's time (``Turn.at``, s from the trace's first request) and its ``hash_ids``: the request's content.
    Tokens derived from them (:func:`dualpath.workload.traces.hash_prompt_tokens`; a block's tokens are a pure
    function of its hash id) make storage see the trace's real prefix reuse, across sessions too.

    Grouping into sessions (the trace has no session ids; this is our heuristic, it decides only which turn
    waits for which): requests are read in time order. A request continues an earlier trajectory when its
    ``hash_ids`` start with all of that trajectory's last request's *full* input blocks (at least one) and its
    input is longer than that request's input plus output; the new turn's append is
    ``input - (previous input + previous output)``, so the turn's prompt length is the request's input length.
    Among candidates the longest matched prefix wins, then the most recent. Otherwise the request starts a new
    trajectory (``append = input_length``). Trajectory arrival = its first request's time.

    ``with_ids`` also fills each turn's ``append_ids`` (the derived tokens of its appended part).
    ``block_tokens`` None: inferred from the rows (:func:`infer_hash_block`; 512 in Mooncake's traces).
    ``origin`` (a list): gets the trace-clock time (s) the FAST'25 rows' times count from.
    """
    from dualpath.workload.mooncake_sessions import load_session_rows
    from dualpath.workload.traces import _count_requests, _prefix_requests

    votes = HashBlockVotes()
    try:
        rows, total, _ = read_mooncake_counted(path, max_requests, votes=votes, stop_at_aiperf=True, origin=origin)
    except _AIPerfRow:  # (read again from the start as AIPerf's rows, each object dropped once read)
        st = load_session_rows(_lines(str(path)), path)
        trajs, total = st.trajectories, _count_requests(st.trajectories)
        return (trajs if max_requests is None else _prefix_requests(trajs, max_requests)), st.restarted, total
    if block_tokens is None:
        block_tokens = votes.best()
    return group_by_hash_prefix(rows, block_tokens, with_ids, vocab_size), 0, total


def group_by_hash_prefix(rows: list[MooncakeRow], block_tokens: int, with_ids: bool = False,
                         vocab_size: int = 32000, out: list[Trajectory] | None = None) -> list[Trajectory]:
    """Requests in time order, each one whole prompt with its content's hash ids, grouped into sessions (see
    :func:`load_mooncake_trace`); new trajectories are appended to ``out`` (numbered after what it holds)."""
    tails: dict[tuple[int, ...], list[_Tail]] = {}
    lengths: set[int] = set()
    out = [] if out is None else out
    for row in rows:
        ts, inp, outp, hids = row.t, row.input_len, row.output_len, row.hash_ids
        match: _Tail | None = None
        for k in sorted(lengths, reverse=True):
            if k > len(hids):
                continue
            for cand in reversed(tails.get(tuple(hids[:k]), [])):
                if inp > cand.input_len + cand.output_len:
                    match = cand
                    break
            if match is not None:
                break
        if match is None:
            ids = _block_ids(hids, 0, inp, block_tokens, vocab_size) if with_ids else None
            traj = Trajectory(len(out), [Turn(inp, outp, ids, ts, hids or None, block_tokens, row.line)], ts or 0.0)
            out.append(traj)
        else:
            traj = match.traj
            start = match.input_len + match.output_len
            ids = _block_ids(hids, start, inp, block_tokens, vocab_size) if with_ids else None
            traj.turns.append(Turn(inp - start, outp, ids, ts, hids or None, block_tokens, row.line))
            bucket = tails[match.key]
            bucket.remove(match)
            if not bucket:
                del tails[match.key]
        key = tuple(hids[: inp // block_tokens])
        if key:
            tails.setdefault(key, []).append(_Tail(traj, inp, outp, key))
            lengths.add(len(key))
    return out


def load_bailian(path: str | os.PathLike[str], block_tokens: int | None = None) -> tuple[list[Trajectory], int]:
    """:func:`bailian_trace` without the file's request count."""
    trajs, orphans, _ = bailian_trace(path, block_tokens)
    return trajs, orphans


def bailian_trace(path: str | os.PathLike[str], block_tokens: int | None = None,
                  max_requests: int | None = None,
                  origin: list[float] | None = None) -> tuple[list[Trajectory], int, int]:
    """Trajectories from a Qwen-Bailian trace (``chat_id``, ``parent_chat_id`` (-1: a session's first request),
    ``timestamp`` in seconds, ``input_length``, ``output_length``, ``hash_ids`` of 16-token blocks; ``turn`` and
    ``type`` are ignored), and how many requests could not continue their parent's session.

    Sessions are the trace's own: a request continues its parent's trajectory (append = input - (parent input
    + parent output)) when the parent is that trajectory's latest turn and the input is longer than the
    parent's context. Otherwise (a parent missing from the file, a second child of one parent, or a context the
    service truncated) it starts a trajectory of its own at its time, and is counted. Hash ids are content, as
    for Mooncake; ``block_tokens`` None infers the block size from the rows (16 in the published traces). Also how
    many requests the file has: ``max_requests`` keeps the first requests in time order as the rows stream by
    (memory for that many; a parent always precedes its child, so their sessions are those of the whole file).
    Requests counted as starting a session of their own are those kept. ``origin`` (a list): gets the trace-clock
    time (s) the times count from (the first kept request's)."""
    p = str(path)
    votes = HashBlockVotes()
    ids: dict[int, int] = {}
    rows, total = earliest(_bailian_rows(p, votes), max_requests, keep=lambda r: (*r[:6], interned(r[6], ids)))
    if block_tokens is None:
        block_tokens = votes.best(default=16)
    t0 = rows[0][0] if rows else 0.0
    if origin is not None and rows:
        origin.append(t0)
    out: list[Trajectory] = []
    last: dict[int, tuple[Trajectory, int, int]] = {}  # chat_id -> (its trajectory, its input, its output)
    tail: dict[int, int] = {}  # trajectory id -> the chat_id of its latest turn
    orphans = 0
    for ts, no, chat, parent, inp, outp, hids in rows:
        t = ts - t0
        hit = last.get(parent) if parent >= 0 else None
        if hit is not None and tail.get(hit[0].tid) == parent and inp > hit[1] + hit[2]:
            traj = hit[0]
            traj.turns.append(Turn(inp - hit[1] - hit[2], outp, None, t, hids, block_tokens, no))
        else:
            if parent >= 0:
                orphans += 1
            traj = Trajectory(len(out), [Turn(inp, outp, None, t, hids, block_tokens, no)], t)
            out.append(traj)
        last[chat] = (traj, inp, outp)
        tail[traj.tid] = chat
    return out, orphans, total


def _bailian_rows(p: str, votes: HashBlockVotes) -> Iterator[tuple[float, int, int, int, int, int, list[int]]]:
    """The validated ``(timestamp, line, chat_id, parent_chat_id, input, output, hash_ids)`` of each row."""
    for no, obj in _lines(p):
        ts = obj.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise WorkloadError(f"field 'timestamp' must be a finite number, got {ts!r}" if "timestamp" in obj
                                else "missing field 'timestamp'", path=p, line=no)  # fmt: skip
        chat = _int_field(obj, "chat_id", "", p, no)
        parent = obj.get("parent_chat_id", -1)
        if isinstance(parent, bool) or not isinstance(parent, int):
            raise WorkloadError(f"field 'parent_chat_id' must be an integer (-1 for none), got {parent!r}",
                                path=p, line=no)
        inp = _int_field(obj, "input_length", "", p, no, minimum=1)
        outp = _int_field(obj, "output_length", "", p, no)
        hids = obj.get("hash_ids", [])
        if not is_id_list(hids):
            raise WorkloadError("field 'hash_ids' must be a list of integers", path=p, line=no)
        votes.add(inp, len(hids))
        yield float(ts), no, chat, parent, inp, outp, hids
