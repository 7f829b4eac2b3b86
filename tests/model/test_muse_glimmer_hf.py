"""Muse Glimmer's language model (``MuseGlimmerForConditionalGeneration``'s ``muse_glimmer_text``): Gemma 2's four
norms around GQA with weightless per-head q/k norms (queries times ``qk_scale_factor``), RoPE except on the NoPE
(full) layers, sliding layers over 6 keys, a per-channel sigmoid gate on the attention output, normed embeddings and
pre-scaled soft-capped logits; against transformers' image-text model on random weights it wrote."""

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
    two_sequences,
)

from dualpath.model.loader import save_pretrained
from dualpath.model.muse_glimmer import MuseGlimmerSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MuseGlimmerForConditionalGeneration"):
    pytest.skip("no Muse Glimmer in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 6, "max_position_embeddings": 256,
    "qk_scale_factor": 2.0, "output_multiplier": 0.8, "final_logit_softcapping": 10.0, "pad_token_id": None,
    "bos_token_id": None, "eos_token_id": None}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "layer_types": ["full_attention"]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' image-text model, its language model's norms N(0, 0.2) around ``1 + weight`` (the final one
    around 0, as built: by ``weight``), other weights x3, the head x8."""
    torch.manual_seed(0)
    hf = transformers.MuseGlimmerForConditionalGeneration(transformers.MuseGlimmerConfig(
        text_config=TEXT, vision_config=VISION, projector_hidden_size=16, out_hidden_size=16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.model.language_model.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(3.0)
        hf.lm_head.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("muse_glimmer")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, MuseGlimmerSpec) and spec.architecture == "muse_glimmer_text"
    assert spec.layer_types == tuple(hf.config.text_config.layer_types)
    assert spec.unrotated == (0, 4) == tuple(i for i, v in enumerate(hf.config.text_config.layer_rope_theta) if not v)
    assert spec.sliding_window == 6 and spec.qk_scale == 2.0 and spec.logit_softcap == 10.0
    assert load_spec(spec.to_hf_config()) == spec


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the image-text model's language model (``model.language_model.``), which
    transformers loads (only its vision parts missing) to the same logits."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    cfg = transformers.MuseGlimmerConfig.from_pretrained(str(tmp_path))
    cfg.vision_config = hf.config.vision_config  # (ours names no vision tower: the fixture's small one to build)
    cfg.projector_hidden_size, cfg.out_hidden_size = hf.config.projector_hidden_size, hf.config.out_hidden_size
    hf2, info = transformers.MuseGlimmerForConditionalGeneration.from_pretrained(
        str(tmp_path), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info
    assert all("vision" in k for k in info["missing_keys"]), info
    check_two_chunks_against_hf(ours, hf2.eval(), random_turns(VOCAB, 7, (15,))[0], cut=15)


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.MuseGlimmerForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("key,value,needle", [
    ("layer_rope_theta", [0, 5e5, 1e4, 1e4, 0], "layer_rope_theta names bases other than rope_theta"),
    ("layer_rope_theta", [0, 1e4], "layer_rope_theta must list"),
    ("layer_types", ["full_attention", "chunked_attention", "full_attention", "full_attention", "full_attention"],
     "layer_types"),
    ("hidden_activation", "tanh", "hidden_activation 'tanh'"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)


# --- Muse Spark: the MoE variant (pooled experts with a normed output each, residual gates, a normed head output) --

SPARK_TEXT: dict[str, Any] = {
    **TEXT, "moe_intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_hidden_size": 24,
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse", "sparse"], "residual_gate_temperature": 0.5}
SPARK_AUDIO: dict[str, Any] = {"hidden_sizes": [8, 16], "depths": [1, 1], "patch_sizes": [2, 2],
                               "num_hidden_layers": 2, "out_hidden_size": 64}


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """transformers' Muse Spark, its language model's norms and residual gates N(0, 0.3), other weights x3, live
    correction biases, the head x8."""
    torch.manual_seed(0)
    hf = transformers.MuseSparkForConditionalGeneration(transformers.MuseSparkConfig(
        text_config=SPARK_TEXT, vision_config=VISION, audio_config=SPARK_AUDIO, projector_hidden_size=16,
        out_hidden_size=16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.model.language_model.named_parameters():
            if "norm" in n or n.endswith("residual_gate.gate"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(3.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
        hf.lm_head.weight.mul_(8.0)
    d = tmp_path_factory.mktemp("muse_spark")
    hf.save_pretrained(d)
    return d, hf




def test_spark_turns_batches_and_saving_equal_transformers(spark, tmp_path):
    d, hf = spark
    spec = load_spec(d)
    assert spec.architecture == "muse_spark_text" and spec.spark and spec.dense_layers == (0,)
    assert load_spec(spec.to_hf_config()) == spec
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    ours = load_checkpoint(d)
    assert ours.model.layers[1].post_attention_residual_gate.gate.dtype == torch.float32
    save_pretrained(ours, tmp_path)
    text = json.loads((tmp_path / "config.json").read_text())["text_config"]  # (our text model; its towers small)
    cfg = transformers.MuseSparkConfig(text_config=text, vision_config=VISION, audio_config=SPARK_AUDIO,
                                       projector_hidden_size=16, out_hidden_size=16)
    hf2, info = transformers.MuseSparkForConditionalGeneration.from_pretrained(
        str(tmp_path), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"] and all("vision" in k or "audio" in k for k in info["missing_keys"]), info
    check_two_chunks_against_hf(ours, hf2.eval(), random_turns(VOCAB, 7, (15,))[0], cut=15)


def test_spark_bf16_teacher_forced_logits(spark):
    from hf_random import routing_margins

    d, hf32 = spark
    hf = transformers.MuseSparkForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.anyio
async def test_spark_cluster_every_read_path(spark):
    d, hf = spark
    await cluster_two_turns(d, hf, VOCAB)
