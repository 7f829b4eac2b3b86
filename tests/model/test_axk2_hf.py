"""A.X-K2 (``AXK2ForCausalLM``, SK Telecom) against transformers on random weights transformers wrote: DeepSeek-V3.2's
MLA with its lightning indexer over a paged latent cache (``index_topk`` 8 here, so every sequence past 8 tokens
attends to its selection only), plus each head's query and an output gate from one projection of the normed and raw
query latent, gated RMSNorms before attention and before each MoE block, and ungrouped sigmoid routing."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    load_checkpoint,
    mla_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AXK2ForCausalLM"):
    pytest.skip("this transformers has no A.X-K2", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "mlp_layer_types": ["dense", "sparse", "sparse"],
    "routed_scaling_factor": 2.5, "gated_norm_rank": 8, "index_topk": 8, "index_head_dim": 16,
    "index_n_heads": 16,
    "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return mla_checkpoint(tmp_path_factory, "axk2", "AXK2ForCausalLM", "AXK2Config", CONFIG)


def test_reads_as_v32_mla_with_gates(ckpt):
    d, hf = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "axk2" and spec.q_gate and spec.has_dsa
    assert (spec.gated_norm_rank, spec.n_group, spec.first_k_dense_replace, spec.index_topk) == (8, 1, 1, 8)
    assert spec.rope_interleave and spec.norm_topk_prob and spec.kv_spec().extra_bytes == 4 * 16
    model = load_checkpoint(d)
    norms = [type(layer.post_attention_layernorm).__name__ for layer in model.model.layers]
    assert norms == ["RMSNorm", "GatedRMSNorm", "GatedRMSNorm"]


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, seed=4), []))


def test_batched_sequences_past_index_topk(ckpt):
    d, hf = ckpt
    g = torch.Generator().manual_seed(3)
    check_batched_against_hf(load_checkpoint(d), hf, [torch.randint(3, VOCAB, (n,), generator=g).tolist()
                                                      for n in (21, 13)])


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.AXK2ForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(17,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "axk2" and saved["gated_norm_rank"] == 8


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("q_lora_rank", None, "q_lora_rank null"),
    ("gated_norm_rank", 0, "gated_norm_rank must be a positive integer"),
    ("rope_interleave", False, "rope_interleave False unsupported"),
])
def test_bad_configs_are_refused_naming_the_key(ckpt, tmp_path, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=needle):
        load_spec(tmp_path / "config.json")
