"""Granite 4.0 hybrid (``GraniteMoeHybridForCausalLM``: Mamba-2 layers and attention layers, Granite's scalings, a
softmax-over-top-k MoE plus a shared MLP) against transformers on the same random weights, saved by transformers.
The Mamba-2 layers' state lives in state pages: logits at every prefill and decode step, batched sequences with
different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained read back by
transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

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
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.granite_hybrid import GraniteHybridSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GraniteMoeHybridForCausalLM"):
    pytest.skip("no Granite 4.0 hybrid in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "shared_intermediate_size": 24, "layer_types": ["mamba", "attention", "mamba", "mamba"], "mamba_n_heads": 4,
    "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_expand": 2, "mamba_d_conv": 4, "max_position_embeddings": 256,
    "embedding_multiplier": 1.5, "residual_multiplier": 0.7, "attention_multiplier": 0.3, "logits_scaling": 2.0,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "nope_moe": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", CONFIG),
    "rope_dense": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                   {**CONFIG, "position_embedding_type": "rope", "num_local_experts": 0, "mamba_n_groups": 1,
                    "mamba_conv_bias": False, "mamba_proj_bias": True}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_hit_starts_from_the_stored_full_blocks_state(tmp_path_factory):
    """Full Blocks copied from another sequence (a storage hit) carry the state at their end; zeroed, they do not."""
    d, hf = _CKPTS.get("nope_moe", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, GraniteHybridSpec)
    assert spec.layer_types == ("linear_attention", "full_attention", "linear_attention", "linear_attention")
    assert spec.scales == (1.5, 0.7, 0.3, 2.0) and spec.mamba_inner == 64
    assert bool(spec.rope_by_type) == (family == "rope_dense") and bool(spec.experts) == (family == "nope_moe")
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.GraniteMoeHybridForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("rope_dense", tmp_path_factory)
    hf = transformers.GraniteMoeHybridForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ({"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
    ({"layer_types": ["mamba", "mlp", "mamba", "mamba"]}, "layer_types must name"),
    ({"mamba_n_heads": 5}, "mamba_n_heads"),
    ({"position_embedding_type": "alibi"}, "position_embedding_type"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid", **CONFIG,
                   **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("nope_moe", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
