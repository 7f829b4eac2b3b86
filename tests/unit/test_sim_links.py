"""Fluid links: fair sharing and the two traffic classes, exact in virtual time."""

from __future__ import annotations

from typing import Any

import pytest

from dualpath.sim.events import EventLoop
from dualpath.sim.links import HIGH, KV, Link


def _run(flows: list[tuple[float, float, int]], bw: float = 100.0, kv_share: float = 0.01) -> list[float]:
    loop = EventLoop()
    link = Link(loop, "l", bw, kv_share)
    done = [0.0] * len(flows)

    def finish(i: int) -> None:
        done[i] = loop.now

    for i, (t, size, cls) in enumerate(flows):
        loop.at(t, lambda i=i, size=size, cls=cls: link.start(size, cls, finish, i))
    loop.run()
    return done


def test_one_flow_takes_size_over_bandwidth() -> None:
    assert _run([(0.0, 250.0, KV)]) == [pytest.approx(2.5)]


def test_equal_flows_share_equally() -> None:
    assert _run([(0.0, 100.0, KV), (0.0, 100.0, KV)]) == [pytest.approx(2.0), pytest.approx(2.0)]


def test_staggered_flows_processor_sharing() -> None:
    # A alone moves 50 by t=0.5, then both at 50/s: A ends at 1.5; B has 50 left, alone at 100/s -> 2.0
    a, b = _run([(0.0, 100.0, KV), (0.5, 100.0, KV)])
    assert (a, b) == (pytest.approx(1.5), pytest.approx(2.0))


def test_high_class_gets_its_share_and_kv_uses_the_rest() -> None:
    # both active: HIGH at 99/s finishes 99 B at t=1; KV moved 1 B, then 99 B alone at 100/s -> 1.99
    hi, kv = _run([(0.0, 99.0, HIGH), (0.0, 100.0, KV)])
    assert (hi, kv) == (pytest.approx(1.0), pytest.approx(1.99))


def test_counters_and_zero_size() -> None:
    loop = EventLoop()
    link = Link(loop, "l", 10.0, window_s=1.0)
    hits: list[float] = []
    link.start(0, KV, lambda: hits.append(loop.now))
    link.start(20.0, KV, lambda: hits.append(loop.now))
    loop.run()
    assert hits == [0.0, pytest.approx(2.0)]
    assert link.bytes[KV] == 20.0 and link.busy_s == pytest.approx(2.0)
    assert link.windows == {0: pytest.approx(10.0), 1: pytest.approx(10.0)}
    assert link.utilisation(4.0) == pytest.approx(0.5)


def test_event_loop_orders_by_time_then_insertion() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.at(1.0, seen.append, "b")
    loop.at(0.5, seen.append, "a")
    loop.at(1.0, seen.append, "c")
    loop.at(3.0, seen.append, "late")
    loop.run(until=2.0)
    assert seen == ["a", "b", "c"] and loop.now == 2.0


class _BoundedLoop(EventLoop):
    """An event loop that fails once more than ``left`` events were scheduled (a livelock guard)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        super().__init__()
        self.left = left

    def at(self, t: float, fn: Any, *args: Any) -> None:
        self.left -= 1
        if self.left < 0:
            raise AssertionError(f"still scheduling at t={self.now}: events are rescheduled at the same instant")
        super().at(t, fn, *args)


def test_a_remainder_below_the_clocks_resolution_finishes_the_flow() -> None:
    """Late in a long run (t = 34,500 s: the clock resolves ~7e-12 s) a flow 0.15 byte short of its end at 50 GB/s
    needs 3e-12 s, which the clock cannot add; it is done then, not rescheduled at the same instant forever (a
    day-long public trace hung ``dualpath simulate --mode online`` this way)."""
    loop = _BoundedLoop(100)
    loop.now = 34500.0
    link = Link(loop, "l", 5e10)
    done: list[float] = []
    link.start(1e5, KV, lambda: done.append(loop.now))
    link._v[KV] = link._heaps[KV][0][0] - 0.15  # (above the 1e-6 relative tolerance of a 100 KB flow: 0.1 byte)
    link._reschedule()
    loop.run()
    assert done == [34500.0]


def test_a_decode_step_count_below_the_clocks_resolution_finishes_the_request(tmp_path, monkeypatch) -> None:
    """A request served 3e10 s into an online trace (the clock resolves ~4e-6 s there) whose last decode steps
    need less time than that: the decode engine finishes it, instead of rescheduling its step event at the same
    instant forever."""
    import json

    import dualpath.sim.cluster as cluster
    from dualpath.sim import scenario_from_preset, simulate
    from dualpath.workload import load_trace

    rows = [{"timestamp": 0, "input_length": 2000, "output_length": 50, "hash_ids": [1, 2, 3, 4]},
            {"timestamp": 3 * 10**13, "input_length": 2000, "output_length": 50, "hash_ids": [1, 2, 3, 4]},
            {"timestamp": 3 * 10**13 + 1000, "input_length": 2600, "output_length": 300,
             "hash_ids": [1, 2, 3, 4, 5, 6]}]
    path = tmp_path / "far.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(cluster, "EventLoop", lambda: _BoundedLoop(100_000))
    sc = scenario_from_preset("ds660b-2p4d-64k", trajectories=load_trace(str(path), "mooncake").trajectories)
    sc.mode = "online"
    run = simulate(sc, ["basic"]).runs[0]
    assert run["all_done"] and run["requests"] == 3 and 3e10 < run["jct_s"] < 3e10 + 60
