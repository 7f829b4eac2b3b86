"""Llama-shaped families with one twist each, run on the Llama path (:class:`dualpath.model.llama.LlamaModel`).

* ``OlmoForCausalLM`` (``olmo``, OLMo 1 / OLMo-1.7): LayerNorms with neither weight nor bias (eps 1e-5, in
  fp32), ``clip_qkv`` (q, k and v clamped after their projections), ``attention_bias`` on q/k/v and o.
* ``HeliumForCausalLM`` (``helium``, Kyutai's Helium): RoPE over interleaved pairs ``(2i, 2i + 1)`` of the whole
  head, q/k/v biases with ``attention_bias`` but none on o, ``mlp_bias`` on the gated MLP, RMSNorms scaled by their
  weight in fp32.
* ``Ernie4_5ForCausalLM`` (``ernie4_5``, ERNIE 4.5 dense): RoPE over interleaved pairs of the whole head (rotated in
  fp32), ``use_bias`` on every projection (q/k/v/o and the gated MLP's three).
* ``Ernie4_5_MoeForCausalLM`` (``ernie4_5_moe``, ERNIE 4.5 MoE): ERNIE 4.5's layers with experts in layers
  ``moe_layer_start_index`` to ``moe_layer_end_index`` every ``moe_layer_interval`` (:func:`_ernie_moe_fields`), run
  by :class:`dualpath.model.llama.SparseMoE`: an fp32 softmax router choosing ``moe_k`` experts by its scores plus
  the ``moe_statics`` correction bias and weighting them by the scores over ``max(sum, moe_norm_min)``, shared
  experts with ``use_bias``, and an LM head biased with ``use_bias``.
* ``HunYuanDenseV1ForCausalLM`` (``hunyuan_v1_dense``, Hunyuan dense 0.5B-7B): per-head q/k RMSNorms applied
  *after* RoPE (``query_layernorm`` / ``key_layernorm``), and its RoPE labelled ``dynamic`` with an ``alpha``,
  which transformers reads as a fixed base ``rope_theta * alpha ** (d / (d - 2))`` (kept here as the RoPE type
  ``ntk_alpha``; a Hunyuan ``dynamic`` RoPE without ``alpha`` is the plain dynamic one).
* ``HunYuanMoEV1ForCausalLM`` (``hunyuan_v1_moe``, Hunyuan-A13B): Hunyuan dense's attention, then in every layer an
  fp32 softmax router (``mlp.gate.wg``) picking ``moe_topk`` of ``num_experts`` experts, renormalized, and an
  ungated shared MLP (``shared_mlp``), all ``intermediate_size`` wide, as transformers runs it.
* ``Ministral3ForCausalLM`` (``ministral3``: Ministral 3, also the text model of its ``Mistral3ForConditionalGeneration``
  checkpoints): Mistral's attention and window with YaRN, and each query scaled by its position as Llama 4 does,
  ``1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings))`` (``query_scale_beta``;
  only queries, so stored KV does not depend on it).
* ``ApertusForCausalLM`` (``apertus``, Swiss AI's Apertus): per-head q/k RMSNorms, a plain MLP with the xIELU
  activation (its learned ``alpha_p`` / ``alpha_n`` and ``beta`` / ``eps`` per layer, ``mlp.act_fn.*``), Llama 3's
  RoPE by default; its norms are named ``attention_layernorm`` / ``feedforward_layernorm``.
* ``Jais2ForCausalLM`` (``jais2``, Jais 2): LayerNorms with biases (``layer_norm_eps``), a ReLU-squared MLP
  (``up_proj`` / ``down_proj``, not gated) with ``mlp_bias``, q/k/v/o biases with ``attention_bias`` (both on by
  default).
* ``CwmForCausalLM`` (``cwm``, Meta's Code World Model): Llama 3's RoPE, no biases, sliding layers by ``layer_types``
  (by default every fourth layer from the first attends fully, the others slide over ``sliding_window``).
* ``VaultGemmaForCausalLM`` (``vaultgemma``): Gemma 2's attention, scalings, soft caps and windows in a Llama-shaped
  block (an input norm and a pre-MLP norm, ``pre_feedforward_layernorm``, read as Llama's ``post_attention_layernorm``).
* ``DbrxForCausalLM`` (``dbrx``, Databricks' DBRX): its nested config (``d_model``, ``n_heads``, ``attn_config``,
  ``ffn_config``) read as Llama's keys; bias-free LayerNorms, a fused ``Wqkv`` split at load with ``clip_qkv``, and
  in every layer a softmax router picking ``moe_top_k`` of ``moe_num_experts`` experts, renormalized when
  ``moe_normalize_expert_weights`` is 1 (its experts fused as ``w1`` / ``v1`` / ``w2``, split at load). The RoPE base
  is the top-level one transformers 5 writes (``rope_parameters``), else ``attn_config.rope_theta``.
* ``Llama4ForCausalLM`` (``llama4_text``): Llama 4's text model, in :mod:`dualpath.model.llama4`.
* ``BitNetForCausalLM`` (``bitnet``, Microsoft's BitNet b1.58, unquantized): an RMSNorm over the attention's output
  before ``o_proj`` (``attn_sub_norm``) and over the gated MLP's product before ``down_proj`` (``ffn_sub_norm``), the
  MLP's activation by ``hidden_act`` (ReLU squared by default). Its ternary-packed checkpoints
  (``quant_method: bitnet``) are refused by name.
* ``NanoChatForCausalLM`` (``nanochat``, Karpathy's nanochat): RMSNorms without weights (also on the embeddings
  and on each head's query and key), RoPE turning the other way (``rotate_half`` as ``(x2, -x1)``), a ReLU-squared
  MLP (``fc1`` / ``fc2``, not gated), final logits soft-capped (``final_logit_softcapping``, default 15).

Interleaved pairs are read as our half-split rotation by permuting the rotated rows of ``q_proj`` / ``k_proj`` (and
their biases) at load, undone at save (:func:`dualpath.model.layernorm_family.interleaved_to_half`): scores are
unchanged by a permutation applied to queries and keys alike, so the KV rows are stored in the permuted order.
NanoChat's reversed rotation is ours after swapping the two halves of each head's q/k rows (the same argument).

This module holds the families' config keys and defaults (:func:`normalize_config`, :func:`hf_config`) and their
tensor names both ways (:func:`tensors_in`, :func:`tensors_out`); the forward reads ``ModelSpec`` properties.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dualpath.errors import ModelError
from dualpath.model import layernorm_family as lnf

if TYPE_CHECKING:
    from dualpath.model.spec import ModelSpec

ARCHITECTURES: dict[str, str] = {
    "OlmoForCausalLM": "olmo",
    "HeliumForCausalLM": "helium",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
    "HunYuanDenseV1ForCausalLM": "hunyuan_v1_dense",
    "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
    "NanoChatForCausalLM": "nanochat",
    "Ministral3ForCausalLM": "ministral3",
    "VaultGemmaForCausalLM": "vaultgemma",
    "CwmForCausalLM": "cwm",
    "Jais2ForCausalLM": "jais2",
    "ApertusForCausalLM": "apertus",
    "DbrxForCausalLM": "dbrx",
    "Llama4ForCausalLM": "llama4_text",
    "BitNetForCausalLM": "bitnet",
}
HF_ARCH: dict[str, str] = {arch: name for name, arch in ARCHITECTURES.items()}
VARIANT_ARCHS = tuple(HF_ARCH)
#: the families whose RoPE turns interleaved pairs of the whole head
INTERLEAVED = ("helium", "ernie4_5", "ernie4_5_moe", "llama4_text")
#: their config classes' defaults where Llama's differ (a key absent from the config)
DEFAULTS: dict[str, dict[str, Any]] = {
    "olmo": {"max_position_embeddings": 2048},
    "helium": {"rope_theta": 100000.0, "rms_norm_eps": 1e-8, "max_position_embeddings": 4096, "head_dim": 128},
    "ernie4_5": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "head_dim": 128,
                 "num_key_value_heads": 2, "tie_word_embeddings": True},
    "ernie4_5_moe": {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                     "num_key_value_heads": 4, "tie_word_embeddings": True},
    "hunyuan_v1_dense": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
    "hunyuan_v1_moe": {"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
    "vaultgemma": {},  # (Gemma 2's keys and defaults, read with Gemma 2's)
    "llama4_text": {},  # (Llama4TextConfig's keys and defaults: dualpath.model.llama4)
    "apertus": {"rms_norm_eps": 1e-5, "max_position_embeddings": 65536, "hidden_act": "xielu"},
    "jais2": {"max_position_embeddings": 8192, "hidden_act": "relu2", "attention_bias": True, "mlp_bias": True},
    "cwm": {"rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "head_dim": 128, "num_key_value_heads": 8,
            "sliding_window": 8192},
    "ministral3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 262144, "head_dim": 128, "num_key_value_heads": 8},
    "nanochat": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "hidden_act": "relu2",
                 "final_logit_softcapping": 15.0},
    "dbrx": {},  # (its own keys: _dbrx_config)
    "bitnet": {"rms_norm_eps": 1e-5, "hidden_act": "relu2", "rope_theta": 500000.0, "num_key_value_heads": 5},
}
#: the families with sliding-window layers (the others mask causally only, whatever their config says)
WINDOWED = ("ministral3", "cwm", "vaultgemma")
OLMO_NORM_EPS = 1e-5  # OlmoLayerNorm's, fixed (the config has no key for it)
_HUNYUAN_NAMES = {"self_attn.query_layernorm.weight": "self_attn.q_norm.weight",
                  "self_attn.key_layernorm.weight": "self_attn.k_norm.weight"}
_NANOCHAT_NAMES = {"mlp.fc1.weight": "mlp.up_proj.weight", "mlp.fc2.weight": "mlp.down_proj.weight",
                   "mlp.fc1.bias": "mlp.up_proj.bias", "mlp.fc2.bias": "mlp.down_proj.bias"}
#: VaultGemma's pre-MLP norm is Llama's post_attention_layernorm (it has no norm on the attention's output)
_VAULTGEMMA_NAMES = {"pre_feedforward_layernorm.weight": "post_attention_layernorm.weight"}
_APERTUS_NAMES = {".attention_layernorm.weight": ".input_layernorm.weight",
                  ".feedforward_layernorm.weight": ".post_attention_layernorm.weight"}
#: ERNIE 4.5 MoE's correction bias: transformers' in-memory name -> the checkpoints' (and ours)
_ERNIE_MOE_NAMES = {"mlp.gate.moe_statics.e_score_correction_bias": "mlp.moe_statics.e_score_correction_bias"}
#: Hunyuan MoE: Hunyuan dense's norms, and its router's weight under ``gate.wg``
_HUNYUAN_MOE_NAMES = {**_HUNYUAN_NAMES, "mlp.gate.wg.weight": "mlp.gate.weight"}
#: the shared experts' one MLP: each family's name -> ours (Qwen2-MoE's)
_SHARED_EXPERT = {"ernie4_5_moe": ".mlp.shared_experts.", "hunyuan_v1_moe": ".mlp.shared_mlp."}
_NAMES = {"apertus": _APERTUS_NAMES, "ernie4_5_moe": _ERNIE_MOE_NAMES, "hunyuan_v1_dense": _HUNYUAN_NAMES,
          "hunyuan_v1_moe": _HUNYUAN_MOE_NAMES, "nanochat": _NANOCHAT_NAMES, "vaultgemma": _VAULTGEMMA_NAMES}
_QK_ROWS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias")


def _flag(cfg: dict[str, Any], key: str, where: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ModelError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def normalize_config(arch: str, cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config in Llama's keys with the family's defaults, the spec fields it sets)``."""
    if arch == "llama4_text":
        from dualpath.model import llama4

        return llama4.normalize_config(cfg, where)
    out = {**DEFAULTS[arch], **cfg}
    fields: dict[str, Any] = {}
    if arch == "dbrx":
        return _dbrx_config(cfg, where)
    if arch in ("ernie4_5", "ernie4_5_moe"):
        use_bias = _flag(cfg, "use_bias", where)
        out["attention_bias"] = use_bias
        if use_bias:
            fields["mlp_has_bias"] = True
        if out.get("head_dim") is None:
            out["head_dim"] = int(out["hidden_size"]) // int(out["num_attention_heads"])
        if arch == "ernie4_5_moe":
            fields.update(_ernie_moe_fields(out, where))
            if use_bias:  # (ERNIE 4.5 VL's LM head has none: lm_head_bias false, from hf_config)
                fields["head_bias"] = _flag({"lm_head_bias": True, **cfg}, "lm_head_bias", where)
    elif arch == "helium" and _flag(cfg, "mlp_bias", where):
        fields["mlp_has_bias"] = True
    elif arch == "olmo":  # (its clip_qkv is read with OLMoE's)
        out["rms_norm_eps"] = OLMO_NORM_EPS
    elif arch in ("hunyuan_v1_dense", "hunyuan_v1_moe"):
        out = _hunyuan_rope(out, where)
        if arch == "hunyuan_v1_moe":
            fields.update(_hunyuan_moe_fields(out, where))
    elif arch == "ministral3":
        out, fields["query_scale_beta"] = _ministral3_rope(out, where)
    elif arch == "cwm":
        if out.get("rope_parameters") is None and out.get("rope_scaling") is None:
            out["rope_parameters"] = dict(CWM_ROPE)
        if out.get("layer_types") is None:
            out["layer_types"] = ["full_attention" if i % 4 == 0 else "sliding_attention"
                                  for i in range(int(out.get("num_hidden_layers") or 0))]
        if out.get("attention_bias"):
            raise ModelError(f"{where}: attention_bias is not a Cwm key (its projections have no biases)")
    elif arch in ("nanochat", "jais2", "apertus", "bitnet"):
        from dualpath.model.layernorm_family import ACTIVATIONS

        act = out.pop("hidden_act")
        if arch == "apertus":
            if out.get("rope_parameters") is None and out.get("rope_scaling") is None:
                out["rope_parameters"] = dict(APERTUS_ROPE)
            if out.get("output_vocab_size") is not None:  # (Apertus 1.5's pruned LM head)
                fields["output_vocab_size"] = out.pop("output_vocab_size")
            if act == "xielu":
                fields["activation"] = "xielu"
                return out, fields
        if act not in ACTIVATIONS:
            raise ModelError(f"{where}: hidden_act {act!r} unsupported; expected one of {sorted(ACTIVATIONS)}")
        fields["activation"] = ACTIVATIONS[act]
        if arch == "nanochat":
            fields["final_logit_softcapping"] = out.pop("final_logit_softcapping")
        elif arch == "jais2":
            out["rms_norm_eps"] = out.pop("layer_norm_eps", 1e-5)
            if _flag(out, "mlp_bias", where):
                fields["mlp_has_bias"] = True
            out["attention_bias"] = _flag(out, "attention_bias", where)
    if arch == "cwm" and _flag(out, "mlp_bias", where):  # (CwmMLP's projections biased, as transformers builds them)
        fields["mlp_has_bias"] = True
    out.pop("mlp_bias", None)  # (read above where the family has it)
    return out, fields


