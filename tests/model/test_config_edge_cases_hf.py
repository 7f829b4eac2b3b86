"""Configs as small random checkpoints come, each against transformers on the same weights written by it: a partial
RoPE whose rotated dims are odd (transformers takes ceil(n / 2) frequencies over n and turns twice that many dims),
keys a family's transformers code never reads (a ``head_dim`` or ``num_key_value_heads`` where the head is
``hidden_size // heads`` and every head has its own keys), and per-layer lists longer than the model (transformers
reads each layer's own entry)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import check_batched_against_hf, two_sequences

from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")

VOCAB = 97
COMMON = {"vocab_size": VOCAB, "max_position_embeddings": 128, "pad_token_id": None, "bos_token_id": None,
          "eos_token_id": None, "num_hidden_layers": 2}
_GQA = {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}
_SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
_GLM4_MOE = {**_GQA, "head_dim": 10, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
             "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "partial_rotary_factor": 0.5}
CASES: dict[str, tuple[str, str, dict[str, Any], int | None]] = {
    # (config class, model class, config keys, the rotated dims we must read): a 12-dim head's quarter is 3
    "gpt_neox_odd_rope": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                          {"hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 64, "rotary_pct": 0.25},
                          3),
    "phi3_odd_rope": ("Phi3Config", "Phi3ForCausalLM", {**_GQA, "partial_rotary_factor": 0.25}, 3),
    "nemotron_odd_rope": ("NemotronConfig", "NemotronForCausalLM", {**_GQA, "partial_rotary_factor": 0.25}, 3),
    "glm4_moe_odd_rope": ("Glm4MoeConfig", "Glm4MoeForCausalLM", _GLM4_MOE, 5),
    # keys the family's code never reads
    "gpt2_stray_keys": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_head": 4, "n_layer": 2,
                                                          "n_positions": 128, "head_dim": 8,
                                                          "num_key_value_heads": 2}, None),
    "opt_stray_keys": ("OPTConfig", "OPTForCausalLM", {"hidden_size": 64, "num_attention_heads": 4, "ffn_dim": 96,
                                                       "head_dim": 8, "num_key_value_heads": 1}, None),
    "bloom_stray_keys": ("BloomConfig", "BloomForCausalLM", {"hidden_size": 64, "n_head": 4, "n_layer": 2,
                                                             "head_dim": 8, "num_key_value_heads": 2}, None),
    # per-layer lists as the config class defaults them for its own (deeper) model
    "smollm3_long_no_rope_layers": ("SmolLM3Config", "SmolLM3ForCausalLM",
                                    {**_SMALL, "no_rope_layers": [1, 0, 1, 1, 0, 1]}, None),
    "granite_swa_long_thetas": ("GraniteSWAConfig", "GraniteSWAForCausalLM",
                                {**_SMALL, "layer_rope_theta": [0.0, 5e5, 1e4, 1e4]}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_small_random_configs_equal_transformers(tmp_path, case):
    cfg_cls, model_cls, kw, rotated = CASES[case]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"no {model_cls} in this transformers")
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kw})
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if ("norm" in name or name.endswith("bias")) else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    if rotated is not None:
        assert ours.spec.rotary_dim == rotated
    check_batched_against_hf(ours, hf, two_sequences(VOCAB))


@pytest.mark.parametrize("cfg_cls,sizes", [
    ("DeepseekV3Config", {}),
    ("DeepseekV32Config", {"index_topk": 8, "index_n_heads": 4, "index_head_dim": 16}),
    ("MiniCPM3Config", {}),
    ("YoutuConfig", {}),
])
def test_a_deepseek_config_naming_only_its_sizes_reads_as_transformers_fills_it(cfg_cls, sizes):
    """An MLA config that names only its sizes is read with its config class's defaults: the same spec as
    transformers' own config object written out in full. DeepSeek-V3 / V3.2: 256 routed experts, 8 per token in 8
    groups of which 4 are kept, one shared expert, a 2.5 scale, three dense layers first, BOS 0 and EOS 1; MiniCPM3:
    its residual (``scale_depth`` 1.4) and logit (``dim_model_base`` 256) scalings, 32,768 positions; Youtu-LLM: its
    special tokens."""
    from dualpath.model.spec import load_spec

    if not hasattr(transformers, cfg_cls):
        pytest.skip(f"no {cfg_cls} in this transformers")
    minimal = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
               "num_attention_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 24, "qk_rope_head_dim": 8,
               "qk_nope_head_dim": 16, "v_head_dim": 16, **sizes}
    full = getattr(transformers, cfg_cls)(**minimal).to_dict()
    model_type = full["model_type"]
    spec = load_spec({"model_type": model_type, **minimal})
    assert spec == load_spec(full)
    if cfg_cls.startswith("Deepseek"):
        assert (spec.n_routed_experts, spec.num_experts_per_tok, spec.n_shared_experts, spec.first_k_dense_replace,
                spec.eos_token_id) == (256, 8, 1, 3, 1)
    if cfg_cls == "MiniCPM3Config":
        assert (spec.residual_scale, spec.logits_scaling) == (pytest.approx(0.7), 0.25)


@pytest.mark.parametrize("model_type,arch", [
    ("deepseek_v2", "DeepseekV2ForCausalLM"), ("minicpm3", "MiniCPM3ForCausalLM")])
def test_an_mlp_bias_transformers_adds_is_read_and_a_bad_one_refused_by_name(model_type, arch):
    """These families' transformers code biases the MLP when ``mlp_bias`` is true: read as such (the logits are
    checked in ``test_sweeps_vs_hf.py``), false as before (the same spec as without the key), anything else refused
    by name."""
    from dualpath.errors import ModelError
    from dualpath.model.spec import load_spec

    cfg = {**transformers.AutoConfig.for_model(model_type).to_dict(), "architectures": [arch]}
    cfg.pop("mlp_bias", None)
    assert load_spec({**cfg, "mlp_bias": False}) == load_spec(cfg)
    assert load_spec({**cfg, "mlp_bias": True}).mlp_bias is True  # type: ignore[union-attr]
    with pytest.raises(ModelError, match="mlp_bias"):
        load_spec({**cfg, "mlp_bias": "yes"})
