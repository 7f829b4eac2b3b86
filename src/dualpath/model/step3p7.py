"""Step 3.7's language model (``Step3p7ForConditionalGeneration``, model_type ``step3p7``; its text config's
``step3p5``), as transformers runs it, over the paged KV pool.

* **Attention**: GQA with per-head q/k RMS norms (Gemma's ``1 + weight``, in fp32), a RoPE per layer type
  (``rope_parameters``; partial by ``partial_rotary_factor``, rotate-half), sliding layers over ``sliding_window``
  keys with their own query-head count (``num_sliding_attention_heads``, or ``per_layer_config``), scores scaled
  by ``query_pre_attn_scalar ** -0.5``; each head's output times ``sigmoid(g_proj(x))`` (``gating``: one gate per
  head; ``per-element``, which transformers' model builds and then cannot apply, is refused).
* **MLPs**: dense layers (``mlp_layer_types``; by default the first three), then MoE: sigmoid router scores plus a
  correction bias choose ``num_experts_per_tok``, weighted by their renormalized scores, the routed sum times
  ``moe_router_scaling_factor``, plus a shared expert. Each SwiGLU may be clamped per layer (``swiglu_limits`` for
  the routed experts, ``swiglu_limits_shared`` for the shared expert and dense MLPs; 0 or null: none):
  ``silu(gate)`` above, ``up`` both ways.

``use_bidirectional_attention`` (a prefix attended both ways) is refused: its keys would depend on later tokens.
Tensor names: the released checkpoint's (``model.layers.N.moe.gate_proj.weight`` stacked ``[E, I, H]``,
``moe.router_bias``, ``share_expert.*``) or transformers' in-memory ones (``model.language_model.``, packed
experts); the vision tower, projector and multi-token-prediction layers (``num_nextn_predict_layers``) left out.
Saved in the released layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, _rope
from dualpath.model.moe import SigmoidBiasRouter, dispatch_experts
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype, inherit_outer

__all__ = ["ARCH", "Step3p7Model", "Step3p7Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "step3p5"
ARCHITECTURE = "Step3p7ForConditionalGeneration"
TYPES = ("sliding_attention", "full_attention")
#: Step3p7TextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 128815, "hidden_size": 4096, "intermediate_size": 11264, "num_hidden_layers": 45,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_experts_per_tok": 8, "moe_intermediate_size": 1280,
    "n_routed_experts": 288, "share_expert_dim": 1280, "attention_bias": False, "moe_router_scaling_factor": 1.0,
    "mlp_bias": False, "gating": True, "use_bidirectional_attention": False,
}
#: the names its attribute map reads as its own
_ALIASES = {"num_local_experts": "n_routed_experts", "num_attention_groups": "num_key_value_heads",
            "moe_num_experts": "n_routed_experts", "moe_top_k": "num_experts_per_tok",
            "share_expert_dims": "share_expert_dim", "num_mtp_layers": "num_nextn_predict_layers"}


@dataclass(frozen=True)
class Step3p7Spec(ModelSpec):
    """A :class:`ModelSpec` (``n_heads``: the most query heads of any layer) plus Step 3.7's fields."""

    layer_types: tuple[str, ...] = ()
    layer_heads: tuple[int, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # type -> (theta, partial factor)
    gate_per_head: bool = True
    query_scalar: float = 0.0
    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    moe_scale: float = 1.0
    mlp_bias: bool = False
    expert_limits: tuple[float, ...] = ()  # per layer, 0: no clamp
    shared_limits: tuple[float, ...] = ()
    mtp_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        for name in ("layer_types", "layer_heads", "dense_layers", "expert_limits", "shared_limits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {n} layers, got {list(self.layer_types)}")
        if len(self.layer_heads) != n or any(h <= 0 or h % self.n_kv_heads for h in self.layer_heads):
            raise ModelError(f"model config: each layer's query heads must be a multiple of num_key_value_heads "
                             f"({self.n_kv_heads}), got {list(self.layer_heads)}")
        for t in set(self.layer_types):
            theta, partial = self.rope_by_type.get(t, (0.0, 0.0))
            if not theta > 0 or not 0 < partial <= 1 or int(self.head_dim * partial) % 2:
                raise ModelError(f"model config: rope_parameters.{t} needs a positive rope_theta and a "
                                 f"partial_rotary_factor in (0, 1] turning an even number of dims, got {theta}, "
                                 f"{partial}")
        if not self.query_scalar > 0:
            raise ModelError(f"model config: query_pre_attn_scalar must be positive, got {self.query_scalar}")
        if len(self.dense_layers) < n and not (0 < self.moe_top_k <= self.moe_experts and self.moe_width > 0
                                               and self.shared_width > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"n_routed_experts ({self.moe_experts}) and positive moe_intermediate_size "
                             f"({self.moe_width}) and share_expert_dim ({self.shared_width})")
        for name in ("expert_limits", "shared_limits"):
            limits = getattr(self, name)
            if len(limits) != n or any(not v >= 0 for v in limits):
                raise ModelError(f"model config: swiglu_limits{'_shared' if name == 'shared_limits' else ''} must "
                                 f"give a bound >= 0 (0 or null: none) for each of the {n} layers, got {list(limits)}")

    def to_hf_config(self) -> dict[str, Any]:
        n = self.n_layers
        sliding = [self.layer_heads[i] for i in range(n) if self.layer_types[i] == "sliding_attention"]
        text: dict[str, Any] = {
            "model_type": ARCH, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": n,
            "num_attention_heads": next((self.layer_heads[i] for i in range(n)
                                         if self.layer_types[i] == "full_attention"), self.n_heads),
            "num_sliding_attention_heads": sliding[0] if sliding else None,
            "per_layer_config": {str(i): {"num_attention_heads": self.layer_heads[i]} for i in range(n)
                                 if self.layer_types[i] == "sliding_attention"},
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "gating": True if self.gate_per_head else "per-element", "query_pre_attn_scalar": self.query_scalar,
            "mlp_layer_types": ["dense" if i in self.dense_layers else "sparse" for i in range(n)],
            "n_routed_experts": self.moe_experts or 1, "num_experts_per_tok": self.moe_top_k or 1,
            "moe_intermediate_size": self.moe_width or 1, "share_expert_dim": self.shared_width or 1,
            "moe_router_scaling_factor": self.moe_scale, "mlp_bias": self.mlp_bias,
            "swiglu_limits": list(self.expert_limits), "swiglu_limits_shared": list(self.shared_limits),
            "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
                                for t, (theta, partial) in self.rope_by_type.items()},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": 0,
            "dtype": self.dtype,
        }
        return {"architectures": [ARCHITECTURE], "model_type": "step3p7", "text_config": text,
                "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}


def text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of a ``Step3p7ForConditionalGeneration`` checkpoint (its ``text_config``)."""
    text = cfg.get("text_config", {})
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Step 3.7's language model)")
    out = dict(text)
    inherit_outer(out, text, cfg)
    # (the image-text model ties its head by its own config, which has no such key: never by the text config's)
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def _limits(norm: dict[str, Any], key: str, n: int, where: str) -> list[float]:
    value = norm.get(key)
    if value is None:
        return [0.0] * n
    if not isinstance(value, list) or len(value) < n or any(
            v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in value):
        raise ModelError(f"{where}: {key} must list a bound (or null) for each of the {n} layers, got {value!r}")
    return [float(v or 0.0) for v in value[:n]]


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Step3p7Spec:
    """The spec of a Step 3.7 config (the image-text checkpoint's, or its text config) over Step3p7TextConfig's
    defaults, its legacy keys read as transformers reads them."""
    text = text_config(cfg, where) if "text_config" in cfg else cfg
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for alias, key in _ALIASES.items():
        if text.get(alias) is not None and text.get(key) is None:
            norm[key] = text[alias]
    if norm.get("use_bidirectional_attention"):
        raise ModelError(f"{where}: use_bidirectional_attention=true unsupported (keys attended both ways depend on "
                         "later tokens; a cached prefix could not be reused)")
    gating = norm.get("gating")
    if gating not in (True, "per-head"):
        # (per-element: transformers builds a gate per channel, then fails to apply it; no behaviour to follow)
        raise ModelError(f"{where}: gating must be true or 'per-head' (one sigmoid gate per head), got {gating!r}")
    n = cfg_int(norm, "num_hidden_layers", where)
    mtp = cfg_int(norm, "num_nextn_predict_layers", where, minimum=0) if "num_nextn_predict_layers" in norm else 0
    for key in ("layer_types", "mlp_layer_types", "swiglu_limits", "swiglu_limits_shared"):
        if isinstance(norm.get(key), list) and len(norm[key]) == n + mtp:  # (the MTP layers' entries: theirs)
            norm[key] = norm[key][:n]
    types = cfg_kinds(norm, "layer_types", n, TYPES, where, ["full_attention"] * n)
    default_mlp = ["dense"] * min(3, n) + ["sparse"] * max(n - 3, 0)
    if text.get("mlp_layer_types") is None and text.get("moe_layers_enum") is not None:
        enum = text["moe_layers_enum"]
        items = enum.split(",") if isinstance(enum, str) else enum
        moe = {int(i) for i in items if str(i).strip()}
        default_mlp = ["sparse" if i in moe else "dense" for i in range(n)]
    mlp = cfg_kinds(norm, "mlp_layer_types", n, ("dense", "sparse"), where, default_mlp)
    full_heads = cfg_int(norm, "num_attention_heads", where)
    sliding_heads = norm.get("num_sliding_attention_heads")
    if "per_layer_config" in norm:  # (transformers derives it from the sliding head count only when it is left out;
        sliding_heads = full_heads  # given, it is every override there is)
    elif sliding_heads is None:
        other = norm.get("attention_other_setting") or {}
        sliding_heads = other.get("num_attention_heads", full_heads) if isinstance(other, dict) else full_heads
    heads = [sliding_heads if t == "sliding_attention" else full_heads for t in types]
    per_layer = norm.get("per_layer_config") or {}
    if not isinstance(per_layer, dict):
        raise ModelError(f"{where}: per_layer_config must be an object of layer -> overrides")
    for key, over in per_layer.items():
        try:
            i = int(key)
        except ValueError:
            raise ModelError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not isinstance(over, dict) or set(over) - {"num_attention_heads"} or not 0 <= i < n:
            raise ModelError(f"{where}: per_layer_config[{key!r}]: only a layer's num_attention_heads is supported, "
                             f"got {over!r}")
        heads[i] = over.get("num_attention_heads", heads[i])
    if any(isinstance(h, bool) or not isinstance(h, int) for h in heads):
        raise ModelError(f"{where}: attention head counts must be integers, got {heads!r}")
    rope_by_type = _rope_by_type(norm, types, where)
    head_dim = cfg_int(norm, "head_dim", where)
    scalar = norm.get("query_pre_attn_scalar", head_dim)
    sparse = "sparse" in mlp
    return Step3p7Spec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=n, n_heads=max(heads),
        n_kv_heads=cfg_int(norm, "num_key_value_heads", where), head_dim=head_dim,
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=next(iter(rope_by_type.values()))[0],
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=bool(norm["tie_word_embeddings"]),
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"),
        sliding_window=cfg_int(norm, "sliding_window", where) if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        context_cap=max_context, layer_types=tuple(types), layer_heads=tuple(heads), rope_by_type=rope_by_type,
        gate_per_head=True, query_scalar=cfg_num({"q": scalar}, "q", where),
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        moe_experts=cfg_int(norm, "n_routed_experts", where) if sparse else 0,
        moe_top_k=cfg_int(norm, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(norm, "moe_intermediate_size", where) if sparse else 0,
        shared_width=cfg_int(norm, "share_expert_dim", where) if sparse else 0,
        moe_scale=cfg_num(norm, "moe_router_scaling_factor", where), mlp_bias=bool(norm["mlp_bias"]),
        expert_limits=tuple(_limits(norm, "swiglu_limits", n, where)),
        shared_limits=tuple(_limits(norm, "swiglu_limits_shared", n, where)), mtp_layers=mtp,
    )


def _rope_by_type(norm: dict[str, Any], types: list[str], where: str) -> dict[str, tuple[float, float]]:
    """Each layer type's ``(rope_theta, partial_rotary_factor)``: from ``rope_parameters`` keyed by type, else from
    the legacy per-layer ``rope_theta`` / ``partial_rotary_factors`` lists (each type's first layer), as
    Step3p7TextConfig reads them; only the ``default`` RoPE."""
    rp = norm.get("rope_parameters") or {}
    out: dict[str, tuple[float, float]] = {}
    for t in sorted(set(types)):
        p = rp.get(t) if isinstance(rp, dict) else None
        if not isinstance(p, dict):
            i = types.index(t)
            theta = norm.get("rope_theta", 10000.0)
            partials = norm.get("partial_rotary_factors")
            p = {"rope_type": "default", "rope_theta": theta[i] if isinstance(theta, list) else theta,
                 "partial_rotary_factor": partials[i] if isinstance(partials, list) else 1.0}
            if t == "full_attention" and isinstance(norm.get("rope_scaling"), dict):
                p.update(norm["rope_scaling"])
        if p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: only a 'default' RoPE is supported for Step 3.7, got "
                             f"{p!r}")
        out[t] = (cfg_num(p, "rope_theta", where),
                  cfg_num({"partial_rotary_factor": p.get("partial_rotary_factor", 1.0)}, "partial_rotary_factor",
                          where))
    return out


# --- modules -------------------------------------------------------------------------------------------------


def _norm(dim: int, eps: float) -> RMSNorm:
    return RMSNorm(dim, eps, offset=True)


class ClampedMLP(nn.Module):
    """``down(clamp(silu(gate(x)), max=limit) * clamp(up(x), -limit, limit))`` (no clamp at ``limit`` 0)."""

    def __init__(self, hidden: int, width: int, limit: float, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)
        self.limit = limit or float("inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.gate_proj(x)).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return cast(torch.Tensor, self.down_proj(gate * up))


class MoE(nn.Module):
    def __init__(self, spec: Step3p7Spec, layer: int) -> None:
        super().__init__()
        self.gate = SigmoidBiasRouter(spec.hidden_size, spec.moe_experts, spec.moe_top_k)
        self.experts = nn.ModuleList(ClampedMLP(spec.hidden_size, spec.moe_width, spec.expert_limits[layer])
                                     for _ in range(spec.moe_experts))
        self.shared_experts = ClampedMLP(spec.hidden_size, spec.shared_width, spec.shared_limits[layer],
                                         spec.mlp_bias)
        self.scale = spec.moe_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x)
        w, idx = self.gate(x)
        return dispatch_experts(x, idx, w, self.experts) * self.scale + shared


class Attention(nn.Module):
    def __init__(self, spec: Step3p7Spec, layer: int) -> None:
        super().__init__()
        hq, hkv, d, bias = spec.layer_heads[layer], spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=bias)
        self.q_norm = _norm(d, spec.rms_eps)
        self.k_norm = _norm(d, spec.rms_eps)
        self.g_proj = nn.Linear(spec.hidden_size, hq if spec.gate_per_head else hq * d, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, spec: Step3p7Spec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = _norm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = _norm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (ClampedMLP(spec.hidden_size, spec.intermediate_size, spec.shared_limits[layer],
                                          spec.mlp_bias) if layer in spec.dense_layers else MoE(spec, layer))


class Step3p7Model(TypedRopeDecoder):
    """Step 3.7's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: Step3p7Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: DecoderLayer(spec, i), norm=_norm(spec.hidden_size, spec.rms_eps))
        self._build(spec, backbone, device, backend)
        self.spec: Step3p7Spec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = cast(Attention, mod.self_attn)
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.layer_heads[layer], spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)), cos, sin)
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
        o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv_layer, b, spec.query_scalar ** -0.5,
                        window=self.windows[layer])
        gate = torch.sigmoid(attn.g_proj(x))
        o = o * gate[:, :, None] if spec.gate_per_head else (o.reshape(n, hq * d) * gate)
        h = st.hidden + attn.o_proj(o.reshape(n, hq * d))
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------

