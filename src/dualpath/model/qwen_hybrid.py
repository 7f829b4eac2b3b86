"""Qwen's hybrid decoders, as transformers runs them, over the paged KV pool: Qwen3.5 (``Qwen3_5ForCausalLM``,
model_type ``qwen3_5_text``; the language model of ``Qwen3_5ForConditionalGeneration``), Qwen3.5-MoE
(``qwen3_5_moe_text``) and Qwen3-Next (``Qwen3NextForCausalLM``, ``qwen3_next``).

Three of every four layers (``layer_types``) are **linear attention** (Gated DeltaNet: :mod:`dualpath.model.gated_delta`),
the others **gated full attention**:

* linear layers: ``in_proj_qkv`` -> a causal depthwise convolution of width ``linear_conv_kernel_dim`` and SiLU ->
  q, k (``linear_num_key_heads`` x ``linear_key_head_dim``, L2-normalized, each serving ``Hv / Hk`` value heads) and
  v (``linear_num_value_heads`` x ``linear_value_head_dim``); decay ``g = -exp(A_log) * softplus(a + dt_bias)``,
  rate ``beta = sigmoid(b)``; the output RMS-normalized per head, times ``silu(z)``, then ``out_proj``. Their state
  lives in the layer's pages (state pages: :attr:`KVSpec.state_pages`), so storage, the PE -> DE transfer and the
  next turn's hit carry it like keys and values. Qwen3-Next's checkpoints pack q, k, v, z (and b, a) per key head
  (``in_proj_qkvz``, ``in_proj_ba``); they are read into Qwen3.5's four projections and written back packed;
* attention layers: ``q_proj`` gives each head's query and an output gate (``sigmoid``), per-head q/k RMS norms,
  RoPE on the first ``partial_rotary_factor`` of each head (M-RoPE over text is this RoPE), GQA;
* every norm scales by ``1 + weight`` (in fp32); the MLP is SwiGLU, or (MoE, Qwen3-Next's sparse layers) a softmax
  top-k router over experts plus a shared expert gated by ``sigmoid(shared_expert_gate(x))``.

A state page must hold the layer's state (4 x (conv channels x (kernel - 1) + Hv x Dk x Dv) bytes), so the page's
row is widened to it: :meth:`HybridSpec.paged_kv_spec` for the deployment's block size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.archs import HYBRID_HF_ARCH
from dualpath.model.gated_delta import delta_segment, delta_step, l2norm
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch, _rope
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts, softmax_topk
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import (
    ConvAct,
    decode_states,
    scan_sequences,
    state_bytes,
    state_views,
)

HF_ARCH = HYBRID_HF_ARCH
ARCHS = tuple(HF_ARCH)
TYPES = ("linear_attention", "full_attention")
#: the configs' defaults (Qwen3_5TextConfig; Qwen3NextConfig and Qwen3_5MoeTextConfig differ where listed)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32,
}
_MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3_next": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
                   "num_key_value_heads": 2, "decoder_sparse_step": 1, "moe_intermediate_size": 512,
                   "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10, "num_experts": 512,
                   "norm_topk_prob": True},
    "qwen3_5_moe_text": {"hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
                         "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                         "num_experts_per_tok": 8, "num_experts": 256},
}
_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class HybridSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (its attention layers' shape) plus the linear layers' and the MoE's fields."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # full_attention -> (theta, partial)
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 0
    moe_layers: tuple[int, ...] = ()  # layers whose MLP is the MoE block
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    moe_renormalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'linear_attention' or 'full_attention' for each of "
                             f"the {n} layers, got {list(self.layer_types)}")
        for name in ("lin_k_heads", "lin_v_heads", "lin_k_dim", "lin_v_dim"):
            if getattr(self, name) <= 0:
                raise ModelError(f"model config: the linear layers' {name} must be positive")
        if self.lin_v_heads % self.lin_k_heads:
            raise ModelError(f"model config: linear_num_value_heads ({self.lin_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.lin_k_heads})")
        if self.conv_kernel < 1:
            raise ModelError(f"model config: linear_conv_kernel_dim must be >= 1, got {self.conv_kernel}")
        if "full_attention" in self.layer_types:
            theta, partial = self.rope_by_type.get("full_attention", (0.0, 0.0))
            if not theta > 0 or not 0 < partial <= 1 or int(self.head_dim * partial) < 2:
                raise ModelError(f"model config: rope_parameters needs a positive rope_theta and a "
                                 f"partial_rotary_factor in (0, 1], got {theta}, {partial}")
        if self.moe_layers and not (0 < self.moe_top_k <= self.moe_experts and self.moe_width > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"num_experts ({self.moe_experts}) and a positive moe_intermediate_size")

    @property
    def conv_dim(self) -> int:
        return 2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim

    @property
    def state_bytes(self) -> int:
        """Bytes of one linear layer's state (what its page must hold)."""
        return state_bytes(self.conv_dim, self.conv_kernel, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------


def spec_from_config(arch: str, cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> HybridSpec:
    """The spec of a Qwen3.5 / Qwen3.5-MoE / Qwen3-Next text config (its keys over the config class' defaults)."""
    cfg = {**DEFAULTS, **_MOE_DEFAULTS.get(arch, {}), **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (the MLPs', the experts' and the Gated DeltaNet convolutions')
    n = cfg_int(cfg, "num_hidden_layers", where)
    interval = cfg_int({"full_attention_interval": cfg.get("full_attention_interval", 4)},
                       "full_attention_interval", where)
    default = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n)]
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where, default)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {arch}, got {rope!r}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", _ROPE_THETA))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    rope_by_type = {"full_attention": (cfg_num({"rope_theta": theta}, "rope_theta", where),
                                       cfg_num({"partial_rotary_factor": partial}, "partial_rotary_factor", where))}
    moe: dict[str, Any] = {}
    if arch != "qwen3_5_text":
        step = cfg_int(cfg, "decoder_sparse_step", where) if arch == "qwen3_next" else 1
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            raise ModelError(f"{where}: mlp_only_layers must be a list of layer indices, got {only!r}")
        experts = cfg_int(cfg, "num_experts", where, minimum=0)
        layers = tuple(i for i in range(n) if experts > 0 and i not in only and (i + 1) % step == 0)
        moe = {"moe_layers": layers, "moe_experts": experts,
               "moe_top_k": cfg_int(cfg, "num_experts_per_tok", where),
               "moe_width": cfg_int(cfg, "moe_intermediate_size", where),
               "shared_width": cfg_int(cfg, "shared_expert_intermediate_size", where, minimum=0),
               "moe_renormalize": bool(cfg.get("norm_topk_prob", True))}
    return HybridSpec(
        architecture=arch, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=rope_by_type["full_attention"][0], max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(types), rope_by_type=rope_by_type,
        lin_k_heads=cfg_int(cfg, "linear_num_key_heads", where), lin_v_heads=cfg_int(cfg, "linear_num_value_heads", where),
        lin_k_dim=cfg_int(cfg, "linear_key_head_dim", where), lin_v_dim=cfg_int(cfg, "linear_value_head_dim", where),
        conv_kernel=cfg_int(cfg, "linear_conv_kernel_dim", where), **moe,
    )


