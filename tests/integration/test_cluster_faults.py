"""Faults in the middle of a session: corrupt or missing blocks in storage are recomputed with unchanged output;
a failed transfer ends the turn with an error (or a recompute) within the deadline, never a hang; bad input is
refused before any work starts; nothing submitted is dropped."""

from __future__ import annotations

import os
import time

import anyio
import pytest
import torch
from engine_helpers import BT, run_session, synthetic_config

from dualpath.cluster import Cluster
from dualpath.errors import ConfigError, EngineError, ModelError
from dualpath.storage import blockfile as bf
from dualpath.storage.config import PosixStorageConfig
from dualpath.transports.config import FaultsTransportConfig, ZmqTransportConfig


async def _reference(path: str = "recompute") -> list[list[int]]:
    async with Cluster(synthetic_config()) as c:
        return [r.token_ids for r in await run_session(c, path, vocab=1000)]


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["flip", "delete"])
async def test_bad_block_mid_session_is_recomputed(tmp_path, damage):
    want = await _reference()
    cfg = synthetic_config()
    cfg.storage = PosixStorageConfig(root=tmp_path / "kv")
    async with Cluster(cfg) as c:
        ctx: list[int] = []
        from engine_helpers import SESSION, session_prompts

        chunks = session_prompts(vocab=1000)
        got = []
        for i, ((_, gen), chunk) in enumerate(zip(SESSION, chunks, strict=True)):
            prompt = ctx + chunk
            if i == 2:  # damage the second block of this turn's stored prefix, on disk
                key = c.keyer.keys(prompt)[1]
                assert c.storage.contains(key)
                if damage == "flip":
                    assert c.storage.damage(key, "flip")
                else:
                    os.unlink(bf.block_path(c.storage.root, key.hex))
            res = await c.run_turn("s", prompt, gen, path="de" if i == 2 else "pe")
            got.append(res.token_ids)
            if i == 2:
                assert res.stored_tokens == 4 * BT  # the lookup still claimed it
                assert res.hit_tokens == 1 * BT  # the read found it bad: the hit ends before it
            ctx = prompt + res.token_ids
    assert got == want


@pytest.mark.anyio
@pytest.mark.parametrize("cut,path", [("pe0", "de"), ("de0", "pe")])
async def test_failed_transfer_ends_the_turn(cut, path):
    """cut pe0: the DE's layer stream never reaches the PE; cut de0: the PE's KV never reaches the DE."""
    cfg = synthetic_config(deadline_s=1.0)
    cfg.transport = FaultsTransportConfig(cut_peers=[cut])
    async with Cluster(cfg) as c:
        prompt = list(range(1, 80))
        if cut == "pe0":  # make a hit first (this turn's KV goes PE -> DE, not cut)
            r = await c.run_turn("s", prompt, 3, path="recompute")
            prompt = prompt + r.token_ids + [5, 6]
        with anyio.fail_after(30):  # a hang guard, not a performance assertion
            with pytest.raises(EngineError, match="failed"):
                await c.run_turn("s", prompt, 3, path=path)
        # every buffer and pool page of the failed turn came back
        assert c.pes[0].host.used_bytes == 0 and c.des[0].host.used_bytes == 0
        assert c.des[0].pool.num_free == c.des[0].pool.num_blocks
        assert c.failed_turns == 1


@pytest.mark.anyio
async def test_failed_transfer_falls_back_to_recompute():
    want = await _reference()
    cfg = synthetic_config(deadline_s=1.0, on_transfer_failure="recompute")
    cfg.transport = FaultsTransportConfig(cut_peers=["pe0"])  # the DE path cannot stream
    async with Cluster(cfg) as c:
        with anyio.fail_after(60):
            results = await run_session(c, "de", vocab=1000)
    assert [r.token_ids for r in results] == want
    assert [r.retried_recompute for r in results] == [False, True, True]


@pytest.mark.anyio
async def test_zmq_transport_and_posix_storage(tmp_path):
    want = await _reference()
    cfg = synthetic_config()
    cfg.transport = ZmqTransportConfig()
    cfg.storage = PosixStorageConfig(root=tmp_path / "kv")
    async with Cluster(cfg) as c:
        for path in ("de", "pe", "split"):
            results = await run_session(c, path, session=path, vocab=1000)
            assert [r.token_ids for r in results] == want
            # the first session hits its own earlier turns; the same tokens again hit the whole usable prompt
            assert results[2].hit_tokens == (4 * BT if path == "de" else 6 * BT)


@pytest.mark.anyio
@pytest.mark.nixl
async def test_nixl_transport_serves_every_path_with_the_same_tokens():
    """The engines over nixl (one-sided writes, landings handed to their named writer as exposed): every read
    path's tokens as the in-process reference's, and each DE->PE forward and PE->DE ship landed once."""
    pytest.importorskip("nixl_cu12")
    from dualpath.transports.config import NixlTransportConfig

    want = await _reference()
    cfg = synthetic_config()
    cfg.transport = NixlTransportConfig()
    async with Cluster(cfg) as c:
        for path in ("de", "pe", "split"):
            results = await run_session(c, path, session=path, vocab=1000)
            assert [r.token_ids for r in results] == want
        stats = {name: t.stats for name, t in c.transports.items()}
        assert sum(s.writes for s in stats.values()) == sum(s.arrivals for s in stats.values()) > 0


