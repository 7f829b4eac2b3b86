"""Translated's Lara-mini (``LaraMiniForCausalLM``, model_type ``lara_mini``), as transformers runs it, over the paged
KV pool with state pages.

* **linear-attention layers**: Qwen3.5's Gated DeltaNet (:class:`dualpath.model.qwen_hybrid.GatedDeltaNet`); the
  checkpoints fuse its input projections into one ``in_proj`` (rows ``[q | k | v | z | b | a]``) and name its gated
  norm ``out_norm``, whose weight multiplies in fp32 (:class:`FloatGatedNorm`);
* **sliding-attention layers**: Qwen3's attention (per-head q / k RMS norms, GQA) with RoPE over the last
  ``sliding_window`` positions; **full-attention layers**: the same attention with no position encoding at all;
* every layer's MLP: softmax top-k experts, the router in fp32 (its weights renormalized with ``norm_topk_prob`` and
  rounded to the compute dtype), plus an ungated shared SwiGLU (Flint's block); transformers' packed experts;
* every RMS norm multiplies its weight in fp32 before rounding (Helium's), weights not offset by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone, FloatGatedNorm, HybridDecoder, NormedAttention, StatePagesSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.qwen_hybrid import GatedDeltaNet
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes

ARCH = "lara_mini"
TYPES = ("linear_attention", "sliding_attention", "full_attention")
_PATTERN = ("linear_attention", "sliding_attention", "linear_attention", "full_attention", "sliding_attention")
#: LaraMiniConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 1024, "num_hidden_layers": 34, "num_attention_heads": 16,
    "num_key_value_heads": 4, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False, "sliding_window": 512,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 8, "linear_num_value_heads": 16, "num_experts": 128, "num_experts_per_tok": 4,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
    "bos_token_id": None, "eos_token_id": 151643,
}


@dataclass(frozen=True)
class LaraMiniSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the attention layers' shape, ``rope_theta`` of the sliding layers) plus the Gated
    DeltaNet layers' and the MoE's fields."""

    layer_types: tuple[str, ...] = ()
    window: int = 512
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 4
    experts: int = 0
    top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    renormalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name one of {list(TYPES)} for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        if min(self.lin_k_heads, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim, self.conv_kernel) <= 0 or \
                self.lin_v_heads % self.lin_k_heads:
            raise ModelError("model config: the linear layers need positive linear_* sizes, linear_num_value_heads "
                             f"a multiple of linear_num_key_heads ({self.lin_v_heads} / {self.lin_k_heads})")
        if not 0 < self.top_k <= self.experts or self.moe_width <= 0 or self.shared_width < 0:
            raise ModelError(f"model config: the MoE needs 1 <= num_experts_per_tok ({self.top_k}) <= num_experts "
                             f"({self.experts}) and a positive moe_intermediate_size")
        if self.window <= 0:
            raise ModelError(f"model config: sliding_window must be positive, got {self.window}")

    @property
    def conv_dim(self) -> int:
        return 2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.conv_dim, self.conv_kernel, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim)

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        """Only the sliding layers rotate."""
        return {"sliding_attention": (self.rope_theta, 1.0)}

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.layer_types[layer] == "sliding_attention" else None

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LaraMiniForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "sliding_window": self.window, "layer_types": list(self.layer_types),
            "linear_conv_kernel_dim": self.conv_kernel, "linear_key_head_dim": self.lin_k_dim,
            "linear_value_head_dim": self.lin_v_dim, "linear_num_key_heads": self.lin_k_heads,
            "linear_num_value_heads": self.lin_v_heads, "num_experts": self.experts,
            "num_experts_per_tok": self.top_k, "moe_intermediate_size": self.moe_width,
            "shared_expert_intermediate_size": self.shared_width, "norm_topk_prob": self.renormalize,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
            "pad_token_id": None,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> LaraMiniSpec:
    """The spec of a Lara-mini config (its keys over LaraMiniConfig's defaults; ``layer_types`` by default the
    released period-5 pattern)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "bos_token_id"}}
    act = gate_activation(cfg, where)  # (its experts' and Gated DeltaNet convolutions')
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where, [_PATTERN[i % len(_PATTERN)] for i in range(n)])
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default" \
            or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE over the whole head is supported for "
                         f"{ARCH}, got {rope!r}")
    return LaraMiniSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "moe_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        rope_theta=cfg_num(rope, "rope_theta", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(types), window=cfg_int(cfg, "sliding_window", where),
        lin_k_heads=cfg_int(cfg, "linear_num_key_heads", where), lin_v_heads=cfg_int(cfg, "linear_num_value_heads", where),
        lin_k_dim=cfg_int(cfg, "linear_key_head_dim", where), lin_v_dim=cfg_int(cfg, "linear_value_head_dim", where),
        conv_kernel=cfg_int(cfg, "linear_conv_kernel_dim", where), experts=cfg_int(cfg, "num_experts", where),
        top_k=cfg_int(cfg, "num_experts_per_tok", where), moe_width=cfg_int(cfg, "moe_intermediate_size", where),
        shared_width=cfg_int(cfg, "shared_expert_intermediate_size", where, minimum=0),
        renormalize=bool(cfg["norm_topk_prob"]),
    )


# --- modules -------------------------------------------------------------------------------------------------


class MoE(nn.Module):
    """Softmax top-k experts routed in fp32, plus an ungated shared SwiGLU."""

    def __init__(self, spec: LaraMiniSpec) -> None:
        super().__init__()
        self.gate = nn.Linear(spec.hidden_size, spec.experts, bias=False)
        act = activation_of(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width, act=act) for _ in range(spec.experts))
        self.shared_expert = FeedForward(spec.hidden_size, spec.shared_width, act=act)
        self.k, self.renormalize = spec.top_k, spec.renormalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return dispatch_experts(x, idx, w.to(x.dtype), self.experts) + self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, spec: LaraMiniSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=True)
        if spec.layer_types[layer] == "linear_attention":
            self.linear_attn = GatedDeltaNet(spec)  # type: ignore[arg-type]
            self.linear_attn.norm = FloatGatedNorm(spec.lin_v_dim, spec.rms_eps, "silu")  # type: ignore[assignment]
        else:
            self.self_attn = NormedAttention(spec, fp32_scale=True)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=True)
        self.mlp = MoE(spec)


class LaraMiniModel(HybridDecoder):
    """Lara-mini (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: LaraMiniSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: DecoderLayer(spec, i), RMSNorm(spec.hidden_size, spec.rms_eps,
                                                                           fp32_scale=True))
        self._setup(spec, backbone, device, backend)
        self.spec: LaraMiniSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        kind = spec.layer_types[layer]
        x = mod.input_layernorm(st.hidden)
        if kind == "linear_attention":
            out = cast(GatedDeltaNet, mod.linear_attn)(x, b, kv_layer)
        else:
            attn = cast(NormedAttention, mod.self_attn)
            n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
            q = attn.q_norm(attn.q_proj(x).view(n, hq, d))
            k = attn.k_norm(attn.k_proj(x).view(n, hkv, d))
            if kind == "sliding_attention":  # (the full layers use no position encoding)
                cos, sin = st.tables["sliding_attention"]
                q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5, window=self.windows[layer])
            out = attn.o_proj(o.reshape(n, hq * d))
        h = st.hidden + out
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


