"""LFM2 (``Lfm2ForCausalLM``: gated short-convolution layers and attention layers; also LFM2-VL's language model)
against transformers on the same random weights, saved by transformers. A convolution layer's state (its last
inputs) lives in state pages: logits at every prefill and decode step, batched sequences with different cached
prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained read back by transformers, and a
two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_paged_paths_against_hf,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.lfm2 import Lfm2Spec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Lfm2ForCausalLM"):
    pytest.skip("no LFM2 in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "layer_types": ["conv", "full_attention", "conv", "conv"],
    "block_multiple_of": 16, "max_position_embeddings": 256, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None}

class _Lfm2Checkpoints(Checkpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        with torch.no_grad():  # (expert biases that change the choice: transformers starts them at zero)
            for layer in hf.model.layers:
                bias = getattr(layer.feed_forward, "expert_bias", None)
                if bias is not None:
                    bias.copy_(0.2 * torch.randn(bias.shape))
        return hf


MOE = {"num_dense_layers": 1, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
       "routed_scaling_factor": 1.5}
_CKPTS = _Lfm2Checkpoints({
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", CONFIG),
    "moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
            {**{k: v for k, v in CONFIG.items() if k != "block_multiple_of"}, **MOE}),
    "moe_nobias": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                   {**{k: v for k, v in CONFIG.items() if k != "block_multiple_of"}, **MOE, "use_expert_bias": False,
                    "norm_topk_prob": False}),
    "bias_untied": ("Lfm2Config", "Lfm2ForCausalLM",
                    {**CONFIG, "conv_bias": True, "conv_L_cache": 4, "tie_word_embeddings": False,
                     "block_auto_adjust_ff_dim": False}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_hit_starts_from_the_stored_full_blocks_state(tmp_path_factory):
    """Full Blocks copied from another sequence (a storage hit) carry the state at their end; zeroed, they do not."""
    d, hf = _CKPTS.get("lfm2", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Lfm2Spec)
    assert spec.intermediate_size == hf.model.layers[0].feed_forward.w1.out_features
    assert spec.tie_embeddings == (family != "bias_untied")
    assert spec.experts == (8 if family.startswith("moe") else 0)
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    cls = transformers.Lfm2MoeForCausalLM if family.startswith("moe") else transformers.Lfm2ForCausalLM
    check_save_reads_back(ours, tmp_path, cls, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("lfm2", tmp_path_factory)
    hf = transformers.Lfm2ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_older_config_names(tmp_path):
    """``full_attn_idxs`` instead of ``layer_types``, ``block_ff_dim`` and ``tie_embedding``, as LFM2's first
    checkpoints write them."""
    cfg = {"architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2",
           **{k: v for k, v in CONFIG.items() if k not in ("layer_types", "intermediate_size")},
           "full_attn_idxs": [1, 3], "block_ff_dim": 120, "tie_embedding": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert list(spec.layer_types) == list(hf.layer_types) == ["conv", "full_attention", "conv", "full_attention"]
    assert spec.tie_embeddings is hf.tie_word_embeddings is False
    assert spec.ff_config[0] == hf.intermediate_size == 120


def test_image_text_checkpoint_runs_its_language_model(tmp_path):
    if not hasattr(transformers, "Lfm2VlForConditionalGeneration"):
        pytest.skip("no LFM2-VL in this transformers")
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_patches": 16, "patch_size": 4}
    torch.manual_seed(0)
    cfg = transformers.Lfm2VlConfig(text_config={**CONFIG, "model_type": "lfm2"}, vision_config=vision,
                                    projector_hidden_size=32)
    hf = transformers.Lfm2VlForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if "norm" in n else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    assert load_spec(tmp_path).architecture == "lfm2"
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 2), []), cut=9)


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["conv", "mamba", "conv", "conv"]}, "layer_types must name"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}, "only a 'default' RoPE"),
    ({"conv_L_cache": 0}, "conv_L_cache"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["Lfm2ForCausalLM"], "model_type": "lfm2", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("lfm2", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
