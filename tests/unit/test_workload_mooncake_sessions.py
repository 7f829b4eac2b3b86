"""Mooncake-format rows as benchmark tools write them (AIPerf's ``mooncake_trace``): ``session_id`` sessions whose
rows are each turn's new input, ``delay`` think times, ``text_input`` and chat ``messages`` inputs, ``tools``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dualpath.errors import WorkloadError
from dualpath.workload.loaders import load_jsonl, load_mooncake_trace, write_jsonl
from dualpath.workload.mooncake_sessions import load_session_rows
from dualpath.workload.traces import ideal_hit_rate, load_trace, trace_stats


def words(texts: list[str]) -> list[int]:
    """A token counter independent of any tokenizer: words."""
    return [len(t.split()) for t in texts]


def _write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _objs(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return list(enumerate(rows, start=1))


def test_session_rows_are_each_turns_new_input_with_think_times(tmp_path: Path) -> None:
    rows = [{"session_id": "abc", "timestamp": 1000, "input_length": 600, "output_length": 40, "hash_ids": [1, 2]},
            {"session_id": "abc", "delay": 2000, "input_length": 150, "output_length": 20, "hash_ids": [9]},
            {"session_id": "x", "timestamp": 1500, "input_length": 600, "output_length": 5, "hash_ids": [1, 3]}]
    trajs, restarted = load_mooncake_trace(_write(tmp_path, rows))
    assert restarted == 0 and len(trajs) == 2
    a, x = trajs
    assert [(u.append, u.gen, u.at, u.think) for u in a.turns] == [(600, 40, 0.0, None), (150, 20, None, 2.0)]
    assert a.prompt_len(1) == 600 + 40 + 150  # the session's history, then the row's new input
    # a first turn's hash ids are its prompt's content; a later turn's describe only its new input
    assert a.turns[0].hash_ids == [1, 2] and a.turns[1].hash_ids is None
    assert (x.arrival, x.turns[0].at, x.turns[0].hash_ids) == (0.5, 0.5, [1, 3])
    assert [u.line for t in trajs for u in t.turns] == [1, 2, 3]
    # hand-computed: A1 600 (stores block 1); A2 790 reuses its session's 640 in 64-token blocks; X1 600 hits
    # block 1 across sessions (512)
    assert ideal_hit_rate(trajs) == pytest.approx((640 + 512) / (600 + 790 + 600))


def test_session_rows_that_repeat_the_whole_prompt_are_read_as_whole_prompts(tmp_path: Path) -> None:
    """Mooncake's own convention with a session id added (each row its whole prompt, hash ids extending the
    previous prompt's): the row appends the difference and keeps its content keys; a delta row does not."""
    rows = [{"session_id": "w", "timestamp": 0, "input_length": 1100, "output_length": 50, "hash_ids": [1, 2, 3]},
            {"session_id": "w", "timestamp": 9000, "input_length": 1700, "output_length": 10,
             "hash_ids": [1, 2, 4, 5]},
            {"session_id": "w", "timestamp": 20000, "input_length": 300, "output_length": 10, "hash_ids": [8]}]
    (w,), _ = load_mooncake_trace(_write(tmp_path, rows))
    assert [(u.append, u.hash_ids) for u in w.turns] == [(1100, [1, 2, 3]), (1700 - 1150, [1, 2, 4, 5]),
                                                         (300, None)]
    assert w.prompt_len(1) == 1700 and w.prompt_len(2) == 1700 + 10 + 300


