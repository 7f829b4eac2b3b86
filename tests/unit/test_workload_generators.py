"""Dataset generators against the paper's Table 2, trajectory helpers and arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from dualpath.errors import WorkloadError
from dualpath.workload import (
    SLO,
    TABLE2,
    Trajectory,
    Turn,
    WorkloadConfig,
    build_workload,
    dataset_stats,
    fill_random_ids,
    generate_dataset,
    offline_arrivals,
    poisson_arrivals,
)

KEYS = ("turns", "append", "gen", "total", "context")


@pytest.mark.parametrize("name", ["32k", "48k", "64k"])
@pytest.mark.parametrize("seed", [0, 3])
def test_dataset_matches_table2(name: str, seed: int) -> None:
    trajs = generate_dataset(name, 500, seed=seed)
    stats = dataset_stats(trajs)
    for key, target in zip(KEYS, TABLE2[name], strict=True):
        assert stats[key] == pytest.approx(target, rel=0.05), key
    max_len = int(name[:-1]) * 1024
    assert all(t.total_tokens <= max_len for t in trajs)
    # synthetic first round: g_1 = 1, and the generator is deterministic per seed
    assert all(t.turns[0].gen == 1 for t in trajs)
    again = generate_dataset(name, 5, seed=seed)
    assert [t.turns for t in again] == [t.turns for t in generate_dataset(name, 5, seed=seed)]


def test_scaled_and_cpu_variants() -> None:
    base = dataset_stats(generate_dataset("32k", 200, seed=1))
    small = generate_dataset("32k", 200, seed=1, scale=1 / 32)
    st = dataset_stats(small)
    assert st["turns"] == pytest.approx(base["turns"], rel=0.05)
    assert st["total"] == pytest.approx(base["total"] / 32, rel=0.08)
    assert all(t.total_tokens <= 1024 for t in small)
    tiny = generate_dataset("tiny", 50, seed=0)
    assert all(t.n_turns >= 1 and t.total_tokens <= 1024 for t in tiny)
    capped = generate_dataset("small", 50, seed=0, max_len=512)
    assert all(t.total_tokens <= 512 for t in capped)
    longer = dataset_stats(generate_dataset("64k", 100, seed=0, append_scale=2.0))
    assert (
        longer["total"] <= 64 * 1024
        and longer["turns"] < dataset_stats(generate_dataset("64k", 100))["turns"]
    )
    with pytest.raises(WorkloadError, match="32k"):
        generate_dataset("nope", 1)


def test_trajectory_helpers() -> None:
    t = Trajectory(0, [Turn(10, 2), Turn(5, 3), Turn(4, 1)])
    assert [t.context_before(i) for i in range(3)] == [0, 12, 20]
    assert [t.prompt_len(i) for i in range(3)] == [10, 17, 24]
    assert t.total_tokens == 25
    assert t.truncated(20).n_turns == 2 and t.truncated(max_turns=1).n_turns == 1
    with pytest.raises(WorkloadError):
        Turn(-1, 0)
    with pytest.raises(WorkloadError):
        Turn(2, 0, [1])
    ids = fill_random_ids([t], vocab_size=50, seed=1)[0]
    assert [len(u.append_ids or []) for u in ids.turns] == [10, 5, 4]
    assert all(0 <= x < 50 for u in ids.turns for x in (u.append_ids or []))


def test_arrivals_and_slo() -> None:
    assert offline_arrivals(3) == [0.0, 0.0, 0.0]
    arr = poisson_arrivals(4000, rate=2.0, seed=5)
    assert arr == sorted(arr) and arr == poisson_arrivals(4000, rate=2.0, seed=5)
    gaps = np.diff([0.0, *arr])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(WorkloadError):
        poisson_arrivals(3, rate=0.0)
    slo = SLO()
    assert slo.met(3.9, 0.04) and not slo.met(4.1, 0.01) and not slo.met(1.0, 0.06) and slo.met(1.0, None)


def test_build_workload_from_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    online = build_workload(
        WorkloadConfig(dataset="tiny", n_agents=5, mode="online", rate_aps=3.0, max_turns=2)
    )
    assert len(online) == 5 and all(t.n_turns <= 2 for t in online)
    assert [t.arrival for t in online] == poisson_arrivals(5, 3.0, seed=0)
    from pathlib import Path

    trace = Path(__file__).parent.parent / "data" / "trajectories_small.jsonl"
    # a trace is served as it is: n_agents (a generator's knob) neither cycles nor truncates it
    off = build_workload(WorkloadConfig(trace=str(trace), n_agents=4))
    assert [t.tid for t in off] == [0, 1, 7] and sum(t.n_turns for t in off) == 5
    assert all(t.arrival == 0.0 for t in off)
    twice = build_workload(WorkloadConfig(trace=str(trace), n_agents=1, repeat=2))
    assert len(twice) == 6 and [t.turns for t in twice[3:]] == [t.turns for t in off]


def test_more_agents_than_the_paper_dataset_replay_its_500_trajectories():
    # Appendix A.3: more agents sample the dataset's trajectories (each with its own synthetic first round).
    base = generate_dataset("48k", 500, seed=3)
    many = generate_dataset("48k", 1750, seed=3)
    assert [t.tid for t in many] == list(range(1750))
    shapes = {tuple((x.append, x.gen) for x in t.turns) for t in base}
    assert all(tuple((x.append, x.gen) for x in t.turns) in shapes for t in many)
    uses = {}
    for t in many:
        key = tuple((x.append, x.gen) for x in t.turns)
        uses[key] = uses.get(key, 0) + 1
    assert len(uses) == len(shapes) and max(uses.values()) - min(uses.values()) <= 1  # balanced replay
    # the longest session does not grow with the number of agents
    assert max(t.total_tokens for t in many) == max(t.total_tokens for t in base)
