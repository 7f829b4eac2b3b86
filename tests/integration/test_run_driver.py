"""The scheduler driver and the clients against a cluster double (the real cluster is in test_run_end_to_end).

The double keeps a content-addressed set of block prefixes (what a DE would persist), reports snapshots from its
own in-flight bookkeeping (seq, tok, per-node read queue, free KV memory) and records every call, so the test
can check that the driver feeds the core what the engines report and applies exactly what the core decides.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

import anyio
import numpy as np
import pytest

from dualpath.errors import EngineError, WorkloadError
from dualpath.runtime.clients import (
    ClientResult,
    SloCheck,
    capacity_search,
    run_offline,
    run_online_into,
)
from dualpath.scheduler import GlobalScheduler, SchedulerParams, get_policy
from dualpath.scheduler.driver import SchedulerDriver, group_by_node
from dualpath.scheduler.state import EngineSnapshot
from dualpath.types import PathKind
from dualpath.workload.arrivals import SLO
from dualpath.workload.trajectory import Trajectory, Turn

BT = 16


@dataclass
class _Timings:
    t_submit: float
    t_first_token: float
    t_second_token: float
    t_done: float


@dataclass
class _Result:
    token_ids: list[int]
    prompt_tokens: int
    hit_tokens: int
    path: PathKind
    timings: _Timings
    link_bytes: dict[str, int] = field(default_factory=dict)


def _keys(ids: np.ndarray) -> list[str]:
    out, h = [], b""
    for i in range(len(ids) // BT):
        h = hashlib.sha256(h + ids[i * BT : (i + 1) * BT].tobytes()).digest()
        out.append(h.hex())
    return out


class FakeCluster:
    """1 PE node (engines 0, 1) and 2 DE nodes (engines 0 / 1); reads take ``read_s_per_block`` per block."""

    def __init__(self, *, kv_pool: int = 10_000, read_s_per_block: float = 0.002, fail_session: int | None = None):
        self.stored: set[str] = set()
        self.kv_pool = kv_pool
        self.read_s = read_s_per_block
        self.fail_session = fail_session
        self.pe_inflight: dict[int, list[int]] = {0: [], 1: []}
        self.de_inflight: dict[int, list[int]] = {0: [], 1: []}
        self.read_q = {("pe", 0): 0, ("de", 0): 0, ("de", 1): 0}
        self.calls: list[tuple[int, int, int, PathKind, int | None, int]] = []
        self.snapshots_taken = 0
        self.locks = {k: anyio.Lock() for k in self.read_q}  # one storage NIC per node: reads queue up

    def snapshots(self) -> tuple[list[EngineSnapshot], list[EngineSnapshot]]:
        self.snapshots_taken += 1
        pes = [EngineSnapshot(e, 0, len(v), sum(v), self.read_q[("pe", 0)]) for e, v in self.pe_inflight.items()]
        des = [
            EngineSnapshot(e, e, len(v), sum(v), self.read_q[("de", e)], self.kv_pool - sum(v))
            for e, v in self.de_inflight.items()
        ]
        return pes, des

    def lookup(self, prompt_ids: np.ndarray) -> int:
        n = 0
        for k in _keys(prompt_ids):
            if k not in self.stored:
                break
            n += 1
        return n * BT

    async def run_turn(self, session, prompt_ids, gen_tokens, pe, de, path, pe_blocks=None):  # type: ignore[no-untyped-def]
        t0 = asyncio.get_running_loop().time()
        hit = self.lookup(prompt_ids)
        self.calls.append((session, pe, de, path, pe_blocks, hit))
        n = len(prompt_ids)
        self.pe_inflight[pe].append(n)
        self.de_inflight[de].append(n + gen_tokens)
        side = ("pe", 0) if path is PathKind.PE else ("de", de)
        self.read_q[side] += hit
        try:
            async with self.locks[side]:
                await anyio.sleep(self.read_s * hit / BT)
        finally:
            self.read_q[side] -= hit
            self.pe_inflight[pe].remove(n)
        if session == self.fail_session:
            self.de_inflight[de].remove(n + gen_tokens)
            raise EngineError(f"session {session} failed on purpose")
        t1 = asyncio.get_running_loop().time()
        rng = np.random.default_rng(n)
        gen = rng.integers(1, 1000, size=gen_tokens).tolist()
        await anyio.sleep(0.001 * gen_tokens)
        full = np.concatenate([np.asarray(prompt_ids, dtype=np.int64), np.asarray(gen[:-1], dtype=np.int64)])
        self.stored.update(_keys(full))
        self.de_inflight[de].remove(n + gen_tokens)
        t2 = asyncio.get_running_loop().time()
        return _Result(gen, n, hit, path, _Timings(t0, t1, t1 + 0.001, t2), {"x": hit})


def _trajs(n: int, turns: int = 4) -> list[Trajectory]:
    return [Trajectory(i, [Turn(20 + 7 * i, 5 + j) for j in range(turns)]) for i in range(n)]


def _driver(cluster: FakeCluster, policy: str = "dualpath", **kw) -> SchedulerDriver:  # type: ignore[no-untyped-def]
    sched = GlobalScheduler(get_policy(policy), SchedulerParams(alpha_tokens=64, beta_tokens=10_000, block_tokens=BT))
    return SchedulerDriver(cluster, sched, fetch_interval_s=0.001, **kw)


def test_group_by_node() -> None:
    snaps = [EngineSnapshot(3, 1, 0, 0, 0), EngineSnapshot(0, 0, 0, 0, 0), EngineSnapshot(2, 1, 0, 0, 0)]
    assert [[s.engine for s in g] for g in group_by_node(snaps)] == [[0], [2, 3]]


def test_offline_replay_through_driver_hits_previous_turns() -> None:
    cluster = FakeCluster()
    trajs = _trajs(6)

    async def main() -> ClientResult:
        async with _driver(cluster) as drv:
            return await run_offline(drv, trajs, vocab_size=1000, seed=1)

    res = anyio.run(main)
    assert len(res.records) == 24 and res.agents_done == 6
    by_agent: dict[int, list] = {}
    for r in res.records:
        by_agent.setdefault(r.agent, []).append(r)
    for agent, recs in by_agent.items():
        recs.sort(key=lambda r: r.turn)
        ctx = 0
        for r in recs:
            o = r.outcome
            assert o.prompt_tokens == ctx + r.append
            # everything of the previous turns but the last generated token is stored in whole blocks
            assert o.hit_tokens == (max(ctx - 1, 0) // BT) * BT
            assert len(o.tokens) == r.gen and o.session == agent
            ctx = o.prompt_tokens + r.gen
    # the driver applied exactly the core's decisions: valid engines, both read sides used by dualpath
    assert {c[1] for c in cluster.calls} <= {0, 1} and {c[2] for c in cluster.calls} <= {0, 1}
    paths = {c[3] for c in cluster.calls if c[5] > 0}
    assert PathKind.PE in paths and PathKind.DE in paths
    for _, _, _, path, pe_blocks, hit in cluster.calls:
        if path is PathKind.PE:
            assert pe_blocks == hit // BT
        elif path is PathKind.DE:
            assert pe_blocks == 0


def test_pe_only_policy_reads_on_pe_side_only() -> None:
    cluster = FakeCluster()

    async def main() -> None:
        async with _driver(cluster, "pe_only") as drv:
            await run_offline(drv, _trajs(3, 3), vocab_size=1000)

    anyio.run(main)
    assert {c[3] for c in cluster.calls} == {PathKind.PE}


def test_a_prefix_stored_while_a_turn_waited_is_read() -> None:
    # three sessions send one prompt at once; each DE holds one turn, so the third waits for a DE, and by the time it
    # is assigned the first turn has stored the prompt's blocks: the core must plan its read with that hit (PE
    # path: every hit block on the PE side), not the 0 it was submitted with
    cluster = FakeCluster(kv_pool=80)
    prompt = np.arange(1, 65)

    async def main() -> None:
        async with _driver(cluster, "pe_only") as drv, anyio.create_task_group() as tg:
            for s in range(3):
                tg.start_soon(drv.run_turn, s, prompt, 4)

    anyio.run(main)
    assert [c[5] for c in cluster.calls] == [0, 0, 64]  # the double counts every stored block
    for _, _, _, path, pe_blocks, hit in cluster.calls:
        assert path is PathKind.PE and pe_blocks == hit // BT


def test_driver_respects_kv_memory_and_rejects_too_large() -> None:
    # a DE holds 120 tokens: the scheduler may never put two 60+ token requests on one DE at once
    cluster = FakeCluster(kv_pool=120)

    async def main() -> None:
        async with _driver(cluster, max_request_tokens=120) as drv:
            await run_offline(drv, [Trajectory(i, [Turn(50, 5)]) for i in range(6)], vocab_size=1000)
            with pytest.raises(EngineError, match="needs more KV memory"):
                await drv.run_turn(99, np.arange(200), 5)

    anyio.run(main)
    assert len(cluster.calls) == 6


def test_turn_failure_propagates_to_client() -> None:
    cluster = FakeCluster(fail_session=2)

    async def main() -> None:
        async with _driver(cluster) as drv:
            await run_offline(drv, _trajs(4, 2), vocab_size=1000)

    with pytest.raises(BaseException) as info:
        anyio.run(main)
    assert "failed on purpose" in repr(info.value) or any(
        "failed on purpose" in str(e) for e in getattr(info.value, "exceptions", [])
    )


def test_cancellation_leaves_no_tasks_and_keeps_finished_turns() -> None:
    cluster = FakeCluster(read_s_per_block=0.02)
    res = ClientResult([], 0.0, 0.0, 0, 0)
    leftover: list[asyncio.Task] = []

    async def main() -> None:
        async with _driver(cluster) as drv:
            from dualpath.runtime.clients import run_offline_into

            with anyio.move_on_after(0.3):
                await run_offline_into(drv, _trajs(8, 20), res, vocab_size=1000)
        me = asyncio.current_task()
        leftover.extend(t for t in asyncio.all_tasks() if t is not me)

    anyio.run(main)
    assert leftover == []
    assert 0 < len(res.records) < 160
    assert all(r.outcome.t_done > 0 for r in res.records)


def test_online_client_and_capacity_search() -> None:
    slo = SloCheck(SLO(ttft_s=0.08, tpot_s=0.01))
    seen: list[float] = []

    async def trial(rate: float) -> tuple[bool, float, float, int]:
        seen.append(rate)
        # a cluster whose read time grows with load: one shared PE node, slow reads
        cluster = FakeCluster(read_s_per_block=0.005)
        res = ClientResult([], 0.0, 0.0, 0, 0)
        trajs = _trajs(6, 3)
        from dualpath.workload.arrivals import poisson_arrivals

        async with _driver(cluster, "pe_only") as drv:
            await run_online_into(drv, trajs, poisson_arrivals(len(trajs), rate, seed=3), res, vocab_size=1000)
        ttft, tpot = slo.measure(res.records)
        return slo.met(res.records), ttft, tpot, len(res.records)

    async def search():  # type: ignore[no-untyped-def]
        return await capacity_search(trial, lo=4.0, hi=16.0, iterations=2)

    cap = anyio.run(search)
    assert 0 < cap.capacity_aps < 320, cap.points  # slow reads queue up: some rate fails
    # the search probes lo first and reports a rate that was tried and met the SLO (or 0)
    assert seen[0] == 4.0
    ok_rates = [p.rate_aps for p in cap.points if p.ok]
    assert cap.capacity_aps == (max(ok_rates) if ok_rates else 0.0)
    assert all(p.turns == 18 for p in cap.points)


def test_capacity_search_bisects_a_known_threshold() -> None:
    async def trial(rate: float) -> tuple[bool, float, float, int]:
        return rate <= 3.3, 0.0, 0.0, 1

    async def main():  # type: ignore[no-untyped-def]
        return await capacity_search(trial, lo=1.0, hi=2.0, iterations=8, rel_tol=0.01)

    cap = anyio.run(main)
    assert 3.2 <= cap.capacity_aps <= 3.3
    async def bad():  # type: ignore[no-untyped-def]
        return await capacity_search(trial, lo=2.0, hi=1.0)

    with pytest.raises(WorkloadError):
        anyio.run(bad)


class _RemoteLike(FakeCluster):
    """A cluster like the deployment's: asynchronous lookup, no ``stored_blocks``; it names prompt block keys and
    calls the driver's ``turn_stored`` once a turn's prompt is stored (after a 50 ms prefill; decode 300 ms)."""

    block_tokens = BT

    def __init__(self, *, notify: bool = True, fail_first: bool = False) -> None:
        super().__init__()
        self.notify = notify
        self.fail_first = fail_first
        self.starts: dict[int, float] = {}
        self.stored_at: list[float] = []

    async def lookup(self, prompt_ids: np.ndarray) -> int:  # type: ignore[override]
        return FakeCluster.lookup(self, prompt_ids)

    def prompt_keys(self, prompt_ids: np.ndarray) -> tuple[list[str], int]:
        keys = _keys(np.asarray(prompt_ids))
        return keys, min(len(keys), (len(prompt_ids) - 1) // BT)

    async def run_turn(self, session, prompt_ids, gen_tokens, pe, de, path, pe_blocks=None):  # type: ignore[no-untyped-def]
        from dualpath.scheduler.driver import turn_stored

        t0 = anyio.current_time()
        self.starts[session] = t0
        hit = FakeCluster.lookup(self, prompt_ids)
        self.calls.append((session, pe, de, path, pe_blocks, hit))
        await anyio.sleep(0.05)
        if self.fail_first and len(self.starts) == 1:
            raise EngineError(f"session {session}: its decode engine died")
        self.stored.update(_keys(np.asarray(prompt_ids)))
        cb = turn_stored.get()
        if cb is not None and self.notify:
            self.stored_at.append(anyio.current_time())
            cb()
        await anyio.sleep(0.3)
        t = anyio.current_time()
        return _Result([1] * gen_tokens, len(prompt_ids), hit, path, _Timings(t0, t0 + 0.05, t0 + 0.06, t))


@pytest.mark.parametrize("notify", [True, False])
def test_turns_held_on_a_prefix_go_together_once_it_is_stored(notify: bool) -> None:
    # four turns share 4 blocks and are submitted together to a cluster without a synchronous lookup: one computes
    # them; the other three wait until it says its prompt is stored (else until it ends) and then all go in one
    # round: the blocks it stored count as stored for them, so none of them waits for another reader
    cluster = _RemoteLike(notify=notify)
    shared = np.arange(1, 4 * BT + 1)
    prompts = [np.concatenate([shared, np.arange(100 + 20 * s, 100 + 20 * s + BT)]) for s in range(4)]

    async def main() -> int:
        async with _driver(cluster, "pe_only", inflight_prefix_min_tokens=4 * BT) as drv, \
                anyio.create_task_group() as tg:
            for s in range(4):
                tg.start_soon(drv.run_turn, s, prompts[s], 4)
        return drv.stats.held

    held = anyio.run(main)
    assert held == 3
    assert sorted(c[5] for c in cluster.calls) == [0, 4 * BT, 4 * BT, 4 * BT]
    # and planned with the blocks known stored (the core's refresh_hit), not the hit of 0 they were submitted with
    assert sorted(c[4] for c in cluster.calls) == [0, 4, 4, 4]
    first = min(cluster.starts, key=cluster.starts.__getitem__)
    later = [t for s, t in cluster.starts.items() if s != first]
    released = cluster.starts[first] + (0.05 if notify else 0.35)
    assert min(later) >= released and max(later) - min(later) < 0.04


def test_turns_held_on_a_turn_that_fails_go_at_its_failure_and_compute() -> None:
    # the turn computing the shared blocks fails before they are stored: the three held on it go as it fails (not
    # after inflight_prefix_wait_s); nothing was stored, so the first of them computes the prefix and the other two
    # wait for it in turn, then read it
    cluster = _RemoteLike(fail_first=True)
    shared = np.arange(1, 4 * BT + 1)
    prompts = [np.concatenate([shared, np.arange(100 + 20 * s, 100 + 20 * s + BT)]) for s in range(4)]
    errors: list[BaseException] = []

    async def one(drv: SchedulerDriver, s: int) -> None:
        try:
            await drv.run_turn(s, prompts[s], 4)
        except EngineError as exc:
            errors.append(exc)

    async def main() -> None:
        async with _driver(cluster, "pe_only", inflight_prefix_min_tokens=4 * BT) as drv, \
                anyio.create_task_group() as tg:
            for s in range(4):
                tg.start_soon(one, drv, s)

    anyio.run(main)
    assert len(errors) == 1 and len(cluster.calls) == 4
    first = min(cluster.starts, key=cluster.starts.__getitem__)
    later = sorted(t for s, t in cluster.starts.items() if s != first)
    assert later[0] - cluster.starts[first] < 1.0  # released by the failure, far before the 30 s wait
    assert sorted(c[5] for c in cluster.calls) == [0, 0, 4 * BT, 4 * BT]
