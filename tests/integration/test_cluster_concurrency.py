"""Several engines and concurrent sessions: every turn ends with its own tokens, PEs batch, DEs decode in
continuous batches, snapshots report the engines' load."""

from __future__ import annotations

import anyio
import pytest
from engine_helpers import run_session, synthetic_config

from dualpath.cluster import Cluster


@pytest.mark.anyio
async def test_concurrent_sessions_on_many_engines():
    n = 6
    alone = []
    for s in range(n):
        async with Cluster(synthetic_config()) as c:
            alone.append([r.token_ids for r in await run_session(c, "recompute", session=f"s{s}", vocab=1000)])
    cfg = synthetic_config(prefill_nodes=2, decode_nodes=2, snic_gbps=5.0, cnic_gbps=20.0)
    paths = ["pe", "de", "split", "pe", "de", "split"]
    got: dict[int, list[list[int]]] = {}
    async with Cluster(cfg) as c:
        assert [e.name for e in c.pes] == ["pe0", "pe1"] and [e.name for e in c.des] == ["de0", "de1"]

        async def one(s: int) -> None:
            res = await run_session(c, paths[s], pe=s % 2, de=(s // 2) % 2, session=f"s{s}", vocab=1000)
            got[s] = [r.token_ids for r in res]

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for s in range(n):
                    tg.start_soon(one, s)
        pes, des = c.snapshots()
        assert all(p.seq == 0 and p.tok == 0 and p.read_q == 0 for p in pes)
        assert all(d.free_kv_tokens == c.config.cluster.kv_pool_tokens for d in des)
        stats = c.link_stats()
        assert stats["pnode1.snic.read"]["bytes"]["kv"] > 0 and stats["dnode1.snic.read"]["bytes"]["kv"] > 0
    assert [got[s] for s in range(n)] == [alone[0]] * n  # same session tokens -> same outputs everywhere


@pytest.mark.anyio
async def test_prefill_batches_and_decode_batches():
    async with Cluster(synthetic_config(prefill_max_batch=8)) as c:
        prompts = [list(range(1 + i, 60 + i)) for i in range(6)]
        results = {}

        async def one(i: int) -> None:
            results[i] = await c.run_turn(f"s{i}", prompts[i], 8, path="recompute")

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
        assert c.pes[0].forwards < 6  # several requests shared a layer-wise forward
        assert c.des[0].steps < 6 * 7  # several requests shared decode steps
        for i in range(6):
            async with Cluster(synthetic_config()) as alone:
                r = await alone.run_turn("x", prompts[i], 8, path="recompute")
            assert results[i].token_ids == r.token_ids
        assert all(r.timings.t_first_token <= r.timings.t_second_token <= r.timings.t_done for r in results.values())


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["mid-step", "between-steps"])
async def test_a_turn_cancelled_while_decoding_leaves_the_others_alone(when: str):
    """A caller gives up on a turn while the decode engine is stepping it with others. Its sequence leaves the
    batch only once the step in flight ends (its forward still writes the request's pages); the other turns
    decode to their end and every pool page comes back. (The cleanup took it out of the batch under the step:
    when that step was the request's last, its end failed on it, and the engine failed every request it was
    decoding; found by a model-based fuzz of the in-process cluster.) The victim is cancelled after its fifth
    token, so the step in flight (mid-step) is its sixth and last."""
    cfg = synthetic_config()
    cfg.model.decode_step_s = 0.02
    async with Cluster(cfg) as c:
        de = c.des[0]
        free_at_start = de.pool.num_free
        seen: list[int] = []
        results: dict[str, list[int]] = {}

        async def other(i: int) -> None:
            r = await c.run_turn(f"o{i}", list(range(10 + i, 90 + i)), 30, path="recompute", pe=0, de=0)
            results[f"o{i}"] = r.token_ids

        victim = anyio.CancelScope()

        async def doomed() -> None:
            with victim:
                await c.run_turn("v", list(range(300, 380)), 6, path="recompute", pe=0, de=0, on_token=seen.append)

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(other, i)
            tg.start_soon(doomed)
            with anyio.fail_after(30):
                while len(seen) < 5:
                    await anyio.sleep(0.001)
                if when == "mid-step":  # the victim is in the step in flight now
                    while not any(s.turn.session == "v" for s in de._batch):
                        await anyio.sleep(0)
                else:
                    while de._batch:
                        await anyio.sleep(0)
            victim.cancel()
        assert sorted(results) == ["o0", "o1"] and all(len(t) == 30 for t in results.values())
        assert not de.running and de.pool.num_free == free_at_start
