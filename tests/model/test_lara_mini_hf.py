"""Lara-mini (``LaraMiniForCausalLM``: Qwen3.5's Gated DeltaNet, sliding attention with RoPE, full attention with
none, softmax experts routed in fp32 plus an ungated shared expert) against transformers on the same random weights,
saved by transformers: logits at every prefill and decode step (past the sliding window), batched sequences with
different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained read back by
transformers (its fused ``in_proj``), and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    assert_same_bf16_rounding,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.lara_mini import LaraMiniSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LaraMiniForCausalLM"):
    pytest.skip("no Lara-mini in this transformers", allow_module_level=True)

VOCAB = 97
TYPES = ["linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 6, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16,
    "max_position_embeddings": 256, "pad_token_id": None, "eos_token_id": None}
_CKPTS = RecurrentCheckpoints({
    "released_pattern": ("LaraMiniConfig", "LaraMiniForCausalLM", CONFIG),
    "variant": ("LaraMiniConfig", "LaraMiniForCausalLM",
                {**CONFIG, "tie_word_embeddings": False, "attention_bias": True, "norm_topk_prob": False,
                 "linear_conv_kernel_dim": 3, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
                 "layer_types": ["sliding_attention", "linear_attention", "full_attention", "linear_attention",
                                 "linear_attention"]}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))  # (32 positions: past the 6-token window)
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("released_pattern", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, LaraMiniSpec) and spec.architecture == "lara_mini"
    if family == "released_pattern":  # (LaraMiniConfig's period-5 pattern)
        assert spec.layer_types == tuple(TYPES) and spec.tie_embeddings
    assert [spec.layer_window(i) for i in range(5)] == [6 if t == "sliding_attention" else None
                                                        for t in spec.layer_types]
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.LaraMiniForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_transformers_in_memory_names_read_too(tmp_path_factory, tmp_path):
    """A checkpoint with the linear layers' projections split (transformers' in-memory ``in_proj_qkv`` / ``z`` /
    ``b`` / ``a``, ``norm``) gives the same logits as the fused one."""
    import shutil

    from safetensors.torch import save_file

    d, hf = _CKPTS.get("released_pattern", tmp_path_factory)
    shutil.copy(d / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in _names(tmp_path)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("released_pattern", tmp_path_factory)
    hf = transformers.LaraMiniForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: layer.mlp.gate) > 0.05
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


def test_bf16_layers_round_as_transformers_does(tmp_path_factory):
    """In bf16, on one input, the Gated DeltaNet layer (its gated norm multiplies the weight in fp32), the MoE block
    (its router in fp32) and the attention's q / k norms (weights in fp32) round as transformers' do."""
    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch

    d, _ = _CKPTS.get("released_pattern", tmp_path_factory)
    hf = transformers.LaraMiniForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ours = load_checkpoint(d, dtype="bfloat16")
    x = torch.randn(1, 23, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=8, block_tokens=4)
    batch = SeqBatch.build([list(range(23))], [0], [pool.allocate(8)], 4)
    theirs, mine = hf.model.layers, ours.model.layers
    with torch.no_grad():
        assert_same_bf16_rounding(mine[0].linear_attn(x[0], batch, pool.layers[0]), theirs[0].linear_attn(x)[0])
        assert_same_bf16_rounding(mine[0].mlp(x[0]), theirs[0].mlp(x)[0])
        a, o = theirs[1].self_attn, mine[1].self_attn
        assert_same_bf16_rounding(o.q_norm(o.q_proj(x[0]).view(23, 4, 8)), a.q_norm(a.q_proj(x).view(1, 23, 4, 8))[0])
        assert_same_bf16_rounding(o.k_norm(o.k_proj(x[0]).view(23, 2, 8)), a.k_norm(a.k_proj(x).view(1, 23, 2, 8))[0])


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["LaraMiniForCausalLM"], "model_type": "lara_mini", **CONFIG}
    for change, match in (({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
                           "rope_parameters"),
                          ({"layer_types": ["linear_attention", "mamba", "conv", "full_attention", "conv"]},
                           "layer_types"),
                          ({"linear_num_value_heads": 3}, "multiple"),
                          ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
                          ({"hidden_act": "tanh"}, "hidden_act")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("released_pattern", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
