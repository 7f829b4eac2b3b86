"""Public traces as they are published: Azure's timestamps on every Python and in every time zone, BurstGPT's
failed requests, non-finite numbers refused with the file and line, Qwen-Bailian rows without a parent, and a
trace split into shards replayed on one clock."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dualpath.errors import WorkloadError
from dualpath.workload.csvtrace import detect_format, iso_seconds
from dualpath.workload.traces import load_trace, trace_stats


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(("text", "want"), [
    ("2023-11-16 18:15:46.6805900", _utc(2023, 11, 16, 18, 15, 46) + 0.68059),  # Azure 2023: 7 digits
    ("2024-05-10 00:00:00.0098720+00:00", _utc(2024, 5, 10) + 0.009872),  # Azure 2024
    ("2024-05-10T00:00:00Z", _utc(2024, 5, 10)),
    ("2024-05-10 02:00:00.5+0200", _utc(2024, 5, 10) + 0.5),
    ("2024-05-09 19:00:00-05:00", _utc(2024, 5, 10)),
    ("2023-11-16 18:15", _utc(2023, 11, 16, 18, 15)),
    ("2023-11-16", _utc(2023, 11, 16)),
    (" 2023-11-16 18:15:46.1 ", _utc(2023, 11, 16, 18, 15, 46) + 0.1),
])
def test_iso_times_as_public_traces_write_them(text: str, want: float) -> None:
    assert iso_seconds(text) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("text", ["yesterday", "2023-13-01", "2023-11-16 25:00", ""])
def test_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        iso_seconds(text)


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_times_without_a_zone_do_not_depend_on_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Across New York's spring-forward hour the gap between two naive Azure times is the UTC gap (62 minutes),
    whatever TZ the machine has."""
    p = tmp_path / "azure.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-03-12 01:59:00.0000000,100,10\r\n"
                 "2023-03-12 03:01:00.0000000,100,10\r\n")
    gaps = []
    for tz in ("UTC", "America/New_York", "Asia/Kolkata"):
        monkeypatch.setenv("TZ", tz)
        time.tzset()
        w = load_trace(p)
        gaps.append(w.trajectories[1].arrival - w.trajectories[0].arrival)
    monkeypatch.delenv("TZ")
    time.tzset()
    assert gaps == [3720.0, 3720.0, 3720.0]


def test_burstgpt_failed_requests_are_skipped_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "BurstGPT_1.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n"
                 "45,ChatGPT,1087,0,1087,Conversation log\n"  # failed: no response
                 "46,GPT-4,900,0,900,API log\n"  # failed
                 "47,ChatGPT,0,0,0,Conversation log\n"  # nothing to serve
                 "118,GPT-4,1087,136,1223,API log\n")
    w = load_trace(p)
    assert [(t.turns[0].append, t.turns[0].gen) for t in w.trajectories] == [(472, 18), (1087, 136)]
    assert w.note == ("2 of 2 requests (every request, 1 row with 0 input tokens skipped (line 5); "
                      "2 failed requests (0 response tokens) skipped (lines 3, 4))")
    stats = trace_stats(p)
    assert stats["requests"] == 2 and stats["skipped_rows"] == {"zero_input": 1, "failed": 2}
    # another table's 0 output tokens are a request that generated nothing: served
    q = tmp_path / "azure.csv"
    q.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,0\n1,100,5\n")
    assert [t.turns[0].gen for t in load_trace(q).trajectories] == [0, 5]


