"""DeepSeek-V4 (``DeepseekV4ForCausalLM``, model_type ``deepseek_v4``), as transformers runs it, over the paged KV pool.

Every layer attends with one shared key/value head (``kv_proj``, normed, K = V) over a sliding window of
``sliding_window`` positions, with a learned sink per query head (gpt-oss's), queries through a low-rank
``q_a_proj`` / ``q_a_norm`` / ``q_b_proj`` and a weightless per-head norm, **interleaved** RoPE on the last
``qk_rope_head_dim`` channels of each head (and the inverse rotation on the attention's output), and a grouped
low-rank output projection (``o_a_proj`` per head group, then ``o_b_proj``). Two layer types add long-range entries:

* **heavily compressed attention** (HCA): every ``m'`` tokens (128 in the released models) become one entry: the
  softmax over the window of ``gate_proj(x) + position_bias`` weights ``kv_proj(x)``, then an RMS norm and RoPE (the
  ``compress`` base, YaRN where the config says) at the window's first position. A query sees every entry whose
  window has closed by its position.
* **compressed sparse attention** (CSA): entries every ``m`` tokens (4) over *overlapping* windows (the previous
  window's first half-projection beside this window's second), and a lightning indexer (its own compressor at
  ``index_head_dim``, queries from the low-rank query, ``sum_h w_h relu(q_h . k)``) choosing each query's top
  ``index_topk`` closed entries.

Residuals are ``hc_mult`` streams (manifold-constrained hyper-connections: each block collapses them with sigmoid
weights, adds its output back with sigmoid weights, and mixes them by a Sinkhorn-normalized matrix, all in fp32); a
final ``hc_head`` collapses them before the norm. Feed-forwards are MoE in every layer: a ``sqrt(softplus)`` router
with a correction bias (or, in ``hash_moe`` layers, experts fixed per token id by ``tid2eid``), packed experts with
a clamped SwiGLU, and a shared expert.

**Pages.** Every row a layer keeps is per token and depends only on the tokens up to it, so pages are ordinary
(no state pages) and a prefix hit, the PE -> DE transfer and storage need nothing new. A layer's row holds, in the
compute dtype: the token's key/value; in compressed layers also its compressor projections (``kv_proj`` and
``gate_proj``: what a window still open at a prefix's end needs), and, in the row of the token that closes a
window, that window's entry; CSA rows add the indexer's projections and entry. One row width serves every layer
(``[2, H, head_dim]`` rows, ``H`` from the widest layer; :meth:`DeepseekV4Spec.kv_spec`). Attention runs in torch,
per sequence.
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
from dualpath.kv.layout import KVSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, LayerwiseDecoder, SeqBatch
from dualpath.model.moe import activation_of, dispatch_packed, gate_fn
from dualpath.model.rope import rope_frequencies
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "deepseek_v4"
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
_RATIO_TYPES = {0: SLIDING, 4: CSA, 128: HCA}  # (the released configs' per-layer ``compress_ratios``)
#: DeepseekV4Config's defaults (DeepSeek-V4-Flash's shape)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
    "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1,
}
#: the router scorings transformers runs (its config names ``softmax`` too, with no activation to run it)
_SCORES = ("sqrtsoftplus", "sigmoid")


@dataclass(frozen=True)
class DeepseekV4Spec(ModelSpec):
    """A :class:`ModelSpec` (``intermediate_size``: the experts' and the shared expert's width; ``n_kv_heads`` 1;
    ``rope_theta`` the sliding layers' base) plus DeepSeek-V4's fields (module docstring)."""

    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()
    experts: int = 256
    top_k: int = 6
    routed_scale: float = 1.5
    limit: float = 10.0
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    hc_mult: int = 4
    hc_iters: int = 20
    hc_eps: float = 1e-6
    csa_ratio: int = 4
    hca_ratio: int = 128
    window: int = 128
    index_heads: int = 64
    index_dim: int = 128
    index_topk: int = 512
    scoring: str = "sqrtsoftplus"
    compress_theta: float = 160000.0
    compress_scaling: dict[str, Any] | None = field(default=None)
    rope_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        n = self.n_layers
        if len(self.layer_types) != n or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name {n} layers, each one of {list(LAYER_TYPES)}, got "
                             f"{list(self.layer_types)}")
        if len(self.mlp_layer_types) != n or any(t not in ("moe", "hash_moe") for t in self.mlp_layer_types):
            raise ModelError(f"model config: mlp_layer_types must name {n} layers, each 'moe' or 'hash_moe', got "
                             f"{list(self.mlp_layer_types)}")
        if self.n_kv_heads != 1:
            raise ModelError(f"model config: num_key_value_heads must be 1 (DeepSeek-V4 shares one key/value head), "
                             f"got {self.n_kv_heads}")
        if (self.n_heads * self.head_dim) % self.o_groups:
            raise ModelError(f"model config: o_groups ({self.o_groups}) must divide num_attention_heads x head_dim "
                             f"({self.n_heads * self.head_dim})")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ModelError(f"model config: the rotated width head_dim x partial_rotary_factor ({self.rope_dim}) "
                             f"must be even and in (0, head_dim]")
        if self.index_dim % 2 or self.rope_dim > self.index_dim:
            raise ModelError(f"model config: index_head_dim ({self.index_dim}) must be even and hold the rotated "
                             f"width ({self.rope_dim})")
        if self.scoring not in _SCORES:
            raise ModelError(f"model config: scoring_func {self.scoring!r} unsupported; expected one of {_SCORES}")
        if self.top_k > self.experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) exceeds "
                             f"n_routed_experts ({self.experts})")

    # --- pages ----------------------------------------------------------------------------------------------
    def ratio(self, layer: int) -> int:
        """Tokens per compressed entry of layer ``layer`` (0: a sliding layer)."""
        kind = self.layer_types[layer]
        return self.csa_ratio if kind == CSA else self.hca_ratio if kind == HCA else 0

    def row_parts(self, layer: int) -> dict[str, tuple[int, int]]:
        """Where each part of layer ``layer``'s token row lies, in elements of the compute dtype (module
        docstring): ``kv``; ``ckv`` / ``cgate`` / ``entry`` (compressed layers); ``ikv`` / ``igate`` / ``ientry``
        (CSA)."""
        d, kind = self.head_dim, self.layer_types[layer]
        parts, at = {"kv": (0, d)}, d
        if kind == SLIDING:
            return parts
        width = 2 * d if kind == CSA else d
        for name, w in (("ckv", width), ("cgate", width), ("entry", d)):
            parts[name], at = (at, at + w), at + w
        if kind == CSA:
            for name, w in (("ikv", 2 * self.index_dim), ("igate", 2 * self.index_dim), ("ientry", self.index_dim)):
                parts[name], at = (at, at + w), at + w
        return parts

    @property
    def page_heads(self) -> int:
        """Heads of ``head_dim`` K and V in a row wide enough for the widest layer's row."""
        need = max(max(p[1] for p in self.row_parts(i).values()) for i in range(self.n_layers))
        return -(-need // (2 * self.head_dim))

    def kv_spec(self) -> KVSpec:
        return KVSpec.mha(self.n_layers, self.page_heads, self.head_dim, self.dtype)

    def layer_window(self, layer: int) -> int | None:
        return self.window

    def to_hf_config(self) -> dict[str, Any]:
        compress: dict[str, Any] = {"rope_type": "default", **(self.compress_scaling or {}),
                                    "rope_theta": self.compress_theta,
                                    "partial_rotary_factor": self.rope_dim / self.head_dim}
        return {
            "architectures": ["DeepseekV4ForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "moe_intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads, "num_key_value_heads": 1,
            "head_dim": self.head_dim, "q_lora_rank": self.q_lora_rank, "num_experts_per_tok": self.top_k,
            "n_routed_experts": self.experts, "n_shared_experts": 1, "scoring_func": self.scoring,
            "norm_topk_prob": True, "routed_scaling_factor": self.routed_scale,
            "max_position_embeddings": self.max_position, "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_theta, "layer_types": list(self.layer_types),
            "mlp_layer_types": list(self.mlp_layer_types),
            "compress_rates": {CSA: self.csa_ratio, HCA: self.hca_ratio}, "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_iters, "hc_eps": self.hc_eps, "swiglu_limit": self.limit,
            "sliding_window": self.window, "o_groups": self.o_groups, "o_lora_rank": self.o_lora_rank,
            "index_n_heads": self.index_heads, "index_head_dim": self.index_dim, "index_topk": self.index_topk,
            "partial_rotary_factor": self.rope_dim / self.head_dim, "rms_norm_eps": self.rms_eps,
            "hidden_act": hf_activation(self.activation), "tie_word_embeddings": self.tie_embeddings, "attention_bias": False,
            "mlp_bias": bool(self.mlp_has_bias), "num_nextn_predict_layers": 0,
            "rope_parameters": {"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                         "partial_rotary_factor": self.rope_dim / self.head_dim},
                                "compress": compress},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def _layer_types(cfg: dict[str, Any], n: int, where: str) -> list[str]:
    """transformers' order: ``layer_types``, else the released ``compress_ratios`` (0 / 4 / 128 per layer), else
    V4-Pro's pattern (two HCA layers, then CSA and HCA taking turns)."""
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        ratios = cfg["compress_ratios"]
        if not isinstance(ratios, list) or any(r not in _RATIO_TYPES for r in ratios):
            raise ModelError(f"{where}: compress_ratios must be a list of 0, 4 or 128 per layer, got {ratios!r}")
        types = [_RATIO_TYPES[r] for r in ratios]
    if types is None:
        types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    if not isinstance(types, list):
        raise ModelError(f"{where}: layer_types must be a list, got {types!r}")
    return list(types[:n])


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> DeepseekV4Spec:
    """The spec of a DeepSeek-V4 config (its keys over DeepseekV4Config's defaults; the released configs' older
    keys ``compress_ratios``, ``compress_rate_csa`` / ``_hca``, ``num_hash_layers`` and ``qk_rope_head_dim`` read as
    transformers folds them in)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)
    mlp_bias = cfg.get("mlp_bias", False)  # (the shared expert's; attention_bias is read by no module: ignored)
    if not isinstance(mlp_bias, bool):
        raise ModelError(f"{where}: mlp_bias must be true or false, got {mlp_bias!r}")
    n = cfg_int(cfg, "num_hidden_layers", where)
    rates = cfg.get("compress_rates") or {}
    if not isinstance(rates, dict):
        raise ModelError(f"{where}: compress_rates must map layer types to tokens per entry, got {rates!r}")
    csa = rates.get(CSA, cfg.get("compress_rate_csa", 4))
    hca = rates.get(HCA, cfg.get("compress_rate_hca", 128))
    mlp = cfg.get("mlp_layer_types")
    if mlp is None:
        hashed = cfg.get("num_hash_layers", 3)
        mlp = ["hash_moe"] * min(n, int(hashed)) + ["moe"] * max(0, n - int(hashed))
    if not isinstance(mlp, list):
        raise ModelError(f"{where}: mlp_layer_types must be a list, got {mlp!r}")
    head_dim = cfg_int(cfg, "head_dim", where)
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be a mapping, got {rope!r}")
    nested = isinstance(rope.get("main"), dict) and isinstance(rope.get("compress"), dict)
    main = dict(rope["main"]) if nested else {}
    if nested:
        comp = dict(rope["compress"])
    else:  # (a flat rope_parameters / rope_scaling is the compressed layers' scaling, at compress_rope_theta, as
        # transformers reads it)
        comp = {k: v for k, v in {**(cfg.get("rope_scaling") or {}), **rope}.items()
                if k not in ("main", "compress", "rope_theta", "partial_rotary_factor")}
    partial = cfg.get("partial_rotary_factor")
    if partial is None:
        partial = main.get("partial_rotary_factor")
    if partial is None:
        partial = cfg["qk_rope_head_dim"] / head_dim if cfg.get("qk_rope_head_dim") else 64 / 512
    if main.get("rope_type", "default") != "default":
        raise ModelError(f"{where}: rope_parameters.main: the sliding layers' RoPE must be 'default', got {main!r}")
    if nested and comp.get("partial_rotary_factor", partial) != partial:
        raise ModelError(f"{where}: rope_parameters.compress.partial_rotary_factor "
                         f"({comp['partial_rotary_factor']!r}) must equal the main RoPE's ({partial!r}): every layer "
                         "rotates the same qk_rope_head_dim channels")
    kind = comp.get("rope_type", comp.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ModelError(f"{where}: rope_parameters.compress: rope_type {kind!r} unsupported (default or yarn)")
    scaling = None
    if kind == "yarn":
        scaling = {k: v for k, v in comp.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        scaling["rope_type"] = "yarn"
        scaling.setdefault("attention_factor", 1.0)  # (transformers: the V4 reference scales no cos/sin)
        if "factor" not in scaling:
            raise ModelError(f"{where}: rope_parameters.compress: a yarn RoPE needs a 'factor'")
    theta = main.get("rope_theta", cfg["rope_theta"])
    ctheta = comp.get("rope_theta", cfg["compress_rope_theta"])
    eos = cfg.get("eos_token_id")
    return DeepseekV4Spec(
        architecture=ARCH, activation=act, mlp_has_bias=mlp_bias or None, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "moe_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=head_dim, rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=cfg_num({"rope_theta": theta}, "rope_theta", where),
        max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos, context_cap=max_context,
        experts=cfg_int(cfg, "n_routed_experts", where), top_k=cfg_int(cfg, "num_experts_per_tok", where),
        routed_scale=cfg_num(cfg, "routed_scaling_factor", where), limit=cfg_num(cfg, "swiglu_limit", where),
        layer_types=tuple(_layer_types(cfg, n, where)), mlp_layer_types=tuple(mlp[:n]),
        q_lora_rank=cfg_int(cfg, "q_lora_rank", where), o_groups=cfg_int(cfg, "o_groups", where),
        o_lora_rank=cfg_int(cfg, "o_lora_rank", where), hc_mult=cfg_int(cfg, "hc_mult", where),
        hc_iters=cfg_int(cfg, "hc_sinkhorn_iters", where), hc_eps=cfg_num(cfg, "hc_eps", where, positive=False),
        csa_ratio=cfg_int({"compress_rates.csa": csa}, "compress_rates.csa", where),
        hca_ratio=cfg_int({"compress_rates.hca": hca}, "compress_rates.hca", where),
        window=cfg_int(cfg, "sliding_window", where), index_heads=cfg_int(cfg, "index_n_heads", where),
        index_dim=cfg_int(cfg, "index_head_dim", where), index_topk=cfg_int(cfg, "index_topk", where),
        scoring=str(cfg.get("scoring_func")),
        compress_theta=cfg_num({"compress_rope_theta": ctheta}, "compress_rope_theta", where),
        compress_scaling=scaling, rope_dim=int(head_dim * float(partial)),
    )


# --- math as transformers writes it -------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """DeepSeek-V4's RMS norm: normalized in fp32, times the fp32 ``weight``, back to ``x``'s dtype; without a weight
    (``q_b_norm``, the hyper-connections' input norm) the fp32 factor is rounded to ``x``'s dtype first."""
    if weight is None:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[N, rope_dim // 2]`` (one per interleaved pair) at ``positions``, rounded to ``dtype``."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last ``2 * cos.shape[-1]`` channels of ``x [N, ..., D]`` (``cos [N, r]``), in fp32,
    back to ``x``'s dtype; the leading channels untouched."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    c = cos.repeat_interleave(2, dim=-1).reshape(shape)
    s = sin.repeat_interleave(2, dim=-1).reshape(shape)
    r = c.shape[-1]
    nope, rot = x[..., :-r], x[..., -r:]
    half = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat((nope, (rot.float() * c + half.float() * s).to(x.dtype)), dim=-1)


# --- modules (the checkpoints' names) -----------------------------------------------------------------------


class Compressor(nn.Module):
    """A compressor's projections (``kv_proj`` / ``gate_proj`` ``width`` wide, a ``position_bias`` per window slot,
    its ``kv_norm``); the indexer adds its query projection and scorer."""

    def __init__(self, hidden: int, dim: int, width: int, ratio: int) -> None:
        super().__init__()
        self.kv_proj = nn.Linear(hidden, width, bias=False)
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, width))
        self.kv_norm = _Norm(dim)


class Scorer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.weights_proj = nn.Linear(hidden, heads, bias=False)


class Indexer(Compressor):
    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__(spec.hidden_size, spec.index_dim, 2 * spec.index_dim, spec.csa_ratio)
        self.q_b_proj = nn.Linear(spec.q_lora_rank, spec.index_heads * spec.index_dim, bias=False)
        self.scorer = Scorer(spec.hidden_size, spec.index_heads)


class CsaCompressor(Compressor):
    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__(spec.hidden_size, spec.head_dim, 2 * spec.head_dim, spec.csa_ratio)
        self.indexer = Indexer(spec)


class _Norm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, spec: DeepseekV4Spec, layer: int) -> None:
        super().__init__()
        h, d, hid = spec.n_heads, spec.head_dim, spec.hidden_size
        self.q_a_proj = nn.Linear(hid, spec.q_lora_rank, bias=False)
        self.q_a_norm = _Norm(spec.q_lora_rank)
        self.q_b_proj = nn.Linear(spec.q_lora_rank, h * d, bias=False)
        self.kv_proj = nn.Linear(hid, d, bias=False)
        self.kv_norm = _Norm(d)
        self.o_a_proj = nn.Linear(h * d // spec.o_groups, spec.o_groups * spec.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(spec.o_groups * spec.o_lora_rank, hid, bias=False)
        self.sinks = nn.Parameter(torch.zeros(h))
        kind = spec.layer_types[layer]
        self.compressor: nn.Module | None = (
            CsaCompressor(spec) if kind == CSA else Compressor(hid, d, d, spec.hca_ratio) if kind == HCA else None)


class HyperConnection(nn.Module):
    """One block's mHC weights (``fn``, ``base``, ``scale``), computed in fp32 as transformers does."""

    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__()
        n = spec.hc_mult
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * spec.hidden_size))
        self.base = nn.Parameter(torch.zeros((2 + n) * n))
        self.scale = nn.Parameter(torch.ones(3))
        self.n, self.iters, self.eps, self.rms_eps = n, spec.hc_iters, spec.hc_eps, spec.rms_eps

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For streams ``h [N, n, H]``: ``(post [N, n], comb [N, n, n], the collapsed input [N, H])``."""
        n = self.n
        flat = rms_norm(h.reshape(h.shape[0], -1).float(), None, self.rms_eps)
        mix = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.view(-1, n, n) * s_comb + comb_b.view(n, n), dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        collapsed = (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)
        return post, comb, collapsed


class HyperHead(nn.Module):
    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__()
        n = spec.hc_mult
        self.hc_fn = nn.Parameter(torch.zeros(n, n * spec.hidden_size))
        self.hc_base = nn.Parameter(torch.zeros(n))
        self.hc_scale = nn.Parameter(torch.ones(1))
        self.eps, self.rms_eps = spec.hc_eps, spec.rms_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = rms_norm(h.flatten(1).float(), None, self.rms_eps)
        pre = torch.sigmoid(F.linear(flat, self.hc_fn.float()) * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype)


class ClampedMlp(nn.Module):
    """The shared expert: ``down(act(min(gate, limit)) * clamp(up, -limit, limit))`` (SiLU unless ``hidden_act``)."""

    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__()
        b = bool(spec.mlp_has_bias)  # (mlp_bias: transformers biases the shared expert's three projections)
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=b)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=b)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=b)
        self.limit = spec.limit
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x).clamp(max=self.limit)
        u = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return cast(torch.Tensor, self.down_proj(self.act(g) * u))


class Experts(nn.Module):
    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__()
        e, i, h = spec.experts, spec.intermediate_size, spec.hidden_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))
        self.limit = spec.limit
        self.act = activation_of(spec)

    def run(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return dispatch_packed(x, idx, weights, self.gate_up_proj, self.down_proj, self.limit, self.act)


class Router(nn.Module):
    def __init__(self, spec: DeepseekV4Spec, hashed: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.experts, spec.hidden_size))
        if hashed:  # (a fixed expert table per token id: an integer tensor of the checkpoint, never trained)
            self.tid2eid = nn.Parameter(torch.zeros(spec.vocab_size, spec.top_k, dtype=torch.long),
                                        requires_grad=False)
        else:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.experts))
        self.hashed, self.k, self.scale, self.scoring = hashed, spec.top_k, spec.routed_scale, \
            spec.scoring

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        scores = F.softplus(logits).sqrt() if self.scoring == "sqrtsoftplus" else torch.sigmoid(logits)
        if self.hashed:
            idx = self.tid2eid[ids].long()
        else:
            idx = torch.topk(scores + self.e_score_correction_bias, self.k, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * self.scale


class Moe(nn.Module):
    def __init__(self, spec: DeepseekV4Spec, layer: int) -> None:
        super().__init__()
        self.gate = Router(spec, spec.mlp_layer_types[layer] == "hash_moe")
        self.experts = Experts(spec)
        self.shared_experts = ClampedMlp(spec)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x, ids)
        return cast(torch.Tensor, self.experts.run(x, idx, w) + self.shared_experts(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DeepseekV4Spec, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.mlp = Moe(spec, layer)
        self.input_layernorm = _Norm(spec.hidden_size)
        self.post_attention_layernorm = _Norm(spec.hidden_size)
        self.attn_hc = HyperConnection(spec)
        self.ffn_hc = HyperConnection(spec)


class Backbone(nn.Module):
    def __init__(self, spec: DeepseekV4Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = _Norm(spec.hidden_size)
        self.hc_head = HyperHead(spec)


#: queries attended together in a prefill (each tile's keys: its band of the window, then the entries)
_TILE = 128

#: parameters transformers keeps in fp32 in a bf16 model (``_keep_in_fp32_modules_strict``)
_FP32 = ("attn_hc.", "ffn_hc.", "hc_head.", "self_attn.sinks", "position_bias", "e_score_correction_bias",
         "q_a_norm.", "kv_norm.", "input_layernorm.", "post_attention_layernorm.", "model.norm.")


@dataclass
class V4State(ForwardState):
    ids: torch.Tensor | None = None
    main: tuple[torch.Tensor, torch.Tensor] | None = None       # the sliding layers' (cos, sin) at each position
    compress: tuple[torch.Tensor, torch.Tensor] | None = None   # the compressed layers'


class DeepseekV4Model(LayerwiseDecoder):
    """DeepSeek-V4 (module docstring) over a paged KV pool; attention in torch (``backend`` is accepted and
    unused: no Triton kernel covers the compressed entries)."""

    def __init__(self, spec: DeepseekV4Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: DeepseekV4Spec = spec
        with torch.no_grad():
            for name, p in self.named_parameters():
                if any(k in name for k in _FP32):
                    p.data = p.data.float()
        self.main_freq, _ = rope_frequencies(spec.rope_dim, spec.rope_theta, None, spec.max_position)
        self.comp_freq, self.comp_scale = rope_frequencies(spec.rope_dim, spec.compress_theta, spec.compress_scaling,
                                                           spec.max_position)
        self.parts = [spec.row_parts(i) for i in range(spec.n_layers)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = rms_norm(m.hc_head(h), m.norm.weight, self.spec.rms_eps)
        return cast(torch.Tensor, self.lm_head(x).float())

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        spec, dt = self.spec, self.spec.torch_dtype
        ids = self.checked_ids(batch)
        pos = batch.positions.to(self.device)
        e = self.model.embed_tokens(ids)
        hidden = e.unsqueeze(1).expand(-1, spec.hc_mult, -1).contiguous()
        return V4State(batch=batch, hidden=hidden, cos=e[:, :0], sin=e[:, :0], ids=ids,
                       main=rope_tables(pos, self.main_freq, 1.0, dt),
                       compress=rope_tables(pos, self.comp_freq, self.comp_scale, dt))

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, spec = cast(V4State, state), self.spec
        b = state.batch
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, spec.page_heads, spec.head_dim))
        mod = cast(DecoderLayer, self.model.layers[layer])
        dt, eps = st.hidden.dtype, spec.rms_eps
        post, comb, x = mod.attn_hc(st.hidden)
        out = self._attention(layer, mod.self_attn, rms_norm(x, mod.input_layernorm.weight, eps), st, kv_layer)
        h = post.to(dt).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), st.hidden)
        post, comb, x = mod.ffn_hc(h)
        y = mod.mlp(rms_norm(x, mod.post_attention_layernorm.weight, eps), st.ids)
        st.hidden = post.to(dt).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), h)
        state.next_layer += 1

    # --- attention -----------------------------------------------------------------------------------------
    def _attention(self, layer: int, attn: Attention, x: torch.Tensor, st: V4State,
                   kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b, eps = self.spec, st.batch, self.spec.rms_eps
        n, h, d = x.shape[0], spec.n_heads, spec.head_dim
        kind, parts = spec.layer_types[layer], self.parts[layer]
        cos, sin = cast(tuple[torch.Tensor, torch.Tensor], st.main if kind == SLIDING else st.compress)
        q_res = rms_norm(attn.q_a_proj(x), attn.q_a_norm.weight, eps)
        q = rope_tail(rms_norm(attn.q_b_proj(q_res).view(n, h, d), None, eps), cos, sin)
        kv = rope_tail(rms_norm(attn.kv_proj(x), attn.kv_norm.weight, eps), cos, sin)
        rows = kv_layer.flatten(2)  # [nb, bt, row]: every part of a token's row
        bt = b.block_tokens
        tables = b.block_tables.to(x.device, torch.int64)
        pos = b.positions.to(x.device)
        pages, offs = b.page_offsets(x.device)
        _put(rows, pages, offs, parts["kv"], kv)
        comp = cast(Compressor | None, attn.compressor)
        if comp is not None:
            _put(rows, pages, offs, parts["ckv"], comp.kv_proj(x))
            _put(rows, pages, offs, parts["cgate"], comp.gate_proj(x))
            if kind == CSA:
                ix = cast(CsaCompressor, comp).indexer
                _put(rows, pages, offs, parts["ikv"], ix.kv_proj(x))
                _put(rows, pages, offs, parts["igate"], ix.gate_proj(x))
        out = torch.empty_like(q)
        cu, starts = b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        for i, p0 in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            table = tables[i]
            p1 = p0 + (r1 - r0)
            qpos = pos[r0:r1]
            entries, emask = None, None
            if comp is not None:
                m = spec.ratio(layer)
                self._close_windows(layer, comp, rows, table, p0, p1, bt)
                n_entries = p1 // m
                wpos = torch.arange(n_entries, device=x.device) * m + (m - 1)  # (each entry in its closing row)
                entries = _get(rows, table, wpos, bt, parts["entry"])
                emask = torch.arange(n_entries, device=x.device)[None, :] < ((qpos + 1) // m)[:, None]
                if kind == CSA and n_entries:
                    ix = cast(CsaCompressor, comp).indexer
                    emask = emask & self._selected(ix, q_res[r0:r1], x[r0:r1], st, r0, r1, rows, table, wpos, emask,
                                                   parts)
            for t0 in range(0, r1 - r0, _TILE):  # (query tiles: each attends to its own band of the window)
                t1 = min(r1 - r0, t0 + _TILE)
                kpos = torch.arange(max(0, p0 + t0 - spec.window + 1), p0 + t1, device=x.device)
                keys = _get(rows, table, kpos, bt, parts["kv"])
                qp = qpos[t0:t1]
                mask = (kpos[None, :] <= qp[:, None]) & (kpos[None, :] > qp[:, None] - spec.window)
                if entries is not None and emask is not None:
                    keys = torch.cat((keys, entries))
                    mask = torch.cat((mask, emask[t0:t1]), dim=1)
                out[r0 + t0:r0 + t1] = self._softmax_attend(q[r0 + t0:r0 + t1], keys, mask, attn.sinks)
        out = rope_tail(out, cos, -sin)
        g = spec.o_groups
        grouped = out.reshape(n, g, -1).transpose(0, 1)  # [G, N, H D / G]
        w = attn.o_a_proj.weight.view(g, -1, grouped.shape[-1]).transpose(1, 2)
        low = torch.bmm(grouped, w).transpose(0, 1).reshape(n, -1)
        return cast(torch.Tensor, attn.o_b_proj(low))

    def _softmax_attend(self, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                        sinks: torch.Tensor) -> torch.Tensor:
        """``q [L, H, D]`` over ``keys [K, D]`` (keys are values) where ``mask [L, K]``, a sink per head in each
        softmax's denominator: ``[L, H, D]``."""
        scale = self.spec.head_dim ** -0.5
        logits = torch.einsum("lhd,kd->hlk", q, keys) * scale
        logits = logits.masked_fill(~mask[None], float("-inf"))
        sink = sinks.reshape(-1, 1, 1).expand(-1, q.shape[0], 1)
        both = torch.cat((logits, sink.to(torch.promote_types(logits.dtype, sinks.dtype))), dim=-1)
        both = both - both.max(dim=-1, keepdim=True).values
        probs = torch.softmax(both, dim=-1)[..., :-1].to(keys.dtype)
        return torch.einsum("hlk,kd->lhd", probs, keys)

    def _close_windows(self, layer: int, comp: Compressor, rows: torch.Tensor, table: torch.Tensor, p0: int,
                       p1: int, bt: int) -> None:
        """Write the entries of the windows the tokens ``[p0, p1)`` close (their compressor's, and a CSA layer's
        indexer's) into each window's last row."""
        spec, parts = self.spec, self.parts[layer]
        m = spec.ratio(layer)
        w0, w1 = p0 // m, p1 // m
        if w1 <= w0:
            return
        dev = rows.device
        closing = torch.arange(w0, w1, device=dev) * m + (m - 1)
        overlap = spec.layer_types[layer] == CSA
        e = self._entries(comp, rows, table, w0, w1, m, bt, parts["ckv"], parts["cgate"], spec.head_dim, overlap)
        pages, offs = table[closing // bt], closing % bt
        _put(rows, pages, offs, parts["entry"], e)
        if overlap:
            ix = cast(CsaCompressor, comp).indexer
            e = self._entries(ix, rows, table, w0, w1, m, bt, parts["ikv"], parts["igate"], spec.index_dim, True)
            _put(rows, pages, offs, parts["ientry"], e)

    def _entries(self, comp: Compressor, rows: torch.Tensor, table: torch.Tensor, w0: int, w1: int, m: int, bt: int,
                 kv_part: tuple[int, int], gate_part: tuple[int, int], dim: int, overlap: bool) -> torch.Tensor:
        """The entries of windows ``[w0, w1)``: ``[w1 - w0, dim]``, normed and rotated at each window's start."""
        dev, nw = rows.device, w1 - w0
        lo = max(0, (w0 - 1) * m) if overlap else w0 * m
        tok = torch.arange(lo, w1 * m, device=dev)
        kv = _get(rows, table, tok, bt, kv_part)
        gate = _get(rows, table, tok, bt, gate_part)
        pad = w0 * m - lo  # (rows of the window before the first: the overlap's first half)
        cur_kv = kv[pad:].view(nw, m, -1)
        cur_g = gate[pad:].view(nw, m, -1) + comp.position_bias
        if overlap:
            slots_kv = cur_kv.new_zeros(nw, 2 * m, dim)
            slots_g = cur_g.new_full((nw, 2 * m, dim), float("-inf"))
            slots_kv[:, m:], slots_g[:, m:] = cur_kv[..., dim:], cur_g[..., dim:]
            if nw > 1:
                slots_kv[1:, :m], slots_g[1:, :m] = cur_kv[:-1, :, :dim], cur_g[:-1, :, :dim]
            if pad:
                prev_g = gate[:pad] + comp.position_bias
                slots_kv[0, :m], slots_g[0, :m] = kv[:pad, :dim], prev_g[:, :dim]
            cur_kv, cur_g = slots_kv, slots_g
        pooled = (cur_kv * cur_g.softmax(dim=1, dtype=torch.float32).to(cur_kv.dtype)).sum(dim=1)
        normed = rms_norm(pooled, comp.kv_norm.weight, self.spec.rms_eps)
        starts = torch.arange(w0, w1, device=dev) * m
        cos, sin = rope_tables(starts, self.comp_freq, self.comp_scale, normed.dtype)
        return rope_tail(normed, cos, sin)

    def _selected(self, ix: Indexer, q_res: torch.Tensor, x: torch.Tensor, st: V4State, r0: int, r1: int,
                  rows: torch.Tensor, table: torch.Tensor, wpos: torch.Tensor, causal: torch.Tensor,
                  parts: dict[str, tuple[int, int]]) -> torch.Tensor:
        """The lightning indexer's choice ``[L, entries]``: each query's top ``index_topk`` closed entries."""
        spec = self.spec
        keys = _get(rows, table, wpos, st.batch.block_tokens, parts["ientry"])
        cos, sin = cast(tuple[torch.Tensor, torch.Tensor], st.compress)
        iq = ix.q_b_proj(q_res).view(r1 - r0, spec.index_heads, spec.index_dim)
        iq = rope_tail(iq, cos[r0:r1], sin[r0:r1])
        scores = F.relu(torch.einsum("lhd,td->lht", iq.float(), keys.float())) * spec.index_dim ** -0.5
        weights = ix.scorer.weights_proj(x).float() * spec.index_heads ** -0.5
        total = (scores * weights.unsqueeze(-1)).sum(dim=1).masked_fill(~causal, float("-inf"))
        k = min(spec.index_topk, total.shape[1])
        top = total.topk(k, dim=-1).indices
        chosen = torch.zeros_like(causal)
        chosen.scatter_(1, top, True)
        return chosen


def _put(rows: torch.Tensor, pages: torch.Tensor, offs: torch.Tensor, part: tuple[int, int],
         values: torch.Tensor) -> None:
    rows[pages, offs, part[0]:part[1]] = values.to(rows.dtype)


def _get(rows: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, bt: int,
         part: tuple[int, int]) -> torch.Tensor:
    return rows[table[positions // bt], positions % bt, part[0]:part[1]]


def random_init_overrides(model: DeepseekV4Model, gen: torch.Generator) -> None:
    """Random weights that exercise the model: hash-routing tables of distinct experts per token."""
    spec = model.spec
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("tid2eid"):
                p.copy_(torch.stack([torch.randperm(spec.experts, generator=gen)[:spec.top_k]
                                     for _ in range(spec.vocab_size)]))


#: the released checkpoints' names (left) for transformers' (right), applied in this order to a layer's key with a
#: leading dot (transformers' conversion mapping for deepseek_v4; its save_pretrained writes the left ones)
_HUB_NAMES = (
    (".attn.", ".self_attn."), (".ffn.", ".mlp."), (".indexer.compressor.", ".compressor.indexer."),
    (".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
    (".hc_attn_fn", ".attn_hc.fn"), (".hc_attn_base", ".attn_hc.base"), (".hc_attn_scale", ".attn_hc.scale"),
    (".hc_ffn_fn", ".ffn_hc.fn"), (".hc_ffn_base", ".ffn_hc.base"), (".hc_ffn_scale", ".ffn_hc.scale"),
    (".attn_sink", ".sinks"), (".indexer.weights_proj.", ".compressor.indexer.scorer.weights_proj."),
    (".indexer.wq_b.", ".compressor.indexer.q_b_proj."), (".norm.", ".kv_norm."), (".ape", ".position_bias"),
    (".wq_a.", ".q_a_proj."), (".self_attn.wq_b.", ".self_attn.q_b_proj."), (".wkv.", ".kv_proj."),
    (".wgate.", ".gate_proj."), (".wo_a.", ".o_a_proj."), (".wo_b.", ".o_b_proj."), (".q_norm.", ".q_a_norm."),
    (".gate.bias", ".gate.e_score_correction_bias"), (".shared_experts.w1.", ".shared_experts.gate_proj."),
    (".shared_experts.w2.", ".shared_experts.down_proj."), (".shared_experts.w3.", ".shared_experts.up_proj."),
)
_TOP_IN = {"embed.weight": "embed_tokens.weight", "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base",
           "hc_head_scale": "hc_head.hc_scale"}
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w[123])\.weight$")


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for a checkpoint's tensors: the released checkpoints' (``layers.N.attn.wkv``, ``embed``, ``head``,
    per-expert ``w1`` / ``w2`` / ``w3``; also as transformers' save_pretrained writes them, under ``model.``) or
    transformers' own; its multi-token-prediction layers (``mtp.*``) left out, as transformers leaves them."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        k = key[len("model."):] if key.startswith("model.") else key
        if k.startswith("mtp.") or "rotary_emb." in k:
            continue
        if k in ("head.weight", "lm_head.weight"):
            out["lm_head.weight"] = t
            continue
        k = _TOP_IN.get(k, k)
        if k.startswith("layers."):
            k = "." + k
            for hub, ours in _HUB_NAMES:
                k = k.replace(hub, ours)
            k = k[1:]
        k = "model." + k
        m = _EXPERT.match(k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[k] = t
    for prefix, by_id in experts.items():
        ids = sorted(by_id)
        if ids != list(range(len(ids))) or any(set(by_id[i]) != {"w1", "w2", "w3"} for i in ids):
            raise ModelError(f"{prefix}: experts must be numbered 0..E-1, each with w1, w2 and w3")
        out[prefix + ".gate_up_proj"] = torch.stack([torch.cat((by_id[i]["w1"], by_id[i]["w3"])) for i in ids])
        out[prefix + ".down_proj"] = torch.stack([by_id[i]["w2"] for i in ids])
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the names transformers' save_pretrained writes (the released checkpoints' names under
    ``model.``, ``head.weight``, per-expert ``w1`` / ``w2`` / ``w3``)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key == "lm_head.weight":
            out["head.weight"] = t
            continue
        if key.endswith(".mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            for e, w in enumerate(t):
                w1, w3 = w.chunk(2, dim=0)
                out[f"{base}{e}.w1.weight"], out[f"{base}{e}.w3.weight"] = w1.contiguous(), w3.contiguous()
            continue
        if key.endswith(".mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            for e, w in enumerate(t):
                out[f"{base}{e}.w2.weight"] = w.contiguous()
            continue
        k = key
        if k.startswith("model.layers."):
            k = "." + k[len("model."):]
            for hub, ours in reversed(_HUB_NAMES):
                k = k.replace(ours, hub)
            k = "model" + k
        out[k] = t
    return {(k.replace(".mlp.experts.", ".ffn.experts.") if ".mlp.experts." in k else k): v for k, v in out.items()}
