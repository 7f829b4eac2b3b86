"""MiniMax-M2 (``MiniMaxM2ForCausalLM``) beyond what every family gets in ``test_more_families_hf.py`` (multi-turn
paged logits, batching, Triton, bf16, our ``save_pretrained`` read back by transformers): its spec against the
modules transformers built, the hub's config keys, transformers' in-memory (packed) tensor layout, and the configs
we refuse, each naming its key."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import hf_logits
from test_more_families_hf import _CKPTS, FAMILIES, _load, _turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MiniMaxM2ForCausalLM"):
    pytest.skip("this transformers has no MiniMax-M2", allow_module_level=True)

CONFIG = FAMILIES["minimax_m2"][2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _CKPTS.get("minimax_m2", tmp_path_factory)


def _logits(model, seq):
    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)


def test_spec_follows_transformers(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "minimax_m2" and spec.is_moe
    assert all(spec.is_moe_layer(i) for i in range(spec.n_layers))
    assert spec.rotary_dim == 8 and spec.qk_norm_full and not spec.qk_norm
    attn = hf.model.layers[0].self_attn
    assert tuple(attn.q_norm.weight.shape) == (4 * 16,) and tuple(attn.k_norm.weight.shape) == (2 * 16,)
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor, spec.norm_topk_prob) == (1, 1, 1.0, True)
    assert spec.n_experts == 8 and spec.moe_intermediate_size == 32 and spec.shared_expert_intermediate_size == 0
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_hub_config_keys_and_transformers_packed_tensors(ckpt, tmp_path):
    """The hub's config.json (``rotary_dim``, ``scoring_func``, ``use_routing_bias``, ``qk_norm_type``,
    ``attn_type_list``, multi-token-prediction settings) and transformers' in-memory names (``mlp.experts.gate_up_proj``,
    the correction bias on ``mlp``) load to the same model."""
    from safetensors.torch import save_file

    d, hf = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=5000000.0, rotary_dim=8, scoring_func="sigmoid", use_routing_bias=True,
               qk_norm_type="per_layer", use_qk_norm=True, attn_type_list=[1] * 4, shared_intermediate_size=0,
               use_mtp=True, num_mtp_modules=3, mtp_transformer_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    packed = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in packed)
    assert any(k.endswith("mlp.e_score_correction_bias") for k in packed)
    save_file(packed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    seq = sum(_turns(3), [])
    torch.testing.assert_close(_logits(_load(tmp_path), seq), hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,needle", [
    ("scoring_func", "softmax", "scoring_func"),
    ("use_routing_bias", False, "use_routing_bias"),
    ("shared_intermediate_size", 64, "shared_intermediate_size"),
    ("qk_norm_type", "per_head", "qk_norm_type"),
    ("attn_type_list", [0, 1, 1, 1], "attn_type_list"),
    ("rotary_dim", 40, "rotary_dim"),
])
def test_bad_configs_name_the_key(key, value, needle):
    cfg = dict(CONFIG, model_type="minimax_m2", **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)


def test_block_scaled_fp8_weights_load_dequantized(ckpt, tmp_path):
    """MiniMax-M2 publishes block-scaled FP8 weights (``weight_scale_inv`` per 128x128 tile, as DeepSeek-V3): an
    attention and an expert weight stored so load dequantized, within the FP8 weight error of the plain model."""
    from safetensors.torch import load_file, save_file

    d, _ = ckpt
    tensors = load_file(str(d / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight"):
        w = tensors[name]
        scale = w.abs().amax() / 448.0
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = _load(tmp_path)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    want = q.float() * tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"], want)
    w1 = tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    want = w1.float() * tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight_scale_inv"]
    assert torch.equal(model.state_dict()["model.layers.1.mlp.experts.3.gate_proj.weight"], want)
    seq = sum(_turns(3), [])
    plain, fp8 = _logits(_load(d), seq), _logits(model, seq)
    assert not torch.equal(plain, fp8)  # the FP8 weights were used
    assert float((fp8 - plain).abs().mean()) < 0.02 * float(plain.abs().max())  # within the FP8 weight error
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="q_proj.weight_scale_inv"):
        _load(tmp_path)
