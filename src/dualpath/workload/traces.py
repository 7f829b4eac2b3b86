"""User traces as they are: loading with explicit limits, content from hash ids, reuse and shape statistics.

A user's trace is served as it is: every request, once, unless the caller asks for a prefix
(``max_requests`` / ``max_agents``) or copies (``repeat``). :func:`load_trace` says in ``TraceWorkload.note``
what was kept, so a report header can print it.

Content. A Mooncake request carries the hash ids of its prompt's 512-token blocks; equal ids are equal blocks
across all requests (a shared system prompt, a document, the previous turn of a session). The prompt's tokens
are a pure function of the hash ids (:func:`hash_prompt_tokens`), so a content-keyed prefix cache (our storage,
the simulator's block set) sees exactly the trace's reuse. :func:`ideal_hit_rate` is that reuse with an
unlimited cache that stores every request's full input blocks the moment it arrives: what a run can approach
(a run stores a request's blocks only when it finishes, so a burst of requests sharing a prefix hits less).

Copies (``repeat`` K > 1): copy ``c`` gets the hash ids ``h + c * 2**40`` (a new set of users with the same
shape: copies do not share content; explicit token ids of our JSONL format are kept as they are) and, online, times shifted by ``c`` times the trace's span plus one mean
gap between requests.
"""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from dualpath.errors import WorkloadError
from dualpath.workload.trajectory import Trajectory, Turn

#: the block size of Mooncake's hash ids
MOONCAKE_BLOCK = 512
#: hash-id offset between copies of a repeated trace
COPY_SALT = 1 << 40


