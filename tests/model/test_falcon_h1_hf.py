"""Falcon-H1 (``FalconH1ForCausalLM``: attention and a Mamba-2 mixer side by side in every layer, muP multipliers)
against transformers on the same random weights, saved by transformers. Each page holds the layer's KV rows and,
after them, its Mamba state: logits at every prefill and decode step, batched sequences with different cached
prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained read back by transformers, and a
two-turn session through the emulated cluster on every read path."""

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
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "FalconH1ForCausalLM"):
    pytest.skip("no Falcon-H1 in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_n_groups": 2,
    "mamba_d_state": 8, "mamba_d_conv": 4, "max_position_embeddings": 256, "mlp_multipliers": [0.7, 1.3],
    "ssm_multipliers": [0.5, 1.5, 0.8, 1.2, 0.9], "key_multiplier": 0.6, "attention_in_multiplier": 1.1,
    "attention_out_multiplier": 0.8, "ssm_in_multiplier": 1.2, "ssm_out_multiplier": 0.9,
    "embedding_multiplier": 1.5, "lm_head_multiplier": 0.7, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "plain": ("FalconH1Config", "FalconH1ForCausalLM", CONFIG),
    "rms_after": ("FalconH1Config", "FalconH1ForCausalLM",
                  {**CONFIG, "mamba_rms_norm": True, "mamba_norm_before_gate": False, "projectors_bias": True,
                   "mamba_proj_bias": True, "mamba_d_ssm": None, "mamba_expand": 1}),
    "rms_before": ("FalconH1Config", "FalconH1ForCausalLM",
                   {**CONFIG, "mamba_rms_norm": True, "mamba_norm_before_gate": True, "tie_word_embeddings": True}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_hit_starts_from_the_stored_full_blocks_kv_and_state(tmp_path_factory):
    d, hf = _CKPTS.get("plain", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB, lambda page: page.view(-1)[4 * 2 * 2 * 8:])


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "falcon_h1" and spec.rms_gate == (family != "plain")
    assert spec.mamba_inner == 32 and spec.scales["key_multiplier"] == 0.6
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.FalconH1ForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("rms_after", tmp_path_factory)
    hf = transformers.FalconH1ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"mamba_n_heads": 5}, "mamba_n_heads"),
    ({"ssm_multipliers": [1.0, 1.0]}, "ssm_multipliers"),
    ({"time_step_limit": [0.0, 2.0]}, "time_step_limit"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["FalconH1ForCausalLM"], "model_type": "falcon_h1", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("plain", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
