"""Jamba (``JambaForCausalLM``: Mamba layers with RMS-normalized dt, B and C, attention layers without positions, a
softmax top-k MoE every other layer) against transformers on the same random weights, saved by transformers: logits
over state pages (against transformers' full forward: its cached prefill of a later chunk starts from a zero state),
batched sequences with different cached prefixes, Triton, bf16, our save_pretrained read back by transformers, and a
two-turn session through the emulated cluster on every read path."""

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
if not hasattr(transformers, "JambaForCausalLM"):
    pytest.skip("no Jamba in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
    "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0,
    "mamba_d_state": 8, "mamba_expand": 2, "mamba_d_conv": 4, "max_position_embeddings": 256,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({"jamba": ("JambaConfig", "JambaForCausalLM", CONFIG)})
ckpt = _CKPTS.fixture()


def test_fp32_logits_chunks_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 4), []))


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    _, d, _ = ckpt
    spec = load_spec(d)
    assert spec.layer_types == ("linear_attention", "full_attention") * 2 and spec.moe_layers == (0, 2)
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.JambaForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("jamba", tmp_path_factory)
    hf = transformers.JambaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    with pytest.raises(ModelError, match="hidden_act"):
        load_spec({"architectures": ["JambaForCausalLM"], "model_type": "jamba", **CONFIG, "hidden_act": "tanh"})
    with pytest.raises(ModelError, match="num_experts_per_tok"):
        load_spec({"architectures": ["JambaForCausalLM"], "model_type": "jamba", **CONFIG, "num_experts_per_tok": 5})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("jamba", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
