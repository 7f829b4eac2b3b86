"""Image-text checkpoints served as their language model (text requests): Mistral 3 (Mistral Small 3.1 / 3.2),
Llava, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE against transformers' own image-text models on the same random weights, saved by
transformers. Over text, Qwen's M-RoPE gives every token three equal position ids, which is the plain RoPE of the
same frequencies: the text architecture runs it exactly. The vision tower and projector are not loaded."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import Checkpoints, check_batched_against_hf, hf_logits

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 16}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # Mistral Small 3.x: a Mistral language model (its embeddings tied by the top-level key, as transformers reads)
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", {
        "text_config": dict(TEXT, model_type="mistral", rope_theta=1e6), "image_token_index": 5,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "head_dim": 16}}),
    # Ministral 3 (3B / 8B / 14B): a Ministral 3 language model (YaRN, queries scaled by position)
    "ministral3": ("Mistral3Config", "Mistral3ForConditionalGeneration", {
        "text_config": dict(TEXT, model_type="ministral3", rope_parameters={
            "type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}),
        "image_token_index": 5,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "head_dim": 16}}),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", {
        "text_config": dict(TEXT, model_type="llama"), "image_token_index": 5,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}}),
    # Qwen2.5-VL: q/k/v biases, M-RoPE sections [2, 3, 3] of 8 frequencies
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", {
        "text_config": dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [0]}, "bos_token_id": 1, "eos_token_id": 2}),
    # Qwen3-VL: per-head q/k norms, interleaved M-RoPE
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", {
        "text_config": dict(TEXT, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "mrope_interleaved": True}),
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "deepstack_visual_indexes": [0]}}),
    # Qwen3-VL-MoE (Qwen3-VL-30B-A3B, -235B-A22B): Qwen3-MoE's decoder, its router always renormalized, experts
    # packed; 2 x 24 != 64, so the hub's transposed expert layout is told apart by shape
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", {
        "text_config": dict(TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                             "mrope_interleaved": True}),
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "deepstack_visual_indexes": [0]}}),
}
ARCH = {"mistral3": "llama", "ministral3": "ministral3", "llava": "llama", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
        "qwen3_vl_moe": "qwen3_moe"}
_CKPTS = Checkpoints(FAMILIES)
ckpt = _CKPTS.fixture()


def _load(d):
    return load_model(LlamaModelConfig(path=str(d), time_model="off"), with_tokenizer=False)[0]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_text_logits_equal_transformers_image_text_model(ckpt):
    """Two sequences with cached prefixes in one prefill batch over paged KV, then batched decode steps: every row
    equals transformers' image-text model on the same text; and one sequence whole, prefilled at once."""
    family, d, hf = ckpt
    ours = _load(d)
    assert ours.spec.architecture == ARCH[family]
    seqs = [_ids(20, 1), _ids(14, 2)]
    check_batched_against_hf(ours, hf, seqs)
    pool = KVPool(ours.spec.kv_spec(), num_blocks=10, block_tokens=4)
    seq = _ids(33, 3)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(9)], 4), pool.layers, all_positions=True)
    ref = hf_logits(hf, seq)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_specs_and_configs_we_cannot_run(ckpt, tmp_path):
    """What the spec reads from the composite config (the text config's keys, tying from the top level, the
    vision tower left out), an older Qwen2.5-VL config with the language model's keys at the top level and
    ``rope_scaling`` of type ``mrope``, and a language model of a family we do not run, named."""
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and (spec.hidden_size, spec.n_layers, spec.head_dim) == (64, 2, 16)
    text = hf.config.get_text_config()
    assert spec.rms_eps == text.rms_norm_eps and spec.attention_bias == (family == "qwen2_5_vl")
    assert spec.rope_theta == text.rope_parameters["rope_theta"]
    assert spec.rope_scaling is None if family != "ministral3" else spec.rope_type == "yarn" and spec.query_scale_beta
    if family == "qwen2_5_vl":
        old = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **TEXT,
               "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
               "vision_config": {"depth": 32}, "tie_word_embeddings": False}
        s2 = load_spec(old)
        assert isinstance(s2, ModelSpec) and s2.architecture == "qwen2" and s2.rope_scaling is None
        assert s2.rope_theta == 1e6 and s2.attention_bias
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"] = dict(cfg["text_config"], model_type="mamba")
    with pytest.raises(ModelError, match="text_config.model_type 'mamba'"):
        load_spec(cfg)


def test_qwen3_vl_moe_hub_expert_layout_and_defaults(tmp_path, tmp_path_factory):
    """Qwen3-VL-MoE's hub checkpoints pack the experts as ``x @ w`` (``gate_up_proj [E, H, 2I]``, ``down_proj
    [E, I, H]``), transposed from what transformers 5 writes; the same weights in that layout load (transformers
    reads both) and give transformers' logits. A text_config that leaves keys out gets Qwen3VLMoeTextConfig's
    defaults (not Qwen3-MoE's), and the top-k weights are always renormalized."""
    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("qwen3_vl_moe", tmp_path_factory)
    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = load_file(str(d / "model.safetensors"))
    flipped = 0
    for name in list(tensors):
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
            flipped += 1
    assert flipped == 4
    save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
    (hub / "config.json").write_text((d / "config.json").read_text())
    seq = _ids(21, 5)
    ref = hf_logits(hf, seq)
    ours = _load(hub)
    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(6)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    sparse = {"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
              "text_config": {"num_hidden_layers": 2, "num_local_experts": 8}}
    spec = load_spec(sparse)
    assert isinstance(spec, ModelSpec) and spec.architecture == "qwen3_moe" and spec.norm_topk_prob
    assert (spec.n_experts, spec.n_experts_per_tok, spec.moe_intermediate_size, spec.hidden_size) == (8, 4, 1408, 2048)

