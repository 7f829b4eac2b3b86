"""Checkpoint configs read as another architecture's: image-text checkpoints (Gemma 3, Mistral 3, Llava, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, and the others of :data:`_IMAGE_TEXT_ARCHS`) as their language model, CodeGen
as its Llama-shaped equivalent, and the Llama aliases."""

from __future__ import annotations

from typing import Any

from dualpath.errors import ModelError
from dualpath.model.spec_common import inherit_outer

#: Gemma3TextConfig's defaults, for the sparse ``text_config`` of Gemma 3's multimodal checkpoints (gemma-3-4b-it
#: lists only what differs from them)
_GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                         "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}


def is_gemma3_multimodal(cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` is a Gemma 3 image-text checkpoint's (``Gemma3ForConditionalGeneration``)."""
    archs = cfg.get("architectures") or []
    return "Gemma3ForConditionalGeneration" in archs or (not archs and cfg.get("model_type") == "gemma3")


def gemma3_text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The text model's config of a Gemma 3 image-text checkpoint (its ``text_config`` over Gemma3TextConfig's
    defaults, read as ``Gemma3ForCausalLM``: the language model serves text; the vision tower is not loaded); any
    other config unchanged."""
    if not is_gemma3_multimodal(cfg):
        return cfg
    text = cfg.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object")
    out = {**_GEMMA3_TEXT_DEFAULTS, **text, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    inherit_outer(out, text, cfg, ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"))
    tie = composite_tie(cfg, text)
    if tie is not None:
        out["tie_word_embeddings"] = tie
    return out


def composite_tie(cfg: dict[str, Any], text: dict[str, Any], own: dict[str, Any] | None = None) -> bool | None:
    """Whether an image-text checkpoint ties its LM head to the embeddings, as transformers 5 decides it: by the
    outer config's ``tie_word_embeddings`` (its class's default where the config leaves it out:
    :func:`with_class_defaults` has filled it), or by either that and the text config's for the classes that
    forward a pre-v5 save's text-level key (:data:`~dualpath.model.class_defaults.TIE_FROM_TEXT`: Llava, Qwen2-VL,
    GLM-4.1V, ...); never for a model class that ties nothing (:data:`~dualpath.model.class_defaults.NEVER_TIED`:
    Cosmos3 Edge, Muse Spark). ``own``: the config holding the outer key when it is not ``cfg`` (an Omni model's
    thinker). None: the outer config has no say (the text config's key stands): it leaves the key out, or its class
    ties the head inside a language model built from the text config
    (:data:`~dualpath.model.class_defaults.TIE_BY_TEXT`: Llama 4, BLIP-2)."""
    from dualpath.model.class_defaults import NEVER_TIED, TIE_BY_TEXT, TIE_FROM_TEXT

    archs = cfg.get("architectures") or []
    if any(a in NEVER_TIED for a in archs):
        return False
    if any(a in TIE_BY_TEXT for a in archs):
        return None
    outer = (cfg if own is None else own).get("tie_word_embeddings")
    if outer is None:
        return None
    if cfg.get("model_type") in TIE_FROM_TEXT:
        return bool(outer) or bool(text.get("tie_word_embeddings"))
    return bool(outer)


#: image-text checkpoints whose language model serves text here: architecture -> (family, the model_type of a
#: text_config that names none)
_IMAGE_TEXT: dict[str, tuple[str, str]] = {
    "Mistral3ForConditionalGeneration": ("mistral3", "mistral"),
    "LlavaForConditionalGeneration": ("llava", "llama"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "qwen2_vl_text"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "qwen2_5_vl_text"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "qwen3_vl_text"),
    "Llama4ForConditionalGeneration": ("llama4", "llama4_text"),
    "Gemma4ForConditionalGeneration": ("gemma4", "gemma4_text"),
    "FuyuForCausalLM": ("fuyu", "persimmon"),
    "Cosmos3OmniForConditionalGeneration": ("cosmos3_omni", "qwen3_vl_text"),
    "Cosmos3EdgeForConditionalGeneration": ("cosmos3_edge", "cosmos3_edge_text"),
    "Gemma3nForConditionalGeneration": ("gemma3n", "gemma3n_text"),
    "Gemma4UnifiedForConditionalGeneration": ("gemma4_unified", "gemma4_unified_text"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl_moe", "qwen3_vl_moe_text"),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "qwen3_5_text"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5_moe", "qwen3_5_moe_text"),
    "MiniCPMV4_6ForConditionalGeneration": ("minicpmv4_6", "qwen3_5_text"),
    "MiniCPMV4_7ForConditionalGeneration": ("minicpmv4_7", "qwen3_5_text"),
    "MiniCPMOcrForConditionalGeneration": ("minicpm_ocr", "qwen3_5_text"),
    "Lfm2VlForConditionalGeneration": ("lfm2_vl", "lfm2"),
    "Lfm3VlForConditionalGeneration": ("lfm3_vl", "lfm3"),
    "InklingForConditionalGeneration": ("inkling_mm_model", "inkling_text"),
    "Qwen4ExpForConditionalGeneration": ("qwen4_exp", "qwen4_exp_text"),
    # their language model alone is a text model run here (transformers runs it on text alone)
    "LlavaNextForConditionalGeneration": ("llava_next", "llama"),
    "LlavaNextVideoForConditionalGeneration": ("llava_next_video", "llama"),
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision", "qwen2"),
    "VipLlavaForConditionalGeneration": ("vipllava", "llama"),
    "VideoLlavaForConditionalGeneration": ("video_llava", "llama"),
    "InternVLForConditionalGeneration": ("internvl", "qwen2"),
    "Idefics2ForConditionalGeneration": ("idefics2", "mistral"),
    "Idefics3ForConditionalGeneration": ("idefics3", "llama"),
    "SmolVLMForConditionalGeneration": ("smolvlm", "llama"),
    "AyaVisionForConditionalGeneration": ("aya_vision", "cohere2"),
    "Cohere2VisionForConditionalGeneration": ("cohere2_vision", "cohere2"),
    "CohereCompassForConditionalGeneration": ("cohere_compass", "cohere_compass_text"),
    "LightOnOcrForConditionalGeneration": ("lighton_ocr", "qwen3"),
    "GotOcr2ForConditionalGeneration": ("got_ocr2", "qwen2"),
    "JanusForConditionalGeneration": ("janus", "llama"),
    "DeepseekVLForConditionalGeneration": ("deepseek_vl", "llama"),
    "DeepseekVLHybridForConditionalGeneration": ("deepseek_vl_hybrid", "llama"),
    "Exaone4_5_ForConditionalGeneration": ("exaone4_5", "exaone4"),
    "QianfanOCRForConditionalGeneration": ("qianfan_ocr", "qwen3"),
    "Ovis2ForConditionalGeneration": ("ovis2", "qwen2"),
    "VideoLlama3ForConditionalGeneration": ("video_llama_3", "qwen2"),
    "HyperCLOVAXVisionV2ForConditionalGeneration": ("hyperclovax_vision_v2", "hyperclovax"),
    "Glm4vForConditionalGeneration": ("glm4v", "glm4v_text"),
    "Glm46VForConditionalGeneration": ("glm46v", "glm4v_text"),
    "Glm4vMoeForConditionalGeneration": ("glm4v_moe", "glm4v_moe_text"),
    "GlmOcrForConditionalGeneration": ("glm_ocr", "glm_ocr_text"),
    "PaddleOCRVLForConditionalGeneration": ("paddleocr_vl", "paddleocr_vl_text"),
    "PaliGemmaForConditionalGeneration": ("paligemma", "gemma"),
    "GraniteDoclingForConditionalGeneration": ("granite_docling", "granite_docling_text"),
    "Granite4VisionForConditionalGeneration": ("granite4_vision", "granite4_vision_text"),
    "HunYuanVLForConditionalGeneration": ("hunyuan_vl", "hunyuan_vl_text"),
    # ERNIE 4.5 VL: ERNIE 4.5 MoE with its text experts (a text token never reaches the vision experts)
    "Ernie4_5_VLMoeForConditionalGeneration": ("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
    "Ernie4_5_VL_MoeForConditionalGeneration": ("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
    # Apertus 1.5: Apertus with a wider vocabulary (visual and audio codes) and its LM head pruned to the text ids
    "Apertus1p5ForConditionalGeneration": ("apertus1p5", "apertus1p5_text"),
    "Apertus1p5TextForCausalLM": ("apertus1p5_text", "apertus1p5_text"),
    # BLIP-2 and InstructBLIP: their language model (OPT, or a Llama such as Vicuna) alone; without an image the
    # Q-Former's query embeddings are not part of the prompt
    "Blip2ForConditionalGeneration": ("blip-2", "opt"),
    "InstructBlipForConditionalGeneration": ("instructblip", "opt"),
    "InstructBlipVideoForConditionalGeneration": ("instructblipvideo", "opt"),
    # MiniMax-M3: its language model (dualpath.model.minimax_m3), or the text model alone
    "MiniMaxM3SparseForConditionalGeneration": ("minimax_m3_vl", "minimax_m3_vl_text"),
    "MiniMaxM3VLForCausalLM": ("minimax_m3_vl_text", "minimax_m3_vl_text"),
    # FastVLM, PerceptionLM: LLaVA's layout over Qwen2 / Llama; Emu3: a Llama over text and image-code tokens (its
    # VQ tokenizer not loaded), also as its text model alone
    "FastVlmForConditionalGeneration": ("fast_vlm", "qwen2"),
    "PerceptionLMForConditionalGeneration": ("perception_lm", "llama"),
    "Emu3ForConditionalGeneration": ("emu3", "emu3_text_model"),
    "Emu3ForCausalLM": ("emu3_text_model", "emu3_text_model"),
    # Aria: its MoE language model (the vision tower and cross-attention projector not loaded)
    "AriaForConditionalGeneration": ("aria", "aria_text"),
    # Phi-4-multimodal: Phi-3's decoder (its config at the top level; the image and audio embedders not loaded)
    "Phi4MultimodalForCausalLM": ("phi4_multimodal", "phi4_multimodal_text"),
    # Qwen Omni: the thinker's language model (the whole model, or its thinker alone)
    "Qwen3OmniMoeForConditionalGeneration": ("qwen3_omni_moe", "qwen3_omni_moe_text"),
    "Qwen3OmniMoeThinkerForConditionalGeneration": ("qwen3_omni_moe_thinker", "qwen3_omni_moe_text"),
    "Qwen2_5OmniForConditionalGeneration": ("qwen2_5_omni", "qwen2_5_omni_text"),
    "Qwen2_5OmniThinkerForConditionalGeneration": ("qwen2_5_omni_thinker", "qwen2_5_omni_text"),
}
#: the image-text family of each architecture
_IMAGE_TEXT_ARCHS = {arch: family for arch, (family, _) in _IMAGE_TEXT.items()}
#: what a text_config of each image-text family is when it names no model_type
_TEXT_DEFAULT_TYPE = dict(_IMAGE_TEXT.values())
#: the families whose language model is in their ``thinker_config`` (the talker and vocoder are not loaded)
_THINKER_FAMILIES = ("qwen3_omni_moe", "qwen2_5_omni")
#: their language model's model_type -> (the text architecture that runs it, its model_type there) (M-RoPE over
#: text alone, where every token's three position ids are equal, is the plain RoPE of the same frequencies)
_TEXT_MODELS: dict[str, tuple[str, str]] = {
    "mistral": ("MistralForCausalLM", "mistral"),
    "llama": ("LlamaForCausalLM", "llama"),
    "opt": ("OPTForCausalLM", "opt"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen2_vl_text": ("Qwen2ForCausalLM", "qwen2"),
    "qwen2_5_vl_text": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3_vl_text": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "ministral": ("MinistralForCausalLM", "ministral"),
    "ministral3": ("Ministral3ForCausalLM", "ministral3"),
    "llama4_text": ("Llama4ForCausalLM", "llama4_text"),
    "qwen3_vl_moe_text": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen3_5_text": ("Qwen3_5ForCausalLM", "qwen3_5_text"),
    "lfm2": ("Lfm2ForCausalLM", "lfm2"),
    "lfm3": ("Lfm3ForCausalLM", "lfm3"),
    "inkling_text": ("InklingForCausalLM", "inkling_text"),
    "qwen4_exp_text": ("Qwen4ExpForCausalLM", "qwen4_exp_text"),
    "qwen3_5_moe_text": ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text"),
    "cohere2": ("Cohere2ForCausalLM", "cohere2"),
    "cohere_compass_text": ("CohereCompassForCausalLM", "cohere_compass_text"),
    "exaone4": ("Exaone4ForCausalLM", "exaone4"),
    "hyperclovax": ("HyperCLOVAXForCausalLM", "hyperclovax"),
    "glm4v_text": ("Glm4ForCausalLM", "glm4"),
    "glm4v_moe_text": ("Glm4MoeForCausalLM", "glm4_moe"),
    "glm_ocr_text": ("Glm4ForCausalLM", "glm4"),
    "paddleocr_vl_text": ("LlamaForCausalLM", "llama"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "granite_docling_text": ("GraniteForCausalLM", "granite"),
    "granite4_vision_text": ("GraniteForCausalLM", "granite"),
    "hunyuan_vl_text": ("HunYuanDenseV1ForCausalLM", "hunyuan_v1_dense"),
    "qwen3_omni_moe_text": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen2_5_omni_text": ("Qwen2ForCausalLM", "qwen2"),
    "ernie4_5_vl_moe_text": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe"),
    "phi4_multimodal_text": ("Phi3ForCausalLM", "phi3"),
    "apertus1p5_text": ("ApertusForCausalLM", "apertus"),
    "minimax_m3_vl_text": ("MiniMaxM3VLForCausalLM", "minimax_m3_vl_text"),
    "emu3_text_model": ("LlamaForCausalLM", "llama"),
    "aria_text": ("AriaTextForCausalLM", "aria_text"),
    "gemma4_text": ("Gemma4ForCausalLM", "gemma4_text"),
    "persimmon": ("PersimmonForCausalLM", "persimmon"),
    "cosmos3_edge_text": ("ArceeForCausalLM", "arcee"),
    "gemma3n_text": ("Gemma3nForCausalLM", "gemma3n_text"),
    "gemma4_unified_text": ("Gemma4UnifiedForCausalLM", "gemma4_unified_text"),
}
#: Emu3TextConfig's defaults where LlamaConfig's differ
_EMU3_TEXT_DEFAULTS = {"vocab_size": 184622, "intermediate_size": 14336, "num_key_value_heads": 8,
                       "max_position_embeddings": 9216, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                       "pad_token_id": 151643, "bos_token_id": 151849, "eos_token_id": 151850}
#: Cosmos3EdgeTextConfig's defaults where ArceeConfig's differ
_COSMOS3_EDGE_DEFAULTS = {"vocab_size": 131072, "hidden_size": 2048, "intermediate_size": 9216, "num_hidden_layers": 28,
                          "num_attention_heads": 16, "num_key_value_heads": 8, "hidden_act": "relu2",
                          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "head_dim": 128,
                          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 11, "tie_word_embeddings": False}
#: Phi4MultimodalConfig's defaults where Phi3Config's differ
_PHI4_MM_DEFAULTS = {"vocab_size": 200064, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "original_max_position_embeddings": 4096, "bos_token_id": 199999, "pad_token_id": 199999,
                     "eos_token_id": [199999, 200020]}
#: image-text families whose LM head is not followed by their Cohere 2 language model's ``logit_scale`` (transformers'
#: Aya Vision and Command A Vision apply the head alone)
_UNSCALED_LOGITS = ("aya_vision", "cohere2_vision")
#: Qwen3VLMoeTextConfig's defaults (they differ from Qwen3MoeConfig's, which would otherwise fill a key the
#: text_config leaves out); its router always renormalizes the top-k weights (no norm_topk_prob key), and it
#: names the expert count num_local_experts or num_experts
_QWEN3_VL_MOE_DEFAULTS = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "decoder_sparse_step": 1,
                          "moe_intermediate_size": 1408, "num_experts_per_tok": 4, "num_experts": 60,
                          "tie_word_embeddings": True}


def image_text_family(cfg: dict[str, Any]) -> str | None:
    """The image-text family (``mistral3``, ``llava``, ``qwen2_vl``, ... :data:`_IMAGE_TEXT_ARCHS`) of a config,
    or None for any other."""
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in _IMAGE_TEXT_ARCHS:
            return _IMAGE_TEXT_ARCHS[a]
    mt = cfg.get("model_type")
    return str(mt) if not archs and mt in _IMAGE_TEXT_ARCHS.values() else None


#: checkpoints transformers runs as Llama under other names (EXAONE 3 / 3.5, InternLM3): their config keys -> Llama's
_LLAMA_ALIASES: dict[str, dict[str, str]] = {
    "exaone": {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
               "activation_function": "hidden_act"},
    "internlm3": {"qkv_bias": "attention_bias", "bias": "mlp_bias"},
}
#: their config classes' defaults where Llama's differ
_LLAMA_ALIAS_DEFAULTS: dict[str, dict[str, Any]] = {
    "exaone": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
    "internlm3": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}


#: CodeGen's fused q/k/v is split over this many groups (transformers' ``CodeGenAttention.mp_num``)
CODEGEN_MP = 4


def codegen_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A CodeGen config (``CodeGenForCausalLM``: Salesforce's codegen-*) as the GPT-J config it is: the same keys,
    block, interleaved partial RoPE and biased head; only its fused ``qkv_proj`` differs, split at load by
    :func:`dualpath.model.tensor_names.codegen_tensors` (so our ``save_pretrained`` writes a GPT-J checkpoint of the same
    model). Any other config unchanged."""
    archs = cfg.get("architectures") or []
    if "CodeGenForCausalLM" not in archs and not (not archs and cfg.get("model_type") == "codegen"):
        return cfg
    heads = cfg.get("n_head", 16)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads % CODEGEN_MP:
        raise ModelError(f"{where}: n_head must be a multiple of {CODEGEN_MP} for CodeGen's fused q/k/v, got {heads!r}")
    out = {k: v for k, v in cfg.items() if k != "n_ctx"}
    return {**out, "architectures": ["GPTJForCausalLM"], "model_type": "gptj"}


def llama_alias_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """An EXAONE 3 (``ExaoneForCausalLM``) or InternLM3 (``InternLM3ForCausalLM``) config as the Llama config it
    is (transformers runs both as Llama); any other config unchanged. EXAONE's tensor names are read by the loader
    (:func:`dualpath.model.tensor_names.exaone_tensors`)."""
    archs = [str(a).lower() for a in cfg.get("architectures") or []]
    family = next((f for f in _LLAMA_ALIASES if f"{f}forcausallm" in archs), None)
    if family is None and cfg.get("model_type") in _LLAMA_ALIASES and (not archs or archs == ["llamaforcausallm"]):
        family = str(cfg["model_type"])  # (transformers writes LlamaForCausalLM with the family's model_type)
    if family is None:
        return cfg
    out = {**_LLAMA_ALIAS_DEFAULTS[family], **cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for theirs, ours in _LLAMA_ALIASES[family].items():
        if theirs in out:
            value = out.pop(theirs)
            if ours in cfg and cfg[ours] != value:
                raise ModelError(f"{where}: {theirs} ({value!r}) and {ours} ({cfg[ours]!r}) disagree")
            out[ours] = value
    if family == "internlm3" and bool(out.get("attention_bias")) != bool(out.get("mlp_bias")):
        raise ModelError(f"{where}: qkv_bias and bias must be equal (InternLM3 runs as Llama, one bias setting)")
    return out


#: Glm4vMoeTextConfig's defaults where Glm4MoeConfig's differ (or it has none)
_GLM4V_MOE_DEFAULTS = {"max_position_embeddings": 65536, "attention_bias": True, "partial_rotary_factor": 0.5}


def _glm4v_text(mt: str, text: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.1V's language model (``glm4v_text``) and GLM-OCR's (``glm_ocr_text``) as the GLM-4 they are, and
    GLM-4.5V's (``glm4v_moe_text``) as GLM-4.5: their attention's head size is ``hidden_size //
    num_attention_heads`` (GLM-4.1V's always; the others' unless the config names ``head_dim``), GLM-4.1V's q/k/v
    always carry biases and GLM-OCR's never, and a ``partial_rotary_factor`` that neither the RoPE parameters nor
    the top level name is 1.0 (GLM-4.1V, GLM-OCR) or 0.5 (GLM-4.5V)."""
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    if mt in ("glm4v_text", "glm_ocr_text"):
        out = {"partial_rotary_factor": 1.0, **text, "attention_bias": mt == "glm4v_text"}
        if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and \
                (mt == "glm4v_text" or out.get("head_dim") is None):
            out["head_dim"] = hidden // heads
        return out
    out = {**_GLM4V_MOE_DEFAULTS, **text}
    if out.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        out["head_dim"] = hidden // heads
    return out


def _ernie_vl_text(text: dict[str, Any], where: str) -> dict[str, Any]:
    """ERNIE 4.5 VL's language model as the ERNIE 4.5 MoE it is on text: its ``moe_intermediate_size`` lists the text
    and the vision experts' widths (the text experts' is kept; ``[1536, 512]`` by default), ``mlp_layer_types``
    says which layers are dense (by default the first), its embeddings are tied by default and its LM head has no
    bias whatever ``use_bias`` says."""
    out = {"tie_word_embeddings": True, **text, "lm_head_bias": False}
    sizes = out.get("moe_intermediate_size")
    if sizes is None:
        sizes = [1536, 512]
    if not (isinstance(sizes, list) and len(sizes) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in sizes)):
        raise ModelError(f"{where}: text_config.moe_intermediate_size must list two positive integers (the text "
                         f"and the vision experts' widths), got {sizes!r}")
    out["moe_intermediate_size"] = sizes[0]
    n = out.get("num_hidden_layers", 28)
    if out.get("mlp_layer_types") is None and isinstance(n, int):
        out["mlp_layer_types"] = ["dense"] + ["sparse"] * (n - 1)
    return out


def text_model_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of an image-text checkpoint, read as the text architecture that runs it (the
    vision tower and projector are not loaded; requests carry text): Gemma 3 (:func:`gemma3_text_config`),
    Mistral 3 (Mistral Small 3.1 / 3.2), Llava, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (run as Qwen3-MoE:
    :data:`_QWEN3_VL_MOE_DEFAULTS`; its experts' hub layout is read by the loader). Keys the text config leaves out
    come from the top level (the dtype, special tokens, the embedding tying, which the top level decides when it
    says, as transformers does); an M-RoPE (``mrope_section``) reads as the plain RoPE it is over text. Any other
    config is returned unchanged."""
    cfg = gemma3_text_config(cfg, where)
    family = image_text_family(cfg)
    if family is None:
        return cfg
    outer = cfg
    if family in _THINKER_FAMILIES:
        thinker = cfg.get("thinker_config")
        if not isinstance(thinker, dict):
            raise ModelError(f"{where}: thinker_config must be an object (the {family} model's language model)")
        cfg = {**{k: cfg[k] for k in ("torch_dtype", "dtype") if k in cfg}, **thinker}
    text = cfg.get("text_config")
    if text is None:  # (older Qwen2-VL / 2.5-VL configs keep the language model's keys at the top level)
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "vision_config",
                                                           "audio_config")}
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object")
    mt = str(text.get("model_type") or _TEXT_DEFAULT_TYPE[family])
    if mt not in _TEXT_MODELS:
        raise ModelError(f"{where}: text_config.model_type {mt!r} of a {family} checkpoint is unsupported; expected "
                         f"one of {sorted(_TEXT_MODELS)}")
    arch, model_type = _TEXT_MODELS[mt]
    if mt == "qwen3_vl_moe_text":
        if text.get("num_experts") is None and text.get("num_local_experts") is not None:
            text = {**text, "num_experts": text["num_local_experts"]}
        text = {**_QWEN3_VL_MOE_DEFAULTS, **{k: v for k, v in text.items() if k != "num_local_experts"},
                "norm_topk_prob": True}
    if mt in ("glm4v_text", "glm4v_moe_text", "glm_ocr_text"):
        text = _glm4v_text(mt, text)
    if mt == "apertus1p5_text":  # (Apertus1p5TextConfig's vocabulary; a head as wide as it is unpruned)
        text = {"vocab_size": 266752, **text}
        if text.get("output_vocab_size") == text["vocab_size"]:
            text["output_vocab_size"] = None
    if mt == "emu3_text_model":
        rope = text.get("rope_parameters")
        defaults = dict(_EMU3_TEXT_DEFAULTS)
        if isinstance(rope, dict) and "rope_theta" in rope or text.get("rope_scaling") is not None:
            del defaults["rope_theta"]
        text = {**defaults, **text}
    if mt == "cosmos3_edge_text":  # (Cosmos3EdgeTextConfig's defaults: Llama's attention, a ReLU-squared MLP)
        text = {**_COSMOS3_EDGE_DEFAULTS, **text}
        rope = text.get("rope_parameters")
        if not (isinstance(rope, dict) and "rope_theta" in rope) and text.get("rope_theta") is None:
            text["rope_theta"] = 100_000_000.0
    if mt == "phi4_multimodal_text":
        text = {**_PHI4_MM_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k != "eos_token_id"}}
    if mt == "ernie4_5_vl_moe_text":
        text = _ernie_vl_text(text, where)
    if mt == "paddleocr_vl_text":  # ERNIE 4.5's blocks with half-split RoPE: Llama, every bias by use_bias
        bias = bool(text.get("use_bias", False))
        text = {"head_dim": 128, "tie_word_embeddings": True, **text, "attention_bias": bias, "mlp_bias": bias}
        rope = text.get("rope_parameters")
        if text.get("rope_theta") is None and not (isinstance(rope, dict) and "rope_theta" in rope):
            text["rope_theta"] = 500000.0  # (Ernie4_5Config's default)
    out = {**text, "architectures": [arch], "model_type": model_type}
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"):
        if out.get(key) is None and key in cfg:
            out[key] = cfg[key]
    tie = composite_tie(outer, text, own=cfg)
    if tie is not None:
        out["tie_word_embeddings"] = tie
    if family in _UNSCALED_LOGITS:
        out["logit_scale"] = 1.0
    for key in ("rope_scaling", "rope_parameters"):
        rope = out.get(key)
        if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("type") == "mrope"):
            plain = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved", "type")}
            if plain.get("rope_type", "default") in ("mrope", "default"):
                plain["rope_type"] = "default"
            out[key] = plain if key == "rope_parameters" else (None if plain["rope_type"] == "default" else plain)
    return out


#: Sarvam's families, which transformers runs as other architectures (its auto classes map their model types):
#: ``sarvam_moe`` as GLM-4.5 (its released tensor names read by :func:`dualpath.model.tensor_names.sarvam_tensors`)
#: and ``sarvam_mla`` as DeepSeek-V3; model_type -> (that architecture, its model_type, SarvamMoEConfig's /
#: SarvamMLAConfig's defaults where they differ from that architecture's config class)
_SARVAM: dict[str, tuple[str, str, dict[str, Any]]] = {
    "sarvam_moe": ("Glm4MoeForCausalLM", "glm4_moe", {
        "vocab_size": 262144, "intermediate_size": 8192, "num_hidden_layers": 19, "num_attention_heads": 64,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "moe_intermediate_size": 1024, "num_experts_per_tok": 6,
        "routed_scaling_factor": 2.5, "use_qk_norm": True, "eos_token_id": 1, "pad_token_id": 0, "head_dim": 64,
        "partial_rotary_factor": 1.0}),
    "sarvam_mla": ("DeepseekV3ForCausalLM", "deepseek_v3", {
        "vocab_size": 262144, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
        "num_attention_heads": 64, "num_key_value_heads": 64, "n_routed_experts": 128, "q_lora_rank": None,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1}),
}
#: their RoPE base by default (SarvamMLA's is DeepSeek-V3's)
_SARVAM_THETA = {"sarvam_moe": 8000000.0}


def sarvam_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A Sarvam config (model_type ``sarvam_moe`` or ``sarvam_mla``, whatever its ``architectures`` name) as the
    GLM-4.5 or DeepSeek-V3 config transformers runs it as, its config class's defaults where they differ (its
    attribute_map's names are read first, by :func:`canonical_keys`); any other config unchanged."""
    mt = cfg.get("model_type")
    if mt not in _SARVAM:
        return cfg
    arch, model_type, defaults = _SARVAM[str(mt)]
    out = dict(cfg)  # (their attribute_map's names already read: canonical_keys runs first)
    rope = out.get("rope_parameters")
    named = (isinstance(rope, dict) and "rope_theta" in rope) or out.get("rope_theta") is not None
    if mt in _SARVAM_THETA and not named:
        out["rope_theta"] = _SARVAM_THETA[str(mt)]
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:
        defaults = {k: v for k, v in defaults.items() if k != "partial_rotary_factor"}
    return {**defaults, **out, "architectures": [arch], "model_type": model_type}


def canonical_keys(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """``cfg`` read as its config class reads it: each key the class reads under another name (:data:`ATTRIBUTE_MAPS`
    of its model_type, e.g. Mixtral's ``num_experts`` for ``num_local_experts``) moved to that name, and each key it
    leaves out that the class gives a default (:func:`with_class_defaults`), in the config and in its ``text_config``
    / ``thinker_config`` (by their own model_type). Where a config gives both names, the alias's value is the one
    read, as transformers 5 reads it (its config classes set the attribute from the alias last)."""
    from dualpath.model.attribute_maps import ATTRIBUTE_MAPS

    aliases = ATTRIBUTE_MAPS.get(str(cfg.get("model_type")), {})
    out = dict(cfg)
    for alias, key in aliases.items():
        if alias in out:
            value = out.pop(alias)
            if value is not None or key not in out:
                out[key] = value
    out = with_class_defaults(out)
    for sub in ("text_config", "thinker_config"):
        if isinstance(out.get(sub), dict):
            out[sub] = canonical_keys(out[sub], f"{where}: {sub}")
    return out


#: the RoPE keys transformers 5 reads as they are, and legacy ones a class converts (GPT-NeoX, StableLM, Persimmon)
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling")
_LEGACY_ROPE_KEYS = ("rotary_pct", "rotary_emb_base", "rotary_base", "rope_base", "rope_pct", "rotary_percentage")


def with_class_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with each key of :data:`~dualpath.model.class_defaults.CLASS_DEFAULTS` for its model_type that it leaves
    out set to its config class's default, as transformers builds the config (a Mistral config without
    ``sliding_window`` attends over 4,096 tokens, a GLM-4 one without ``rms_norm_eps`` normalizes with 1.5625e-7,
    Mixtral's RoPE base is 1e6). A key given as null stays null. The RoPE: a config that names no ``rope_theta``,
    ``rope_parameters`` or ``rope_scaling`` gets the class's whole default RoPE (its base, and its scaling where the
    class has one, e.g. Mistral 4's YaRN); one whose RoPE parameters leave out the base gets the class's base; one with a
    legacy RoPE key its class converts (GPT-NeoX's ``rotary_pct`` / ``rotary_emb_base``, DBRX's
    ``attn_config.rope_theta``) is left to its family's reader. A config without a model_type is left as it is."""
    from dualpath.model.class_defaults import CLASS_DEFAULTS

    defaults = CLASS_DEFAULTS.get(str(cfg.get("model_type")))
    if not defaults:
        return cfg
    out = dict(cfg)
    for key, value in defaults.items():
        if key not in ("rope_theta", "rope_parameters", "first_k_dense_replace") and key not in out:
            out[key] = value
    if "first_k_dense_replace" in defaults and "first_k_dense_replace" not in out and "mlp_layer_types" not in out:
        out["first_k_dense_replace"] = defaults["first_k_dense_replace"]
    legacy = any(k in _LEGACY_ROPE_KEYS for k in out) or any(
        isinstance(v, dict) and "rope_theta" in v for k, v in out.items() if k not in _ROPE_KEYS)
    if "rope_theta" in defaults and not legacy:
        rope = next((out[k] for k in ("rope_parameters", "rope_scaling") if k in out), None)
        if "rope_theta" not in out and rope is None and "rope_parameters" in defaults:
            out["rope_parameters"] = dict(defaults["rope_parameters"])
        elif "rope_theta" not in out and not (isinstance(rope, dict) and "rope_theta" in rope):
            nested = isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values())
            if not nested:
                out["rope_theta"] = defaults["rope_theta"]
    return out
