"""Xiaomi's MiMo-V2-Flash (``MiMoV2FlashForCausalLM``, model_type ``mimo_v2_flash``), as transformers runs it, over
the paged KV pool.

A Llama-shaped decoder whose attention differs by layer type (``layer_types``: the first layer and every sixth full,
the rest sliding over ``sliding_window`` tokens):

* sliding layers have twice ``num_key_value_heads`` KV heads and a learned sink logit per query head in each
  softmax's denominator (gpt-oss's sinks); full layers have ``num_key_value_heads`` and no sinks;
* queries and keys are ``head_dim`` (192) wide, values ``v_head_dim`` (128) and scaled by ``attention_value_scale``;
  the pool holds each value padded with zeros to ``head_dim`` (the paged kernels take one width), and the attention's
  output drops the zero tail. Every layer's pages are shaped for the sliding layers' heads; a full layer uses the
  front of each row (:func:`dualpath.model.gemma4.layer_view`);
* RoPE turns the first ``int(head_dim * partial_rotary_factor)`` dims of each head (0.334 by default) with a base
  per layer type (``rope_parameters``: 5,000,000 for full layers, 10,000 for sliding ones by default).

Its MLP is dense in the ``mlp_layer_types`` ``dense`` layers (the first by default) and elsewhere DeepSeek-V3's MoE
without shared experts: fp32 sigmoid scores plus a correction bias choose the top ``num_experts_per_tok`` in the
best ``topk_group`` of ``n_group`` groups, renormalized (``norm_topk_prob``), times ``routed_scaling_factor``. Its
multi-token-prediction layers (``model.mtp.``) are not decoder layers and are left out at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.kv.layout import KVSpec
from dualpath.model.gemma4 import layer_view
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import (
    ForwardState,
    RMSNorm,
    TypedRopeDecoder,
    _rope,
)
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "mimo_v2_flash"
TYPES = ("sliding_attention", "full_attention")
#: MiMoV2FlashConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 152576, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 48,
    "num_attention_heads": 64, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "moe_intermediate_size": 2048,
    "num_experts_per_tok": 8, "n_routed_experts": 256, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "bos_token_id": 1, "head_dim": 192, "v_head_dim": 128, "sliding_window": 129,
    "attention_value_scale": 0.707,
}
_ROPE_DEFAULTS = {"full_attention": 5_000_000.0, "sliding_attention": 10_000.0}


@dataclass(frozen=True)
class MiMoV2Spec(ModelSpec):
    """A :class:`ModelSpec` (``n_kv_heads``: the full layers'; ``head_dim``: queries' and keys') plus MiMo's fields."""

    layer_types: tuple[str, ...] = ()
    v_head_dim: int = 0
    value_scale: float = 1.0
    dense_layers: tuple[int, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # type -> (theta, partial factor)
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    moe_groups: tuple[int, int] = (1, 1)  # (n_group, topk_group)
    moe_renormalize: bool = True
    moe_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "dense_layers", tuple(sorted({int(x) for x in self.dense_layers})))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {n} layers, got {list(self.layer_types)}")
        if not 0 < self.v_head_dim <= self.head_dim:
            raise ModelError(f"model config: v_head_dim ({self.v_head_dim}) must be in [1, head_dim "
                             f"({self.head_dim})] (values are stored padded to head_dim)")
        if self.n_heads % (2 * self.n_kv_heads):
            raise ModelError(f"model config: num_attention_heads ({self.n_heads}) must be a multiple of the sliding "
                             f"layers' 2 x num_key_value_heads ({2 * self.n_kv_heads})")
        for t in set(self.layer_types):
            theta, partial = self.rope_by_type.get(t, (0.0, 0.0))
            if not theta > 0 or not 0 < partial <= 1 or int(self.head_dim * partial) < 2:
                raise ModelError(f"model config: rope_parameters.{t} needs a positive rope_theta and a "
                                 f"partial_rotary_factor in (0, 1] turning at least 2 dims, got {theta}, {partial}")
        e, k, w = self.moe_experts, self.moe_top_k, self.moe_width
        groups, top_groups = self.moe_groups
        if len(self.dense_layers) < n and not (0 < k <= e and w > 0 and groups > 0 and e % groups == 0
                                               and 0 < top_groups <= groups):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({k}) <= n_routed_experts "
                             f"({e}), a positive moe_intermediate_size ({w}) and 1 <= topk_group ({top_groups}) <= "
                             f"n_group ({groups}) dividing the experts")

    def layer_heads(self, layer: int) -> int:
        return 2 * self.n_kv_heads if self.layer_types[layer] == "sliding_attention" else self.n_kv_heads

    def kv_spec(self) -> KVSpec:
        """Every layer's pages: the sliding layers' heads, ``head_dim`` wide (values padded with zeros)."""
        return KVSpec.mha(self.n_layers, 2 * self.n_kv_heads, self.head_dim, self.dtype)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)

    def routing(self) -> SimpleNamespace:
        """The fields :class:`dualpath.model.deepseek.MoE` reads (DeepSeek-V3's router, no shared experts)."""
        groups, top_groups = self.moe_groups
        return SimpleNamespace(
            n_routed_experts=self.moe_experts, hidden_size=self.hidden_size, topk_method="noaux_tc",
            scoring_func="sigmoid", num_experts_per_tok=self.moe_top_k, n_group=groups, topk_group=top_groups,
            norm_topk_prob=self.moe_renormalize, routed_scaling_factor=self.moe_scale,
            moe_intermediate_size=self.moe_width, n_shared_experts=0, activation=self.activation)


# --- config in and out ---------------------------------------------------------------------------------------






def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> MiMoV2Spec:
    """The spec of a MiMo-V2-Flash config (its keys over MiMoV2FlashConfig's defaults)."""

    if cfg.get("sliding_window_size") is not None:  # (the hub's key: the window past the query itself)
        cfg = {**cfg, "sliding_window": cfg_int(cfg, "sliding_window_size", where) + 1}
    # (an explicit null attention_value_scale means no scaling, as transformers reads it; absent, 0.707)
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k in ("eos_token_id",
                                                                              "attention_value_scale")}}
    if cfg.get("num_local_experts") is not None and "n_routed_experts" not in cfg:
        cfg["n_routed_experts"] = cfg["num_local_experts"]
    act = gate_activation(cfg, where)
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg.get("layer_types") or ["full_attention" if i == 0 or not (i + 1) % 6 else "sliding_attention"
                                       for i in range(n)]
    mlp = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    if not isinstance(mlp, list) or len(mlp) != n or any(m not in ("dense", "sparse") for m in mlp):
        raise ModelError(f"{where}: mlp_layer_types must name 'dense' or 'sparse' for each of the {n} layers, got "
                         f"{mlp!r}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object of layer type -> RoPE parameters")
    rope_by_type: dict[str, tuple[float, float]] = {}
    for t in TYPES:
        p = rope.get(t) or {}
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: only a 'default' RoPE is supported for mimo_v2_flash, "
                             f"got {p!r}")
        rope_by_type[t] = (cfg_num({"rope_theta": p.get("rope_theta", _ROPE_DEFAULTS[t])}, "rope_theta", where),
                           cfg_num({"partial_rotary_factor": p.get("partial_rotary_factor", 0.334)},
                                "partial_rotary_factor", where))
    scale = cfg.get("attention_value_scale")
    dtype = config_dtype(cfg, dtype)
    sparse = "sparse" in mlp
    window = cfg_int(cfg, "sliding_window", where)
    return MiMoV2Spec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=rope_by_type["full_attention"][0], max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]), dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        context_cap=max_context, layer_types=tuple(types), v_head_dim=cfg_int(cfg, "v_head_dim", where),
        value_scale=1.0 if scale is None else cfg_num(cfg, "attention_value_scale", where),
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"), rope_by_type=rope_by_type,
        moe_experts=cfg_int(cfg, "n_routed_experts", where) if sparse else 0,
        moe_top_k=cfg_int(cfg, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(cfg, "moe_intermediate_size", where) if sparse else 0,
        moe_groups=(cfg_int(cfg, "n_group", where), cfg_int(cfg, "topk_group", where)) if sparse else (1, 1),
        moe_renormalize=bool(cfg["norm_topk_prob"]), moe_scale=cfg_num(cfg, "routed_scaling_factor", where),
    )


