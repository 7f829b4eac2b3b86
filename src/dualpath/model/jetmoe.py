"""JetMoE (``JetMoeForCausalLM``, model_type ``jetmoe``), as transformers runs it, over the paged KV pool.

Both halves of each layer are mixtures of experts routed the same way (the top ``num_experts_per_tok`` router
logits, weighted by their softmax):

* **attention experts** (MoA): each chosen expert projects the token's queries (``num_key_value_heads`` heads of
  ``kv_channels``); keys and values come from one shared ``kv_proj``, so the KV pages hold ``num_key_value_heads``
  heads like any model's. Query head ``e * H + g`` (slot ``e``) attends with KV head ``g``: the queries are reordered
  to the grouped-query layout the paged kernels use and back. Each slot's output goes through its expert's output
  projection, weighted, summed, plus a bias;
* **MLP experts**: GLU experts (``input_linear`` ``[E, 2I, H]``, ``output_linear``), weighted, summed, plus a bias.

Its block norms have epsilon 1e-6 whatever ``rms_norm_eps`` says (only the final norm reads it), as transformers
builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, LlamaModel, RMSNorm, _rope
from dualpath.model.moe import gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, config_dtype

ARCH = "jetmoe"
#: JetMoeConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 12, "num_key_value_heads": 16,
    "kv_channels": 128, "intermediate_size": 5632, "max_position_embeddings": 4096, "activation_function": "silu",
    "num_local_experts": 8, "num_experts_per_tok": 2, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class JetMoeSpec(ModelSpec):
    """A :class:`ModelSpec` (``n_heads``: ``top_k x n_kv_heads``) plus JetMoE's experts."""

    moe_experts: int = 0
    moe_top_k: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.moe_top_k <= self.moe_experts or self.n_heads != self.moe_top_k * self.n_kv_heads:
            raise ModelError(f"model config: jetmoe needs 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"num_local_experts ({self.moe_experts}), its query heads top_k x num_key_value_heads")

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["JetMoeForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers, "num_key_value_heads": self.n_kv_heads,
            "kv_channels": self.head_dim, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position,
            "activation_function": hf_activation(self.activation),
            "num_local_experts": self.moe_experts, "num_experts_per_tok": self.moe_top_k,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_embeddings, "rms_norm_eps": self.rms_eps, "dtype": self.dtype,
            "rope_parameters": {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta},
        }




def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> JetMoeSpec:
    """The spec of a JetMoE config (its keys over JetMoeConfig's defaults)."""
    from dualpath.model.spec_common import parse_rope

    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where, "activation_function")  # (its GLU experts' gate)
    kv, top_k = cfg_int(cfg, "num_key_value_heads", where), cfg_int(cfg, "num_experts_per_tok", where)
    theta, scaling = parse_rope(cfg, where)
    dtype = config_dtype(cfg, dtype)
    eps = cfg.get("rms_norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ModelError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}")
    return JetMoeSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=cfg_int(cfg, "num_hidden_layers", where),
        n_heads=kv * top_k, n_kv_heads=kv, head_dim=cfg_int(cfg, "kv_channels", where), rms_eps=float(eps),
        rope_theta=theta, rope_scaling=scaling, max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=dtype, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        moe_experts=cfg_int(cfg, "num_local_experts", where), moe_top_k=top_k,
    )


# --- modules -------------------------------------------------------------------------------------------------


class ParallelExperts(nn.Module):
    def __init__(self, experts: int, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, outputs, inputs))


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden, experts, bias=False)
        self.k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k] in x's dtype, expert ids [N, k])``: the softmax of the top-k logits."""
        logits, idx = self.layer(x).float().topk(self.k, dim=1)
        return torch.softmax(logits, dim=1).type_as(x), idx


class MoA(nn.Module):
    """The attention experts: ``map`` gives each token's ``k`` slots' queries, ``reduce`` their outputs, summed."""

    def __init__(self, spec: JetMoeSpec) -> None:
        super().__init__()
        width = spec.n_kv_heads * spec.head_dim
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size))
        self.input_linear = ParallelExperts(spec.moe_experts, spec.hidden_size, width)
        self.output_linear = ParallelExperts(spec.moe_experts, width, spec.hidden_size)
        self.router = Router(spec.hidden_size, spec.moe_experts, spec.moe_top_k)