def tensors_in(spec: LaraMiniSpec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's names as ours: each fused ``linear_attn.in_proj`` split into ``in_proj_qkv / z / b / a``
    (transformers' in-memory names read as they are), ``out_norm`` as ``norm``, packed experts split."""
    from dualpath.model.tensor_names import _split_packed_experts

    kd, vd, hv = spec.lin_k_heads * spec.lin_k_dim, spec.lin_v_heads * spec.lin_v_dim, spec.lin_v_heads
    sizes = (2 * kd + vd, vd, hv, hv)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        name = name.replace(".linear_attn.out_norm.", ".linear_attn.norm.")
        if name.endswith(".linear_attn.in_proj.weight"):
            if t.dim() != 2 or t.shape[0] != sum(sizes):
                raise ModelError(f"{source}: {name} has shape {tuple(t.shape)}, expected [{sum(sizes)}, hidden] "
                                 "(q, k, v, z, b, a)")
            head = name[: -len("in_proj.weight")]
            for part, rows in zip(("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), t.split(sizes), strict=True):
                out[f"{head}{part}.weight"] = rows
            continue
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the names transformers' ``save_pretrained`` writes (fused ``in_proj``, ``out_norm``,
    packed experts)."""
    from dualpath.model.tensor_names import _packed_experts

    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        head, sep, tail = name.partition(".linear_attn.")
        if sep and tail.startswith("in_proj_"):
            parts.setdefault(head, {})[tail.split(".")[0]] = t
            continue
        out[name.replace(".linear_attn.norm.", ".linear_attn.out_norm.")] = t
    for head, p in parts.items():
        out[f"{head}.linear_attn.in_proj.weight"] = torch.cat(
            [p["in_proj_qkv"], p["in_proj_z"], p["in_proj_b"], p["in_proj_a"]])
    return _packed_experts(out)
