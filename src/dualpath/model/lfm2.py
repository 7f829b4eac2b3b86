"""Liquid AI's LFM2 (``Lfm2ForCausalLM``, model_type ``lfm2``; also the language model of ``Lfm2VlForConditionalGeneration``)
and LFM2-MoE (``Lfm2MoeForCausalLM``, ``lfm2_moe``), as transformers runs them, over the paged KV pool with state pages.

Layers (``layer_types``, else ``full_attn_idxs``) are gated short convolutions (``conv``: ``in_proj`` to ``B``,
``C``, ``x``; ``C * conv(B * x)`` through a causal depthwise convolution of ``conv_L_cache`` taps, no activation;
``out_proj``) or attention (per-head q/k RMS norms, RoPE, ``out_proj``), each followed by a SwiGLU (``w1``, ``w3``,
``w2``; its width from ``intermediate_size`` as transformers derives it with ``block_auto_adjust_ff_dim``). A
convolution layer's only state is its last ``conv_L_cache - 1`` inputs, kept in its pages
(:mod:`dualpath.model.state_pages`). The final norm is ``embedding_norm``. LFM2-MoE: its first ``num_dense_layers``
feed-forwards are SwiGLUs of ``intermediate_size``, the others experts chosen by sigmoid scores plus an
``expert_bias`` (``use_expert_bias``), weighted by the scores (renormalized with ``norm_topk_prob``, times
``routed_scaling_factor``).

LFM3 (``Lfm3ForCausalLM``, ``lfm3``): LFM2's convolution layers beside full attention and sliding attention
(``sliding_attention`` over the last ``sliding_window`` positions), a RoPE per attention type (by default RoPE base
10,000 for the sliding layers, and a ``proportional`` one for the full layers: the first ``partial_rotary_factor`` of
each head's frequency pairs turn, the rest keep frequency 0), applied in fp32; Qwen3's attention names (``q_norm``,
``k_norm``, ``o_proj``, biases by ``attention_bias``) with each head's output times ``sigmoid(gate_proj(x))``
(``use_attention_gate``); RMS norms on each operator's and feed-forward's output (``use_sandwich_norm``); the SwiGLU
``intermediate_size`` wide as configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view, rope_inv_freq
from dualpath.model.hybrid import HybridDecoder, NormedAttention, StatePagesSpec
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch, TypedRopeState, _rope, rope_tables
from dualpath.model.moe import Activation
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import (
    decode_states,
    scan_sequences,
    state_bytes,
    state_views,
)

ARCH = "lfm2"
MOE_ARCH = "lfm2_moe"
ARCH3 = "lfm3"
#: the layer kinds LFM3 has (LFM2: conv and full_attention)
KINDS3 = ("conv", "full_attention", "sliding_attention")
#: Lfm2Config's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128000, "norm_eps": 1e-5,
    "tie_word_embeddings": True, "conv_bias": False, "conv_L_cache": 3, "block_multiple_of": 256,
    "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True, "bos_token_id": 1, "eos_token_id": 2,
}


@dataclass(frozen=True)
class Lfm2Spec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (``intermediate_size``: the SwiGLU's width as built) plus the layer kinds and the
    convolutions' fields."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)
    conv_taps: int = 3
    conv_bias: bool = False
    ff_config: tuple[int, bool, float | None, int] = (0, True, 1.0, 256)  # (intermediate_size as configured, ...)
    dense_layers: int = 0  # LFM2-MoE: the first layers' feed-forwards are dense, the others' experts
    experts: int = 0
    top_k: int = 0
    moe_width: int = 0
    expert_bias: bool = True
    renormalize: bool = True
    routed_scale: float = 1.0
    window: int | None = None  # LFM3: its sliding_attention layers' window
    proportional: tuple[str, ...] = ()  # LFM3: the attention types whose RoPE is proportional
    sandwich: bool = False  # LFM3: RMS norms on each operator's and feed-forward's output
    attn_gate: bool = False  # LFM3: each head's output times sigmoid(gate_proj(x))

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "proportional", tuple(self.proportional))
        kinds = KINDS3 if self.architecture == ARCH3 else ("conv", "full_attention")
        if len(self.layer_types) != self.n_layers or any(t not in kinds for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name one of {list(kinds)} for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        if "sliding_attention" in self.layer_types and not (isinstance(self.window, int) and self.window > 0):
            raise ModelError(f"model config: sliding_attention layers need a positive sliding_window, got {self.window}")
        if self.conv_taps < 1:
            raise ModelError(f"model config: conv_L_cache must be >= 1, got {self.conv_taps}")
        if self.architecture == MOE_ARCH and self.dense_layers < self.n_layers and not (
                0 < self.top_k <= self.experts and self.moe_width > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.top_k}) <= "
                             f"num_experts ({self.experts}) and a positive moe_intermediate_size")

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.hidden_size, self.conv_taps, 0, 1, 1)

    def layer_window(self, layer: int) -> int | None:
        """LFM3's sliding layers' window (None for every other layer)."""
        return self.window if self.layer_types[layer] == "sliding_attention" else None

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


def ff_width(configured: int, auto: bool, multiplier: float | None, multiple: int) -> int:
    """The SwiGLU's width as transformers builds it from ``intermediate_size`` (``block_auto_adjust_ff_dim``: two
    thirds, times ``block_ffn_dim_multiplier``, rounded up to ``block_multiple_of``)."""
    if not auto:
        return configured
    width = int(2 * configured / 3)
    if multiplier is not None:
        width = int(multiplier * width)
        width = multiple * ((width + multiple - 1) // multiple)
    return width


# --- config in and out ---------------------------------------------------------------------------------------


#: Lfm2MoeConfig's defaults, where they differ
MOE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 7168, "block_auto_adjust_ff_dim": False, "moe_intermediate_size": 1792,
    "num_dense_layers": 2, "num_experts_per_tok": 4, "num_experts": 32, "use_expert_bias": True,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True,
}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None, arch: str = ARCH) -> Lfm2Spec:
    """The spec of an LFM2 / LFM2-MoE config (its keys over the config class' defaults; ``block_ff_dim`` and
    ``tie_embedding`` as transformers reads them)."""
    moe = arch == MOE_ARCH
    if moe and cfg.get("block_auto_adjust_ff_dim"):
        raise ModelError(f"{where}: block_auto_adjust_ff_dim is LFM2's; LFM2-MoE's dense width is intermediate_size")
    cfg = {**DEFAULTS, **(MOE_DEFAULTS if moe else {}),
           **{k: v for k, v in cfg.items() if v is not None or k == "block_ffn_dim_multiplier"}}
    if "block_ff_dim" in cfg:
        cfg["intermediate_size"] = cfg.pop("block_ff_dim")
    if "tie_embedding" in cfg:
        cfg["tie_word_embeddings"] = cfg.pop("tie_embedding")
    n = cfg_int(cfg, "num_hidden_layers", where)
    kinds = cfg.get("layer_types")
    if kinds is None:
        idxs = cfg.get("full_attn_idxs")
        idxs = list(range(n)) if idxs is None else idxs
        if not isinstance(idxs, list):
            raise ModelError(f"{where}: full_attn_idxs must be a list of layer indices, got {idxs!r}")
        kinds = ["full_attention" if i in idxs else "conv" for i in range(n)]
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in ("conv", "full_attention") for k in kinds):
        raise ModelError(f"{where}: layer_types must name 'conv' or 'full_attention' for each of the {n} layers, got "
                         f"{kinds!r}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 1000000.0))
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    mult = cfg.get("block_ffn_dim_multiplier")
    ff = (cfg_int(cfg, "intermediate_size", where), bool(cfg["block_auto_adjust_ff_dim"]),
          None if mult is None else float(mult), cfg_int(cfg, "block_multiple_of", where))
    moe_fields: dict[str, Any] = {}
    if moe:
        moe_fields = {"dense_layers": cfg_int(cfg, "num_dense_layers", where, minimum=0),
                      "experts": cfg_int(cfg, "num_experts", where), "top_k": cfg_int(cfg, "num_experts_per_tok", where),
                      "moe_width": cfg_int(cfg, "moe_intermediate_size", where),
                      "expert_bias": bool(cfg["use_expert_bias"]), "renormalize": bool(cfg["norm_topk_prob"]),
                      "routed_scale": cfg_num(cfg, "routed_scaling_factor", where)}
    return Lfm2Spec(
        architecture=arch, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=ff_width(*ff), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where),
        rms_eps=cfg_num(cfg, "norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple(kinds), rope_by_type={"full_attention": (cfg_num({"t": theta}, "t", where), 1.0)},
        conv_taps=cfg_int(cfg, "conv_L_cache", where), conv_bias=bool(cfg["conv_bias"]), ff_config=ff, **moe_fields,
    )


#: Lfm3Config's defaults, where they differ from LFM2's
LFM3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000, "hidden_size": 2048, "intermediate_size": 7680, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "conv_L_cache": 7, "sliding_window": 256,
    "use_sandwich_norm": True, "use_attention_gate": True, "attention_bias": False, "bos_token_id": 124894,
    "eos_token_id": 124900,
}
_LFM3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5}}


def lfm3_spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                          max_context: int | None = None) -> Lfm2Spec:
    """The spec of an LFM3 config (its keys over Lfm3Config's defaults; ``rms_norm_eps`` read as ``norm_eps``; a
    RoPE object per attention type the layers have)."""
    cfg = {**DEFAULTS, **LFM3_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "sliding_window"}}
    if "rms_norm_eps" in cfg:
        cfg["norm_eps"] = cfg.pop("rms_norm_eps")
    n = cfg_int(cfg, "num_hidden_layers", where)
    default = ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
               for i in range(n)]
    kinds = cfg_kinds(cfg, "layer_types", n, KINDS3, where, default)
    rope = cfg.get("rope_parameters") or _LFM3_ROPE
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object, got {rope!r}")
    per_type = rope  # (one object per attention type: transformers' Lfm3 reads no other form)
    rope_by_type: dict[str, tuple[float, float]] = {}
    proportional: list[str] = []
    for kind in ("full_attention", "sliding_attention"):
        if kind not in kinds:
            continue
        p = per_type.get(kind)
        if not isinstance(p, dict):
            raise ModelError(f"{where}: rope_parameters needs an object for {kind!r}, got {p!r}")
        rtype = p.get("rope_type", p.get("type", "default"))
        if rtype not in ("default", "proportional") or p.get("factor", 1.0) != 1.0:
            raise ModelError(f"{where}: rope_parameters.{kind}: only a 'default' or 'proportional' RoPE without "
                             f"a factor is supported for {ARCH3}, got {p!r}")
        partial = p.get("partial_rotary_factor", 1.0) if rtype == "proportional" else 1.0
        rope_by_type[kind] = (cfg_num(p, "rope_theta", where), cfg_num({"partial_rotary_factor": partial},
                                                                       "partial_rotary_factor", where))
        if rtype == "proportional":
            proportional.append(kind)
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    window = cfg.get("sliding_window")
    return Lfm2Spec(
        architecture=ARCH3, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where),
        rms_eps=cfg_num(cfg, "norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(kinds), rope_by_type=rope_by_type,
        conv_taps=cfg_int(cfg, "conv_L_cache", where), conv_bias=bool(cfg["conv_bias"]),
        ff_config=(cfg_int(cfg, "intermediate_size", where), False, None, 1),
        window=window if "sliding_attention" in kinds else None, proportional=tuple(proportional),
        sandwich=bool(cfg["use_sandwich_norm"]), attn_gate=bool(cfg["use_attention_gate"]),
    )


def hf_config(spec: Lfm2Spec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    if spec.architecture == ARCH3:
        return {
            "architectures": ["Lfm3ForCausalLM"], "model_type": ARCH3, "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
            "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position, "norm_eps": spec.rms_eps,
            "tie_word_embeddings": spec.tie_embeddings, "conv_bias": spec.conv_bias, "conv_L_cache": spec.conv_taps,
            "layer_types": list(spec.layer_types), "sliding_window": spec.window if spec.window else 256,
            "use_sandwich_norm": spec.sandwich, "use_attention_gate": spec.attn_gate,
            "attention_bias": spec.attention_bias, "bos_token_id": spec.bos_token_id,
            "eos_token_id": spec.eos_token_id, "dtype": spec.dtype, "pad_token_id": None,
            "rope_parameters": {kind: {"rope_type": "proportional", "rope_theta": theta, "partial_rotary_factor": part}
                                if kind in spec.proportional else {"rope_type": "default", "rope_theta": theta}
                                for kind, (theta, part) in spec.rope_by_type.items()} or _LFM3_ROPE,
        }
    configured, auto, mult, multiple = spec.ff_config
    cfg: dict[str, Any] = {
        "architectures": ["Lfm2MoeForCausalLM" if spec.architecture == MOE_ARCH else "Lfm2ForCausalLM"],
        "model_type": spec.architecture, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": configured, "block_auto_adjust_ff_dim": auto,
        "block_ffn_dim_multiplier": mult, "block_multiple_of": multiple, "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
        "max_position_embeddings": spec.max_position, "norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "conv_bias": spec.conv_bias, "conv_L_cache": spec.conv_taps,
        "layer_types": list(spec.layer_types), "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_by_type["full_attention"][0]},
        "dtype": spec.dtype,
    }
    if spec.architecture == MOE_ARCH:
        for key in ("block_auto_adjust_ff_dim", "block_ffn_dim_multiplier", "block_multiple_of"):
            del cfg[key]
        cfg.update(num_dense_layers=spec.dense_layers, num_experts=spec.experts, num_experts_per_tok=spec.top_k,
                   moe_intermediate_size=spec.moe_width, use_expert_bias=spec.expert_bias,
                   norm_topk_prob=spec.renormalize, routed_scaling_factor=spec.routed_scale)
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class ShortConv(nn.Module):
    """``out_proj(C * conv(B * x))`` over the convolution's state in the layer's pages."""

    def __init__(self, spec: Lfm2Spec) -> None:
        super().__init__()
        h, k, bias = spec.hidden_size, spec.conv_taps, spec.conv_bias
        self.conv = nn.Conv1d(h, h, k, groups=h, bias=bias, padding=k - 1)
        self.in_proj = nn.Linear(h, 3 * h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)
        self.hidden, self.taps = h, k

    def forward(self, x: torch.Tensor, batch: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        conv_pages, rec_pages = state_views(kv_layer, self.hidden, self.taps, 0, 1, 1)
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        bx = b * v
        weight, bias = self.conv.weight[:, 0], self.conv.bias
        if batch.is_decode:
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, bx, weight, bias, act=False)
            commit(s0)
        else:
            conv = torch.empty_like(bx)

            def run(rows: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                conv[r0:r1] = rows
                return s

            scan_sequences(batch, conv_pages, rec_pages, bx, weight, bias, run, act=False)
        return cast(torch.Tensor, self.out_proj(c * conv))


class Attention(nn.Module):
    def __init__(self, spec: Lfm2Spec) -> None:
        super().__init__()
        h, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.out_proj = nn.Linear(h * d, spec.hidden_size, bias=False)
        self.q_layernorm = RMSNorm(d, spec.rms_eps)
        self.k_layernorm = RMSNorm(d, spec.rms_eps)


class Attention3(NormedAttention):
    """LFM3's attention: Qwen3's names, an optional per-head output gate (``gate_proj``)."""

    def __init__(self, spec: Lfm2Spec) -> None:
        super().__init__(spec)
        if spec.attn_gate:
            self.gate_proj = nn.Linear(spec.hidden_size, spec.n_heads, bias=False)


class FeedForward(nn.Module):
    """``w2(act(w1(x)) * w3(x))``: SwiGLU unless ``act`` (MiniMax's experts: its ``hidden_act``)."""

    def __init__(self, hidden: int, width: int, act: Activation | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, width, bias=False)
        self.w3 = nn.Linear(hidden, width, bias=False)
        self.w2 = nn.Linear(width, hidden, bias=False)
        self.act: Activation = F.silu if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.w2(self.act(self.w1(x)) * self.w3(x)))


