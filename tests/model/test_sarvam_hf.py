"""Sarvam's two families, which transformers runs as GLM-4.5 (``sarvam_moe``, under its released tensor names) and
DeepSeek-V3 (``sarvam_mla``): read from the checkpoints transformers writes for them (their own model types, its
conversion of the released names), against transformers' models on random weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    check_batched_against_hf,
    check_turns_against_hf,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "SarvamMoEConfig"):
    pytest.skip("no Sarvam in this transformers", allow_module_level=True)

VOCAB = 97
MOE: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
                       "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                       "max_position_embeddings": 128, "eos_token_id": None, "pad_token_id": None, "initializer_range": 0.05}
MLA: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                       "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "kv_lora_rank": 32,
                       "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "head_dim": 8,
                       "max_position_embeddings": 128, "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.05}


def _checkpoint(factory: Any, cfg_cls: str, model_cls: str, kw: dict[str, Any]) -> tuple[Any, Any]:
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.2 * torch.randn_like(p)) if ("norm" in n or n.endswith("bias")) else p.mul_(3.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    d = factory.mktemp(cfg_cls)
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "SarvamMoEConfig", "Glm4MoeForCausalLM", MOE)


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "SarvamMLAConfig", "DeepseekV3ForCausalLM", MLA)


def test_sarvam_moe_reads_its_released_names(moe):
    """transformers writes Sarvam-MoE under its released names (``word_embeddings``, a fused
    ``attention.query_key_value``, ``attention.dense``, ``query_layernorm``, ``mlp.gate.expert_bias``): read as
    GLM-4.5's, with Sarvam's own defaults (whole-head RoPE, q/k norms), to transformers' logits."""
    from safetensors import safe_open

    d, hf = moe
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.word_embeddings.weight" in names and "model.layers.1.mlp.gate.expert_bias" in names
    assert "model.layers.0.attention.query_key_value.weight" in names
    spec = load_spec(d)
    assert spec.architecture == "glm4_moe" and spec.partial_rotary_factor == 1.0 and spec.qk_norm
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_sarvam_mla_runs_as_deepseek_v3(mla):
    d, hf = mla
    spec = load_spec(d)
    assert type(spec).__name__ == "DeepseekV3Spec" and spec.q_lora_rank is None and spec.first_k_dense_replace == 1
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))


def test_the_released_configs_keys_and_defaults():
    """A released config names its own architecture and the attribute_map's keys (``num_experts``,
    ``num_shared_experts``, ``use_qkv_bias``): read as transformers reads them; without a RoPE base, Sarvam-MoE's
    (8,000,000); a disagreeing pair is named."""
    released = {"architectures": ["SarvamMoEForCausalLM"], "model_type": "sarvam_moe",
                **{k: v for k, v in MOE.items() if k not in ("n_routed_experts", "n_shared_experts")},
                "num_experts": 4, "num_shared_experts": 1, "use_qkv_bias": True}
    spec = load_spec(released)
    assert spec.architecture == "glm4_moe" and spec.n_experts == 4 and spec.attention_bias
    assert spec.rope_theta == 8000000.0
    assert load_spec({**released, "n_routed_experts": 8}) == spec  # (the alias read, as transformers reads it)
    mla = load_spec({"architectures": ["SarvamMLAForCausalLM"], "model_type": "sarvam_mla",
                     **{k: v for k, v in MLA.items() if k != "n_routed_experts"}, "num_local_experts": 4})
    assert type(mla).__name__ == "DeepseekV3Spec" and mla.n_routed_experts == 4 and mla.n_group == 1


@pytest.mark.parametrize("cfg_cls,model_type,sizes", [
    ("SarvamMoEConfig", "sarvam_moe", {k: MOE[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads", "head_dim")}),
    ("SarvamMLAConfig", "sarvam_mla", {k: MLA[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                            "num_attention_heads", "num_key_value_heads",
                                                            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                                            "v_head_dim", "moe_intermediate_size")}),
])
def test_a_config_naming_only_its_sizes_reads_as_transformers_fills_it(cfg_cls, model_type, sizes):
    """A config that names only its sizes is read with the Sarvam config class's defaults: the same spec as
    transformers' own config object written out in full."""
    minimal = {"model_type": model_type, **sizes}
    full = getattr(transformers, cfg_cls)(**sizes).to_dict()
    assert load_spec(minimal) == load_spec(full)


def test_a_fused_projection_of_the_wrong_size_is_named(moe, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    d, _ = moe
    state = load_file(str(d / "model.safetensors"))
    name = "model.layers.2.attention.query_key_value.weight"
    state[name] = state[name][:-16]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())))
    with pytest.raises(ModelError, match=r"query_key_value.weight has 112 rows, expected 128 \(q, k, v: 64 \+ 32 \+ 32\)"):
        load_checkpoint(tmp_path)
