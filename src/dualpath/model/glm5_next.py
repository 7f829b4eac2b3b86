"""GLM-5.3-Flash's language model (model_type ``glm5_next_text``, the text model of
``Glm5NextForConditionalGeneration``), as transformers runs it, over the paged pool of Kimi Linear's hybrids
(:mod:`dualpath.model.kimi_linear`: MLA latent rows widened for the KDA layers' state pages).

* **KDA layers** (``linear_attention``; by default three of every four): Kimi Linear's Kimi Delta Attention with the
  low-rank gates, its decay bounded (``linear_lower_bound * sigmoid(exp(A_log) (f + dt_bias))``, in fp32; a null
  bound: Kimi's softplus decay); its three convolutions (one packed ``conv1d`` in transformers' memory) in fp32.
* **MLA layers** (``indexed_attention``): DeepSeek-V3's latent attention with no rotated part at all
  (``qk_rope_head_dim`` 0) under a **pooled** sparse selection: every ``index_kpool`` tokens from the first form a
  pool whose key is the softmax-gated (``gate + ape`` per channel) mix of its tokens' indexer keys; a query keeps the
  ``index_topk / index_kpool`` pools it scores best among those it has seen whole, plus its own open pool's tokens
  (:func:`dualpath.model.dsa.pooled_selection`). A token's indexer key and gate logits follow its latent in its row;
  ``shared`` layers (``indexer_types``) reuse the last selection. Attention on the torch reference.
* **Hyper-connections**: DeepSeek-V4's ``hc_mult`` streams mixed around every sublayer (``pre`` / ``post`` gates,
  a Sinkhorn-normalized ``comb``: :class:`dualpath.model.deepseek_v4.HyperConnection`); the head reads the streams'
  mean, normed.
* **MLPs**: every SwiGLU (dense layers, shared and routed experts) clamped by ``swiglu_limit``; DeepSeek-V3's
  sigmoid router.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

import torch

from dualpath.errors import ModelError
from dualpath.model.deepseek import MLAttention
from dualpath.model.deepseek_v4 import HyperConnection
from dualpath.model.kimi_linear import (
    GLM5_NEXT,
    KdaLayer,
    KimiDeltaAttention,
    KimiLinearModel,
    KimiLinearSpec,
    _spec,
)
from dualpath.model.layernorm_family import hf_activation
from dualpath.model.llama import ForwardState, RMSNorm
from dualpath.model.moe import FeedForward
from dualpath.model.spec_common import cfg_int, cfg_kinds, inherit_outer

#: Glm5NextTextConfig's defaults, under DeepSeek-V3's key names
DEFAULTS: dict[str, Any] = {
    "vocab_size": 154880, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 2048,
    "num_hidden_layers": 45, "num_attention_heads": 64, "n_shared_experts": 1, "n_routed_experts": 288,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 0,
    "v_head_dim": 256, "qk_nope_head_dim": 256, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "max_position_embeddings": 1048576, "rms_norm_eps": 1e-5, "index_topk": 2048,
    "index_head_dim": 128, "index_n_heads": 32, "swiglu_limit": 10.0, "linear_head_dim": 128,
    "linear_num_heads": 64, "linear_conv_kernel_dim": 4, "linear_lower_bound": -5.0, "hc_mult": 4, "hc_eps": 1e-6,
    "hc_sinkhorn_iters": 20, "index_kpool": 16, "index_kpool_always_select_tail": True, "bos_token_id": None,
    "eos_token_id": None,
}


def text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of a ``Glm5NextForConditionalGeneration`` checkpoint (its ``text_config``)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (GLM-5.3-Flash's language model)")
    if text.get("model_type", GLM5_NEXT) != GLM5_NEXT:
        raise ModelError(f"{where}: text_config.model_type {text['model_type']!r} unsupported (expected {GLM5_NEXT})")
    out = dict(text)
    inherit_outer(out, text, cfg, ("torch_dtype", "dtype", "bos_token_id", "eos_token_id"))
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                     max_context: int | None = None) -> KimiLinearSpec:
    """The spec of a GLM-5.3-Flash text config (its keys over Glm5NextTextConfig's defaults)."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "linear_lower_bound"}}
    norm = {("n_routed_experts" if k == "num_local_experts" else k): v for k, v in norm.items()}
    n = cfg_int(norm, "num_hidden_layers", where)
    if int(norm.get("qk_rope_head_dim") or 0) != 0:
        raise ModelError(f"{where}: qk_rope_head_dim must be 0 (GLM-5.3-Flash's MLA applies no RoPE; transformers "
                         f"rotates nothing), got {norm['qk_rope_head_dim']!r}")
    if norm.get("index_kpool_always_select_tail") is not True:
        raise ModelError(f"{where}: index_kpool_always_select_tail false unsupported (a query would not see its own "
                         "open pool, and transformers' first queries attend to nothing)")
    default = ["indexed_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
    types = cfg_kinds(norm, "layer_types", n, ("linear_attention", "indexed_attention", "full_attention"), where,
                      default)
    types = ["full_attention" if t != "linear_attention" else t for t in types]
    if norm.get("mlp_layer_types") is None:
        norm["mlp_layer_types"] = ["dense"] * min(3, n) + ["sparse"] * max(n - 3, 0)
    bound = norm.get("linear_lower_bound")
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound < 0):
        raise ModelError(f"{where}: linear_lower_bound must be a negative number or null, got {bound!r}")
    try:
        extra: dict[str, Any] = {"hc_mult": int(norm["hc_mult"]), "hc_eps": float(norm["hc_eps"]),
                 "hc_iters": int(norm["hc_sinkhorn_iters"]), "swiglu_limit": float(norm["swiglu_limit"]),
                 "index_kpool": int(norm["index_kpool"])}
    except (TypeError, ValueError):
        raise ModelError(f"{where}: hc_mult / hc_eps / hc_sinkhorn_iters / swiglu_limit / index_kpool must be "
                         "numbers") from None
    if extra["hc_iters"] < 1 or extra["index_kpool"] < 1 or not extra["swiglu_limit"] > 0:
        raise ModelError(f"{where}: hc_sinkhorn_iters and index_kpool must be >= 1 and swiglu_limit positive, got "
                         f"{extra['hc_iters']}, {extra['index_kpool']}, {extra['swiglu_limit']}")
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):  # (no RoPE)
        norm.pop(key, None)
    base = _spec({**norm, "rope_interleave": False}, GLM5_NEXT, types, where, dtype, kv_format, max_context,
                 interleave=False, lower_bound=None if bound is None else float(bound))
    spec = replace(base, **extra)
    if any(t == "full_attention" for t in spec.layer_types) and spec.index_shared_layers:
        prev = None
        for i, t in enumerate(spec.layer_types):  # (a shared layer reuses the MLA layer right before it)
            if t != "full_attention":
                prev = None
                continue
            if i in spec.index_shared_layers and prev is None:
                raise ModelError(f"{where}: indexer_types: MLA layer {i} is 'shared', but the layer before it has no "
                                 "selection to give it (transformers hands one over only between adjacent MLA layers)")
            prev = i
    return spec