def hf_config(spec: HybridSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    theta, partial = spec.rope_by_type.get("full_attention", (_ROPE_THETA, 0.25))
    cfg: dict[str, Any] = {
        "architectures": [HF_ARCH[spec.architecture]], "model_type": spec.architecture,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "hidden_act": hf_activation(spec.activation),
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.attention_bias,
        "layer_types": list(spec.layer_types), "linear_conv_kernel_dim": spec.conv_kernel,
        "linear_key_head_dim": spec.lin_k_dim, "linear_value_head_dim": spec.lin_v_dim,
        "linear_num_key_heads": spec.lin_k_heads, "linear_num_value_heads": spec.lin_v_heads,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial},
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
    }
    if spec.architecture != "qwen3_5_text":
        cfg.update(num_experts=spec.moe_experts, num_experts_per_tok=spec.moe_top_k,
                   moe_intermediate_size=spec.moe_width, shared_expert_intermediate_size=spec.shared_width)
        if spec.architecture == "qwen3_next":
            cfg.update(norm_topk_prob=spec.moe_renormalize, decoder_sparse_step=1,
                       mlp_only_layers=[i for i in range(spec.n_layers) if i not in spec.moe_layers])
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """Per-head RMS norm of the linear layers' output, times ``weight`` (rounded to the input's dtype), times
    ``act(gate)`` in fp32 (as transformers' ``RMSNormGated``; ``act`` SiLU, or Qwen4-Exp's ``output_gate_type``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.act: Any = F.silu

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(dt) * self.act(gate.float())).to(dt)


class GatedDeltaNet(nn.Module):
    """A linear-attention layer over state pages (:mod:`dualpath.model.gated_delta`)."""

    def __init__(self, spec: HybridSpec) -> None:
        super().__init__()
        self.hk, self.hv, self.dk, self.dv = spec.lin_k_heads, spec.lin_v_heads, spec.lin_k_dim, spec.lin_v_dim
        self.kernel, key_dim, value_dim = spec.conv_kernel, spec.lin_k_heads * spec.lin_k_dim, spec.lin_v_heads * spec.lin_v_dim
        self.conv_dim = spec.conv_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False,
                                padding=self.kernel - 1)
        conv_act = activation_of(spec)  # (the convolution's: hidden_act; the output gate stays SiLU)
        self.conv_act: ConvAct = True if conv_act is None else conv_act
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, spec.rms_eps)
        self.out_proj = nn.Linear(value_dim, spec.hidden_size, bias=False)
        self.in_proj_qkv = nn.Linear(spec.hidden_size, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = nn.Linear(spec.hidden_size, value_dim, bias=False)
        self.in_proj_b = nn.Linear(spec.hidden_size, self.hv, bias=False)
        self.in_proj_a = nn.Linear(spec.hidden_size, self.hv, bias=False)
        self.beta_scale = 1.0  # (OLMo Hybrid's linear_allow_neg_eigval: 2)

    def _qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved ``[L, C]`` -> fp32 ``q, k [L, Hv, Dk]`` (normalized, q scaled; key heads repeated) and
        ``v [L, Hv, Dv]``."""
        n, kd = mixed.shape[0], self.hk * self.dk
        q, k, v = mixed.split((kd, kd, self.hv * self.dv), dim=-1)
        rep = self.hv // self.hk
        q = l2norm(q.reshape(n, self.hk, self.dk).float()).repeat_interleave(rep, dim=1) * self.dk ** -0.5
        k = l2norm(k.reshape(n, self.hk, self.dk).float()).repeat_interleave(rep, dim=1)
        return q, k, v.reshape(n, self.hv, self.dv).float()

    def forward(self, x: torch.Tensor, batch: SeqBatch, kv_layer: torch.Tensor) -> torch.Tensor:
        conv_pages, rec_pages = state_views(kv_layer, self.conv_dim, self.kernel, self.hv, self.dk, self.dv)
        mixed = self.in_proj_qkv(x)
        beta = (self.in_proj_b(x).sigmoid() * self.beta_scale).float()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
        weight = self.conv1d.weight[:, 0]
        if batch.is_decode:
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, mixed, weight, None, self.conv_act)
            q, k, v = self._qkv(conv)
            core, s1 = delta_step(q, k, v, g, beta, s0)
            commit(s1)
        else:
            core = torch.empty(x.shape[0], self.hv, self.dv, dtype=torch.float32, device=x.device)

            def run(conv: torch.Tensor, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
                q, k, v = self._qkv(conv)
                o, s = delta_segment(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g[a:b].t(),
                                     beta[a:b].t(), s)
                core[a:b] = o.transpose(0, 1)
                return s

            scan_sequences(batch, conv_pages, rec_pages, mixed, weight, None, run, self.conv_act)
        out = self.norm(core.to(x.dtype).reshape(-1, self.dv), self.in_proj_z(x).reshape(-1, self.dv))
        return cast(torch.Tensor, self.out_proj(out.reshape(x.shape[0], -1)))


class Attention(nn.Module):
    """Gated full attention: each head's query and output gate from ``q_proj``; per-head q/k norms."""

    def __init__(self, spec: HybridSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, 2 * h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_eps, offset=True)
        self.k_norm = RMSNorm(d, spec.rms_eps, offset=True)


class MoE(nn.Module):
    """Softmax top-k experts plus a shared expert gated by ``sigmoid(shared_expert_gate(x))`` (always there, as
    transformers builds it: a ``shared_expert_intermediate_size`` of 0 gives zero-width tensors and adds nothing)."""

    def __init__(self, spec: HybridSpec) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.hidden_size, spec.moe_experts, bias=False)
        act = activation_of(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width, act=act)
                                     for _ in range(spec.moe_experts))
        self.shared_expert = FeedForward(spec.hidden_size, spec.shared_width, act=act)
        self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)
        self.k, self.renormalize = spec.moe_top_k, spec.moe_renormalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        idx, w = softmax_topk(logits, self.k, self.renormalize)
        out = dispatch_experts(x, idx, w.to(logits.dtype), self.experts)
        return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, spec: HybridSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, offset=True)
        if spec.layer_types[layer] == "linear_attention":
            self.linear_attn = GatedDeltaNet(spec)
        else:
            self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, offset=True)
        self.mlp: nn.Module = (MoE(spec) if layer in spec.moe_layers
                               else FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)))



