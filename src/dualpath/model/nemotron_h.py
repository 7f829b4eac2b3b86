"""NVIDIA's Nemotron-H (``NemotronHForCausalLM``, model_type ``nemotron_h``: Nemotron-H, Nemotron Nano 2, Nemotron 3
Nano), as transformers runs it, over the paged KV pool with state pages.

Every block is one mixer behind an RMS norm (weights scaled in fp32) and a residual, its kind by ``layers_block_type``
(or the older ``hybrid_override_pattern``: ``M`` Mamba-2, ``*`` attention, ``-`` MLP, ``E`` MoE):

* ``linear_attention`` / ``M``: Mamba-2 (:mod:`dualpath.model.mamba2`, ``mamba_num_heads`` x ``mamba_head_dim``
  channels; its prefill clamps ``dt`` below at ``time_step_min``, as transformers' chunked scan does);
* ``full_attention`` / ``*``: attention without positional encoding;
* ``mlp`` / ``-``: ``down(act(up(x)))``, ``mlp_hidden_act`` (ReLU squared);
* ``moe`` / ``E``: DeepSeek-V3's router (fp32 sigmoid scores, a correction bias for the choice, ``n_group`` groups,
  ``norm_topk_prob``, ``routed_scaling_factor``) over ungated ReLU-squared experts, optionally through a latent
  projection (``moe_latent_size``), plus a shared MLP.

The checkpoint's names (``backbone.embeddings``, ``backbone.norm_f``, per-expert tensors) are read and written; its
multi-token-prediction layers (``mtp.*``) are left out, as transformers leaves them.

Mamba-2 language models (``Mamba2ForCausalLM``, model_type ``mamba2``: Mamba-Codestral, ...) are the same stack with
only Mamba-2 blocks, the same names, norms that round before scaling and no ``dt`` clamp (:func:`mamba2_spec`).
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
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.layernorm_family import activation, gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm
from dualpath.model.mamba2 import Mamba2Mixer
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes

ARCH = "nemotron_h"
KINDS = ("linear_attention", "full_attention", "mlp", "moe")
_PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}
#: NemotronHConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 4096, "tie_word_embeddings": False, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096, "intermediate_size": 21504,
    "mlp_hidden_act": "relu2", "mlp_bias": False, "ssm_state_size": 128, "mamba_num_heads": 128,
    "mamba_head_dim": 64, "mamba_hidden_act": "silu", "n_groups": 8, "conv_kernel": 4, "time_step_min": 0.001,
    "use_conv_bias": True, "use_bias": False, "n_routed_experts": 8, "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688, "moe_latent_size": None, "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "layer_norm_epsilon": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
}
#: older configs' names -> NemotronHConfig's (its __post_init__ reads them so)
_ALIASES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_min": "time_step_min",
            "mamba_conv_bias": "use_conv_bias", "num_local_experts": "n_routed_experts"}


@dataclass(frozen=True)
class NemotronHSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (the attention layers' shape) plus each block's kind, the Mamba-2 and MoE fields."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # (none: no layer rotates)
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 0
    mamba_state: int = 0
    mamba_kernel: int = 0
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.0
    mlp_bias: bool = False
    experts: int = 0
    top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    latent: int | None = None
    router_groups: int = 1
    router_topk_groups: int = 1
    renormalize: bool = True
    routed_scale: float = 1.0
    norm_fp32_scale: bool = True  # (Mamba2ForCausalLM's norms scale after rounding to the input's dtype)
    # the Mamba-2 convolutions' activation (mamba_hidden_act; Mamba-2's hidden_act) by ACTIVATIONS value, None: SiLU
    mamba_act: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.mamba_act is None:  # (the dict, so the block keys, as before it was read)
            d.pop("mamba_act")
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in KINDS for t in self.layer_types):
            raise ModelError(f"model config: layers_block_type must name one of {KINDS} for each of the "
                             f"{self.n_layers} layers, got {list(self.layer_types)}")
        if self.mamba_heads % self.mamba_groups:
            raise ModelError(f"model config: mamba_num_heads ({self.mamba_heads}) must be a multiple of n_groups "
                             f"({self.mamba_groups})")
        if "moe" in self.layer_types and not (0 < self.top_k <= self.experts and self.experts % self.router_groups == 0
                                              and 0 < self.router_topk_groups <= self.router_groups):
            raise ModelError(f"model config: the MoE blocks need 1 <= num_experts_per_tok ({self.top_k}) <= "
                             f"n_routed_experts ({self.experts}) in n_group ({self.router_groups}) equal groups, "
                             f"topk_group ({self.router_topk_groups}) of them")

    @property
    def state_bytes(self) -> int:
        inner = self.mamba_heads * self.mamba_head_dim
        return state_bytes(inner + 2 * self.mamba_groups * self.mamba_state, self.mamba_kernel, self.mamba_heads,
                           self.mamba_head_dim, self.mamba_state)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------


def _kinds(cfg: dict[str, Any], where: str) -> list[str]:
    kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
    pattern = cfg.get("hybrid_override_pattern")
    if kinds is None and isinstance(pattern, str):
        if any(c not in _PATTERN for c in pattern):
            raise ModelError(f"{where}: hybrid_override_pattern {pattern!r} may hold only M, *, - and E")
        return [_PATTERN[c] for c in pattern]
    if kinds is None:
        return ["linear_attention", "moe", "full_attention", "mlp"]
    if not isinstance(kinds, list) or any(_LEGACY.get(k, k) not in KINDS for k in kinds):
        raise ModelError(f"{where}: layers_block_type must name one of {KINDS} for each layer, got {kinds!r}")
    return [str(_LEGACY.get(k, k)) for k in kinds]


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> NemotronHSpec:
    """The spec of a Nemotron-H config (its keys over NemotronHConfig's defaults)."""
    cfg = {_ALIASES.get(k, k): v for k, v in cfg.items()}
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "moe_latent_size"}}
    mamba_act = gate_activation(cfg, where, "mamba_hidden_act")
    act = gate_activation(cfg, where, "mlp_hidden_act", default="relu2")  # (its MLPs' and experts')
    if cfg.get("sliding_window") is not None:
        raise ModelError(f"{where}: sliding_window is not supported for {ARCH}")
    limit = cfg.get("time_step_limit", cfg.get("mamba_dt_limit"))
    if limit is not None and (not isinstance(limit, (list, tuple)) or float(limit[1]) != float("inf")):
        raise ModelError(f"{where}: time_step_limit {limit!r} is not supported (transformers' Nemotron-H clamps dt "
                         f"at time_step_min only)")
    kinds = _kinds(cfg, where)
    moe = "moe" in kinds
    latent = cfg.get("moe_latent_size")
    if latent is not None and (isinstance(latent, bool) or not isinstance(latent, int) or latent <= 0):
        raise ModelError(f"{where}: moe_latent_size must be a positive integer or null, got {latent!r}")
    hidden = cfg_int(cfg, "hidden_size", where)
    return NemotronHSpec(
        architecture=ARCH, activation=act, mamba_act=mamba_act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=len(kinds),
        n_heads=cfg_int(cfg, "num_attention_heads", where),
        n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}, "k", where),
        head_dim=cfg_int({"head_dim": cfg.get("head_dim") or hidden // cfg["num_attention_heads"]}, "head_dim", where),
        rms_eps=cfg_num(cfg, "layer_norm_epsilon", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=False, dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), context_cap=max_context, layer_types=tuple(kinds),
        mamba_heads=cfg_int(cfg, "mamba_num_heads", where), mamba_head_dim=cfg_int(cfg, "mamba_head_dim", where),
        mamba_groups=cfg_int(cfg, "n_groups", where), mamba_state=cfg_int(cfg, "ssm_state_size", where),
        mamba_kernel=cfg_int(cfg, "conv_kernel", where), conv_bias=bool(cfg["use_conv_bias"]),
        proj_bias=bool(cfg["use_bias"]), dt_min=cfg_num(cfg, "time_step_min", where, positive=False),
        mlp_bias=bool(cfg["mlp_bias"]), experts=cfg_int(cfg, "n_routed_experts", where) if moe else 0,
        top_k=cfg_int(cfg, "num_experts_per_tok", where) if moe else 0,
        moe_width=cfg_int(cfg, "moe_intermediate_size", where) if moe else 0,
        shared_width=cfg_int(cfg, "moe_shared_expert_intermediate_size", where) if moe else 0,
        latent=latent if moe else None, router_groups=cfg_int(cfg, "n_group", where),
        router_topk_groups=cfg_int(cfg, "topk_group", where), renormalize=bool(cfg["norm_topk_prob"]),
        routed_scale=cfg_num(cfg, "routed_scaling_factor", where),
    )


#: Mamba2Config's defaults
MAMBA2_DEFAULTS: dict[str, Any] = {
    "num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
    "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "expand": 2,
    "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def mamba2_spec(cfg: dict[str, Any], where: str, dtype: str | None = None,
                max_context: int | None = None) -> NemotronHSpec:
    """A Mamba-2 language model's config (its keys over Mamba2Config's defaults) as a stack of Mamba-2 blocks."""
    cfg = {**MAMBA2_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    mamba_act = gate_activation(cfg, where)  # (its convolutions'; the gate stays SiLU, as transformers runs it)
    limit = cfg.get("time_step_limit")
    if limit is not None and (not isinstance(limit, (list, tuple)) or len(limit) != 2
                              or float(limit[0]) != 0.0 or float(limit[1]) != float("inf")):
        raise ModelError(f"{where}: time_step_limit {limit!r} is not supported (only the default (0, inf), which "
                         f"transformers' decode step also assumes)")
    if cfg.get("rms_norm") is False or cfg.get("norm_before_gate") is True:
        raise ModelError(f"{where}: rms_norm=false / norm_before_gate=true are not supported (transformers' Mamba-2 "
                         f"mixer always norms after the gate)")
    hidden, heads, head_dim = (cfg_int(cfg, k, where) for k in ("hidden_size", "num_heads", "head_dim"))
    inner = cfg_int(cfg, "expand", where) * hidden
    if heads * head_dim != inner:
        raise ModelError(f"{where}: num_heads ({heads}) x head_dim ({head_dim}) must equal expand x hidden_size "
                         f"({inner})")
    n = cfg_int(cfg, "num_hidden_layers", where)
    return NemotronHSpec(
        architecture="mamba2", vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden, intermediate_size=1,
        n_layers=n, n_heads=1, n_kv_heads=1, head_dim=64, rms_eps=cfg_num(cfg, "layer_norm_epsilon", where),
        max_position=1 << 20, tie_embeddings=bool(cfg["tie_word_embeddings"]), dtype=config_dtype(cfg, dtype),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), context_cap=max_context,
        layer_types=("linear_attention",) * n, mamba_heads=heads, mamba_head_dim=head_dim,
        mamba_groups=cfg_int(cfg, "n_groups", where), mamba_state=cfg_int(cfg, "state_size", where),
        mamba_kernel=cfg_int(cfg, "conv_kernel", where), conv_bias=bool(cfg["use_conv_bias"]),
        proj_bias=bool(cfg["use_bias"]), dt_min=0.0, norm_fp32_scale=False, mamba_act=mamba_act,
    )


def hf_config(spec: NemotronHSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    if spec.architecture == "mamba2":
        return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": spec.vocab_size,
                "hidden_size": spec.hidden_size, "num_hidden_layers": spec.n_layers, "num_heads": spec.mamba_heads,
                "head_dim": spec.mamba_head_dim, "expand": spec.mamba_heads * spec.mamba_head_dim // spec.hidden_size,
                "state_size": spec.mamba_state, "n_groups": spec.mamba_groups, "conv_kernel": spec.mamba_kernel,
                "use_bias": spec.proj_bias, "use_conv_bias": spec.conv_bias, "layer_norm_epsilon": spec.rms_eps,
                "tie_word_embeddings": spec.tie_embeddings, "bos_token_id": spec.bos_token_id,
                "eos_token_id": spec.eos_token_id, "dtype": spec.dtype, "hidden_act": hf_activation(spec.mamba_act)}
    cfg: dict[str, Any] = {
        "architectures": ["NemotronHForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "layers_block_type": list(spec.layer_types),
        "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position, "intermediate_size": spec.intermediate_size,
        "mlp_hidden_act": hf_activation(spec.activation or "relu2"), "mlp_bias": spec.mlp_bias,
        "mamba_hidden_act": hf_activation(spec.mamba_act), "ssm_state_size": spec.mamba_state,
        "mamba_num_heads": spec.mamba_heads, "mamba_head_dim": spec.mamba_head_dim, "n_groups": spec.mamba_groups,
        "conv_kernel": spec.mamba_kernel, "time_step_min": spec.dt_min, "use_conv_bias": spec.conv_bias,
        "use_bias": spec.proj_bias, "n_group": spec.router_groups, "topk_group": spec.router_topk_groups,
        "norm_topk_prob": spec.renormalize, "routed_scaling_factor": spec.routed_scale,
        "layer_norm_epsilon": spec.rms_eps, "tie_word_embeddings": False, "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
    }
    if spec.experts:
        cfg.update(n_routed_experts=spec.experts, num_experts_per_tok=spec.top_k,
                   moe_intermediate_size=spec.moe_width, moe_shared_expert_intermediate_size=spec.shared_width,
                   moe_latent_size=spec.latent)
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``down(act(up(x)))``: ReLU squared unless the spec's ``activation`` (``mlp_hidden_act``) says otherwise."""

    def __init__(self, hidden: int, width: int, bias: bool, act: str | None = None) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)
        self.act = activation(act or "relu2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.up_proj(x))))


class Router(nn.Module):
    def __init__(self, spec: NemotronHSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.experts, spec.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.experts), requires_grad=False)
        self.keep_fp32 = True  # (transformers keeps the router in fp32)
        self.k, self.groups, self.topk_group = spec.top_k, spec.router_groups, spec.router_topk_groups
        self.renormalize, self.scale = spec.renormalize, spec.routed_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k] fp32, expert ids [N, k])``."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        n, e = choice.shape
        group = choice.view(n, self.groups, e // self.groups).topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.zeros_like(group).scatter_(1, group.topk(self.topk_group, dim=-1, sorted=False)[1], 1)
        mask = keep[:, :, None].expand(n, self.groups, e // self.groups).reshape(n, e).bool()
        idx = choice.masked_fill(~mask, float("-inf")).topk(self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale, idx


class MoE(nn.Module):
    def __init__(self, spec: NemotronHSpec) -> None:
        super().__init__()
        width = spec.latent or spec.hidden_size
        self.gate = Router(spec)
        self.experts = nn.ModuleList(MLP(width, spec.moe_width, False, spec.activation) for _ in range(spec.experts))
        self.shared_experts = MLP(spec.hidden_size, spec.shared_width, spec.mlp_bias, spec.activation)
        self.latent = spec.latent is not None
        if self.latent:
            self.fc1_latent_proj = nn.Linear(spec.hidden_size, width, bias=spec.mlp_bias)
            self.fc2_latent_proj = nn.Linear(width, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = self.gate(x)
        h = self.fc1_latent_proj(x) if self.latent else x
        out = torch.zeros(h.shape, dtype=w.dtype, device=h.device)
        for e in torch.unique(idx).tolist():  # (transformers' order; sums in the weights' fp32)
            tok, slot = torch.where(idx == e)
            out.index_add_(0, tok, self.experts[e](h[tok]) * w[tok, slot, None])
        y = out.to(x.dtype)
        if self.latent:
            y = self.fc2_latent_proj(y)
        return cast(torch.Tensor, y + self.shared_experts(x))


class Attention(nn.Module):
    def __init__(self, spec: NemotronHSpec) -> None:
        super().__init__()
        h, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=False)


class Block(nn.Module):
    def __init__(self, spec: NemotronHSpec, layer: int) -> None:
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=spec.norm_fp32_scale)
        kind = spec.layer_types[layer]
        self.mixer: nn.Module
        if kind == "linear_attention":
            self.mixer = Mamba2Mixer(spec.hidden_size, spec.mamba_heads * spec.mamba_head_dim, spec.mamba_heads,
                                     spec.mamba_groups, spec.mamba_state, spec.mamba_kernel, spec.rms_eps,
                                     conv_bias=spec.conv_bias, proj_bias=spec.proj_bias, dt_min=spec.dt_min,
                                     act=activation(spec.mamba_act) if spec.mamba_act else None)
        elif kind == "full_attention":
            self.mixer = Attention(spec)
        elif kind == "mlp":
            self.mixer = MLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, spec.activation)
        else:
            self.mixer = MoE(spec)



class NemotronHModel(HybridDecoder):
    """Nemotron-H (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: NemotronHSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        norm = RMSNorm(spec.hidden_size, spec.rms_eps, fp32_scale=spec.norm_fp32_scale)
        self._setup(spec, Backbone(spec, lambda i: Block(spec, i), norm), device, backend)
        self.spec: NemotronHSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, block = self.begin_layer(layer, state, kv_layer)
        block = cast(Block, block)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        x = block.norm(st.hidden)
        kind = spec.layer_types[layer]
        if kind == "linear_attention":
            out = cast(Mamba2Mixer, block.mixer)(x, b, kv_layer)
        elif kind == "full_attention":
            attn = cast(Attention, block.mixer)
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            o = self.attend(attn.q_proj(x).view(n, hq, d), attn.k_proj(x).view(n, hkv, d),
                            attn.v_proj(x).view(n, hkv, d), layer_view(kv_layer, hkv, d), b, d ** -0.5)
            out = attn.o_proj(o.reshape(n, hq * d))
        else:
            out = block.mixer(x)
        st.hidden = st.hidden + out
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------

_RENAMES = (("backbone.embeddings.", "model.embed_tokens."), ("backbone.norm_f.", "model.norm."),
            ("backbone.", "model."))


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our names (``backbone.`` -> ``model.``; transformers' packed experts split;
    the ``mtp.*`` layers left out)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("mtp.") or ".mtp." in name:
            continue
        for theirs, ours in _RENAMES:
            if name.startswith(theirs):
                name = ours + name[len(theirs):]
                break
        for packed in ("up_proj", "down_proj"):
            if name.endswith(f".mixer.experts.{packed}"):
                if t.dim() != 3:
                    raise ModelError(f"{source}: packed expert tensor {name!r} has shape {tuple(t.shape)}")
                for e in range(t.shape[0]):
                    out[f"{name[: -len(packed)]}{e}.{packed}.weight"] = t[e]
                break
        else:
            out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint's names."""
    out = {}
    for name, t in tensors.items():
        for theirs, ours in _RENAMES:
            if name.startswith(ours):
                name = theirs + name[len(ours):]
                break
        out[name] = t
    return out