def test_history_messages_reuse_their_session_and_a_rewritten_history_starts_over() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    sys_, ask = {"role": "system", "content": "you help people"}, {"role": "user", "content": "where is it"}
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "it ships on monday"}
    rows = [
        {"session_id": "s1", "messages": [sys_, ask], "tools": tools, "output_length": 5},
        {"session_id": "s2", "messages": [{"role": "user", "content": "hi"}], "output_length": 2, "delay": None},
        {"session_id": "s1", "messages": [sys_, ask, call, result], "tools": tools, "output_length": 7,
         "delay": 250},
        {"session_id": "s1", "messages": [sys_, {"role": "user", "content": "summary of it all"}],
         "output_length": 3, "delay": 10},  # compacted: does not extend the previous row's history
    ]
    st = load_session_rows(_objs(rows), "t.jsonl", count_tokens=words)
    assert st.restarted == 1
    s1, s1b, s2 = st.trajectories  # sessions in order of first appearance; the restart after its session
    assert [(u.append, u.gen, u.think) for u in s1.turns] == [
        (3 + 3 + len(json.dumps(tools).split()), 5, None),  # system + user + the tools' JSON
        (4, 7, 0.25),  # the tool result only: the recorded tool call is the previous turn's reply (generated)
    ]
    assert [(u.append, u.gen, u.think) for u in s1b.turns] == [(3 + 4, 3, 0.01)]
    assert [(u.append, u.gen) for u in s2.turns] == [(1, 2)]
    assert [u.line for u in s1.turns + s1b.turns + s2.turns] == [1, 3, 4, 2]


def test_delta_messages_and_text_inputs() -> None:
    rows = [
        {"session_id": "d", "message_mode": "delta", "output_length": 4,
         "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]},
        {"session_id": "d", "message_mode": "delta", "output_length": 6, "delay": 1000,
         "messages": [{"role": "assistant", "content": "a recorded reply"}, {"role": "user", "content": "four"}]},
        {"session_id": "t", "text_input": "tell me a story", "output_length": 9},
        {"session_id": "t", "text_input": "shorter", "output_length": 2, "delay": 0},
        {"text_input": "a lone request", "output_length": 1},
    ]
    d, t, lone = load_session_rows(_objs(rows), "t.jsonl", count_tokens=words).trajectories
    assert [(u.append, u.gen) for u in d.turns] == [(2 + 3, 4), (1, 6)]
    assert [(u.append, u.gen, u.think) for u in t.turns] == [(4, 9, None), (1, 2, 0.0)]
    assert [(u.append, u.gen) for u in lone.turns] == [(3, 1)]


def test_text_is_counted_in_tokens_of_the_embedded_tokenizer(tmp_path: Path) -> None:
    from dualpath.api import load_tokenizer

    tok = load_tokenizer(None)
    texts = ["Tell me a story about a dragon.", "Summarize this, please: tokens are not words."]
    p = _write(tmp_path, [{"session_id": 7, "text_input": texts[0], "output_length": 50, "timestamp": 0},
                          {"session_id": 7, "text_input": texts[1], "output_length": 30, "delay": 100}])
    w = load_trace(p)
    assert w.fmt == "mooncake" and w.requests == 2 and w.sessions_in_file == 1
    want = [len(tok(x, add_special_tokens=False)["input_ids"]) for x in texts]
    assert [u.append for u in w.trajectories[0].turns] == want


def test_chat_message_rows_are_told_from_conversation_datasets(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    p = _write(tmp_path, [{"session_id": "s", "messages": msgs, "output_length": 50, "timestamp": 0},
                          {"session_id": "s", "messages": msgs + [{"role": "assistant", "content": "Hi!"},
                                                                   {"role": "user", "content": "How are you?"}],
                           "output_length": 30, "timestamp": 2000}])
    w = load_trace(p)  # not a conversation dataset: a request per row, with its output length
    assert w.fmt == "mooncake" and w.requests == 2 and len(w.trajectories) == 1
    assert [u.at for u in w.trajectories[0].turns] == [0.0, 2.0]
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"messages": msgs + [{"role": "assistant", "content": "Hi!"}]}) + "\n")
    assert load_trace(conv).fmt == "sharegpt"


