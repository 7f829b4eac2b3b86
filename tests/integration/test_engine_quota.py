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
        one = pe.model.predict_prefill_s(0, 96)
        assert one is not None and one > 0
        # room for exactly `quota_requests` identical requests (half a request of slack)
        cfg.cluster.prefill_quota_s = one * (quota_requests + 0.5)
        for t in _turns(cluster, 7, 96):
            pe.queue.append(t)
        sizes = []
        while pe.queue:
            sizes.append(len(pe._take_batch()))
        assert sizes[:-1] == [quota_requests] * (len(sizes) - 1) and 0 < sizes[-1] <= quota_requests
        assert sum(sizes) == 7


async def test_without_a_quota_batches_by_size_only_and_a_too_large_head_still_runs() -> None:
    cfg = synthetic_config(prefill_max_batch=4)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        for t in _turns(cluster, 6, 96):
            pe.queue.append(t)
        assert len(pe._take_batch()) == 4  # no quota: prefill_max_batch
        cfg.cluster.prefill_quota_s = 1e-12  # smaller than any one request
        assert len(pe._take_batch()) == 1  # the head still runs (whole: the runtime does not chunk)