def hf_config(spec: KimiLinearSpec) -> dict[str, Any]:
    """``config.json`` of a ``Glm5NextForConditionalGeneration`` whose text model is ``spec`` (transformers reads
    it, and so does :func:`spec_from_config`)."""
    k = min(spec.first_k_dense_replace, spec.n_layers)
    text = {
        "model_type": GLM5_NEXT, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "moe_intermediate_size": spec.moe_intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_heads,
        "n_shared_experts": spec.n_shared_experts, "n_routed_experts": spec.n_routed_experts,
        "routed_scaling_factor": spec.routed_scaling_factor, "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": spec.q_lora_rank, "qk_rope_head_dim": 0, "v_head_dim": spec.v_head_dim,
        "qk_nope_head_dim": spec.qk_nope_head_dim, "n_group": spec.n_group, "topk_group": spec.topk_group,
        "num_experts_per_tok": spec.num_experts_per_tok, "norm_topk_prob": spec.norm_topk_prob,
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps, "hidden_act": hf_activation(spec.activation),
        "attention_bias": spec.attention_bias, "index_topk": spec.index_topk, "index_head_dim": spec.index_head_dim,
        "index_n_heads": spec.index_n_heads, "swiglu_limit": spec.swiglu_limit, "linear_head_dim": spec.lin_dim,
        "linear_num_heads": spec.lin_heads, "linear_conv_kernel_dim": spec.conv_kernel,
        "linear_lower_bound": spec.gate_lower_bound, "hc_mult": spec.hc_mult, "hc_eps": spec.hc_eps,
        "hc_sinkhorn_iters": spec.hc_iters, "index_kpool": spec.index_kpool, "index_kpool_always_select_tail": True,
        "layer_types": ["indexed_attention" if t == "full_attention" else t for t in spec.layer_types],
        "mlp_layer_types": ["dense"] * k + ["sparse"] * (spec.n_layers - k),
        "indexer_types": ["shared" if i in spec.index_shared_layers else "full" for i in range(spec.n_layers)],
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "pad_token_id": None,
        "dtype": spec.dtype,
    }
    return {"architectures": ["Glm5NextForConditionalGeneration"], "model_type": "glm5_next", "text_config": text,
            "tie_word_embeddings": spec.tie_embeddings, "dtype": spec.dtype}


