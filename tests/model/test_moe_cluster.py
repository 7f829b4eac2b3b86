"""A Qwen2-MoE checkpoint (routed + gated shared experts, one dense layer) written by transformers, through the
emulated cluster: the PE-read and DE-read paths give the same tokens as transformers' greedy decoding, and the hit
moves as MHA KV bytes."""

from __future__ import annotations

import os
from typing import Any, cast

import pytest
import torch

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.model.config import LlamaModelConfig

transformers = pytest.importorskip("transformers")

BT = 16


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_moe_hf import _ckpt

    return _ckpt("qwen2_moe", tmp_path_factory)  # shared with test_moe_hf.py when both run


def _config(path) -> DualPathConfig:
    cfg = DualPathConfig()
    cfg.model = LlamaModelConfig(path=str(path))
    c = cfg.cluster
    c.block_tokens = BT
    c.snic_gbps = None
    c.cnic_gbps = None
    c.host_buffer_bytes = 8 << 20
    c.kv_pool_tokens = 512
    c.deadline_s = 30.0
    c.prefill_max_batch_tokens = 512
    c.devices = cast(Any, os.environ.get("DUALPATH_TEST_DEVICES", "cpu"))
    return cfg


FIRST = [int(t) for t in torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(7))]
SECOND = [5, 17, 33, 2, 71, 64, 9]


@pytest.mark.anyio
async def test_moe_model_through_both_read_paths(ckpt):
    d, hf = ckpt
    runs = {}
    for path in ("pe", "de"):
        async with Cluster(_config(d)) as c:
            r1 = await c.run_turn("s", FIRST, 6, path="recompute")
            prompt = FIRST + r1.token_ids + SECOND
            r2 = await c.run_turn("s", prompt, 8, path=path)
            layer_bytes = c.layout.spec.bytes_per_token_layer
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
