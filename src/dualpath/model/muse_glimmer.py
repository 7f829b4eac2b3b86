"""Muse Glimmer's language model (``MuseGlimmerForConditionalGeneration``'s ``muse_glimmer_text``), as transformers
runs it, over the paged KV pool.

Gemma 2's blocks (four norms by ``1 + weight``; the two after each sublayer at ``post_norm_eps``) around:

* **attention**: GQA over sliding layers (``sliding_window``) and full ones (``layer_types``; by default every
  fourth layer counted back from the last is full), queries and keys RMS-normed per head without a weight, the
  queries then times ``qk_scale_factor``; RoPE (one base for every rotating layer) except on the NoPE layers
  (``layer_rope_theta`` 0: by default the full ones); the output gated per channel by ``sigmoid(gate_proj(x))``;
* a SwiGLU MLP (``hidden_activation``: silu);
* embeddings RMS-normed without a weight; a final norm by ``weight``; logits times ``output_multiplier``, then
  soft-capped by ``final_logit_softcapping``.

transformers reads ``layer_rope_theta`` only as "rotate or not" (every rotating layer turns at the config's one
``rope_theta``); a config whose non-zero entries differ from it is refused (which base is meant is not guessed).
Tensor names are transformers' (``model.language_model.``); the vision tower and projector are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, TypedRopeState, _rope
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype, parse_rope

__all__ = ["ARCH", "MuseGlimmerModel", "MuseGlimmerSpec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "muse_glimmer_text"
ARCHITECTURE = "MuseGlimmerForConditionalGeneration"
TYPES = ("sliding_attention", "full_attention")
#: MuseGlimmerTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 202048, "hidden_size": 6656, "intermediate_size": 19968, "num_hidden_layers": 52,
    "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "hidden_activation": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 200000,
    "eos_token_id": 200001, "sliding_window": 2048, "final_logit_softcapping": 20.0, "qk_scale_factor": 3.87,
    "output_multiplier": 0.19611613513818404, "post_norm_eps": 1e-8, "attention_bias": False,
}


@dataclass(frozen=True)
class MuseGlimmerSpec(ModelSpec):
    """A :class:`ModelSpec` plus Muse Glimmer's fields."""

    layer_types: tuple[str, ...] = ()
    unrotated: tuple[int, ...] = ()
    qk_scale: float = 1.0
    post_norm_eps: float = 1e-8
    output_multiplier: float = 1.0
    logit_softcap: float = 0.0
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "unrotated", tuple(self.unrotated))
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(TYPES):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each of "
                             f"the {self.n_layers} layers, got {list(self.layer_types)}")
        if self.logit_softcap < 0:
            raise ModelError(f"model config: final_logit_softcapping must be >= 0, got {self.logit_softcap}")

    def to_hf_config(self) -> dict[str, Any]:
        text = {
            "model_type": ARCH, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_activation": "silu", "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "post_norm_eps": self.post_norm_eps, "sliding_window": self.sliding_window or 2048,
            "layer_types": list(self.layer_types), "attention_bias": self.attention_bias,
            "layer_rope_theta": [0 if i in self.unrotated else self.rope_theta for i in range(self.n_layers)],
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "qk_scale_factor": self.qk_scale, "output_multiplier": self.output_multiplier,
            "final_logit_softcapping": self.logit_softcap, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }
        return {"architectures": [ARCHITECTURE], "model_type": "muse_glimmer", "text_config": text,
                "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> MuseGlimmerSpec:
    """The spec of a Muse Glimmer config (the image-text checkpoint's ``text_config`` over its defaults)."""
    text = cfg.get("text_config", cfg)
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Muse Glimmer's language model)")
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for key in ("torch_dtype", "dtype"):
        if key in cfg and key not in text:
            norm[key] = cfg[key]
    if text is not cfg:  # (the image-text model ties its head by its own config's key)
        norm["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    if norm.get("hidden_activation", norm.get("hidden_act")) not in ("silu", "swish"):
        raise ModelError(f"{where}: hidden_activation {norm.get('hidden_activation')!r} unsupported (SwiGLU needs "
                         "'silu')")
    n = cfg_int(norm, "num_hidden_layers", where)
    types = cfg_kinds(norm, "layer_types", n, TYPES, where,
                      ["full_attention" if (n - 1 - i) % 4 == 0 else "sliding_attention" for i in range(n)])
    theta, scaling = parse_rope(norm, where)
    if scaling is not None:
        raise ModelError(f"{where}: rope_parameters of type {scaling.get('rope_type')!r} unsupported for Muse "
                         "Glimmer (only 'default')")
    per_layer = norm.get("layer_rope_theta")
    if per_layer is None:
        per_layer = [0 if (n - 1 - i) % 4 == 0 else theta for i in range(n)]
    if not isinstance(per_layer, list) or len(per_layer) < n or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in per_layer[:n]):
        raise ModelError(f"{where}: layer_rope_theta must list a base (0: no RoPE) for each of the {n} layers, got "
                         f"{per_layer!r}")
    if any(v and float(v) != theta for v in per_layer[:n]):
        raise ModelError(f"{where}: layer_rope_theta names bases other than rope_theta ({theta}); transformers turns "
                         "every rotating layer at rope_theta, so which base is meant is not guessed")
    window = cfg_int(norm, "sliding_window", where)
    return MuseGlimmerSpec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=n,
        n_heads=cfg_int(norm, "num_attention_heads", where), n_kv_heads=cfg_int(norm, "num_key_value_heads", where),
        head_dim=cfg_int(norm, "head_dim", where), rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=bool(norm["tie_word_embeddings"]),
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"),
        sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        context_cap=max_context, layer_types=tuple(types),
        unrotated=tuple(i for i, v in enumerate(per_layer[:n]) if not v),
        qk_scale=cfg_num(norm, "qk_scale_factor", where), post_norm_eps=cfg_num(norm, "post_norm_eps", where),
        output_multiplier=cfg_num(norm, "output_multiplier", where),
        logit_softcap=cfg_num(norm, "final_logit_softcapping", where, positive=False),
        rope_by_type={"all": (theta, 1.0)})


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A weightless RMS norm (in fp32, back to ``x``'s dtype)."""
    h = x.float()
    return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        hq, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=bias)
        self.gate_proj = nn.Linear(spec.hidden_size, hq * d, bias=False)


