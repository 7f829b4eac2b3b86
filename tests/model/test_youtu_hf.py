"""Youtu-LLM (``YoutuForCausalLM``: DeepSeek-V3's MLA over a paged latent cache, interleaved RoPE, a dense SwiGLU
MLP in every layer, tied embeddings) against transformers on random weights transformers wrote."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import (
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "YoutuForCausalLM"):
    pytest.skip("this transformers has no Youtu-LLM", allow_module_level=True)

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "q_lora_rank": 24, "max_position_embeddings": 256,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
CONFIGS = {
    "q-lora": BASE,
    # no q-LoRA, untied head, YaRN
    "yarn": dict(BASE, q_lora_rank=None, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                  "original_max_position_embeddings": 128}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.YoutuForCausalLM(transformers.YoutuConfig(**CONFIGS[request.param])).eval()
    with torch.no_grad():  # widen the norms around one
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(f"youtu-{request.param}")
    hf.save_pretrained(d)
    return request.param, d, hf


def test_reads_as_dense_mla(ckpt):
    name, d, hf = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "youtu"
    assert not any(spec.is_moe_layer(i) for i in range(3)) and spec.rope_interleave
    assert spec.tie_embeddings == (name == "q-lora") == bool(hf.config.tie_word_embeddings)
    assert spec.kv_spec().row_elems == 32 + 8  # the latent and the rotated key: MLA's cache


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_batched_sequences_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    _, d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.YoutuForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(17,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["YoutuForCausalLM"] and "n_routed_experts" not in saved
