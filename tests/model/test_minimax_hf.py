"""MiniMax (``MiniMaxForCausalLM``: lightning attention, a linear attention with a fixed decay per head, between
softmax attention layers; post-norm blocks with scaled residuals; a softmax top-k MoE) against transformers on the
same random weights, saved by transformers: logits at every prefill and decode step over state pages, batched
sequences with different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained
read back by transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
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
if not hasattr(transformers, "MiniMaxForCausalLM"):
    pytest.skip("no MiniMax in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_local_experts": 4,
    "num_experts_per_tok": 2, "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                               "linear_attention"],
    "full_attn_alpha_factor": 1.5, "full_attn_beta_factor": 0.5, "linear_attn_alpha_factor": 0.8,
    "linear_attn_beta_factor": 1.2, "mlp_alpha_factor": 1.1, "mlp_beta_factor": 0.9, "max_position_embeddings": 256,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

_CKPTS = Checkpoints({"minimax": ("MiniMaxConfig", "MiniMaxForCausalLM", CONFIG)})
ckpt = _CKPTS.fixture()


def test_fp32_logits_chunks_batches_and_triton(ckpt):
    """Against transformers' full forward (its MiniMax takes only its own cache class)."""
    _, d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 4), []))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_a_hit_starts_from_the_stored_full_blocks_state(tmp_path_factory):
    d, hf = _CKPTS.get("minimax", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    _, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "minimax" and spec.factors == (1.5, 0.5, 0.8, 1.2, 1.1, 0.9)
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.MiniMaxForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("minimax", tmp_path_factory)
    hf = transformers.MiniMaxForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    for change, match in (({"hidden_act": "tanh"}, "hidden_act 'tanh'"), ({"sliding_window": 8}, "sliding_window"),
                          ({"num_experts_per_tok": 5}, "num_experts_per_tok")):
        with pytest.raises(ModelError, match=match):
            load_spec({"architectures": ["MiniMaxForCausalLM"], "model_type": "minimax", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("minimax", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
