"""Turns sent together with one long prompt prefix compute it once (SchedulerDriver over a real Cluster)."""

from __future__ import annotations

from dataclasses import replace

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


class _Stub:
    """A cluster whose store holds the first ``stored`` blocks of every prompt (blocks keyed by position)."""

    block_tokens = 16
    persists = True

    def __init__(self) -> None:
        self.stored = 0

    def snapshots(self):  # type: ignore[no-untyped-def]
        return [], []

    def lookup(self, prompt_ids) -> int:  # type: ignore[no-untyped-def]
        return self.stored * 16

    def prompt_keys(self, prompt_ids):  # type: ignore[no-untyped-def]
        keys = [("block", i) for i in range(len(prompt_ids) // 16)]
        return keys, min(len(keys), (len(prompt_ids) - 1) // 16)

    def stored_blocks(self, keys) -> int:  # type: ignore[no-untyped-def]
        return min(self.stored, len(keys))

    async def run_turn(self, *args):  # type: ignore[no-untyped-def]
        raise AssertionError("not dispatched in this test")


def test_a_turn_that_looks_up_while_the_prefix_is_being_written_still_waits() -> None:
    """A turn whose lookup lands while another turn's 18-block prefix is being written sees 5 blocks stored and
    13 (208 tokens, under the 256-token threshold) still registered: the prefix in flight is 18 blocks, so it
    waits for the write's tail instead of computing them (the race behind a flaky cached-token count)."""
    from dualpath.config import DualPathConfig
    from dualpath.scheduler.driver import _Pending
    from dualpath.scheduler.state import RequestInfo

    stub = _Stub()
    drv = SchedulerDriver(stub, create_scheduler(DualPathConfig(), policy="dualpath"))  # type: ignore[arg-type]
    keys, _ = stub.prompt_keys(list(range(304)))
    drv._pending[1] = _Pending(1, list(range(304)), 1, 0, 0.0)
    info = RequestInfo(1, context=0, append=304, hit=0, gen=1)
    drv._computing.add(keys[:18])  # the turn computing the shared prefix registered its 18 blocks
    assert drv._hold(info)  # nothing written yet: 18 blocks in flight
    stub.stored = 5
    assert drv._hold(replace(info, context=80, append=224, hit=80))  # mid-write: 5 written + 13 in flight
    drv._computing.remove(keys[:18])
    assert not drv._hold(replace(info, context=80, append=224, hit=80))  # written (registration ended)
    drv._computing.add(keys[5:18])  # 13 blocks computed past a prefix another, finished turn stored
    assert not drv._hold(replace(info, context=80, append=224, hit=80))  # 208 tokens: under the threshold
