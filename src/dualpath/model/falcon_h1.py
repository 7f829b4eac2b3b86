"""TII's Falcon-H1 (``FalconH1ForCausalLM``, model_type ``falcon_h1``), as transformers runs it, over the paged KV pool
with state pages.

Every layer runs attention and a Mamba-2 mixer side by side on the same normed input, and adds both::

    h = h + ssm_out_multiplier * mamba(ssm_in_multiplier * x) + attention_out_multiplier * attn(attention_in_multiplier * x)
    h = h + mlp(pre_ff_layernorm(h))

with ``x = input_layernorm(h)``; the attention's keys times ``key_multiplier`` (RoPE, GQA); the Mamba mixer's
projection times the muP vector (``ssm_multipliers`` over z, x, B, C, dt), its output gated as ``mamba_rms_norm`` /
``mamba_norm_before_gate`` say; the MLP's gate and output times ``mlp_multipliers``; embeddings times
``embedding_multiplier``, logits times ``lm_head_multiplier``. A layer's page holds its KV rows and, after them, its
Mamba state (:func:`dualpath.model.state_pages.split_page`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec, final_norm_in, final_norm_out
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.mamba2 import Mamba2Mixer
from dualpath.model.moe import activation_of, gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import split_page, state_bytes

ARCH = "falcon_h1"
#: FalconH1Config's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 8192,
    "mamba_d_ssm": 1024, "mamba_n_heads": 128, "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256,
    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True, "mamba_proj_bias": False,
    "mamba_norm_before_gate": True, "mamba_rms_norm": False, "projectors_bias": False, "lm_head_multiplier": 1.0,
    "embedding_multiplier": 1.0, "key_multiplier": 1.0, "attention_out_multiplier": 1.0,
    "attention_in_multiplier": 1.0, "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "attention_bias": False,
    "mlp_bias": False,
}
_SCALES = ("embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
           "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier")


@dataclass(frozen=True)
class FalconH1Spec(StatePagesSpec, ModelSpec):
    both_in_page = True  # (attention and a state in every layer)
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # (_SCALES)
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)
    mamba_inner: int = 0
    mamba_heads: int = 0
    mamba_groups: int = 1
    mamba_state: int = 0
    mamba_kernel: int = 4
    conv_bias: bool = True
    proj_bias: bool = False
    out_bias: bool = False
    rms_gate: bool = False  # mamba_rms_norm
    norm_before_gate: bool = True
    mlp_bias: bool = False

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.mamba_inner + 2 * self.mamba_groups * self.mamba_state, self.mamba_kernel,
                           self.mamba_heads, self.mamba_inner // self.mamba_heads, self.mamba_state)

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["FalconH1ForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": hf_activation(self.activation), "rms_norm_eps": self.rms_eps, "max_position_embeddings": self.max_position,
            "mamba_d_ssm": self.mamba_inner, "mamba_n_heads": self.mamba_heads,
            "mamba_d_head": self.mamba_inner // self.mamba_heads, "mamba_n_groups": self.mamba_groups,
            "mamba_d_state": self.mamba_state, "mamba_d_conv": self.mamba_kernel, "mamba_conv_bias": self.conv_bias,
            "mamba_proj_bias": self.proj_bias, "projectors_bias": self.out_bias, "mamba_rms_norm": self.rms_gate,
            "mamba_norm_before_gate": self.norm_before_gate, "mlp_multipliers": list(self.mlp_multipliers),
            "ssm_multipliers": list(self.ssm_multipliers), "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_by_type["full_attention"][0]},
            "dtype": self.dtype, **self.scales,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> FalconH1Spec:
    """The spec of a Falcon-H1 config (its keys over FalconH1Config's defaults)."""
    raw_ssm_dim = cfg.get("mamba_d_ssm", DEFAULTS["mamba_d_ssm"])
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its MLP's and Mamba convolution's; the mixer's gate stays SiLU)
    limit = cfg.get("time_step_limit")
    if limit is not None and (not isinstance(limit, (list, tuple)) or len(limit) != 2
                              or float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        raise ModelError(f"{where}: time_step_limit {limit!r} is not supported (only the default (0, inf))")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    inner = raw_ssm_dim if raw_ssm_dim is not None else cfg_int(cfg, "mamba_expand", where) * hidden
    mheads = cfg_int(cfg, "mamba_n_heads", where)
    d_head = cfg.get("mamba_d_head", "auto")
    if inner % mheads or (d_head != "auto" and d_head * mheads != inner):
        raise ModelError(f"{where}: mamba_n_heads ({mheads}) x mamba_d_head ({d_head}) must equal the Mamba width "
                         f"({inner}: mamba_d_ssm, else mamba_expand x hidden_size)")
    mlp_m = cfg.get("mlp_multipliers") or [1.0, 1.0]
    ssm_m = cfg.get("ssm_multipliers") or [1.0] * 5
    if len(mlp_m) != 2 or len(ssm_m) != 5:
        raise ModelError(f"{where}: mlp_multipliers needs 2 values and ssm_multipliers 5, got {mlp_m!r}, {ssm_m!r}")
    n = cfg_int(cfg, "num_hidden_layers", where)
    return FalconH1Spec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // heads}, "head_dim", where),
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=("full_attention",) * n,
        rope_by_type={"full_attention": (cfg_num({"t": rope.get("rope_theta", cfg.get("rope_theta", 10000.0))},
                                                 "t", where), 1.0)},
        scales={k: float(cfg[k]) for k in _SCALES}, mlp_multipliers=(float(mlp_m[0]), float(mlp_m[1])),
        ssm_multipliers=tuple(float(v) for v in ssm_m), mamba_inner=int(inner), mamba_heads=mheads,
        mamba_groups=cfg_int(cfg, "mamba_n_groups", where), mamba_state=cfg_int(cfg, "mamba_d_state", where),
        mamba_kernel=cfg_int(cfg, "mamba_d_conv", where), conv_bias=bool(cfg["mamba_conv_bias"]),
        proj_bias=bool(cfg["mamba_proj_bias"]), out_bias=bool(cfg["projectors_bias"]),
        rms_gate=bool(cfg["mamba_rms_norm"]), norm_before_gate=bool(cfg["mamba_norm_before_gate"]),
        mlp_bias=bool(cfg["mlp_bias"]),
    )


class FalconGatedNorm(nn.Module):
    """Falcon-H1's gated norm: grouped RMS norm (weights in fp32) before or after ``* silu(gate)``."""

    def __init__(self, dim: int, groups: int, eps: float, before_gate: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps, self.before_gate = groups, eps, before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dt = y.dtype
        h = y if self.before_gate else y * F.silu(z.float())
        h = h.float()
        g = h.view(*h.shape[:-1], self.groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        h = (self.weight.view(self.groups, -1) * g).view(h.shape)
        if self.before_gate:
            h = h * F.silu(z.float())
        return h.to(dt)


class FalconMixer(Mamba2Mixer):
    """Mamba-2 with Falcon-H1's input scale, muP vector and gating."""

    def __init__(self, spec: FalconH1Spec) -> None:
        super().__init__(spec.hidden_size, spec.mamba_inner, spec.mamba_heads, spec.mamba_groups, spec.mamba_state,
                         spec.mamba_kernel, spec.rms_eps, conv_bias=spec.conv_bias, proj_bias=spec.proj_bias,
                         out_bias=spec.out_bias, act=activation_of(spec))
        self.rms_gate = spec.rms_gate
        if self.rms_gate:
            self.norm = FalconGatedNorm(spec.mamba_inner, spec.mamba_groups, spec.rms_eps, spec.norm_before_gate)
        else:
            del self.norm
        i, gn = spec.mamba_inner, spec.mamba_groups * spec.mamba_state
        m = spec.ssm_multipliers
        self.register_buffer("mup", torch.cat([torch.full((i,), m[0]), torch.full((i,), m[1]), torch.full((gn,), m[2]),
                                               torch.full((gn,), m[3]), torch.full((spec.mamba_heads,), m[4])]),
                             persistent=False)
        self.in_scale = spec.scales["ssm_in_multiplier"]

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.in_proj(h * self.in_scale) * self.mup.to(h.dtype))

    def gate_and_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.rms_gate:
            return cast(torch.Tensor, self.norm(y, z))
        return y * F.silu(z)


class Attention(nn.Module):
    def __init__(self, spec: FalconH1Spec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)


class MLP(nn.Module):
    def __init__(self, spec: FalconH1Spec) -> None:
        super().__init__()
        h, w, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = nn.Linear(h, w, bias=bias)
        self.up_proj = nn.Linear(h, w, bias=bias)
        self.down_proj = nn.Linear(w, h, bias=bias)
        self.gate_m, self.down_m = spec.mlp_multipliers
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.up_proj(x) * self.act(self.gate_proj(x) * self.gate_m))
                    * self.down_m)


