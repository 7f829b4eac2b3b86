"""A tiny simulated cluster: conservation laws, the two paths, the ceiling, the shared scheduler core."""

from __future__ import annotations

import pytest

from dualpath.scheduler.policies import get_policy
from dualpath.sim import ProfiledCompute, SimScenario, SimTrajectory, run_policy
from dualpath.sim.cluster import Simulation

BT = 64
KVB = 1000.0


def _trajs(n: int = 8, turns: int = 12) -> list[SimTrajectory]:
    return [SimTrajectory([(150 + 37 * ((a + t) % 5), 40 + 13 * (t % 3)) for t in range(turns)], tid=a)
            for a in range(n)]


def _expected(trajs: list[SimTrajectory]) -> tuple[int, int, int, int]:
    """(requests, hit tokens, prompt tokens, persisted tokens) computed independently of the simulator."""
    n = hit = prompt = persisted = 0
    for t in trajs:
        ctx = 0
        for a, g in t.turns:
            p = ctx + a
            h = min(ctx // BT * BT, (p - 1) // BT * BT)
            n, hit, prompt = n + 1, hit + h, prompt + p
            persisted += ((p + g) // BT - h // BT) * BT
            ctx = p + g
    return n, hit, prompt, persisted


def _scenario(snic_bw: float = 2e6, trajs: list[SimTrajectory] | None = None) -> SimScenario:
    compute = ProfiledCompute(
        prefill_fn=lambda chunks: 1e-3 + sum(n for _, n in chunks) * 2e-5,
        attention_fn=lambda cached, new: (cached + new) * new * 1e-9,
        step_fn=lambda n, b, f: 2e-3 + 1e-4 * n,
    )
    return SimScenario(P=1, D=2, gpus_per_node=2, snic_bw=snic_bw, cnic_bw=50e6, kv_bytes_per_token=KVB,
                       compute=compute, de_kv_tokens=40_000, trajectories=trajs or _trajs(), block_tokens=BT,
                       fetch_interval_s=0.01, name="tiny-test")


@pytest.mark.parametrize("policy", ["basic", "layerwise", "round_robin", "dualpath", "split", "de_only", "oracle"])
def test_conservation(policy: str) -> None:
    trajs = _trajs()
    n, hit, prompt, persisted = _expected(trajs)
    sim = Simulation(_scenario(trajs=trajs), get_policy(policy)).run()
    assert sim.completed == n and not sim.reqs  # every request completes
    assert all(t >= 0 for t in sim.agent_done)
    assert (sim.hit_tokens, sim.prompt_tokens) == (hit, prompt)
    read = sim.bytes_pe_path + sim.bytes_de_path
    if policy == "oracle":
        assert read == 0
    else:
        assert read == pytest.approx(hit * KVB)  # bytes read == hit tokens x KV bytes per token
        assert sum(nd.write_bytes for nd in sim.de_nodes) == pytest.approx(persisted * KVB)
    if policy in ("basic", "layerwise"):
        assert sim.bytes_de_path == 0
    if policy == "de_only":
        assert sim.bytes_pe_path == 0
    if policy in ("dualpath", "round_robin", "split"):
        assert sim.bytes_pe_path > 0 and sim.bytes_de_path > 0
    # engines hand back everything they were charged
    assert all(e.seq == 0 and e.tok == 0 for e in sim.pes + sim.des)
    assert all(e.free_kv == 40_000 for e in sim.des)
    assert all(nd.read_q == 0 and nd.buf_used == pytest.approx(0, abs=1e-6) for nd in sim.pe_nodes + sim.de_nodes)


def test_io_bound_dualpath_beats_basic_within_the_ceiling() -> None:
    sc = _scenario(snic_bw=0.5e6)  # storage-bound: the hit KV dominates
    basic, dual, oracle = (run_policy(sc, p) for p in ("basic", "dualpath", "oracle"))
    speedup = basic["jct_s"] / dual["jct_s"]
    ceiling = (sc.P + sc.D) / sc.P
    assert 1.5 < speedup <= ceiling * 1.01
    assert oracle["jct_s"] <= dual["jct_s"]
    assert basic["snic_util_pe"] > 0.9 and basic["snic_util_de"] == 0
    assert dual["snic_util_de"] > 0.5
    assert basic["hit_rate"] == pytest.approx(dual["hit_rate"])


def test_online_horizon_and_unfinished_requests() -> None:
    trajs = _trajs(6)
    for i, t in enumerate(trajs):
        t.arrival = 0.5 * i
    sc = _scenario(trajs=trajs)
    sc.mode, sc.horizon_s = "online", 2.0
    r = run_policy(sc, "dualpath")
    assert r["sim_time_s"] == pytest.approx(2.0) and r["requests"] > 0 and not r["all_done"]


@pytest.mark.parametrize("policy", ["basic", "dualpath", "split"])
def test_leaving_overloaded_pes_out_of_a_fetch_changes_no_decision(policy: str) -> None:
    """The simulator passes the core only PEs under beta; the core must decide exactly as with all of them."""
    import random

    from dualpath.scheduler.core import GlobalScheduler
    from dualpath.scheduler.params import SchedulerParams
    from dualpath.scheduler.state import EngineSnapshot, RequestInfo

    rnd = random.Random(7)
    params = SchedulerParams(alpha_tokens=5000, beta_tokens=20000)
    for trial in range(30):
        reqs = [RequestInfo(i, c, 100, c // 64 * 64, 20) for i, c in enumerate(rnd.choices([0, 3000, 9000], k=25))]
        rq = {n: rnd.choice([0, 4000, 9000]) for n in range(3)}
        pes = [EngineSnapshot(e, e // 4, rnd.randint(0, 5), rnd.choice([0, 5000, 19000, 25000, 40000]), rq[e // 4])
               for e in range(12)]
        des = [[EngineSnapshot(e, e // 4, 1, rnd.randint(0, 9000), 0, rnd.randint(0, 60000)) for e in range(n * 4, n * 4 + 4)]
               for n in range(2)]
        full, part = GlobalScheduler(get_policy(policy), params), GlobalScheduler(get_policy(policy), params)
        for r in reqs:
            full.submit(r)
            part.submit(r)
        groups = [pes[n * 4:(n + 1) * 4] for n in range(3)]
        kept = [g for g in ([s for s in grp if s.tok <= params.beta_tokens] for grp in groups) if g]
        assert full.schedule(groups, des) == part.schedule(kept, des), trial


def test_mean_decode_batch_counts_request_seconds_in_decode() -> None:
    """``de_batch_mean`` x DE busy time = the request-seconds spent decoding, summed request by request."""
    sim = Simulation(_scenario(), get_policy("dualpath"))
    spans: list[float] = []
    finish = sim._finish

    def spy(de, r, now):  # type: ignore[no-untyped-def]
        spans.append(now - r.t_join)
        finish(de, r, now)

    sim._finish = spy  # type: ignore[method-assign]
    sim.run()
    busy = sum(d.busy_s for d in sim.des)
    assert sum(d.req_s for d in sim.des) == pytest.approx(sum(spans), rel=1e-9)
    assert 1.0 < sum(d.req_s for d in sim.des) / busy <= 8  # 8 agents: more than one at a time, never more than all
    one = run_policy(_scenario(trajs=_trajs(n=1)), "dualpath")
    assert one["de_batch_mean"] == pytest.approx(1.0)  # a single agent decodes alone
    assert one["decode_step_floor_s"] == pytest.approx(2e-3 + 1e-4)  # step_fn(1, 0, 0)


def test_speedups_are_against_basic_else_pe_only() -> None:
    """The simulator's speed-ups compare with ``basic`` when it ran, else with ``pe_only`` (as ``dualpath run``
    does); none without either."""
    from dualpath.sim.runner import speedups

    def run(policy: str, jct: float) -> dict:
        return {"policy": policy, "jct_s": jct, "prompt_tokens_per_s": 1.0}

    assert speedups([run("basic", 10.0), run("pe_only", 8.0), run("dualpath", 5.0)]) == {
        "basic": 1.0, "pe_only": 1.25, "dualpath": 2.0}
    assert speedups([run("pe_only", 9.0), run("dualpath", 6.0)]) == {"pe_only": 1.0, "dualpath": 1.5}
    assert speedups([run("dualpath", 6.0), run("split", 3.0)]) == {}
