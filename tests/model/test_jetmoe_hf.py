"""JetMoE (``JetMoeForCausalLM``) against transformers on the same random weights, saved by transformers: attention
experts (each chosen expert projects its slot's queries; shared keys and values; per-expert output projections,
weighted and summed, plus a bias) and GLU MLP experts routed the same way (softmax of the top-k logits)."""

from __future__ import annotations

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
if not hasattr(transformers, "JetMoeForCausalLM"):
    pytest.skip("no JetMoE in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_key_value_heads": 2, "kv_channels": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 256}
_CKPTS = Checkpoints({"jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", CONFIG)})


def test_fp32_multi_turn_logits_batches_and_triton(tmp_path_factory):
    d, hf = _CKPTS.get("jetmoe", tmp_path_factory)
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(tmp_path_factory, tmp_path):
    d, _ = _CKPTS.get("jetmoe", tmp_path_factory)
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "jetmoe"
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (4, 2, 16)
    kv = spec.kv_spec()
    assert (kv.n_kv_heads, kv.head_dim) == (2, 16)  # (the pages hold the shared keys and values only)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.JetMoeForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    """Our bf16 logits are as close to transformers' fp32 ones as transformers' own bf16 logits are, on the tokens
    whose router logits (attention's and MLP's) do not nearly tie."""
    d, hf32 = _CKPTS.get("jetmoe", tmp_path_factory)
    hf = transformers.JetMoeForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    fp32 = hf_logits(hf32, seq)
    rows = (routing_margins(hf32, seq, 2, lambda layer: layer.mlp.router.layer) > 0.05) & (
        routing_margins(hf32, seq, 2, lambda layer: layer.self_attention.experts.router.layer) > 0.05)
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, fp32, rows, max_ratio=None)


@pytest.mark.parametrize("change, match", [
    ({"activation_function": "tanh"}, "activation_function 'tanh'"),
    ({"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) <= num_local_experts \(4\)"),
    ({"kv_channels": 0}, "kv_channels must be an integer >= 1"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["JetMoeForCausalLM"], **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("jetmoe", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
