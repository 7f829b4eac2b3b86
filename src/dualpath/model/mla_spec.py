"""The architecture of an MLA decoder, read from a Hugging Face ``config.json``: DeepSeek-V2, V3 and V3.2 and the
families built on their attention (GLM-4.7-Flash, GLM-5, MiniCPM3, Mistral 4, Youtu-LLM, Kimi K2.5's language
model). :func:`dualpath.model.spec.load_spec` picks this spec or the Llama family's by the checkpoint's
architecture; the model itself is :mod:`dualpath.model.deepseek`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model import layernorm_family as lnf
from dualpath.model.spec_common import _DTYPES, _SpecCommon, inherit_outer, parse_rope, read_hf_config

#: image-text checkpoints whose language model is a DeepSeek-V3 (MLA) decoder: Kimi K2.5 (transformers' name and the
#: hub's remote-code name)
_MLA_IMAGE_TEXT_ARCHS = ("Kimi_K25ForConditionalGeneration", "KimiK25ForConditionalGeneration")
_HY_VL_ARCH = "HYV4VLForConditionalGeneration"


def mla_text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of a Kimi K2.5 image-text checkpoint (its ``text_config``, a DeepSeek-V3 one,
    served as ``DeepseekV3ForCausalLM``; the vision tower is not loaded); any other config unchanged. As
    transformers does, the LM head is tied to the embeddings by the top-level ``tie_word_embeddings`` (true by
    default)."""
    archs = cfg.get("architectures") or []
    if _HY_VL_ARCH in archs or (not archs and cfg.get("model_type") == "hy_v4_vl"):
        return _hy_vl_text_config(cfg, where)
    if not any(a in _MLA_IMAGE_TEXT_ARCHS for a in archs) and not (not archs and cfg.get("model_type") == "kimi_k25"):
        return cfg
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Kimi K2.5's DeepSeek-V3 language model)")
    if text.get("model_type", "deepseek_v3") not in ("deepseek_v3", "kimi_k2"):
        raise ModelError(f"{where}: text_config.model_type {text['model_type']!r} unsupported (expected deepseek_v3 "
                         "or kimi_k2)")
    out = {**text, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}
    return inherit_outer(out, text, cfg, ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"))


def _hy_vl_text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Hy4-VL's language model (``text_config``, model_type ``hy_v4_vl_text``): Hy4's layers with RoPE over
    interleaved pairs (in the attention and the indexer), latent norms at ``rms_norm_eps`` (the text model's keep
    1e-6), and M-RoPE, which over text alone (every token's three position ids equal) is the plain RoPE of the same
    frequencies (``mrope_section`` dropped)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Hy4-VL's language model)")
    if text.get("model_type", "hy_v4_vl_text") != "hy_v4_vl_text":
        raise ModelError(f"{where}: text_config.model_type {text['model_type']!r} unsupported (expected "
                         "hy_v4_vl_text)")
    out = {**text, "architectures": [], "model_type": "hy_v4_vl_text",
           "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))}
    rope = out.get("rope_parameters")
    if isinstance(rope, dict):
        out["rope_parameters"] = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
    return inherit_outer(out, text, cfg, ("torch_dtype", "dtype", "bos_token_id", "eos_token_id", "pad_token_id"))


_DEEPSEEK_ARCH = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2",
                  "DeepseekV32ForCausalLM": "deepseek_v32", "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
                  "MiniCPM3ForCausalLM": "minicpm3", "GlmMoeDsaForCausalLM": "glm_moe_dsa",
                  "Mistral4ForCausalLM": "mistral4", "YoutuForCausalLM": "youtu",
                  "AXK1ForCausalLM": "axk1", "AXK2ForCausalLM": "axk2", "KimiLinearForCausalLM": "kimi_linear",
                  "BailingHybridForCausalLM": "bailing_hybrid", "HYV4ForCausalLM": "hy_v4"}
#: the router's top-k method each generation supports (V2: softmax scores; V3 and V3.2: sigmoid scores + correction
#: bias)
_TOPK_METHODS = {"deepseek_v3": ("noaux_tc",), "deepseek_v2": ("greedy", "group_limited_greedy"),
                 "deepseek_v32": ("noaux_tc",), "glm4_moe_lite": ("noaux_tc",), "minicpm3": ("noaux_tc",),
                 "glm_moe_dsa": ("noaux_tc",), "mistral4": ("noaux_tc",), "youtu": ("noaux_tc",),
                 "axk1": ("noaux_tc",), "axk2": ("noaux_tc",), "kimi_linear": ("noaux_tc",),
                 "bailing_hybrid": ("noaux_tc",), "hy_v4": ("noaux_tc",), "hy_v4_vl_text": ("noaux_tc",),
                 "glm5_next_text": ("noaux_tc",), "longcat_flash": ("greedy",),
                 "mistral_large4_text": ("noaux_tc",), "dots3_note_text": ("noaux_tc",)}
_SCORING = {"deepseek_v3": "sigmoid", "deepseek_v2": "softmax", "deepseek_v32": "sigmoid", "glm4_moe_lite": "sigmoid",
            "minicpm3": "sigmoid", "glm_moe_dsa": "sigmoid", "mistral4": "softmax", "youtu": "sigmoid",
            "axk1": "sigmoid", "axk2": "sigmoid", "kimi_linear": "sigmoid", "bailing_hybrid": "sigmoid",
            "hy_v4": "sigmoid", "hy_v4_vl_text": "sigmoid", "glm5_next_text": "sigmoid",
            "longcat_flash": "softmax", "mistral_large4_text": "softmax", "dots3_note_text": "sigmoid"}
_LABEL = {"deepseek_v3": "DeepSeek-V3", "deepseek_v2": "DeepSeek-V2", "deepseek_v32": "DeepSeek-V3.2",
          "glm4_moe_lite": "GLM-4.7-Flash (glm4_moe_lite)", "minicpm3": "MiniCPM3", "youtu": "Youtu-LLM", "glm_moe_dsa": "GLM-5 (glm_moe_dsa)",
          "mistral4": "Mistral 4 (mistral4)", "axk1": "A.X-K1 (axk1)", "axk2": "A.X-K2 (axk2)",
          "kimi_linear": "Kimi Linear (kimi_linear)", "bailing_hybrid": "Bailing hybrid (bailing_hybrid)",
          "hy_v4": "Hy4 (hy_v4)", "hy_v4_vl_text": "Hy4-VL's language model (hy_v4_vl_text)",
          "glm5_next_text": "GLM-5.3-Flash's language model (glm5_next_text)",
          "longcat_flash": "LongCat-Flash (longcat_flash)",
          "mistral_large4_text": "Mistral Large 4's language model (mistral_large4_text)",
          "dots3_note_text": "dots3-note (dots3_note_text)"}
#: DeepseekV3Config's (and V3.2's) defaults for the MoE and special-token keys a config may leave out
_V3_DEFAULTS: dict[str, Any] = {"n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                                "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "moe_intermediate_size": 2048,
                                "first_k_dense_replace": 3, "bos_token_id": 0, "eos_token_id": 1}
#: (BOS, EOS) of the config classes of MiniCPM3 and Youtu-LLM, where a config leaves them out
_SPECIAL_IDS: dict[str, tuple[int, int]] = {"minicpm3": (1, 2), "youtu": (128000, 128001)}
#: the models with DeepSeek Sparse Attention (a lightning indexer; its key in each KV row)
DSA_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4", "hy_v4_vl_text", "glm5_next_text",
                   "mistral_large4_text", "dots3_note_text")
#: Hy4 and Hy4-VL's language model (hyper-connections, head gates and sinks, clamped experts)
HY_TYPES = ("hy_v4", "hy_v4_vl_text")
#: the models whose DSA layers may reuse an earlier layer's selection ("shared" in ``indexer_types``)
_SHARED_INDEXER_TYPES = ("glm_moe_dsa", *HY_TYPES, "glm5_next_text", "mistral_large4_text")
#: the models with hyper-connections and clamped experts (Hy4's kind, GLM-5.3-Flash's Sinkhorn-mixed kind)
HC_TYPES = (*HY_TYPES, "glm5_next_text")
#: the types whose transformers classes read ``mlp_bias`` (their dense MLPs' and shared experts' biases)
_MLP_BIAS_TYPES = ("deepseek_v2", "minicpm3")
#: their fields: other specs leave them out of their dict
_HY_FIELDS = ("hc_mult", "hc_magnitude", "hc_eps", "swiglu_limit", "hc_iters", "index_kpool")
#: MiniCPM3's scalings (None for every other model: their dicts, and so block keys, stay as they were)
_MINICPM_FIELDS = ("scale_emb", "residual_scale", "logits_scaling")
#: the fields only DeepSeek-V3.2 has (other specs leave them out of their dict: their block keys stay as they were)
_V32_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")


def _glm5_shared_indexer_layers(cfg: dict[str, Any], where: str, n_layers: int,
                                hy: bool = False) -> tuple[int, ...]:
    """GLM-5's layers without an indexer of their own, as GlmMoeDsaConfig derives ``indexer_types``: the list
    itself, else ``index_topk_pattern`` (``"F"`` full, ``"S"`` shared), else every layer ``i`` full where
    ``max(i - index_skip_topk_offset + 1, 0) % index_topk_freq == 0`` (defaults 2 and 1: every layer). ``hy``
    (Hy4, HYV4Config): the list, else layer 0 and every fourth from layer 1 full."""
    kinds = cfg.get("indexer_types")
    if kinds is None and hy:
        kinds = ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n_layers)]
    if kinds is None and cfg.get("index_topk_pattern") is not None:
        pattern = cfg["index_topk_pattern"]
        if isinstance(pattern, str):
            if set(pattern) - {"F", "S"}:
                raise ModelError(f"{where}: index_topk_pattern {pattern!r} must be letters F (full) and S (shared)")
            kinds = [{"F": "full", "S": "shared"}[c] for c in pattern]
        else:
            kinds = list(pattern)
    if kinds is None:
        freq, offset = cfg.get("index_topk_freq", 1), cfg.get("index_skip_topk_offset", 2)
        if isinstance(freq, bool) or not isinstance(freq, int) or isinstance(offset, bool) or not isinstance(offset, int):
            raise ModelError(f"{where}: index_topk_freq / index_skip_topk_offset must be integers, got "
                             f"{freq!r} / {offset!r}")
        freq = max(freq, 1)
        kinds = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]
    if not isinstance(kinds, list) or len(kinds) != n_layers or set(kinds) - {"full", "shared"}:
        raise ModelError(f"{where}: indexer_types must list 'full' or 'shared' for each of the {n_layers} layers, "
                         f"got {kinds!r}")
    if kinds and kinds[0] != "full":
        raise ModelError(f"{where}: indexer_types: the first layer must be 'full' (a shared layer reuses an "
                         f"earlier layer's selection), got {kinds!r}")
    return tuple(i for i, kind in enumerate(kinds) if kind == "shared")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