class MoE(nn.Module):
    def __init__(self, spec: JetMoeSpec) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(spec.hidden_size))
        self.input_linear = ParallelExperts(spec.moe_experts, spec.hidden_size, 2 * spec.intermediate_size)
        self.output_linear = ParallelExperts(spec.moe_experts, spec.intermediate_size, spec.hidden_size)
        self.router = Router(spec.hidden_size, spec.moe_experts, spec.moe_top_k)
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.router(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            a, b = F.linear(x[tok], self.input_linear.weight[e]).chunk(2, dim=-1)
            y = F.linear(self.act(a) * b, self.output_linear.weight[e]) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out + self.bias


class Attention(nn.Module):
    def __init__(self, spec: JetMoeSpec) -> None:
        super().__init__()
        self.experts = MoA(spec)
        self.kv_proj = nn.Linear(spec.hidden_size, 2 * spec.n_kv_heads * spec.head_dim, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, spec: JetMoeSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, 1e-6)
        self.self_attention = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, 1e-6)
        self.mlp = MoE(spec)


class Backbone(nn.Module):
    def __init__(self, spec: JetMoeSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class JetMoeModel(LlamaModel):
    """JetMoE's decoder (module docstring) on the Llama path's embeddings, RoPE tables and head."""

    _to_grouped: torch.Tensor
    _from_grouped: torch.Tensor

    def __init__(self, spec: JetMoeSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        nn.Module.__init__(self)
        from dualpath.model.rope import rope_inv_freq

        self._build(spec, Backbone(spec), device, backend)
        inv_freq, self._rope_scale = rope_inv_freq(spec)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("local_inv_freq", None, persistent=False)
        self.register_buffer("embed_scale", torch.tensor(1.0).to(spec.torch_dtype).to(device), persistent=False)
        self.register_buffer("alibi_slopes", None, persistent=False)
        self.residual_scale = None
        k, h = spec.moe_top_k, spec.n_kv_heads
        # its query head e * h + g -> the grouped layout's g * k + e (and back)
        to_grouped = torch.tensor([e * h + g for g in range(h) for e in range(k)], device=device)
        self.register_buffer("_to_grouped", to_grouped, persistent=False)
        self.register_buffer("_from_grouped", torch.argsort(to_grouped), persistent=False)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        spec, b = cast(JetMoeSpec, self.spec), state.batch
        h, d, k = spec.n_kv_heads, spec.head_dim, spec.moe_top_k
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, h, d))
        mod = cast(DecoderLayer, self.model.layers[layer])
        moa = mod.self_attention.experts
        x = mod.input_layernorm(state.hidden)
        n = x.shape[0]
        w, idx = moa.router(x)
        q = torch.empty(n, k, h * d, dtype=x.dtype, device=x.device)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            q[tok, slot] = F.linear(x[tok], moa.input_linear.weight[e])
        kk, v = mod.self_attention.kv_proj(x).chunk(2, dim=-1)
        cos, sin = state.cos[:, None, :], state.sin[:, None, :]
        q = _rope(q.view(n, k * h, d), cos, sin)
        kk = _rope(kk.reshape(n, h, d), cos, sin)
        store_kv(kk, v.reshape(n, h, d), kv_layer, b.slot_mapping, backend=self.backend)
        qg = q[:, self._to_grouped]
        scale = d ** -0.5
        if b.is_decode:
            o = paged_decode_attention(qg, kv_layer, b.block_tables, b.seq_lens, scale, backend=self.backend)
        else:
            o = paged_prefill_attention(qg, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos, scale,
                                        backend=self.backend)
        o = o[:, self._from_grouped].reshape(n, k, h * d)
        a = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            y = F.linear(o[tok, slot], moa.output_linear.weight[e]) * w[tok, slot, None]
            a.index_add_(0, tok, y.to(a.dtype))
        hidden = state.hidden + (a + moa.bias)
        state.hidden = hidden + mod.mlp(mod.post_attention_layernorm(hidden))
        state.next_layer += 1