@lru_cache(maxsize=4096)
def _block_tokens(h: int, block: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(h & 0xFFFF_FFFF_FFFF_FFFF)
    out = rng.integers(1, vocab, size=block, dtype=np.int64)
    out.setflags(write=False)
    return out


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a stable 64-bit mix (no per-process hash seed)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
    return x ^ (x >> 31)


def hash_prompt_tokens(hash_ids: Sequence[int], n_tokens: int, block: int = MOONCAKE_BLOCK,
                       vocab: int = 32000, salt: tuple[int, ...] | None = None) -> np.ndarray:
    """The first ``n_tokens`` token ids of a prompt whose ``block``-token blocks have ``hash_ids`` (ids in
    ``[1, vocab)``). Block ``b`` is a pure function of its hash id, so equal ids give equal tokens. Blocks past
    the list (a trace that lists fewer ids than its prompt has blocks) have no known content: with ``salt`` (the
    request's identity) they get ids of that request's own, so they are never reused, as the simulator and
    :func:`ideal_hit_rate` count them; without, ids shared by every prompt that long (``2**62 + b``)."""
    if n_tokens <= 0:
        return np.zeros(0, dtype=np.int64)
    nb = -(-n_tokens // block)
    own = 0
    for v in salt or ():
        own = _mix64(own ^ (int(v) & 0xFFFF_FFFF_FFFF_FFFF))

    def unlisted(b: int) -> int:
        return (1 << 62) + b if salt is None else (1 << 63) | (_mix64(own ^ b) >> 1)

    parts = [_block_tokens(int(hash_ids[b]) if b < len(hash_ids) else unlisted(b), block, vocab)
             for b in range(nb)]
    return np.concatenate(parts)[:n_tokens]


def content_hit(hash_ids: Sequence[int], prompt: int, block: int, stored: set[int]) -> int:
    """Tokens of ``prompt`` a content-keyed prefix cache holding ``stored`` block ids serves: the longest prefix
    of stored ids, in whole blocks, leaving at least one token to compute."""
    k = 0
    cap = (prompt - 1) // block
    for h in hash_ids:
        if k >= cap or h not in stored:
            break
        k += 1
    return k * block


def _context_hit(ctx: int, prompt: int, block: int) -> int:
    """Tokens of a ``prompt`` that its session's ``ctx`` serves from an unlimited cache: its whole blocks, leaving
    at least one token to compute."""
    return min((ctx // block) * block, ((prompt - 1) // block) * block) if prompt > 0 else 0


def ideal_hit_rate(trajs: Sequence[Trajectory], block: int = 64) -> float:
    """The hit rate of an unlimited cache over the whole workload, requests in time order.

    Turns with ``hash_ids``: content reuse across all requests (each request stores its full input blocks).
    Turns without: the session's own context (every full block of it), as the built-in datasets assume.
    """
    if not any(u.hash_ids is not None for t in trajs for u in t.turns):
        # session-context reuse only: each turn's hit depends on its own session, not on the order of requests
        hit = total = 0
        for t in trajs:
            ctx = 0
            for u in t.turns:
                prompt = ctx + u.append
                total += prompt
                hit += _context_hit(ctx, prompt, block)
                ctx = prompt + u.gen
        return hit / total if total else 0.0
    turns: list[tuple[float, int, int, int]] = []  # (time, agent, turn index, prompt)
    for a, t in enumerate(trajs):
        ctx = 0
        for i, u in enumerate(t.turns):
            turns.append((u.at if u.at is not None else t.arrival, a, i, ctx + u.append))
            ctx += u.append + u.gen
    turns.sort()
    stored: set[int] = set()
    hit = total = 0
    for _, a, i, prompt in turns:
        u = trajs[a].turns[i]
        total += prompt
        if u.hash_ids is not None:
            hit += content_hit(u.hash_ids, prompt, u.hash_block, stored)
            stored.update(u.hash_ids[: prompt // u.hash_block])
        else:
            hit += _context_hit(prompt - u.append, prompt, block)
    return hit / total if total else 0.0


@dataclass
class TraceWorkload:
    """A loaded trace: the trajectories to replay and what was kept of the file."""

    trajectories: list[Trajectory]
    path: str
    fmt: str
    requests_in_file: int
    sessions_in_file: int
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(t.n_turns for t in self.trajectories)


def _count_requests(trajs: Sequence[Trajectory]) -> int:
    return sum(t.n_turns for t in trajs)


def _send_times(t: Trajectory) -> list[float]:
    """When a session's turns would be sent if every turn took no time: a turn's trace time, else the previous
    turn's (the session's arrival for the first) plus the turn's think time."""
    out: list[float] = []
    prev = t.arrival
    for u in t.turns:
        prev = u.at if u.at is not None else prev + (u.think or 0.0)
        out.append(prev)
    return out


def _prefix_requests(trajs: list[Trajectory], n: int) -> list[Trajectory]:
    """The first ``n`` requests: in time order when the turns carry times (a trace time on every turn, or think
    times: :func:`_send_times`; ties: file order), else in file order."""
    if all(u.at is not None for t in trajs for u in t.turns) \
            or any(u.think is not None for t in trajs for u in t.turns):
        order = sorted((x, t.turns[i].line or 0, a, i) for a, t in enumerate(trajs)
                       for i, x in enumerate(_send_times(t)))
        keep: dict[int, int] = {}
        for _, _, a, i in order[:n]:
            keep[a] = max(keep.get(a, 0), i + 1)
        return [Trajectory(t.tid, t.turns[: keep[a]], t.arrival) for a, t in enumerate(trajs) if a in keep]
    out: list[Trajectory] = []
    left = n
    for t in trajs:
        if left <= 0:
            break
        out.append(Trajectory(t.tid, t.turns[:left], t.arrival))
        left -= len(out[-1].turns)
    return out


def _check_time_scale(factor: float) -> None:
    if not (math.isfinite(factor) and factor > 0):
        raise WorkloadError(f"time_scale must be a positive number, got {factor!r}")


def time_scaled(trajs: list[Trajectory], factor: float) -> list[Trajectory]:
    """``trajs`` replayed ``factor`` times faster: every trace time, think time and session arrival divided by
    ``factor`` (2: twice the trace's request rate; 0.5: half). Content and lengths are unchanged."""
    _check_time_scale(factor)
    if factor == 1:
        return trajs
    return [Trajectory(t.tid, [replace(u, at=None if u.at is None else u.at / factor,
                                       think=None if u.think is None else u.think / factor) for u in t.turns],
                       t.arrival / factor) for t in trajs]


def repeat_trajectories(trajs: list[Trajectory], k: int) -> list[Trajectory]:
    """``k`` copies of ``trajs`` (see the module docstring: salted hash ids, shifted times)."""
    if k <= 1:
        return trajs
    times = [u.at if u.at is not None else t.arrival for t in trajs for u in t.turns] or [0.0]
    span = max(times) - min(times)
    n = len(times)
    shift = span + (span / (n - 1) if n > 1 else 1.0)
    out: list[Trajectory] = []
    for c in range(k):
        for t in trajs:
            turns = [
                Turn(u.append, u.gen, u.append_ids, None if u.at is None else u.at + c * shift,
                     None if u.hash_ids is None else [h + c * COPY_SALT for h in u.hash_ids], u.hash_block, u.line,
                     think=u.think)
                for u in t.turns
            ]
            out.append(Trajectory(len(out), turns, t.arrival + c * shift))
    return out


#: file names a trace folder's shards may have (compressed ones too); anything else in the folder is left alone
SHARD_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".gz", ".bz2", ".xz", ".zst", ".zstd", ".zip")


def trace_shards(folder: str) -> list[str]:
    """The trace files under ``folder`` (recursively, hidden entries skipped, in path order): a dataset published as
    shards (``data/train-00000-of-00004.parquet``, ...) or one conversation per file. None is an error."""
    out: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files)
                   if not f.startswith(".") and f.lower().endswith(SHARD_SUFFIXES))
    if not out:
        raise WorkloadError(f"a folder without trace files (expected names ending in {', '.join(SHARD_SUFFIXES)})",
                            path=folder)
    return sorted(out)


def _rows(n: int, what: str = "row") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _lines_shown(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:5])) + (" ..." if len(lines) > 5 else "")


def _read_one(p: str, fmt: str, max_requests: int | None,
              max_agents: int | None) -> tuple[list[Trajectory], int, int, bool, str, float | None]:
    """One file's trajectories, its requests and sessions, whether only the prefix asked for was kept (CSV,
    Mooncake, Qwen-Bailian), what was left out of it, and the time on the trace's own clock (s) its times count
    from (CSV, Mooncake and Qwen-Bailian rows; None where times are not on one clock)."""
    from dualpath.workload.csvtrace import load_csv
    from dualpath.workload.loaders import bailian_trace, load_jsonl, mooncake_trace

    skipped = ""
    n_file: int | None = None
    s_file: int | None = None
    kept_prefix = False
    origin: list[float] = []
    if fmt == "csv":  # the prefix asked for is kept while reading (memory bounded)
        table = load_csv(p, max_requests, max_agents)
        trajs, n_file, kept_prefix = table.trajectories, table.rows, table.kept_prefix
        s_file = n_file if not table.sessions_column else len(trajs)  # (with keep: the prefix's sessions)
        if table.origin is not None:
            origin.append(table.origin)
        dropped = []
        if table.skipped_lines:
            dropped.append(f"{_rows(len(table.skipped_lines))} with 0 input tokens skipped "
                           f"(line{'' if len(table.skipped_lines) == 1 else 's'} {_lines_shown(table.skipped_lines)})")
        if table.failed_lines:
            dropped.append(f"{_rows(len(table.failed_lines), 'failed request')} (0 response tokens) skipped "
                           f"(line{'' if len(table.failed_lines) == 1 else 's'} {_lines_shown(table.failed_lines)})")
        if table.restarted:
            dropped.append(f"{_rows(table.restarted)} start{'s' if table.restarted == 1 else ''} a session of "
                           "their own: their prompt is shorter than their session's conversation so far")
        skipped = "; ".join(dropped)
    elif fmt == "sharegpt":
        from dualpath.workload.sharegpt import load_conversations

        conv = load_conversations(p, max_requests=max_requests, max_agents=max_agents)
        trajs, n_file, s_file = conv.trajectories, conv.requests, conv.sessions
        kept_prefix = max_agents is None and max_requests is not None  # (the requests before the cut are the file's)
        dropped = []
        if conv.no_reply:
            dropped.append(f"{_rows(conv.no_reply, 'conversation')} without a reply skipped")
        if conv.trailing:
            dropped.append(f"{_rows(conv.trailing, 'conversation')} end{'s' if conv.trailing == 1 else ''} with "
                           "messages no reply follows (not sent)")
        skipped = "; ".join(dropped)
    elif fmt == "weka":
        from dualpath.workload.weka import load_weka

        trajs = load_weka(p)
    elif fmt in ("bailian", "mooncake"):  # the first requests kept as the rows stream by (memory bounded)
        keep = max_requests if max_agents is None else None
        kept_prefix = keep is not None
        if fmt == "bailian":
            trajs, orphans, n_file = bailian_trace(p, max_requests=keep, origin=origin)
            if orphans:
                skipped = (f"{_rows(orphans, 'request')} start{'s' if orphans == 1 else ''} a session of their own: "
                           "their parent is not in the file, "
                           "has another child, or its context is longer than theirs")
        else:
            trajs, restarted, n_file = mooncake_trace(p, max_requests=keep, origin=origin)
            if restarted:
                skipped = (f"{_rows(restarted, 'request')} start{'s' if restarted == 1 else ''} a session of their "
                           "own: their messages do not extend "
                           "their session's previous request")
    else:
        trajs = load_jsonl(p)
    if n_file is None:
        n_file = _count_requests(trajs)
    if s_file is None:
        s_file = len(trajs)
    return trajs, n_file, s_file, kept_prefix, skipped, origin[0] if origin else None


def _shifted(trajs: list[Trajectory], dt: float, base: int) -> list[Trajectory]:
    """``trajs`` numbered from ``base``, their times ``dt`` seconds later (a shard's times put on its trace's clock)."""
    if dt == 0:
        return [Trajectory(base + k, t.turns, t.arrival) for k, t in enumerate(trajs)]
    return [Trajectory(base + k, [replace(u, at=None if u.at is None else u.at + dt) for u in t.turns], t.arrival + dt)
            for k, t in enumerate(trajs)]


def load_trace(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    max_requests: int | None = None,
    max_agents: int | None = None,
    repeat: int = 1,
    time_scale: float = 1.0,
) -> TraceWorkload:
    """Every request of the trace at ``path`` (``fmt``: ``auto`` detects it from the first line; ``jsonl``,
    ``mooncake``, ``bailian``, ``csv``, ``sharegpt`` or ``weka``), or the prefix asked for, ``repeat`` times,
    its times divided by ``time_scale`` (:func:`time_scaled`; the prefix is taken in the trace's own time).
    ``path`` may be a folder: its trace files (:func:`trace_shards`), all of one format, as one trace: shards of a
    timed trace (CSV, Mooncake, Qwen-Bailian rows) share its clock, so their times count from the earliest request
    of all of them; sessions are grouped within each shard. Errors (missing, empty, malformed, not UTF-8) name the
    file and the line."""
    from dualpath.workload.csvtrace import FORMATS, resolve_format

    p = str(path)
    if max_requests is not None and max_requests < 1:
        raise WorkloadError(f"max_requests must be >= 1, got {max_requests}")
    if max_agents is not None and max_agents < 1:
        raise WorkloadError(f"max_agents must be >= 1, got {max_agents}")
    if repeat < 1:
        raise WorkloadError(f"repeat must be >= 1, got {repeat}")
    _check_time_scale(time_scale)  # (before the file is read)
    if fmt not in FORMATS:
        raise WorkloadError(f"unknown trace format {fmt!r} ({', '.join(FORMATS)})", path=p)
    if os.path.isdir(p):  # a dataset's shards (a Parquet dataset, a folder of conversation files)
        shards = trace_shards(p)
        fmt = resolve_format(shards[0], fmt)
        trajs: list[Trajectory] = []
        n_file, s_file, skips = 0, 0, []
        parts: list[tuple[list[Trajectory], float | None]] = []
        for f in shards:
            part, n, s_, _, skipped, origin = _read_one(f, fmt, max_requests, max_agents)
            parts.append((part, origin))
            n_file, s_file = n_file + n, s_file + s_
            if skipped:
                skips.append(f"{os.path.relpath(f, p)}: {skipped}")
        origins = [o for part, o in parts if part and o is not None]
        clock = min(origins) if origins and len(origins) == sum(1 for part, _ in parts if part) else None
        for part, origin in parts:  # one clock for all shards of a timed trace
            trajs.extend(_shifted(part, 0.0 if clock is None or origin is None else origin - clock, len(trajs)))
        kept_prefix, skipped = False, "; ".join(skips)
        if len(shards) > 1:
            skipped = f"{len(shards)} files" + (f"; {skipped}" if skipped else "")
    elif not os.path.isfile(p):
        raise WorkloadError("trace file not found", path=p)
    else:
        fmt = resolve_format(p, fmt)
        trajs, n_file, s_file, kept_prefix, skipped, _ = _read_one(p, fmt, max_requests, max_agents)
    if n_file == 0:
        raise WorkloadError("empty trace: no request in the file", path=p, line=1)
    notes: list[str] = []
    if max_agents is not None and max_agents < s_file:
        trajs = trajs[:max_agents]
        notes.append(f"first {max_agents} of {s_file} sessions")
    # (a CSV trace's rows past the prefix were never kept: count what the file had before the cut)
    before = min(n_file, max_agents or n_file) if kept_prefix else _count_requests(trajs)
    if max_requests is not None and max_requests < before:
        trajs = _prefix_requests(trajs, max_requests)
        notes.append(f"first {max_requests} requests")
    if max_agents is not None and max_agents > s_file:
        notes.append(f"the trace has only {s_file} sessions (asked for {max_agents}; a trace is not replayed)")
    n_kept = _count_requests(trajs)
    if not notes:
        notes.append("every request")
    if skipped:
        notes.append(skipped)
    note = f"{n_kept} of {n_file} requests ({', '.join(notes)})"
    if repeat > 1:
        trajs = repeat_trajectories(trajs, repeat)
        note = f"{n_kept * repeat} requests: {note} repeated {repeat}x (copies share no content)"
    if time_scale != 1:
        trajs = time_scaled(trajs, time_scale)
        note = f"{note}; times / {time_scale:g}"
    return TraceWorkload(trajs, p, fmt, n_file, s_file, note)


def _dist(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    if not a.size:
        return {"mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def largest_turn(trajs: Sequence[Trajectory]) -> tuple[int, int, int, int]:
    """(prompt tokens, generated tokens, trajectory index, turn index) of the turn needing the most tokens."""
    best = (0, 0, -1, -1)
    for a, t in enumerate(trajs):
        ctx = 0
        for i, u in enumerate(t.turns):
            prompt = ctx + u.append
            if prompt + max(1, u.gen) > best[0] + best[1]:
                best = (prompt, max(1, u.gen), a, i)
            ctx = prompt + u.gen
    return best


def check_fits(w: TraceWorkload, limit: int, what: str) -> None:
    """A :class:`WorkloadError` naming the file and line of the first turn whose prompt + generation exceeds
    ``limit`` tokens (``what`` names the limit, e.g. "a DE's KV memory")."""
    for t in w.trajectories:
        ctx = 0
        for i, u in enumerate(t.turns):
            prompt = ctx + u.append
            if prompt + max(1, u.gen) > limit:
                raise WorkloadError(f"{t.origin or f'session {t.tid}'} turn {i} needs {prompt} prompt + {max(1, u.gen)} generated "
                                    f"tokens, more than {what} ({limit} tokens)", path=w.path, line=u.line)
            ctx = prompt + u.gen


def trace_stats(path: str | os.PathLike[str], fmt: str = "auto") -> dict[str, Any]:
    """The shape of a trace: requests, sessions, input/output lengths, ideal hit rate, arrival rate, largest
    turn (``dualpath trace stats``)."""
    from dualpath.workload.csvtrace import resolve_format

    if fmt in (None, "auto", "csv") and os.path.isfile(path) and resolve_format(path, fmt) == "csv":
        return _csv_stats(str(path))
    return _workload_stats(load_trace(path, fmt))


def _workload_stats(w: TraceWorkload) -> dict[str, Any]:
    """:func:`trace_stats` from a loaded trace's trajectories."""
    fmt = w.fmt
    trajs = w.trajectories
    inputs = array("q")  # (typed arrays: a week-long CSV trace has millions of requests)
    outputs = array("q")
    times = array("d")
    for t in trajs:
        ctx = 0
        for u in t.turns:
            inputs.append(ctx + u.append)
            outputs.append(u.gen)
            times.append(u.at if u.at is not None else t.arrival)
            ctx += u.append + u.gen
    span = max(times) - min(times) if times else 0.0
    prompt, gen, a, i = largest_turn(trajs)
    out: dict[str, Any] = {
        "path": w.path, "format": fmt, "requests": len(inputs), "sessions": len(trajs),
        "turns_per_session": _dist([t.n_turns for t in trajs]),
        "input_tokens": _dist(inputs), "output_tokens": _dist(outputs),
        "total_input_tokens": int(sum(inputs)), "total_output_tokens": int(sum(outputs)),
        "ideal_hit_rate": ideal_hit_rate(trajs),
        "span_s": span, "arrival_rate_rps": (len(inputs) - 1) / span if span > 0 else math.nan,
        "largest_turn": {"prompt": prompt, "gen": gen, "tokens": prompt + gen, "session": trajs[a].tid, "turn": i},
    }
    if a >= 0 and trajs[a].turns[i].line is not None:
        out["largest_turn"]["line"] = trajs[a].turns[i].line
    out["content_keys"] = any(u.hash_ids is not None for t in trajs for u in t.turns)
    thinks = [u.think for t in trajs for u in t.turns if u.think is not None]
    if thinks:  # a trace's delays: seconds between a turn's end and its session's next turn
        out["think_s"] = _dist(thinks)
        out["think_turns"] = len(thinks)
    return out


def _csv_stats(path: str, block: int = 64) -> dict[str, Any]:
    """:func:`trace_stats` of a CSV trace without making its trajectories: one pass keeps 4 numbers per row (and a
    session index with a session column), so a week-long public trace of tens of millions of rows fits in memory.
    The numbers are those of the trajectories :func:`~dualpath.workload.csvtrace.load_csv` makes."""
    from dualpath.workload.csvtrace import scan_csv

    scan, it = scan_csv(path)
    times, lines, inputs, outputs, sess = array("d"), array("q"), array("q"), array("q"), array("q")
    sids: dict[str, int] = {}
    for t, no, inp, outp, sid in it:
        times.append(t)
        lines.append(no)
        inputs.append(inp)
        outputs.append(outp)
        sess.append(sids.setdefault(sid, len(sids)) if sid else -1)
    n = len(inputs)
    if n == 0:
        raise WorkloadError("empty trace: no request in the file", path=path, line=1)
    order = np.lexsort((np.frombuffer(lines, dtype=np.int64), np.frombuffer(times, dtype=np.float64)))
    # sessions as load_csv makes them: a row continues its session when its prompt holds the conversation so far
    open_ctx: dict[int, tuple[int, int]] = {}  # session index -> (its trajectory, its context so far)
    turns = array("q")  # turns per trajectory, in the order they are made
    hit = total = 0
    best = (-1, 0, 0, -1, -1)  # (prompt + max(1, gen), -trajectory, -turn, prompt, gen): the largest turn
    best_line = 0
    for j in order:
        j = int(j)
        inp, outp, k = inputs[j], outputs[j], sess[j]
        cur = open_ctx.get(k) if k >= 0 else None
        if cur is not None and inp >= cur[1]:
            a, ctx = cur[0], cur[1]
            i = turns[a]
            turns[a] = i + 1
        else:
            a, ctx, i = len(turns), 0, 0
            turns.append(1)
        if k >= 0:
            open_ctx[k] = (a, inp + outp)
        total += inp
        hit += _context_hit(ctx, inp, block)
        key = (inp + max(1, outp), -a, -i, inp, max(1, outp))  # (as largest_turn: at least one generated)
        if key > best:
            best, best_line = key, lines[j]
    span = max(times) - min(times)
    return {
        "path": path, "format": "csv", "requests": n, "sessions": len(turns),
        "turns_per_session": _dist(turns),
        "input_tokens": _dist(inputs), "output_tokens": _dist(outputs),
        "total_input_tokens": int(sum(inputs)), "total_output_tokens": int(sum(outputs)),
        "ideal_hit_rate": hit / total if total else 0.0,
        "span_s": span, "arrival_rate_rps": (n - 1) / span if span > 0 else math.nan,
        "largest_turn": {"prompt": best[3], "gen": best[4], "tokens": best[3] + best[4], "session": -best[1],
                         "turn": -best[2], "line": best_line},
        "content_keys": False,
        "skipped_rows": {"zero_input": len(scan.skipped_lines), "failed": len(scan.failed_lines)},
    }


def synthetic_mooncake(n_requests: int, seed: int = 0, *, rate_rps: float = 2.0, n_prompts: int = 16,
                       block: int = MOONCAKE_BLOCK) -> list[dict[str, Any]]:
    """A Mooncake-format trace shaped like the public ones (our generator, for tests and benchmarks): sessions of
    geometric length (mean 2.5 turns) that start with one of ``n_prompts`` shared system prompts (1-8 blocks) and a
    fresh user prompt (lognormal, median 3K tokens); a follow-up turn extends the previous input and output by a
    lognormal append (median 600); outputs median 250. Arrivals: Poisson at ``rate_rps`` requests/s, a session's
    next turn 5-60 s after its previous one. Rows are dicts with ``timestamp`` (ms), ``input_length``,
    ``output_length``, ``hash_ids``; hash ids are content (shared prompts share them, sessions extend theirs)."""
    rng = np.random.default_rng([seed, 3])
    prompts = [list(range(1000 * k + 1, 1000 * k + 1 + int(rng.integers(1, 9)))) for k in range(n_prompts)]
    next_id = 10_000_000
    rows: list[dict[str, Any]] = []
    t = 0.0
    while len(rows) < n_requests:
        t += float(rng.exponential(2.5 / rate_rps))
        turns = int(rng.geometric(0.4))
        sys_ids = prompts[int(rng.integers(0, n_prompts))]
        inp = len(sys_ids) * block + max(16, int(3000 * rng.lognormal(0, 0.9)))
        ids = list(sys_ids)
        ts = t
        for _ in range(turns):
            if len(rows) >= n_requests:
                break
            need = -(-inp // block)
            while len(ids) < need:
                ids.append(next_id)
                next_id += 1
            out = max(1, int(250 * rng.lognormal(0, 0.8)))
            rows.append({"timestamp": int(ts * 1000), "input_length": inp, "output_length": out,
                         "hash_ids": list(ids[:need])})
            ids = ids[: inp // block]  # the partial last block changes when the session grows
            inp = inp + out + max(16, int(600 * rng.lognormal(0, 0.9)))
            ts += float(rng.uniform(5, 60))
    rows.sort(key=lambda r: r["timestamp"])
    return rows
