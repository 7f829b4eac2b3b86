"""GLM-4.5 (``Glm4MoeForCausalLM``) against transformers on the same random weights, saved by transformers' own
``save_pretrained``: GQA attention with q/k/v biases, per-head q/k norms and RoPE on half of each head, a dense
first layer, then DeepSeek-V3's MoE (sigmoid router with a correction bias over expert groups, a scaling factor,
shared experts) over our paged KV; batched; bf16; our ``save_pretrained`` read back by transformers; a hub
checkpoint's multi-token-prediction layer ignored; and the configs we refuse."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import Checkpoints, bf16_teacher_forced, check_batched_against_hf, hf_logits
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
CONFIG: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                          "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
                          "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
                          "routed_scaling_factor": 2.5, "use_qk_norm": True, "attention_bias": True,
                          "num_nextn_predict_layers": 0, "max_position_embeddings": 256}


class _Glm(Checkpoints):
    """Widened like every family's random checkpoint, with correction biases that change the routing."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                bias = layer.mlp.gate.e_score_correction_bias
                bias.copy_(0.2 * torch.randn(bias.shape, generator=g))
        return hf


_CKPTS = _Glm({"glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", CONFIG)})
ckpt = _CKPTS.fixture()


def _load(d, dtype: Any = "float32"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend="torch", dtype=dtype), with_tokenizer=False)[0]


def _turns(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    _, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, _turns(), 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, [_turns(1)[0] + _turns(1)[2], _turns(2)[1]])


def test_spec_follows_transformers(ckpt):
    _, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "glm4_moe" and spec.is_moe
    assert [spec.is_moe_layer(i) for i in range(3)] == [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert spec.rotary_dim == 8 and spec.qk_norm and spec.attention_bias and not spec.o_bias
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (2, 1, 2.5)
    assert spec.shared_expert_intermediate_size == 32
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    other = ModelSpec.from_hf_config(dict(spec.to_hf_config(), routed_scaling_factor=1.0))
    assert spec.fingerprint() != other.fingerprint()


def test_bf16_teacher_forced_logits(ckpt):
    _, d, _ = ckpt
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got, ref = bf16_teacher_forced(_load(d, "bfloat16"), hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_our_save_pretrained_reads_back_in_transformers(tmp_path):
    """Our seeded random GLM-4.5 saved in the hub's per-expert layout: transformers loads it (no missing or
    unexpected tensors) and computes our logits."""
    spec = ModelSpec.from_hf_config(dict(CONFIG, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"]))
    ours = build_model(spec, None, seed=3, backend="torch")
    save_pretrained(ours, tmp_path)
    hf, info = transformers.Glm4MoeForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    seq = sum(_turns(7), [])
    pool = KVPool(ours.spec.kv_spec(), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf.eval(), seq), atol=2e-4, rtol=1e-4)


def test_hub_checkpoint_with_a_multi_token_prediction_layer(ckpt, tmp_path):
    """GLM-4.5 ships its multi-token-prediction module as one more layer (``model.layers.{num_hidden_layers}``,
    with ``num_nextn_predict_layers: 1``): it is not a decoder layer, and loading leaves it out."""
    import json

    from safetensors.torch import load_file, save_file

    _, d, hf = ckpt
    tensors = load_file(str(d / "model.safetensors"))
    extra = {k.replace("model.layers.2.", "model.layers.3.", 1): v.clone()
             for k, v in tensors.items() if k.startswith("model.layers.2.")}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_nextn_predict_layers=1)))
    seq = sum(_turns(3), [])
    model = _load(tmp_path)
    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    got = model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,needle", [
    ("n_group", 3, "n_group"),
    ("topk_group", 5, "topk_group"),
    ("routed_scaling_factor", -1.0, "routed_scaling_factor"),
    ("num_experts_per_tok", 6, "num_experts_per_tok"),
    ("topk_method", "greedy", "noaux_tc"),
])
def test_bad_configs_name_the_key(key, value, needle):
    cfg = dict(CONFIG, model_type="glm4_moe", **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)