_OTHER = ("vision_model.", "vit_large_projector.", "model.vision_model.", "model.multi_modal_projector.")
_STACKED = re.compile(r"^(model\.layers\.\d+)\.moe\.(gate_proj|up_proj|down_proj)\.weight$")


def tensors_in(spec: Step3p7Spec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's language-model tensors under our names (module docstring)."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_OTHER):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
                and int(parts[2]) >= spec.n_layers:
            continue  # (multi-token-prediction layers)
        name = name.replace(".moe.gate.weight", ".mlp.gate.weight").replace(
            ".moe.router_bias", ".mlp.gate.e_score_correction_bias").replace(".share_expert.", ".mlp.shared_experts.")
        m = _STACKED.match(name)
        if m is not None:
            if t.dim() != 3:
                raise ModelError(f"{source}: stacked expert tensor {name!r} has shape {tuple(t.shape)}, expected 3 "
                                 "dims [experts, out, in]")
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.mlp.experts.{e}.{m.group(2)}.weight"] = t[e]
        elif not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours in the released layout (experts stacked per projection, ``moe.*``, ``share_expert.*``)."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m is not None:
            stacked.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        out[name.replace(".mlp.gate.weight", ".moe.gate.weight").replace(
            ".mlp.gate.e_score_correction_bias", ".moe.router_bias").replace(".mlp.shared_experts.", ".share_expert.")] = t
    for (prefix, part), by_e in stacked.items():
        out[f"{prefix}.moe.{part}.weight"] = torch.stack([by_e[e] for e in sorted(by_e)]).contiguous()
    return out
