"""Command A+ (``Cohere2MoeForCausalLM``) against transformers on the same random weights, saved by transformers:
Cohere 2's parallel block (attention and MLP over one norm) and its sliding layers with RoPE and NoPE full ones,
over dense prefix layers (``prefix_dense_intermediate_size`` wide, rotating when the prefix pattern is 1) and MoE
layers: the top-k experts by router logit weighted by their softmax or sigmoid, one shared MLP averaged or summed
with them; Cohere's LayerNorms or RMSNorms. Three configs cover these choices: logits at every prefill and decode
step of several turns over our paged KV, batched sequences, the Triton kernels, bf16, our own ``save_pretrained``
read back by transformers, and configs refused by key."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Cohere2MoeForCausalLM"):
    pytest.skip("no Cohere2-MoE in this transformers", allow_module_level=True)

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "sliding_window": 5, "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 1,
        "prefix_dense_intermediate_size": 48, "first_k_dense_replace": 2, "sliding_window_pattern": 2,
        "logit_scale": 0.5, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
VARIANTS: dict[str, dict[str, Any]] = {
    # the defaults: softmax router, shared expert averaged, Cohere's LayerNorms, the dense prefix rotating
    "softmax_average_layernorm": {},
    # a sigmoid router renormalized, the shared expert summed, RMSNorms
    "sigmoid_sum_rmsnorm": {"expert_selection_fn": "sigmoid", "shared_expert_combination_strategy": "sum",
                            "rms_norm_eps": 1e-6},
    # a sigmoid router as it is; the dense prefix sliding every other layer, its full one without RoPE
    "sigmoid_unnormalized_prefix2": {"expert_selection_fn": "sigmoid", "norm_topk_prob": False,
                                     "prefix_dense_sliding_window_pattern": 2},
}
_CKPTS = Checkpoints({name: ("Cohere2MoeConfig", "Cohere2MoeForCausalLM", dict(BASE, **kw))
                      for name, kw in VARIANTS.items()})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_triton_backend_equals_transformers(ckpt):
    _, d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_spec_follows_transformers(ckpt):
    variant, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "cohere2_moe" and spec.is_moe
    assert [spec.is_moe_layer(i) for i in range(5)] == [t == "sparse" for t in hf.config.mlp_layer_types]
    assert (spec.intermediate_size, spec.moe_intermediate_size, spec.shared_expert_intermediate_size) == (48, 32, 32)
    want_windows = [None if t == "full_attention" else 5 for t in hf.config.layer_types]
    assert [spec.layer_window(i) for i in range(5)] == want_windows
    roped = [i for i in range(5) if hf.model.layers[i].self_attn.sliding_window is not None
             or hf.model.layers[i].self_attn.force_rope]
    assert sorted(set(range(5)) - set(spec.nope_layers)) == roped
    assert spec.rms_norms == (variant == "sigmoid_sum_rmsnorm")
    assert spec.shared_expert_average == (variant != "sigmoid_sum_rmsnorm")
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_bf16_teacher_forced_logits(ckpt):
    """bf16 on both sides, teacher-forced: every row within 3% of the logit range of transformers' bf16 forward.
    Where two router logits nearly tie (random experts: often, in some layer) bf16 rounding alone flips the pick on
    either side, and a sigmoid router weighs the expert it picks by near 1 whatever the margin; those tokens are
    left out, and most tokens must remain."""
    _, d, hf32 = ckpt
    hf = transformers.Cohere2MoeForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    k = hf32.config.num_experts_per_tok
    rows = routing_margins(hf32, seq, k, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    err = (got - ref).abs().max(dim=1).values
    assert float(err[rows].max()) < 0.03 * float(ref.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_save_pretrained_reads_back_in_transformers(variant, tmp_path):
    hf_cfg = transformers.Cohere2MoeConfig(**BASE, **VARIANTS[variant]).to_dict()
    ours = build_model(ModelSpec.from_hf_config(hf_cfg), None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Cohere2MoeForCausalLM, sum(random_turns(VOCAB, 7), []))


@pytest.mark.parametrize("key,value", [("expert_selection_fn", "relu"), ("shared_expert_combination_strategy", "max"),
                                       ("mlp_layer_types", ["dense"]), ("layer_types", ["sliding_attention"]),
                                       ("num_experts", 0), ("first_k_dense_replace", 9)])
def test_bad_configs_name_the_key(key, value):
    cfg = {"architectures": ["Cohere2MoeForCausalLM"], "model_type": "cohere2_moe", **BASE, key: value}
    with pytest.raises(ModelError, match=key):
        load_spec(cfg)
