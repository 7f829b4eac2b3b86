"""Turns sent together with one long prompt prefix compute it once (SchedulerDriver over a real Cluster)."""

from __future__ import annotations

import anyio
import torch
from engine_helpers import synthetic_config

from dualpath import create_scheduler
from dualpath.cluster import Cluster
from dualpath.scheduler.driver import SchedulerDriver

SHARED = 256  # 16 blocks of 16 tokens: inflight_prefix_min_tokens' default


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(1, 211, (SHARED,), generator=g).tolist()
    return [shared + torch.randint(1, 211, (16,), generator=g).tolist() for _ in range(n)]


async def _replay(wait_s: float, persist: bool = True) -> tuple[list[int], list[list[int]], int]:
    cfg = synthetic_config(persist=persist)
    results: dict[int, object] = {}
    async with Cluster(cfg) as cluster:
        sched = create_scheduler(cfg, policy="dualpath", cluster=cluster)
        drv = SchedulerDriver(cluster, sched, inflight_prefix_wait_s=wait_s)
        async with drv:

            async def one(i: int, prompt: list[int]) -> None:
                results[i] = await drv.run_turn(i, prompt, 4)

            async with anyio.create_task_group() as tg:  # all four are submitted before the first round
                for i, p in enumerate(_prompts(4)):
                    tg.start_soon(one, i, p)
    turns = [results[i] for i in range(4)]
    return [t.hit_tokens for t in turns], [t.token_ids for t in turns], drv.stats.held  # type: ignore[attr-defined]


def test_turns_sent_together_wait_for_the_prefix_one_of_them_computes() -> None:
    hits, tokens, held = anyio.run(_replay, 30.0)
    # one turn computes the shared 256 tokens; the other three wait until its decode engine stores them, then
    # read them (each of them waited once)
    assert sorted(hits) == [0, SHARED, SHARED, SHARED] and held == 3
    hits0, tokens0, held0 = anyio.run(_replay, 0.0)  # never wait: all four compute it
    assert hits0 == [0, 0, 0, 0] and held0 == 0
    assert tokens == tokens0  # only when a turn starts changed: the KV it read is the KV it would have computed


def test_no_turn_waits_for_a_prefix_that_is_never_stored() -> None:
    # cluster.persist off: decode engines store nothing, so waiting could only delay a turn until the other ends
    hits, _, held = anyio.run(_replay, 30.0, False)
    assert hits == [0, 0, 0, 0] and held == 0
