"""Qwen4-Exp (``Qwen4ExpForCausalLM``, model_type ``qwen4_exp_text``, and the language model of
``Qwen4ExpForConditionalGeneration``), as transformers runs it, over the paged KV pool.

Qwen3.5's layers (:mod:`dualpath.model.qwen_hybrid`: Gated DeltaNet linear layers whose state lives in state pages,
gated attention layers, softmax-routed experts plus a gated shared expert in every layer), arranged differently:

* **Hyper-connections.** The residual is ``hc_count`` streams (the embedding repeated). Before each sublayer a gated
  residual normalizes each stream (one RMS norm per stream, ``1 + weight``), mixes them through a low-rank sigmoid
  gate into the sublayer's input (their mean), and weighs the sublayer's output into each stream by
  ``2 sigmoid(block_inject_weight(.) / hc_count)``. No other norms: the head reads the streams' final mix.
* **QSA attention.** Every attention layer (``indexed_attention``) lets each query see only the tokens of its
  ``indexer_budget / indexer_compress_ratio`` best complete blocks of ``indexer_compress_ratio`` tokens, plus the
  open block's tokens up to itself. A block's key is the mean of its tokens' raw indexer keys, normed and rotated at
  the block's first position; its score ``sum_h relu(q_h . k) / sqrt(indexer_head_dim)``. A token's raw indexer key
  lives in its row of the page, after the attention heads' keys and values; attention runs in torch.
* **Per-layer embeddings (PLE)** on some linear layers (``ple_layer_ids``, one-indexed): hashed n-gram embeddings
  of the token and the ``ngram_size - 1`` before it (a segment restarts after each end-of-sequence token), gated
  per stream against the streams, plus a dilated depthwise convolution. The last ``ngram_size - 1`` token ids and
  the convolution's last ``(ple_conv_kernel_size - 1) * ngram_size`` inputs are state, kept in the layer's state
  pages after the Gated DeltaNet's state.

The checkpoints' n-gram tables are split into ``split_ngram_parts`` shards (``ngram_embedding.shard_{i}.weight``),
read back into one; each PLE layer's hash constants are buffers computed from the config (a checkpoint's are
checked against them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model import qwen_hybrid as qh
from dualpath.model.hybrid import HybridDecoder
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch, TypedRopeState, _rope, rope_tables
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes as delta_state_bytes
from dualpath.model.state_pages import widened_kv_spec

ARCH = "qwen4_exp_text"
HF_ARCH = "Qwen4ExpForCausalLM"
#: Qwen4ExpTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "head_dim": 256, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    "num_experts_per_tok": 10, "num_experts": 512, "hc_count": 4, "hc_lowrank": 320, "ple_conv_kernel_size": 4,
    "ngram_size": 3, "heads_per_ngram": 8, "ngram_vocab_size_base": 20_000_000,
    "make_ngram_vocab_size_divisible_by": 128, "seed": 1234, "split_ngram_parts": 512, "norm_topk_prob": True,
}
_QSA = ("indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")
#: queries attended together in a prefill
_TILE = 128


@dataclass(frozen=True)
class Qwen4ExpSpec(qh.HybridSpec):
    """Qwen3.5-MoE's fields (:class:`~dualpath.model.qwen_hybrid.HybridSpec`; attention layers typed
    ``full_attention``) plus the hyper-connections', QSA's and PLE's."""

    hc: int = 4
    hc_rank: int = 320
    gate_act: str = "silu"
    idx_heads: int = 0
    idx_dim: int = 0
    idx_budget: int = 0
    idx_ratio: int = 0
    ple_layers: tuple[int, ...] = ()  # (0-based)
    ple_dim: int = 0
    ple_kernel: int = 4
    ngram: int = 3
    heads_per_ngram: int = 8
    ngram_base: int = 20_000_000
    ngram_divisor: int = 128
    ngram_seed: int = 1234
    ngram_shards: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ple_layers", tuple(self.ple_layers))
        if self.hc < 2:
            raise ModelError(f"model config: hc_count must be > 1, got {self.hc}")
        if self.gate_act not in ("silu", "sigmoid"):
            raise ModelError(f"model config: output_gate_type must be 'silu' or 'sigmoid', got {self.gate_act!r}")
        if "full_attention" in self.layer_types:
            if min(self.idx_heads, self.idx_dim, self.idx_budget, self.idx_ratio) <= 0:
                raise ModelError("model config: the attention layers need the QSA indexer's fields "
                                 f"({', '.join(_QSA)}), each positive")
            if self.idx_budget % self.idx_ratio:
                raise ModelError(f"model config: indexer_budget ({self.idx_budget}) must be a multiple of "
                                 f"indexer_compress_ratio ({self.idx_ratio})")
            if self.rotary_dim > self.idx_dim:
                raise ModelError(f"model config: the rotated dims ({self.rotary_dim}) must fit indexer_head_dim "
                                 f"({self.idx_dim})")
        if self.ple_layers:
            bad = [i + 1 for i in self.ple_layers if not 0 <= i < self.n_layers
                   or self.layer_types[i] != "linear_attention"]
            if bad:
                raise ModelError(f"model config: ple_layer_ids must be one-indexed linear_attention layers, got {bad}")
            if self.ngram < 2 or self.heads_per_ngram < 1 or self.ple_dim <= 0 or self.ple_dim % self.ngram_heads:
                raise ModelError(f"model config: ple_embed_dim ({self.ple_dim}) must be a positive multiple of the "
                                 f"n-gram heads ((ngram_size - 1) x heads_per_ngram = {self.ngram_heads})")
            if self.eos_id is None:
                raise ModelError("model config: eos_token_id must be set when ple_layer_ids are (it pads n-grams)")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_by_type.get("full_attention", (0.0, 1.0))[1])

    @property
    def ngram_heads(self) -> int:
        return (self.ngram - 1) * self.heads_per_ngram

    @property
    def eos_id(self) -> int | None:
        e = self.eos_token_id
        return (e[0] if e else None) if isinstance(e, (list, tuple)) else e

    @property
    def ple_state_len(self) -> int:
        """Inputs the PLE convolution keeps: ``(kernel - 1) x ngram_size`` (its dilation is ``ngram_size``)."""
        return (self.ple_kernel - 1) * self.ngram

    @property
    def delta_bytes(self) -> int:
        return delta_state_bytes(self.conv_dim, self.conv_kernel, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim)

    @property
    def state_bytes(self) -> int:
        """A linear layer's state; a PLE layer's also holds its convolution's inputs and token ids (fp32 / int32)."""
        ple = 4 * (self.hc * self.hidden_size * self.ple_state_len + self.ngram - 1) if self.ple_layers else 0
        return self.delta_bytes + ple

    @property
    def idx_heads_in_row(self) -> int:
        """Row heads after the attention's KV heads that hold a token's raw indexer key (K and V halves both)."""
        return -(-self.idx_dim // (2 * self.head_dim)) if "full_attention" in self.layer_types else 0

    def paged_kv_spec(self, block_tokens: int) -> KVSpec:
        return widened_kv_spec(self.n_layers, self.n_kv_heads + self.idx_heads_in_row, self.head_dim, self.dtype,
                               self.state_bytes, block_tokens)

    def to_hf_config(self) -> dict[str, Any]:
        theta, partial = self.rope_by_type.get("full_attention", (10000.0, 1.0))
        cfg: dict[str, Any] = {
            "architectures": [HF_ARCH], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "layer_types": ["indexed_attention" if t == "full_attention" else t for t in self.layer_types],
            "linear_conv_kernel_dim": self.conv_kernel, "linear_key_head_dim": self.lin_k_dim,
            "linear_value_head_dim": self.lin_v_dim, "linear_num_key_heads": self.lin_k_heads,
            "linear_num_value_heads": self.lin_v_heads, "num_experts": self.moe_experts,
            "num_experts_per_tok": self.moe_top_k, "moe_intermediate_size": self.moe_width,
            "shared_expert_intermediate_size": self.shared_width, "norm_topk_prob": self.moe_renormalize,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial},
            "hc_count": self.hc, "hc_lowrank": self.hc_rank, "output_gate_type": self.gate_act,
            "ple_layer_ids": [i + 1 for i in self.ple_layers], "ple_conv_kernel_size": self.ple_kernel,
            "ngram_size": self.ngram, "heads_per_ngram": self.heads_per_ngram,
            "ngram_vocab_size_base": self.ngram_base, "make_ngram_vocab_size_divisible_by": self.ngram_divisor,
            "seed": self.ngram_seed, "split_ngram_parts": self.ngram_shards,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }
        if self.ple_layers:
            cfg["ple_embed_dim"] = self.ple_dim
        if self.idx_heads:
            cfg.update(indexer_n_heads=self.idx_heads, indexer_kv_heads=1, indexer_head_dim=self.idx_dim,
                       indexer_budget=self.idx_budget, indexer_compress_ratio=self.idx_ratio)
        return cfg


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Qwen4ExpSpec:
    """The spec of a Qwen4-Exp text config (its keys over the config class' defaults)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("hidden_act") not in ("silu", "swish"):
        raise ModelError(f"{where}: hidden_act {cfg.get('hidden_act')!r} unsupported (the experts and the "
                         f"convolution need 'silu')")
    n = cfg_int(cfg, "num_hidden_layers", where)
    interval = cfg_int({"full_attention_interval": cfg.get("full_attention_interval", 4)},
                       "full_attention_interval", where)
    default = ["linear_attention" if (i + 1) % interval else "indexed_attention" for i in range(n)]
    types = cfg_kinds(cfg, "layer_types", n, ("linear_attention", "indexed_attention", "full_attention"), where,
                      default)
    types = ["full_attention" if t == "indexed_attention" else t for t in types]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    theta = cfg_num({"rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta", where)
    partial = cfg_num({"partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}, "partial_rotary_factor",
                      where)
    qsa: dict[str, Any] = {}
    given = [k for k in _QSA if cfg.get(k) is not None]
    if given or "full_attention" in types:
        missing = [k for k in _QSA if k not in given]
        if missing:
            raise ModelError(f"{where}: the QSA indexer needs {', '.join(missing)} (transformers builds it on every "
                             f"attention layer, and cannot build one without them either)")
        if cfg_int(cfg, "indexer_kv_heads", where) != 1:
            raise ModelError(f"{where}: indexer_kv_heads must be 1 (Qwen4-Exp's QSA has one key head), got "
                             f"{cfg['indexer_kv_heads']!r}")
        qsa = {"idx_heads": cfg_int(cfg, "indexer_n_heads", where), "idx_dim": cfg_int(cfg, "indexer_head_dim", where),
               "idx_budget": cfg_int(cfg, "indexer_budget", where),
               "idx_ratio": cfg_int(cfg, "indexer_compress_ratio", where)}
    ple = cfg.get("ple_layer_ids") or []
    if not isinstance(ple, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ple):
        raise ModelError(f"{where}: ple_layer_ids must be a list of one-indexed layer ids, got {ple!r}")
    gate = cfg.get("output_gate_type") or cfg["hidden_act"]
    hidden = cfg_int(cfg, "hidden_size", where)
    return Qwen4ExpSpec(
        architecture=ARCH, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "moe_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple(types), rope_by_type={"full_attention": (theta, partial)},
        lin_k_heads=cfg_int(cfg, "linear_num_key_heads", where),
        lin_v_heads=cfg_int(cfg, "linear_num_value_heads", where),
        lin_k_dim=cfg_int(cfg, "linear_key_head_dim", where), lin_v_dim=cfg_int(cfg, "linear_value_head_dim", where),
        conv_kernel=cfg_int(cfg, "linear_conv_kernel_dim", where), moe_layers=tuple(range(n)),
        moe_experts=cfg_int(cfg, "num_experts", where), moe_top_k=cfg_int(cfg, "num_experts_per_tok", where),
        moe_width=cfg_int(cfg, "moe_intermediate_size", where),
        shared_width=cfg_int(cfg, "shared_expert_intermediate_size", where),
        moe_renormalize=bool(cfg["norm_topk_prob"]), hc=cfg_int(cfg, "hc_count", where),
        hc_rank=cfg_int(cfg, "hc_lowrank", where), gate_act=str(gate), **qsa,
        ple_layers=tuple(sorted({i - 1 for i in ple})),
        ple_dim=cfg_int({"ple_embed_dim": cfg.get("ple_embed_dim", hidden)}, "ple_embed_dim", where),
        ple_kernel=cfg_int(cfg, "ple_conv_kernel_size", where), ngram=cfg_int(cfg, "ngram_size", where),
        heads_per_ngram=cfg_int(cfg, "heads_per_ngram", where),
        ngram_base=cfg_int(cfg, "ngram_vocab_size_base", where),
        ngram_divisor=cfg_int(cfg, "make_ngram_vocab_size_divisible_by", where),
        ngram_seed=cfg_int(cfg, "seed", where, minimum=0), ngram_shards=cfg_int(cfg, "split_ngram_parts", where),
    )


# --- the n-gram hash (as transformers computes it from the config) ------------------------------------------------

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64(value: int) -> int:
    value = (value + _GAMMA) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & _MASK64


def _is_prime(v: int) -> bool:
    if v < 2:
        return False
    if v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


def ngram_tables(spec: Qwen4ExpSpec, ple_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """PLE layer ``ple_index``'s (its rank among the PLE layers) hash constants: ``(multipliers [ngram], each head's
    prime vocabulary [heads], each head's offset [heads], the padded table's rows)``."""
    bound = max(1, ((1 << 63) - 1) // max(spec.vocab_size, 1) // 2)
    base = spec.ngram_seed + 10007 * ple_index
    mult = [2 * (_splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % bound) + 1 for i in range(spec.ngram)]
    sizes: list[int] = []
    prime = spec.ngram_base - 1
    first = ple_index * spec.ngram_heads  # (each head's prime: the (global head + 1)-th after the base)
    for _ in range(first):
        prime += 1
        while not _is_prime(prime):
            prime += 1
    for _ in range(spec.ngram_heads):
        prime += 1
        while not _is_prime(prime):
            prime += 1
        sizes.append(prime)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = -(-sum(sizes) // spec.ngram_divisor) * spec.ngram_divisor
    return (torch.tensor(mult, dtype=torch.long), torch.tensor(sizes, dtype=torch.long),
            torch.tensor(offsets, dtype=torch.long), rows)


# --- modules (the checkpoints' names) ----------------------------------------------------------------------------


class GroupedNorm(nn.Module):
    """An RMS norm per ``group`` channels (one per residual stream), times ``1 + weight``, in fp32."""

    def __init__(self, dim: int, group: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.group, self.eps = group, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().unflatten(-1, (-1, self.group))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GatedResidual(nn.Module):
    """The streams' norm, their low-rank sigmoid mix (the sublayer's input) and, with ``combine``, each stream's
    weight for the sublayer's output."""

    def __init__(self, spec: Qwen4ExpSpec, combine: bool = True) -> None:
        super().__init__()
        wide = spec.hc * spec.hidden_size
        self.hc, self.hidden = spec.hc, spec.hidden_size
        self.hc_norm = GroupedNorm(wide, spec.hidden_size, spec.rms_eps)
        self.input_mix_weight_down = nn.Linear(wide, spec.hc_rank, bias=False)
        self.input_mix_weight_up = nn.Linear(spec.hc_rank, wide, bias=False)
        self.block_inject_weight = nn.Linear(wide, spec.hc, bias=False) if combine else None

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.hc_norm(h)
        w = F.silu(self.input_mix_weight_down(normed) / self.hc)
        w = torch.sigmoid(self.input_mix_weight_up(w)).unflatten(-1, (self.hc, self.hidden))
        mixed = (w * normed.unflatten(-1, (self.hc, self.hidden))).mean(dim=-2)
        if self.block_inject_weight is None:
            return mixed, None
        return mixed, 2 * torch.sigmoid(self.block_inject_weight(normed) / self.hc)


