"""Molmo2 (``Molmo2ForConditionalGeneration``) on text: its language model with Qwen3's per-head or OLMo's
whole-projection q/k norms, norms before or after each sublayer, an embedding wider than the LM head (the image
tokens), and a scaled RoPE on some layers with the plain one on the others; against transformers on random weights
it wrote (a small vision tower and adapter beside them, left out here), in the released layout transformers saves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    WidenedLogits,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
    widen_language_model,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import save_pretrained
from dualpath.model.molmo2 import Molmo2Spec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Molmo2ForConditionalGeneration"):
    pytest.skip("no Molmo2 in this transformers", allow_module_level=True)

VOCAB, EXTRA = 97, 6
WIDTH = VOCAB + EXTRA
TEXT: dict[str, Any] = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                        "vocab_size": VOCAB, "additional_vocab_size": EXTRA, "num_hidden_layers": 3,
                        "intermediate_size": 48, "max_position_embeddings": 128, "rope_theta": 500.0}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "num_key_value_heads": 2, "head_dim": 8}
ADAPTER: dict[str, Any] = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                           "intermediate_size": 16, "text_hidden_size": 32, "vision_feature_layer": [-1]}
#: the variants: Molmo2 4B / 8B (Qwen3's norms, before each sublayer), Molmo2-O (OLMo's, after), and the other two
#: combinations with q/k/v biases, one without image tokens
VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3": {"qk_norm_type": "qwen3", "norm_after": False},
    "olmo": {"qk_norm_type": "olmo", "norm_after": True},
    "qwen3_after_bias": {"qk_norm_type": "qwen3", "norm_after": True, "attention_bias": True},
    "olmo_before_no_extra": {"qk_norm_type": "olmo", "norm_after": False, "attention_bias": True,
                             "additional_vocab_size": 0},
}
#: a YaRN RoPE on layer 1 only (the other two turn the plain RoPE of the same base), past its original context
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                            "original_max_position_embeddings": 8}, "rope_scaling_layers": [1]}


def _checkpoint(factory: Any, name: str, text: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' model, its language model's norms N(0, 0.2) about their init and other weights x3."""
    torch.manual_seed(0)
    cfg = transformers.Molmo2Config(text_config={**TEXT, **text}, vision_config=VISION, adapter_config=ADAPTER)
    hf = widen_language_model(transformers.Molmo2ForConditionalGeneration(cfg).eval(),
                              skip=("model.vision_tower.", "model.multi_modal_projector."))
    d = factory.mktemp(f"molmo2_{name}")
    hf.save_pretrained(d)
    return d, hf


def _width(text: dict[str, Any]) -> int:
    return VOCAB + text.get("additional_vocab_size", EXTRA)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d, hf = _checkpoint(tmp_path_factory, request.param, VARIANTS[request.param])
    return request.param, d, WidenedLogits(hf, _width(VARIANTS[request.param]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d, hf = _checkpoint(tmp_path_factory, "base", VARIANTS["qwen3"])
    return d, hf


def test_spec_reads_each_variant(variant):
    name, d, _ = variant
    spec = load_spec(d)
    text = {**TEXT, **VARIANTS[name]}
    assert isinstance(spec, Molmo2Spec) and spec.architecture == "molmo2_text"
    assert (spec.qk_norm_type, spec.norm_after, spec.attention_bias) == (
        text["qk_norm_type"], text["norm_after"], bool(text.get("attention_bias")))
    assert (spec.qk_norm, spec.qk_norm_full, spec.post_norms) == (
        text["qk_norm_type"] == "qwen3", text["qk_norm_type"] == "olmo", text["norm_after"])
    assert spec.vocab_size == _width(text) and spec.output_vocab_size == (VOCAB if _width(text) > VOCAB else None)
    assert not spec.tie_embeddings and spec.unscaled_layers == () and spec.rope_theta == 500.0
    assert load_spec(spec.to_hf_config()) == spec
    cfg = spec.to_hf_config()
    assert load_spec({k: v for k, v in cfg.items() if k != "architectures"}) == spec  # (by model_type alone)
    assert load_spec(cfg["text_config"]) == spec  # (the text config alone)


def test_each_variant_equals_transformers(variant):
    """Chunked prefills and greedy decode over the paged pool, then two sequences batched over different cached
    prefixes: every logit row is transformers' (widened past the head) and so are the greedy ids."""
    _, d, hf = variant
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_the_triton_kernels(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), WidenedLogits(hf, WIDTH), sum(random_turns(VOCAB, 3), []))


def test_image_tokens_are_read_but_never_generated(ckpt):
    """The image tokens (ids past the head) embed like any other, as transformers' wider embedding does, and get
    -inf logits: a sampler at any temperature never picks one."""
    from dualpath.engine.sampling import SamplingParams, filtered_probs

    d, hf = ckpt
    ours = load_checkpoint(d)
    seq = [3, 99, 14, 101, 102, 7, 98, 55]
    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, WidenedLogits(hf, WIDTH)(torch.tensor([seq])).logits[0], atol=2e-4, rtol=1e-4)
    assert torch.isinf(got[:, VOCAB:]).all() and torch.isfinite(got[:, :VOCAB]).all()
    probs = filtered_probs(got[-1], SamplingParams(temperature=3.0))
    assert float(probs[VOCAB:].sum()) == 0.0


