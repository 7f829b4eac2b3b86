"""The PE packs its forward batches under the compute quota (paper 7.5) using the model's predicted time."""

from __future__ import annotations

import pytest
from engine_helpers import synthetic_config

from dualpath.cluster import Cluster
from dualpath.engine.request import Turn
from dualpath.types import PathKind

pytestmark = pytest.mark.anyio


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


async def test_a_cut_request_gives_its_host_region_back_after_its_first_chunk() -> None:
    """The PE-read hit is loaded onto the device by a request's first chunk; the later chunks read the rows kept
    on the device, so the host buffer region goes back as soon as the first chunk is done, not at the end."""
    cfg = synthetic_config(prefill_max_batch=8)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        one = pe.model.predict_prefill_s(0, 96)
        assert one is not None
        cfg.cluster.prefill_quota_s = one * 0.5  # every request is cut
        (t,) = _turns(cluster, 1, 96)
        base = pe.host.used_bytes
        t.pe_host = await pe.host.alloc(4096, 1.0)
        pe.queue.append(t)
        batch = pe._take_batch()
        assert len(batch) == 1 and batch[0].first and not batch[0].final
        pe._settle(batch)
        assert t.pe_host is None and pe.host.used_bytes == base, "the host region is held past the first chunk"
        while pe.queue:
            pe._settle(pe._take_batch())
        assert pe.host.used_bytes == base


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


async def test_the_quota_never_cuts_a_batch_below_the_models_efficient_size() -> None:
    """Never lose: where a forward has a fixed cost, small batches waste the PE, so the quota does not cut a
    batch below the size at which the model's predicted throughput reaches 90 % of its best."""
    from dualpath.engine.timemodel import LayerTimeModel

    tm = LayerTimeModel(a=1.0, b=0.01, e=0.0, d=0.0, n_layers=1)  # 1 s per forward, 10 ms per token
    assert tm.efficient_batch_tokens(4096) == 724  # by hand: n / (1 + 0.01 n) >= 0.9 * 4096 / 41.96, n >= 723.4
    assert tm.efficient_batch_tokens(1024) == 456  # n / (1 + 0.01 n) >= 0.9 * 1024 / 11.24, n >= 455.4
    assert LayerTimeModel(a=0.0, b=1.0, e=0.0, d=0.0, n_layers=3).efficient_batch_tokens(4096) == 1
    cfg = synthetic_config(prefill_max_batch=8)
    async with Cluster(cfg) as cluster:
        pe = cluster.pes[0]
        pe.model.predict_prefill_s = lambda cached, new: tm.prefill_s(cached, new)  # type: ignore[method-assign]
        pe.model.efficient_prefill_tokens = tm.efficient_batch_tokens  # type: ignore[method-assign]
        assert cfg.cluster.prefill_max_batch_tokens == 1024
        cfg.cluster.prefill_quota_s = tm.prefill_s(0, 100)  # the paper's quota would cut at 100 tokens
        pe.queue.extend(_turns(cluster, 2, 1000))
        batch = pe._take_batch()
        assert [(c.start, c.end) for c in batch] == [(0, 456)]  # cut at the efficient size, not at 100
        pe._settle(batch)
        pe.model.efficient_prefill_tokens = lambda cap: 0  # type: ignore[method-assign]
        pe._min_tokens = None
        assert [(c.start, c.end) for c in pe._take_batch()] == [(456, 556)]  # without the floor: the quota's 100


@pytest.mark.parametrize("queued", [1, 2])
async def test_the_floor_leaves_the_last_request_no_tail(queued: int) -> None:
    # the quota's floor (the model's efficient batch size, 64 tokens here) cuts a 96-token request at 64; alone in
    # the queue its 32-token tail would be a forward of its own, so it is prefilled whole; with a request queued
    # behind it the cut stands (the tail joins that request's batch)
    cfg = synthetic_config(prefill_max_batch=8)
    cluster = Cluster(cfg)
    async with cluster:
        pe = cluster.pes[0]
        pe.model.efficient_prefill_tokens = lambda cap: 64  # type: ignore[method-assign]
        cfg.cluster.prefill_quota_s = pe.model.predict_prefill_s(0, 40)
        turns = _turns(cluster, queued, 96)
        pe.queue.extend(turns)
        batch = pe._take_batch()
        assert [(c.start, c.end) for c in batch] == ([(0, 96)] if queued == 1 else [(0, 64)])
