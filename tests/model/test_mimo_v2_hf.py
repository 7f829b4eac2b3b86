"""MiMo-V2-Flash (``MiMoV2FlashForCausalLM``) against transformers on the same random weights, saved by transformers:
sliding layers with twice the KV heads and attention sinks, full layers without; queries and keys wider than values
(values scaled, stored padded); a partial RoPE with a base per layer type; a dense first layer, then DeepSeek-V3's
grouped sigmoid router over experts with no shared one."""

from __future__ import annotations

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
if not hasattr(transformers, "MiMoV2FlashForCausalLM"):
    pytest.skip("no MiMo-V2-Flash in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 24, "v_head_dim": 16, "sliding_window": 5,
          "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
          "topk_group": 1, "routed_scaling_factor": 1.5, "max_position_embeddings": 256,
          "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
          "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 50000.0,
                                                 "partial_rotary_factor": 0.5},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.334}},
          "pad_token_id": None, "eos_token_id": None, "bos_token_id": None}


class _MiMoCheckpoints(Checkpoints):
    def model(self, family: str, seed: int = 0):  # type: ignore[no-untyped-def]
        hf = super().model(family, seed)
        with torch.no_grad():  # (correction biases that change the choice: transformers starts them at zero)
            for layer in hf.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(0.1 * torch.randn(8))
        return hf


_CKPTS = _MiMoCheckpoints({"mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", CONFIG)})


def test_fp32_multi_turn_logits_batches_and_triton(tmp_path_factory):
    d, hf = _CKPTS.get("mimo_v2_flash", tmp_path_factory)
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_pages_and_our_save_pretrained(tmp_path_factory, tmp_path):
    d, _ = _CKPTS.get("mimo_v2_flash", tmp_path_factory)
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "mimo_v2_flash"
    assert [spec.layer_heads(i) for i in range(4)] == [2, 4, 4, 2] and spec.dense_layers == (0,)
    kv = spec.kv_spec()
    assert (kv.n_kv_heads, kv.head_dim) == (4, 24)  # (the sliding layers' heads; values padded to 24)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.MiMoV2FlashForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    """Our bf16 logits are as close to transformers' fp32 ones as transformers' own bf16 logits are, on the tokens
    whose router logits do not nearly tie (its eager attention takes the softmax in bf16; ours in fp32)."""
    d, hf32 = _CKPTS.get("mimo_v2_flash", tmp_path_factory)
    hf = transformers.MiMoV2FlashForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    fp32 = hf_logits(hf32, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    check_bf16_as_close_as_transformers(got, ref, fp32, rows)


def test_config_defaults_as_transformers_reads_them(tmp_path):
    """The hub's ``sliding_window_size`` (the window past the query) and every default of MiMoV2FlashConfig:
    layer types, MLP types, the RoPE per layer type."""
    import json

    small = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "rope_parameters", "sliding_window")}
    cfg = {"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash", **small,
           "num_hidden_layers": 8, "sliding_window_size": 7}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert spec.layer_types == tuple(hf.layer_types) and spec.sliding_window == hf.sliding_window == 8
    assert spec.dense_layers == tuple(i for i, m in enumerate(hf.mlp_layer_types) if m == "dense")
    assert spec.rope_by_type == {t: (p["rope_theta"], p.get("partial_rotary_factor", 0.334))
                                 for t, p in hf.rope_parameters.items()}
    assert spec.value_scale == 0.707  # (absent: MiMoV2FlashConfig's default; an explicit null: no scaling)
    assert load_spec({**cfg, "attention_value_scale": None}).value_scale == 1.0


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ({"v_head_dim": 32}, r"v_head_dim \(32\) must be in \[1, head_dim \(24\)\]"),
    ({"num_attention_heads": 6, "hidden_size": 48}, "2 x num_key_value_heads"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "only a 'default' RoPE"),
    ({"mlp_layer_types": ["dense"]}, "mlp_layer_types must name"),
    ({"n_group": 3}, "n_group"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["MiMoV2FlashForCausalLM"], **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("mimo_v2_flash", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