@dataclass(frozen=True)
class DeepseekV3Spec(_SpecCommon):
    """Shapes and hyper-parameters of a DeepSeek-V3 or DeepSeek-V2 decoder (MLA attention, DeepSeekMoE feed-forward).

    ``model_type``: ``deepseek_v3`` (router: sigmoid scores, a correction bias for the choice, ``noaux_tc``
    top-2-sum group-limited top-k) or ``deepseek_v2`` (router: softmax scores over all experts, ``topk_method``
    ``greedy`` or ``group_limited_greedy`` (groups ranked by their best expert), no correction bias, no top-k
    renormalization; RoPE always interleaved). Both scale the chosen weights by ``routed_scaling_factor``.
    ``kv_format``: ``auto`` stores the latent in ``dtype``; ``fp8`` stores FlashMLA's 656-byte rows (needs
    ``kv_lora_rank`` divisible by 128).

    ``glm4_moe_lite`` (GLM-4.7-Flash): V3's MLA and MoE as they are (transformers builds it from DeepSeek-V3's
    attention and GLM-4.5's DeepSeek-style router), its dense layers named by ``mlp_layer_types``.

    ``minicpm3`` (MiniCPM3): V2's MLA with plain (not interleaved) RoPE halves, a dense SwiGLU MLP in every layer,
    embeddings times ``scale_emb``, each block's outputs times ``residual_scale`` (``scale_depth / sqrt(layers)``)
    and the final hidden state divided by ``logits_scaling`` (``hidden_size / dim_model_base``) before the head.

    ``youtu`` (Youtu-LLM): V3's MLA (interleaved RoPE by default) in Llama-shaped blocks with a dense SwiGLU MLP in
    every layer and tied embeddings by default.

    ``axk1`` (SK Telecom's A.X-K1): V3 as it is (always with a query LoRA), plus an RMSNorm on each MoE block's
    output (``post_mlp_layernorm``, stored on the decoder layer; the released checkpoints' copies on dense layers are
    unused and left out at load, and a checkpoint without routing correction biases routes with zeros, as
    transformers does); its dense layers named by ``mlp_layer_types``.

    ``mistral4`` (Mistral 4): V3's MLA and grouped MoE, but routed by softmax scores with no correction bias, and
    each query scaled by ``1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings))``.
    ``glm_moe_dsa`` (GLM-5): V3.2 with its indexer rotating interleaved pairs and "shared" layers (``indexer_types``,
    or ``index_topk_pattern``, or ``index_topk_freq`` / ``index_skip_topk_offset``) that have no indexer and reuse
    the last earlier indexer's selection (``index_shared_layers``); its dense layers come from ``mlp_layer_types``.
    ``deepseek_v32`` (DeepSeek-V3.2, the paper's model): V3's MLA and MoE plus DeepSeek Sparse Attention (DSA),
    whose lightning indexer lets each query attend to its ``index_topk`` highest-scoring keys only. Each token's
    indexer key (``index_head_dim`` values after the indexer's LayerNorm and RoPE) is kept in the KV row after the
    latent (:meth:`kv_spec`: ``extra_bytes``; in ``dtype``, or bfloat16 after an FP8 row), so a reused prefix
    carries it through both read paths. While a sequence holds at most ``index_topk`` tokens every key is selected
    and the attention is V3's dense MLA.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    n_layers: int
    n_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    kv_format: str = "auto"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "deepseek_v3"
    topk_method: str = "noaux_tc"
    index_topk: int = 0  # DeepSeek-V3.2's indexer (0 for V2/V3): keys each query attends to
    index_n_heads: int = 0
    index_head_dim: int = 0
    # GLM-5: the layers with no indexer of their own, which reuse the selection of the last layer before them that
    # has one (transformers' indexer_types "shared"); empty for every other model
    index_shared_layers: tuple[int, ...] = ()
    # Mistral 4: each query scaled by 1 + beta * log(1 + floor(position / original_max_position_embeddings)) (its
    # RoPE parameters' llama_4_scaling_beta, as Ministral 3 / Llama 4); None for every other model
    query_scale_beta: float | None = None
    # A.X-K2: the width of its gated RMSNorms' gate (0 for every other model: their dicts stay as they were)
    gated_norm_rank: int = 0
    # Hy4: residual streams mixed around each sublayer (0: none), the post-gate's magnitude and epsilon, and the
    # routed experts' SwiGLU clamp (0: none)
    hc_mult: int = 0
    hc_magnitude: float = 2.0
    hc_eps: float = 1e-6
    swiglu_limit: float = 0.0
    # GLM-5.3-Flash: the Sinkhorn iterations of its stream mixing, and its indexer's pool of keys (0: none)
    hc_iters: int = 0
    index_kpool: int = 0
    scale_emb: float | None = None  # MiniCPM3's scalings (see the class docstring)
    residual_scale: float | None = None
    logits_scaling: float | None = None
    # the experts' and dense MLPs' gate activation where a config names another than SiLU (``hidden_act``, by
    # dualpath.model.layernorm_family.ACTIVATIONS value; None: SiLU, and the dict, so the block keys, as before)
    activation: str | None = None
    # DeepSeek-V2's and MiniCPM3's mlp_bias: biases on the dense MLPs and shared experts, not the routed ones, as
    # transformers builds them (None: none, and the dict, so the block keys, as before)
    mlp_bias: bool | None = None
    context_cap: int | None = field(default=None, compare=False)  # as ModelSpec's (not in to_dict)
    weights_id: str = field(default="", compare=False)

    @property
    def context_limit(self) -> int:
        """The longest sequence this spec serves: ``max_position``, capped by ``context_cap``."""
        return self.max_position if self.context_cap is None else min(self.max_position, self.context_cap)

    @property
    def architecture(self) -> str:
        return self.model_type

    @property
    def scoring_func(self) -> str:
        """The router's expert scores: ``sigmoid`` (V3) or ``softmax`` (V2)."""
        return _SCORING[self.model_type]

    def __post_init__(self) -> None:
        if self.mlp_bias is not None and (self.mlp_bias is not True or self.model_type not in _MLP_BIAS_TYPES):
            raise ModelError(f"model config: mlp_bias is true or null, and only for {', '.join(_MLP_BIAS_TYPES)}; got "
                             f"{self.mlp_bias!r} for {self.model_type}")
        if self.activation is not None and self.activation not in set(lnf.ACTIVATIONS.values()):
            raise ModelError(f"model config: activation {self.activation!r} unsupported; expected one of "
                             f"{sorted(set(lnf.ACTIVATIONS.values()))}")
        if self.model_type not in _TOPK_METHODS:
            raise ModelError(f"model config: model_type {self.model_type!r} unsupported; expected one of "
                             f"{sorted(_TOPK_METHODS)}")
        if self.topk_method not in _TOPK_METHODS[self.model_type]:
            raise ModelError(f"model config: topk_method {self.topk_method!r} unsupported for {self.model_type}; "
                             f"expected one of {list(_TOPK_METHODS[self.model_type])}")
        if self.model_type == "deepseek_v2":
            if self.norm_topk_prob:
                # transformers' DeepseekV2 ignores the key, DeepSeek's own code renormalizes and drops the scaling:
                # no single meaning to check against (every published V2 checkpoint has false)
                raise ModelError("model config: norm_topk_prob=true is unsupported for deepseek_v2 (expected false)")
            if not self.rope_interleave:
                raise ModelError("model config: rope_interleave=false is unsupported for deepseek_v2 (its RoPE "
                                 "rotates interleaved pairs)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim"):
            if name == "qk_rope_head_dim" and self.model_type == "glm5_next_text":
                continue  # (GLM-5.3-Flash's MLA keys have no rotated part at all)
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.qk_nope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ModelError("model config: qk_nope_head_dim must be >= 0 and qk_rope_head_dim even")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ModelError(f"model config: q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if self.dtype not in _DTYPES:
            raise ModelError(f"model dtype {self.dtype!r} unsupported; expected one of {sorted(_DTYPES)}")
        if self.kv_format not in ("auto", "fp8"):
            raise ModelError(f"KV format {self.kv_format!r} unsupported; expected 'auto' or 'fp8'")
        if self.kv_format == "fp8" and self.kv_lora_rank % 128:
            raise ModelError(f"the fp8 latent KV format needs kv_lora_rank divisible by 128, got {self.kv_lora_rank}")
        if self.rope_type not in ("default", "linear", "yarn") and not (
                self.model_type == "minicpm3" and self.rope_type == "longrope"):
            raise ModelError(f"model config: rope_scaling type {self.rope_type!r} unsupported for "
                             f"{self.model_type}; expected default, linear or yarn")
        if self.rope_type == "longrope":
            orig = (self.rope_scaling or {}).get("original_max_position_embeddings")
            if orig is None or self.max_position > int(orig):
                # past original_max_position_embeddings transformers turns every position with the long factors,
                # which the KV already computed with the short ones cannot follow
                raise ModelError("model config: LongRoPE is supported only within original_max_position_embeddings "
                                 f"(its short factors); max_position_embeddings {self.max_position} exceeds {orig}")
        if self.model_type != "minicpm3" and any(getattr(self, f) is not None for f in _MINICPM_FIELDS):
            raise ModelError(f"model config: {'/'.join(_MINICPM_FIELDS)} are MiniCPM3's, not {self.model_type}'s")
        if self.rope_type not in ("default", "longrope") and "factor" not in (self.rope_scaling or {}):
            raise ModelError(f"model config: rope_scaling of type {self.rope_type!r} needs a 'factor'")
        object.__setattr__(self, "index_shared_layers", tuple(int(i) for i in self.index_shared_layers))
        if self.index_shared_layers and (self.model_type not in _SHARED_INDEXER_TYPES or 0 in self.index_shared_layers
                                         or not all(0 < i < self.n_layers for i in self.index_shared_layers)):
            raise ModelError(f"model config: indexer_types: layers {list(self.index_shared_layers)} reuse an earlier "
                             "layer's selection; only GLM-5's and Hy4's, and never the first layer (it has no "
                             "earlier one)")
        if self.model_type in HC_TYPES and self.hc_mult < 1:
            raise ModelError(f"model config: hc_mult must be >= 1, got {self.hc_mult}")
        if self.model_type not in HC_TYPES and (self.hc_mult or self.swiglu_limit):
            raise ModelError(f"model config: hc_mult / swiglu_limit are Hy4's, not {self.model_type}'s")
        if self.model_type in DSA_MODEL_TYPES:
            if min(self.index_topk, self.index_n_heads, self.index_head_dim) <= 0 or (
                    self.q_lora_rank is None and self.model_type != "mistral_large4_text"):
                raise ModelError(f"model config: {_LABEL[self.model_type]} needs positive index_topk, index_n_heads, "
                                 "index_head_dim and a q_lora_rank")
            if self.index_head_dim < self.qk_rope_head_dim and self.model_type != "mistral_large4_text":
                # (its indexer rotates qk_rope_head_dim of them: transformers fails at the first forward)
                raise ModelError(f"model config: index_head_dim {self.index_head_dim} is narrower than the "
                                 f"qk_rope_head_dim ({self.qk_rope_head_dim}) its indexer rotates")
        elif self.index_topk or self.index_n_heads or self.index_head_dim:
            raise ModelError(f"model config: index_topk/index_n_heads/index_head_dim are DeepSeek-V3.2's, not "
                             f"{self.model_type}'s")
        if self.query_scale_beta is not None and (self.model_type != "mistral4" or self.query_scale_beta < 0 or not
                                                  isinstance((self.rope_scaling or {}).get(
                                                      "original_max_position_embeddings"), int)):
            raise ModelError("model config: query_scale_beta (llama_4_scaling_beta) is Mistral 4's, a number >= 0 with "
                             "the RoPE's original_max_position_embeddings")
        if self.first_k_dense_replace < self.n_layers:
            self._check_routing()

    def _check_routing(self) -> None:
        if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
            raise ModelError("model config: MoE layers need positive n_routed_experts and moe_intermediate_size")
        if self.topk_method == "greedy":  # plain top-k over all experts: groups play no part
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ModelError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                 f"[1, n_routed_experts={self.n_routed_experts}]")
            return
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            raise ModelError(f"model config: n_routed_experts ({self.n_routed_experts}) is not a multiple of "
                             f"n_group ({self.n_group})")
        if not 0 < self.topk_group <= self.n_group:
            raise ModelError(f"model config: topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        if not 0 < self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group):
            raise ModelError(f"model config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                             "of the topk_group selected groups")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ModelError("model config: group-limited routing needs >= 2 experts per group")

    # ------------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token and layer in the cache: the normalized latent plus the RoPE'd key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN scaling."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        if self.rope_type != "default" and rs.get("mscale_all_dim"):
            m = _mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def post_moe_norm(self) -> bool:
        """A.X-K1: an RMSNorm (``post_mlp_layernorm``) on each MoE block's output, shared experts included."""
        return self.model_type == "axk1"

    @property
    def q_gate(self) -> bool:
        """A.X-K2: one projection of ``[q_a_layernorm(c), c]`` (``c = q_a_proj(x)``) gives each head's query and a
        gate whose sigmoid scales the head's attention output before ``o_proj``."""
        return self.model_type == "axk2"

    @property
    def has_dsa(self) -> bool:
        """DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): a lightning indexer picks each query's keys."""
        return self.model_type in DSA_MODEL_TYPES

    def has_indexer(self, layer: int) -> bool:
        """Whether ``layer`` runs its own indexer (GLM-5's shared layers reuse the previous one's selection)."""
        return self.has_dsa and layer not in self.index_shared_layers

    @property
    def index_rope_interleave(self) -> bool:
        """GLM-5's indexer (and Hy4-VL's) rotates interleaved pairs; DeepSeek-V3.2's rotates halves."""
        return self.model_type in ("glm_moe_dsa", "hy_v4_vl_text", "mistral_large4_text", "dots3_note_text")

    @property
    def index_rope_tail(self) -> bool:
        """Hy4's indexer rotates the last ``qk_rope_head_dim`` values of each head (the others their first)."""
        return self.model_type in HY_TYPES

    @property
    def head_gates_and_sinks(self) -> bool:
        """Hy4: each head's output scaled by ``sigmoid(gate_proj(x))`` per channel, and a learned sink logit per head
        in each softmax's denominator."""
        return self.model_type in HY_TYPES

    @property
    def mla_lora_scales(self) -> tuple[float, float] | None:
        """The queries' and the normed key latent's scalings (LongCat-Flash's; None for every other model)."""
        return None

    @property
    def latent_norm_eps(self) -> float:
        """The query and key latents' RMS norms' epsilon: 1e-6 (DeepSeek's and transformers' default), the config's
        ``rms_norm_eps`` for Hy4-VL's and GLM-5.3-Flash's language models."""
        return self.rms_eps if self.model_type in ("hy_v4_vl_text", "glm5_next_text", "mistral_large4_text") else 1e-6

    def with_dtype(self, dtype: str) -> DeepseekV3Spec:
        return replace(self, dtype=dtype)

    def kv_spec(self) -> KVSpec:
        """Per token and layer: the latent row ``[kv_lora_rank + qk_rope_head_dim]`` of ``dtype``, or the
        656-byte-style FP8 row with ``kv_format='fp8'``; DeepSeek-V3.2 appends its indexer key (``extra_bytes``:
        ``index_head_dim`` values of ``dtype``, or of bfloat16 after an FP8 row)."""
        if self.kv_format == "fp8":
            return KVSpec.mla_fp8(self.n_layers, self.kv_lora_rank, self.qk_rope_head_dim,
                                  extra_bytes=2 * self.index_head_dim)
        esize = torch.empty((), dtype=self.torch_dtype).element_size()
        return KVSpec.mla(self.n_layers, self.latent_dim, self.dtype, rope_dim=self.qk_rope_head_dim,
                          extra_bytes=esize * self.index_row)

    @property
    def index_row(self) -> int:
        """Values of a token's indexer entry in its row: the key, and GLM-5.3-Flash's pooling gate after it."""
        return self.index_head_dim * (2 if self.index_kpool else 1)

    def mha_equivalent_bytes_per_token_layer(self) -> int:
        """What plain multi-head K and V of this attention would take per token and layer in ``dtype``."""
        esize = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.n_heads * (self.qk_head_dim + self.v_head_dim) * esize

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weights_id")
        d.pop("context_cap")
        d.pop("model_type")  # named by architecture
        if self.model_type == "deepseek_v3":
            d.pop("topk_method")  # V3 has one: its dict (and so its block-key namespace) is as before V2 support
        if self.model_type not in DSA_MODEL_TYPES:
            for name in _V32_FIELDS:
                d.pop(name)
        else:  # the indexer key joined the KV rows (and the context cap went): a new block-key namespace
            d["kv_rows"] = "latent+index_key"
        if self.query_scale_beta is None:
            d.pop("query_scale_beta")
        if self.model_type not in _SHARED_INDEXER_TYPES:
            d.pop("index_shared_layers")
        else:
            d["index_shared_layers"] = list(self.index_shared_layers)
        if self.model_type != "minicpm3":
            for name in _MINICPM_FIELDS:
                d.pop(name)
        if self.model_type != "axk2":
            d.pop("gated_norm_rank")
        if self.activation is None:
            d.pop("activation")
        if self.mlp_bias is None:
            d.pop("mlp_bias")
        if self.model_type not in HC_TYPES:
            for name in _HY_FIELDS:
                d.pop(name)
        d["architecture"] = self.architecture
        return d

    def fingerprint(self) -> str:
        payload = json.dumps({"spec": self.to_dict(), "weights": self.weights_id}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' DeepseekV3Config / DeepseekV2Config (and :meth:`from_hf_config`)
        read back."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        cfg: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "first_k_dense_replace": self.first_k_dense_replace,
            "rms_norm_eps": self.rms_eps,
            "rope_parameters": rope,
            "rope_interleave": self.rope_interleave,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": lnf.hf_activation(self.activation),
            "torch_dtype": self.dtype,
            "num_nextn_predict_layers": 0,
        }
        if self.model_type == "deepseek_v32":
            del cfg["rope_interleave"], cfg["num_nextn_predict_layers"]
            cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_topk=self.index_topk,
                       index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim)
        if self.model_type == "axk2":
            del cfg["rope_interleave"], cfg["num_nextn_predict_layers"], cfg["first_k_dense_replace"]
            k = min(self.first_k_dense_replace, self.n_layers)
            cfg.update(architectures=["AXK2ForCausalLM"], model_type="axk2", index_topk=self.index_topk,
                       index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                       gated_norm_rank=self.gated_norm_rank,
                       mlp_layer_types=["dense"] * k + ["sparse"] * (self.n_layers - k))
        if self.model_type == "mistral4":
            del cfg["num_nextn_predict_layers"]
            rope = dict(cfg["rope_parameters"])
            if self.query_scale_beta is not None:
                rope["llama_4_scaling_beta"] = self.query_scale_beta
            cfg.update(architectures=["Mistral4ForCausalLM"], model_type="mistral4", rope_parameters=rope,
                       pad_token_id=None)
        if self.model_type == "glm_moe_dsa":
            del cfg["rope_interleave"], cfg["num_nextn_predict_layers"]
            k = min(self.first_k_dense_replace, self.n_layers)
            cfg.update(architectures=["GlmMoeDsaForCausalLM"], model_type="glm_moe_dsa", index_topk=self.index_topk,
                       index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                       first_k_dense_replace=k, mlp_layer_types=["dense"] * k + ["sparse"] * (self.n_layers - k),
                       indexer_types=["shared" if i in self.index_shared_layers else "full"
                                      for i in range(self.n_layers)])
        if self.model_type in HY_TYPES:
            del cfg["rope_interleave"], cfg["num_nextn_predict_layers"], cfg["first_k_dense_replace"]
            k = min(self.first_k_dense_replace, self.n_layers)
            cfg.update(architectures=["HYV4ForCausalLM"], model_type="hy_v4", index_topk=self.index_topk,
                       index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                       mlp_layer_types=["dense"] * k + ["sparse"] * (self.n_layers - k),
                       indexer_types=["shared" if i in self.index_shared_layers else "full"
                                      for i in range(self.n_layers)],
                       hc_mult=self.hc_mult, hc_magnitude=self.hc_magnitude, hc_eps=self.hc_eps,
                       swiglu_limit=self.swiglu_limit, pad_token_id=None, bos_token_id=self.bos_token_id,
                       eos_token_id=self.eos_token_id)  # (HYV4Config's defaults lie past a small vocabulary)
            if self.model_type == "hy_v4_vl_text":  # (its image-text config: the language model's alone reads so)
                del cfg["architectures"]
                text = {**cfg, "model_type": "hy_v4_vl_text"}
                text_rope = text.get("rope_parameters")
                if isinstance(text_rope, dict) and "mrope_section" not in text_rope:  # (sections of the rotated
                    half = self.qk_rope_head_dim // 2  # half, as its class requires; [12, 10, 10] at 64: over text
                    text["rope_parameters"] = {**text_rope,  # positions M-RoPE is the plain RoPE)
                                               "mrope_section": [half - 2 * (half // 3)] + [half // 3] * 2}
                cfg = {"architectures": [_HY_VL_ARCH], "model_type": "hy_v4_vl", "text_config": text,
                       "tie_word_embeddings": self.tie_embeddings}
        if self.model_type == "minicpm3":
            for key in ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                        "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
                        "rope_interleave", "num_nextn_predict_layers"):
                del cfg[key]
            assert self.scale_emb is not None and self.residual_scale is not None and self.logits_scaling
            cfg.update(architectures=["MiniCPM3ForCausalLM"], model_type="minicpm3", scale_emb=self.scale_emb,
                       scale_depth=self.residual_scale * math.sqrt(self.n_layers),
                       dim_model_base=round(self.hidden_size / self.logits_scaling))  # (an int in transformers)
        if self.model_type == "youtu":
            for key in ("moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
                        "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace",
                        "num_nextn_predict_layers"):
                cfg.pop(key, None)
            cfg.update(architectures=["YoutuForCausalLM"], model_type="youtu")
        if self.model_type in ("glm4_moe_lite", "axk1"):  # each layer's MLP named, no first_k_dense_replace
            del cfg["first_k_dense_replace"], cfg["num_nextn_predict_layers"]
            k = min(self.first_k_dense_replace, self.n_layers)
            cfg.update(architectures=["Glm4MoeLiteForCausalLM" if self.model_type == "glm4_moe_lite"
                                      else "AXK1ForCausalLM"], model_type=self.model_type,
                       mlp_layer_types=["dense"] * k + ["sparse"] * (self.n_layers - k))
        if self.model_type == "deepseek_v2":
            del cfg["rope_interleave"], cfg["num_nextn_predict_layers"]
            cfg.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", topk_method=self.topk_method,
                       scoring_func="softmax", moe_layer_freq=1)
        if self.model_type in _MLP_BIAS_TYPES:
            cfg["mlp_bias"] = bool(self.mlp_bias)
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            cfg["eos_token_id"] = self.eos_token_id
        return cfg

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, dtype: str | None = None, kv_format: str = "auto",
                       where: str | None = None, max_context: int | None = None) -> DeepseekV3Spec:
        cfg, name = read_hf_config(config)
        where = where or name
        cfg = mla_text_config(cfg, where)

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelError(f"{where}: missing required key {key!r}")
            return cfg[key]

        archs = [a for a in cfg.get("architectures") or [] if a in _DEEPSEEK_ARCH]
        model_type = _DEEPSEEK_ARCH[archs[0]] if archs else str(cfg.get("model_type") or "deepseek_v3")
        if model_type not in _TOPK_METHODS:
            raise ModelError(f"{where}: model_type {model_type!r} unsupported; expected one of {sorted(_TOPK_METHODS)}")
        label = _LABEL[model_type]
        if model_type in ("deepseek_v3", "deepseek_v32"):  # (DeepseekV3Config's defaults for the keys it leaves out)
            fill = dict(_V3_DEFAULTS)
            if cfg.get("mlp_layer_types") is not None:
                del fill["first_k_dense_replace"]
            cfg = {**fill, **cfg}
        elif model_type in _SPECIAL_IDS:  # (their config classes' special tokens, where a config names none)
            cfg = {**dict(zip(("bos_token_id", "eos_token_id"), _SPECIAL_IDS[model_type], strict=True)), **cfg}
        act = lnf.gate_activation(cfg, where)  # (the experts' and MLPs' gate: ACT2FN[hidden_act], as in transformers)
        mlp_bias = cfg.get("mlp_bias", False) if model_type in _MLP_BIAS_TYPES else False
        if not isinstance(mlp_bias, bool):
            raise ModelError(f"{where}: mlp_bias must be true or false, got {mlp_bias!r}")
        scoring = _SCORING[model_type]
        if cfg.get("scoring_func", scoring) != scoring:
            raise ModelError(f"{where}: scoring_func {cfg['scoring_func']!r} unsupported ({label} uses {scoring!r})")
        topk_method = cfg.get("topk_method", _TOPK_METHODS[model_type][0])
        if topk_method not in _TOPK_METHODS[model_type]:
            raise ModelError(f"{where}: topk_method {topk_method!r} unsupported ({label} uses one of "
                             f"{list(_TOPK_METHODS[model_type])})")
        if int(cfg.get("moe_layer_freq", 1) or 1) != 1:
            raise ModelError(f"{where}: moe_layer_freq {cfg['moe_layer_freq']!r} unsupported (every {label} "
                             "checkpoint uses 1)")
        if model_type in HY_TYPES:  # (num_local_experts names n_routed_experts; RoPE over halves, or Hy4-VL's pairs)
            if cfg.get("n_routed_experts") is None and cfg.get("num_local_experts") is not None:
                cfg = {**cfg, "n_routed_experts": cfg["num_local_experts"]}
            cfg = {**cfg, "rope_interleave": model_type == "hy_v4_vl_text"}
            if cfg.get("mlp_layer_types") is None:
                n = int(need("num_hidden_layers"))
                cfg["mlp_layer_types"] = ["dense"] * min(1, n) + ["sparse"] * max(n - 1, 0)
        norm_topk = cfg.get("norm_topk_prob", model_type in ("deepseek_v3", "deepseek_v32", "axk1", "axk2", *HY_TYPES))
        if model_type == "axk2" and cfg.get("rope_interleave") is None:  # (A.X-K2's MLA always rotates pairs)
            cfg = {**cfg, "rope_interleave": True}
        if model_type == "deepseek_v2" and norm_topk:
            raise ModelError(f"{where}: norm_topk_prob=true unsupported for DeepSeek-V2 (transformers ignores it, "
                             "DeepSeek's code renormalizes; published V2 checkpoints use false)")
        if model_type in ("deepseek_v2", "deepseek_v32", "glm_moe_dsa", "axk2") and \
                cfg.get("rope_interleave", True) is not True:
            raise ModelError(f"{where}: rope_interleave {cfg['rope_interleave']!r} unsupported ({label} rotates "
                             "interleaved pairs)")
        layer_kinds = cfg.get("mlp_layer_types")
        n_layers = int(need("num_hidden_layers"))
        minicpm: dict[str, Any] = {}
        if model_type == "minicpm3":  # every layer dense; MiniCPM's scalings (transformers' defaults when unset)
            if cfg.get("rope_interleave", False) is not False:
                raise ModelError(f"{where}: rope_interleave {cfg['rope_interleave']!r} unsupported (MiniCPM3 "
                                 "rotates halves)")
            cfg = {**cfg, "first_k_dense_replace": n_layers, "n_routed_experts": 0, "rope_interleave": False}
            depth = cfg.get("scale_depth", 1.4)  # (MiniCPM3Config's defaults; null: sqrt(layers) and the width)
            base = cfg.get("dim_model_base", 256)
            try:
                minicpm = {"scale_emb": float(cfg.get("scale_emb", 12)),
                           "residual_scale": (math.sqrt(n_layers) if depth is None else float(depth)) / math.sqrt(n_layers),
                           "logits_scaling": int(need("hidden_size")) / (int(need("hidden_size")) if base is None
                                                                         else float(base))}
            except (TypeError, ValueError, ZeroDivisionError):
                raise ModelError(f"{where}: scale_emb / scale_depth / dim_model_base must be numbers "
                                 f"(dim_model_base non-zero)") from None
        if isinstance(layer_kinds, list) and (cfg.get("first_k_dense_replace") is None
                                              or model_type in ("glm_moe_dsa", *HY_TYPES)):
            # GLM-4.7-Flash names each layer's MLP and has no first_k_dense_replace; GLM-5's transformers follows
            # mlp_layer_types over first_k_dense_replace (its config keeps the class default 3): the leading dense layers
            first_dense = next((i for i, kind in enumerate(layer_kinds) if kind != "dense"), len(layer_kinds))
        else:
            first_dense = int(cfg.get("first_k_dense_replace") or 0)
        if layer_kinds is not None:  # transformers' V3.2 names each layer's MLP; only the leading-dense pattern is read
            k = min(first_dense, n_layers)
            if layer_kinds != ["dense"] * k + ["sparse"] * (n_layers - k):
                raise ModelError(f"{where}: mlp_layer_types {layer_kinds!r} unsupported: expected "
                                 f"first_k_dense_replace={first_dense} dense layers, then sparse ones")
        if model_type == "youtu":  # every layer dense (YoutuConfig has no MoE keys)
            cfg = {**cfg, "first_k_dense_replace": n_layers, "n_routed_experts": 0}
            first_dense = n_layers
        index: dict[str, int] = {}
        max_position = int(cfg.get("max_position_embeddings", {"youtu": 131072, "axk1": 32768,
                                                                "axk2": 131072, "hy_v4": 262144,
                                                                "hy_v4_vl_text": 262144,
                                                                "deepseek_v32": 163840,
                                                                "minicpm3": 32768}.get(model_type, 4096)))
        shared: tuple[int, ...] = ()
        if model_type in DSA_MODEL_TYPES:
            index = {name: int(need(name)) for name in _V32_FIELDS}
        if model_type in _SHARED_INDEXER_TYPES:
            shared = _glm5_shared_indexer_layers(cfg, where, n_layers, hy=model_type in HY_TYPES)
            # (the context is no longer capped at index_topk: the indexer's selection runs beyond it)
        n_heads = int(need("num_attention_heads"))
        # num_key_value_heads is meaningless for MLA (transformers even writes its default 128): not read
        beta = None
        if model_type == "mistral4":  # llama_4_scaling_beta: a query scale, not part of the rotation
            from dualpath.model.llama_variants import _ministral3_rope

            cfg, beta = _ministral3_rope(cfg, where)
        rope_theta, rope_scaling = parse_rope(cfg, where)
        if rope_scaling is not None:  # (Mistral 4 writes its rotated share; MLA rotates qk_rope_head_dim as it is)
            rope_scaling.pop("partial_rotary_factor", None)
        if dtype is None:
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
            if dtype not in _DTYPES:
                dtype = "float32"
        q_lora = cfg.get("q_lora_rank", {"axk1": 1536, "axk2": 384, "hy_v4": 1536,
                                         "hy_v4_vl_text": 2048}.get(model_type))
        if model_type in ("axk1", "axk2", *HY_TYPES) and q_lora is None:
            raise ModelError(f"{where}: q_lora_rank null unsupported ({label}'s attention always has a query LoRA)")
        hy: dict[str, Any] = {}
        if model_type in HC_TYPES:
            try:
                hy = {"hc_mult": int(cfg.get("hc_mult", 4)), "hc_magnitude": float(cfg.get("hc_magnitude", 2.0)),
                      "hc_eps": float(cfg.get("hc_eps", 1e-6)), "swiglu_limit": float(cfg.get("swiglu_limit", 10.0))}
                if model_type == "glm5_next_text":
                    hy.update(hc_iters=int(cfg.get("hc_sinkhorn_iters", 20)), index_kpool=int(cfg.get("index_kpool", 16)))
                    del hy["hc_magnitude"]
            except (TypeError, ValueError):
                raise ModelError(f"{where}: hc_mult / hc_magnitude / hc_eps / swiglu_limit must be numbers") from None
            if not hy["swiglu_limit"] > 0:
                # (HYV4Config says a limit <= 0 disables the clamp; transformers' experts clamp with it anyway,
                # zeroing every routed expert at 0: the two disagree, so neither is guessed)
                raise ModelError(f"{where}: swiglu_limit {hy['swiglu_limit']} unsupported: the clamp of the routed "
                                 "experts needs a positive limit (transformers clamps with a limit <= 0 too, which "
                                 "its config documents as no clamp)")
        gated = 0
        if model_type == "axk2":
            gated = cfg.get("gated_norm_rank", 16)
            if isinstance(gated, bool) or not isinstance(gated, int) or gated <= 0:
                raise ModelError(f"{where}: gated_norm_rank must be a positive integer, got {gated!r}")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            n_layers=n_layers,
            n_heads=n_heads,
            kv_lora_rank=int(need("kv_lora_rank")),
            qk_nope_head_dim=int(need("qk_nope_head_dim")),
            qk_rope_head_dim=int(need("qk_rope_head_dim")),
            v_head_dim=int(cfg.get("v_head_dim") or (int(need("hidden_size")) // n_heads if model_type == "minicpm3"
                                                      else need("v_head_dim"))),
            q_lora_rank=None if q_lora is None else int(q_lora),
            n_routed_experts=int(cfg.get("n_routed_experts") or 0),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 1),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            norm_topk_prob=bool(norm_topk),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=first_dense,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5 if model_type in ("glm4_moe_lite", "minicpm3", "glm_moe_dsa",
                                                                          *HY_TYPES) else 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            max_position=max_position,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type in ("minicpm3", "youtu"))),
            attention_bias=bool(cfg.get("attention_bias", False)),
            dtype=dtype,
            kv_format=kv_format,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            model_type=model_type,
            topk_method=str(topk_method),
            index_topk=index.get("index_topk", 0),
            index_n_heads=index.get("index_n_heads", 0),
            index_head_dim=index.get("index_head_dim", 0),
            index_shared_layers=shared,
            query_scale_beta=beta,
            gated_norm_rank=gated,
            activation=act,
            mlp_bias=mlp_bias or None,
            context_cap=max_context,
            **hy,
            **minicpm,
        )
