"""Zyphra's ZAYA1 (``ZayaForCausalLM``, model_type ``zaya``), as transformers runs it, over the paged KV pool with
pages that also hold each layer's convolution state.

Every layer attends (``hybrid``: full attention, ``hybrid_sliding``: over ``sliding_window`` positions) with
**Compressed Convolutional Attention** projections:

* ``q_proj`` / ``k_proj``, then both through two stacked causal convolutions over time (a depthwise one of
  ``cca_time0`` taps, then one of ``cca_time1`` taps grouped per head, both with biases), plus residual paths:
  the query's ``(q + k of its KV head) / 2``, the key's the mean of that over the head's group;
* values half from the current token (``v_proj_current``) and half from the previous one (``v_proj_delayed``);
* q and k L2-normalized to ``sqrt(head_dim)``, the keys times a learned ``temp`` per KV head, then partial RoPE (a
  base per layer type).

The residual stream is kept in fp32 (``residual_in_fp32``), the embeddings shifted and scaled first, each half's
output and residual mixed by learned per-channel scales and biases. The MoE routes through an MLP router (``down_proj``
to ``router_hidden_size``, plus the previous layer's router state, then norm, two GELU layers and ``out_proj`` over
the experts and a *skip* class), top-``k`` by softmax plus ``balancing_biases``; choosing the skip class adds nothing.

A layer's state (the convolution's last ``cca_time0 + cca_time1 - 2`` raw q/k inputs and the last delayed value) lives
after its KV rows in its pages (:func:`dualpath.model.state_pages.split_page`), snapshotted at every block end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch, TypedRopeState, _rope
from dualpath.model.moe import activation_of, dispatch_packed
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import split_page

ARCH = "zaya"
KINDS = ("hybrid", "hybrid_sliding")
#: ZayaConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262272, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 128, "moe_intermediate_size": 2048, "num_experts": 16,
    "num_experts_per_tok": 1, "router_hidden_size": 256, "cca_time0": 2, "cca_time1": 2, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": True, "lm_head_bias": False,
    "attention_bias": False, "bos_token_id": 2, "eos_token_id": 106,
}
_ROPE = {"hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
         "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}}


@dataclass(frozen=True)
class ZayaSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (attention heads, ``intermediate_size`` the experts' width) plus ZAYA's fields."""

    both_in_page = True  # (every layer keeps KV rows and a convolution state)
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # type -> (theta, partial factor)
    window: int | None = None
    cca_time0: int = 2
    cca_time1: int = 2
    router_hidden: int = 256
    experts: int = 16
    top_k: int = 1
    lm_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in KINDS for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'hybrid' or 'hybrid_sliding' for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        if "hybrid_sliding" in self.layer_types and not self.window:
            raise ModelError("model config: sliding_window must be set when layer_types has 'hybrid_sliding'")
        if self.head_dim % 2 or self.cca_time0 < 1 or self.cca_time1 < 1:
            raise ModelError(f"model config: head_dim ({self.head_dim}) must be even (values are half current, half "
                             f"delayed) and cca_time0 / cca_time1 positive")
        for t in dict.fromkeys(self.layer_types):
            theta, partial = self.rope_by_type.get(t, (0.0, 0.0))
            if not theta > 0 or not 0 < partial <= 1 or int(self.head_dim * partial) < 2:
                raise ModelError(f"model config: rope_parameters.{t} needs a positive rope_theta and a "
                                 f"partial_rotary_factor in (0, 1], got {theta}, {partial}")
        if not 1 <= self.top_k <= self.experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) must be in [1, num_experts]")

    @property
    def lm_head_bias(self) -> bool:  # type: ignore[override]
        return self.lm_bias

    @property
    def conv_channels(self) -> int:
        return (self.n_heads + self.n_kv_heads) * self.head_dim

    @property
    def conv_taps(self) -> int:
        """Raw q/k inputs a token's convolutions read before it."""
        return self.cca_time0 + self.cca_time1 - 2

    @property
    def state_bytes(self) -> int:
        """fp32: the convolution's last raw inputs ``[channels, taps]`` and the last delayed value."""
        return 4 * (self.conv_channels * self.conv_taps + self.n_kv_heads * self.head_dim // 2)

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.layer_types[layer] == "hybrid_sliding" else None

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["ZayaForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "moe_intermediate_size": self.intermediate_size, "num_experts": self.experts,
            "num_experts_per_tok": self.top_k, "router_hidden_size": self.router_hidden,
            "cca_time0": self.cca_time0, "cca_time1": self.cca_time1, "layer_types": list(self.layer_types),
            "sliding_window": self.window, "hidden_act": hf_activation(self.activation), "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_position, "tie_word_embeddings": self.tie_embeddings,
            "lm_head_bias": self.lm_bias, "attention_bias": self.attention_bias,
            "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
                                for t, (theta, partial) in self.rope_by_type.items()},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> ZayaSpec:
    """The spec of a ZAYA config (its keys over ZayaConfig's defaults; the hub's nested RoPE dict with a stray
    top-level ``rope_type`` read as transformers reads it)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg.get("layer_types") or ["hybrid"] * n
    if not isinstance(types, list) or any(t not in KINDS for t in types):
        raise ModelError(f"{where}: layer_types must list 'hybrid' or 'hybrid_sliding' per layer, got {types!r}")
    rope = cfg.get("rope_parameters") or _ROPE
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be a mapping, got {rope!r}")
    rope_by_type: dict[str, tuple[float, float]] = {}
    for t in dict.fromkeys(types):  # (in the layers' order: the first type at fault is the one named)
        p = rope.get(t)
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: a 'default' RoPE per layer type is supported, got {p!r}")
        partial = {"partial_rotary_factor": p.get("partial_rotary_factor", 1.0)}
        at = f"{where}: rope_parameters.{t}"
        rope_by_type[t] = (cfg_num(p, "rope_theta", at), cfg_num(partial, "partial_rotary_factor", at))
    window = cfg.get("sliding_window")
    return ZayaSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "moe_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=next(iter(rope_by_type.values()))[0], max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(types), rope_by_type=rope_by_type,
        window=None if window is None else cfg_int(cfg, "sliding_window", where),
        cca_time0=cfg_int(cfg, "cca_time0", where), cca_time1=cfg_int(cfg, "cca_time1", where),
        router_hidden=cfg_int(cfg, "router_hidden_size", where), experts=cfg_int(cfg, "num_experts", where),
        top_k=cfg_int(cfg, "num_experts_per_tok", where), lm_bias=bool(cfg["lm_head_bias"]),
    )


# --- modules (the checkpoints' names) ----------------------------------------------------------------------------


class CcaProjection(nn.Module):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__()
        h, d, hq, hkv, bias = spec.hidden_size, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.attention_bias
        c = spec.conv_channels
        self.q_proj = nn.Linear(h, hq * d, bias=bias)
        self.k_proj = nn.Linear(h, hkv * d, bias=bias)
        self.v_proj_current = nn.Linear(h, hkv * d // 2, bias=bias)
        self.v_proj_delayed = nn.Linear(h, hkv * d // 2, bias=bias)
        self.conv_qk_depthwise = nn.Conv1d(c, c, spec.cca_time0, groups=c)
        self.conv_qk_grouped = nn.Conv1d(c, c, spec.cca_time1, groups=hq + hkv)


class QkNorm(nn.Module):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.zeros(spec.n_kv_heads))


class Attention(nn.Module):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__()
        self.qkv_proj = CcaProjection(spec)
        self.qk_norm = QkNorm(spec)
        self.o_proj = nn.Linear(spec.n_heads * spec.head_dim, spec.hidden_size, bias=spec.attention_bias)


class ResidualScaling(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(hidden))
        self.hidden_states_bias = nn.Parameter(torch.zeros(hidden))
        self.residual_scale = nn.Parameter(torch.ones(hidden))
        self.residual_bias = nn.Parameter(torch.zeros(hidden))

    def forward(self, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return (out + self.hidden_states_bias) * self.hidden_states_scale + \
            (residual + self.residual_bias) * self.residual_scale


class RouterMlp(nn.Module):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__()
        r = spec.router_hidden
        self.norm = RMSNorm(r, spec.rms_eps)
        self.fc1 = nn.Linear(r, r, bias=True)
        self.fc2 = nn.Linear(r, r, bias=True)
        self.out_proj = nn.Linear(r, spec.experts + 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.out_proj(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x)))))))


class Router(nn.Module):
    def __init__(self, spec: ZayaSpec, layer: int) -> None:
        super().__init__()
        self.down_proj = nn.Linear(spec.hidden_size, spec.router_hidden, bias=True)
        if layer:  # (the previous layer's router state joins from the second layer on)
            self.router_states_scale = nn.Parameter(torch.ones(spec.router_hidden))
        self.router_mlp = RouterMlp(spec)
        bias = torch.zeros(spec.experts + 1)
        bias[-1] = -1.0
        self.balancing_biases = nn.Parameter(bias)
        self.experts, self.k, self.first = spec.experts, spec.top_k, layer == 0


class Experts(nn.Module):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(spec.experts, 2 * spec.intermediate_size, spec.hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(spec.experts, spec.hidden_size, spec.intermediate_size))


class Moe(nn.Module):
    def __init__(self, spec: ZayaSpec, layer: int) -> None:
        super().__init__()
        self.gate = Router(spec, layer)
        self.experts = Experts(spec)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ZayaSpec, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = Moe(spec, layer)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.post_attention_residual_scale = ResidualScaling(spec.hidden_size)
        self.post_mlp_residual_scale = ResidualScaling(spec.hidden_size)


class ZayaBackbone(Backbone):
    def __init__(self, spec: ZayaSpec) -> None:
        super().__init__(spec, lambda i: DecoderLayer(spec, i))
        self.input_hidden_states_scale = nn.Parameter(torch.ones(spec.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(spec.hidden_size))


@dataclass
class ZayaState(TypedRopeState):
    """:class:`TypedRopeState` plus the router state each layer passes to the next."""

    router: torch.Tensor | None = None


class ZayaModel(HybridDecoder):
    """ZAYA1 (module docstring) over a paged KV pool whose pages also hold each layer's convolution state."""

    def __init__(self, spec: ZayaSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, ZayaBackbone(spec), device, backend)
        self.spec: ZayaSpec = spec

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        st = cast(TypedRopeState, super().prefill_begin(batch))
        m = self.model
        h = ((st.hidden + m.input_hidden_states_bias) * m.input_hidden_states_scale).float()
        return ZayaState(batch=st.batch, hidden=h, cos=st.cos, sin=st.sin, tables=st.tables)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self.model.norm(h.to(self.spec.torch_dtype))).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        zs, blk = cast(ZayaState, st), cast(DecoderLayer, mod)
        spec, dt = self.spec, self.spec.torch_dtype
        kv, conv_pages, rec_pages = split_page(kv_layer, spec.n_kv_heads, spec.head_dim, spec.conv_channels,
                                               spec.conv_taps + 1, 1, 1, spec.n_kv_heads * spec.head_dim // 2)
        residual = zs.hidden
        x = blk.input_layernorm(residual.to(dt))
        out = self._attention(layer, blk.self_attn, x, zs, kv, conv_pages, rec_pages.flatten(1))
        residual = blk.post_attention_residual_scale(out, residual)
        x = blk.post_attention_layernorm(residual.to(dt))
        zs.hidden = blk.post_mlp_residual_scale(self._moe(blk.mlp, x, zs), residual)
        state.next_layer += 1

    def _attention(self, layer: int, attn: Attention, x: torch.Tensor, st: ZayaState, kv: torch.Tensor,
                   conv_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
        spec, b, p = self.spec, st.batch, attn.qkv_proj
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        groups = hq // hkv
        q, k = p.q_proj(x), p.k_proj(x)
        q_res = (q.view(n, hq, d) + k.view(n, hkv, d).repeat_interleave(groups, dim=1)) * 0.5
        k_res = q_res.view(n, hkv, groups, d).mean(dim=2)
        qk = torch.cat((q, k), dim=-1)
        vd = p.v_proj_delayed(x)
        mixed = torch.empty_like(qk)
        v_prev = torch.empty_like(vd)
        taps, bt = spec.conv_taps, b.block_tokens
        cu, starts, tables = b.cu_seqlens_q.tolist(), b.start_pos.tolist(), b.block_tables.tolist()
        snaps: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, start in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            if start == 0:
                conv0 = qk.new_zeros(qk.shape[1], taps)
                v0 = p.v_proj_delayed(x.new_zeros(1, x.shape[1]))[0]
            else:
                page = tables[i][(start - 1) // bt]
                conv0, v0 = conv_pages[page].to(qk.dtype), v_pages[page].to(vd.dtype)
            ext = torch.cat((conv0, qk[r0:r1].t()), dim=1)  # [C, taps + L]
            y = F.conv1d(ext[None], p.conv_qk_depthwise.weight, p.conv_qk_depthwise.bias,
                         groups=p.conv_qk_depthwise.groups)
            y = F.conv1d(y, p.conv_qk_grouped.weight, p.conv_qk_grouped.bias, groups=p.conv_qk_grouped.groups)[0]
            mixed[r0:r1] = y.t()
            v_prev[r0] = v0
            v_prev[r0 + 1:r1] = vd[r0:r1 - 1]
            for t in range(r1 - r0):
                if (start + t + 1) % bt == 0 or t == r1 - r0 - 1:
                    snaps.append((tables[i][(start + t) // bt], ext[:, t + 1:t + 1 + taps], vd[r0 + t]))
        for page, conv_state, v_last in snaps:  # (after every read: a page written here may be read above)
            conv_pages[page] = conv_state.float()
            v_pages[page] = v_last.float()
        query = mixed[:, :hq * d].view(n, hq, d) + q_res
        key = mixed[:, hq * d:].view(n, hkv, d) + k_res
        eps = torch.finfo(query.dtype).eps
        query = query * (d ** 0.5 / query.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        key = key * (d ** 0.5 / key.norm(p=2, dim=-1, keepdim=True).clamp_min(eps))
        key = key * attn.qk_norm.temp[None, :, None]
        cos, sin = st.tables[spec.layer_types[layer]]
        query, key = _rope(query, cos[:, None, :], sin[:, None, :]), _rope(key, cos[:, None, :], sin[:, None, :])
        value = torch.cat((p.v_proj_current(x), v_prev), dim=-1).view(n, hkv, d)
        o = self.attend(query, key, value, kv, b, d ** -0.5, window=self.windows[layer])
        return cast(torch.Tensor, attn.o_proj(o.reshape(n, hq * d)))

    def _moe(self, moe: Moe, x: torch.Tensor, st: ZayaState) -> torch.Tensor:
        gate = moe.gate
        r = gate.down_proj(x)
        if not gate.first and st.router is not None:
            r = r + st.router * gate.router_states_scale
        st.router = r
        probs = torch.softmax(gate.router_mlp(r), dim=-1)
        idx = torch.topk(probs.float() + gate.balancing_biases, gate.k, dim=-1).indices
        w = probs.gather(1, idx)
        skip = idx == gate.experts  # (the skip class: no expert, nothing added)
        w, idx = w.masked_fill(skip, 0), idx.masked_fill(skip, 0)
        ex = moe.experts
        return dispatch_packed(x, idx, w, ex.gate_up_proj, ex.down_proj, act=activation_of(self.spec))


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as ours (the same names; rotary buffers left out)."""
    return {k: v for k, v in tensors.items() if "rotary_emb." not in k}
