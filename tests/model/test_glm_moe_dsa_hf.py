"""GLM-5 (``GlmMoeDsaForCausalLM``, model_type ``glm_moe_dsa``): DeepSeek-V3.2's MLA, MoE and sparse attention, with
an indexer that rotates interleaved pairs and "shared" layers that have no indexer and reuse the selection of the
last layer before them that has one. Against transformers' own model on random weights it wrote: ``index_topk`` is
8, so past the first few tokens the selection decides the logits, on full and shared layers alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    check_batched_against_hf,
    cluster_read_paths,
    dense_on_shared,
    load_checkpoint,
    mla_checkpoint,
)
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GlmMoeDsaForCausalLM"):
    pytest.skip("this transformers has no GLM-MoE-DSA", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "index_topk": 8, "index_n_heads": 16,
    "index_head_dim": 16, "index_topk_pattern": "FSFS", "max_position_embeddings": 256, "bos_token_id": 0,
    "eos_token_id": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return mla_checkpoint(tmp_path_factory, "glm5", "GlmMoeDsaForCausalLM", "GlmMoeDsaConfig", CONFIG)


def test_spec_reads_the_shared_layers_and_mlp_layer_types(ckpt):
    d, hf = ckpt
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["first_k_dense_replace"] == 3  # (the config class's default, which transformers' model ignores)
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "glm_moe_dsa" and spec.has_dsa
    assert spec.index_shared_layers == (1, 3) and spec.index_rope_interleave
    assert [spec.has_indexer(i) for i in range(4)] == [layer.self_attn.indexer is not None for layer in hf.model.layers]
    assert spec.first_k_dense_replace == 1
    assert [spec.is_moe_layer(i) for i in range(4)] == [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert spec.rms_eps == 1e-5 and spec.kv_spec().extra_bytes == 16 * 4
    assert DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32") == spec
    v32 = DeepseekV3Spec.from_hf_config({**spec.to_hf_config(), "architectures": ["DeepseekV32ForCausalLM"],
                                         "model_type": "deepseek_v32", "mlp_layer_types": None,
                                         "first_k_dense_replace": 1}, dtype="float32")
    assert v32.index_shared_layers == () and v32.fingerprint() != spec.fingerprint()


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    g = torch.Generator().manual_seed(0)
    turns = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]
    ours, ref, ids, ref_ids = paged_turns(load_checkpoint(d), hf, turns, 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) == 21 and ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    d, hf = ckpt
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (23, 14)]
    check_batched_against_hf(load_checkpoint(d), hf, seqs, cuts=(12, 9))


def test_the_shared_layers_reuse_the_selection(ckpt):
    """Past index_topk the shared layers' selection matters: attending densely there (a selection of every key)
    moves the logits, as the full layers' does."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = torch.randint(2, VOCAB, (30,), generator=torch.Generator().manual_seed(8)).tolist()

    def logits() -> torch.Tensor:
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    want = logits()
    model._sparse_attention = dense_on_shared(model._sparse_attention)
    try:
        moved = logits()
    finally:
        del model._sparse_attention
    assert torch.allclose(moved[:8], want[:8], atol=1e-5) and float((moved[8:] - want[8:]).abs().max()) > 1e-2


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    from hf_random import hf_logits

    d, _ = ckpt
    save_pretrained(load_checkpoint(d), tmp_path)
    hf2 = transformers.GlmMoeDsaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["indexer_types"] == ["full", "shared", "full", "shared"]
    seq = torch.randint(2, VOCAB, (21,), generator=torch.Generator().manual_seed(4)).tolist()
    model = load_checkpoint(d)
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    ours = model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(ours, hf_logits(hf2, seq), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,needle", [
    ("index_topk_pattern", "SFFS", "first layer must be 'full'"),
    ("index_topk_pattern", "FXFS", "index_topk_pattern"),
    ("indexer_types", ["full", "shared"], "indexer_types"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    d, _ = ckpt
    cfg = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "indexer_types"}
    with pytest.raises(ModelError, match=needle):
        DeepseekV3Spec.from_hf_config({**cfg, key: value})


@pytest.mark.anyio
async def test_cluster_every_read_path_past_index_topk(ckpt):
    d, hf = ckpt
    g = torch.Generator().manual_seed(5)
    first = torch.randint(2, VOCAB, (23,), generator=g).tolist()
    second = torch.randint(2, VOCAB, (7,), generator=g).tolist()
    await cluster_read_paths(LlamaModelConfig(path=str(d), dtype="float32", time_model="off"), hf, first, second, 24)
