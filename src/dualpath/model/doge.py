"""SmallDoge's Doge (``DogeForCausalLM``, model_type ``doge``), as transformers runs it, over the paged KV pool.

Llama's blocks with three changes:

* **Dynamic mask attention.** Each key adds a bias to every query's score, per KV head: ``exp(A * softplus(
  dt_proj(v)))`` of the token's value heads (``A`` per KV head); a query that sees more than ``keep_window_size``
  keys keeps only the ones with the largest biases. Per-head RMS norms on queries and keys, RoPE over the whole head,
  GQA, an optional ``sliding_window``. A token's biases live in its page row after its keys and values, so a prefix
  read from storage or forwarded brings them along; attention runs in torch. Keys whose biases tie (copies of one
  token in the first layer) are ranked by the same top-k over the same rows as transformers ranks them (every key
  so far, the hidden ones at the dtype's minimum), so they go the same way; transformers' own cached decode under a
  sliding window ranks shorter rows and may keep others.
* **Learned residual scales**: ``h = input_residual * h + attn(norm(h))``, and the same with
  ``post_attention_residual`` around the MLP.
* **CDMoE** (``is_moe``): a shared SwiGLU MLP plus ``num_experts`` one-neuron experts (``down_embed``,
  ``up_embed``) retrieved by product keys: the router's two halves each rank ``sqrt(num_experts)`` keys, the
  ``num_experts_per_tok`` best sums pick the experts, weighted by their softmax. Routing is per token. transformers'
  multi-token forward reshapes the router's logits across tokens (its comment: "routing is not causal in a full
  forward pass"), so a prompt's logits there depend on later tokens; its token-by-token generation routes each
  token alone, which is what runs here (the tests compare with that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, TypedRopeState, _rope
from dualpath.model.moe import gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "doge"
#: DogeConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32768, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 32,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048,
    "num_attention_heads": 8, "attention_bias": False, "mlp_bias": False, "keep_window_size": 2048,
    "is_moe": False, "num_experts": 16384, "num_experts_per_tok": 64, "norm_topk_prob": False,
}
#: queries attended together in a prefill
_TILE = 128


@dataclass(frozen=True)
class DogeSpec(ModelSpec):
    """A :class:`ModelSpec` (Llama's shapes) plus Doge's fields."""

    keep_window: int = 2048
    window: int | None = None
    mlp_bias: bool = False
    is_moe: bool = False
    experts: int = 0
    top_k: int = 0
    norm_topk: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_moe:
            keys = math.isqrt(self.experts)
            if keys < 1 or not 0 < self.top_k <= keys * keys:
                raise ModelError(f"model config: CDMoE needs num_experts_per_tok ({self.top_k}) in [1, "
                                 f"floor(sqrt(num_experts))^2 = {keys * keys}]")

    @property
    def bias_heads(self) -> int:
        """Row heads after the KV heads that hold a token's per-KV-head biases (K and V halves both)."""
        return -(-self.n_kv_heads // (2 * self.head_dim))

    def layer_window(self, layer: int) -> int | None:
        return self.window

    @property
    def rope_by_type(self) -> dict[str, float]:
        return {"full": self.rope_theta}

    def kv_spec(self) -> KVSpec:
        return KVSpec.mha(self.n_layers, self.n_kv_heads + self.bias_heads, self.head_dim, self.dtype)

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": ["DogeForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": hf_activation(self.activation), "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_position,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias, "sliding_window": self.window,
            "keep_window_size": self.keep_window, "is_moe": self.is_moe, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": None, "dtype": self.dtype,
        }
        if self.is_moe:
            cfg.update(num_experts=self.experts, num_experts_per_tok=self.top_k, norm_topk_prob=self.norm_topk)
        return cfg


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> DogeSpec:
    """The spec of a Doge config (its keys over DogeConfig's defaults)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its MLP's gate and its experts' down products)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for doge, got {rope!r}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelError(f"{where}: rope_parameters.partial_rotary_factor must be 1 (Doge rotates whole heads)")
    theta = cfg_num({"rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    hidden = cfg_int(cfg, "hidden_size", where)
    if hidden % heads:
        raise ModelError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                         "(Doge's head width is their quotient)")
    window = cfg.get("sliding_window")
    moe = bool(cfg["is_moe"])
    return DogeSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=cfg_int(cfg, "num_hidden_layers", where),
        n_heads=heads, n_kv_heads=cfg_int({"n": cfg.get("num_key_value_heads") or heads}, "n", where),
        head_dim=hidden // heads, rms_eps=cfg_num(cfg, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        keep_window=cfg_int(cfg, "keep_window_size", where),
        window=None if window is None else cfg_int(cfg, "sliding_window", where), mlp_bias=bool(cfg["mlp_bias"]),
        is_moe=moe, experts=cfg_int(cfg, "num_experts", where) if moe else 0,
        top_k=cfg_int(cfg, "num_experts_per_tok", where) if moe else 0, norm_topk=bool(cfg["norm_topk_prob"]),
    )


# --- modules (the checkpoints' names) ----------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: DogeSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.A = nn.Parameter(torch.zeros(hkv))
        self.dt_proj = nn.Linear(hkv * d, hkv, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_eps)
        self.k_norm = RMSNorm(d, spec.rms_eps)


class Mlp(nn.Module):
    def __init__(self, spec: DogeSpec) -> None:
        super().__init__()
        h, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class CdMoe(Mlp):
    """The shared MLP plus the product-key-retrieved one-neuron experts (module docstring), per token."""

    def __init__(self, spec: DogeSpec) -> None:
        super().__init__(spec)
        self.keys = math.isqrt(spec.experts)
        self.router_gate = nn.Linear(spec.hidden_size, 2 * self.keys, bias=False)
        self.down_embed = nn.Embedding(spec.experts, spec.hidden_size)
        self.up_embed = nn.Embedding(spec.experts, spec.hidden_size)
        self.top_k, self.norm_topk = spec.top_k, spec.norm_topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.keys
        logits = self.router_gate(x)
        sx, ix = logits[:, :k].topk(k, dim=-1)
        sy, iy = logits[:, k:].topk(k, dim=-1)
        scores, pos = (sx[:, :, None] + sy[:, None, :]).reshape(n, -1).topk(self.top_k, dim=-1)
        idx = (ix[:, :, None] * k + iy[:, None, :]).reshape(n, -1).gather(1, pos)
        w = F.softmax(scores, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        act = self.act(torch.bmm(self.down_embed(idx), x[:, :, None])[..., 0]) * w
        experts = torch.bmm(act[:, None, :], self.up_embed(idx))[:, 0]
        return super().forward(x) + experts


class DecoderLayer(nn.Module):
    def __init__(self, spec: DogeSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec)
        self.input_residual = nn.Parameter(torch.ones(spec.hidden_size))
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: Mlp = CdMoe(spec) if spec.is_moe else Mlp(spec)
        self.post_attention_residual = nn.Parameter(torch.ones(spec.hidden_size))


class Backbone(nn.Module):
    def __init__(self, spec: DogeSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class DogeModel(TypedRopeDecoder):
    """Doge (module docstring) over a paged KV pool whose rows also hold each token's key biases."""

    def __init__(self, spec: DogeSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self._typed_rope(spec)
        self.spec: DogeSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        spec, b = self.spec, state.batch
        self.check_layer(layer, state, kv_layer,
                         (b.block_tokens, 2, spec.n_kv_heads + spec.bias_heads, spec.head_dim))
        mod = cast(DecoderLayer, self.model.layers[layer])
        st = cast(TypedRopeState, state)
        h = st.hidden
        h = mod.input_residual * h + self._attention(mod.self_attn, mod.input_layernorm(h), st, kv_layer)
        st.hidden = mod.post_attention_residual * h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1

    def _attention(self, attn: Attention, x: torch.Tensor, st: TypedRopeState,
                   kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b = self.spec, st.batch
        n, hq, hkv, d, e = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.bias_heads
        cos, sin = st.tables["full"]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)), cos, sin)
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos, sin)
        v = attn.v_proj(x).view(n, hkv, d)
        dt = torch.exp(attn.A * F.softplus(attn.dt_proj(v.reshape(n, hkv * d))))  # [N, Hkv]: each key's bias
        bt = b.block_tokens
        tables = b.block_tables.to(x.device, torch.int64)
        pos = b.positions.to(x.device)
        pages, offs = b.page_offsets(x.device)
        kv_layer[pages, offs, 0, :hkv] = k.to(kv_layer.dtype)
        kv_layer[pages, offs, 1, :hkv] = v.to(kv_layer.dtype)
        kv_layer[pages, offs, :, hkv:hkv + e] = F.pad(dt, (0, 2 * e * d - hkv)).view(n, 2, e, d).to(kv_layer.dtype)
        out = torch.empty_like(q)
        groups = hq // hkv
        cu, starts = b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        for i, p0 in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            kpos = torch.arange(p0 + (r1 - r0), device=x.device)
            kp, ko = tables[i][kpos // bt], kpos % bt
            keys = kv_layer[kp, ko, 0, :hkv].repeat_interleave(groups, dim=1)
            values = kv_layer[kp, ko, 1, :hkv].repeat_interleave(groups, dim=1)
            bias = kv_layer[kp, ko, :, hkv:hkv + e].reshape(len(kpos), -1)[:, :hkv].t()  # [Hkv, P]
            for t0 in range(0, r1 - r0, _TILE):
                t1 = min(r1 - r0, t0 + _TILE)
                qp = pos[r0 + t0:r0 + t1]
                seen = kpos[None, :] <= qp[:, None]
                if spec.window is not None:
                    seen = seen & (kpos[None, :] > qp[:, None] - spec.window)
                mask = seen[None].expand(hkv, -1, -1)  # [Hkv, L, P]
                if int(seen.sum(dim=1).max()) > spec.keep_window:  # (some query keeps its largest biases only)
                    # (the rows transformers ranks: each query's biases over every key so far, the others at the
                    # dtype's minimum; equal biases, e.g. one token's copies in the first layer, then go as its
                    # top-k sends them)
                    ranked = bias[:, None, :].masked_fill(~mask, torch.finfo(bias.dtype).min)
                    top = ranked.topk(spec.keep_window, dim=-1).indices
                    mask = mask & torch.zeros_like(mask).scatter_(-1, top, True)
                mask = mask.repeat_interleave(groups, dim=0)
                logits = torch.einsum("lhd,khd->hlk", q[r0 + t0:r0 + t1], keys) * d ** -0.5
                logits = logits + bias.repeat_interleave(groups, dim=0)[:, None, :].to(logits.dtype)
                probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
                out[r0 + t0:r0 + t1] = torch.einsum("hlk,khd->lhd", probs.to(values.dtype), values)
        return cast(torch.Tensor, attn.o_proj(out.reshape(n, hq * d)))


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as ours (the same names; rotary buffers left out)."""
    return {k: v for k, v in tensors.items() if "rotary_emb." not in k}
