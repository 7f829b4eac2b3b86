"""The PE packs its forward batches under the compute quota (paper 7.5) using the model's predicted time."""

from __future__ import annotations

import pytest
from engine_helpers import synthetic_config

from dualpath.cluster import Cluster
from dualpath.engine.request import Turn
from dualpath.types import PathKind

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _turns(cluster: Cluster, n: int, prompt: int) -> list[Turn]:
    layout = cluster.layout
    return [Turn(f"s{i}", list(range(1, prompt + 1)), 1, 0, 0, PathKind.RECOMPUTE, [], 0, 0, layout) for i in range(n)]


@pytest.mark.parametrize("quota_requests", [1, 2, 3])
async def test_forward_batches_respect_the_compute_quota(quota_requests: int) -> None:
    cfg = synthetic_config(prefill_max_batch=8)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        predict = pe.model.predict_prefill_s
        one = predict(0, 96)
        assert one is not None and one > 0
        # room for `quota_requests` identical requests and half of the next: the quota cuts that one
        quota = cfg.cluster.prefill_quota_s = one * (quota_requests + 0.5)
        turns = _turns(cluster, 7, 96)
        pe.queue.extend(turns)
        done = {t.rid: 0 for t in turns}
        sizes = []
        while pe.queue:
            batch = pe._take_batch()
            sizes.append(len(batch))
            # FIFO: the batch is the queue's head, each request continuing where its last chunk ended
            assert [c.turn for c in batch] == turns[: len(batch)]
            assert all(c.start == done[c.turn.rid] < c.end for c in batch)
            used = [predict(c.start, c.end - c.start) or 0.0 for c in batch]
            assert sum(used) <= quota
            last = batch[-1]
            if not last.final:  # cut: one more token would not have fit
                more = predict(last.start, last.end - last.start + 1) or 0.0
                assert sum(used[:-1]) + more > quota
            for c in batch:
                done[c.turn.rid] = c.end
            pe._settle(batch)  # (what the engine does after the forward: the cut request heads the queue)
            turns = [t for t in turns if done[t.rid] < 96]
        assert all(v == 96 for v in done.values())
        assert sizes[0] == quota_requests + 1 and pe.chunks >= 2  # whole ones plus a cut one, in two pieces
        assert pe.chunk_bytes == 0


async def test_without_a_quota_batches_by_size_only_and_a_too_large_head_still_runs() -> None:
    cfg = synthetic_config(prefill_max_batch=4)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        for t in _turns(cluster, 6, 96):
            pe.queue.append(t)
        assert len(pe._take_batch()) == 4  # no quota: prefill_max_batch
        cfg.cluster.prefill_quota_s = 1e-12  # smaller than any one token
        batch = pe._take_batch()
        assert [(c.start, c.end) for c in batch] == [(0, 1)]  # the head still progresses, one token at a time
