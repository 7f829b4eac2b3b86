"""Path equivalence: one multi-turn session through the PE path, the DE path, split and full recompute gives the
same greedy tokens and logits (fp32, CPU), and agrees with Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BT, SESSION, hf_llama, llama_config, run_session

from dualpath.cluster import Cluster

transformers = pytest.importorskip("transformers")

PATHS = [("pe", None), ("de", None), ("split", 1), ("recompute", None)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    return d, hf_llama(d)


@pytest.mark.anyio
async def test_paths_agree_with_each_other_and_transformers(tiny):
    model_dir, hf = tiny
    runs = {}
    for path, pe_blocks in PATHS:
        async with Cluster(llama_config(model_dir, keep_logits=True)) as cluster:
            runs[path] = await run_session(cluster, path, pe_blocks=pe_blocks)
    ref = runs["recompute"]
    for path, results in runs.items():
        for turn, (res, want) in enumerate(zip(results, ref, strict=True)):
            assert res.token_ids == want.token_ids, (path, turn)
            assert len(res.logits) == SESSION[turn][1]
            for a, b in zip(res.logits, want.logits, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # hits: turn 1 none; later turns every full block of the earlier context (PE/DE/split), none for recompute
    for path, results in runs.items():
        context = 0
        for res, (_, gen) in zip(results, SESSION, strict=True):
            expect = 0 if path == "recompute" else min(context // BT, (res.prompt_tokens - 1) // BT) * BT
            assert res.hit_tokens == expect, (path, res.hit_tokens, expect)
            context = res.prompt_tokens + gen
    assert runs["de"][2].hit_tokens == 64 and runs["split"][2].hit_tokens == 64
    # transformers, teacher-forced over each turn's prompt + generated tokens
    context_ids: list[int] = []
    from engine_helpers import session_prompts

    for res, chunk in zip(ref, session_prompts(), strict=True):
        prompt = context_ids + chunk
        ids = prompt + res.token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0].float()
        p = len(prompt)
        for i, ours in enumerate(res.logits):
            torch.testing.assert_close(ours, logits[p - 1 + i], rtol=1e-3, atol=1e-3)
            assert int(torch.argmax(logits[p - 1 + i])) == res.token_ids[i]
        context_ids = ids


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["loopback", pytest.param("nixl", marks=pytest.mark.nixl)])
async def test_a_context_longer_than_the_batch_limit_grows_the_scratch(tiny, transport):
    """A prompt may be as long as the model's context, whatever ``prefill_max_batch_tokens`` (the batch limit the
    one-layer scratch starts sized for): a multi-turn session growing past it gets, on every read path, the
    tokens transformers gives. The scratch grows between forwards (its new region registered; the old one let
    go) and stays grown. (A prompt over the starting scratch was refused, naming the field: an agent's context
    stopped working once it outgrew the batch limit, 8,192 tokens in the HTTP server's default.)"""
    model_dir, hf = tiny
    cfg = llama_config(model_dir, prefill_max_batch_tokens=64, prefill_max_batch=2)
    if transport == "nixl":
        pytest.importorskip("nixl_cu12")
        from dualpath.transports.config import NixlTransportConfig

        cfg.transport = NixlTransportConfig()
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randint(3, 211, (n,), generator=gen).tolist() for n in (40, 150, 90, 170)]
    async with Cluster(cfg) as c:
        pe = c.pes[0]
        start_blocks, regions = pe.slot_blocks, {n: t.registered_regions for n, t in c.transports.items()}
        for path, pe_blocks in PATHS:
            context: list[int] = []
            for i, chunk in enumerate(chunks):
                prompt = context + chunk
                res = await c.run_turn(f"{path}", prompt, 3, path=path, pe_blocks=pe_blocks)
                with torch.no_grad():
                    want = hf.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt):]
                assert res.token_ids == want.tolist(), (path, i, len(prompt))
                if path != "recompute" and i:
                    assert res.hit_tokens >= len(context) // BT * BT - BT, (path, i, res.hit_tokens)
                context = prompt + res.token_ids
        assert len(context) > 400 and pe.slot_blocks > start_blocks and 1 <= pe.scratch_grows <= 3
        assert {n: t.registered_regions for n, t in c.transports.items()} == regions
        with pytest.raises(Exception, match="the model's context of 512 tokens"):
            pe.check_fits(513 + BT)


@pytest.mark.anyio
async def test_blocks_persisted_in_chunks_hold_the_prompts_kv(tiny) -> None:  # type: ignore[no-untyped-def]
    """A real (tiny) Llama: a 320-token prompt whose copy does not fit beside its receive area is persisted in
    chunks of 10 blocks; the next turn, which loads them, gives the logits of a full recompute."""
    model_dir, _ = tiny
    cfg = llama_config(model_dir, host_buffer_bytes=30 * 16 * 768, keep_logits=True)  # 30 blocks of 16 x 768 B
    prompt = [1 + (7 * i) % 200 for i in range(320)]
    async with Cluster(cfg) as c:
        first = await c.run_turn("s", prompt, 4)
        assert sum(de.persist_chunked for de in c.des) == 1
        follow = prompt + list(first.token_ids) + [3, 5, 8, 13]
        loaded = await c.run_turn("s", follow, 4, path="pe")
        assert loaded.hit_tokens == 320
    async with Cluster(cfg) as fresh:
        recomputed = await fresh.run_turn("s", follow, 4, path="recompute")
    assert list(loaded.token_ids) == list(recomputed.token_ids)
    for a, b in zip(loaded.logits, recomputed.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