def test_rows_without_hash_ids_share_no_content(tmp_path: Path) -> None:
    # two unrelated requests of the same length: no hash ids, so no block is assumed equal (the blocks past a
    # hash-id list are shared by every prompt that long, which must not apply to rows that have no list at all)
    rows = [{"timestamp": 0, "input_length": 1200, "output_length": 5},
            {"timestamp": 10, "input_length": 1200, "output_length": 5}]
    w = load_trace(_write(tmp_path, rows))
    assert [len(t.turns) for t in w.trajectories] == [1, 1]
    assert all(u.hash_ids is None for t in w.trajectories for u in t.turns)
    assert ideal_hit_rate(w.trajectories) == 0.0
    # no timestamps at all: file order, no trace times; a timestamp on some rows only is an error
    untimed = [{"input_length": 600, "output_length": 1, "hash_ids": [1, 2]},
               {"input_length": 500, "output_length": 1, "hash_ids": [1]}]
    w = load_trace(_write(tmp_path, untimed, "u.jsonl"))
    assert [(t.turns[0].append, t.turns[0].at) for t in w.trajectories] == [(600, None), (500, None)]
    with pytest.raises(WorkloadError, match=r"m\.jsonl:2: field 'timestamp' on a row when the first row has none"):
        load_trace(_write(tmp_path, [untimed[0], {**untimed[1], "timestamp": 5}], "m.jsonl"))


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"payload": {"messages": []}, "output_length": 1}, "'payload' row"),
        ({"session_id": "a", "input_length": 5, "output_length": 1, "timestamp": 0, "delay": 1}, "not both"),
        ({"session_id": "a", "output_length": 1}, "exactly one of"),
        ({"session_id": "a", "input_length": 5, "text_input": "x", "output_length": 1}, r"got input_length, text_in"),
        ({"session_id": "a", "text_input": "x", "hash_ids": [1], "output_length": 1}, "'hash_ids' goes with"),
        ({"session_id": "a", "input_length": 5, "output_length": 1, "delay": -3}, "'delay' must be a number >= 0"),
        ({"session_id": "a", "input_length": 5, "output_length": 1, "delay": "soon"}, "'delay' must be a number"),
        ({"session_id": ["a"], "input_length": 5, "output_length": 1}, "'session_id' must be"),
        ({"session_id": "a", "messages": [], "output_length": 1}, "non-empty list"),
        ({"session_id": "a", "messages": [{"content": "x"}], "output_length": 1}, "message 0: missing the speaker"),
        ({"session_id": "a", "messages": [{"role": "user", "content": 3}], "output_length": 1},
         "message 0: message content must be text"),
        ({"session_id": "a", "messages": [{"role": "user", "content": "x"}], "message_mode": "diff",
          "output_length": 1}, "'message_mode' must be"),
        ({"session_id": "a", "input_length": 5, "message_mode": "delta", "output_length": 1}, "goes with 'messages'"),
        ({"session_id": "a", "input_length": 5}, "missing field 'output_length'"),
        ({"session_id": "a", "text_input": "x", "output_length": 1, "tools": {"name": "f"}}, "'tools' must be a list"),
        # a session's rows use one kind of input and one message mode
        ({"session_id": "s", "input_length": 5, "output_length": 1}, "mixes 'messages' rows"),
        ({"session_id": "s", "messages": [{"role": "user", "content": "x"}], "message_mode": "delta",
          "output_length": 1}, "mixes message modes"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path: Path, row: dict[str, Any], match: str) -> None:
    first = {"session_id": "s", "messages": [{"role": "user", "content": "hello"}], "output_length": 2}
    p = _write(tmp_path, [first, row])
    with pytest.raises(WorkloadError, match=match) as ei:
        load_trace(p)
    assert ei.value.line == 2 and str(p) in str(ei.value)


def test_an_aiperf_multi_turn_file_is_refused_with_what_to_write_instead(tmp_path: Path) -> None:
    p = _write(tmp_path, [{"session_id": "s", "turns": [{"text": "Hello", "delay": 0}, {"text": "Hi", "delay": 1000}]}])
    with pytest.raises(WorkloadError, match=r"t\.jsonl:1: an AIPerf multi_turn conversation .*'text_input'"):
        load_trace(p)


