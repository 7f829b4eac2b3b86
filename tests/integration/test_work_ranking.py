"""DualPath ranks the runtime's prefill engines by predicted work (dualpath.engine.work), as the simulator does: real
engines of the in-process cluster report it, the driver hands the core its predictor, and Basic keeps the paper's
ranking by tokens."""

from __future__ import annotations

from dataclasses import replace

import anyio
import pytest
from engine_helpers import synthetic_config

from dualpath.cluster import Cluster
from dualpath.engine.request import Turn
from dualpath.runtime.clients import run_offline
from dualpath.scheduler import GlobalScheduler, SchedulerParams, get_policy
from dualpath.scheduler.driver import SchedulerDriver, group_by_node
from dualpath.scheduler.state import RequestInfo
from dualpath.types import PathKind
from dualpath.workload.trajectory import Trajectory
from dualpath.workload.trajectory import Turn as Step

pytestmark = pytest.mark.anyio
BT = 16


def _turn(cluster: Cluster, prompt: int, stored_blocks: int, pe: int) -> Turn:
    return Turn(f"s{prompt}", list(range(1, prompt + 1)), 1, pe, 0, PathKind.PE, [], stored_blocks, stored_blocks,
                cluster.layout)


def _sched(policy: str = "dualpath") -> GlobalScheduler:
    return GlobalScheduler(get_policy(policy), SchedulerParams(alpha_tokens=1 << 30, beta_tokens=1 << 30,
                                                               block_tokens=BT))


async def test_the_least_work_engine_gets_the_request_not_the_fewest_tokens() -> None:
    cluster = Cluster(synthetic_config(engines_per_node=2, prefill_max_batch=8))
    async with cluster:
        pred = await anyio.to_thread.run_sync(cluster.work_predictor)
        assert pred is not None and all(pe.work_model is not None for pe in cluster.pes)
        pe0, pe1 = cluster.pes
        first = _turn(cluster, 1000, 0, 0)  # a first prompt: everything to compute
        nxt = _turn(cluster, 1200, 74, 1)  # an agent's next turn: 1,184 of 1,200 tokens stored
        pe0.assign(first)
        pe1.assign(nxt)
        pes, des = cluster.snapshots()
        assert (pes[0].tok, pes[1].tok) == (1000, 1200)
        assert pes[0].work == pred(RequestInfo(0, 0, 1000, 0, 1)) > 10 * pes[1].work > 0

        def pick(pe_work: bool) -> int:
            s = _sched()
            snaps = pes if pe_work else [replace(p, work=-1) for p in pes]
            if pe_work:
                s.pe_work = pred
            s.submit(RequestInfo(7, context=0, append=500, hit=0, gen=4))
            (a,) = s.schedule(group_by_node(snaps), group_by_node(des))
            return a.pe

        assert pick(pe_work=True) == 1  # ranked by work: the engine that is nearly done
        assert pick(pe_work=False) == 0  # ranked by tokens (the paper's Algorithm 1)
        pe0.unassign(first)
        pe1.unassign(nxt)
        assert [p.work for p in cluster.snapshots()[0]] == [0, 0]


@pytest.mark.parametrize(("policy", "ranking", "ranked"),
                         [("dualpath", True, True), ("basic", True, False), ("dualpath", False, False)])
async def test_the_driver_ranks_dualpath_by_work_and_the_work_drains(policy: str, ranking: bool,
                                                                     ranked: bool) -> None:
    cluster = Cluster(synthetic_config(engines_per_node=2, prefill_max_batch=4, prefill_quota_s=1e-5))
    sched = _sched(policy)
    agents = [Trajectory(i, [Step(40 + 30 * i, 3), Step(20, 3), Step(200, 2)]) for i in range(4)]
    seen: list[int] = []
    forwards: list[int] = []

    async def watch() -> None:
        while True:
            seen.extend(s.work for s in cluster.snapshots()[0])
            forwards.extend(pe._fwd_work for pe in cluster.pes)
            await anyio.sleep(0.0005)

    async with cluster, SchedulerDriver(cluster, sched, fetch_interval_s=0.001, work_ranking=ranking) as drv:
        assert (sched.pe_work is not None) is ranked
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            res = await run_offline(drv, agents, vocab_size=1000, seed=3)
            tg.cancel_scope.cancel()
        assert res.agents_done == 4
        if ranked:  # every engine reported work while it had some, never less than none, and ends with none
            assert max(seen) > 0 and min(seen) >= 0
            assert max(forwards) > 0  # the engine moved its forwards' shares out of its queue
            assert sum(pe.chunks for pe in cluster.pes) > 0  # (the quota cut requests: shares left chunk by chunk)
        else:
            assert set(seen) == {-1}
        assert [(pe.queued_work, pe.work_now(), pe.seq, pe.tok) for pe in cluster.pes] == [(0, 0, 0, 0)] * 2


async def test_each_chunks_share_leaves_the_queue_as_its_forward_starts() -> None:
    """The engine's work is what its queue holds plus what is left of the forward in progress: a chunk's share of
    its request's work (by new tokens) moves from the queue to the forward as the forward starts."""
    cfg = synthetic_config(prefill_max_batch=8)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        work = await anyio.to_thread.run_sync(cluster.work_predictor)
        assert work is not None
        turns = [_turn(cluster, 96, 0, 0), _turn(cluster, 160, 4, 0)]  # a first prompt, and 64 of 160 stored
        turns[1].hit_blocks = 4  # (its reads are done)
        for t in turns:
            pe.assign(t)
        total = work.work(0, 96) + work.work(64, 96)
        assert pe.queued_work == total == pe.snapshot().work
        cfg.cluster.prefill_quota_s = work.seconds(0, 96) + work.seconds(64, 40) * 1.001  # cuts the second after 40
        pe.queue.extend(turns)
        batch = pe._take_batch()
        assert [(c.start, c.end) for c in batch] == [(0, 96), (64, 104)]
        pe._inflight = [c.turn for c in batch]
        pe._start_work(batch)
        second = work.work(64, 96)
        moved = work.work(0, 96) + second * 40 // 96
        assert pe.queued_work == total - moved and turns[1].pe_work == second - second * 40 // 96
        assert pe.queued_work < pe.work_now() <= total  # the forward just started: nearly all of it is left
        pe._settle(batch)
        assert pe.work_now() == pe.queued_work  # no forward in progress
        batch = pe._take_batch()
        assert [(c.start, c.end) for c in batch] == [(104, 160)]
        pe._inflight = [turns[1]]
        pe._start_work(batch)
        assert pe.queued_work == 0 and turns[1].pe_work == 0  # the final chunk takes the rest
        pe._settle(batch)
        for t in turns:
            pe.unassign(t)
        assert (pe.queued_work, pe.work_now(), pe.seq, pe.tok) == (0, 0, 0, 0)
