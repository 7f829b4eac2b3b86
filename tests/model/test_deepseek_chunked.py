"""Chunked prefill with a DeepSeek-V3 checkpoint (MLA over paged latent KV): a later chunk attends to the earlier
chunks' latent rows kept on the PE, and both read paths give the unchunked run's tokens and logits."""

from __future__ import annotations

import math
import os
from typing import Any

import anyio
import pytest
import torch

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.engine.model_api import LlamaAdapter
from dualpath.engine.timemodel import LayerTimeModel
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")

BT = 16
L = 3
CHUNK = 10  # new tokens per forward under the quota (time model: 1 s per token and layer)
FIRST = [int(t) for t in torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(7))]
SECOND = [5, 17, 33, 2, 71, 64, 9, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_deepseek import _ckpt_dir

    return _ckpt_dir("q-lora", tmp_path_factory)


def _cluster(path: Any, chunked: bool) -> Cluster:
    cfg = DualPathConfig()
    mc = cfg.model = LlamaModelConfig(path=str(path))
    c = cfg.cluster
    c.block_tokens = BT
    c.snic_gbps = None
    c.cnic_gbps = None
    c.host_buffer_bytes = 8 << 20
    c.kv_pool_tokens = 512
    c.deadline_s = 30.0
    c.prefill_max_batch_tokens = 512
    c.layers_ahead = 1  # layers 0 and 2 share a scratch slot: later chunks must restore their rows
    c.keep_logits = True
    c.devices = os.environ.get("DUALPATH_TEST_DEVICES", "cpu")
    c.prefill_quota_s = L * (CHUNK + 0.5) if chunked else None
    tm = LayerTimeModel(a=0.0, b=1.0, e=0.0, d=0.0, n_layers=L)

    def build(device: torch.device) -> LlamaAdapter:
        return LlamaAdapter(load_model(mc, device, with_tokenizer=False)[0], BT, time_model=tm)

    return Cluster(cfg, model=build)


@pytest.mark.anyio
@pytest.mark.parametrize("read_path", ["pe", "de"])
async def test_chunked_mla_prefill_equals_unchunked(ckpt: Any, read_path: str) -> None:
    runs = {}
    for chunked in (False, True):
        async with _cluster(ckpt, chunked) as c:
            with anyio.fail_after(120):
                r1 = await c.run_turn("s", FIRST, 4, path="recompute")
                r2 = await c.run_turn("s", FIRST + r1.token_ids + SECOND, 5, path=read_path)
            runs[chunked] = (r1, r2, c.pes[0].chunks, c.pes[0].chunk_bytes)
    for a, b in zip(runs[True][:2], runs[False][:2], strict=True):
        assert a.token_ids == b.token_ids and a.hit_tokens == b.hit_tokens and a.link_bytes == b.link_bytes
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    r1, r2 = runs[True][:2]
    assert r2.hit_tokens == 32
    want = [math.ceil((r.prompt_tokens - r.hit_tokens) / CHUNK) for r in (r1, r2)]
    assert min(want) >= 3 and runs[True][2:] == (sum(want), 0) and runs[False][2] == 0


@pytest.mark.anyio
async def test_prompt_logprobs_over_chunks_are_transformers_log_softmax(ckpt: Any) -> None:
    """``prompt_logprobs`` with chunked prefill: every chunk's rows are scored, in order, and the whole prompt's
    log-probabilities equal transformers' full forward; a prompt with a stored prefix is recomputed for them."""
    from dualpath.engine.sampling import SamplingParams

    prompt = FIRST + SECOND
    sp = SamplingParams(logprobs=2, prompt_logprobs=3)
    got = {}
    for chunked in (False, True):
        async with _cluster(ckpt, chunked) as c:
            with anyio.fail_after(120):
                await c.run_turn("s", prompt, 2, path="recompute")  # (its blocks are stored: a hit next time)
                got[chunked] = await c.run_turn("s", prompt, 2, path="de", sampling=sp)
            chunks = c.pes[0].chunks
        assert got[chunked].hit_tokens == 0  # recomputed, whatever the path asked
        assert (chunks > 0) == chunked
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    for chunked, res in got.items():
        lps = res.prompt_logprobs
        assert lps is not None and [x.token for x in lps] == prompt[1:], chunked
        want = [float(ref[i - 1, prompt[i]]) for i in range(1, len(prompt))]
        assert [x.logprob for x in lps] == pytest.approx(want, abs=2e-3)
        for i, x in enumerate(lps):
            assert [t for t, _ in x.top] == torch.topk(ref[i], 3).indices.tolist() or \
                [v for _, v in x.top] == pytest.approx(torch.topk(ref[i], 3).values.tolist(), abs=2e-3)
        assert res.logprobs is not None and len(res.logprobs) == 2