def hf_config(spec: MiMoV2Spec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    cfg: dict[str, Any] = {
        "architectures": ["MiMoV2FlashForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "v_head_dim": spec.v_head_dim,
        "hidden_act": hf_activation(spec.activation), "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.attention_bias,
        "sliding_window": spec.sliding_window or 129, "layer_types": list(spec.layer_types),
        "mlp_layer_types": ["dense" if i in spec.dense_layers else "sparse" for i in range(spec.n_layers)],
        "attention_value_scale": spec.value_scale, "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}
                            for t, (theta, partial) in spec.rope_by_type.items()},
        "norm_topk_prob": spec.moe_renormalize, "routed_scaling_factor": spec.moe_scale,
    }
    if spec.moe_experts:
        cfg.update(n_routed_experts=spec.moe_experts, num_experts_per_tok=spec.moe_top_k,
                   moe_intermediate_size=spec.moe_width, n_group=spec.moe_groups[0], topk_group=spec.moe_groups[1])
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: MiMoV2Spec, layer: int) -> None:
        super().__init__()
        heads, d, bias = spec.layer_heads(layer), spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, spec.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, heads * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, heads * spec.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(spec.n_heads * spec.v_head_dim, spec.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.zeros(spec.n_heads)) if spec.layer_types[layer] == "sliding_attention" \
            else None


