"""More image-text checkpoints served as their language model: LLaVA-NeXT (and -Video), LLaVA-OneVision, VipLlava,
Video-LLaVA, InternVL, Idefics 2 / 3, SmolVLM, Aya Vision, Command A Vision, LightOnOCR, GOT-OCR 2, Janus, DeepSeek-VL
(and -Hybrid), EXAONE 4.5, Qianfan-OCR, Ovis 2, VideoLLaMA 3, HyperCLOVA X Vision, GLM-4.1V, GLM-4.5V, GLM-OCR,
PaddleOCR-VL, PaliGemma, Granite Docling, Granite 4 Vision, HunYuan-VL, ERNIE 4.5 VL, Emu3 and Phi-4-multimodal
(FastVLM and PerceptionLM, whose timm vision towers cannot be built here, from their text model's weights), against
transformers' own image-text models on the same random weights, written by transformers. Most keep their language
model under its own prefix (``model.language_model.``, ``language_model.model.`` or ``model.text_model.``); the vision
tower, projector and Janus' image-generation head are not loaded. Their configs are transformers' defaults with a
small text model (:data:`TEXT`, plus what a family needs: :data:`TEXT_EXTRA`) and a small vision tower."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import Checkpoints, check_batched_against_hf

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 16,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
#: a small vision tower: these keys, where the family's vision config has them
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "depth": 1,
          "num_heads": 2, "embed_dim": 32, "image_size": 28, "patch_size": 14, "out_hidden_size": 64,
          "projection_dim": 32, "num_layers": 1, "head_dim": 16}
#: model_type -> (its architecture, the text architecture it runs as here)
FAMILIES = {
    "llava_next": ("LlavaNextForConditionalGeneration", "llama"),
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "llama"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "qwen2"),
    "vipllava": ("VipLlavaForConditionalGeneration", "llama"),
    "video_llava": ("VideoLlavaForConditionalGeneration", "llama"),
    "internvl": ("InternVLForConditionalGeneration", "qwen2"),
    "idefics2": ("Idefics2ForConditionalGeneration", "llama"),  # (Mistral runs as Llama with its window)
    "idefics3": ("Idefics3ForConditionalGeneration", "llama"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "llama"),
    "aya_vision": ("AyaVisionForConditionalGeneration", "cohere2"),
    "cohere2_vision": ("Cohere2VisionForConditionalGeneration", "cohere2"),
    "cohere_compass": ("CohereCompassForConditionalGeneration", "cohere_compass_text"),
    "lighton_ocr": ("LightOnOcrForConditionalGeneration", "qwen3"),
    "got_ocr2": ("GotOcr2ForConditionalGeneration", "qwen2"),
    "janus": ("JanusForConditionalGeneration", "llama"),
    "deepseek_vl": ("DeepseekVLForConditionalGeneration", "llama"),
    "deepseek_vl_hybrid": ("DeepseekVLHybridForConditionalGeneration", "llama"),
    "exaone4_5": ("Exaone4_5_ForConditionalGeneration", "exaone4"),
    "qianfan_ocr": ("QianfanOCRForConditionalGeneration", "qwen3"),
    "ovis2": ("Ovis2ForConditionalGeneration", "qwen2"),
    "video_llama_3": ("VideoLlama3ForConditionalGeneration", "qwen2"),
    "hyperclovax_vision_v2": ("HyperCLOVAXVisionV2ForConditionalGeneration", "hyperclovax"),
    # GLM-4.1V: GLM-4's blocks, head size hidden / heads, interleaved partial RoPE (M-RoPE over 4 frequencies)
    "glm4v": ("Glm4vForConditionalGeneration", "glm4"),
    # GLM-4.5V: GLM-4.5's MoE blocks
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", "glm4_moe"),
    # GLM-OCR: GLM-4.1V's blocks without q/k/v biases
    "glm_ocr": ("GlmOcrForConditionalGeneration", "glm4"),
    # PaddleOCR-VL: ERNIE 4.5's blocks with half-split RoPE, every bias by use_bias (here on)
    "paddleocr_vl": ("PaddleOCRVLForConditionalGeneration", "llama"),
    # PaliGemma: Gemma; its prompt attends bidirectionally by default (refused, below), causally when its text
    # config says so (run here)
    "paligemma": ("PaliGemmaForConditionalGeneration", "gemma"),
    # Granite Docling (Idefics 3's layout): a Granite language model (its scalings)
    "granite_docling": ("GraniteDoclingForConditionalGeneration", "granite"),
    # Granite 4 Vision (LLaVA-NeXT's layout, deepstack projectors): a Granite language model
    "granite4_vision": ("Granite4VisionForConditionalGeneration", "granite"),
    # HunYuan-VL: HunYuan's dense model (q/k norms after RoPE), M-RoPE over text alone
    "hunyuan_vl": ("HunYuanVLForConditionalGeneration", "hunyuan_v1_dense"),
    # ERNIE 4.5 VL: ERNIE 4.5 MoE with its text experts (the hub's layout: the routers transposed, the vision
    # router, biases and experts beside the text ones), interleaved RoPE (3D over text alone)
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeForConditionalGeneration", "ernie4_5_moe"),
    # Emu3: a Llama beside its VQ image tokenizer (under model.text_model.)
    "emu3": ("Emu3ForConditionalGeneration", "llama"),
    # Fuyu: a Persimmon language model (LayerNorm q/k norms, ReLU-squared MLP, fused per-head q/k/v) beside its
    # linear patch embedder
    "fuyu": ("FuyuForCausalLM", "persimmon"),
    # NVIDIA Cosmos 3: Omni is Qwen3-VL; Edge a Llama attention over a ReLU-squared MLP (fc1 / fc2), run as Arcee's
    "cosmos3_omni": ("Cosmos3OmniForConditionalGeneration", "qwen3"),
    "cosmos3_edge": ("Cosmos3EdgeForConditionalGeneration", "arcee"),
}
#: text config keys a family needs beyond TEXT (its M-RoPE sections sized to the small heads; its experts)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}
TEXT_EXTRA: dict[str, dict[str, Any]] = {
    # (GLM-4.1V's config names no head_dim (GLM-4's default is 128) and its attention ignores attention_bias; its
    # RoPE rotates every dim unless told otherwise)
    "glm4v": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
              "head_dim": None, "attention_bias": False},
    "glm_ocr": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}},
    "paligemma": {"use_bidirectional_attention": False},
    # (Cohere Compass's RoPE is keyed by layer type: its sliding layers rotate, M-RoPE over text; full ones do not)
    "cohere_compass": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
                       "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [4, 2, 2]},
                                           "full_attention": None}},
    "hunyuan_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2, 2]}},
    "cosmos3_omni": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                         "mrope_interleaved": True}},
    "cosmos3_edge": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                     "hidden_act": "relu2"},
    "granite_docling": {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
                        "logits_scaling": 2.0},
    "granite4_vision": {"embedding_multiplier": 3.0, "residual_multiplier": 0.7, "logits_scaling": 0.5},
    "paddleocr_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                     "use_bias": True},
    "glm4v_moe": {"rope_parameters": _MROPE, "n_routed_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 24, "n_shared_experts": 1, "first_k_dense_replace": 1},
    # (a sparse layer first, then a dense one: not the default's order; the vision experts narrower)
    "ernie4_5_vl_moe": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
                        "moe_intermediate_size": [24, 16], "moe_k": 2, "moe_num_experts": 4,
                        "moe_num_shared_experts": 1, "mlp_layer_types": ["sparse", "dense"], "use_bias": True},
}


#: vision config keys a family needs beyond VISION (Ovis 2's visual vocabulary: 16,384 rows by default; Granite 4
#: Vision's Q-Former takes a head per 64 vision channels)
VISION_EXTRA: dict[str, dict[str, Any]] = {
    "ovis2": {"vocab_size": 64},
    "granite4_vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
}
#: top-level config keys a family needs (Granite 4 Vision's deepstack map and Q-Former window over 2 vision layers)
TOP_EXTRA: dict[str, dict[str, Any]] = {
    "emu3": {"vq_config": {"codebook_size": 8, "embed_dim": 4, "latent_channels": 4, "base_channels": 32,
                           "channel_multiplier": [1], "num_res_blocks": 1, "attn_resolutions": [],
                           "hidden_size": 32, "num_attention_heads": 1},
             "vocabulary_map": {"<|extra_200|>": 93, "<image>": 94, "<|visual token 000000|>": 95}},
    "granite4_vision": {"deepstack_layer_map": [[0, 1]], "downsample_rate": "1/2", "spatial_target_layers": [0, 1, 0, 1]},
}


def _kwargs(family: str) -> tuple[str, dict[str, Any]]:
    """The family's config class name and its keyword arguments: transformers' defaults, the text model and the
    vision tower made small (the default layer types dropped: they list the default's layer count)."""
    cfg = transformers.AutoConfig.for_model(family)
    d = cfg.to_dict()
    text = {k: v for k, v in d["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text.update(TEXT, **TEXT_EXTRA.get(family, {}))
    kw: dict[str, Any] = {"text_config": text}
    vision = d.get("vision_config")
    if isinstance(vision, dict):
        kw["vision_config"] = {**vision, **{k: v for k, v in VISION.items() if k in vision},
                               **VISION_EXTRA.get(family, {})}
    for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        if key in d:
            kw[key] = VOCAB - 1 - ("video" in key)
    kw.update(TOP_EXTRA.get(family, {}))
    return type(cfg).__name__, kw


def _available() -> dict[str, tuple[str, str, dict[str, Any]]]:
    out = {}
    for family, (arch, _) in FAMILIES.items():
        if hasattr(transformers, arch):
            cfg_cls, kw = _kwargs(family)
            out[family] = (cfg_cls, arch, kw)
    return out


_CKPTS = Checkpoints(_available())
ckpt = _CKPTS.fixture()


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB - 2, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_text_logits_equal_transformers_image_text_model(ckpt):
    """Two sequences with cached prefixes in one prefill batch over paged KV, then batched decode steps: every row
    equals transformers' image-text model on the same text."""
    family, d, hf = ckpt
    ours = load_model(LlamaModelConfig(path=str(d), time_model="off"), with_tokenizer=False)[0]
    assert ours.spec.architecture == FAMILIES[family][1]
    n_ours = sum(p.numel() for p in ours.parameters())
    state = hf.state_dict()  # (parameters and buffers: GLM-4.5V's router bias is a buffer there)
    n_text = sum(t.numel() for n, t in state.items() if "language_model" in n or "text_model" in n
                 or n.startswith("lm_head."))
    assert n_ours <= n_text < sum(t.numel() for t in state.values())  # (the vision parts are not loaded)
    check_batched_against_hf(ours, hf, [_ids(20, 1), _ids(14, 2)])


def test_the_text_config_and_a_language_model_we_do_not_run(ckpt):
    """The spec reads the text config (sizes, tying from the top level as transformers does); a text_config of a
    family we do not run is refused by name."""
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and (spec.hidden_size, spec.n_layers, spec.head_dim) == (64, 2, 16)
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert spec.tie_embeddings == tied
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"] = dict(cfg["text_config"], model_type="mamba")
    with pytest.raises(ModelError, match="text_config.model_type 'mamba'"):
        load_spec(cfg)


def test_an_untied_hyperclovax_vision_head_is_read_where_transformers_writes_it(tmp_path):
    """HyperCLOVA X Vision with ``tie_word_embeddings: false``: transformers writes its head under
    ``model.language_model.lm_head`` (the released layout, which it renames on load), where it was not read (the
    checkpoint failed to load)."""
    if not hasattr(transformers, "HyperCLOVAXVisionV2ForConditionalGeneration"):
        pytest.skip("no HyperCLOVA X Vision in this transformers")
    cfg_cls, kw = _kwargs("hyperclovax_vision_v2")
    hf = Checkpoints({"untied": (cfg_cls, "HyperCLOVAXVisionV2ForConditionalGeneration",
                                 {**kw, "tie_word_embeddings": False})}).model("untied")
    assert hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert not ours.spec.tie_embeddings
    check_batched_against_hf(ours, hf, [_ids(20, 1), _ids(14, 2)])


def test_glm4v_text_configs_read_as_transformers_does():
    """GLM-4.1V's text config without head_dim (GLM-4 would take 128) has heads of hidden / heads, always q/k/v
    biases, and RoPE over every dim unless told otherwise (the top level's factor moves into the RoPE parameters);
    GLM-4.5V's has GLM-4.5's MoE, q/k/v biases by default and a factor of 0.5."""
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": VOCAB}
    spec = load_spec({"architectures": ["Glm4vForConditionalGeneration"],
                      "text_config": dict(text, model_type="glm4v_text", attention_bias=False)})
    assert isinstance(spec, ModelSpec) and spec.architecture == "glm4"
    assert (spec.head_dim, spec.partial_rotary_factor, spec.attention_bias) == (16, 1.0, True)
    half = load_spec({"architectures": ["Glm4vForConditionalGeneration"],
                      "text_config": dict(text, partial_rotary_factor=0.5)})
    assert isinstance(half, ModelSpec) and half.partial_rotary_factor == 0.5
    moe = load_spec({"architectures": ["Glm4vMoeForConditionalGeneration"],
                     "text_config": dict(text, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)})
    assert isinstance(moe, ModelSpec) and moe.architecture == "glm4_moe" and moe.n_experts == 4
    assert (moe.head_dim, moe.partial_rotary_factor, moe.attention_bias) == (16, 0.5, True)


def test_glm_ocr_and_paddleocr_text_configs_read_as_transformers_does():
    """GLM-OCR's attention has no q/k/v biases whatever the config says and takes head_dim when named; PaddleOCR-VL's
    language model is Llama with every bias by use_bias, ERNIE 4.5's head size (128) and RoPE base (500,000) by
    default."""
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
            "intermediate_size": 96, "vocab_size": VOCAB}
    ocr = load_spec({"architectures": ["GlmOcrForConditionalGeneration"], "text_config": dict(text, attention_bias=True)})
    assert isinstance(ocr, ModelSpec) and (ocr.architecture, ocr.head_dim, ocr.attention_bias) == ("glm4", 16, False)
    wide = load_spec({"architectures": ["GlmOcrForConditionalGeneration"], "text_config": dict(text, head_dim=32)})
    assert isinstance(wide, ModelSpec) and wide.head_dim == 32
    pad = load_spec({"architectures": ["PaddleOCRVLForConditionalGeneration"], "text_config": dict(text)})
    assert isinstance(pad, ModelSpec) and pad.architecture == "llama"
    assert (pad.head_dim, pad.rope_theta, pad.attention_bias, pad.mlp_bias) == (128, 500000.0, False, False)
    biased = load_spec({"architectures": ["PaddleOCRVLForConditionalGeneration"],
                        "text_config": dict(text, use_bias=True, rope_parameters={"rope_theta": 1e4})})
    assert isinstance(biased, ModelSpec) and (biased.attention_bias, biased.mlp_bias, biased.rope_theta) == \
        (True, True, 1e4)


def test_paligemmas_bidirectional_prompt_is_refused_by_name():
    """PaliGemma's default text config lets the prompt attend both ways (transformers' logits at the first position
    then depend on later tokens): a causal decoder cannot serve it, and says why."""
    _, kw = _kwargs("paligemma")
    cfg = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
           "text_config": dict(kw["text_config"], use_bidirectional_attention=True)}
    with pytest.raises(ModelError, match="use_bidirectional_attention"):
        load_spec(cfg)


@pytest.mark.skipif(not hasattr(transformers, "Ernie4_5_VLMoeForConditionalGeneration"), reason="no ERNIE 4.5 VL")
def test_ernie_vl_reads_its_text_routers_bias_and_experts_in_either_layout(tmp_path):
    """ERNIE 4.5 VL's text and vision routers each carry a correction bias that picks the experts: with distinct
    biases, the text router's (the first row as saved; ``text_moe`` in memory) must be the one read. Both the hub's
    layout (routers transposed, vision experts after the text ones) and transformers' in-memory names load."""
    from safetensors.torch import save_file

    hf = _CKPTS.model("ernie4_5_vl_moe", seed=3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
    hub = tmp_path / "hub"
    hf.save_pretrained(hub)
    seqs = [_ids(20, 5), _ids(14, 6)]
    ours = load_model(LlamaModelConfig(path=str(hub), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, hf, seqs)
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "config.json").write_text((hub / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert any(".mlp.text_moe." in k for k in state) and any(".mlp.vision_moe." in k for k in state)
    save_file(state, str(memory / "model.safetensors"))
    ours = load_model(LlamaModelConfig(path=str(memory), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, hf, seqs)


def test_ernie_vl_text_configs_read_as_transformers_does():
    """ERNIE 4.5 VL's text config: the text experts' width from its per-modality list, the first layer dense by
    default, tied embeddings and no LM-head bias by default; malformed lists are refused by key."""
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
            "intermediate_size": 96, "vocab_size": VOCAB, "moe_num_experts": 4, "moe_k": 2, "use_bias": True}
    arch = ["Ernie4_5_VLMoeForConditionalGeneration"]
    spec = load_spec({"architectures": arch, "text_config": dict(text, moe_intermediate_size=[24, 16])})
    assert isinstance(spec, ModelSpec) and spec.architecture == "ernie4_5_moe"
    assert (spec.moe_intermediate_size, spec.mlp_only_layers, spec.tie_embeddings) == (24, (0,), True)
    assert spec.attention_bias and not spec.lm_head_bias
    assert [spec.is_moe_layer(i) for i in range(3)] == [False, True, True]
    default = load_spec({"architectures": arch, "text_config": dict(text)})
    assert isinstance(default, ModelSpec) and default.moe_intermediate_size == 1536
    with pytest.raises(ModelError, match="moe_intermediate_size must list two"):
        load_spec({"architectures": arch, "text_config": dict(text, moe_intermediate_size=24)})
    with pytest.raises(ModelError, match="mlp_layer_types must list"):
        load_spec({"architectures": arch, "text_config": dict(text, mlp_layer_types=["dense", "sparse"])})


@pytest.mark.skipif(not hasattr(transformers, "Phi4MultimodalForCausalLM"), reason="no Phi-4-multimodal")
def test_phi4_multimodal_serves_its_phi3_decoder(tmp_path):
    """Phi-4-multimodal keeps Phi-3's config at the top level beside its vision and audio configs, and its image and
    audio embedders under ``model.embed_tokens_extend.``: its decoder (partial RoPE, tied embeddings here) equals
    transformers' on text; a config that leaves out what Phi4MultimodalConfig's defaults say reads them, not
    Phi-3's."""
    cfg = transformers.Phi4MultimodalConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        partial_rotary_factor=0.75, tie_word_embeddings=True,
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 28, "patch_size": 14},
        audio_config={"hidden_size": 32, "intermediate_size": 64, "num_blocks": 1, "num_attention_heads": 2})
    torch.manual_seed(4)
    hf = transformers.Phi4MultimodalForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.mul_(4.0) if "norm" not in name else p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert (ours.spec.architecture, ours.spec.partial_rotary_factor, ours.spec.tie_embeddings) == ("phi3", 0.75, True)
    check_batched_against_hf(ours, hf, [_ids(20, 7), _ids(14, 8)])
    sparse = {"architectures": ["Phi4MultimodalForCausalLM"], "model_type": "phi4_multimodal", "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 16}
    spec = load_spec(sparse)
    assert isinstance(spec, ModelSpec) and (spec.vocab_size, spec.n_kv_heads) == (200064, 8)


@pytest.mark.parametrize("family,arch,text_arch", [
    ("fast_vlm", "FastVlmForConditionalGeneration", "Qwen2ForCausalLM"),
    ("perception_lm", "PerceptionLMForConditionalGeneration", "LlamaForCausalLM")])
def test_llava_layout_checkpoints_whose_vision_tower_needs_timm(tmp_path, family, arch, text_arch):
    """FastVLM and PerceptionLM keep LLaVA's layout (``model.language_model.``, the vision tower and projector beside
    it, the LM head at the top) over a Qwen2 / Llama language model; their vision towers are timm models, so the
    checkpoint is written here from transformers' text model (the reference) under those names, with vision
    tensors beside it, and its config is transformers' own config class for the family."""
    from safetensors.torch import save_file

    cfg = transformers.AutoConfig.for_model(family)
    text = {k: v for k, v in cfg.to_dict()["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text.update(TEXT)
    text_cfg = transformers.AutoConfig.for_model(text["model_type"], **{k: v for k, v in text.items()
                                                                        if k != "model_type"})
    torch.manual_seed(9)
    hf = getattr(transformers, text_arch)(text_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(4.0)
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v.contiguous()
             for k, v in hf.state_dict().items()}
    state["model.vision_tower.timm_model.stem.weight"] = torch.zeros(4, 3)
    state["model.multi_modal_projector.linear_1.weight"] = torch.zeros(64, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    top = type(cfg)(text_config=text).to_dict()
    top["architectures"] = [arch]
    (tmp_path / "config.json").write_text(json.dumps(top))
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert ours.spec.architecture == text["model_type"]
    check_batched_against_hf(ours, hf, [_ids(20, 3), _ids(14, 4)])


def test_cosmos3_unified_checkpoints_leave_their_generator_and_towers_out(tmp_path_factory, tmp_path):
    """Cosmos 3's unified checkpoints interleave the generator tower's parameters with the reasoner's (its MoT copies
    of attention and MLP, cross-modal projections) and carry sound / action towers: left out, as transformers leaves
    them; the reasoner gives the same logits."""
    from safetensors.torch import load_file, save_file

    if "cosmos3_edge" not in _CKPTS.families:
        pytest.skip("no Cosmos 3 in this transformers")
    d, hf = _CKPTS.get("cosmos3_edge", tmp_path_factory)
    state = load_file(str(d / "model.safetensors"))
    extra = {"model.language_model.layers.0.self_attn.add_q_proj.weight": torch.zeros(4, 4),
             "model.language_model.layers.1.mlp_moe_gen.fc1.weight": torch.zeros(4, 4),
             "model.language_model.layers.0.input_layernorm_moe_gen.weight": torch.zeros(4),
             "model.language_model.norm_moe_gen.weight": torch.zeros(4), "time_embedder.linear_1.weight": torch.zeros(4),
             "proj_out.weight": torch.zeros(4), "action_modality_embed": torch.zeros(4),
             "audio_proj_in.weight": torch.zeros(4)}
    save_file({**state, **extra}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, hf, [_ids(20, 5), _ids(14, 6)])
    # (the same tensors under another architecture are not dropped: named, not silently lost)
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3VLForConditionalGeneration"],
                                                      "model_type": "qwen3_vl"}))
    with pytest.raises(ModelError):
        load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)
