"""Request traces as CSV tables, and telling a trace file's format from its first line.

Public request traces without content come as CSV: the Azure LLM inference traces (``TIMESTAMP``,
``ContextTokens``, ``GeneratedTokens``) and BurstGPT (``Timestamp``, ``Request tokens``, ``Response tokens``, ...).
Columns are found by name, case and spacing ignored (:data:`TIME_COLUMNS`, :data:`INPUT_COLUMNS`,
:data:`OUTPUT_COLUMNS`); other columns are ignored. A timestamp is a number of seconds or an ISO date-time.

Such a trace says nothing about content, so every request is its own one-turn session whose prompt shares no
block with any other: storage sees no reuse, and the hit rate is 0 (the trace is served as it is). Rows with
0 input tokens cannot be served, and BurstGPT's failed requests (its README: rows whose ``Response tokens`` are
0; its ``*_without_fails`` files leave them out) were never answered: both are skipped and counted, with their
lines, in the run's header. Any other malformed cell (including an infinite or NaN number) is an error naming
the file, the line and the column. ISO date-times without a zone are UTC (:func:`iso_seconds`).

A trace with a session column (:data:`SESSION_COLUMNS`: BurstGPT v2's ``Session ID``, set on its conversation
rows) groups the rows of one value into one multi-turn session, in time order. A later row is a follow-up turn
only when its prompt holds the whole conversation so far (input tokens >= the previous turn's input + output
tokens): it appends the difference and reuses the rest, as a chat client resending the history does. A row whose
prompt is shorter cannot contain that history, so no reuse is assumed: it starts a session of its own, and the
count is in the run's header. Rows with an empty session cell are one-turn sessions.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from dualpath.errors import WorkloadError
from dualpath.workload.compressed import open_trace
from dualpath.workload.trajectory import Trajectory, Turn

TIME_COLUMNS = ("timestamp", "time", "arrival_time", "arrival", "created")
INPUT_COLUMNS = ("contexttokens", "requesttokens", "input_length", "input_tokens", "prompt_tokens", "input_len",
                 "prompt_len")
OUTPUT_COLUMNS = ("generatedtokens", "responsetokens", "output_length", "output_tokens", "completion_tokens",
                  "output_len", "gen_len")
SESSION_COLUMNS = ("sessionid", "session_id", "conversationid", "conversation_id")
FORMATS = ("auto", "jsonl", "mooncake", "bailian", "csv", "sharegpt", "weka")


def _norm(name: str) -> str:
    return "".join(name.lower().split())


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    normed = [_norm(h).replace(" ", "") for h in header]
    for want in names:
        for i, h in enumerate(normed):
            if h == want:
                return i
    return None


@dataclass
class CsvTrace:
    trajectories: list[Trajectory]
    skipped_lines: list[int]  # rows with 0 input tokens
    rows: int = 0  # servable rows in the file
    sessions_column: bool = False  # the header names a session column (rows grouped into sessions)
    kept_prefix: bool = False  # only a prefix of the rows was kept while reading (see load_csv)
    restarted: int = 0  # session rows whose prompt cannot hold the session's history: a session of their own
    failed_lines: list[int] = field(default_factory=list)  # BurstGPT's failed requests (0 response tokens)
    origin: float | None = None  # the time (s) the trajectories' times count from: the first kept row's


_FRACTION = re.compile(r"\.(\d+)")
_ZONE = re.compile(r"(?:Z|([+-])(\d{2}):?(\d{2}))$")


def iso_seconds(text: str) -> float:
    """Seconds since the epoch of an ISO date-time as public traces write it: any number of fractional digits
    (Azure's traces have 7: ``2023-11-16 18:15:46.6805900``), a zone as ``Z``, ``+00:00`` or ``+0000``, or none,
    which is read as UTC (a trace's times do not depend on the machine replaying it). The same on every Python
    this project supports (3.10's ``fromisoformat`` takes only 3 or 6 fractional digits). ValueError if it is
    not one."""
    s = text.strip()
    zone = _ZONE.search(s)
    tz = timezone.utc
    if zone is not None:
        if zone.group(1):
            sign = 1 if zone.group(1) == "+" else -1
            tz = timezone(sign * timedelta(hours=int(zone.group(2)), minutes=int(zone.group(3))))
        s = s[:zone.start()].rstrip()
    frac = 0.0
    m = _FRACTION.search(s)
    if m is not None and m.end() == len(s):
        frac = float("0." + m.group(1))
        s = s[:m.start()]
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp() + frac


def _time(cell: str, path: str, line: int, col: str) -> float:
    try:
        v = float(cell)
    except ValueError:
        try:
            v = iso_seconds(cell)
        except ValueError:
            raise WorkloadError(f"column {col!r}: {cell!r} is neither seconds nor an ISO date-time", path=path,
                                line=line) from None
    if not math.isfinite(v):
        raise WorkloadError(f"column {col!r}: {cell!r} is not a finite time", path=path, line=line)
    return v


def _count(cell: str, path: str, line: int, col: str) -> int:
    try:
        v = float(cell)
    except ValueError:
        raise WorkloadError(f"column {col!r}: {cell!r} is not a token count", path=path, line=line) from None
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise WorkloadError(f"column {col!r}: {cell!r} is not a token count (an integer >= 0)", path=path, line=line)
    return int(v)


@dataclass
class CsvScan:
    """What one pass over a CSV trace found besides its rows (filled in as :func:`scan_csv`'s rows are read)."""

    header: list[str]
    sessions_column: bool
    skipped_lines: list[int]
    rows: int = 0  # servable rows read so far
    failed_lines: list[int] = field(default_factory=list)  # BurstGPT's failed requests, skipped


#: output columns whose 0 marks a failed request (BurstGPT's README: failures have 0 ``Response tokens``)
FAILED_IF_ZERO = ("responsetokens",)


def scan_csv(path: str | os.PathLike[str]) -> tuple[CsvScan, Iterator[tuple[float, int, int, int, str]]]:
    """The header facts and an iterator over the servable rows of a CSV trace, in file order: ``(time s, line,
    input tokens, output tokens, session id)``. Every cell is checked; a malformed one is an error naming the file,
    the line and the column. Rows with 0 input tokens are skipped (``skipped_lines``), and BurstGPT's failed
    requests (0 ``Response tokens``) too (``failed_lines``)."""
    p = str(path)
    f = io.TextIOWrapper(open_trace(p), encoding="utf-8-sig", newline="")
    reader = csv.reader(f)
    try:
        try:
            header = next(reader, None)
        except UnicodeDecodeError as e:
            raise WorkloadError(f"not UTF-8 text ({e.reason})", path=p) from None
        except csv.Error as e:
            raise WorkloadError(f"not valid CSV ({e})", path=p, line=reader.line_num) from None
        if header is None:
            raise WorkloadError("empty trace: no header line", path=p, line=1)
        ti, ii, oi = _pick(header, TIME_COLUMNS), _pick(header, INPUT_COLUMNS), _pick(header, OUTPUT_COLUMNS)
        if ii is None or oi is None:
            raise WorkloadError(
                f"CSV header {header!r} has no {'input' if ii is None else 'output'}-token column (one of "
                f"{', '.join(INPUT_COLUMNS if ii is None else OUTPUT_COLUMNS)}; case and spaces ignored)",
                path=p, line=1)
    except BaseException:
        f.close()
        raise
    si = _pick(header, SESSION_COLUMNS)
    scan = CsvScan(header, si is not None, [])
    failed_if_zero = _norm(header[oi]) in FAILED_IF_ZERO

    def rows() -> Iterator[tuple[float, int, int, int, str]]:
        skipped = scan.skipped_lines
        with f:
            try:
                for row in reader:
                    no = reader.line_num
                    if not row or not any(c.strip() for c in row):
                        continue
                    if len(row) != len(header):
                        raise WorkloadError(f"{len(row)} cells, the header has {len(header)}", path=p, line=no)
                    t = _time(row[ti], p, no, header[ti]) if ti is not None else 0.0
                    inp = _count(row[ii], p, no, header[ii])
                    outp = _count(row[oi], p, no, header[oi])
                    if inp == 0:
                        skipped.append(no)
                        continue
                    if outp == 0 and failed_if_zero:
                        scan.failed_lines.append(no)
                        continue
                    scan.rows += 1
                    yield t, no, inp, outp, (row[si].strip() if si is not None else "")
            except UnicodeDecodeError as e:
                raise WorkloadError(f"not UTF-8 text ({e.reason})", path=p) from None
            except csv.Error as e:
                raise WorkloadError(f"not valid CSV ({e})", path=p, line=reader.line_num) from None

    return scan, rows()


def load_csv(path: str | os.PathLike[str], max_requests: int | None = None,
             max_agents: int | None = None) -> CsvTrace:
    """The rows of a CSV request trace as trajectories, in time order (ties: file order): one-turn sessions, or
    with a session column the module docstring's multi-turn sessions.

    Where the bounds asked for make a prefix of the rows (in that order) all that is served, only that prefix is
    kept while reading (``kept_prefix``): ``max_requests`` or ``max_agents`` rows of one-turn sessions, or
    ``max_requests`` rows when there are sessions and no ``max_agents`` (whose first sessions may end anywhere in
    the file). Every row is still read and checked, but memory stays bounded by the prefix (a week-long public
    trace holds millions of rows). The caller cuts the trajectories to the bounds, as for any trace."""
    scan, it = scan_csv(path)
    rows: list[tuple[float, int, int, int, str]] = []
    heap: list[tuple[float, int, int, int, str]] = []  # with keep: the kept rows as (-t, -line, ...), a max-heap
    if not scan.sessions_column:  # one request per session: either bound is a prefix of rows
        keep = min((b for b in (max_requests, max_agents) if b is not None), default=None)
    else:  # sessions: a prefix of rows is a prefix of requests only
        keep = max_requests if max_agents is None else None
    for t, no, inp, outp, sid in it:
        if keep is None:
            rows.append((t, no, inp, outp, sid))
        elif len(heap) < keep:
            heapq.heappush(heap, (-t, -no, inp, outp, sid))
        elif (-t, -no) > heap[0][:2]:  # earlier than the latest kept row
            heapq.heapreplace(heap, (-t, -no, inp, outp, sid))
    if keep is not None:
        rows = [(-nt, -nno, inp, outp, sid) for nt, nno, inp, outp, sid in heap]
    rows.sort(reverse=True)  # popped from the end, earliest first: each row is freed as its turn is made
    t0 = rows[-1][0] if rows else 0.0
    trajs: list[Trajectory] = []
    open_sessions: dict[str, tuple[Trajectory, int]] = {}  # session id -> (its trajectory, its context so far)
    restarted = 0
    while rows:
        t, no, inp, outp, sid = rows.pop()
        at = t - t0
        cur = open_sessions.get(sid) if sid else None
        if cur is not None and inp >= cur[1]:  # the prompt holds the conversation so far: a follow-up turn
            cur[0].turns.append(Turn(inp - cur[1], outp, None, at, None, 512, no))
        else:
            if cur is not None:
                restarted += 1
            traj = Trajectory(len(trajs), [Turn(inp, outp, None, at, None, 512, no)], at)
            trajs.append(traj)
            if not sid:
                continue
            cur = (traj, 0)
        open_sessions[sid] = (cur[0], inp + outp)
    return CsvTrace(trajs, scan.skipped_lines, scan.rows, scan.sessions_column, keep is not None, restarted,
                    scan.failed_lines, t0 if trajs else None)


def detect_format(path: str | os.PathLike[str]) -> str:
    """``jsonl``, ``mooncake`` (also AIPerf's rows with ``text_input`` or ``messages`` and an ``output_length``:
    :mod:`dualpath.workload.mooncake_sessions`), ``bailian`` (Mooncake's fields plus ``chat_id``; a session's
    first request may leave ``parent_chat_id`` out), ``csv``, ``sharegpt`` (conversations, requests and prompt datasets:
    :mod:`dualpath.workload.sharegpt`) or ``weka``
    (kv-cache-tester agent conversations: :mod:`dualpath.workload.weka`), from the start of the file at ``path``."""
    p = str(path)
    with open_trace(p) as f:
        first = b""
        for raw in f:
            if raw.strip():
                first = raw[:1 << 20]
                break
    text = first.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
    if not text:
        raise WorkloadError("empty trace: no request in the file", path=p, line=1)
    if text.startswith(("{", "[")):
        from dualpath.workload.sharegpt import is_prompt_object, looks_like_conversations

        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            obj = None
        if isinstance(obj, dict) and "turns" not in obj and "output_length" in obj \
                and any(k in obj for k in ("input_length", "text_input", "messages", "hash_ids")):
            # a request row with its output length: Mooncake's, or AIPerf's mooncake_trace with text or messages
            return "bailian" if "chat_id" in obj else "mooncake"
        from dualpath.workload.weka import looks_like_weka

        with open_trace(p) as f:
            head = f.read(1 << 16)
        if isinstance(obj, dict) and "requests" in obj and "block_size" in obj \
                or (obj is None or isinstance(obj, list)) and looks_like_weka(head):
            return "weka"  # kv-cache-tester conversations (one per line, or a pretty-printed document)
        if looks_like_conversations(head) or is_prompt_object(obj):
            return "sharegpt"
        if obj is None:
            return "jsonl"  # malformed JSON: the JSONL reader names what is wrong with the line
        if not isinstance(obj, dict) or "turns" in obj:
            return "jsonl"
        if "chat_id" in obj:
            return "bailian"
        if any(k in obj for k in ("hash_ids", "input_length", "text_input")):
            return "mooncake"
        raise WorkloadError("cannot tell the trace's format from its first line (JSON, but neither our JSONL "
                            "'turns', Mooncake 'input_length'/'hash_ids'/'text_input', ShareGPT "
                            "'conversations'/'messages' nor a 'prompt'); pass --trace-format", path=p, line=1)
    try:
        header = next(csv.reader([text]))
    except csv.Error:
        header = []
    if _pick(header, INPUT_COLUMNS) is not None and _pick(header, OUTPUT_COLUMNS) is not None:
        return "csv"
    raise WorkloadError(f"cannot tell the trace's format from its first line {text[:80]!r}: expected a JSON object "
                        "(jsonl, mooncake) or a CSV header with input- and output-token columns; pass "
                        "--trace-format", path=p, line=1)


def resolve_format(path: str | os.PathLike[str], fmt: str | None) -> str:
    """``fmt``, or the detected format when it is ``auto`` or None. An unknown name is an error listing them."""
    if fmt is None or fmt == "auto":
        return detect_format(path)
    if fmt not in FORMATS:
        raise WorkloadError(f"unknown trace format {fmt!r} ({', '.join(FORMATS)})", path=str(path))
    return fmt
