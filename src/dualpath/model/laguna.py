"""Poolside's Laguna (``LagunaForCausalLM``, model_type ``laguna``), as transformers runs it, over the paged KV pool.

A pre-norm decoder whose layers differ in query heads (``num_attention_heads_per_layer``; every layer's keys and
values have ``num_key_value_heads`` heads of ``head_dim``, so the KV pages are one shape), with:

* per-head q/k RMS norms (scaled in fp32) before RoPE, a RoPE per layer type (``rope_parameters``: the full layers
  turn half of each head by default), sliding layers over ``sliding_window`` tokens;
* the attention's output gated by ``softplus(g_proj(x))``, one gate per head (``gating: true`` / ``"per-head"``) or
  per channel (``"per-element"``, and ``false``, which transformers builds the same way);
* a dense first layer (``mlp_layer_types``), then MoE layers: fp32 sigmoid scores of the router logits
  (soft-capped by ``moe_router_logit_softcapping`` when positive) plus a correction bias choose the top
  ``num_experts_per_tok``, weighted by their renormalized scores; the experts' sum times
  ``moe_routed_scaling_factor``, plus a shared SwiGLU expert.

``moe_apply_router_weight_on_input`` (which transformers does not implement either) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import (
    ForwardState,
    RMSNorm,
    TypedRopeDecoder,
    _rope,
)
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype

ARCH = "laguna"
TYPES = ("sliding_attention", "full_attention")
#: LagunaConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 100352, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 40,
    "num_attention_heads": 48, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "sliding_window": 512, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8, "num_experts": 256, "head_dim": 128,
    "attention_bias": False, "gating": True, "moe_routed_scaling_factor": 1.0,
    "moe_apply_router_weight_on_input": False, "moe_router_logit_softcapping": 0.0,
}
_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}
#: the hub's names -> ours (transformers' in-memory ones)
_NAMES = ((".mlp.experts.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
          (".mlp.shared_expert.", ".mlp.shared_experts."))


@dataclass(frozen=True)
class LagunaSpec(ModelSpec):
    """A :class:`ModelSpec` (``n_heads``: the most query heads of any layer) plus Laguna's fields."""

    layer_types: tuple[str, ...] = ()
    layer_heads: tuple[int, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # type -> (theta, partial factor)
    gate_per_head: bool = True
    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    moe_scale: float = 1.0
    router_softcap: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        for name in ("layer_types", "layer_heads", "dense_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {n} layers, got {list(self.layer_types)}")
        if len(self.layer_heads) != n or any(h <= 0 or h % self.n_kv_heads for h in self.layer_heads):
            raise ModelError(f"model config: num_attention_heads_per_layer needs one multiple of num_key_value_heads "
                             f"({self.n_kv_heads}) per layer ({n}), got {list(self.layer_heads)}")
        for t in set(self.layer_types):
            theta, partial = self.rope_by_type.get(t, (0.0, 0.0))
            if not theta > 0 or not 0 < partial <= 1 or int(self.head_dim * partial) < 2:
                raise ModelError(f"model config: rope_parameters.{t} needs a positive rope_theta and a "
                                 f"partial_rotary_factor in (0, 1], got {theta}, {partial}")
        if len(self.dense_layers) < n and not (0 < self.moe_top_k <= self.moe_experts and self.moe_width > 0
                                               and self.shared_width > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"num_experts ({self.moe_experts}) and positive moe_intermediate_size ({self.moe_width}) "
                             f"and shared_expert_intermediate_size ({self.shared_width})")

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------






def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> LagunaSpec:
    """The spec of a Laguna config (its keys over LagunaConfig's defaults)."""

    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)
    if cfg.get("moe_apply_router_weight_on_input"):
        raise ModelError(f"{where}: moe_apply_router_weight_on_input=true is not supported (nor by transformers)")
    gating = cfg.get("gating")
    if gating is False:  # (transformers gates per head only for true / "per-head": false builds per-element gates)
        gating = "per-element"
    if gating not in (True, "per-head", "per-element"):
        raise ModelError(f"{where}: gating must be true, false, 'per-head' or 'per-element', got {gating!r}")
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where, ["full_attention"] * n)
    mlp = cfg_kinds(cfg, "mlp_layer_types", n, ("dense", "sparse"), where, ["dense"] + ["sparse"] * (n - 1))
    heads = cfg.get("num_attention_heads_per_layer") or [cfg_int(cfg, "num_attention_heads", where)] * n
    if not isinstance(heads, list) or len(heads) != n or any(
            isinstance(h, bool) or not isinstance(h, int) for h in heads):
        raise ModelError(f"{where}: num_attention_heads_per_layer must give an integer for each of the {n} layers, "
                         f"got {heads!r}")
    rope = cfg.get("rope_parameters") or _ROPE
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object of layer type -> RoPE parameters")
    rope_by_type: dict[str, tuple[float, float]] = {}
    for t in sorted(set(types)):
        p = rope.get(t)
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: only a 'default' RoPE is supported for laguna, got {p!r}")
        partial = {"partial_rotary_factor": p.get("partial_rotary_factor", 1.0)}
        rope_by_type[t] = (cfg_num(p, "rope_theta", where), cfg_num(partial, "partial_rotary_factor", where))
    dtype = config_dtype(cfg, dtype)
    window = cfg_int(cfg, "sliding_window", where)
    sparse = "sparse" in mlp
    return LagunaSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=max(heads),
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where), head_dim=cfg_int(cfg, "head_dim", where),
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), rope_theta=next(iter(rope_by_type.values()))[0],
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]), dtype=dtype, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        context_cap=max_context, layer_types=tuple(types), layer_heads=tuple(heads), rope_by_type=rope_by_type,
        gate_per_head=gating != "per-element", dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        moe_experts=cfg_int(cfg, "num_experts", where) if sparse else 0,
        moe_top_k=cfg_int(cfg, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(cfg, "moe_intermediate_size", where) if sparse else 0,
        shared_width=cfg_int(cfg, "shared_expert_intermediate_size", where) if sparse else 0,
        moe_scale=cfg_num(cfg, "moe_routed_scaling_factor", where),
        router_softcap=cfg_num(cfg, "moe_router_logit_softcapping", where, positive=False),
    )


