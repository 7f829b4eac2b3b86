"""Beam (``BeamForCausalLM``) against transformers on the same random weights, saved by transformers: sliding layers
with RoPE and full ones without it whose queries are scaled by position, per-head q/k norms, the attention's output
gated per channel by a sigmoid with a bias per head, four norms per layer with depth-scaled residual sums, dense
layers then grouped sigmoid-routed experts (a correction bias choosing, renormalized weights, scaled), fp32 SwiGLUs,
soft-capped logits."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    check_paged_paths_against_hf,
    check_save_reads_back,
    cluster_two_turns,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "BeamForCausalLM"):
    pytest.skip("no Beam in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 5,
    "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "final_logit_softcapping": 5.0,
    "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


class _BeamCheckpoints(Checkpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        with torch.no_grad():  # (correction biases that change the choice: transformers starts them at zero)
            for n, b in hf.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.copy_(0.1 * torch.randn_like(b))
        return hf


_CKPTS = _BeamCheckpoints({"beam": ("BeamConfig", "BeamForCausalLM", CONFIG),
                           "no_softcap": ("BeamConfig", "BeamForCausalLM",
                                          dict(CONFIG, final_logit_softcapping=None, routed_scaling_factor=1.5)),
                           # (every layer full: no layer type rotates; random_configs_vs_hf.py found it unread)
                           "all_full": ("BeamConfig", "BeamForCausalLM",
                                        dict(CONFIG, layer_types=["full_attention"] * 4))})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    ours = load_checkpoint(d)
    spec = ours.spec
    assert spec.dense_layers == (0,)
    if family == "all_full":
        assert spec.rope_by_type == {} and spec.sliding_window is None
    else:
        assert spec.rope_by_type == {"sliding_attention": 10000.0}
        assert [spec.layer_window(i) for i in range(4)] == [5, None, 5, None]
    assert spec.logit_softcap == (None if family == "no_softcap" else 5.0)
    check_save_reads_back(ours, tmp_path, transformers.BeamForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_config_defaults_and_refusals(tmp_path):
    """BeamConfig's defaults (every sixth and the last layer full, three dense layers), and RoPE parameters not read
    here refused by key."""
    small = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "mlp_layer_types")}
    base = {"architectures": ["BeamForCausalLM"], "model_type": "beam", **small, "num_hidden_layers": 7}
    (tmp_path / "config.json").write_text(json.dumps(base))
    spec = load_spec(tmp_path / "config.json")
    assert list(spec.layer_types) == ["sliding_attention"] * 5 + ["full_attention"] * 2
    assert spec.dense_layers == (0, 1, 2)
    for rope, match in (({"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                          "full_attention": None}, "only a 'default' RoPE"),
                        ({"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                         "must hold each layer type's RoPE")):
        (tmp_path / "config.json").write_text(json.dumps({**base, "rope_parameters": rope}))
        with pytest.raises(ModelError, match=match):
            load_spec(tmp_path / "config.json")


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("beam", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
