"""JSONL and Mooncake trace loaders, including bad lines (file and line in the message)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualpath.errors import WorkloadError
from dualpath.workload import Trajectory, Turn, load_jsonl, load_mooncake, write_jsonl
from dualpath.workload.loaders import read_mooncake

DATA = Path(__file__).parent.parent / "data"


def test_load_jsonl_fixture() -> None:
    trajs = load_jsonl(DATA / "trajectories_small.jsonl")
    assert [t.tid for t in trajs] == [0, 1, 7]
    assert trajs[0].turns == [Turn(4, 1, [5, 6, 7, 8]), Turn(2, 3, [9, 10])]
    assert [u.append for u in trajs[1].turns] == [100, 50, 30] and trajs[1].turns[0].append_ids is None
    assert trajs[2].arrival == 2.5 and trajs[2].turns == []


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    trajs = [Trajectory(3, [Turn(2, 1, [1, 2]), Turn(5, 4)], arrival=1.25), Trajectory(4, [])]
    p = tmp_path / "t.jsonl"
    write_jsonl(trajs, p)
    assert load_jsonl(p) == trajs


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"turns": []}', "missing field 'id'"),
        ('{"id": 1}', "turns"),
        ('{"id": 1, "turns": [{"gen": 3}]}', r"turns\[0\]: missing field 'append'"),
        ('{"id": 1, "turns": [{"append": -2, "gen": 3}]}', "append"),
        ('{"id": 1, "turns": [{"append": 2, "gen": 3, "ids": [1]}]}', "ids"),
        ('{"id": 1, "arrival": "x", "turns": []}', "arrival"),
        ('{"id": 0, "turns": []}', "duplicate"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 0, "turns": [{"append": 1, "gen": 1}]}\n\n' + text + "\n")
    with pytest.raises(WorkloadError, match=match) as ei:
        load_jsonl(p)
    assert ei.value.path == str(p) and ei.value.line == 3
    assert f"{p}:3:" in str(ei.value)


def test_missing_file_is_workload_error(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot open"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_mooncake_groups_by_hash_prefix() -> None:
    trajs = load_mooncake(DATA / "mooncake_small.jsonl")
    got = [(t.arrival, [(u.append, u.gen) for u in t.turns]) for t in trajs]
    assert got == [
        # [1,2,3] -> [1,2,4] (extends full blocks [1,2]; 1500 - (1100 + 50) = 350 appended)
        (0.0, [(1100, 50), (1500 - 1150, 30)]),
        # [1,9] -> [1,5] -> [1,2,8]: each extends the previous full block [1]; [1,2,8] cannot continue the first
        # trajectory because 1400 < 1500 + 30
        (0.0, [(700, 20), (900 - 720, 10), (1400 - 910, 5)]),
        (2.5, [(400, 5)]),
    ]
    for t in trajs:  # prompts reproduce the trace's input lengths
        assert t.prompt_len(len(t.turns) - 1) <= 1500


def test_mooncake_ids_share_prefixes() -> None:
    trajs = load_mooncake(DATA / "mooncake_small.jsonl", with_ids=True, vocab_size=100)
    a, b = trajs[0].turns[0].append_ids, trajs[1].turns[0].append_ids
    assert a is not None and b is not None and len(a) == 1100 and len(b) == 700
    assert a[:512] == b[:512] and a[512:700] != b[512:700]  # shared hash id 1, then 2 vs 9
    assert all(u.append_ids is not None and len(u.append_ids) == u.append for t in trajs for u in t.turns)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "delay": 5}', "not both"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "text_input": "hi"}', "exactly one of"),
        ('{"input_length": 10, "output_length": 1, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": 0, "output_length": 1, "hash_ids": [1]}', "input_length"),
        ('{"timestamp": 0, "input_length": 10, "output_length": "x", "hash_ids": [1]}', "output_length"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, true]}', "hash_ids"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2.5]}', "hash_ids"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": 7}', "hash_ids"),
        ("{,}", "not valid JSON"),
    ],
)
def test_mooncake_bad_line(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "trace.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n' + text + "\n")
    with pytest.raises(WorkloadError, match=match) as ei:
        load_mooncake(p)
    assert ei.value.line == 2 and str(p) in str(ei.value)


def test_real_world_file_variants_load_like_the_clean_file(tmp_path: Path) -> None:
    """A UTF-8 byte-order mark, CRLF line ends, blank lines, no final newline, extra keys, float and unsorted
    timestamps: the same requests as the clean file (both formats)."""
    rows = ['{"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [1, 2, 3]}',
            '{"timestamp": 27, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]}',
            '{"timestamp": 3000, "input_length": 1500, "output_length": 12, "hash_ids": [1, 2, 4]}']
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(rows) + "\n")
    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join([rows[2].replace('"timestamp": 3000', '"timestamp": 3000.0'),
                                                         rows[0], rows[1][:-1] + ', "extra": {"k": 1}}'])
                      .encode())
    want = [(r.t, r.input_len, r.output_len, r.hash_ids) for r in read_mooncake(clean)]
    assert [(r.t, r.input_len, r.output_len, r.hash_ids) for r in read_mooncake(messy)] == want
    assert [len(t.turns) for t in load_mooncake(messy)] == [len(t.turns) for t in load_mooncake(clean)]
    ours = tmp_path / "ours.jsonl"
    ours.write_bytes(b'\xef\xbb\xbf{"id": 0, "turns": [{"append": 30, "gen": 3}]}\r\n\r\n'
                     b'{"id": 1, "turns": [{"append": 20, "gen": 2}]}')
    assert [[(u.append, u.gen) for u in t.turns] for t in load_jsonl(ours)] == [[(30, 3)], [(20, 2)]]
    with pytest.raises(WorkloadError, match="--trace-format mooncake") as ei:
        load_jsonl(messy)  # a Mooncake file read as our format: the error says which format it is
    assert ei.value.line == 1
    # a BOM anywhere but the start of the file is still an error naming the line
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(rows[0].encode() + b"\n\xef\xbb\xbf" + rows[1].encode() + b"\n")
    with pytest.raises(WorkloadError) as ei:
        read_mooncake(bad)
    assert ei.value.line == 2


def test_a_traces_repeated_hash_ids_share_one_object_per_value(tmp_path):
    """Rows repeat their prefixes' ids; the loaders keep one int object per distinct id (a long trace's ids then
    cost a list slot each), and the values are the file's."""
    from dualpath.workload.loaders import load_bailian

    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [70001, 70002]}\n'
                  '{"timestamp": 5, "input_length": 1500, "output_length": 5, "hash_ids": [70001, 70002, 70003]}\n')
    a, b = read_mooncake(mc)
    assert (a.hash_ids, b.hash_ids) == ([70001, 70002], [70001, 70002, 70003])
    assert a.hash_ids[0] is b.hash_ids[0] and a.hash_ids[1] is b.hash_ids[1]
    bl = tmp_path / "bl.jsonl"
    bl.write_text('{"chat_id": 1, "parent_chat_id": -1, "timestamp": 0, "input_length": 32, "output_length": 4, '
                  '"hash_ids": [90001, 90002]}\n{"chat_id": 2, "parent_chat_id": -1, "timestamp": 1, '
                  '"input_length": 48, "output_length": 4, "hash_ids": [90001, 90002, 90003]}\n')
    trajs, _ = load_bailian(bl)
    x, y = (t.turns[0].hash_ids for t in trajs)
    assert x == [90001, 90002] and y == [90001, 90002, 90003] and x[0] is y[0] and x[1] is y[1]
    from dualpath.workload.traces import load_trace

    ses = tmp_path / "sessions.jsonl"  # (AIPerf's Mooncake rows with sessions)
    ses.write_text('{"session_id": "a", "timestamp": 0, "input_length": 1000, "output_length": 5, '
                   '"hash_ids": [80001, 80002]}\n{"session_id": "b", "timestamp": 1, "input_length": 1000, '
                   '"output_length": 5, "hash_ids": [80001, 80003]}\n')
    u, v = (t.turns[0].hash_ids for t in load_trace(str(ses)).trajectories)
    assert (u, v) == ([80001, 80002], [80001, 80003]) and u[0] is v[0]