def hf_config(spec: LagunaSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    cfg: dict[str, Any] = {
        "architectures": ["LagunaForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_attention_heads_per_layer": list(spec.layer_heads), "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim, "hidden_act": hf_activation(spec.activation), "max_position_embeddings": spec.max_position,
        "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.attention_bias, "sliding_window": spec.sliding_window or 512,
        "layer_types": list(spec.layer_types), "gating": True if spec.gate_per_head else "per-element",
        "mlp_layer_types": ["dense" if i in spec.dense_layers else "sparse" for i in range(spec.n_layers)],
        "moe_routed_scaling_factor": spec.moe_scale, "moe_router_logit_softcapping": spec.router_softcap,
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
                            for t, (theta, partial) in spec.rope_by_type.items()},
    }
    if spec.moe_experts:
        cfg.update(num_experts=spec.moe_experts, num_experts_per_tok=spec.moe_top_k,
                   moe_intermediate_size=spec.moe_width, shared_expert_intermediate_size=spec.shared_width)
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: LagunaSpec, layer: int) -> None:
        super().__init__()
        hq, hkv, d, bias = spec.layer_heads[layer], spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_eps, fp32_scale=True)
        self.k_norm = RMSNorm(d, spec.rms_eps, fp32_scale=True)
        self.g_proj = nn.Linear(spec.hidden_size, hq if spec.gate_per_head else hq * d, bias=False)


class Router(nn.Module):
    def __init__(self, spec: LagunaSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.moe_experts, spec.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.moe_experts), requires_grad=False)
        self.k, self.cap = spec.moe_top_k, spec.router_softcap

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k] in x's dtype, expert ids [N, k])``."""
        logits = F.linear(x, self.weight).float()
        if self.cap > 0:
            logits = torch.tanh(logits / self.cap) * self.cap
        scores = torch.sigmoid(logits)
        idx = torch.topk(scores + self.e_score_correction_bias.to(scores.dtype), self.k, dim=-1)[1]
        w = scores.gather(-1, idx)
        return (w / w.sum(dim=-1, keepdim=True)).to(x.dtype), idx


class MoE(nn.Module):
    def __init__(self, spec: LagunaSpec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width, act=activation_of(spec)) for _ in range(spec.moe_experts))
        self.shared_experts = FeedForward(spec.hidden_size, spec.shared_width, act=activation_of(spec))
        self.scale = spec.moe_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x)
        w, idx = self.gate(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, (self.experts[e](x[tok]) * w[tok, slot, None]).to(out.dtype))
        return out * self.scale + shared


class DecoderLayer(nn.Module):
    def __init__(self, spec: LagunaSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)) if layer in spec.dense_layers
                               else MoE(spec))


class Backbone(nn.Module):
    def __init__(self, spec: LagunaSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class LagunaModel(TypedRopeDecoder):
    """Laguna's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: LagunaSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: LagunaSpec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.layer_heads[layer], spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)), cos, sin)
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
        o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv_layer, b, d ** -0.5, window=self.windows[layer])
        gate = F.softplus(attn.g_proj(x).float()).to(o.dtype)
        o = o * gate[:, :, None] if spec.gate_per_head else o.reshape(n, hq * d) * gate
        h = st.hidden + attn.o_proj(o.reshape(n, hq * d))
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names: the hub's shared expert and correction-bias names, transformers'
    packed experts split."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        for theirs, ours in _NAMES:
            name = name.replace(theirs, ours)
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the hub's names (per-expert experts, as transformers writes them)."""
    out = {}
    for name, t in tensors.items():
        for theirs, ours in _NAMES:
            name = name.replace(ours, theirs)
        out[name] = t
    return out