def test_think_times_round_trip_through_our_jsonl(tmp_path: Path) -> None:
    p = _write(tmp_path, [{"session_id": "a", "input_length": 50, "output_length": 3},
                          {"session_id": "a", "input_length": 20, "output_length": 3, "delay": 1500}])
    trajs = load_trace(p).trajectories
    out = tmp_path / "ours.jsonl"
    write_jsonl(trajs, out)
    back = load_jsonl(out)
    assert [(u.append, u.gen, u.think) for u in back[0].turns] == [(50, 3, None), (20, 3, 1.5)]
    out.write_text(json.dumps({"id": 0, "turns": [{"append": 5, "gen": 1, "think": -1}]}) + "\n")
    with pytest.raises(WorkloadError, match="'think' must be a number of seconds >= 0"):
        load_jsonl(out)


def test_a_prefix_of_a_trace_with_think_times_is_taken_in_send_order(tmp_path: Path) -> None:
    # session a: t=0, then 10 s of think; session b starts at 2 s: the first 2 requests are a's first and b's
    p = _write(tmp_path, [{"session_id": "a", "timestamp": 0, "input_length": 50, "output_length": 3},
                          {"session_id": "a", "input_length": 20, "output_length": 3, "delay": 10_000},
                          {"session_id": "b", "timestamp": 2000, "input_length": 60, "output_length": 4}])
    w = load_trace(p, max_requests=2)
    assert [(t.arrival, len(t.turns)) for t in w.trajectories] == [(0.0, 1), (2.0, 1)]


def test_trace_stats_report_sessions_and_think_times(tmp_path: Path) -> None:
    p = _write(tmp_path, [{"session_id": "a", "input_length": 50, "output_length": 3},
                          {"session_id": "b", "input_length": 60, "output_length": 4},
                          {"session_id": "a", "input_length": 20, "output_length": 3, "delay": 1500},
                          {"session_id": "a", "input_length": 10, "output_length": 9, "delay": 500}])
    s = trace_stats(p)
    assert (s["requests"], s["sessions"], s["think_turns"]) == (4, 2, 2)
    assert s["think_s"]["mean"] == pytest.approx(1.0)
    assert s["largest_turn"] == {"prompt": 50 + 3 + 20 + 3 + 10, "gen": 9, "tokens": 95, "session": 0, "turn": 2,
                                 "line": 4, } and not s["content_keys"]


def test_an_agentic_parquet_table_loads_as_sessions(tmp_path: Path) -> None:
    """The shape agentic traces are published in on the Hugging Face hub: session_id, messages (a list of
    structs), output_length, tools (null here) and delay (null on a session's first row)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    sys_ = {"role": "system", "content": "you are an agent"}
    q = {"role": "user", "content": "fix the bug"}
    r1 = {"role": "assistant", "content": "looking at it"}
    obs = {"role": "user", "content": "traceback line 3"}
    table = pa.Table.from_pylist([
        {"session_id": "e1", "messages": [sys_, q], "output_length": 12, "tools": None, "delay": None},
        {"session_id": "e1", "messages": [sys_, q, r1, obs], "output_length": 20, "tools": None, "delay": 4503.3},
        {"session_id": "e2", "messages": [sys_, q], "output_length": 8, "tools": None, "delay": None},
    ])
    pq.write_table(table, tmp_path / "agents.parquet")
    w = load_trace(tmp_path / "agents.parquet")
    assert w.fmt == "mooncake" and w.requests == 3 and len(w.trajectories) == 2
    e1 = w.trajectories[0]
    assert [u.gen for u in e1.turns] == [12, 20] and e1.turns[1].think == pytest.approx(4.5033)
    same = _write(tmp_path, table.to_pylist())  # the same rows as JSON lines load the same
    assert [[(u.append, u.gen) for u in t.turns] for t in load_trace(same).trajectories] == \
        [[(u.append, u.gen) for u in t.turns] for t in w.trajectories]


def test_a_flat_parquet_table_with_think_times_reads_as_mooncake_rows(tmp_path: Path) -> None:
    """Token counts, a session id and a delay per row: AIPerf's synthesized multi-turn rows (per-turn inputs),
    not a CSV request table (whose session rows repeat the conversation)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"session_id": "a", "input_length": 300, "output_length": 40, "delay": None},
            {"session_id": "a", "input_length": 150, "output_length": 20, "delay": 2000.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "flat.parquet")
    w = load_trace(tmp_path / "flat.parquet")
    assert w.fmt == "mooncake"
    assert [(u.append, u.gen, u.think) for u in w.trajectories[0].turns] == [(300, 40, None), (150, 20, 2.0)]


