"""Kimi K2.5 (``Kimi_K25ForConditionalGeneration``: a vision tower and projector over a DeepSeek-V3 language model)
served as text: its language model against transformers' image-text model, text-only, on random weights
transformers wrote; the hub's own layout (remote-code architecture name, ``language_model.model.layers``) too."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import check_turns_against_hf, load_checkpoint, random_turns, widen_mla_moe

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Kimi_K25ForConditionalGeneration"):
    pytest.skip("this transformers has no Kimi K2.5", allow_module_level=True)

VOCAB = 97
TEXT = {"model_type": "kimi_k2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 256, "q_lora_rank": 24}
VISION = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "pos_emb_height": 4, "pos_emb_width": 4}


@pytest.fixture(scope="module", params=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    cfg = transformers.Kimi_K25Config(text_config=dict(TEXT), vision_config=VISION, projection_hidden_size=32,
                                      tie_word_embeddings=request.param == "tied")
    torch.manual_seed(0)
    hf = transformers.Kimi_K25ForConditionalGeneration(cfg).eval()
    widen_mla_moe(hf)
    d = tmp_path_factory.mktemp(f"kimi_k25-{request.param}")
    hf.save_pretrained(d)
    return request.param, d, hf


def test_reads_its_language_model_as_deepseek_v3(ckpt):
    tie, d, _ = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "deepseek_v3"
    assert spec.n_layers == 3 and spec.first_k_dense_replace == 1 and spec.tie_embeddings == (tie == "tied")


def test_text_turns_equal_transformers_image_text_model(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_the_hub_layout_reads_the_same(ckpt, tmp_path):
    """The hub's remote-code name and tensor names (``language_model.model.layers``, as DeepSeek-V3 has them)."""
    from safetensors.torch import load_file, save_file

    _, d, hf = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k.replace("language_model.model.blocks.", "language_model.model.layers."): v.contiguous()
               for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    check_turns_against_hf(load_checkpoint(tmp_path), hf, random_turns(VOCAB, seed=1))


def test_a_language_model_that_is_not_deepseek_is_refused(ckpt, tmp_path):
    _, d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="text_config.model_type"):
        load_spec(tmp_path / "config.json")
