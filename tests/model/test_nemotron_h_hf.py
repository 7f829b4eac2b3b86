"""Nemotron-H (``NemotronHForCausalLM``: Mamba-2, attention, MLP and MoE blocks, each a single mixer) against
transformers on the same random weights, saved by transformers. The Mamba-2 blocks' state lives in state pages:
logits at every prefill and decode step, batched sequences with different cached prefixes, Triton, bf16, a hit from
a stored Full Block's page, the checkpoint's ``backbone.*`` names written back, the ``mtp.*`` layers left out, and a
two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
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
from dualpath.model.loader import build_model
from dualpath.model.nemotron_h import NemotronHSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "NemotronHForCausalLM"):
    pytest.skip("no Nemotron-H in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32,
    "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 24,
    "mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 12, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
    "max_position_embeddings": 256, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


class _NemotronCheckpoints(RecurrentCheckpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():  # (correction biases that change the choice: transformers starts them at zero)
            for layer in hf.model.layers:
                if layer.block_type == "moe":
                    layer.mixer.gate.e_score_correction_bias.copy_(0.1 * torch.randn(8, generator=g))
        return hf


_CKPTS = _NemotronCheckpoints({
    "moe": ("NemotronHConfig", "NemotronHForCausalLM", CONFIG),
    "latent": ("NemotronHConfig", "NemotronHForCausalLM",
               {**{k: v for k, v in CONFIG.items() if k != "layers_block_type"}, "hybrid_override_pattern": "ME*-M",
                "moe_latent_size": 16, "n_group": 1, "norm_topk_prob": False, "use_conv_bias": False,
                "use_bias": True, "mlp_bias": True}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_hit_starts_from_the_stored_full_blocks_state(tmp_path_factory):
    """Full Blocks copied from another sequence (a storage hit) carry the state at their end; zeroed, they do not."""
    d, hf = _CKPTS.get("moe", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, NemotronHSpec)
    kinds = {"moe": CONFIG["layers_block_type"],
             "latent": ["linear_attention", "moe", "full_attention", "mlp", "linear_attention"]}[family]
    assert list(spec.layer_types) == kinds
    assert spec.latent == (16 if family == "latent" else None)
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.NemotronHForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_the_multi_token_prediction_layers_are_left_out(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("moe", tmp_path_factory)
    tensors = load_file(str(d / "model.safetensors"))
    tensors.update({"mtp.layers.0.norm.weight": torch.zeros(32), "backbone.mtp.fc.weight": torch.zeros(32, 64)})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("latent", tmp_path_factory)
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_a_prefill_clamps_small_time_steps(tmp_path_factory, tmp_path):
    """transformers' chunked scan clamps dt below at ``time_step_min`` (its decode step does not): with time steps
    far below it, our prefill clamps too."""
    d, _ = _CKPTS.get("moe", tmp_path_factory)
    hf = transformers.NemotronHForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():  # softplus(dt - 14) ~ 1e-6 << time_step_min (1e-3) for most tokens; no D skip to hide it
        for i in (0, 4):
            hf.model.layers[i].mixer.dt_bias.fill_(-14.0)
            hf.model.layers[i].mixer.D.zero_()
    hf.save_pretrained(tmp_path)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 8), []))


def test_older_config_names(tmp_path):
    cfg = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h",
           **{k: v for k, v in CONFIG.items() if k not in ("layers_block_type", "n_groups", "conv_kernel")},
           "hybrid_override_pattern": "M*-", "mamba_n_groups": 2, "mamba_d_conv": 3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert list(spec.layer_types) == list(hf.layers_block_type)
    assert (spec.mamba_groups, spec.mamba_kernel) == (hf.n_groups, hf.conv_kernel) == (2, 3)


@pytest.mark.parametrize("change, match", [
    ({"mlp_hidden_act": "tanh"}, "mlp_hidden_act 'tanh'"),
    ({"layers_block_type": ["linear_attention", "cross"]}, "layers_block_type must name"),
    ({"hybrid_override_pattern": "M*X", "layers_block_type": None}, "hybrid_override_pattern"),
    ({"sliding_window": 8}, "sliding_window"),
    ({"mamba_num_heads": 3}, "multiple of n_groups"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("moe", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
