"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``: DeepSeek-V3's MLA over a paged latent cache, GLM-4.5's DeepSeek-style
router, dense layers named by ``mlp_layer_types``) against transformers on random weights transformers wrote."""

from __future__ import annotations

import json

import pytest
from hf_random import (
    SMALL_MLA_MOE,
    check_save_reads_back,
    check_turns_against_hf,
    load_checkpoint,
    mla_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Glm4MoeLiteForCausalLM"):
    pytest.skip("this transformers has no Glm4MoeLite", allow_module_level=True)

VOCAB = 97
CONFIG = dict(SMALL_MLA_MOE, vocab_size=VOCAB, mlp_layer_types=["dense", "dense", "sparse", "sparse"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return mla_checkpoint(tmp_path_factory, "glm4_moe_lite", "Glm4MoeLiteForCausalLM", "Glm4MoeLiteConfig", CONFIG)


def test_reads_as_deepseek_mla_with_its_dense_layers_from_mlp_layer_types(ckpt):
    d, _ = ckpt
    assert "first_k_dense_replace" not in json.loads((d / "config.json").read_text())
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "glm4_moe_lite"
    assert spec.first_k_dense_replace == 2 and [spec.is_moe_layer(i) for i in range(4)] == [False, False, True, True]
    assert spec.scoring_func == "sigmoid" and spec.kv_spec().attention == "mla" and spec.kv_spec().latent_dim == 32 + 8


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.Glm4MoeLiteForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(17,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Glm4MoeLiteForCausalLM"]
    assert saved["mlp_layer_types"] == ["dense", "dense", "sparse", "sparse"]


def test_a_layer_pattern_other_than_leading_dense_is_refused_naming_the_key(ckpt, tmp_path):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["mlp_layer_types"] = ["dense", "sparse", "dense", "sparse"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="mlp_layer_types"):
        load_spec(tmp_path / "config.json")
