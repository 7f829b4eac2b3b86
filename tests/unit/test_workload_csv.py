"""CSV request traces (Azure LLM inference and BurstGPT column names) and the trace format told from the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dualpath.cli import main
from dualpath.errors import WorkloadError
from dualpath.workload.csvtrace import detect_format
from dualpath.workload.traces import ideal_hit_rate, load_trace

DATA = Path(__file__).parent.parent / "data"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:50.1000000,1200,40
2023-11-16 18:15:46.6805900,4808,10
2023-11-16 18:15:47.0000000,3180,8
"""
BURST = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,0,0,0,Conversation log
118,GPT-4,1087,136,1223,API log
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_azure_rows_are_one_turn_sessions_in_time_order(tmp_path: Path) -> None:
    w = load_trace(_write(tmp_path, "azure.csv", AZURE))  # auto
    assert w.fmt == "csv" and w.requests == 3 and len(w.trajectories) == 3
    got = [(t.turns[0].append, t.turns[0].gen, t.turns[0].line) for t in w.trajectories]
    assert got == [(4808, 10, 3), (3180, 8, 4), (1200, 40, 2)]  # sorted by time, each row keeps its line
    assert [t.arrival for t in w.trajectories] == pytest.approx([0.0, 0.31941, 3.41941])
    assert ideal_hit_rate(w.trajectories) == 0.0  # no content in the trace: no reuse is invented


def test_burstgpt_zero_token_rows_are_skipped_and_said(tmp_path: Path) -> None:
    w = load_trace(_write(tmp_path, "burst.csv", BURST), "csv")
    assert [t.turns[0].append for t in w.trajectories] == [472, 1087]
    assert [t.arrival for t in w.trajectories] == [0.0, 113.0]
    assert w.note == "2 of 2 requests (every request, 1 row with 0 input tokens skipped (line 3))"


def test_simulate_and_stats_take_a_csv_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write(tmp_path, "burst.csv", BURST)
    assert main(["simulate", "--preset", "tiny", "--trace", str(p), "--policy", "dualpath"]) == 0
    out = capsys.readouterr().out
    assert f"trace {p} (csv): 2 of 2 requests" in out
    assert main(["trace", "stats", str(p), "--json", str(tmp_path / "s.json")]) == 0
    import json

    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["format"], s["requests"], s["total_input_tokens"]) == ("csv", 2, 472 + 1087)


