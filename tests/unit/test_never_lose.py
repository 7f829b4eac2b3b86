"""The never-lose property: DualPath >= 0.98 x max(Basic, pe_only) on a small workload matrix (simulator), the
storage-bound win kept, and the batching rule behind it (the compute quota never cuts below the saturating size)."""

from __future__ import annotations

import pytest

from dualpath.scheduler.batching import PendingPrefill, pack_forward_batch
from dualpath.sim.matrix import Cell, hit_workload, run_cell


def test_quota_floor_packs_up_to_min_tokens() -> None:
    # time = 1 ms per token of new work; quota 0.1 s -> 100 tokens without a floor
    def t(cached: int, new: int) -> float:
        return new * 1e-3

    pend = [PendingPrefill(0, 0, 300), PendingPrefill(1, 0, 500)]
    assert [c.new for c in pack_forward_batch(pend, 0.1, t).chunks] == [100]
    long = [PendingPrefill(0, 0, 300), PendingPrefill(1, 0, 1500)]
    b = pack_forward_batch(long, 0.1, t, min_tokens=600)
    assert [(c.rid, c.new) for c in b.chunks] == [(0, 300), (1, 300)]  # its tail (1,200) is above the floor
    # above the floor the quota rules again, and max_tokens still caps
    assert [c.new for c in pack_forward_batch(pend, 0.5, t, min_tokens=200).chunks] == [300, 200]
    assert pack_forward_batch(pend, 0.1, t, max_tokens=250, min_tokens=600).new_tokens == 250


def test_quota_floor_leaves_no_tail_below_the_floor() -> None:
    # cutting request 1 at the floor (300 of 500) would leave 200 tokens, a forward below the saturating size of
    # its own when nothing is queued behind it: the batch takes the whole request instead; a lone request is not
    # cut into floor + a sliver either
    def t(cached: int, new: int) -> float:
        return new * 1e-3

    pend = [PendingPrefill(0, 0, 300), PendingPrefill(1, 0, 500)]
    assert [(c.rid, c.new) for c in pack_forward_batch(pend, 0.1, t, min_tokens=600).chunks] == [(0, 300), (1, 500)]
    assert [c.new for c in pack_forward_batch([PendingPrefill(0, 0, 700)], 0.1, t, min_tokens=600).chunks] == [700]
    # without a floor (the paper's quota alone) the cut stays where the quota puts it
    assert [c.new for c in pack_forward_batch([PendingPrefill(0, 0, 700)], 0.1, t).chunks] == [100]
    # with requests queued behind it, the tail is left to join their batch (the quota's balance holds)
    assert [(c.rid, c.new) for c in pack_forward_batch(pend + [PendingPrefill(2, 0, 900)], 0.1, t,
                                                       min_tokens=600).chunks] == [(0, 300), (1, 300)]
    assert [c.new for c in pack_forward_batch([PendingPrefill(0, 0, 700)], 0.1, t, min_tokens=600,
                                              more_queued=True).chunks] == [600]
    # max_tokens still caps: the tail is only taken when the whole request fits
    assert pack_forward_batch([PendingPrefill(0, 0, 700)], 0.1, t, max_tokens=650, min_tokens=600).new_tokens == 600


def test_two_request_trace_does_not_lose(tmp_path) -> None:
    # two ~7K-token Mooncake requests at t=0 on DS 660B 2P4D: compute-bound, nothing to read; the quota used to cut
    # each into 6,000 + a sliver, and DualPath finished 6 % after Basic
    from dualpath.sim.runner import run_policy, scenario_from_preset
    from dualpath.workload.traces import load_trace

    f = tmp_path / "two.jsonl"
    f.write_text('{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1, 2, 3, 4, 5, 6, 7, '
                 '8, 9, 10, 11, 12, 13]}\n{"timestamp": 0, "input_length": 6472, "output_length": 26, "hash_ids": '
                 '[0, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]}\n')
    sc = scenario_from_preset("ds660b-2p4d-64k", trajectories=load_trace(f, "auto").trajectories)
    basic, dual = (run_policy(sc, p) for p in ("basic", "dualpath"))
    assert basic["jct_s"] / dual["jct_s"] >= 0.99, (basic["jct_s"], dual["jct_s"])


def test_hit_workload_reaches_its_hit_rate() -> None:
    from dualpath.workload.traces import ideal_hit_rate

    for h in (0.1, 0.5, 0.9):
        trajs = hit_workload(h, 512, 400, seed=1)
        assert ideal_hit_rate(trajs) == pytest.approx(h, abs=0.06)


# a compute-bound, trace-shaped cell where the paper's quota alone loses ~4 % (small batches), and a
# storage-bound cell where DualPath must keep its win
COMPUTE_BOUND = Cell("ds_v32", "h800", 2, 4, "tracelike", "offline")
STORAGE_BOUND = Cell("ds27b", "h800", 1, 1, "hit0.98-app512", "offline")