def test_a_scaled_rope_on_some_layers(tmp_path_factory):
    """YaRN on the layers of ``rope_scaling_layers`` and the plain RoPE of the same base on the others, past the
    original context: transformers' two tables, layer by layer."""
    text = {**VARIANTS["olmo"], **YARN}
    d, hf = _checkpoint(tmp_path_factory, "yarn", text)
    spec = load_spec(d)
    assert isinstance(spec, Molmo2Spec) and spec.unscaled_layers == (0, 2) and spec.rope_local_theta == 500.0
    assert [spec.local_rope_layer(i) for i in range(3)] == [True, False, True]
    assert load_spec(spec.to_hf_config()) == spec
    wide = WidenedLogits(hf, WIDTH)
    check_turns_against_hf(load_checkpoint(d), wide, random_turns(VOCAB, 0))
    # every layer scaled (transformers' default) is another model: the per-layer choice is what is checked
    every = load_spec({**spec.to_hf_config(), "text_config": {**spec.to_hf_config()["text_config"],
                                                               "rope_scaling_layers": None}})
    assert isinstance(every, Molmo2Spec) and every.unscaled_layers == () and every.rope_local_theta is None


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the language model in the released layout (fused projections, the embedding in
    two parts), which transformers loads (its placeholder vision tower the only thing missing) to the same logits."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    hf2, info = transformers.Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["unexpected_keys"], info
    assert info["missing_keys"] and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
                                        for k in info["missing_keys"]), info
    assert hf2.config.text_config.additional_vocab_size == EXTRA and hf2.lm_head.weight.shape[0] == VOCAB
    check_two_chunks_against_hf(ours, WidenedLogits(hf2.eval(), WIDTH), random_turns(VOCAB, 7, (15,))[0], cut=15)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.transformer.wte.new_embedding").get_shape() == [EXTRA, 32]
    assert "model.transformer.blocks.0.self_attn.att_proj.weight" in names and "lm_head.weight" in names


@pytest.mark.parametrize("name", ["qwen3", "olmo"])
def test_transformers_in_memory_names(tmp_path_factory, name):
    """A checkpoint under transformers' in-memory names (``model.language_model.*``, separate projections, the
    norms named for their place in a pre-norm block) reads to the same model."""
    import json

    from safetensors.torch import save_file

    d, hf = _checkpoint(tmp_path_factory, f"{name}_saved", VARIANTS[name])
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in state
    out = tmp_path_factory.mktemp(f"molmo2_{name}_in_memory")
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())))
    check_two_chunks_against_hf(load_checkpoint(out), WidenedLogits(hf, WIDTH), random_turns(VOCAB, 5, (14,))[0])


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got[:, :VOCAB], ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("qk_norm_type", "layer", "qk_norm_type"),
    ("rope_scaling_layers", [0, 5], "rope_scaling_layers must list layer indices 0..2"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    cfg = load_spec(ckpt[0]).to_hf_config()
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, "text_config": {**cfg["text_config"], key: value}})


def test_a_fused_projection_of_the_wrong_size_is_named(ckpt, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    d, _ = ckpt
    state = load_file(str(d / "model.safetensors"))
    name = "model.transformer.blocks.1.self_attn.att_proj.weight"
    state[name] = state[name][:-8]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())))
    with pytest.raises(ModelError, match=r"att_proj.weight has 56 rows, expected 64 \(32 \+ 16 \+ 16\)"):
        load_checkpoint(tmp_path)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, WidenedLogits(hf, WIDTH), VOCAB)