class MLP(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.input_layernorm = RMSNorm(h, spec.rms_eps, offset=True)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(h, spec.post_norm_eps, offset=True)
        self.pre_feedforward_layernorm = RMSNorm(h, spec.rms_eps, offset=True)
        self.mlp = MLP(spec)
        self.post_feedforward_layernorm = RMSNorm(h, spec.post_norm_eps, offset=True)


class Backbone(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=True)


class MuseGlimmerModel(TypedRopeDecoder):
    """Muse Glimmer's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: MuseGlimmerSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: MuseGlimmerSpec = spec
        self._typed_rope(spec)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return _rms(self.model.embed_tokens(ids), self.spec.rms_eps)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(cast(RMSNorm, self.model.norm)(h)) * self.spec.output_multiplier
        cap = self.spec.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return cast(torch.Tensor, logits.float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = cast(TypedRopeState, state)
        spec, b = self.spec, state.batch
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, spec.n_kv_heads, spec.head_dim))
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q = _rms(attn.q_proj(x).view(n, hq, d), spec.rms_eps) * spec.qk_scale
        k = _rms(attn.k_proj(x).view(n, hkv, d), spec.rms_eps)
        if layer not in spec.unrotated:
            cos, sin = st.tables["all"]
            q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
        store_kv(k, attn.v_proj(x).view(n, hkv, d), kv_layer, b.slot_mapping, backend=self.backend)
        if b.is_decode:
            o = paged_decode_attention(q, kv_layer, b.block_tables, b.seq_lens, d ** -0.5, backend=self.backend,
                                       window=self.windows[layer])
        else:
            o = paged_prefill_attention(q, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                        d ** -0.5, backend=self.backend, window=self.windows[layer])
        o = o.reshape(n, hq * d) * torch.sigmoid(attn.gate_proj(x))
        h = st.hidden + mod.post_attention_layernorm(attn.o_proj(o))
        st.hidden = h + mod.post_feedforward_layernorm(mod.mlp(mod.pre_feedforward_layernorm(h)))
        state.next_layer += 1


_OTHER = ("model.vision_tower.", "model.multi_modal_projector.", "model.vision_adapter.", "model.vision_projection.",
          "vision_tower.", "multi_modal_projector.")


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors (``model.language_model.`` -> ``model.``); the vision parts left out."""
    return {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
            for k, v in tensors.items() if not k.startswith(_OTHER)}


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under the image-text model's names (``model.language_model.``)."""
    return {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in tensors.items()}