class HybridModel(HybridDecoder):
    """Qwen3.5 / Qwen3.5-MoE / Qwen3-Next (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: HybridSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        norm = RMSNorm(spec.hidden_size, spec.rms_eps, offset=True)
        self._setup(spec, Backbone(spec, lambda i: DecoderLayer(spec, i), norm), device, backend)
        self.spec: HybridSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        x = mod.input_layernorm(st.hidden)
        if spec.layer_types[layer] == "linear_attention":
            h = st.hidden + cast(GatedDeltaNet, mod.linear_attn)(x, b, kv_layer)
        else:
            attn = cast(Attention, mod.self_attn)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            q, gate = attn.q_proj(x).view(n, hq, 2 * d).chunk(2, dim=-1)
            cos, sin = st.tables["full_attention"]
            cos, sin = cos[:, None, :], sin[:, None, :]
            q = _rope(attn.q_norm(q), cos, sin)
            k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5)
            o = o.reshape(n, hq * d) * torch.sigmoid(gate.reshape(n, hq * d))
            h = st.hidden + attn.o_proj(o)
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(spec: HybridSpec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names: Qwen3-Next's packed ``in_proj_qkvz`` / ``in_proj_ba`` split into
    Qwen3.5's four projections, transformers' packed experts split per expert; the multi-token-prediction head
    (``mtp.*``, which transformers does not load either) left out."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    hk, hv, dk, dv = spec.lin_k_heads, spec.lin_v_heads, spec.lin_k_dim, spec.lin_v_dim
    r = hv // hk
    for name, t in tensors.items():
        if name.startswith("mtp."):
            continue
        if name.endswith(".linear_attn.in_proj_qkvz.weight"):
            base = name[: -len("in_proj_qkvz.weight")]
            if t.dim() != 2 or t.shape[0] != hk * (2 * dk + 2 * r * dv):
                raise ModelError(f"{source}: {name} has shape {tuple(t.shape)}, expected "
                                 f"[{hk * (2 * dk + 2 * r * dv)}, hidden]")
            q, k, v, z = t.view(hk, 2 * dk + 2 * r * dv, -1).split((dk, dk, r * dv, r * dv), dim=1)
            out[base + "in_proj_qkv.weight"] = torch.cat([p.reshape(-1, t.shape[1]) for p in (q, k, v)])
            out[base + "in_proj_z.weight"] = z.reshape(-1, t.shape[1])
        elif name.endswith(".linear_attn.in_proj_ba.weight"):
            base = name[: -len("in_proj_ba.weight")]
            if t.dim() != 2 or t.shape[0] != 2 * hv:
                raise ModelError(f"{source}: {name} has shape {tuple(t.shape)}, expected [{2 * hv}, hidden]")
            bb, a = t.view(hk, 2 * r, -1).split((r, r), dim=1)
            out[base + "in_proj_b.weight"] = bb.reshape(hv, -1)
            out[base + "in_proj_a.weight"] = a.reshape(hv, -1)
        elif not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def tensors_out(spec: HybridSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint's names (Qwen3-Next: q, k, v, z and b, a packed per key head again)."""
    if spec.architecture != "qwen3_next":
        return dict(tensors)
    hk, hv, dk, dv = spec.lin_k_heads, spec.lin_v_heads, spec.lin_k_dim, spec.lin_v_dim
    r = hv // hk
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".linear_attn.in_proj_qkv.weight"):
            base = name[: -len("in_proj_qkv.weight")]
            q, k, v = t.split((hk * dk, hk * dk, hv * dv))
            z = tensors[base + "in_proj_z.weight"]
            parts = [p.reshape(hk, -1, t.shape[1]) for p in (q, k, v, z)]
            out[base + "in_proj_qkvz.weight"] = torch.cat(parts, dim=1).reshape(-1, t.shape[1])
        elif name.endswith(".linear_attn.in_proj_b.weight"):
            base = name[: -len("in_proj_b.weight")]
            a = tensors[base + "in_proj_a.weight"]
            out[base + "in_proj_ba.weight"] = torch.cat(
                (t.reshape(hk, r, -1), a.reshape(hk, r, -1)), dim=1).reshape(2 * hv, -1)
        elif not name.endswith((".linear_attn.in_proj_z.weight", ".linear_attn.in_proj_a.weight")):
            out[name] = t
    return out
