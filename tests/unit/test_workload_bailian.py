"""Qwen-Bailian traces (ATC'25): the trace's own sessions (chat_id / parent_chat_id), seconds, 16-token hash
blocks (inferred, not assumed), and every request served once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpath.cli import main
from dualpath.errors import WorkloadError
from dualpath.workload.csvtrace import detect_format
from dualpath.workload.loaders import infer_hash_block, load_mooncake
from dualpath.workload.traces import ideal_hit_rate, load_trace

DATA = Path(__file__).parent.parent / "data"

ROWS = [  # (chat_id, parent, t (s), input, output, hash_ids of 16-token blocks)
    (1, -1, 10.0, 40, 10, [1, 2, 3]),
    (3, -1, 11.0, 20, 4, [1, 9]),  # another session that shares the first block (a system prompt)
    (2, 1, 12.0, 80, 5, [1, 2, 3, 4, 5]),  # continues 1: 80 > 40 + 10
    (4, 1, 13.0, 60, 3, [1, 2, 3, 7]),  # a second child of 1: its own session
    (5, 99, 14.0, 32, 2, [8, 8]),  # its parent is not in the file
    (6, 2, 15.0, 60, 1, [1, 2, 3, 4]),  # shorter than its parent's context (truncated): its own session
]


def _write(tmp_path: Path, rows: list[tuple] = ROWS) -> Path:  # type: ignore[type-arg]
    p = tmp_path / "qwen_trace_blksz_16.jsonl"
    keys = ("chat_id", "parent_chat_id", "timestamp", "input_length", "output_length", "hash_ids")
    p.write_text("".join(json.dumps({**dict(zip(keys, r, strict=True)), "type": "text", "turn": 1}) + "\n"
                         for r in rows))
    return p


def test_sessions_times_and_blocks_are_the_traces(tmp_path: Path) -> None:
    p = _write(tmp_path)
    assert detect_format(p) == "bailian"
    w = load_trace(p)
    assert w.fmt == "bailian" and w.requests == 6
    assert [[(u.append, u.gen, u.line) for u in t.turns] for t in w.trajectories] == [
        [(40, 10, 1), (30, 5, 3)], [(20, 4, 2)], [(60, 3, 4)], [(32, 2, 5)], [(60, 1, 6)]]
    assert [t.arrival for t in w.trajectories] == [0.0, 1.0, 3.0, 4.0, 5.0]  # seconds, not milliseconds
    assert [u.at for u in w.trajectories[0].turns] == [0.0, 2.0]
    assert {u.hash_block for t in w.trajectories for u in t.turns} == {16}
    assert "3 requests start a session of their own" in w.note and w.note.startswith("6 of 6 requests")
    # an unlimited content-keyed cache, by hand: 0 + 16 + 32 + 48 + 0 + 48 hit tokens of 292 input tokens
    assert ideal_hit_rate(w.trajectories) == pytest.approx(144 / 292)


def test_block_size_is_inferred_from_the_rows(tmp_path: Path) -> None:
    assert infer_hash_block([(40, 3), (20, 2), (80, 5), (1000, 63)]) == 16
    assert infer_hash_block([(1000, 2), (1500, 3), (511, 1)]) == 512
    assert infer_hash_block([]) == 512 and infer_hash_block([], default=16) == 16
    # a Mooncake-format file with 16-token blocks is read with 16 (it used to be taken as 512)
    rows = [{"timestamp": 0, "input_length": 40, "output_length": 1, "hash_ids": [1, 2, 3]},
            {"timestamp": 5, "input_length": 70, "output_length": 1, "hash_ids": [1, 2, 3, 4, 5]}]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert {u.hash_block for t in load_mooncake(p) for u in t.turns} == {16}
    assert {u.hash_block for t in load_mooncake(DATA / "mooncake_shared.jsonl") for u in t.turns} == {512}


def test_simulate_serves_a_bailian_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path)
    assert main(["simulate", "--preset", "tiny", "--trace", str(p), "--policy", "dualpath"]) == 0
    assert f"trace {p} (bailian): 6 of 6 requests" in capsys.readouterr().out


def test_bad_bailian_rows_name_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, [*ROWS[:2], (7, "x", 16.0, 10, 1, [1])])
    with pytest.raises(WorkloadError, match=r":3: field 'parent_chat_id' must be an integer"):
        load_trace(p)
    p = _write(tmp_path, [*ROWS[:1], (7, -1, 16.0, 0, 1, [1])])
    with pytest.raises(WorkloadError, match=r":2: field 'input_length' must be an integer >= 1"):
        load_trace(p, "bailian")