class ClampedFeedForward(FeedForward):
    """A gated MLP whose gate is clamped above ``limit`` and up projection to +-``limit`` (set after building); its
    activation ``hidden_act``'s, as transformers' dense MLPs and shared experts take it (the routed experts' stays
    SiLU: ``deepseek._Clamped``)."""

    limit: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x).clamp(max=self.limit)
        u = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return cast(torch.Tensor, self.down_proj(self.act(g) * u))


class Glm5NextModel(KimiLinearModel):
    """GLM-5.3-Flash's language model (module docstring)."""

    def __init__(self, spec: KimiLinearSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__(spec, device=device, backend=backend)
        for layer in self.model.layers:
            layer.attn_hc = HyperConnection(cast(Any, spec)).to(self.device)
            layer.ffn_hc = HyperConnection(cast(Any, spec)).to(self.device)
            for hc in (layer.attn_hc, layer.ffn_hc):  # (transformers keeps only their biases and scales in fp32)
                hc.fn.data = hc.fn.data.to(spec.torch_dtype)
            mlps = [layer.mlp] if isinstance(layer.mlp, FeedForward) else [getattr(layer.mlp, "shared_experts", None)]
            for mlp in mlps:
                if isinstance(mlp, FeedForward):
                    mlp.__class__ = ClampedFeedForward
                    cast(ClampedFeedForward, mlp).limit = spec.swiglu_limit

    @torch.no_grad()
    def prefill_begin(self, batch: Any) -> ForwardState:
        state = super().prefill_begin(batch)
        state.hidden = state.hidden.unsqueeze(1).expand(-1, self.spec.hc_mult, -1).contiguous()
        return state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(cast(RMSNorm, self.model.norm)(h.mean(dim=1))).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        b = state.batch
        self._check_kv(layer, kv_layer, b.block_tokens)
        mod = self.model.layers[layer]
        h = state.hidden
        dt = h.dtype
        post, comb, x = mod.attn_hc(h)
        x = mod.input_layernorm(x)
        if isinstance(mod, KdaLayer):
            out = cast(KimiDeltaAttention, mod.self_attn)(x, b, kv_layer)
        else:
            out = self.attention(cast(MLAttention, mod.self_attn), x, state, kv_layer)
        h = post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), h)
        post, comb, x = mod.ffn_hc(h)
        out = mod.mlp(mod.post_attention_layernorm(x))
        state.hidden = post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), h)
        state.next_layer += 1


#: the checkpoints' hyper-connection names (left) for ours (right)
_HC = (("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
       ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"))


def tensors_in(spec: KimiLinearSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An image-text checkpoint's language-model tensors as ours (``model.language_model.`` -> ``model.``, the
    vision tower left out, the hyper-connections' names; transformers' in-memory names too: see
    :func:`dualpath.model.kimi_linear.tensors_in`)."""
    from dualpath.model.kimi_linear import tensors_in as kda_in

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(("model.visual.", "model.vision_tower.", "visual.")):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        for theirs, ours in _HC:
            name = name.replace(theirs, ours)
        out[name] = t
    return kda_in(spec, out)


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours as transformers' save_pretrained writes an image-text checkpoint's language model."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        for theirs, ours in _HC:
            name = name.replace(ours, theirs)
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        out[name] = t
    return out

