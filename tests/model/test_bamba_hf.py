"""Bamba (``BambaForCausalLM``: Mamba-2 layers and attention layers with RoPE on half of each head, each followed by a
Llama SwiGLU) against transformers on the same random weights, saved by transformers: logits at every prefill and
decode step over state pages, batched sequences with different cached prefixes, Triton, bf16, our save_pretrained
read back by transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "BambaForCausalLM"):
    pytest.skip("no Bamba in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_indices": [1], "mamba_n_heads": 4,
    "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_expand": 2, "mamba_d_conv": 4, "max_position_embeddings": 256,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "bamba": ("BambaConfig", "BambaForCausalLM", CONFIG),
    "biases": ("BambaConfig", "BambaForCausalLM", {**CONFIG, "attn_layer_indices": [0, 3], "mlp_bias": True,
                                                   "attention_bias": True, "mamba_proj_bias": True}),
})
ckpt = _CKPTS.fixture()


def test_fp32_logits_batches_and_triton(ckpt):
    """Against transformers' full recompute at every step (its own cached prefill of a second chunk differs from its
    full forward by up to 0.12 in a logit here, transformers 5.24: so not its cache, but its definition)."""
    _, d, hf = ckpt
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "bamba" and spec.rope_by_type["full_attention"][1] == 0.5
    assert [i for i, t in enumerate(spec.layer_types) if t == "full_attention"] == (
        [1] if family == "bamba" else [0, 3])
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.BambaForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("bamba", tmp_path_factory)
    hf = transformers.BambaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("change, match", [
    ({"attn_layer_indices": "1"}, "attn_layer_indices"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"time_step_limit": [0.0, 3.0]}, "time_step_limit"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["BambaForCausalLM"], "model_type": "bamba", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("bamba", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
