"""Agentic coding traces in the kv-cache-tester ("Weka") format, and traces given as a folder of shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dualpath.errors import WorkloadError
from dualpath.workload.traces import ideal_hit_rate, load_trace, trace_stats

BLOCK = 64


def _ids(n_tokens: int, shared: list[int], fresh: int) -> list[int]:
    """Hash ids of a prompt of ``n_tokens``: the ``shared`` prefix's, then new ids from ``fresh`` on."""
    n = -(-n_tokens // BLOCK)
    return (shared + list(range(fresh, fresh + n)))[:n]


def conversation(cid: str = "cc-1", scope: str = "local") -> dict[str, Any]:
    """A main chain of three calls (each prompt = the previous prompt + its output + new input), a side call on
    another model, and a subagent of two calls timed relative to its spawn."""
    c1 = _ids(1200, [], 1)
    c2 = _ids(1600, c1[: 1200 // BLOCK], 1000)
    c3 = _ids(2000, c2[: 1600 // BLOCK], 2000)
    s1 = _ids(700, c1[:4], 3000)  # the subagent shares the system prompt's first blocks
    s2 = _ids(900, s1[: 700 // BLOCK], 4000)
    return {"id": cid, "models": ["big", "small"], "block_size": BLOCK, "hash_id_scope": scope,
            "tool_tokens": 100, "system_tokens": 156,
            "requests": [
                {"t": 0.0, "type": "s", "model": "big", "in": 1200, "out": 100, "hash_ids": c1, "api_time": 2.0},
                {"t": 0.4, "type": "n", "model": "small", "in": 150, "out": 9, "hash_ids": [9000, 9001, 9002]},
                {"t": 5.0, "type": "s", "model": "big", "in": 1600, "out": 50, "hash_ids": c2, "think_time": 1.0},
                {"t": 9.0, "type": "subagent", "agent_id": "agent_001", "subagent_type": "Explore",
                 "status": "completed", "models": ["big"], "duration_ms": 6000,
                 "requests": [{"t": 0.0, "type": "s", "model": "big", "in": 700, "out": 30, "hash_ids": s1},
                              {"t": 2.5, "type": "s", "model": "big", "in": 900, "out": 20, "hash_ids": s2}]},
                {"t": 20.0, "type": "s", "model": "big", "in": 2000, "out": 70, "hash_ids": c3},
            ]}


def test_a_conversations_calls_are_grouped_into_sessions(tmp_path: Path) -> None:
    p = tmp_path / "trace.json"
    p.write_text(json.dumps(conversation(), indent=2))  # pretty-printed, as kv-cache-tester writes one
    w = load_trace(p)
    assert w.fmt == "weka" and w.requests == 6
    shape = sorted([(t.arrival, [(u.append, u.gen, u.at) for u in t.turns]) for t in w.trajectories])
    assert shape == [
        (0.0, [(1200, 100, 0.0), (1600 - 1300, 50, 5.0), (2000 - 1650, 70, 20.0)]),  # the main chain
        (0.4, [(150, 9, 0.4)]),  # the side call: a session of its own
        (9.0, [(700, 30, 9.0), (900 - 730, 20, 11.5)]),  # the subagent, its times from its spawn
    ]
    # every turn keeps its whole prompt's content keys, so the subagent's first call hits the shared blocks
    main = next(t for t in w.trajectories if t.arrival == 0.0)
    assert [len(u.hash_ids or []) for u in main.turns] == [19, 25, 32]
    assert ideal_hit_rate(w.trajectories) > 0


def test_local_hash_ids_belong_to_their_conversation(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(conversation()) + "\n")
    alone = ideal_hit_rate(load_trace(one).trajectories)
    two = tmp_path / "two.jsonl"  # one conversation per line (how a Parquet dataset of them is read)
    two.write_text(json.dumps(conversation("cc-1")) + "\n" + json.dumps(conversation("cc-2")) + "\n")
    w = load_trace(two)
    assert w.fmt == "weka" and len(w.trajectories) == 6
    # the same raw ids in another conversation are other content: nothing is reused across them
    assert ideal_hit_rate(w.trajectories) == pytest.approx(alone)
    glob = tmp_path / "global.json"  # a JSON array of conversations whose ids are global: the second reuses all
    glob.write_text(json.dumps([conversation("g-1", "global"), conversation("g-2", "global")]))
    assert ideal_hit_rate(load_trace(glob).trajectories) > alone + 0.2


def test_a_parquet_dataset_of_conversations(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [conversation("cc-1"), conversation("cc-2")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    w = load_trace(tmp_path / "train-00000-of-00001.parquet")
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want = load_trace(jsonl)
    assert w.fmt == "weka"
    assert [[(u.append, u.gen, u.at, u.hash_ids) for u in t.turns] for t in w.trajectories] == \
        [[(u.append, u.gen, u.at, u.hash_ids) for u in t.turns] for t in want.trajectories]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(block_size=0), "conversation 'cc-1': field 'block_size' must be an integer >= 1"),
        (lambda c: c.update(hash_id_scope="shared"), "'hash_id_scope' must be 'local' or 'global'"),
        (lambda c: c.pop("requests"), "missing field 'requests'"),
        (lambda c: c["requests"][2].update(type="x"), r"request #2: field 'type' must be 'n', 's' or 'subagent'"),
        (lambda c: c["requests"][0].pop("in"), r"request #0: missing field 'in'"),
        (lambda c: c["requests"][0].update(out=-1), r"request #0: field 'out' must be an integer >= 0"),
        (lambda c: c["requests"][0].update(hash_ids=["a"]), "'hash_ids' must be a list of integers"),
        (lambda c: c["requests"][0].update(t="soon"), r"request #0: field 't' must be a number"),
        (lambda c: c["requests"][3].pop("requests"), r"request #3: a subagent needs 'requests'"),
        (lambda c: c["requests"][3]["requests"][1].pop("t"), r"request #3, call #1: missing field 't'"),
    ],
)
def test_bad_conversations_name_the_line_and_request(tmp_path: Path, edit: Any, match: str) -> None:
    good, bad = conversation("cc-0"), conversation("cc-1")
    edit(bad)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(WorkloadError, match=match) as ei:
        load_trace(p, "weka")
    assert ei.value.line == 2 and str(p) in str(ei.value)


def test_a_folder_of_shards_is_one_trace(tmp_path: Path) -> None:
    d = tmp_path / "dataset"
    (d / "data").mkdir(parents=True)
    (d / "README.md").write_text("# a dataset card\n")
    (d / ".cache").mkdir()
    (d / ".cache" / "junk.json").write_text("not a trace")
    for k in range(3):
        (d / "data" / f"conv-{k}.json").write_text(json.dumps(conversation(f"cc-{k}"), indent=1))
    w = load_trace(d)
    assert w.fmt == "weka" and w.requests == 18 and w.requests_in_file == 18 and w.sessions_in_file == 9
    assert [t.tid for t in w.trajectories] == list(range(9))  # renumbered: every session its own agent
    assert "3 files" in w.note
    single = load_trace(d / "data" / "conv-0.json")
    assert ideal_hit_rate(w.trajectories) == pytest.approx(ideal_hit_rate(single.trajectories))
    assert load_trace(d, max_agents=2).requests == 3 + 1 and trace_stats(d)["requests"] == 18
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("nothing here")
    with pytest.raises(WorkloadError, match="a folder without trace files"):
        load_trace(empty)