class DecoderLayer(nn.Module):
    def __init__(self, spec: FalconH1Spec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.pre_ff_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mamba = FalconMixer(spec)
        self.self_attn = Attention(spec)
        self.feed_forward = MLP(spec)



class FalconH1Model(HybridDecoder):
    """Falcon-H1 (module docstring) over a paged KV pool whose pages hold KV rows and a Mamba state."""

    def __init__(self, spec: FalconH1Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda _: DecoderLayer(spec)), device, backend)
        self.spec: FalconH1Spec = spec

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.embed_tokens(ids)) * self.spec.scales["embedding_multiplier"]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self.model.norm(h)).float() * self.spec.scales["lm_head_multiplier"])

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b, s = self.spec, state.batch, self.spec.scales
        d, hq, hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
        mixer = mod.mamba
        kv, conv_pages, rec_pages = split_page(kv_layer, hkv, d, mixer.conv_dim, mixer.kernel, mixer.heads,
                                               mixer.head_dim, mixer.state)
        x = mod.input_layernorm(st.hidden)
        m = mixer(x, b, kv_layer, pages=(conv_pages, rec_pages)) * s["ssm_out_multiplier"]
        attn = mod.self_attn
        xa = x * s["attention_in_multiplier"]
        n = xa.shape[0]
        cos, sin = st.tables["full_attention"]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_proj(xa).view(n, hq, d), cos, sin)
        k = _rope(attn.k_proj(xa).view(n, hkv, d) * s["key_multiplier"], cos, sin)
        o = self.attend(q, k, attn.v_proj(xa).view(n, hkv, d), kv, b, d ** -0.5)
        a = attn.o_proj(o.reshape(n, hq * d)) * s["attention_out_multiplier"]
        h = st.hidden + (m + a)
        st.hidden = h + mod.feed_forward(mod.pre_ff_layernorm(h))
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``final_layernorm`` as ours."""
    return final_norm_in(tensors)


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return final_norm_out(tensors)
