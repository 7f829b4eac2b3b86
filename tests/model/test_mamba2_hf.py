"""Mamba-2 language models (``Mamba2ForCausalLM``: only Mamba-2 blocks, Nemotron-H's stack and names) against
transformers on the same random weights, saved by transformers: logits at every prefill and decode step over state
pages, batched sequences with different cached prefixes, bf16, our save_pretrained read back by transformers, and a
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
    check_turns_against_hf,
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
if not hasattr(transformers, "Mamba2ForCausalLM"):
    pytest.skip("no Mamba-2 in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3, "num_heads": 8, "head_dim": 8, "expand": 2,
    "state_size": 8, "n_groups": 2, "conv_kernel": 4, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", CONFIG),
    "tied_bias": ("Mamba2Config", "Mamba2ForCausalLM",
                  {**CONFIG, "tie_word_embeddings": True, "use_bias": True, "use_conv_bias": False}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_and_batches(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "mamba2" and set(spec.layer_types) == {"linear_attention"}
    assert spec.tie_embeddings == (family == "tied_bias")
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Mamba2ForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("mamba2", tmp_path_factory)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("change, match", [
    ({"num_heads": 3}, "num_heads"),
    ({"time_step_limit": [0.0, 5.0]}, "time_step_limit"),
    ({"norm_before_gate": True}, "norm_before_gate"),
    ({"hidden_act": "tanh"}, "hidden_act"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("mamba2", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
