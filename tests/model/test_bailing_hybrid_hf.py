"""Bailing hybrid (``BailingHybridForCausalLM``, inclusionAI's Ling 3 hybrids: Kimi Delta Attention with full-width
gates and a bounded decay, DeepSeek-V3's MLA with RoPE and a per-head output gate, DeepSeek's MoE) against
transformers on the same random weights, saved by transformers: logits at every prefill and decode step over one
pool of widened latent rows and KDA state pages, batched sequences with different cached prefixes, Triton, bf16, a
hit that continues from a stored state, our save_pretrained read back by transformers, its checkpoint names, and a
two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
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
from test_kimi_linear_hf import _Checkpoints, _decisive_routing, _names, check_bf16_kda_layer

from dualpath.errors import ModelError
from dualpath.model.kimi_linear import KimiLinearSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "BailingHybridForCausalLM"):
    pytest.skip("no Bailing hybrid in this transformers", allow_module_level=True)

VOCAB = 97
TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "head_dim": 8, "num_experts": 8,
    "num_experts_per_token": 2, "num_shared_experts": 1, "num_expert_group": 2, "topk_group": 1,
    "routed_scaling_factor": 1.8, "first_k_dense_replace": 1, "layer_types": TYPES, "model_max_length": 256,
    "rope_theta": 10000.0, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

_CKPTS = _Checkpoints({
    "safe_gate": ("BailingHybridConfig", "BailingHybridForCausalLM", CONFIG),
    "softplus_gate": ("BailingHybridConfig", "BailingHybridForCausalLM",
                      {**CONFIG, "kda_safe_gate": False, "q_lora_rank": 24, "short_conv_kernel_size": 3,
                       "num_shared_experts": 0, "layer_types": None, "layer_group_size": 2}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("safe_gate", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_names_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:  # (the checkpoint's own names, as transformers writes)
        names = set(f.keys())
    assert "model.word_embeddings.weight" in names and "model.layers.1.attention.dense.weight" in names
    spec = load_spec(d)
    assert isinstance(spec, KimiLinearSpec) and spec.architecture == "bailing_hybrid" and not spec.kimi
    assert spec.rope_interleave and spec.rope_theta == 10000.0
    assert (spec.gate_lower_bound == -5.0) == (family == "safe_gate")
    assert (spec.lin_heads, spec.lin_dim) == (4, 8)
    if family == "softplus_gate":  # (one MLA layer in every layer_group_size)
        assert spec.layer_types == ("linear_attention", "full_attention") * 2 and spec.conv_kernel == 3
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.BailingHybridForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d)  # (our save_pretrained writes the names transformers writes)


def test_kda_width_other_than_the_rope_part_reads_as_transformers_wrote_it(tmp_path):
    """BailingHybridConfig takes the KDA width from ``head_dim``, which DeepSeek-V3's config then overwrites with
    ``qk_rope_head_dim``: the saved config's ``head_dim`` is 8, its ``linear_head_dim`` the 16 the weights have."""
    import json

    hf = _Checkpoints({"wide": ("BailingHybridConfig", "BailingHybridForCausalLM", {**CONFIG, "head_dim": 16})}).model(
        "wide")
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["head_dim"], saved["linear_head_dim"]) == (8, 16)
    assert load_spec(tmp_path).lin_dim == 16
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("safe_gate", tmp_path_factory)
    hf = transformers.BailingHybridForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ours = load_checkpoint(d, dtype="bfloat16")
    kda = ours.model.layers[0].self_attn
    assert {p.dtype for p in (kda.A_log, kda.dt_bias, kda.q_conv1d.weight)} == {torch.float32}  # (as transformers)
    assert hf.model.layers[0].self_attn.conv1d.weight.dtype == torch.float32
    check_bf16_kda_layer(ours, hf)
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=_decisive_routing(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["BailingHybridForCausalLM"], "model_type": "bailing_hybrid", **CONFIG}
    for change, match in (({"kda_lower_bound": 1.0}, "kda_lower_bound"), ({"layer_types": TYPES[:3]}, "layer_types"),
                          ({"layer_types": None, "layer_group_size": 0}, "layer_group_size"),
                          ({"hidden_act": "tanh"}, "hidden_act")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("safe_gate", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
