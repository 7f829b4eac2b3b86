"""IBM's Granite 4.0 hybrid (``GraniteMoeHybridForCausalLM``, model_type ``granitemoehybrid``), as transformers runs
it, over the paged KV pool with state pages.

Each layer (``layer_types``: ``mamba`` / ``linear_attention`` or ``attention`` / ``full_attention``) is a Mamba-2 mixer
(:mod:`dualpath.model.mamba2`; its state in the layer's pages, :mod:`dualpath.model.state_pages`) or Granite's
attention (scores scaled by ``attention_multiplier``; RoPE only with ``position_embedding_type: rope``, else none),
then a feed-forward: softmax over the top-k router logits of ``num_local_experts`` experts (none when 0) plus a
shared SwiGLU MLP (``shared_mlp``, fused ``input_linear``). Granite's scalings: embeddings times
``embedding_multiplier``, each block's output times ``residual_multiplier``, logits divided by ``logits_scaling``.

IBM's Bamba (``BambaForCausalLM``, model_type ``bamba``) is the same stack without the scalings and the MoE: Mamba-2
layers and attention layers (``attn_layer_indices``; RoPE on half of each head, as transformers hard-codes it), each
followed by a Llama SwiGLU (``feed_forward``) behind ``pre_ff_layernorm``.
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
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.mamba2 import Mamba2Mixer
from dualpath.model.moe import Activation, FeedForward, activation_of, gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes

ARCH = "granitemoehybrid"
BAMBA = "bamba"
#: BambaConfig's defaults, where they differ
BAMBA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000, "intermediate_size": 14336, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 262144, "num_local_experts": 0, "mlp_bias": False, "attn_layer_indices": None,
}
#: GraniteMoeHybridConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
    "residual_multiplier": 1.0, "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    "shared_intermediate_size": 1024, "position_embedding_type": None, "mamba_n_heads": 128, "mamba_n_groups": 1,
    "mamba_d_state": 256, "mamba_d_head": "auto", "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True,
    "mamba_proj_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}
#: layer types as configs name them (transformers' legacy names first) -> ours
_KINDS = {"mamba": "linear_attention", "attention": "full_attention", "linear_attention": "linear_attention",
          "full_attention": "full_attention"}
#: transformers' in-memory MoE names -> the hub's, which transformers writes and we hold
_NAMES = ((".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight"),
          (".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight"),
          (".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight"))


@dataclass(frozen=True)
class GraniteHybridSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the attention layers' shape, Granite's scalings) plus the Mamba-2 layers' and MoE's."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # empty: no RoPE
    scales: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)  # embedding, residual, attention, logits
    mamba_heads: int = 0
    mamba_groups: int = 0
    mamba_state: int = 0
    mamba_inner: int = 0
    mamba_kernel: int = 0
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    experts: int = 0
    top_k: int = 0
    shared_width: int = 0
    mlp_bias: bool = False  # (Bamba's feed-forward)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        n = self.n_layers
        if len(self.layer_types) != n or any(t not in ("linear_attention", "full_attention") for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'mamba' or 'attention' for each of the {n} layers, "
                             f"got {list(self.layer_types)}")
        if self.mamba_heads <= 0 or self.mamba_inner % self.mamba_heads or self.mamba_heads % self.mamba_groups:
            raise ModelError(f"model config: mamba_n_heads ({self.mamba_heads}) must divide mamba_expand x "
                             f"hidden_size ({self.mamba_inner}) and be a multiple of mamba_n_groups "
                             f"({self.mamba_groups})")
        if self.experts and not 0 < self.top_k <= self.experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) must be in [1, num_local_experts "
                             f"({self.experts})]")

    @property
    def state_bytes(self) -> int:
        conv = self.mamba_inner + 2 * self.mamba_groups * self.mamba_state
        return state_bytes(conv, self.mamba_kernel, self.mamba_heads, self.mamba_inner // self.mamba_heads,
                           self.mamba_state)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None, arch: str = ARCH) -> GraniteHybridSpec:
    """The spec of a Granite 4.0 hybrid or Bamba config (its keys over the config class' defaults)."""
    bamba = arch == BAMBA
    cfg = {**DEFAULTS, **(BAMBA_DEFAULTS if bamba else {}), **{k: v for k, v in cfg.items() if v is not None}}
    if bamba:
        n = cfg_int(cfg, "num_hidden_layers", where)
        idx = cfg.get("attn_layer_indices") or []
        if not isinstance(idx, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
            raise ModelError(f"{where}: attn_layer_indices must be a list of layer indices, got {idx!r}")
        cfg = {**cfg, "layer_types": ["attention" if i in idx else "mamba" for i in range(n)],
               "position_embedding_type": "rope", "num_local_experts": 0}
        for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            cfg[key] = 1.0
    act = gate_activation(cfg, where)  # (the MLPs', the experts' and the Mamba convolutions')
    limit = cfg.get("time_step_limit")
    if limit is not None and (not isinstance(limit, (list, tuple)) or len(limit) != 2
                              or float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        raise ModelError(f"{where}: time_step_limit {limit!r} is not supported (only the default (0, inf), which "
                         f"transformers' decode step also assumes)")
    n = cfg_int(cfg, "num_hidden_layers", where)
    kinds = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * n
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in _KINDS for k in kinds):
        raise ModelError(f"{where}: layer_types must name 'mamba' or 'attention' for each of the {n} layers, got "
                         f"{kinds!r}")
    heads = cfg_int(cfg, "num_attention_heads", where)
    hidden = cfg_int(cfg, "hidden_size", where)
    rope: dict[str, tuple[float, float]] = {}
    pos = cfg.get("position_embedding_type")
    if pos == "rope":
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(params, dict) or params.get("rope_type", params.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got "
                             f"{params!r}")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope = {"full_attention": (cfg_num({"rope_theta": theta}, "rope_theta", where), 0.5 if bamba else 1.0)}
    elif pos not in (None, "nope"):
        raise ModelError(f"{where}: position_embedding_type must be 'rope' or null, got {pos!r}")
    inner = cfg_int(cfg, "mamba_expand", where) * hidden
    mheads = cfg_int(cfg, "mamba_n_heads", where)
    d_head = cfg.get("mamba_d_head", "auto")
    if d_head != "auto" and d_head * mheads != inner:
        raise ModelError(f"{where}: mamba_d_head ({d_head}) x mamba_n_heads ({mheads}) must equal mamba_expand x "
                         f"hidden_size ({inner})")
    experts = cfg_int(cfg, "num_local_experts", where, minimum=0)
    head_dim = cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where)
    if bamba:
        cfg["attention_multiplier"] = head_dim ** -0.5
    return GraniteHybridSpec(
        architecture=arch, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or heads}, "k", where),
        head_dim=head_dim, rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(_KINDS[k] for k in kinds), rope_by_type=rope,
        scales=tuple(cfg_num(cfg, k, where) for k in ("embedding_multiplier", "residual_multiplier",
                                                       "attention_multiplier", "logits_scaling")),  # type: ignore[arg-type]
        mamba_heads=mheads, mamba_groups=cfg_int(cfg, "mamba_n_groups", where),
        mamba_state=cfg_int(cfg, "mamba_d_state", where), mamba_inner=inner,
        mamba_kernel=cfg_int(cfg, "mamba_d_conv", where), mamba_conv_bias=bool(cfg["mamba_conv_bias"]),
        mamba_proj_bias=bool(cfg["mamba_proj_bias"]), experts=experts,
        top_k=cfg_int(cfg, "num_experts_per_tok", where) if experts else 0,
        shared_width=0 if bamba else cfg_int(cfg, "shared_intermediate_size", where),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def hf_config(spec: GraniteHybridSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    emb, res, att, logits = spec.scales
    if spec.architecture == BAMBA:
        return {
            "architectures": ["BambaForCausalLM"], "model_type": BAMBA, "vocab_size": spec.vocab_size,
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
            "num_key_value_heads": spec.n_kv_heads, "hidden_act": hf_activation(spec.activation),
            "max_position_embeddings": spec.max_position,
            "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": spec.tie_embeddings,
            "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias,
            "attn_layer_indices": [i for i, t in enumerate(spec.layer_types) if t == "full_attention"],
            "mamba_n_heads": spec.mamba_heads, "mamba_n_groups": spec.mamba_groups,
            "mamba_d_state": spec.mamba_state, "mamba_d_head": spec.mamba_inner // spec.mamba_heads,
            "mamba_d_conv": spec.mamba_kernel, "mamba_expand": spec.mamba_inner // spec.hidden_size,
            "mamba_conv_bias": spec.mamba_conv_bias, "mamba_proj_bias": spec.mamba_proj_bias,
            "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_by_type["full_attention"][0]},
            "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
        }
    cfg: dict[str, Any] = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "hidden_act": hf_activation(spec.activation),
            "max_position_embeddings": spec.max_position,
        "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.attention_bias, "embedding_multiplier": emb, "residual_multiplier": res,
        "attention_multiplier": att, "logits_scaling": logits, "num_local_experts": spec.experts,
        "num_experts_per_tok": spec.top_k or 2, "shared_intermediate_size": spec.shared_width,
        "layer_types": ["mamba" if t == "linear_attention" else "attention" for t in spec.layer_types],
        "mamba_n_heads": spec.mamba_heads, "mamba_n_groups": spec.mamba_groups, "mamba_d_state": spec.mamba_state,
        "mamba_d_head": spec.mamba_inner // spec.mamba_heads, "mamba_d_conv": spec.mamba_kernel,
        "mamba_expand": spec.mamba_inner // spec.hidden_size, "mamba_conv_bias": spec.mamba_conv_bias,
        "mamba_proj_bias": spec.mamba_proj_bias, "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
    }
    if spec.rope_by_type:
        cfg["position_embedding_type"] = "rope"
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_by_type["full_attention"][0]}
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class _Weight(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape))


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden, experts, bias=False)


