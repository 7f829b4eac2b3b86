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
