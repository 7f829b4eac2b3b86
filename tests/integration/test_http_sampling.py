"""Sampling in the decode engine (temperature / top-k / top-p / seed / stop ids), per-token streaming and
cancellation of a turn through the in-process cluster (the parts the HTTP API relies on)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
import torch
from engine_helpers import synthetic_config

from dualpath.cluster import Cluster
from dualpath.engine.decode import kv_target
from dualpath.engine.sampling import Sampler, SamplingParams, filtered_probs
from dualpath.errors import ModelError


def _reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Independent numpy version of the filter chain (sort once, cut, renormalise)."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, dtype=bool)
    if top_k > 0:
        keep[:] = False
        keep[order[:top_k]] = True
        kth = x[order[top_k - 1]]
        keep |= x >= kth  # ties with the k-th value stay
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass = 0.0
        cut = np.zeros_like(keep)
        for i in order:
            if mass >= top_p:
                cut[i] = True
            mass += p[i]
        p = np.where(cut, 0.0, p)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.6)])
def test_filtered_probs_match_a_numpy_reference(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, generator=g) * 3
    got = filtered_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)).numpy()
    ref = _reference_probs(logits.numpy(), temperature, top_k, top_p)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    if top_k:
        assert (got > 0).sum() <= top_k


def test_sampler_is_deterministic_per_seed_and_follows_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    p = SamplingParams(temperature=1.0, seed=11)
    a = [Sampler(p)(logits) for _ in range(1)]
    s1, s2, s3 = Sampler(p), Sampler(p), Sampler(SamplingParams(temperature=1.0, seed=12))
    d1 = [s1(logits) for _ in range(4000)]
    d2 = [s2(logits) for _ in range(4000)]
    d3 = [s3(logits) for _ in range(4000)]
    assert d1 == d2 and d1[0] == a[0]
    assert d1 != d3
    freq = np.bincount(d1, minlength=5) / len(d1)
    np.testing.assert_allclose(freq, torch.softmax(logits, 0).numpy(), atol=0.03)
    # temperature 0 and top_k 1 are greedy whatever the seed
    assert Sampler(SamplingParams(temperature=0.0, seed=5))(logits) == 0
    assert all(Sampler(SamplingParams(temperature=1.0, top_k=1, seed=s))(logits) == 0 for s in range(20))


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2},
                                 {"seed": -1}])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ModelError, match="sampling\\."):
        SamplingParams(**bad)


def _all_free(c: Cluster) -> None:
    pes, des = c.snapshots()
    assert all(s.seq == 0 and s.tok == 0 for s in (*pes, *des))
    assert all(d.free_kv_tokens == c.config.cluster.kv_pool_tokens for d in des)
    assert all(e.host.used_bytes == 0 for e in (*c.pes, *c.des))
    assert all(not d.running for d in c.des)


@pytest.mark.anyio
async def test_cluster_sampling_streaming_stop_and_cancel():
    prompt = list(range(1, 70))
    async with Cluster(synthetic_config()) as c:
        greedy = (await c.run_turn("g", prompt, 12, path="recompute")).token_ids
        same = (await c.run_turn("g", prompt, 12, path="de", sampling=SamplingParams(temperature=0.0))).token_ids
        assert same == greedy
        sp = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
        streamed: list[int] = []
        r1 = await c.run_turn("s", prompt, 12, path="pe", sampling=sp, on_token=streamed.append)
        r2 = await c.run_turn("s", prompt, 12, path="de", sampling=sp)
        r3 = await c.run_turn("s", prompt, 12, path="de", sampling=SamplingParams(temperature=1.0, seed=43))
        assert r1.token_ids == r2.token_ids == streamed and len(streamed) == 12
        assert r3.token_ids != r1.token_ids and r1.token_ids != greedy
        # a stop id ends the turn at its first occurrence (the stop token is the last one returned)
        stop = greedy[5]
        k = greedy.index(stop) + 1
        r = await c.run_turn("t", prompt, 12, path="de", sampling=SamplingParams(stop_ids=(stop,)))
        assert r.token_ids == greedy[:k]
        _all_free(c)
        # the next turn hits every full block of this turn's prompt and generated tokens
        nxt = prompt + r.token_ids + [5, 6, 7]
        assert c.lookup(nxt) == kv_target(len(prompt), k, 16) // 16 * 16
        # stopping exactly where a block fills persists that block too (one more decode step puts its KV in)
        p2 = list(range(3, 3 + 80 - k))
        g2 = (await c.run_turn("b", p2, 12, path="recompute")).token_ids
        k2 = g2.index(g2[k - 1]) + 1
        r = await c.run_turn("b", p2, 12, path="pe", sampling=SamplingParams(stop_ids=(g2[k - 1],)))
        assert r.token_ids == g2[:k2]
        assert c.lookup(p2 + r.token_ids + [1]) == kv_target(len(p2), k2, 16) // 16 * 16
        _all_free(c)
        # cancelling the caller mid-decode cancels the turn on both engines and frees everything
        for path in ("pe", "de", "split"):
            got: list[int] = []
            first = anyio.Event()

            def on_tok(t: int, got=got, first=first) -> None:
                got.append(t)
                first.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda p=path: c.run_turn("x", prompt + [9, 9], 400, path=p, on_token=on_tok))
                with anyio.fail_after(30):
                    await first.wait()
                tg.cancel_scope.cancel()
            assert 1 <= len(got) < 400
            _all_free(c)
        r = await c.run_turn("after", prompt, 12, path="de")
        assert r.token_ids == greedy
        _all_free(c)
