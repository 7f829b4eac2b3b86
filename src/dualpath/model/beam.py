"""Beam (``BeamForCausalLM``, model_type ``beam``), as transformers runs it, over the paged KV pool.

A decoder of sliding and full layers (``layer_types``: every sixth and the last full by default) with:

* per-head q/k RMS norms (scaled in fp32); the sliding layers turn queries and keys by their RoPE
  (``rope_parameters.sliding_attention``), the full ones use none (``full_attention: null``) and scale each query by
  ``(1 + (position + 1) / 2048) ** 0.1`` in fp32;
* the attention's output gated per channel by ``sigmoid(gate_proj(x) + gate_bias[head])`` before ``o_proj``;
* four RMS norms per layer (input, post-attention, pre- and post-feedforward) and a depth-scaled residual: each
  block's output times ``1 / sqrt(k)`` plus the residual times ``sqrt((k - 1) / k)``, ``k = 2 (layer + 1)`` for the
  attention and one more for the MLP;
* dense SwiGLU layers (``mlp_layer_types``: the first three by default), then MoE layers: DeepSeek-V3's router (fp32
  sigmoid scores plus a correction bias choose the top ``num_experts_per_tok`` within the best ``topk_group`` of
  ``n_group`` groups, weighted by the renormalized scores), the experts' sum times ``routed_scaling_factor``, no
  shared expert; every SwiGLU's activation and product in fp32;
* logits soft-capped by ``final_logit_softcapping`` in fp32.

(With a norm on every block's output and before every block's input, the depth scaling and ``routed_scaling_factor``
only rescale sums that the next norm takes back: they change the logits by rounding alone. They are kept as
transformers computes them.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, _rope
from dualpath.model.moe import Activation, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype

ARCH = "beam"
TYPES = ("sliding_attention", "full_attention")
#: BeamConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 20480, "num_hidden_layers": 52,
    "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
    "sliding_window": 512, "moe_intermediate_size": 2560, "num_experts": 256, "num_experts_per_tok": 8,
    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "final_logit_softcapping": 30.0,
}
_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": None}
#: the full (NoPE) layers' query scale: ``(1 + (position + 1) / _SSMAX_LENGTH) ** _SSMAX_POWER``
_SSMAX_LENGTH, _SSMAX_POWER = 2048, 0.1


@dataclass(frozen=True)
class BeamSpec(ModelSpec):
    """A :class:`ModelSpec` plus Beam's fields (``rope_by_type``: the layer types that rotate -> their base)."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, float] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    moe_groups: int = 1
    moe_top_groups: int = 1
    moe_scale: float = 1.0
    moe_renormalize: bool = True
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {n} layers, got {list(self.layer_types)}")
        if len(self.dense_layers) < n and not (
                0 < self.moe_top_k <= self.moe_experts and self.moe_width > 0 and self.moe_groups > 0
                and self.moe_experts % self.moe_groups == 0 and 0 < self.moe_top_groups <= self.moe_groups
                and self.moe_top_k <= self.moe_top_groups * (self.moe_experts // self.moe_groups)):
            raise ModelError(f"model config: the MoE layers need num_experts ({self.moe_experts}) in n_group "
                             f"({self.moe_groups}) equal groups, 1 <= topk_group ({self.moe_top_groups}) <= n_group, "
                             f"num_experts_per_tok ({self.moe_top_k}) experts within them and a positive "
                             f"moe_intermediate_size ({self.moe_width})")

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> BeamSpec:
    """The spec of a Beam config (its keys over BeamConfig's defaults)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "final_logit_softcapping"}}
    act = gate_activation(cfg, where)
    n = cfg_int(cfg, "num_hidden_layers", where)
    default = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]  # (and the last full)
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where, default[:-1] + ["full_attention"])
    mlp = cfg_kinds(cfg, "mlp_layer_types", n, ("dense", "sparse"), where,
                    ["dense"] * min(3, n) + ["sparse"] * (n - min(3, n)))
    rope = cfg.get("rope_parameters") or _ROPE
    if not isinstance(rope, dict) or any(t not in rope for t in set(types)):
        raise ModelError(f"{where}: rope_parameters must hold each layer type's RoPE (an object, or null for none), "
                         f"got {rope!r}")
    rope_by_type: dict[str, float] = {}
    for t in sorted(set(types)):
        p = rope[t]
        if p is None:
            continue
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default" \
                or p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ModelError(f"{where}: rope_parameters.{t}: only a 'default' RoPE over the whole head is supported "
                             f"for beam, got {p!r}")
        rope_by_type[t] = cfg_num(p, "rope_theta", where)
    cap = cfg.get("final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ModelError(f"{where}: final_logit_softcapping must be a positive number or null, got {cap!r}")
    sparse = "sparse" in mlp
    norm = cfg.get("norm_topk_prob")
    if not isinstance(norm, bool):
        raise ModelError(f"{where}: norm_topk_prob must be true or false, got {norm!r}")
    window = cfg_int(cfg, "sliding_window", where)
    return BeamSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=next(iter(rope_by_type.values()), 10000.0), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        context_cap=max_context, layer_types=tuple(types), rope_by_type=rope_by_type,
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        moe_experts=cfg_int(cfg, "num_experts", where) if sparse else 0,
        moe_top_k=cfg_int(cfg, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(cfg, "moe_intermediate_size", where) if sparse else 0,
        moe_groups=cfg_int(cfg, "n_group", where) if sparse else 1,
        moe_top_groups=cfg_int(cfg, "topk_group", where) if sparse else 1,
        moe_scale=cfg_num(cfg, "routed_scaling_factor", where), moe_renormalize=norm,
        logit_softcap=None if cap is None else float(cap),
    )


def hf_config(spec: BeamSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    cfg: dict[str, Any] = {
        "architectures": ["BeamForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "hidden_act": hf_activation(spec.activation),
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.attention_bias,
        "sliding_window": spec.sliding_window or 512, "layer_types": list(spec.layer_types),
        "mlp_layer_types": ["dense" if i in spec.dense_layers else "sparse" for i in range(spec.n_layers)],
        "rope_parameters": {t: ({"rope_type": "default", "rope_theta": spec.rope_by_type[t]}
                                if t in spec.rope_by_type else None) for t in sorted(set(spec.layer_types))},
        "final_logit_softcapping": spec.logit_softcap, "routed_scaling_factor": spec.moe_scale,
        "norm_topk_prob": spec.moe_renormalize, "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
        "dtype": spec.dtype,
    }
    if spec.moe_experts:
        cfg.update(num_experts=spec.moe_experts, num_experts_per_tok=spec.moe_top_k,
                   moe_intermediate_size=spec.moe_width, n_group=spec.moe_groups, topk_group=spec.moe_top_groups)
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """A gated MLP (SwiGLU unless ``act``) whose activation and product run in fp32 (as Beam's)."""

    def __init__(self, hidden: int, width: int, act: Activation | None = None) -> None:
        super().__init__()
        self.act: Activation = F.silu if act is None else act
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        return cast(torch.Tensor, self.down_proj((self.act(gate.float()) * self.up_proj(x).float()).to(gate.dtype)))


class Attention(nn.Module):
    def __init__(self, spec: BeamSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_eps, fp32_scale=True)
        self.k_norm = RMSNorm(d, spec.rms_eps, fp32_scale=True)
        self.gate_proj = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(h))


class Router(nn.Module):
    """DeepSeek-V3's grouped sigmoid router, in fp32 (the correction bias chooses; it does not weigh)."""

    keep_fp32 = True

    def __init__(self, spec: BeamSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.moe_experts, spec.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.moe_experts), requires_grad=False)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k] fp32, expert ids [N, k])``."""
        s = self.spec
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(x.shape[0], s.moe_groups, -1)
        group_idx = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1).topk(s.moe_top_groups, dim=-1)[1]
        keep = torch.zeros(x.shape[0], s.moe_groups, dtype=torch.bool, device=x.device).scatter_(1, group_idx, True)
        choice = choice.masked_fill(~keep[:, :, None].expand_as(grouped).reshape_as(choice), float("-inf"))
        idx = choice.topk(s.moe_top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if s.moe_renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w, idx


class MoE(nn.Module):
    def __init__(self, spec: BeamSpec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width, activation_of(spec)) for _ in range(spec.moe_experts))
        self.scale = spec.moe_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, (self.experts[e](x[tok]) * w[tok, slot, None]).to(out.dtype))
        return out * self.scale


class DecoderLayer(nn.Module):
    def __init__(self, spec: BeamSpec, layer: int) -> None:
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_eps
        self.input_layernorm = RMSNorm(h, eps, fp32_scale=True)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(h, eps, fp32_scale=True)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, fp32_scale=True)
        self.post_feedforward_layernorm = RMSNorm(h, eps, fp32_scale=True)
        self.mlp: nn.Module = (FeedForward(h, spec.intermediate_size, activation_of(spec)) if layer in spec.dense_layers else MoE(spec))


class Backbone(nn.Module):
    def __init__(self, spec: BeamSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=True)


def _residual(out: torch.Tensor, residual: torch.Tensor, k: int) -> torch.Tensor:
    """Beam's depth-scaled residual sum (``k``: the residual add's index, from 2)."""
    return out * (1.0 / math.sqrt(k)) + residual * math.sqrt((k - 1) / k)


class BeamModel(TypedRopeDecoder):
    """Beam's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: BeamSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: BeamSpec = spec
        self._typed_rope(spec)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().head(h).float()
        cap = self.spec.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = cast(Attention, mod.self_attn)
        x = mod.input_layernorm(st.hidden)
        n, h, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        q = attn.q_norm(attn.q_proj(x).view(n, h, d))
        k = attn.k_norm(attn.k_proj(x).view(n, hkv, d))
        kind = spec.layer_types[layer]
        if kind in st.tables:
            cos, sin = st.tables[kind]
            q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
        else:  # (a NoPE layer: its queries scaled by position)
            pos = b.positions.to(q.device, torch.float32)
            scale = torch.exp(_SSMAX_POWER * torch.log1p((pos + 1) / _SSMAX_LENGTH))
            q = (q.float() * scale[:, None, None]).to(q.dtype)
        store_kv(k, attn.v_proj(x).view(n, hkv, d), kv_layer, b.slot_mapping, backend=self.backend)
        if b.is_decode:
            o = paged_decode_attention(q, kv_layer, b.block_tables, b.seq_lens, d ** -0.5, backend=self.backend,
                                       window=self.windows[layer])
        else:
            o = paged_prefill_attention(q, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                        d ** -0.5, backend=self.backend, window=self.windows[layer])
        gate = attn.gate_proj(x).view(n, h, d) + attn.gate_bias[None, :, None]
        out = attn.o_proj((o * torch.sigmoid(gate)).reshape(n, h * d))
        hid = _residual(mod.post_attention_layernorm(out), st.hidden, 2 * (layer + 1))
        mlp = mod.post_feedforward_layernorm(mod.mlp(mod.pre_feedforward_layernorm(hid)))
        st.hidden = _residual(mlp, hid, 2 * (layer + 1) + 1)
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names: transformers' packed experts split (the hub stores them one by
    one, as ours)."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out
