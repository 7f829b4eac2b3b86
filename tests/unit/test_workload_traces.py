"""Traces served as they are: every request once (prefixes and copies only when asked), Mooncake hash ids as
content (reuse across sessions), online timestamps, the ideal hit rate, `dualpath trace stats`, bad files."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from dualpath.cli import main
from dualpath.errors import WorkloadError
from dualpath.workload import WorkloadConfig, build_workload
from dualpath.workload.traces import (
    COPY_SALT,
    _prefix_requests,
    hash_prompt_tokens,
    ideal_hit_rate,
    load_trace,
    synthetic_mooncake,
    trace_stats,
)

DATA = Path(__file__).parent.parent / "data"
SHARED = DATA / "mooncake_shared.jsonl"  # 4 requests, 3 sessions; a 2-block system prompt shared by all
# hand-computed ideal (requests in time order, each storing its full input blocks on arrival):
# A [1,2,3,4] 0; B [1,2,5] 1024; C [1,2,6] 1024; A2 [1,2,3,4,7,8] 2048 -> 4096 of 7248 input tokens
IDEAL_SHARED = 4096 / 7248


def test_every_request_served_once_without_cycling() -> None:
    w = load_trace(SHARED, "mooncake")
    assert w.requests == 4 and w.requests_in_file == 4 and w.note.endswith("(every request)")
    assert [[(u.append, u.gen) for u in t.turns] for t in w.trajectories] == [
        [(2048, 16), (2564 - 2064, 4)], [(1536, 8)], [(1100, 4)]]
    # a generator's agent count does not cycle a trace up to it
    trajs = build_workload(WorkloadConfig(trace=str(SHARED), trace_format="mooncake", n_agents=50))
    assert sum(t.n_turns for t in trajs) == 4


def test_prefix_and_repeat_are_explicit() -> None:
    w = load_trace(SHARED, "mooncake", max_requests=2)
    assert w.requests == 2 and "first 2 requests" in w.note
    assert sorted(u.at for t in w.trajectories for u in t.turns) == [0.0, 0.0]  # the first two in time order
    r = load_trace(SHARED, "mooncake", repeat=3)
    assert r.requests == 12 and "repeated 3x" in r.note
    ids = [u.hash_ids for t in r.trajectories for u in t.turns]
    assert ids[4][0] == 1 + COPY_SALT and ids[8][0] == 1 + 2 * COPY_SALT  # copies share no content
    assert ideal_hit_rate(r.trajectories) == pytest.approx(IDEAL_SHARED)
    span = max(u.at for t in r.trajectories for u in t.turns if u.at is not None)
    assert span > 2 * 40.0  # copies follow each other online


def test_hash_ids_are_content_across_sessions() -> None:
    w = load_trace(SHARED, "mooncake")
    a, b = w.trajectories[0].turns[0], w.trajectories[1].turns[0]
    ta = hash_prompt_tokens(a.hash_ids, 2048, 512, 1000)
    tb = hash_prompt_tokens(b.hash_ids, 1536, 512, 1000)
    assert np.array_equal(ta[:1024], tb[:1024]) and not np.array_equal(ta[1024:1536], tb[1024:1536])
    assert ta.min() >= 1 and ta.max() < 1000
    # a reference: each block is numpy's generator seeded with the hash id
    ref = np.random.default_rng(2).integers(1, 1000, size=512, dtype=np.int64)
    assert np.array_equal(ta[512:1024], ref)
    assert ideal_hit_rate(w.trajectories) == pytest.approx(IDEAL_SHARED)


def test_blocks_past_a_short_hash_id_list_are_each_requests_own() -> None:
    """A trace listing fewer hash ids than its prompts have blocks says nothing of the rest: the runtime's replay
    gives those blocks the request's own content, so two requests with equal listed ids share only the listed
    blocks (as the simulator and the ideal hit rate count them), never a made-up tail."""
    import anyio

    from dualpath.runtime.clients import ClientResult, TurnOutcome, run_offline_into
    from dualpath.workload.trajectory import Trajectory, Turn

    a = hash_prompt_tokens([5, 6], 2048, 512, 1000, salt=(0, 0))
    b = hash_prompt_tokens([5, 6], 2048, 512, 1000, salt=(1, 0))
    assert np.array_equal(a[:1024], b[:1024]) and not np.array_equal(a[1024:1536], b[1024:1536])
    assert np.array_equal(a, hash_prompt_tokens([5, 6], 2048, 512, 1000, salt=(0, 0)))  # a pure function
    assert a.min() >= 1 and a.max() < 1000
    prompts: list[np.ndarray] = []

    class Recorder:  # the TurnService protocol: records each prompt
        async def run_turn(self, session: int, prompt_ids: np.ndarray, gen_tokens: int) -> TurnOutcome:
            prompts.append(np.asarray(prompt_ids))
            return TurnOutcome(session, [7] * gen_tokens, len(prompt_ids), 0, 0.0, 0.0, None, 0.0)

    agents = [Trajectory(k, [Turn(2048, 1, hash_ids=[5, 6], hash_block=512)]) for k in range(2)]
    anyio.run(lambda: run_offline_into(Recorder(), agents, ClientResult([], 0.0, 0.0, 0, 0), vocab_size=1000))
    assert len(prompts) == 2 and np.array_equal(prompts[0][:1024], prompts[1][:1024])
    assert not np.array_equal(prompts[0][1024:1536], prompts[1][1024:1536])


def test_simulator_sees_cross_session_reuse_and_trace_times() -> None:
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    w = load_trace(SHARED, "mooncake")
    sc = scenario_from_preset("tiny", trajectories=w.trajectories)
    sc.mode = "online"
    sim = Simulation(sc, get_policy("dualpath")).run()
    assert sim.completed == 4
    # submitted at the trace's own times (A2 waits for 40 s although A finished long before)
    assert sorted(sim.rec_submit) == pytest.approx([0.0, 0.0, 30.0, 40.0])
    # A and B arrive together (nothing stored yet): B waits for the system prompt A computes and reads it; C, a new
    # session, hits it too; A2 its own session's four blocks: (1024 + 1024 + 2048) tokens of 7248
    assert sim.hit_tokens == 1024 + 1024 + 2048 and sim.prompt_tokens == 7248
    sc.inflight_prefix_min_tokens = None  # B computes the system prompt alongside A
    assert Simulation(sc, get_policy("dualpath")).run().hit_tokens == 1024 + 2048


def test_simulator_reads_a_prefix_stored_while_requests_queued(tmp_path: Path) -> None:
    # 100 one-turn sessions share a 40-block system prompt and are all submitted at t=0 (offline), when nothing
    # is stored: a request's hit is looked up again as it is assigned, so those that queued behind the first
    # finishers read the shared prefix instead of recomputing it (looked up at submission only, every hit was 0)
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    f = tmp_path / "shared.jsonl"
    f.write_text("".join(json.dumps({"timestamp": 0, "input_length": 41 * 512, "output_length": 8,
                                     "hash_ids": [*range(1, 41), 1000 + i]}) + "\n" for i in range(100)))
    w = load_trace(f, "mooncake")
    assert ideal_hit_rate(w.trajectories) == pytest.approx(99 * 40 / (100 * 41))
    for policy in ("basic", "dualpath"):
        sc = scenario_from_preset("tiny", trajectories=w.trajectories)
        sc.inflight_prefix_min_tokens = None  # no request waits for the prefix another one is computing
        sim = Simulation(sc, get_policy(policy)).run()
        assert sim.completed == 100 and sim.prompt_tokens == 100 * 41 * 512
        assert sim.hit_tokens % (40 * 512) == 0  # whole shared prefixes, never a unique block
        assert 0.2 * sim.prompt_tokens <= sim.hit_tokens < 99 * 40 * 512, policy


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_simulator_holds_requests_on_a_prefix_being_computed(tmp_path: Path, mode: str) -> None:
    # The same 100 sessions, and 20 unrelated ones among them. By default a request that shares at least 256
    # tokens past its stored prefix with one being prefilled waits for that one's decode start (when its prompt
    # is stored), even among requests assigned in one round: the shared prefix is computed once and the ideal
    # hit is reached (that unrelated requests go past held ones is the core's test, test_scheduler_units.py)
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    f = tmp_path / "shared.jsonl"
    rows = [{"timestamp": 10 * i, "input_length": 41 * 512, "output_length": 8, "hash_ids": [*range(1, 41), 1000 + i]}
            for i in range(100)]
    rows[5::5] = [{"timestamp": 10 * i, "input_length": 4 * 512, "output_length": 8,
                   "hash_ids": [5000 + 4 * i + k for k in range(4)]} for i in range(5, 100, 5)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = load_trace(f, "mooncake")
    shared = 100 - 19
    prompt = shared * 41 * 512 + 19 * 4 * 512
    assert ideal_hit_rate(w.trajectories) == pytest.approx((shared - 1) * 40 * 512 / prompt)
    for policy in ("basic", "dualpath"):
        sc = scenario_from_preset("tiny", trajectories=w.trajectories)
        sc.mode = mode
        assert sc.inflight_prefix_wait_s == 30.0  # (the runtime's scheduler.inflight_prefix_wait_s default)
        sim = Simulation(sc, get_policy(policy)).run()
        assert sim.completed == 100 and sim.prompt_tokens == prompt
        assert sim.hit_tokens == (shared - 1) * 40 * 512, policy
        # no time limit waits as long; a limit of 0 never waits: the same run as no holding at all
        sc.inflight_prefix_wait_s = None
        assert Simulation(sc, get_policy(policy)).run().hit_tokens == (shared - 1) * 40 * 512
        sc.inflight_prefix_wait_s = 0.0
        never = Simulation(sc, get_policy(policy)).run().hit_tokens
        sc.inflight_prefix_min_tokens = None
        assert never == Simulation(sc, get_policy(policy)).run().hit_tokens < (shared - 1) * 40 * 512, policy


def test_simulator_holds_on_a_short_hash_id_list(tmp_path: Path) -> None:
    # Two requests at t=0 list the same 2 hash ids for 10-block prompts (a trace as it is: fewer ids than blocks).
    # The second waits for the first's 2 listed blocks and reads them; the rest are its own (not a crash on the
    # ids the trace does not list)
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"timestamp": 0, "input_length": 10 * 512, "output_length": 4,
                                     "hash_ids": [1, 2]}) + "\n" for _ in range(2)))
    w = load_trace(f, "mooncake")
    for policy in ("basic", "dualpath"):
        sim = Simulation(scenario_from_preset("tiny", trajectories=w.trajectories), get_policy(policy)).run()
        assert sim.completed == 2 and sim.hit_tokens == 2 * 512, policy


def test_simulator_stores_a_prompt_when_its_decode_starts(tmp_path: Path) -> None:
    # A (8 blocks, 2,000 tokens to generate) decodes for seconds; B, sent at 1 s with A's 8 blocks plus one, hits
    # them: the DE persists a prompt's full blocks as its decode starts (as the runtime's DE does), not at its end
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset

    f = tmp_path / "long_decode.jsonl"
    f.write_text(json.dumps({"timestamp": 0, "input_length": 8 * 512, "output_length": 2000,
                             "hash_ids": list(range(1, 9))}) + "\n"
                 + json.dumps({"timestamp": 1000, "input_length": 9 * 512, "output_length": 4,
                               "hash_ids": list(range(1, 10))}) + "\n")
    sc = scenario_from_preset("tiny", trajectories=load_trace(f, "mooncake").trajectories)
    sc.mode = "online"
    sim = Simulation(sc, get_policy("dualpath")).run()
    assert sorted(sim.rec_submit) == [0.0, 1.0] and max(sim.rec_done) > 2.0  # A still decoding when B arrives
    assert sim.hit_tokens == 8 * 512


def test_online_replay_waits_for_turn_times_and_sends_trace_content() -> None:
    import anyio

    from dualpath.runtime.clients import ClientResult, run_online_into
    from dualpath.runtime.runner import online_arrivals

    w = load_trace(SHARED, "mooncake")
    sent: list[tuple[int, float, np.ndarray]] = []

    class Recorder:  # the TurnService protocol: records what it is sent and when, answers at once
        async def run_turn(self, session: int, prompt_ids: np.ndarray, gen_tokens: int):  # type: ignore[no-untyped-def]
            from dualpath.runtime.clients import TurnOutcome

            now = time.perf_counter()
            sent.append((session, now, np.array(prompt_ids)))
            return TurnOutcome(session, [7] * gen_tokens, len(prompt_ids), 0, now, now, None, now)

    # the trace's times scaled down 1000x (ms instead of s) to keep the test fast
    for t in w.trajectories:
        t.arrival /= 1000
        for u in t.turns:
            u.at = None if u.at is None else u.at / 1000
    arr = online_arrivals(w.trajectories, 1.0)
    assert arr == [0.0, 0.0, 0.030]
    res = ClientResult([], 0.0, 0.0, 0, 0)
    anyio.run(lambda: run_online_into(Recorder(), w.trajectories, arr, res, vocab_size=1000))
    t0 = res.t_start
    by = {(s, len(p)): (t - t0, p) for s, t, p in sent}
    assert by[(0, 2564)][0] >= 0.040 - 1e-3 and by[(2, 1100)][0] >= 0.030 - 1e-3
    # the follow-up's prompt is the trace's content (its hash ids), not context + generated tokens
    assert np.array_equal(by[(0, 2564)][1], hash_prompt_tokens([1, 2, 3, 4, 7, 8], 2564, 512, 1000))
    assert np.array_equal(by[(2, 1100)][1][:1024], by[(0, 2048)][1][:1024])  # cross-session shared prefix


def test_trace_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = trace_stats(SHARED, "mooncake")
    assert (s["requests"], s["sessions"]) == (4, 3)
    assert s["input_tokens"]["max"] == 2564 and s["total_input_tokens"] == 7248
    assert s["ideal_hit_rate"] == pytest.approx(IDEAL_SHARED)
    assert s["arrival_rate_rps"] == pytest.approx(3 / 40.0)
    assert s["largest_turn"] == {"prompt": 2564, "gen": 4, "tokens": 2568, "session": 0, "turn": 1, "line": 4}
    out = tmp_path / "s.json"
    assert main(["trace", "stats", str(SHARED), "--trace-format", "mooncake", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "requests               4" in text and "line 4" in text
    assert json.loads(out.read_text())["sessions"] == 3


def test_synthetic_mooncake_is_a_valid_trace(tmp_path: Path) -> None:
    rows = synthetic_mooncake(200, seed=1)
    p = tmp_path / "mc.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = load_trace(p, "mooncake")
    assert w.requests == 200 and len(w.trajectories) < 200  # sessions were recovered
    assert 0.2 < ideal_hit_rate(w.trajectories) < 0.95


@pytest.mark.parametrize(
    ("content", "fmt", "where", "what"),
    [
        (b'{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n\xff\xfe\n', "mooncake",
         ":2:", "UTF-8"),
        (b'{"id": 0, "turns": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "jsonl", ":1:", "nested"),
        (b"\n\n", "jsonl", ":1:", "empty trace"),
        (b'{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n'
         b'{"timestamp": 5, "input_length": 9000000, "output_length": 2, "hash_ids": [2]}\n', "mooncake", ":2:",
         "9000000 prompt"),
    ],
)
@pytest.mark.parametrize("command", ["simulate", "trace"])
def test_bad_traces_exit_2_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                                                 fmt: str, where: str, what: str, command: str) -> None:
    p = tmp_path / f"bad.{fmt}"
    p.write_bytes(content)
    if command == "trace" and what.endswith("prompt"):
        return  # a long turn is a fact for `trace stats`, an error only where a cluster must hold it
    argv = (["simulate", "--preset", "tiny", "--trace", str(p), "--trace-format", fmt] if command == "simulate"
            else ["trace", "stats", str(p), "--trace-format", fmt])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{p}{where}" in err and what in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_load_trace_refuses_bad_limits() -> None:
    with pytest.raises(WorkloadError, match="max_requests"):
        load_trace(SHARED, "mooncake", max_requests=0)
    with pytest.raises(WorkloadError, match="not found"):
        load_trace(DATA / "nope.jsonl")


def test_run_prepares_every_request_and_sizes_the_cluster(tmp_path: Path) -> None:
    from dualpath.runtime.app import RunRequest, describe, prepare

    rows = [{"timestamp": 0, "input_length": 23141, "output_length": 453, "hash_ids": list(range(46))},
            {"timestamp": 10, "input_length": 300, "output_length": 5, "hash_ids": [0]}]
    p = tmp_path / "long.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = tmp_path / "c.yaml"
    conf.write_text(f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    cfg, _, trajs = prepare(RunRequest(config=str(conf), trace=str(p), trace_format="mooncake", agents=24))
    assert len(trajs) == 2 and sum(t.n_turns for t in trajs) == 2  # not replayed into 24 agents
    assert cfg.model.max_context >= 23141 + 453 and cfg.cluster.prefill_max_batch_tokens >= 23141
    head = describe(cfg, trajs, ["dualpath"])
    assert "2 of 2 requests" in head and f"model context {cfg.model.max_context}" in head
    cfg2, _, t2 = prepare(RunRequest(config=str(conf), trace=str(p), trace_format="mooncake", max_requests=1))
    assert sum(t.n_turns for t in t2) == 1 and "first 1 requests" in describe(cfg2, t2, ["dualpath"])


def test_jsonl_trace_online_keeps_its_arrivals(tmp_path: Path) -> None:
    from dualpath.runtime.runner import online_arrivals

    p = tmp_path / "t.jsonl"
    p.write_text('{"id": 0, "arrival": 0.0, "turns": [{"append": 10, "gen": 2}, {"append": 5, "gen": 1, "at": 3.5}]}\n'
                 '{"id": 4, "arrival": 2.0, "turns": [{"append": 7, "gen": 2}]}\n')
    trajs = build_workload(WorkloadConfig(trace=str(p), mode="online", rate_aps=100.0))
    assert online_arrivals(trajs, 100.0, from_trace=True) == [0.0, 2.0]
    assert trajs[0].turns[1].at == 3.5
    off = build_workload(WorkloadConfig(trace=str(p), mode="offline"))
    assert [t.arrival for t in off] == [0.0, 0.0]


def test_time_scale_replays_a_trace_faster_or_slower(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``time_scale`` divides every trace time, think time and arrival (2: twice the request rate), keeps the
    content and lengths, and applies after the prefix (taken in the trace's own time) and the copies."""
    base = load_trace(SHARED, "mooncake", repeat=2)
    fast = load_trace(SHARED, "mooncake", repeat=2, time_scale=4.0)
    assert "times / 4" in fast.note
    for t0, t1 in zip(base.trajectories, fast.trajectories, strict=True):
        assert t1.arrival == pytest.approx(t0.arrival / 4)
        for u0, u1 in zip(t0.turns, t1.turns, strict=True):
            assert (u1.append, u1.gen, u1.hash_ids) == (u0.append, u0.gen, u0.hash_ids)
            assert u1.at == pytest.approx(u0.at / 4)
    assert max(u.at for t in fast.trajectories for u in t.turns) > 0
    p = tmp_path / "t.jsonl"  # think times (a session's rows with delay) scale too
    p.write_text('{"session_id": "s", "input_length": 100, "output_length": 4, "delay": 0}\n'
                 '{"session_id": "s", "input_length": 50, "output_length": 4, "delay": 3000}\n')
    slow = build_workload(WorkloadConfig(trace=str(p), mode="online", time_scale=0.5))
    assert [u.think for u in slow[0].turns][1] == pytest.approx(6.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(WorkloadError, match="time_scale must be a positive number"):
            load_trace(SHARED, "mooncake", time_scale=bad)
    # the simulator online: at 4x, the last request (at 40 s in the trace) is sent at 10 s and served alike
    for scale in ("1", "4"):
        assert main(["simulate", "--trace", str(SHARED), "--mode", "online", "--policy", "basic",
                     "--time-scale", scale, "--json", str(tmp_path / f"s{scale}.json")]) == 0
    jct = [json.loads((tmp_path / f"s{s}.json").read_text())["runs"][0]["jct_s"] for s in ("1", "4")]
    assert jct[0] > 40.0 and jct[1] == pytest.approx(jct[0] - 30.0, abs=0.01)
    capsys.readouterr()
    assert main(["simulate", "--time-scale", "2"]) == 2
    assert "--time-scale" in capsys.readouterr().err
    # dualpath run: --time-scale reaches the runtime's workload (and names itself when bad)
    from dualpath.errors import ConfigError
    from dualpath.runtime.app import RunRequest, describe, prepare

    conf = tmp_path / "c.yaml"
    conf.write_text(f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    cfg, _, trajs = prepare(RunRequest(config=str(conf), trace=str(SHARED), trace_format="mooncake", mode="online",
                                     time_scale=4.0))
    assert max(u.at for t in trajs for u in t.turns if u.at is not None) == pytest.approx(10.0)
    assert "times / 4" in describe(cfg, trajs, ["dualpath"])  # (the header says so)
    with pytest.raises(ConfigError, match="--time-scale must be a positive number"):
        prepare(RunRequest(config=str(conf), trace=str(SHARED), time_scale=0.0))


def _shape(trajs):
    """Each trajectory's turns as (append, gen, at, line, hash ids), in order (session numbers aside)."""
    return [[(u.append, u.gen, u.at, u.line, u.hash_ids) for u in t.turns] for t in trajs]


def _rows_out_of_order(rng: random.Random, n: int, bailian: bool) -> list[dict]:
    """Content-hashed rows whose sessions share prefixes, written out of time order with tied timestamps; Bailian's
    with parents (some missing, some with a second child)."""
    rows, open_ = [], []
    for i in range(n):
        t = (i // 3) * 7  # (three rows share each timestamp)
        if open_ and rng.random() < 0.6:
            k = rng.randrange(len(open_))
            chat, ids, ctx = open_[k]
            ids = ids + [rng.randrange(10**6) for _ in range(rng.randint(1, 3))]
            parent = chat if rng.random() < 0.9 else 10**7 + i  # (some parents are not in the file)
            if rng.random() > 0.8:
                del open_[k]  # (and its next child, if any, will be a second child)
        else:
            ids, parent = [rng.randrange(10**6) for _ in range(rng.randint(1, 4))], -1
        inp = len(ids) * 16 - rng.randrange(8)
        row = {"timestamp": t, "input_length": inp, "output_length": rng.randint(1, 9), "hash_ids": ids}
        if bailian:
            row.update(chat_id=i, parent_chat_id=parent, turn=1, type="text")
        else:
            row["timestamp"] = t * 1000
        rows.append(row)
        open_.append((i, ids, inp))
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("fmt", ["mooncake", "bailian"])
def test_a_prefix_kept_while_streaming_equals_the_whole_file_cut(tmp_path, fmt):
    """--max-requests N on a Mooncake or Qwen-Bailian trace keeps the N earliest rows as the file streams by (memory
    for N rows): the sessions, turns, times and content equal those of the whole file loaded and then cut to its
    first N requests, for rows out of time order and tied timestamps; the header still counts the whole file."""
    rng = random.Random(7)
    p = tmp_path / f"t.{fmt}.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _rows_out_of_order(rng, 240, fmt == "bailian")))
    whole = load_trace(p, fmt)
    assert whole.requests == 240 and len(whole.trajectories) < 200  # (sessions of several turns)
    for n in (1, 2, 5, 37, 100, 239, 240, 500):
        cut = load_trace(p, fmt, max_requests=n)
        assert _shape(cut.trajectories) == _shape(_prefix_requests(whole.trajectories, n)), n
        assert cut.note.startswith(f"{min(n, 240)} of 240 requests")