#: DbrxConfig's, DbrxAttentionConfig's and DbrxFFNConfig's defaults
DBRX_DEFAULTS: dict[str, Any] = {"d_model": 2048, "n_heads": 16, "n_layers": 24, "max_seq_len": 2048, "vocab_size": 32000}
DBRX_ATTN: dict[str, Any] = {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": None}
DBRX_FFN: dict[str, Any] = {"ffn_hidden_size": 3584, "moe_num_experts": 4, "moe_top_k": 1,
                            "moe_normalize_expert_weights": 1.0, "ffn_act_fn": None}


def _dbrx_config(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """DBRX's nested config in Llama's keys, and its MoE fields (every layer routed)."""
    c = {**DBRX_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    for key, part in (("attn_config", attn), ("ffn_config", ffn)):
        if not isinstance(part, dict):
            raise ModelError(f"{where}: {key} must be an object, got {part!r}")
    attn, ffn = {**DBRX_ATTN, **attn}, {**DBRX_FFN, **ffn}
    act_fn = ffn["ffn_act_fn"] or {"name": "silu"}
    if not isinstance(act_fn, dict) or act_fn.get("name", "silu") not in lnf.ACTIVATIONS:
        raise ModelError(f"{where}: ffn_config.ffn_act_fn {ffn['ffn_act_fn']!r} unsupported (its GLU experts' gate: "
                         f"a name among {sorted(lnf.ACTIVATIONS)})")
    norm = ffn["moe_normalize_expert_weights"]
    if norm not in (None, 1, 1.0) or isinstance(norm, bool):
        raise ModelError(f"{where}: ffn_config.moe_normalize_expert_weights {norm!r} unsupported (1: the top-k "
                         "weights renormalized; null: kept as they are)")
    for key, part, sub in (("d_model", c, None), ("n_heads", c, None), ("n_layers", c, None),
                           ("kv_n_heads", attn, "attn_config"), ("ffn_hidden_size", ffn, "ffn_config"),
                           ("moe_num_experts", ffn, "ffn_config"), ("moe_top_k", ffn, "ffn_config")):
        v = part[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            name = f"{sub}.{key}" if sub else key
            raise ModelError(f"{where}: {name} must be a positive integer, got {v!r}")
    out: dict[str, Any] = {
        "vocab_size": c["vocab_size"], "hidden_size": c["d_model"], "intermediate_size": ffn["ffn_hidden_size"],
        "num_hidden_layers": c["n_layers"], "num_attention_heads": c["n_heads"],
        "num_key_value_heads": attn["kv_n_heads"], "max_position_embeddings": c["max_seq_len"],
        "rms_norm_eps": 1e-5, "attention_bias": False, "clip_qkv": attn["clip_qkv"],
        "hidden_act": act_fn.get("name", "silu"),  # (the experts' gate, read as every gated MLP's hidden_act)
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype") if k in cfg}}
    if cfg.get("rope_parameters") is not None or cfg.get("rope_scaling") is not None or "rope_theta" in cfg:
        out.update({k: cfg[k] for k in ("rope_parameters", "rope_scaling", "rope_theta") if k in cfg})
    else:  # (an older checkpoint: its base under attn_config; transformers 5 would take 10,000 there)
        out["rope_theta"] = attn["rope_theta"]
    fields = {"n_experts": ffn["moe_num_experts"], "n_experts_per_tok": ffn["moe_top_k"],
              "moe_intermediate_size": ffn["ffn_hidden_size"], "norm_topk_prob": norm is not None}
    return out, fields


#: Ernie4_5_MoeConfig's MoE keys and defaults
ERNIE_MOE_DEFAULTS: dict[str, Any] = {"moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536,
                                      "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
                                      "moe_layer_end_index": -1, "moe_layer_interval": 1, "moe_norm_min": 1e-12}


def _ernie_moe_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """ERNIE 4.5 MoE's sparse layers as the spec's MoE fields: experts in layers ``moe_layer_start_index`` to
    ``moe_layer_end_index`` (-1: the last) whose index + 1 is a multiple of ``moe_layer_interval`` (the others
    dense), ``moe_k`` of ``moe_num_experts`` plus ``moe_num_shared_experts`` shared ones."""
    c = {**ERNIE_MOE_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    for key in ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
                "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and key != "moe_layer_end_index"):
            raise ModelError(f"{where}: {key} must be a non-negative integer, got {v!r} (per-modality lists are "
                             "the original ERNIE 4.5 VL config's; transformers' keeps the language model's keys in "
                             "its text_config)")
    norm_min = c["moe_norm_min"]
    if isinstance(norm_min, bool) or not isinstance(norm_min, (int, float)) or not norm_min > 0:
        raise ModelError(f"{where}: moe_norm_min must be a positive number, got {norm_min!r}")
    if c["moe_layer_interval"] <= 0:
        raise ModelError(f"{where}: moe_layer_interval must be positive, got {c['moe_layer_interval']}")
    n = int(cfg.get("num_hidden_layers") or 0)
    start, end = c["moe_layer_start_index"], c["moe_layer_end_index"]
    end = n - 1 if end == -1 else end
    step, dense = c["moe_layer_interval"], tuple(i for i in range(n) if not start <= i <= end)
    types = cfg.get("mlp_layer_types")  # (ERNIE 4.5 VL's language model: each layer's MLP by name)
    if types is not None:
        if not isinstance(types, list) or len(types) != n or any(t not in ("dense", "sparse") for t in types):
            raise ModelError(f"{where}: mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, "
                             f"got {types!r}")
        step, dense = 1, tuple(i for i, t in enumerate(types) if t == "dense")
    return {"n_experts": c["moe_num_experts"], "n_experts_per_tok": c["moe_k"],
            "moe_intermediate_size": c["moe_intermediate_size"],
            "shared_expert_intermediate_size": c["moe_intermediate_size"] * c["moe_num_shared_experts"],
            "norm_topk_prob": True, "moe_norm_min": float(norm_min), "decoder_sparse_step": step,
            "mlp_only_layers": dense}


def _ernie_moe_config(spec: ModelSpec) -> dict[str, Any]:
    """:func:`_ernie_moe_fields`'s inverse: the sparse layers' span must be contiguous to be written back."""
    span = [i for i in range(spec.n_layers) if i not in spec.mlp_only_layers]
    if span and span != list(range(span[0], span[-1] + 1)):
        raise ModelError(f"ernie4_5_moe: the layers with experts must be contiguous, got {span}")
    shared = spec.shared_expert_intermediate_size // spec.moe_intermediate_size
    return {"moe_num_experts": spec.n_experts, "moe_k": spec.n_experts_per_tok,
            "moe_intermediate_size": spec.moe_intermediate_size, "moe_num_shared_experts": shared,
            "moe_layer_start_index": span[0] if span else spec.n_layers,
            "moe_layer_end_index": span[-1] if span else spec.n_layers - 1,
            "moe_layer_interval": spec.decoder_sparse_step, "moe_norm_min": spec.moe_norm_min}


def _per_layer_int(cfg: dict[str, Any], key: str, default: int, where: str) -> int:
    """An integer key that Hunyuan's configs may give per layer (a list): one value for every layer."""
    v = cfg.get(key, default)
    if isinstance(v, list) and v and all(x == v[0] for x in v):
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"{where}: {key} must be a positive integer (or a list of one value per layer), got {v!r}")
    return v


def _hunyuan_moe_fields(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Hunyuan MoE's experts as transformers runs them: every layer routes ``moe_topk`` of ``num_experts`` experts
    (softmax in fp32, renormalized) of ``intermediate_size``, plus one shared MLP of the same width."""
    inter = cfg.get("intermediate_size")
    if isinstance(inter, bool) or not isinstance(inter, int) or inter <= 0:
        raise ModelError(f"{where}: intermediate_size must be a positive integer, got {inter!r}")
    return {"n_experts": _per_layer_int(cfg, "num_experts", 1, where),
            "n_experts_per_tok": _per_layer_int(cfg, "moe_topk", 1, where),
            "moe_intermediate_size": inter, "shared_expert_intermediate_size": inter, "norm_topk_prob": True}


def _hunyuan_rope(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A Hunyuan RoPE labelled ``dynamic`` with an ``alpha``: a fixed NTK base (``ntk_alpha``), as transformers'
    Hunyuan rotary embedding reads it."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if not isinstance(rope, dict) or not rope.get("alpha"):
            continue
        if rope.get("rope_type", rope.get("type")) != "dynamic":
            raise ModelError(f"{where}: {key}: 'alpha' belongs to a 'dynamic' (NTK-alpha) RoPE, got type "
                             f"{rope.get('rope_type', rope.get('type'))!r}")
        alpha = rope["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ModelError(f"{where}: {key}.alpha must be a positive number, got {alpha!r}")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        out = {**cfg, "rope_scaling": {"rope_type": "ntk_alpha", "alpha": float(alpha)}, "rope_theta": theta}
        out.pop("rope_parameters", None)
        return out
    return cfg


#: ApertusConfig's RoPE when a config gives none
APERTUS_ROPE = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0}
#: CwmConfig's RoPE when a config gives none
CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
#: Ministral3Config's RoPE when a config gives none
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def _ministral3_rope(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], float | None]:
    """Ministral 3's RoPE parameters without the keys that are not the rotation's (``llama_4_scaling_beta``, read
    out as the query scale, and ``max_position_embeddings``)."""
    key = "rope_parameters" if isinstance(cfg.get("rope_parameters"), dict) else "rope_scaling"
    rope = cfg.get(key)
    if rope is None and cfg.get("rope_scaling") is None and cfg.get("rope_parameters") is None:
        rope, key = dict(MINISTRAL3_ROPE), "rope_parameters"
    if not isinstance(rope, dict):
        return cfg, None
    rope = {k: v for k, v in rope.items() if k != "max_position_embeddings"}
    beta = rope.pop("llama_4_scaling_beta", None)
    if beta is not None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ModelError(f"{where}: {key}.llama_4_scaling_beta must be a number >= 0, got {beta!r}")
        if not isinstance(rope.get("original_max_position_embeddings"), int):
            raise ModelError(f"{where}: {key}.llama_4_scaling_beta needs original_max_position_embeddings (the "
                             "positions the query scale counts in)")
        beta = float(beta)
    return {**cfg, key: rope}, beta


def hf_config(spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """The family's own ``config.json`` keys over the Llama-shaped ``cfg``."""
    arch = spec.architecture
    cfg = {**cfg, "pad_token_id": None}  # (the config classes' pad ids index the embedding: out of a small vocab)
    if arch == "llama4_text":
        from dualpath.model import llama4

        return llama4.hf_config(spec, cfg)
    if arch == "dbrx":  # (its own nested keys, nothing of Llama's)
        keep = ("architectures", "model_type", "vocab_size", "tie_word_embeddings", "torch_dtype", "bos_token_id",
                "eos_token_id", "pad_token_id")
        return {**{k: cfg[k] for k in keep if k in cfg}, "d_model": spec.hidden_size, "n_heads": spec.n_heads,
                "n_layers": spec.n_layers, "max_seq_len": spec.max_position,
                "attn_config": {"kv_n_heads": spec.n_kv_heads, "rope_theta": spec.rope_theta,
                                "clip_qkv": spec.clip_qkv},
                "ffn_config": {"ffn_hidden_size": spec.moe_intermediate_size, "moe_num_experts": spec.n_experts,
                               "moe_top_k": spec.n_experts_per_tok,
                               "ffn_act_fn": {"name": lnf.hf_activation(spec.activation)},
                               "moe_normalize_expert_weights": 1.0 if spec.norm_topk_prob else None},
                "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta}}
    if arch == "olmo":
        cfg.update(attention_bias=spec.attention_bias, clip_qkv=spec.clip_qkv)
        cfg.pop("rms_norm_eps")
    elif arch == "helium":
        cfg.update(attention_bias=spec.attention_bias, mlp_bias=bool(spec.mlp_has_bias))
    elif arch == "ernie4_5":
        cfg["use_bias"] = spec.attention_bias
    elif arch == "ernie4_5_moe":
        if spec.attention_bias and not spec.head_bias:
            raise ModelError("ernie4_5_moe: biased projections under an LM head without a bias (ERNIE 4.5 VL's) "
                             "cannot be written as an ERNIE 4.5 MoE checkpoint, whose use_bias sets both")
        cfg.update(use_bias=spec.attention_bias, **_ernie_moe_config(spec))
    elif arch == "ministral3":
        rope = {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta}
        if spec.query_scale_beta is not None:
            rope["llama_4_scaling_beta"] = spec.query_scale_beta
        cfg.update(rope_parameters=rope, sliding_window=spec.sliding_window)
        del cfg["rope_theta"], cfg["rope_scaling"]
    elif arch == "cwm":
        cfg.update(sliding_window=spec.sliding_window or spec.max_position, mlp_bias=bool(spec.mlp_has_bias),
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
    elif arch in ("nanochat", "jais2", "apertus", "bitnet"):
        cfg.update(attention_bias=spec.attention_bias,
                   hidden_act=lnf.hf_activation(spec.activation))
        if arch == "nanochat":
            cfg["final_logit_softcapping"] = spec.final_logit_softcapping
        elif arch == "jais2":
            cfg.update(layer_norm_eps=cfg.pop("rms_norm_eps"), mlp_bias=bool(spec.mlp_has_bias))
        elif spec.output_vocab_size is not None:  # (a pruned head: Apertus 1.5's text model reads it)
            cfg.update(architectures=["Apertus1p5TextForCausalLM"], model_type="apertus1p5_text",
                       output_vocab_size=spec.output_vocab_size)
    elif arch in ("hunyuan_v1_dense", "hunyuan_v1_moe"):
        cfg["attention_bias"] = spec.attention_bias
        if arch == "hunyuan_v1_moe":
            if not spec.moe_intermediate_size == spec.shared_expert_intermediate_size == spec.intermediate_size:
                raise ModelError("hunyuan_v1_moe: its experts and shared MLP are intermediate_size wide")
            cfg.update(num_experts=spec.n_experts, moe_topk=spec.n_experts_per_tok)
        rope = spec.rope_scaling or {}
        if rope.get("rope_type") == "ntk_alpha":
            cfg["rope_scaling"] = {"type": "dynamic", "alpha": rope["alpha"], "factor": 1.0}
    return cfg


def tensors_in(spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
               source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A family's checkpoint tensors in our names (see the module docstring)."""
    from dualpath.model.layernorm_family import interleaved_to_half

    arch = spec.architecture
    if arch == "dbrx":
        return _dbrx_tensors_in(spec, tensors)
    if arch == "ernie4_5_moe":
        tensors = _ernie_vl_tensors(spec, tensors, source)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if arch == "ernie4_5_moe" and ("mtp_" in name or name.startswith("mtp")):
            continue  # its multi-token-prediction block (mtp_block, mtp_linear_proj, ...): not a decoder layer
        if arch in INTERLEAVED and name.endswith(_QK_ROWS):
            t = interleaved_to_half(spec, name, t)
        elif arch == "nanochat" and name.endswith(_QK_ROWS):
            t = _swap_halves(spec, name, t)
        if arch in _SHARED_EXPERT:  # (Qwen2-MoE's name here for the shared experts' one wide MLP)
            name = name.replace(_SHARED_EXPERT[arch], ".mlp.shared_expert.")
        out[_rename(name, _NAMES.get(arch, {}))] = t
    if arch == "ernie4_5_moe":  # (trained without the aux-free bias: none stored, zeros as transformers starts it)
        for i in range(spec.n_layers):
            key = f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias"
            if spec.is_moe_layer(i) and f"model.layers.{i}.mlp.gate.weight" in out and key not in out:
                out[key] = torch.zeros(1, spec.n_experts)
    if arch == "llama4_text":
        from dualpath.model import llama4

        return llama4.tensors_in(spec, out, source)
    return out


def _ernie_vl_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], source: str) -> Mapping[str, torch.Tensor]:
    """ERNIE 4.5 VL's language model in ERNIE 4.5 MoE's names, with its text experts only. As saved (the hub's layout,
    which transformers writes back): each MoE layer's router ``mlp.gate.weight`` transposed (``[hidden, experts]``),
    the vision router as ``mlp.gate.weight_1``, both correction biases stacked (``[2, experts]``: text first), the
    text experts ``mlp.experts.<0..E-1>`` followed by the vision ones. As transformers holds them in memory: under
    ``mlp.text_moe.`` and ``mlp.vision_moe.``. Any other checkpoint's tensors unchanged."""
    hub = any(n.endswith(".mlp.gate.weight_1") for n in tensors)
    if not hub and not any(".mlp.text_moe." in n for n in tensors):
        return tensors
    e, h = spec.n_experts, spec.hidden_size
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".mlp.gate.weight_1") or ".mlp.vision_moe." in name:
            continue  # (the vision experts' router and experts: no text token reaches them)
        name = name.replace(".mlp.text_moe.", ".mlp.")
        if hub and name.endswith(".mlp.gate.weight"):
            if tuple(t.shape) != (h, e):
                raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected [{h}, {e}] (ERNIE "
                                 "4.5 VL's router, stored transposed)")
            t = t.t()
        elif hub and name.endswith(".mlp.moe_statics.e_score_correction_bias"):
            if tuple(t.shape) != (2, e):
                raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected [2, {e}] (the text "
                                 "and the vision routers' biases)")
            t = t[:1]
        elif hub and ".mlp.experts." in name:
            index = name.split(".mlp.experts.", 1)[1].split(".", 1)[0]
            if index.isdigit() and int(index) >= e:
                continue  # (a vision expert)
        out[name] = t
    return out


#: DBRX's block tensors (after ``transformer.blocks.<i>.``) -> ours (after ``model.layers.<i>.``)
_DBRX_NAMES = {"norm_attn_norm.norm_1.weight": "input_layernorm.weight",
               "norm_attn_norm.norm_2.weight": "post_attention_layernorm.weight",
               "norm_attn_norm.attn.out_proj.weight": "self_attn.o_proj.weight",
               "ffn.router.layer.weight": "mlp.gate.weight"}
_DBRX_TOP = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.norm_f.weight": "model.norm.weight"}
#: DBRX's fused experts ([experts x ffn_hidden_size, d_model] each) -> each expert's projection (w2 transposed)
_DBRX_EXPERTS = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}


def _dbrx_tensors_in(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DBRX's tensors in our names: ``Wqkv`` split into q/k/v, the fused experts split per expert."""
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shape = (spec.n_experts, spec.moe_intermediate_size, spec.hidden_size)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in _DBRX_TOP or not name.startswith("transformer.blocks."):
            out[_DBRX_TOP.get(name, name)] = t
            continue
        layer, rest = name[len("transformer.blocks."):].split(".", 1)
        p = f"model.layers.{layer}."
        if rest == "norm_attn_norm.attn.Wqkv.weight":
            for part, w in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv]), strict=True):
                out[f"{p}self_attn.{part}.weight"] = w
        elif rest.startswith("ffn.experts.mlp.") and rest.rsplit(".", 1)[1] in _DBRX_EXPERTS:
            kind = rest.rsplit(".", 1)[1]
            for e, w in enumerate(t.reshape(shape)):
                out[f"{p}mlp.experts.{e}.{_DBRX_EXPERTS[kind]}.weight"] = w.t() if kind == "w2" else w
        else:
            out[p + _DBRX_NAMES.get(rest, rest)] = t
    return out


def _dbrx_tensors_out(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_dbrx_tensors_in`."""
    top = {ours: theirs for theirs, ours in _DBRX_TOP.items()}
    names = {ours: theirs for theirs, ours in _DBRX_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name in top or not name.startswith("model.layers."):
            out[top.get(name, name)] = t
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        if rest.startswith("mlp.experts."):
            e, proj, _ = rest[len("mlp.experts."):].split(".")
            kind = next(k for k, v in _DBRX_EXPERTS.items() if v == proj)
            experts.setdefault((layer, kind), {})[int(e)] = t.t() if kind == "w2" else t
        elif rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            qkv.setdefault(layer, {})[rest.split(".")[1]] = t
        else:
            out[f"transformer.blocks.{layer}.{names.get(rest, rest)}"] = t
    for layer, parts in qkv.items():
        out[f"transformer.blocks.{layer}.norm_attn_norm.attn.Wqkv.weight"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]]).contiguous()
    for (layer, kind), by_expert in experts.items():
        out[f"transformer.blocks.{layer}.ffn.experts.mlp.{kind}"] = torch.cat(
            [by_expert[e] for e in sorted(by_expert)]).contiguous()
    return out


def _rename(name: str, names: Mapping[str, str]) -> str:
    for theirs, ours in names.items():
        if name.endswith(theirs):
            return name[: -len(theirs)] + ours
    return name


def _swap_halves(spec: ModelSpec, name: str, t: torch.Tensor) -> torch.Tensor:
    """NanoChat: a q/k projection's rows (or bias) with the two halves of each head swapped (its own inverse)."""
    heads = spec.n_heads if ".q_proj." in name else spec.n_kv_heads
    return t.reshape(heads, 2, spec.head_dim // 2, *t.shape[1:]).flip(1).reshape(t.shape).contiguous()


def tensors_out(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`tensors_in`."""
    from dualpath.model.layernorm_family import interleaved_to_half

    arch = spec.architecture
    if arch == "dbrx":
        return _dbrx_tensors_out(spec, tensors)
    if arch == "llama4_text":
        from dualpath.model import llama4

        tensors = llama4.tensors_out(spec, tensors)
    back = {ours: theirs for theirs, ours in _NAMES.get(arch, {}).items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if arch in INTERLEAVED and name.endswith(_QK_ROWS):
            t = interleaved_to_half(spec, name, t, inverse=True)
        elif arch == "nanochat" and name.endswith(_QK_ROWS):
            t = _swap_halves(spec, name, t)
        if arch in _SHARED_EXPERT:
            name = name.replace(".mlp.shared_expert.", _SHARED_EXPERT[arch])
        out[_rename(name, back)] = t
    return out
