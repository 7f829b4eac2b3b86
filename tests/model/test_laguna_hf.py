"""Poolside's Laguna (``LagunaForCausalLM``) against transformers on the same random weights, saved by transformers:
query heads per layer over one KV shape, per-head q/k norms, a RoPE per layer type (half of each head on full
layers), sliding layers, the attention's output gated by a softplus per head or per channel, a dense first layer,
then a soft-capped sigmoid router with a correction bias over experts, scaled, plus a shared expert."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_paged_paths_against_hf,
    check_save_reads_back,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LagunaForCausalLM"):
    pytest.skip("no Laguna in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_attention_heads_per_layer": [4, 8, 2, 4], "num_key_value_heads": 2,
    "head_dim": 16, "sliding_window": 5,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
    "moe_routed_scaling_factor": 1.5, "moe_router_logit_softcapping": 3.0, "max_position_embeddings": 256}


class _LagunaCheckpoints(Checkpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        with torch.no_grad():  # (correction biases that change the choice: transformers starts them at zero)
            for layer in hf.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(8))
        return hf


_CKPTS = _LagunaCheckpoints({"laguna": ("LagunaConfig", "LagunaForCausalLM", CONFIG),
                             "per_element": ("LagunaConfig", "LagunaForCausalLM", dict(CONFIG, gating="per-element"))})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "laguna"
    assert spec.layer_heads == (4, 8, 2, 4) and spec.n_heads == 8 and spec.dense_layers == (0,)
    assert spec.gate_per_head == (family == "laguna")
    assert spec.rope_by_type == {"full_attention": (500000.0, 0.5), "sliding_attention": (10000.0, 1.0)}
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.LagunaForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    """Our bf16 logits are as close to transformers' fp32 ones as transformers' own bf16 logits are, on the tokens
    whose router logits do not nearly tie."""
    d, hf32 = _CKPTS.get("laguna", tmp_path_factory)
    hf = transformers.LagunaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    fp32 = hf_logits(hf32, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    check_bf16_as_close_as_transformers(got, ref, fp32, rows)


def test_config_defaults_as_transformers_reads_them(tmp_path):
    small = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "num_attention_heads_per_layer")}
    cfg = {"architectures": ["LagunaForCausalLM"], "model_type": "laguna", **small, "num_hidden_layers": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert spec.layer_types == tuple(hf.layer_types) and spec.layer_heads == tuple(hf.num_attention_heads_per_layer)
    assert spec.dense_layers == tuple(i for i, m in enumerate(hf.mlp_layer_types) if m == "dense")


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ({"moe_apply_router_weight_on_input": True}, "moe_apply_router_weight_on_input"),
    ({"gating": "per-token"}, "gating must be"),
    ({"num_attention_heads_per_layer": [4, 3, 2, 4]}, "multiple of num_key_value_heads"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "only a 'default' RoPE"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["LagunaForCausalLM"], **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("laguna", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
