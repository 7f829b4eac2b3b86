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
from dualpath.model.hybrid import Backbone
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, _rope
from dualpath.model.moe import gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype, inherit_outer, parse_rope

__all__ = ["ARCH", "MuseGlimmerModel", "MuseGlimmerSpec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "muse_glimmer_text"
ARCHITECTURE = "MuseGlimmerForConditionalGeneration"
SPARK = "muse_spark_text"
SPARK_ARCHITECTURE = "MuseSparkForConditionalGeneration"
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
    # Muse Spark (model_type muse_spark_text): its MoE layers and residual gates (0 / empty for Muse Glimmer)
    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    moe_hidden: int = 0
    moe_scale: float = 1.0
    gate_temperature: float = 0.0

    @property
    def spark(self) -> bool:
        return self.architecture == SPARK

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "unrotated", tuple(self.unrotated))
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(TYPES):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each of "
                             f"the {self.n_layers} layers, got {list(self.layer_types)}")
        if self.logit_softcap < 0:
            raise ModelError(f"model config: final_logit_softcapping must be >= 0, got {self.logit_softcap}")
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if self.spark and len(self.dense_layers) < self.n_layers and not (
                0 < self.moe_top_k <= self.moe_experts and min(self.moe_width, self.moe_hidden) > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"num_local_experts ({self.moe_experts}) and positive moe_intermediate_size and "
                             "moe_hidden_size")
        if self.spark and not self.gate_temperature > 0:
            raise ModelError(f"model config: residual_gate_temperature must be positive, got {self.gate_temperature}")

    def to_hf_config(self) -> dict[str, Any]:
        text = {
            "model_type": ARCH, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_activation": hf_activation(self.activation), "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "post_norm_eps": self.post_norm_eps, "sliding_window": self.sliding_window or 2048,
            "layer_types": list(self.layer_types), "attention_bias": self.attention_bias,
            "layer_rope_theta": [0 if i in self.unrotated else self.rope_theta for i in range(self.n_layers)],
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "qk_scale_factor": self.qk_scale, "output_multiplier": self.output_multiplier,
            "final_logit_softcapping": self.logit_softcap, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }
        if self.spark:
            del text["hidden_activation"]
            text.update(model_type=SPARK, hidden_act=hf_activation(self.activation), num_local_experts=self.moe_experts or 1,
                        num_experts_per_tok=self.moe_top_k or 1, moe_intermediate_size=self.moe_width or 1,
                        moe_hidden_size=self.moe_hidden or 1, routed_scaling_factor=self.moe_scale,
                        residual_gate_temperature=self.gate_temperature,
                        mlp_layer_types=["dense" if i in self.dense_layers else "sparse"
                                         for i in range(self.n_layers)])
            return {"architectures": [SPARK_ARCHITECTURE], "model_type": "muse_spark", "text_config": text,
                    "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}
        return {"architectures": [ARCHITECTURE], "model_type": "muse_glimmer", "text_config": text,
                "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}


#: MuseSparkTextConfig's defaults over Muse Glimmer's
SPARK_DEFAULTS: dict[str, Any] = {
    **DEFAULTS, "hidden_size": 8192, "intermediate_size": 16384, "num_hidden_layers": 62, "num_attention_heads": 128,
    "num_key_value_heads": 16, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 1048576,
    "qk_scale_factor": 5.4730064863875, "output_multiplier": 0.1767766952966369, "moe_intermediate_size": 4096,
    "num_local_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 1.0, "moe_hidden_size": 4096,
    "residual_gate_temperature": 0.3, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None, spark: bool = False) -> MuseGlimmerSpec:
    """The spec of a Muse Glimmer (or, ``spark``, Muse Spark) config: the image-text checkpoint's ``text_config``
    over its defaults."""
    text = cfg.get("text_config", cfg)
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Muse Glimmer's language model)")
    norm = {**(SPARK_DEFAULTS if spark else DEFAULTS), **{k: v for k, v in text.items() if v is not None}}
    if spark:
        norm.pop("hidden_activation", None)
        norm["hidden_activation"] = norm.get("hidden_act")
    inherit_outer(norm, text, cfg)
    if text is not cfg:  # (the image-text model ties its head by its own config's key; Muse Spark's never does)
        from dualpath.model.hf_config import composite_tie

        outer = {"architectures": [SPARK_ARCHITECTURE if spark else ARCHITECTURE], **cfg}
        norm["tie_word_embeddings"] = bool(composite_tie(outer, text))  # (None: no key, untied)
    act = gate_activation({"hidden_activation": norm.get("hidden_activation", norm.get("hidden_act"))}, where,
                          "hidden_activation")
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
        architecture=SPARK if spark else ARCH, activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
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
        rope_by_type={"all": (theta, 1.0)}, **(_spark_fields(norm, n, where) if spark else {}))


def _spark_fields(norm: dict[str, Any], n: int, where: str) -> dict[str, Any]:
    """Muse Spark's MoE and residual-gate fields."""
    mlp = cfg_kinds(norm, "mlp_layer_types", n, ("dense", "sparse"), where, ["sparse"] * n)
    sparse = "sparse" in mlp
    return {"dense_layers": tuple(i for i, m in enumerate(mlp) if m == "dense"),
            "moe_experts": cfg_int(norm, "num_local_experts", where) if sparse else 0,
            "moe_top_k": cfg_int(norm, "num_experts_per_tok", where) if sparse else 0,
            "moe_width": cfg_int(norm, "moe_intermediate_size", where) if sparse else 0,
            "moe_hidden": cfg_int(norm, "moe_hidden_size", where) if sparse else 0,
            "moe_scale": cfg_num(norm, "routed_scaling_factor", where),
            "gate_temperature": cfg_num(norm, "residual_gate_temperature", where)}


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
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class ScaledFirstNorm(nn.Module):
    """Muse Spark's input-scaled RMS norm: ``x * (1 + weight)`` rounded to ``x``'s dtype, then normalized."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = (x.float() * (1.0 + self.weight).float()).to(x.dtype)
        return _rms(scaled, self.eps)


class ResidualGate(nn.Module):
    """``alpha * residual + beta * h`` with ``beta = sigmoid(w)``, ``alpha = sqrt(max(sigmoid(-w) (1 + beta), eps))``,
    ``w = gate / temperature`` (in fp32, as transformers keeps it)."""

    def __init__(self, spec: MuseGlimmerSpec, eps: float = 1e-3) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(spec.hidden_size))
        self.temperature, self.eps = spec.gate_temperature, eps

    def forward(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = self.gate.float() / self.temperature
        beta = torch.sigmoid(w)
        alpha = torch.sqrt(torch.clamp(torch.sigmoid(-w) * (1.0 + beta), min=self.eps))
        return (alpha * residual + beta * h).to(residual.dtype)


class SparkRouter(nn.Module):
    keep_fp32 = True

    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.moe_experts, spec.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.moe_experts), requires_grad=False)
        self.k, self.mult, self.scale = spec.moe_top_k, spec.output_multiplier, spec.moe_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()) * self.mult)
        idx = torch.topk(scores + self.e_score_correction_bias.float(), self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        return idx, w / (w.sum(dim=-1, keepdim=True) + 1e-15) * self.scale


class SparkExperts(nn.Module):
    """Packed SwiGLU experts at ``moe_hidden_size`` (transformers' layout), each output normed by the shared
    ``post_expert_norm`` before its weight."""

    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        e, m, i = spec.moe_experts, spec.moe_hidden, spec.moe_width
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, m))
        self.down_proj = nn.Parameter(torch.zeros(e, m, i))
        self.post_expert_norm = ScaledFirstNorm(m, spec.post_norm_eps)
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = self.post_expert_norm(F.linear(self.act(gate) * up, self.down_proj[e]))
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))
        return out


class SparkMoE(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec) -> None:
        super().__init__()
        self.gate = SparkRouter(spec)
        self.pre_expert_proj = nn.Linear(spec.hidden_size, spec.moe_hidden, bias=False)
        self.pre_expert_norm = RMSNorm(spec.moe_hidden, spec.rms_eps, offset=True)
        self.experts = SparkExperts(spec)
        self.post_expert_proj = nn.Linear(spec.moe_hidden, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x)
        return cast(torch.Tensor, self.post_expert_proj(self.experts(
            self.pre_expert_norm(self.pre_expert_proj(x)), idx, w)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: MuseGlimmerSpec, layer: int = 0) -> None:
        super().__init__()
        h = spec.hidden_size
        self.input_layernorm = RMSNorm(h, spec.rms_eps, offset=True)
        self.self_attn = Attention(spec)
        self.pre_feedforward_layernorm = RMSNorm(h, spec.rms_eps, offset=True)
        self.mlp: nn.Module = SparkMoE(spec) if spec.spark and layer not in spec.dense_layers else MLP(spec)
        if spec.spark:  # (a weightless norm after attention, an input-scaled one after the MLP, residual gates)
            self.post_feedforward_layernorm: nn.Module = ScaledFirstNorm(h, spec.post_norm_eps)
            self.post_attention_residual_gate = ResidualGate(spec)
            self.post_feedforward_residual_gate = ResidualGate(spec)
        else:
            self.post_attention_layernorm = RMSNorm(h, spec.post_norm_eps, offset=True)
            self.post_feedforward_layernorm = RMSNorm(h, spec.post_norm_eps, offset=True)


class MuseGlimmerModel(TypedRopeDecoder):
    """Muse Glimmer's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: MuseGlimmerSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        final = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=True)  # (by weight, not 1 + weight)
        self._build(spec, Backbone(spec, lambda i: DecoderLayer(spec, i), norm=final), device, backend)
        self.spec: MuseGlimmerSpec = spec
        self._typed_rope(spec)
        with torch.no_grad():  # (transformers keeps the residual gates in fp32)
            for name, p in self.named_parameters():
                if name.endswith("residual_gate.gate"):
                    p.data = p.data.float()

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
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q = _rms(attn.q_proj(x).view(n, hq, d), spec.rms_eps) * spec.qk_scale
        k = _rms(attn.k_proj(x).view(n, hkv, d), spec.rms_eps)
        if layer not in spec.unrotated:
            cos, sin = st.tables["all"]
            q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
        o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv_layer, b, d ** -0.5, window=self.windows[layer])
        if spec.spark:  # (Muse Spark: each head's output RMS-normed without a weight first)
            o = _rms(o, spec.rms_eps)
        o = o.reshape(n, hq * d) * torch.sigmoid(attn.gate_proj(x))
        if spec.spark:
            h = mod.post_attention_residual_gate(st.hidden, _rms(attn.o_proj(o), spec.post_norm_eps))
            out = mod.post_feedforward_layernorm(mod.mlp(mod.pre_feedforward_layernorm(h)))
            st.hidden = mod.post_feedforward_residual_gate(h, out)
        else:
            h = st.hidden + mod.post_attention_layernorm(attn.o_proj(o))
            st.hidden = h + mod.post_feedforward_layernorm(mod.mlp(mod.pre_feedforward_layernorm(h)))
        state.next_layer += 1


_OTHER = ("model.vision_tower.", "model.multi_modal_projector.", "model.vision_adapter.", "model.vision_projection.",
          "model.audio_tower.", "model.audio_adapter.", "model.audio_projection.", "vision_tower.",
          "multi_modal_projector.", "audio_tower.")


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors (``model.language_model.`` -> ``model.``); the vision parts left out."""
    return {("model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else k): v
            for k, v in tensors.items() if not k.startswith(_OTHER)}


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under the image-text model's names (``model.language_model.``)."""
    return {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in tensors.items()}
