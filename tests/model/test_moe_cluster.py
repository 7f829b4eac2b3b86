"""A Qwen2-MoE checkpoint (routed + gated shared experts, one dense layer) written by transformers, through the
emulated cluster: the PE-read and DE-read paths give the same tokens as transformers' greedy decoding, and the hit
moves as MHA KV bytes."""

from __future__ import annotations

import pytest
import torch
from test_deepseek_cluster import BT, FIRST, _session

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_moe_hf import _ckpt

    return _ckpt("qwen2_moe", tmp_path_factory)  # shared with test_moe_hf.py when both run


@pytest.mark.anyio
async def test_moe_model_through_both_read_paths(ckpt):
    d, hf = ckpt
    runs = {}
    for path in ("pe", "de"):
        r1, r2, prompt, layer_bytes = await _session(d, path)
        runs[path] = (r1, r2, prompt)
    assert runs["pe"][0].token_ids == runs["de"][0].token_ids and runs["pe"][1].token_ids == runs["de"][1].token_ids
    r1, r2, prompt = runs["de"]
    layers, kv_heads, head_dim = 3, 2, 16
    assert layer_bytes == 2 * kv_heads * head_dim * 4  # fp32 K and V
    hit = (len(FIRST) + 6) // BT * BT
    assert r2.hit_tokens == hit
    assert r2.link_bytes["pe0.cnic.in"] == hit * layers * layer_bytes  # the DE-read hit crossed to the PE
    assert runs["pe"][1].link_bytes["pnode0.snic.read"] == hit * layers * layer_bytes
    # transformers, teacher-forced over the session's tokens, picks the same greedy ids
    ids = prompt + r2.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == r2.token_ids
    assert logits[len(FIRST) - 1: len(FIRST) + 5].argmax(-1).tolist() == r1.token_ids
