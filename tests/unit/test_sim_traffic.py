"""Inference (HIGH) traffic on the compute NICs: link reservations, all-to-all volume, per-operator decode, and the
simulator's use of them (sim/links.py, sim/traffic.py, sim/compute.py)."""

from __future__ import annotations

import itertools

import pytest

from dualpath.sim.compute import RooflineCompute
from dualpath.sim.events import EventLoop
from dualpath.sim.links import KV, Link
from dualpath.sim.presets import MODELS, get_gpu, get_model


def _kv_done(size: float, reserve: float, isolation: bool, bw: float = 100.0, kv_flows: int = 1) -> list[float]:
    loop = EventLoop()
    link = Link(loop, "l", bw, kv_share=0.01)
    link.isolation = isolation
    link.reserve(reserve)
    done: list[float] = []
    for _ in range(kv_flows):
        link.start(size, KV, lambda: done.append(loop.now))
    loop.run()
    return done


def test_isolated_reservation_takes_its_rate_and_kv_the_rest() -> None:
    # 30/s reserved of 100/s: a 140 B KV flow runs at 70/s -> 2 s
    assert _kv_done(140.0, 30.0, True) == [pytest.approx(2.0)]


def test_reservation_above_the_high_share_is_capped() -> None:
    # isolation: HIGH gets at most 99 % while KV is active; KV keeps 1/s -> 1 B takes 1 s
    assert _kv_done(1.0, 500.0, True) == [pytest.approx(1.0)]


def test_without_isolation_reservation_is_one_fair_flow() -> None:
    # fair: HIGH demand 80/s gets min(80, 100/2) = 50; the KV flow gets 50/s -> 100 B in 2 s
    assert _kv_done(100.0, 80.0, False) == [pytest.approx(2.0)]
    # three KV flows + HIGH: HIGH gets 25, each KV (100 - 25) / 3 = 25/s -> 2 s
    assert _kv_done(50.0, 80.0, False, kv_flows=3) == [pytest.approx(2.0)] * 3


def test_release_restores_the_link_and_counts_high_bytes() -> None:
    loop = EventLoop()
    link = Link(loop, "l", 100.0)
    done: list[float] = []
    link.reserve(50.0)
    link.start(100.0, KV, lambda: done.append(loop.now))  # 50/s until t=1 (50 B), then 100/s: 0.5 s more
    loop.at(1.0, link.release, 50.0)
    loop.run()
    assert done == [pytest.approx(1.5)]
    assert link.high_bytes == pytest.approx(50.0)
    assert link.utilisation(1.5) == pytest.approx(150.0 / 150.0)


def test_high_rate_for_bursts() -> None:
    loop = EventLoop()
    link = Link(loop, "l", 100.0)
    assert link.high_rate_for(100.0) == pytest.approx(100.0)
    link.start(1e9, KV, lambda: None)
    assert link.high_rate_for(100.0) == pytest.approx(99.0)  # isolation: HIGH before KV
    link.isolation = False
    assert link.high_rate_for(100.0) == pytest.approx(50.0)  # one flow among two


@pytest.mark.parametrize("n_nodes,k", [(2, 2), (3, 3), (4, 2)])
def test_all_to_all_volume_matches_enumeration(n_nodes: int, k: int) -> None:
    m = MODELS["ds27b"]
    import dataclasses

    m = dataclasses.replace(m, experts_per_token=k, node_limit=0)
    # enumerate every placement of a token's k experts on the nodes (uniform), own node = 0
    remote = [len({x for x in combo if x != 0}) for combo in itertools.product(range(n_nodes), repeat=k)]
    expect = sum(remote) / len(remote) * m.hidden * 3 * m.moe_layers
    assert m.ep_bytes_per_token(n_nodes) == pytest.approx(expect)
    assert m.ep_bytes_per_token(1) == 0.0


def test_node_limit_caps_the_nodes_a_token_reaches() -> None:
    m = MODELS["ds_v32"]
    # 8 experts over 16 nodes touch ~6.3 nodes on average; node-limited routing caps it at 4 (3 remote at most)
    assert m.ep_bytes_per_token(16) <= 4 * 15 / 16 * 7168 * 3 * 58 + 1e-6
    assert MODELS["qwen25_32b"].ep_bytes_per_token(4) == 0.0


def test_decode_step_is_a_per_operator_roofline() -> None:
    model, gpu = get_model("ds_v32"), get_gpu("h800")
    c = RooflineCompute(model, gpu, n_pe_gpus=16, n_de_gpus=32)
    hbm = gpu.hbm_bw * gpu.hbm_efficiency
    rate = gpu.fp8_tflops * 1e12 * gpu.mfu
    n, ctx = 40, 30000
    kb, fl = c.decode_request_cost(ctx)
    w = (model.replicated_params + model.expert_params / 32) * 1.0
    gemm = max(w / hbm, n * model.linear_flops_per_token / rate)
    attn = max(n * kb / hbm, n * fl / rate)
    assert c.decode_step_time(n, n * kb, n * fl) == pytest.approx(gemm + attn)
    assert c.decode_comm_bytes(n) == pytest.approx(n * model.ep_bytes_per_token(4))
    assert c.prefill_comm_bytes(1000) == pytest.approx(1000 * model.ep_bytes_per_token(2))


def test_simulated_all_to_all_lands_on_the_multi_node_side_only() -> None:
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.cluster import Simulation
    from dualpath.sim.runner import scenario_from_preset
    from dualpath.sim.scenario import SimTrajectory

    trajs = [SimTrajectory([(2000, 8), (300, 8), (300, 8)]) for _ in range(8)]
    sc = scenario_from_preset("ds27b-1p1d-64k", trajectories=trajs)
    sc.P, sc.D = 1, 2
    sc.compute = RooflineCompute(get_model("ds27b"), get_gpu("h800"), 8, 16)
    sim = Simulation(sc, get_policy("dualpath")).run()
    assert sim.completed == 24
    assert sum(p.cnic_r.high_bytes for p in sim.pes) == 0.0  # one PE node: the all-to-all stays on NVLink
    de_high = sum(d.cnic_w.high_bytes for d in sim.des)
    assert de_high > 0
    # every decode step of n requests carries n x bytes/token; tokens decoded = sum(gen - 1)
    assert de_high == pytest.approx(24 * 7 * sc.compute.de_ep_bytes, rel=1e-6)
    off = scenario_from_preset("ds27b-1p1d-64k", trajectories=trajs, overrides={"ep_traffic": False})
    off.P, off.D, off.compute = 1, 2, sc.compute
    assert sum(d.cnic_w.high_bytes for d in Simulation(off, get_policy("dualpath")).run().des) == 0.0