def test_run_prepares_a_csv_trace(tmp_path: Path) -> None:
    from dualpath.runtime.app import RunRequest, describe, prepare

    conf = _write(tmp_path, "c.yaml", f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    cfg, _, trajs = prepare(RunRequest(config=str(conf), trace=str(_write(tmp_path, "a.csv", AZURE))))
    assert sum(t.n_turns for t in trajs) == 3 and cfg.model.max_context >= 4808 + 10
    assert "(csv: 3 of 3 requests" in describe(cfg, trajs, ["dualpath"])


def test_format_is_told_from_the_first_line(tmp_path: Path) -> None:
    assert detect_format(DATA / "mooncake_shared.jsonl") == "mooncake"
    jl = _write(tmp_path, "t.jsonl", '\n{"id": 0, "turns": [{"append": 5, "gen": 2}]}\n')
    assert detect_format(jl) == "jsonl"
    assert load_trace(jl).trajectories[0].turns[0].append == 5
    assert load_trace(DATA / "mooncake_shared.jsonl").requests == load_trace(DATA / "mooncake_shared.jsonl",
                                                                              "mooncake").requests
    with pytest.raises(WorkloadError, match=r"x\.json:1: cannot tell the trace's format .*pass --trace-format"):
        detect_format(_write(tmp_path, "x.json", '{"query": "hi"}\n'))
    assert detect_format(_write(tmp_path, "p.jsonl", '{"prompt": "hi", "output_len": 4}\n')) == "sharegpt"
    with pytest.raises(WorkloadError, match="cannot tell the trace's format"):
        load_trace(_write(tmp_path, "y.csv", "a,b,c\n1,2,3\n"))


@pytest.mark.parametrize(("text", "where", "what"), [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,10,2\n2,ten,2\n", ":3:", "column 'ContextTokens': 'ten'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,2\n", ":2:", "neither seconds nor an ISO date-time"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,10\n", ":2:", "2 cells, the header has 3"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,-4,2\n", ":2:", "an integer >= 0"),
    ("TIMESTAMP,ContextTokens,Tokens\n1,10,2\n", ":1:", "no output-token column"),
])
def test_bad_csv_exits_2_naming_file_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                                     where: str, what: str) -> None:
    p = _write(tmp_path, "bad.csv", text)
    assert main(["trace", "stats", str(p), "--trace-format", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{p}{where}" in err and what in err and len(err.splitlines()) == 1


def test_a_prefix_is_kept_while_reading_and_equals_the_sorted_file(tmp_path: Path) -> None:
    # rows out of time order, ties included: the first k kept while reading (memory bounded by k) are exactly the
    # first k of the whole file sorted by (time, line), re-based on the earliest time
    import random

    from dualpath.workload.csvtrace import load_csv

    rng = random.Random(3)
    lines = ["timestamp,input_tokens,output_tokens"]
    lines += [f"{rng.choice([5, 7, 7.5, 9, 12, 30])},{rng.randint(1, 900)},{rng.randint(1, 50)}" for _ in range(60)]
    lines.insert(20, "8,0,0")  # a failed request: skipped, not counted
    p = _write(tmp_path, "shuffled.csv", "\n".join(lines) + "\n")
    whole = load_csv(p)
    assert whole.rows == 60 and whole.skipped_lines == [21]

    def rows(trajs):  # type: ignore[no-untyped-def]
        return [(t.tid, t.arrival, t.turns[0].append, t.turns[0].gen, t.turns[0].line) for t in trajs]

    for k in (1, 2, 17, 59, 60, 100):
        part = load_csv(p, max_requests=k)
        assert part.rows == 60 and part.kept_prefix and rows(part.trajectories) == rows(whole.trajectories[:k]), k
    w = load_trace(p, "csv", max_requests=17)
    assert w.requests == 17 and w.requests_in_file == 60 and "17 of 60 requests (first 17 requests" in w.note


BURST_V2 = """Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type
5,s1,2.1,ChatGPT,400,50,450,Conversation log
7,,0.9,GPT-4,300,20,320,API log
9,s2,1.0,ChatGPT,100,10,110,Conversation log
30,s1,3.3,ChatGPT,520,40,560,Conversation log
31,s2,1.2,ChatGPT,60,5,65,Conversation log
40,s1,2.0,ChatGPT,0,0,0,Conversation log
50,s1,4.0,ChatGPT,700,30,730,Conversation log
"""


def test_a_session_column_groups_rows_into_conversations(tmp_path: Path) -> None:
    # BurstGPT v2: rows sharing a Session ID are one conversation; a follow-up whose prompt holds the conversation
    # so far appends the difference (s1: 400+50 -> 520 appends 70; 520+40 -> 700 appends 140); s2's second prompt
    # (60) cannot hold its first turn (100+10): no reuse is assumed, it is a session of its own; the API row
    # (no session) is one turn; the failed row (0 tokens) is skipped
    p = _write(tmp_path, "burst_v2.csv", BURST_V2)
    w = load_trace(p)
    assert w.fmt == "csv" and w.requests == 6 and w.requests_in_file == 6
    got = [[(u.append, u.gen, u.at, u.line) for u in t.turns] for t in w.trajectories]
    assert got == [[(400, 50, 0.0, 2), (70, 40, 25.0, 5), (140, 30, 45.0, 8)],
                   [(300, 20, 2.0, 3)], [(100, 10, 4.0, 4)], [(60, 5, 26.0, 6)]]
    assert [t.arrival for t in w.trajectories] == [0.0, 2.0, 4.0, 26.0]
    assert "1 row with 0 input tokens skipped (line 7)" in w.note and "1 row starts a session of their own" in w.note
    # the session's own context is reused: 450 and 560 tokens in whole 64-token blocks, of 2,080 prompt tokens
    assert ideal_hit_rate(w.trajectories) == pytest.approx((448 + 512) / (400 + 300 + 100 + 520 + 60 + 700))
    # a prefix of rows is a prefix of requests; --agents takes whole sessions
    w2 = load_trace(p, max_requests=4)
    assert w2.requests == 4 and [t.n_turns for t in w2.trajectories] == [2, 1, 1]
    w3 = load_trace(p, max_agents=1)
    assert w3.requests == 3 and "first 1 of 4 sessions" in w3.note


@pytest.mark.parametrize("sessions", [False, True])
def test_csv_stats_in_one_pass_equal_the_trajectories_stats(tmp_path: Path, sessions: bool) -> None:
    # `dualpath trace stats` reads a CSV in one pass, without trajectories (a week-long trace has tens of millions
    # of rows); every number must be the one the trajectories load_csv makes give: rows out of time order, equal
    # times, 0-input rows (skipped), 0-output rows, follow-ups, restarts, empty session cells, equal largest turns
    import random

    from dualpath.workload.traces import _workload_stats, trace_stats

    rng = random.Random(3)
    lines = ["TIMESTAMP,Session ID,ContextTokens,GeneratedTokens"]
    ctx: dict[str, int] = {}
    for _ in range(400):
        sid = rng.choice(["", "a", "b", "c", "d", "e"]) if sessions else ""
        base = ctx.get(sid, 0)
        inp = rng.choice([0, 5, base + rng.randint(0, 300), base + rng.randint(0, 300), 700])
        out = rng.choice([0, 1, rng.randint(1, 200)])
        ctx[sid] = inp + out
        lines.append(f"{rng.choice([1.0, 2.5, rng.uniform(0, 100)]):.3f},{sid},{inp},{out}")
    text = "\n".join(lines) + "\n"
    if not sessions:
        text = "\n".join(",".join(c for k, c in enumerate(r.split(",")) if k != 1) for r in text.splitlines()) + "\n"
    f = _write(tmp_path, "t.csv", text)
    fast = trace_stats(f)
    slow = _workload_stats(load_trace(f, "csv"))
    skipped = fast.pop("skipped_rows")  # (only the one-pass reader sees the rows it skips)
    assert fast == slow
    assert skipped == {"zero_input": sum(1 for r in lines[1:] if r.split(",")[2] == "0"), "failed": 0}
    assert fast["requests"] == sum(1 for r in lines[1:] if r.split(",")[2] != "0")
    if sessions:
        assert fast["sessions"] < fast["requests"] and fast["ideal_hit_rate"] > 0