@pytest.mark.parametrize(("name", "text", "line", "match"), [
    ("ts.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,100,10\ninf,100,10\n", 3, "'TIMESTAMP': 'inf' is not a finite time"),
    ("nan.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nnan,100,10\n", 2, "'TIMESTAMP': 'nan' is not a finite time"),
    ("count.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n0,inf,10\n", 2, "'ContextTokens': 'inf' is not a token count"),
    ("mc.jsonl", '{"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}\n'
                 '{"timestamp": Infinity, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}\n', 2,
     "'timestamp' must be a finite number, got inf"),
    ("bl.jsonl", '{"chat_id": 1, "parent_chat_id": -1, "timestamp": NaN, "input_length": 60, "output_length": 4, '
                 '"hash_ids": [1, 2, 3, 4]}\n', 1, "'timestamp' must be a finite number, got nan"),
])
def test_non_finite_numbers_name_the_file_and_line(tmp_path: Path, name: str, text: str, line: int,
                                                   match: str) -> None:
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(WorkloadError, match=match) as ei:
        load_trace(p)
    assert ei.value.line == line and ei.value.path == str(p)


def test_a_bailian_trace_whose_first_row_has_no_parent_is_told_apart(tmp_path: Path) -> None:
    rows = [{"chat_id": 7, "timestamp": 13.889, "input_length": 40, "output_length": 8, "hash_ids": [1, 2, 3]},
            {"chat_id": 8, "parent_chat_id": 7, "timestamp": 20.5, "input_length": 70, "output_length": 8,
             "hash_ids": [1, 2, 3, 4, 5]}]
    p = tmp_path / "qwen_bailian.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(p) == "bailian"
    w = load_trace(p)
    assert w.fmt == "bailian" and len(w.trajectories) == 1  # the second request continues the first
    assert [u.at for u in w.trajectories[0].turns] == pytest.approx([0.0, 6.611])  # seconds, not milliseconds


def _mooncake_rows(n: int) -> list[dict[str, int | list[int]]]:
    return [{"timestamp": 1000 * k * k, "input_length": 600 + 512 * k, "output_length": 4,
             "hash_ids": list(range(100 * k, 100 * k + 2 + k))} for k in range(n)]


def test_shards_of_a_trace_share_its_clock(tmp_path: Path) -> None:
    """A trace split in time into two files replays as the whole file does: the second shard's requests keep
    their place on the trace's clock instead of starting again at 0."""
    azure = tmp_path / "azure"
    azure.mkdir()
    head = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    (azure / "part-0.csv").write_text(head + "2023-11-16 18:00:00.0000000,100,10\n2023-11-16 18:10:00.0000000,100,10\n")
    (azure / "part-1.csv").write_text(head + "2023-11-16 19:00:00.0000000,100,10\n2023-11-16 19:10:00.0000000,100,10\n")
    w = load_trace(azure)
    assert sorted(t.arrival for t in w.trajectories) == [0.0, 600.0, 3600.0, 4200.0]
    assert sorted(u.at for t in w.trajectories for u in t.turns) == [0.0, 600.0, 3600.0, 4200.0]
    # the later shard first in path order: the clock is still the earliest request's
    os.rename(azure / "part-0.csv", azure / "part-2.csv")
    assert sorted(t.arrival for t in load_trace(azure).trajectories) == [0.0, 600.0, 3600.0, 4200.0]
    assert [t.tid for t in load_trace(azure).trajectories] == [0, 1, 2, 3]

    rows = _mooncake_rows(8)
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "mooncake"
    shards.mkdir()
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (shards / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    one, split = load_trace(whole), load_trace(shards)
    times = sorted(u.at for t in one.trajectories for u in t.turns)
    assert sorted(u.at for t in split.trajectories for u in t.turns) == pytest.approx(times)
    assert times[-1] == pytest.approx(49.0)
    # the first requests in time order, across shards
    assert sorted(u.at for t in load_trace(shards, max_requests=5).trajectories for u in t.turns) == \
        pytest.approx(times[:5])

    bailian = tmp_path / "bailian"
    bailian.mkdir()
    for k, t0 in enumerate((100.0, 40.0)):
        (bailian / f"{k}.jsonl").write_text(json.dumps(
            {"chat_id": k, "parent_chat_id": -1, "timestamp": t0, "input_length": 60, "output_length": 4,
             "hash_ids": [k, k + 10, k + 20, k + 30]}) + "\n")
    assert sorted(t.arrival for t in load_trace(bailian).trajectories) == [0.0, 60.0]
