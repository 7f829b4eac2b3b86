"""MiniMax (``MiniMaxForCausalLM``, model_type ``minimax``: MiniMax-Text-01 / M1), as transformers runs it, over the
paged KV pool with state pages.

Layers alternate (``layer_types``) between softmax attention (RoPE, GQA) and **lightning attention**: linear
attention with a fixed decay per head, ``S <- exp(-slope_h) S + k^T v``, ``o = q S``, where ``q, k, v =
silu(qkv_proj(x))`` and ``slope_h = 2^(-8 (h + 1) / H) (1 - layer / (L - 1) + 1e-5)``; its output RMS-normalized over
all heads, times ``sigmoid(output_gate(x))``, through ``out_proj``. The state ``[H, D, D]`` lives in the layer's pages
(:mod:`dualpath.model.state_pages`; no convolution). Blocks are post-norm with scaled residuals: ``x = norm(h)``,
``h = alpha x + beta attn(x)``, and the same around the MoE (a softmax top-k router, renormalized, over SwiGLU
experts ``w1`` / ``w3`` / ``w2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.lfm2 import FeedForward
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.mamba2 import ssd_segment, ssd_step
from dualpath.model.moe import activation_of, dispatch_experts, gate_fn, softmax_topk
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import decode_states, scan_sequences, state_bytes, state_views

ARCH = "minimax"
TYPES = ("full_attention", "linear_attention")
#: MiniMaxConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "num_experts_per_tok": 2, "num_local_experts": 8, "full_attn_alpha_factor": 1, "full_attn_beta_factor": 1,
    "linear_attn_alpha_factor": 1, "linear_attn_beta_factor": 1, "mlp_alpha_factor": 1, "mlp_beta_factor": 1,
}
_FACTORS = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
            "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor")
#: transformers' precomputed decay buffers, saved in its checkpoints (derived from the config: not read)
_DERIVED = (".self_attn.slope_rate", ".self_attn.query_decay", ".self_attn.key_decay", ".self_attn.diagonal_decay")


@dataclass(frozen=True)
class MiniMaxSpec(StatePagesSpec, ModelSpec):
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)
    factors: tuple[float, ...] = (1.0,) * 6  # (_FACTORS)
    experts: int = 0
    top_k: int = 0
    block_size: int = 256  # (transformers' lightning block: the shape of its saved decay buffers only)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not 0 < self.top_k <= self.experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) must be in [1, num_local_experts "
                             f"({self.experts})]")

    @property
    def state_bytes(self) -> int:
        return state_bytes(0, 1, self.n_heads, self.head_dim, self.head_dim)

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["MiniMaxForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "num_experts_per_tok": self.top_k,
            "num_local_experts": self.experts, "layer_types": list(self.layer_types),
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_by_type["full_attention"][0]},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
            "block_size": self.block_size, **dict(zip(_FACTORS, self.factors, strict=True)),
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> MiniMaxSpec:
    """The spec of a MiniMax config (its keys over MiniMaxConfig's defaults)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (transformers' lightning attention and experts both apply it)
    if cfg.get("sliding_window") is not None:
        raise ModelError(f"{where}: sliding_window is not supported for {ARCH}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    n = cfg_int(cfg, "num_hidden_layers", where)
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where,
                      ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n)])
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return MiniMaxSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where),
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple(types), rope_by_type={"full_attention": (cfg_num({"t": theta}, "t", where), 1.0)},
        factors=tuple(cfg_num(cfg, k, where, positive=False) for k in _FACTORS),
        experts=cfg_int(cfg, "num_local_experts", where), top_k=cfg_int(cfg, "num_experts_per_tok", where),
        block_size=cfg_int({"block_size": cfg.get("block_size", 256)}, "block_size", where),
    )