@pytest.mark.anyio
async def test_persisted_blocks_hold_the_models_kv():
    """Every Full Block the DE persisted (prompt and decoded) holds exactly the synthetic model's KV rows."""
    from dualpath.model.synthetic import signatures

    async with Cluster(synthetic_config()) as c:
        prompt = list(range(7, 7 + 50))
        r = await c.run_turn("s", prompt, 30, path="pe")
        ctx = prompt + r.token_ids
        keys = c.keyer.keys(ctx)
        n = c.storage.lookup(keys)
        assert n == len(ctx) // BT == 5  # prompt blocks and the blocks filled while decoding
        buf = c.layout.alloc_full_blocks(n)
        statuses = await c.storage.read(keys[:n], buf)
        assert all(s.value == "ok" for s in statuses)
    ids = torch.tensor(ctx[: n * BT])
    for layer in range(c.layout.n_layers):
        rows = buf[:, layer].reshape(n * BT, -1).view(torch.int64)
        sig = signatures(layer, torch.arange(n * BT), ids)
        assert torch.equal(rows, sig[:, None].expand_as(rows))


@pytest.mark.anyio
async def test_neither_the_first_token_nor_the_decode_steps_wait_for_the_prompts_write():
    """The DE gives out the first token and decodes while it writes the prompt's new blocks: over a slow emulated
    storage NIC the first and second tokens come long before the write ends. ``on_stored`` (prefix sharing starts
    other requests of the prompt there) is called once, when every block is stored, and the turn's end (so the
    next turn hits every block) comes after it."""
    cfg = synthetic_config(snic_gbps=0.002)  # 512 tokens x 2 KiB: about 0.52 s of SNIC write
    async with Cluster(cfg) as c:
        prompt = list(range(1, 513))
        write_s = 512 * c.layout.spec.bytes_per_token / 0.002e9
        told: list[tuple[float, int]] = []
        r = await c.run_turn("s", prompt, 2, path="pe",
                             on_stored=lambda: told.append((time.perf_counter(),
                                                            c.storage.lookup(c.keyer.keys(prompt)))))
        t = r.timings
        assert t.t_first_token - t.t_submit < write_s / 2  # (a first token after the write: >= write_s)
        assert t.t_second_token - t.t_submit < write_s / 2  # (decode steps after the write: >= write_s)
        assert len(told) == 1 and told[0][1] == 32  # once, with every block stored
        assert told[0][0] - t.t_submit >= 0.95 * write_s and t.t_done >= told[0][0]
        # the last token is out long before the turn's end; TPOT counts to it, not to the end of the write
        assert t.t_last_token - t.t_submit < write_s / 2 and r.t_last_token == t.t_last_token
        assert r.tpot is not None and r.tpot == pytest.approx(t.t_last_token - t.t_first_token)
        assert c.des[0].persisted_blocks == 32 and c.storage.lookup(c.keyer.keys(prompt)) == 32
        nxt = await c.run_turn("s", prompt + r.token_ids + [5], 2, path="de")
        assert nxt.hit_tokens == 512
        # a caller that cancels after the first token, while the prompt is being written, leaves nothing held
        first = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: c.run_turn("x", list(range(3, 515)), 8, path="pe", on_token=lambda t: first.set()))
            with anyio.fail_after(10):
                await first.wait()
            tg.cancel_scope.cancel()
        de = c.des[0]
        assert de.free_kv_tokens() == cfg.cluster.kv_pool_tokens and not de.running
        with anyio.fail_after(10):  # (the write goes on in the background, then gives its host region back)
            while de.host.used_bytes:
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_bad_input_is_refused_before_work():
    cfg = synthetic_config(devices=["cuda:7"])
    with pytest.raises(ConfigError, match="cuda:7"):
        Cluster(cfg)
    async with Cluster(synthetic_config(kv_pool_tokens=64)) as c:
        with pytest.raises(EngineError, match="KV pool"):
            await c.run_turn("s", list(range(1, 100)), 4)
        with pytest.raises(ModelError, match="context"):
            await c.run_turn("s", list(range(1, 10)), 5000)
        with pytest.raises(ModelError, match="token id"):
            await c.run_turn("s", [1, 2, 10**6], 2)
        with pytest.raises(ModelError, match="at least one"):
            await c.run_turn("s", [], 2)
        assert sum(c.linkset.bytes_by_link().values()) == 0  # nothing moved
        r = await c.run_turn("s", list(range(1, 30)), 4)  # the cluster still serves
        assert len(r.token_ids) == 4
