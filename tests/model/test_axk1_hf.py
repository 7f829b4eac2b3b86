"""A.X-K1 (``AXK1ForCausalLM``, SK Telecom: DeepSeek-V3's MLA over a paged latent cache and its grouped sigmoid
router, plus an RMSNorm on each MoE block's output) against transformers on random weights transformers wrote."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_random import (
    SMALL_MLA_MOE,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    load_checkpoint,
    mla_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AXK1ForCausalLM"):
    pytest.skip("this transformers has no A.X-K1", allow_module_level=True)

VOCAB = 97
CONFIG = dict(SMALL_MLA_MOE, vocab_size=VOCAB, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
              bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return mla_checkpoint(tmp_path_factory, "axk1", "AXK1ForCausalLM", "AXK1Config", CONFIG)


def test_reads_as_deepseek_mla_with_a_norm_on_each_moe_output(ckpt):
    d, hf = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "axk1" and spec.post_moe_norm
    assert spec.first_k_dense_replace == 1 and [spec.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert spec.scoring_func == "sigmoid" and spec.norm_topk_prob and spec.q_lora_rank == 24
    model = load_checkpoint(d)
    assert [hasattr(layer, "post_mlp_layernorm") for layer in model.model.layers] == [False, True, True, True]
    # the norm matters: transformers' weights are not all one
    assert float((hf.model.layers[1].mlp.post_mlp_layernorm.weight.detach() - 1).abs().max()) > 0.05


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, seed=4), []))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.AXK1ForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(17,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["AXK1ForCausalLM"] and saved["model_type"] == "axk1"
    assert saved["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]


def test_a_released_checkpoint_layout_loads(ckpt, tmp_path):
    """The released checkpoints store ``post_mlp_layernorm`` on dense layers too (unused) and no routing correction
    biases (transformers routes with zeros): both read as transformers reads them."""
    from safetensors.torch import load_file, save_file

    src, hf = ckpt
    d = tmp_path / "released"
    shutil.copytree(src, d)
    tensors = load_file(str(d / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.endswith("e_score_correction_bias")}
    tensors["model.layers.0.post_mlp_layernorm.weight"] = torch.full((64,), 7.0)  # a dense layer's: never applied
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ref = transformers.AXK1ForCausalLM.from_pretrained(str(d)).eval()
    assert all(float(layer.mlp.gate.e_score_correction_bias.abs().max()) == 0 for layer in ref.model.layers[1:])
    ours = load_checkpoint(d)
    check_two_chunks_against_hf(ours, ref, sum(random_turns(VOCAB, seed=5), []))
    with torch.no_grad():  # and the zero biases changed the routing against the widened ones
        seq = torch.tensor([sum(random_turns(VOCAB, seed=5), [])])
        assert not torch.allclose(ref(seq).logits, hf(seq).logits, atol=1e-3)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("q_lora_rank", None, "q_lora_rank null"),
    ("mlp_layer_types", ["dense", "sparse", "dense", "sparse"], "mlp_layer_types"),
])
def test_bad_configs_are_refused_naming_the_key(ckpt, tmp_path, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=needle):
        load_spec(tmp_path / "config.json")
