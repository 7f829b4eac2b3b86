"""DeepSeek-OCR 2's language model (``DeepseekOcr2ForConditionalGeneration``'s ``deepseek_ocr2_text``): DeepSeek-V2's
decoder with Llama's attention (GQA, heads ``hidden / heads`` wide whatever the config's ``head_dim``), dense and MoE
layers by ``mlp_layer_types``, DeepSeek-V2's softmax router (greedy or group-limited, not renormalized) and shared
experts; against transformers' image-text model on random weights it wrote."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    LanguageModelView,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_text_config_refused,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model.deepseek_ocr2 import DeepseekOcr2Spec
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekOcr2ForConditionalGeneration"):
    pytest.skip("no DeepSeek-OCR 2 in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 7, "n_routed_experts": 8,
    "n_shared_experts": 2, "num_experts_per_tok": 2, "topk_method": "group_limited_greedy", "n_group": 4,
    "topk_group": 1, "routed_scaling_factor": 1.5, "mlp_layer_types": ["dense", "sparse", "sparse"],
    "max_position_embeddings": 256, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' image-text model (a small vision config), its language model's weights x4 (norms around
    one), the head x8."""
    torch.manual_seed(0)
    cfg = transformers.DeepseekOcr2Config(text_config=TEXT)
    small_vision(cfg)
    hf = transformers.DeepseekOcr2ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.model.language_model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4.0)
        hf.lm_head.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("deepseek_ocr2")
    hf.save_pretrained(d)
    return d, hf


def small_vision(cfg: Any) -> None:
    """Shrink the (large) default vision towers so the test builds quickly."""
    vc = cfg.vision_config
    for sub in ("sam_config", "encoder_config"):
        c = getattr(vc, sub, None)
        if c is None:
            continue
        for key, value in (("hidden_size", 16), ("intermediate_size", 32), ("num_hidden_layers", 1),
                           ("num_attention_heads", 2), ("num_key_value_heads", 2), ("output_channels", 16),
                           ("mlp_dim", 32), ("global_attn_indexes", [0]), ("image_size", 64),
                           ("downsample_channels", [16, 16])):
            if hasattr(c, key):
                setattr(c, key, value)
        if isinstance(getattr(c, "layer_types", None), list):  # (one entry per layer, as its validation wants)
            c.layer_types = c.layer_types[:1]


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, DeepseekOcr2Spec) and spec.architecture == "deepseek_ocr2_text"
    assert spec.head_dim == 16 == hf.config.text_config.head_dim  # (hidden / heads, not the config's 7)
    assert spec.dense_layers == (0,) and spec.topk_method == "group_limited_greedy"
    assert load_spec(spec.to_hf_config()) == spec
    # the head is tied by the image-text config alone (transformers' model never reads the text config's key)
    cfg = json.loads((d / "config.json").read_text())
    assert not load_spec({**cfg, "text_config": {**cfg["text_config"], "tie_word_embeddings": True}}).tie_embeddings


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the image-text model's in-memory names, which transformers reads (its vision
    tower then missing) to the same logits."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    cfg = transformers.DeepseekOcr2Config.from_pretrained(str(tmp_path))
    cfg.vision_config = hf.config.vision_config  # (ours names no vision tower: the fixture's small one to build)
    hf2, info = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(
        str(tmp_path), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info
    assert all("vision" in k or "projector" in k or "view_sep" in k for k in info["missing_keys"]), info
    check_two_chunks_against_hf(ours, hf2.eval(), random_turns(VOCAB, 7, (15,))[0], cut=15)


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("mlp_layer_types", None, "needs mlp_layer_types"),
    ("topk_method", "noaux_tc", "topk_method"),
    ("n_group", 3, "group_limited_greedy needs"),
    ("mlp_bias", True, "mlp_bias"),
    ("num_attention_heads", 5, "multiple of num_attention_heads"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


def test_unlimited_ocr_is_refused_with_its_reason():
    with pytest.raises(ModelError, match="keeps the whole prompt"):
        load_spec({"architectures": ["UnlimitedOcrForConditionalGeneration"], "model_type": "unlimited_ocr"})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
