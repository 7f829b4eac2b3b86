"""A DeepSeek-V3 checkpoint through the emulated cluster: every read path gives the same tokens (and transformers'
greedy tokens), and the bytes per link are the latent size, not MHA's."""

from __future__ import annotations

import os

import pytest
import torch

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.model.config import LlamaModelConfig

transformers = pytest.importorskip("transformers")

BT = 16
L = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from test_deepseek import _ckpt_dir

    return _ckpt_dir("q-lora", tmp_path_factory)  # shared with test_deepseek.py when both run


def _config(path, kv_format: str = "auto") -> DualPathConfig:
    cfg = DualPathConfig()
    cfg.model = LlamaModelConfig(path=str(path), kv_format=kv_format)
    c = cfg.cluster
    c.block_tokens = BT
    c.snic_gbps = None
    c.cnic_gbps = None
    c.host_buffer_bytes = 8 << 20
    c.kv_pool_tokens = 512
    c.deadline_s = 30.0
    c.prefill_max_batch_tokens = 512
    c.devices = os.environ.get("DUALPATH_TEST_DEVICES", "cpu")
    return cfg


FIRST = [int(t) for t in torch.randint(0, 97, (37,), generator=torch.Generator().manual_seed(7))]
SECOND = [5, 17, 33, 2, 71, 64, 9]


async def _session(path, read_path: str, kv_format: str = "auto"):
    async with Cluster(_config(path, kv_format)) as c:
        r1 = await c.run_turn("s", FIRST, 6, path="recompute")
        prompt = FIRST + r1.token_ids + SECOND
        r2 = await c.run_turn("s", prompt, 8, path=read_path, pe_blocks=1 if read_path == "split" else None)
        layer_bytes = c.layout.spec.bytes_per_token_layer
    return r1, r2, prompt, layer_bytes


@pytest.mark.anyio
async def test_every_path_same_tokens_and_latent_bytes(ckpt):
    results = {p: await _session(ckpt, p) for p in ("pe", "de", "split", "recompute")}
    tokens = {p: (r1.token_ids, r2.token_ids) for p, (r1, r2, _, _) in results.items()}
    assert len({repr(t) for t in tokens.values()}) == 1, tokens
    r1, r2, prompt, layer_bytes = results["de"]
    assert layer_bytes == (32 + 8) * 4  # the fp32 latent row: kv_lora_rank + rope dims
    hit = (len(FIRST) + 6) // BT * BT
    assert r2.hit_tokens == hit
    assert r2.link_bytes["de0.cnic.out"] >= hit * L * layer_bytes  # the DE-read hit crossed to the PE ...
    assert r2.link_bytes["pe0.cnic.in"] == hit * L * layer_bytes   # ... exactly latent-sized
    assert results["pe"][1].link_bytes["pnode0.snic.read"] == hit * L * layer_bytes
    # transformers, greedy and teacher-forced, agrees with the session's tokens
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = prompt + r2.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0]
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == r2.token_ids
    assert logits[len(FIRST) - 1 : len(FIRST) + 5].argmax(-1).tolist() == r1.token_ids


@pytest.mark.anyio
async def test_fp8_latent_rows_move_unchanged(tmp_path):
    """kv_format fp8 (kv_lora_rank 128): storage and both read paths move the 148-byte FP8 rows; DE and PE paths
    give the same tokens."""
    from test_deepseek import BASE, CONFIGS, _hf_checkpoint

    CONFIGS["fp8"] = dict(BASE, q_lora_rank=24, kv_lora_rank=128)
    try:
        _hf_checkpoint("fp8", tmp_path, 0)
    finally:
        CONFIGS.pop("fp8")
    out = {p: await _session(tmp_path, p, "fp8") for p in ("pe", "de")}
    assert out["pe"][1].token_ids == out["de"][1].token_ids
    r1, r2, _, layer_bytes = out["de"]
    assert layer_bytes == 128 + 4 + 2 * 8
    hit = (len(FIRST) + 6) // BT * BT
    assert r2.link_bytes["pe0.cnic.in"] == hit * L * layer_bytes


@pytest.mark.slow
def test_chat_cli_every_path_same_tokens(ckpt, tmp_path):
    """``dualpath chat --model DIR --path pe|de|split|recompute`` on a DeepSeek-V3 checkpoint (with a word-level
    tokenizer written here): identical tokens on every path; turn 2 hits turn 1's full blocks of latent rows."""
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dualpath.cli import main

    d = tmp_path / "model"
    shutil.copytree(ckpt, d)
    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([" ".join(f"w{(7 * i) % 97}" for i in range(30)), {"text": "w3 w4 w5", "gen": 4}]))
    tokens = {}
    for path in ("pe", "de", "split", "recompute"):
        out = tmp_path / f"{path}.json"
        assert main(["chat", "--model", str(d), "--turns", str(turns), "--gen", "6", "--path", path,
                     "--json", str(out), "--quiet"]) == 0
        runs = json.loads(out.read_text())["runs"]
        tokens[path] = [r["token_ids"] for r in runs]
        hit = 0 if path == "recompute" else (30 + 6) // 16 * 16
        assert runs[1]["hit_tokens"] == hit
        if path == "de":  # the hit's latent rows crossed DE -> PE: exactly hit x layers x latent row bytes
            assert runs[1]["link_bytes"]["pe0.cnic.in"] == hit * L * (32 + 8) * 4
    assert len({repr(t) for t in tokens.values()}) == 1, tokens