@pytest.mark.parametrize("cell", [COMPUTE_BOUND, Cell("ds27b", "h800", 1, 2, "tracelike", "online")],
                         ids=lambda c: c.name)
def test_dualpath_never_loses(cell: Cell) -> None:
    row = run_cell(cell, requests_per_pe=64)
    assert row["ratio"] >= 0.98, row


def test_the_floor_is_what_fixes_the_compute_bound_cell() -> None:
    # without the rule the same cell loses: the property test above would catch its removal
    row = run_cell(COMPUTE_BOUND, requests_per_pe=64, quota_floor=False, policies=("basic", "dualpath"))
    assert row["ratio"] < 0.98, row


def test_storage_bound_win_is_kept() -> None:
    row = run_cell(STORAGE_BOUND, requests_per_pe=16, min_agents_per_pe=10, policies=("basic", "dualpath"))
    assert row["hit_rate"] > 0.95 and row["vs_basic"] >= 1.5, row


def test_breakdown_shares_match_exact_compute_time() -> None:
    from dualpath.sim.matrix import tracelike_workload
    from dualpath.sim.runner import run_policy, scenario_from_preset

    sc = scenario_from_preset("ds27b-1p1d-64k", trajectories=tracelike_workload(200, seed=2))
    r = run_policy(sc, "dualpath", breakdown_dt=0.01)
    b = r["breakdown"]
    shares = [b[k] for k in ("compute", "transfer", "read_wait", "sched_wait", "no_work")]
    assert sum(shares) == pytest.approx(1.0)
    # the sampled compute share against the exact compute seconds (sum over batches / PE-seconds)
    assert b["compute"] == pytest.approx(r["pe_compute_util"], abs=0.02)
    assert 0 <= b["small_batch"] <= b["compute"]
    assert b["mean_batch_tokens"] == pytest.approx(r["prompt_tokens"] * (1 - r["hit_rate"]) / r["pe_batches"], rel=1e-6)


def test_work_ranking_charges_what_a_request_costs_and_drains_to_zero(tmp_path) -> None:
    """The simulator's PE work (Algorithm 1's ranking with ``work_ranking``): an agent's next turn, mostly stored,
    costs a fraction of a first prompt of the same length; every PE's work and tokens return to zero."""
    import json
    import random
    import sys
    from pathlib import Path

    from dualpath.scheduler.policies import get_policy
    from dualpath.scheduler.state import RequestInfo
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset
    from dualpath.workload.traces import load_trace

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import never_lose_fuzz

    f = tmp_path / "burst.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in never_lose_fuzz.trace(random.Random(24), "burst", 60, 100)))
    sc = scenario_from_preset("ds27b-1p1d-64k", trajectories=load_trace(f, "mooncake").trajectories)
    sim = Simulation(sc, get_policy("dualpath"))
    assert sim.sched.pe_work is not None

    class _R:  # (_pe_work keeps its answer on the request)
        work = 0

    sim.reqs = {0: _R(), 1: _R()}  # type: ignore[dict-item]
    first = sim._pe_work(RequestInfo(0, 0, 40_000, 0, 100))
    turn = sim._pe_work(RequestInfo(1, 39_000, 1_000, 38_976, 100))
    assert 0 < 10 * turn < first and sim.reqs[1].work == turn
    sim.run()
    assert all(pe.work == 0 and pe.tok == 0 for pe in sim.pes)
    sc.work_ranking = False
    assert Simulation(sc, get_policy("dualpath")).sched.pe_work is None
    assert Simulation(scenario_from_preset("ds27b-1p1d-64k", trajectories=load_trace(f, "mooncake").trajectories),
                      get_policy("basic")).sched.pe_work is None  # the baseline keeps the paper's ranking


def test_a_burst_of_first_prompts_and_next_turns_does_not_lose(tmp_path) -> None:
    """60 Mooncake-shaped requests at t = 0 on DS 27B 1P1D (benchmarks/never_lose_fuzz.py's ``burst``, seed 24): ranked
    by tokens, an agent's next turn waited behind a whole first prompt and DualPath ended 10 % after Basic; ranked by
    work it does not."""
    import json
    import random
    import sys
    from pathlib import Path

    from dualpath.sim.runner import run_policy, scenario_from_preset
    from dualpath.workload.traces import load_trace

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import never_lose_fuzz

    f = tmp_path / "burst.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in never_lose_fuzz.trace(random.Random(24), "burst", 60, 100)))

    def jct(policy: str, work_ranking: bool) -> float:
        sc = scenario_from_preset("ds27b-1p1d-64k", trajectories=load_trace(f, "mooncake").trajectories)
        sc.work_ranking = work_ranking
        return float(run_policy(sc, policy)["jct_s"])

    basic = jct("basic", True)
    assert basic == jct("basic", False)  # the baseline does not use it
    assert basic / jct("dualpath", True) >= 0.98
    assert basic / jct("dualpath", False) < 0.95