class NgramEmbedding(nn.Module):
    layer_multipliers: torch.Tensor
    ngram_heads_vocab_sizes: torch.Tensor
    ngram_heads_offsets: torch.Tensor

    def __init__(self, spec: Qwen4ExpSpec, ple_index: int) -> None:
        super().__init__()
        mult, sizes, offsets, rows = ngram_tables(spec, ple_index)
        self.register_buffer("layer_multipliers", mult, persistent=False)
        self.register_buffer("ngram_heads_vocab_sizes", sizes, persistent=False)
        self.register_buffer("ngram_heads_offsets", offsets, persistent=False)
        self.ngram_embedding = nn.Embedding(rows, spec.ple_dim // spec.ngram_heads)


class Ple(nn.Module):
    def __init__(self, spec: Qwen4ExpSpec, ple_index: int) -> None:
        super().__init__()
        wide = spec.hc * spec.hidden_size
        self.ple_embedding = NgramEmbedding(spec, ple_index)
        self.key_proj = nn.Linear(spec.ple_dim, wide, bias=False)
        self.value_proj = nn.Linear(spec.ple_dim, spec.hidden_size, bias=False)
        self.norm_key = GroupedNorm(wide, spec.hidden_size, spec.rms_eps)
        self.norm_query = GroupedNorm(wide, spec.hidden_size, spec.rms_eps)
        self.norm_conv = GroupedNorm(wide, spec.hidden_size, spec.rms_eps)
        self.conv1d = nn.Conv1d(wide, wide, spec.ple_kernel, groups=wide, dilation=spec.ngram, bias=False)


class Indexer(nn.Module):
    def __init__(self, spec: Qwen4ExpSpec) -> None:
        super().__init__()
        self.index_qk_proj = nn.Linear(spec.hidden_size, (spec.idx_heads + 1) * spec.idx_dim, bias=False)
        self.q_layernorm = RMSNorm(spec.idx_dim, spec.rms_eps, offset=True)
        self.k_layernorm = RMSNorm(spec.idx_dim, spec.rms_eps, offset=True)


class IndexedAttention(qh.Attention):
    def __init__(self, spec: Qwen4ExpSpec) -> None:
        super().__init__(spec)
        self.indexer = Indexer(spec)


class DecoderLayer(nn.Module):
    def __init__(self, spec: Qwen4ExpSpec, layer: int) -> None:
        super().__init__()
        if spec.layer_types[layer] == "linear_attention":
            self.linear_attn = qh.GatedDeltaNet(spec)
            self.linear_attn.norm.act = torch.sigmoid if spec.gate_act == "sigmoid" else F.silu
        else:
            self.self_attn = IndexedAttention(spec)
        self.mlp = qh.MoE(spec)
        self.ple = Ple(spec, spec.ple_layers.index(layer)) if layer in spec.ple_layers else None
        self.attn_hyper_connection = GatedResidual(spec)
        self.mlp_hyper_connection = GatedResidual(spec)


class Backbone(nn.Module):
    def __init__(self, spec: Qwen4ExpSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.hyper_connection_mixer = GatedResidual(spec, combine=False)


@dataclass
class Qwen4State(TypedRopeState):
    ids: torch.Tensor | None = None


class Qwen4ExpModel(HybridDecoder):
    """Qwen4-Exp (module docstring) over a paged KV pool: state pages for the linear layers (and PLE), rows holding
    keys, values and raw indexer keys for the attention layers; attention in torch."""

    def __init__(self, spec: Qwen4ExpSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec), device, backend)
        self.spec: Qwen4ExpSpec = spec

    def head(self, h: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.model.hyper_connection_mixer(h)
        return cast(torch.Tensor, self.lm_head(mixed).float())

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        st = cast(TypedRopeState, super().prefill_begin(batch))
        return Qwen4State(batch=st.batch, hidden=st.hidden.repeat(1, self.spec.hc), cos=st.cos, sin=st.sin,
                          tables=st.tables, ids=self.checked_ids(batch))

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        blk, qs = cast(DecoderLayer, mod), cast(Qwen4State, st)
        h = qs.hidden
        if blk.ple is not None:
            h = h + self._ple(blk.ple, h, qs, kv_layer)
        x, inject = blk.attn_hyper_connection(h)
        if self.spec.layer_types[layer] == "linear_attention":
            out = cast(qh.GatedDeltaNet, blk.linear_attn)(x, st.batch, kv_layer)
        else:
            out = self._attention(cast(IndexedAttention, blk.self_attn), x, qs, kv_layer)
        h = h + (out.unsqueeze(-2) * cast(torch.Tensor, inject).unsqueeze(-1)).flatten(-2)
        x, inject = blk.mlp_hyper_connection(h)
        out = blk.mlp(x)
        qs.hidden = h + (out.unsqueeze(-2) * cast(torch.Tensor, inject).unsqueeze(-1)).flatten(-2)
        state.next_layer += 1

    # --- PLE -------------------------------------------------------------------------------------------------
    def _ple_pages(self, kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv [nb, C, S] fp32, ids [nb, ngram - 1] int32)``: a PLE layer's state after the Gated DeltaNet's."""
        spec, nb = self.spec, kv_layer.shape[0]
        raw = kv_layer.view(nb, -1).view(torch.uint8)
        c, s = spec.hc * spec.hidden_size, spec.ple_state_len
        a = spec.delta_bytes
        conv = raw[:, a:a + 4 * c * s].view(torch.float32).view(nb, c, s)
        ids = raw[:, a + 4 * c * s:a + 4 * (c * s + spec.ngram - 1)].view(torch.int32)
        return conv, ids

    def _ngram_ids(self, emb: NgramEmbedding, hist: torch.Tensor) -> torch.Tensor:
        """The hashed n-gram ids ``[T, heads]`` of each position of a token history ``[T]`` (a segment restarts
        after each end-of-sequence token; positions before it read the end-of-sequence id)."""
        spec, eos = self.spec, cast(int, self.spec.eos_id)
        pos = torch.arange(hist.shape[0], device=hist.device)
        eos_at = torch.where(hist == eos, pos, -1)
        last = torch.cummax(eos_at, dim=0).values
        seg_start = torch.cat((last.new_full((1,), -1), last[:-1])) + 1
        in_seg = pos - seg_start
        shifted = [hist]
        for s in range(1, spec.ngram):
            src = pos - s
            shifted.append(torch.where((in_seg >= s) & (src >= 0), hist[src.clamp(min=0)], eos))
        mult, sizes, offs = emb.layer_multipliers, emb.ngram_heads_vocab_sizes, emb.ngram_heads_offsets
        k = spec.heads_per_ngram
        blocks = []
        for n in range(2, spec.ngram + 1):
            mixed = shifted[0] * mult[0]
            for p in range(1, n):
                mixed = torch.bitwise_xor(mixed, shifted[p] * mult[p])
            heads = slice((n - 2) * k, (n - 1) * k)
            blocks.append(torch.remainder(mixed[:, None], sizes[heads][None]) + offs[heads][None])
        return torch.cat(blocks, dim=-1)

    def _ple(self, ple: Ple, h: torch.Tensor, st: Qwen4State, kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b = self.spec, st.batch
        conv_pages, id_pages = self._ple_pages(kv_layer)
        ids = cast(torch.Tensor, st.ids).long()
        bt, ctx, eos = b.block_tokens, spec.ngram - 1, cast(int, spec.eos_id)
        cu, starts, tables = b.cu_seqlens_q.tolist(), b.start_pos.tolist(), b.block_tables.tolist()
        n, c = h.shape[0], spec.hc * spec.hidden_size
        ngram_ids = torch.empty(n, spec.ngram_heads, dtype=torch.long, device=h.device)
        begun: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, start in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if start == 0:
                ctx0 = torch.full((ctx,), eos, dtype=torch.long, device=h.device)
                conv0 = torch.zeros(c, spec.ple_state_len, device=h.device)
            else:
                page = tables[i][(start - 1) // bt]
                ctx0, conv0 = id_pages[page].long(), conv_pages[page].clone()
            hist = torch.cat((ctx0, ids[r0:r1]))
            ngram_ids[r0:r1] = self._ngram_ids(ple.ple_embedding, hist)[ctx:]
            begun.append((hist, conv0))
        emb = ple.ple_embedding.ngram_embedding(ngram_ids).flatten(-2)
        key = ple.norm_key(ple.key_proj(emb)).unflatten(-1, (spec.hc, spec.hidden_size))
        query = ple.norm_query(h).unflatten(-1, (spec.hc, spec.hidden_size))
        gate = (key * query).sum(dim=-1, keepdim=True) / math.sqrt(spec.hidden_size)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gated = torch.sigmoid(gate) * ple.value_proj(emb).unsqueeze(-2)
        normed = ple.norm_conv(gated.flatten(-2))
        conv_out = torch.empty_like(normed)
        s, w = spec.ple_state_len, ple.conv1d.weight
        for i, start in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            hist, conv0 = begun[i]
            ext = torch.cat((conv0.to(normed.dtype), normed[r0:r1].t()), dim=1)  # [C, S + L]
            conv_out[r0:r1] = F.silu(F.conv1d(ext[None], w, groups=c, dilation=spec.ngram))[0].t()
            for t in range(r1 - r0):  # (a snapshot at each block's end and at the chunk's)
                if (start + t + 1) % bt == 0 or t == r1 - r0 - 1:
                    page = tables[i][(start + t) // bt]
                    conv_pages[page] = ext[:, t + 1:t + 1 + s].float()
                    id_pages[page] = hist[t + 1:t + 1 + ctx].to(torch.int32)
        return gated.flatten(-2) + conv_out

    # --- QSA attention ---------------------------------------------------------------------------------------
    def _attention(self, attn: IndexedAttention, x: torch.Tensor, st: Qwen4State,
                   kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b = self.spec, st.batch
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        hi, di, r = spec.idx_heads, spec.idx_dim, spec.idx_ratio
        e, dt = spec.idx_heads_in_row, x.dtype
        cos, sin = st.tables["full_attention"]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, gate = attn.q_proj(x).view(n, hq, 2 * d).chunk(2, dim=-1)
        q = _rope(attn.q_norm(q), cos, sin)
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
        v = attn.v_proj(x).view(n, hkv, d)
        ix = attn.indexer
        iq, ik = ix.index_qk_proj(x).split((hi * di, di), dim=-1)
        iq = _rope(ix.q_layernorm(iq.view(n, hi, di)), cos, sin)
        bt = b.block_tokens
        tables = b.block_tables.to(x.device, torch.int64)
        pos = b.positions.to(x.device)
        pages, offs = b.page_offsets(x.device)
        kv_layer[pages, offs, 0, :hkv] = k.to(kv_layer.dtype)
        kv_layer[pages, offs, 1, :hkv] = v.to(kv_layer.dtype)
        raw = F.pad(ik, (0, 2 * e * d - di)).view(n, 2, e, d)
        kv_layer[pages, offs, :, hkv:hkv + e] = raw.to(kv_layer.dtype)
        out = torch.empty_like(q)
        keep = spec.idx_budget // r
        cu, starts = b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        for i, p0 in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            p1 = p0 + (r1 - r0)
            kpos = torch.arange(p1, device=x.device)
            kp, ko = tables[i][kpos // bt], kpos % bt
            keys = kv_layer[kp, ko, 0, :hkv].repeat_interleave(hq // hkv, dim=1)
            values = kv_layer[kp, ko, 1, :hkv].repeat_interleave(hq // hkv, dim=1)
            blocks = p1 // r
            bkeys = None
            if blocks > keep:  # (else every query sees every block: no choice to make)
                raw_keys = kv_layer[kp[:blocks * r], ko[:blocks * r], :, hkv:hkv + e].reshape(blocks * r, -1)[:, :di]
                pooled = ix.k_layernorm(raw_keys.view(blocks, r, di).float().mean(dim=1).to(dt))
                starts_pos = (torch.arange(blocks, device=x.device) * r).float()
                bc, bs = rope_tables(starts_pos, {"b": self.inv_freq["full_attention"]}, dt)["b"]
                bkeys = _rope(pooled, bc, bs).float()
            for t0 in range(0, r1 - r0, _TILE):
                t1 = min(r1 - r0, t0 + _TILE)
                qp = pos[r0 + t0:r0 + t1]
                mask = kpos[None, :] <= qp[:, None]
                if bkeys is not None:
                    chosen = self._chosen(iq[r0 + t0:r0 + t1], bkeys, (qp + 1) // r, keep, blocks)
                    in_block = kpos < blocks * r
                    pick = chosen.gather(1, (kpos // r).clamp(max=blocks - 1)[None, :].expand(len(qp), -1))
                    tail = kpos[None, :] >= ((qp + 1) // r * r)[:, None]
                    mask = mask & ((pick & in_block[None, :]) | tail)
                logits = torch.einsum("lhd,khd->hlk", q[r0 + t0:r0 + t1], keys) * d ** -0.5
                probs = logits.masked_fill(~mask[None], float("-inf")).softmax(dim=-1, dtype=torch.float32)
                out[r0 + t0:r0 + t1] = torch.einsum("hlk,khd->lhd", probs.to(values.dtype), values)
        o = out.reshape(n, hq * d) * torch.sigmoid(gate.reshape(n, hq * d))
        return cast(torch.Tensor, attn.o_proj(o))

    def _chosen(self, iq: torch.Tensor, bkeys: torch.Tensor, closed: torch.Tensor, keep: int,
                blocks: int) -> torch.Tensor:
        """``[L, blocks]``: the ``keep`` best of each query's ``closed`` blocks (all of them when fewer). Queries
        with the same closed blocks choose together, each among exactly those blocks, as transformers' per-query
        top-k does: blocks whose scores tie (a zero from all-negative heads) are then kept as transformers keeps
        them."""
        scores = F.relu(torch.einsum("lhd,bd->lhb", iq.float(), bkeys)).sum(dim=1) / math.sqrt(self.spec.idx_dim)
        chosen = torch.zeros(iq.shape[0], blocks, dtype=torch.bool, device=iq.device)
        counts, sizes = torch.unique_consecutive(closed, return_counts=True)
        row = 0
        for c, size in zip(counts.tolist(), sizes.tolist(), strict=True):
            if c <= keep:
                chosen[row:row + size, :c] = True
            else:
                top = scores[row:row + size, :c].topk(keep, dim=-1).indices
                chosen[row:row + size].scatter_(1, top, True)
            row += size
        return chosen


# --- tensors -------------------------------------------------------------------------------------------------

_SHARD = re.compile(r"^(.*\.ngram_embedding)\.shard_(\d+)\.weight$")
_BUFFERS = ("layer_multipliers", "ngram_heads_vocab_sizes", "ngram_heads_offsets")


def tensors_in(spec: Qwen4ExpSpec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as ours: the n-gram tables' shards in order, concatenated; the hash buffers checked
    against the config's (a :class:`ModelError` when they differ) and dropped; Qwen3.5's names otherwise
    (:func:`~dualpath.model.qwen_hybrid.tensors_in`: packed experts split; ``mtp.*`` dropped)."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _SHARD.match(name)
        if m:
            shards.setdefault(m.group(1), {})[int(m.group(2))] = t
        elif name.startswith("model.visual."):
            continue
        elif name.rsplit(".", 1)[-1] in _BUFFERS and ".ple.ple_embedding." in name:
            layer = int(name.split(".")[2])
            want = dict(zip(_BUFFERS, ngram_tables(spec, spec.ple_layers.index(layer))[:3], strict=False)) \
                if layer in spec.ple_layers else None
            key = name.rsplit(".", 1)[-1]
            if want is not None and not torch.equal(t.long().cpu(), want[key]):
                raise ModelError(f"{source}: {name} differs from what the config's seed, vocab_size and "
                                 f"ngram_vocab_size_base give; the n-gram hash would not be the checkpoint's")
            if want is None:
                rest[name] = t  # (left for the loader to name as unexpected)
        else:
            rest[name] = t
    for base, parts in shards.items():
        order = sorted(parts)
        if order != list(range(len(order))):
            raise ModelError(f"{source}: {base} has shards {order[:8]}{' ...' if len(order) > 8 else ''}, expected "
                             f"shard_0 .. shard_{len(order) - 1}")
        rest[base + ".weight"] = torch.cat([parts[j] for j in order])
    return qh.tensors_in(spec, rest, source)


def tensors_out(spec: Qwen4ExpSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' names: each n-gram table in ``split_ngram_parts`` shards (as transformers'
    save_pretrained chunks it), the hash buffers beside it."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".ple.ple_embedding.ngram_embedding.weight"):
            base = name[: -len(".weight")]
            for j, part in enumerate(torch.chunk(t, spec.ngram_shards, dim=0)):
                out[f"{base}.shard_{j}.weight"] = part.contiguous()
            layer = int(name.split(".")[2])
            prefix = name[: -len("ngram_embedding.weight")]
            for key, buf in zip(_BUFFERS, ngram_tables(spec, spec.ple_layers.index(layer))[:3], strict=False):
                out[prefix + key] = buf
        else:
            out[name] = t
    return out