class DecoderLayer(nn.Module):
    def __init__(self, spec: MiMoV2Spec, layer: int) -> None:
        super().__init__()
        from dualpath.model.deepseek import MoE

        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)) if layer in spec.dense_layers
                               else MoE(spec.routing()))  # type: ignore[arg-type]


class Backbone(nn.Module):
    def __init__(self, spec: MiMoV2Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class MiMoV2Model(TypedRopeDecoder):
    """MiMo-V2-Flash's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: MiMoV2Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: MiMoV2Spec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        """Run layer ``layer`` (in order) over pages shaped as :meth:`MiMoV2Spec.kv_spec` says."""
        st = self.layer_state(layer, state, kv_layer, 2 * self.spec.n_kv_heads)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = cast(Attention, mod.self_attn)
        heads, d, dv = spec.layer_heads(layer), spec.head_dim, spec.v_head_dim
        x = mod.input_layernorm(st.hidden)
        n = x.shape[0]
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_proj(x).view(n, spec.n_heads, d), cos, sin)
        k = _rope(attn.k_proj(x).view(n, heads, d), cos, sin)
        v = attn.v_proj(x).view(n, heads, dv) * spec.value_scale
        if dv < d:
            v = F.pad(v, (0, d - dv))
        kv = layer_view(kv_layer, heads, d)
        store_kv(k, v, kv, b.slot_mapping, backend=self.backend)
        scale = d ** -0.5
        if b.is_decode:
            o = paged_decode_attention(q, kv, b.block_tables, b.seq_lens, scale, backend=self.backend,
                                       window=self.windows[layer], sinks=attn.sinks)
        else:
            o = paged_prefill_attention(q, kv, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos, scale,
                                        backend=self.backend, window=self.windows[layer], sinks=attn.sinks)
        h = st.hidden + attn.o_proj(o[..., :dv].reshape(n, spec.n_heads * dv))
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(spec: MiMoV2Spec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names: the hub's ``attention_sink_bias`` read as ``sinks``, transformers'
    packed experts split (the hub's are per expert), the multi-token-prediction layers (``model.mtp.``, or layers
    past ``num_hidden_layers``) left out. (``tensor_names.tensors_out`` writes the hub's names back.)"""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if name.startswith(("model.mtp.", "mtp.")) or (
                len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) >= spec.n_layers):
            continue
        if not _split_packed_experts(name, t, out, source):
            out[name.replace(".self_attn.attention_sink_bias", ".self_attn.sinks")] = t
    return out