class MoE(nn.Module):
    """LFM2-MoE's experts: sigmoid scores (in the model's dtype) plus ``expert_bias`` choose, the scores weigh."""

    def __init__(self, spec: Lfm2Spec) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.hidden_size, spec.experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width) for _ in range(spec.experts))
        self.use_bias = spec.expert_bias
        if self.use_bias:
            self.expert_bias = nn.Parameter(torch.zeros(spec.experts), requires_grad=False)
            self.keep_fp32 = True  # (transformers keeps it a float32 buffer; only it is a parameter here)
        self.k, self.renormalize, self.scale = spec.top_k, spec.renormalize, spec.routed_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x).sigmoid()
        if self.use_bias:
            idx = (scores + self.expert_bias.float()).topk(self.k, dim=-1)[1]
            w = scores.gather(1, idx)
        else:
            w, idx = scores.topk(self.k, dim=-1)
        if self.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-6)
        w = w * self.scale
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, (self.experts[e](x[tok]) * w[tok, slot, None]).to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: Lfm2Spec, layer: int) -> None:
        super().__init__()
        if spec.layer_types[layer] == "conv":
            self.conv = ShortConv(spec)
        else:
            self.self_attn = Attention3(spec) if spec.architecture == ARCH3 else Attention(spec)
        self.feed_forward: nn.Module = (
            MoE(spec) if spec.architecture == MOE_ARCH and layer >= spec.dense_layers
            else FeedForward(spec.hidden_size, spec.intermediate_size))
        self.operator_norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.ffn_norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        if spec.sandwich:
            self.post_operator_norm = RMSNorm(spec.hidden_size, spec.rms_eps)
            self.post_ffn_norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class Backbone(nn.Module):
    def __init__(self, spec: Lfm2Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.embedding_norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class Lfm2Model(HybridDecoder):
    """LFM2 (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: Lfm2Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec), device, backend)
        self.spec: Lfm2Spec = spec
        for kind in spec.proportional:  # (LFM3's full layers: the pairs past partial_rotary_factor do not turn)
            theta, partial = spec.rope_by_type[kind]
            self.inv_freq[kind] = rope_inv_freq({"rope_type": "proportional", "rope_theta": theta,
                                                 "partial_rotary_factor": partial}, spec.head_dim)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        """LFM3 rotates in fp32 (its tables stay fp32, q and k are rounded after the rotation)."""
        state = super().prefill_begin(batch)
        if self.spec.architecture == ARCH3:
            cast(TypedRopeState, state).tables = rope_tables(batch.positions.to(self.device, torch.float32),
                                                             self.inv_freq, torch.float32)
        return state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self.model.embedding_norm(h)).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        x = mod.operator_norm(st.hidden)
        if spec.layer_types[layer] == "conv":
            out = cast(ShortConv, mod.conv)(x, b, kv_layer)
        elif spec.architecture == ARCH3:
            out = self._attention3(cast(Attention3, mod.self_attn), x, layer, st, kv_layer)
        else:
            attn = cast(Attention, mod.self_attn)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            cos, sin = st.tables["full_attention"]
            cos, sin = cos[:, None, :], sin[:, None, :]
            q = _rope(attn.q_layernorm(attn.q_proj(x).view(n, hq, d)), cos, sin)
            k = _rope(attn.k_layernorm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5)
            out = attn.out_proj(o.reshape(n, hq * d))
        if spec.sandwich:
            out = mod.post_operator_norm(out)
        h = st.hidden + out
        ff = mod.feed_forward(mod.ffn_norm(h))
        st.hidden = h + (mod.post_ffn_norm(ff) if spec.sandwich else ff)
        state.next_layer += 1

    def _attention3(self, attn: Attention3, x: torch.Tensor, layer: int, st: TypedRopeState,
                    kv_layer: torch.Tensor) -> torch.Tensor:
        """LFM3's attention: per-head q / k norms, RoPE of the layer's type in fp32, the layer's window, each head's
        output gated."""
        spec, b = self.spec, st.batch
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)).float(), cos, sin).to(x.dtype)
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)).float(), cos, sin).to(x.dtype)
        kv = layer_view(kv_layer, hkv, d)
        o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5, window=self.windows[layer])
        if spec.attn_gate:
            o = o * torch.sigmoid(attn.gate_proj(x))[..., None]
        return cast(torch.Tensor, attn.o_proj(o.reshape(n, hq * d)))


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """An LFM2 checkpoint's tensors (an image-text checkpoint's language model already renamed); LFM2-MoE's experts
    as the hub holds them (``experts.N.w1/w3/w2``), transformers' packed ``gate_up_proj`` / ``down_proj`` split."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        name = name.replace(".self_attn.g_proj.", ".self_attn.gate_proj.")  # (LFM3's gate, transformers' name in memory)
        if name.endswith((".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")):
            if t.dim() != 3 or (name.endswith("gate_up_proj") and t.shape[1] % 2):
                raise ModelError(f"{source}: packed expert tensor {name!r} has shape {tuple(t.shape)}")
            base = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    w1, w3 = t[e].chunk(2, dim=0)
                    out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = w1, w3
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e]
        else:
            out[name] = t
    return out