class MoE(nn.Module):
    """Softmax over the top-k router logits; experts packed as the hub holds them (``input_linear [E, 2I, H]``,
    gate rows first; ``output_linear [E, H, I]``)."""

    def __init__(self, spec: GraniteHybridSpec) -> None:
        super().__init__()
        self.router = Router(spec.hidden_size, spec.experts)
        self.input_linear = _Weight(spec.experts, 2 * spec.intermediate_size, spec.hidden_size)
        self.output_linear = _Weight(spec.experts, spec.hidden_size, spec.intermediate_size)
        self.k = spec.top_k
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.router.layer.weight).float()
        top, idx = logits.topk(self.k, dim=-1)
        w = top.softmax(dim=-1).type_as(x)
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():  # (transformers' order: ascending experts, weights in x's dtype)
            tok, slot = torch.where(idx == e)
            gate, up = F.linear(x[tok], self.input_linear.weight[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.output_linear.weight[e]) * w[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class SharedMLP(nn.Module):
    def __init__(self, hidden: int, width: int, act: Activation | None = None) -> None:
        super().__init__()
        self.input_linear = nn.Linear(hidden, 2 * width, bias=False)
        self.output_linear = nn.Linear(width, hidden, bias=False)
        self.act: Activation = act or F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return cast(torch.Tensor, self.output_linear(self.act(gate) * up))


class Attention(nn.Module):
    def __init__(self, spec: GraniteHybridSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: GraniteHybridSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        if spec.architecture == BAMBA:  # (Bamba's feed-forward and its norm's name)
            self.pre_ff_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
            self.feed_forward = FeedForward(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias,
                                            act=activation_of(spec))
        else:
            self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        if spec.layer_types[layer] == "linear_attention":
            self.mamba = Mamba2Mixer(spec.hidden_size, spec.mamba_inner, spec.mamba_heads, spec.mamba_groups,
                                     spec.mamba_state, spec.mamba_kernel, spec.rms_eps,
                                     conv_bias=spec.mamba_conv_bias, proj_bias=spec.mamba_proj_bias,
                                     act=activation_of(spec))
        else:
            self.self_attn = Attention(spec)
        if spec.experts:
            self.block_sparse_moe = MoE(spec)
        if spec.architecture != BAMBA:
            self.shared_mlp = SharedMLP(spec.hidden_size, spec.shared_width, activation_of(spec))



class GraniteHybridModel(HybridDecoder):
    """Granite 4.0 hybrid (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: GraniteHybridSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda i: DecoderLayer(spec, i)), device, backend)
        self.spec: GraniteHybridSpec = spec

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.embed_tokens(ids)) * self.spec.scales[0]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return super().head(h) / self.spec.scales[3]

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        _, res, att, _ = spec.scales
        x = mod.input_layernorm(st.hidden)
        if spec.layer_types[layer] == "linear_attention":
            out = cast(Mamba2Mixer, mod.mamba)(x, b, kv_layer)
        else:
            attn = cast(Attention, mod.self_attn)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            q, k = attn.q_proj(x).view(n, hq, d), attn.k_proj(x).view(n, hkv, d)
            if spec.rope_by_type:
                cos, sin = st.tables["full_attention"]
                q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, att)
            out = attn.o_proj(o.reshape(n, hq * d))
        h = st.hidden + out * res
        if spec.architecture == BAMBA:
            st.hidden = h + mod.feed_forward(mod.pre_ff_layernorm(h))
        else:
            y = mod.post_attention_layernorm(h)
            ff = mod.shared_mlp(y)
            if spec.experts:
                ff = mod.block_sparse_moe(y) + ff
            st.hidden = h + ff * res
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our (the hub's) names: transformers' in-memory MoE names mapped back; Bamba's
    ``final_layernorm``."""
    out = {}
    for name, t in final_norm_in(tensors).items():
        for theirs, ours in _NAMES:
            if name.endswith(theirs):
                name = name[: -len(theirs)] + ours
        out[name] = t
    return out


def tensors_out(spec: GraniteHybridSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint's names (Bamba's ``final_layernorm``)."""
    if spec.architecture != BAMBA:
        return dict(tensors)
    return final_norm_out(tensors)