def test_online_replay_waits_the_think_time_after_the_previous_turn() -> None:
    import anyio

    from dualpath.runtime.clients import ClientResult, TurnOutcome, run_offline_into, run_online_into
    from dualpath.workload.trajectory import Trajectory, Turn

    sent: list[float] = []
    done: list[float] = []

    class Recorder:  # the TurnService protocol: records when each turn is sent and ends (30 ms per turn)
        async def run_turn(self, session: int, prompt_ids: np.ndarray, gen_tokens: int) -> TurnOutcome:
            sent.append(time.perf_counter())
            await anyio.sleep(0.03)
            now = time.perf_counter()
            done.append(now)
            return TurnOutcome(session, [7] * gen_tokens, len(prompt_ids), 0, now, now, None, now)

    agent = Trajectory(0, [Turn(10, 2), Turn(5, 2, think=0.2), Turn(5, 2, think=0.1)])
    res = ClientResult([], 0.0, 0.0, 0, 0)
    anyio.run(lambda: run_online_into(Recorder(), [agent], [0.0], res, vocab_size=100))
    assert sent[1] - done[0] >= 0.2 - 1e-3 and sent[2] - done[1] >= 0.1 - 1e-3
    # offline replay sends a session's next turn when its previous one ends: think times do not apply
    sent.clear()
    done.clear()
    slow = Trajectory(0, [Turn(10, 2), Turn(5, 2, think=30.0)])
    t0 = time.perf_counter()
    anyio.run(lambda: run_offline_into(Recorder(), [slow], ClientResult([], 0.0, 0.0, 0, 0), vocab_size=100))
    assert len(sent) == 2 and time.perf_counter() - t0 < 30.0


def test_the_simulator_waits_the_think_time_online_only(tmp_path: Path) -> None:
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    p = _write(tmp_path, [{"session_id": "a", "input_length": 2048, "output_length": 8},
                          {"session_id": "a", "input_length": 512, "output_length": 8, "delay": 100_000}])
    trajs = load_trace(p).trajectories
    online = scenario_from_preset("tiny", trajectories=trajs)
    online.mode = "online"
    sim = Simulation(online, get_policy("dualpath")).run()
    assert sim.completed == 2
    first_done = min(sim.rec_done)
    assert max(sim.rec_submit) == pytest.approx(first_done + 100.0)
    offline = Simulation(scenario_from_preset("tiny", trajectories=trajs), get_policy("dualpath")).run()
    assert max(offline.rec_submit) == pytest.approx(min(offline.rec_done))


def test_a_history_trace_is_read_as_it_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A history trace repeats each session's whole conversation on every row (its size grows with the square of
    the turns): it is read row by row, each row reduced to its new messages at once, so the memory it takes is a
    fraction of the file's size (held whole, as before, it took several times the file), with the same turns."""
    import random
    import tracemalloc

    rng = random.Random(0)
    vocab = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not"]

    def text(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    rows = []
    for s in range(40):
        hist: list[dict[str, Any]] = [{"role": "system", "content": text(60)}]
        for _ in range(12):
            hist = [*hist, {"role": "user", "content": text(110)}]
            rows.append({"session_id": f"s{s}", "messages": hist, "output_length": 50})
            hist = [*hist, {"role": "assistant", "content": text(100)}]
    p = _write(tmp_path, rows)
    import dualpath.workload.sharegpt as sharegpt

    monkeypatch.setattr(sharegpt, "default_counter", lambda: words)
    tracemalloc.start()
    try:
        trajs, restarted = load_mooncake_trace(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert restarted == 0 and len(trajs) == 40 and all(len(t.turns) == 12 for t in trajs)
    assert [u.append for u in trajs[0].turns] == [170] + [110] * 11  # system + user, then each new user message
    assert peak < 0.6 * p.stat().st_size, (peak, p.stat().st_size)