def slopes(spec: MiniMaxSpec, layer: int) -> torch.Tensor:
    """Each head's decay rate in layer ``layer``: ``2^(-8 (h + 1) / H) (1 - layer / (L - 1) + 1e-5)``."""
    base = 1 / (2 ** (8 / spec.n_heads))
    return base ** (torch.arange(spec.n_heads) + 1.0) * (1 - layer / (spec.n_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(nn.Module):
    """Linear attention with a fixed decay per head over a state page (module docstring)."""

    def __init__(self, spec: MiniMaxSpec, layer: int) -> None:
        super().__init__()
        h, d = spec.n_heads, spec.head_dim
        self.heads, self.dim = h, d
        self.qkv_proj = nn.Linear(spec.hidden_size, 3 * h * d, bias=False)
        self.output_gate = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.out_proj = nn.Linear(h * d, spec.hidden_size, bias=False)
        self.norm = RMSNorm(h * d, 1e-6)
        self.register_buffer("slope", slopes(spec, layer), persistent=False)
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor, batch: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        _, rec_pages = state_views(kv_layer, 0, 1, self.heads, self.dim, self.dim)
        n, h, d = x.shape[0], self.heads, self.dim
        qkv = self.act(self.qkv_proj(x)).view(n, h, 3 * d)
        a = -cast(torch.Tensor, self.slope).float()
        if batch.is_decode:
            _, s0, commit = decode_states(batch, None, rec_pages, qkv.reshape(n, -1), None, None)
            q, k, v = qkv.float().split(d, dim=-1)
            o, s1 = ssd_step(v, torch.ones(n, h, device=x.device), a.expand(n, h), k, q, s0)
            commit(s1)
        else:
            o = torch.empty(n, h, d, dtype=torch.float32, device=x.device)

            def run(rows: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                q, k, v = rows.view(-1, h, 3 * d).float().split(d, dim=-1)
                ones = torch.ones(h, r1 - r0, device=x.device)
                y, s = ssd_segment(v.transpose(0, 1), ones, a[:, None] * ones, k.transpose(0, 1),
                                   q.transpose(0, 1), s)
                o[r0:r1] = y.transpose(0, 1)
                return s

            scan_sequences(batch, None, rec_pages, qkv.reshape(n, -1), None, None, run)
        out = self.norm(o.to(x.dtype).reshape(n, h * d))
        return cast(torch.Tensor, self.out_proj(torch.sigmoid(self.output_gate(x)) * out))


class Attention(nn.Module):
    def __init__(self, spec: MiniMaxSpec) -> None:
        super().__init__()
        h, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)


class MoE(nn.Module):
    def __init__(self, spec: MiniMaxSpec) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.hidden_size, spec.experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.intermediate_size, activation_of(spec))
                                     for _ in range(spec.experts))
        self.k = spec.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = softmax_topk(self.gate(x), self.k, True)
        return dispatch_experts(x, idx, w, self.experts)


class DecoderLayer(nn.Module):
    def __init__(self, spec: MiniMaxSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn: nn.Module = (LightningAttention(spec, layer) if spec.layer_types[layer] == "linear_attention"
                                     else Attention(spec))
        self.block_sparse_moe = MoE(spec)



class MiniMaxModel(HybridDecoder):
    """MiniMax (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: MiniMaxSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda i: DecoderLayer(spec, i)), device, backend)
        self.spec: MiniMaxSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        fa, fb, la, lb, ma, mb = spec.factors
        x = mod.input_layernorm(st.hidden)
        if spec.layer_types[layer] == "linear_attention":
            h = x * la + cast(LightningAttention, mod.self_attn)(x, b, kv_layer) * lb
        else:
            attn = cast(Attention, mod.self_attn)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            cos, sin = st.tables["full_attention"]
            cos, sin = cos[:, None, :], sin[:, None, :]
            o = self.attend(_rope(attn.q_proj(x).view(n, hq, d), cos, sin),
                            _rope(attn.k_proj(x).view(n, hkv, d), cos, sin), attn.v_proj(x).view(n, hkv, d),
                            layer_view(kv_layer, hkv, d), b, d ** -0.5)
            h = x * fa + attn.o_proj(o.reshape(n, hq * d)) * fb
        y = mod.post_attention_layernorm(h)
        st.hidden = y * ma + mod.block_sparse_moe(y) * mb
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names: transformers' precomputed decay buffers left out, its packed
    experts (``mlp.experts.gate_up_proj`` / ``down_proj``) split into the hub's ``w1`` / ``w3`` / ``w2``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_DERIVED):
            continue
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            if t.dim() != 3:
                raise ModelError(f"{source}: packed expert tensor {name!r} has shape {tuple(t.shape)}")
            base = name.rsplit(".mlp.experts.", 1)[0] + ".block_sparse_moe.experts"
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = t[e].chunk(2, dim=0)
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e]
            continue
        out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    return out


def tensors_out(spec: MiniMaxSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors plus the decay buffers transformers saves with each lightning layer (derived from the config)."""
    out = dict(tensors)
    steps = torch.arange(spec.block_size) + 1.0
    for layer, kind in enumerate(spec.layer_types):
        if kind != "linear_attention":
            continue
        rate = slopes(spec, layer)[:, None, None]
        diag = rate * (steps[:, None] - steps[None, :])[None, None]
        head = f"model.layers.{layer}.self_attn."
        out.update({head + "slope_rate": rate, head + "query_decay": torch.exp(-rate * steps[:, None]),
                    head + "key_decay": torch.exp(-rate * (spec.block_size - steps[:, None])),
                    head + "diagonal_decay": torch.exp(torch.where(diag >= 0, -diag, float("-inf")))})
    return out
