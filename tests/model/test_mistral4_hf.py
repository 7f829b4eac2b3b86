"""Mistral 4 (``Mistral4ForCausalLM``): DeepSeek-V3's MLA over paged latent KV and its grouped MoE, but routed by
softmax scores (no correction bias), with YaRN and Llama 4's position-dependent query scale
(``llama_4_scaling_beta``). Against transformers on random weights it wrote, with ``original_max_position_embeddings``
16 so the query scale changes within the test's positions."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    load_checkpoint,
    mla_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Mistral4ForCausalLM"):
    pytest.skip("this transformers has no Mistral 4", allow_module_level=True)

VOCAB = 97
ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.5,
    "max_position_embeddings": 256, "rope_parameters": ROPE, "pad_token_id": None}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return mla_checkpoint(tmp_path_factory, "mistral4", "Mistral4ForCausalLM", "Mistral4Config", CONFIG)


def test_spec_reads_the_softmax_router_and_the_query_scale(ckpt):
    d, hf = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "mistral4"
    assert spec.scoring_func == "softmax" and spec.query_scale_beta == 0.1 and spec.rope_type == "yarn"
    assert not hasattr(hf.model.layers[1].mlp.gate, "e_score_correction_bias")
    assert "partial_rotary_factor" not in (spec.rope_scaling or {})
    assert DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32") == spec
    v3 = DeepseekV3Spec.from_hf_config({**spec.to_hf_config(), "architectures": ["DeepseekV3ForCausalLM"],
                                        "model_type": "deepseek_v3", "rope_parameters": {
                                            k: v for k, v in ROPE.items() if k != "llama_4_scaling_beta"}})
    assert v3.fingerprint() != spec.fingerprint()


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    d, hf = ckpt
    g = torch.Generator().manual_seed(3)
    check_batched_against_hf(load_checkpoint(d), hf, [torch.randint(0, VOCAB, (n,), generator=g).tolist()
                                                      for n in (23, 14)], cuts=(12, 9))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.Mistral4ForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(37,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Mistral4ForCausalLM"]
    assert saved["rope_parameters"]["llama_4_scaling_beta"] == 0.1


@pytest.mark.parametrize("rope,needle", [
    (dict(ROPE, llama_4_scaling_beta=-1.0), "llama_4_scaling_beta"),
    ({k: v for k, v in ROPE.items() if k != "original_max_position_embeddings"} | {"rope_type": "default"},
     "original_max_position_embeddings"),
])
def test_bad_configs_name_the_key(rope, needle):
    with pytest.raises(ModelError, match=needle):
        DeepseekV3Spec.from_hf_config(dict(CONFIG, architectures=["Mistral4ForCausalLM"], model_type="mistral4",
                                           rope_parameters=rope))
