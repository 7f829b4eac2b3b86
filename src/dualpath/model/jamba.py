"""AI21's Jamba (``JambaForCausalLM``, model_type ``jamba``), as transformers runs it, over the paged KV pool with
state pages.

Layer ``i`` is attention when ``i % attn_layer_period == attn_layer_offset`` (no positional encoding: the Mamba layers
carry order), else Mamba (:class:`dualpath.model.mamba1.MambaMixer` with RMS norms on dt, B and C); its feed-forward
is a SwiGLU, or, when ``i % expert_layer_period == expert_layer_offset``, ``num_experts`` of them under a softmax top-k
router whose weights are not renormalized. Pre-norm blocks (``input_layernorm``, ``pre_ff_layernorm``), a final
``final_layernorm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec, final_norm_in, final_norm_out
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm
from dualpath.model.mamba1 import MambaMixer
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes

ARCH = "jamba"
#: JambaConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 262144,
    "num_experts_per_tok": 2, "num_experts": 16, "expert_layer_period": 2, "expert_layer_offset": 1,
    "attn_layer_period": 8, "attn_layer_offset": 4, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_dt_rank": "auto", "mamba_conv_bias": True, "mamba_proj_bias": False,
}


@dataclass(frozen=True)
class JambaSpec(StatePagesSpec, ModelSpec):
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)
    moe_layers: tuple[int, ...] = ()
    experts: int = 0
    top_k: int = 0
    periods: tuple[int, int, int, int] = (8, 4, 2, 1)  # attention period, offset; experts period, offset
    inner: int = 0
    state: int = 0
    kernel: int = 0
    dt_rank: int = 0
    conv_bias: bool = True
    proj_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if self.moe_layers and not 0 < self.top_k <= self.experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) must be in [1, num_experts "
                             f"({self.experts})]")

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.inner, self.kernel, 1, self.inner, self.state)

    def to_hf_config(self) -> dict[str, Any]:
        ap, ao, ep, eo = self.periods
        return {
            "architectures": ["JambaForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "hidden_act": hf_activation(self.activation),
            "rms_norm_eps": self.rms_eps, "max_position_embeddings": self.max_position,
            "num_experts_per_tok": self.top_k or 2, "num_experts": self.experts or 1, "expert_layer_period": ep,
            "expert_layer_offset": eo, "attn_layer_period": ap, "attn_layer_offset": ao,
            "mamba_d_state": self.state, "mamba_d_conv": self.kernel, "mamba_expand": self.inner // self.hidden_size,
            "mamba_dt_rank": self.dt_rank, "mamba_conv_bias": self.conv_bias, "mamba_proj_bias": self.proj_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> JambaSpec:
    """The spec of a Jamba config (its keys over JambaConfig's defaults; ``num_local_experts`` read as
    ``num_experts``)."""
    if cfg.get("num_experts") is None and cfg.get("num_local_experts") is not None:
        cfg = {**cfg, "num_experts": cfg["num_local_experts"]}
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its experts', MLPs' and Mamba convolutions')
    n = cfg_int(cfg, "num_hidden_layers", where)
    ap, ep = cfg_int(cfg, "attn_layer_period", where), cfg_int(cfg, "expert_layer_period", where)
    ao = cfg_int(cfg, "attn_layer_offset", where, minimum=0)
    eo = cfg_int(cfg, "expert_layer_offset", where, minimum=0)
    experts = cfg_int(cfg, "num_experts", where)
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    rank = cfg.get("mamba_dt_rank")
    rank = -(-hidden // 16) if rank == "auto" else cfg_int({"mamba_dt_rank": rank}, "mamba_dt_rank", where)
    return JambaSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where), head_dim=hidden // heads,
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=tuple("full_attention" if i % ap == ao else "linear_attention" for i in range(n)),
        moe_layers=tuple(i for i in range(n) if experts > 1 and i % ep == eo), experts=experts,
        top_k=cfg_int(cfg, "num_experts_per_tok", where), periods=(ap, ao, ep, eo),
        inner=cfg_int(cfg, "mamba_expand", where) * hidden, state=cfg_int(cfg, "mamba_d_state", where),
        kernel=cfg_int(cfg, "mamba_d_conv", where), dt_rank=rank, conv_bias=bool(cfg["mamba_conv_bias"]),
        proj_bias=bool(cfg["mamba_proj_bias"]),
    )


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, hidden))


class MoE(nn.Module):
    """Softmax top-k, the weights left unnormalized (rounded to the input's dtype), over SwiGLU experts."""

    def __init__(self, spec: JambaSpec) -> None:
        super().__init__()
        self.router = Router(spec.hidden_size, spec.experts)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec))
                                     for _ in range(spec.experts))
        self.k = spec.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = F.linear(x, self.router.weight).softmax(dim=-1, dtype=torch.float).topk(self.k, dim=-1)
        return dispatch_experts(x, idx, w.to(x.dtype), self.experts)


class Attention(nn.Module):
    def __init__(self, spec: JambaSpec) -> None:
        super().__init__()
        h, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, spec: JambaSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.pre_ff_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        if spec.layer_types[layer] == "full_attention":
            self.self_attn = Attention(spec)
        else:
            self.mamba = MambaMixer(spec.hidden_size, spec.inner, spec.state, spec.kernel, spec.dt_rank,
                                    proj_bias=spec.proj_bias, conv_bias=spec.conv_bias, norms="jamba",
                                    eps=spec.rms_eps, act=activation_of(spec))
        self.feed_forward: nn.Module = (MoE(spec) if layer in spec.moe_layers
                                        else FeedForward(spec.hidden_size, spec.intermediate_size,
                                                         act=activation_of(spec)))



class JambaModel(HybridDecoder):
    """Jamba (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: JambaSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda i: DecoderLayer(spec, i)), device, backend)
        self.spec: JambaSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        x = mod.input_layernorm(st.hidden)
        if spec.layer_types[layer] == "linear_attention":
            out = cast(MambaMixer, mod.mamba)(x, b, kv_layer)
        else:
            attn = cast(Attention, mod.self_attn)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            o = self.attend(attn.q_proj(x).view(n, hq, d), attn.k_proj(x).view(n, hkv, d),
                            attn.v_proj(x).view(n, hkv, d), layer_view(kv_layer, hkv, d), b, d ** -0.5)
            out = attn.o_proj(o.reshape(n, hq * d))
        h = st.hidden + out
        st.hidden = h + mod.feed_forward(mod.pre_ff_layernorm(h))
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (``final_layernorm``; transformers' packed experts split)."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in final_norm_in(tensors).items():
        name = name.replace(".feed_forward.experts.", ".mlp.experts.") if name.endswith(
            (".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")) else name
        if _split_packed_experts(name, t, out, source):
            continue
        out[name] = t
    return {k.replace(".mlp.experts.", ".feed_forward.experts."): v for k, v in out.items()}


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return final_norm_out(tensors)
