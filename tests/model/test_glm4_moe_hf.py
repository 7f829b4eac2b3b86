"""GLM-4.5 (``Glm4MoeForCausalLM``) beyond what every family gets in ``test_more_families_hf.py`` (multi-turn paged
logits, batching, Triton, bf16, our ``save_pretrained`` read back by transformers): its spec against the modules
transformers built (dense first layer, half-head RoPE, router settings), a hub checkpoint's multi-token-prediction
layer ignored at load, and the configs we refuse."""

from __future__ import annotations

import pytest
import torch
from hf_random import hf_logits
from test_more_families_hf import _CKPTS, FAMILIES, _load, _turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

CONFIG = FAMILIES["glm4_moe"][2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d, hf = _CKPTS.get("glm4_moe", tmp_path_factory)
    return "glm4_moe", d, hf


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
