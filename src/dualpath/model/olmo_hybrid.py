"""AllenAI's OLMo Hybrid (``OlmoHybridForCausalLM``, model_type ``olmo_hybrid``), as transformers runs it, over the
paged KV pool with state pages.

* linear-attention layers (``layer_types``; by default every fourth layer is full attention): pre-norm, Gated
  DeltaNet (:class:`dualpath.model.qwen_hybrid.GatedDeltaNet`) from separate ``q_proj`` / ``k_proj`` / ``v_proj``
  (convolved together), ``a_proj``, ``b_proj`` (``beta`` doubled with ``linear_allow_neg_eigval``) and a ``g_proj``
  output gate, ``o_norm`` (epsilon 1e-5) and ``o_proj``; then a pre-norm SwiGLU;
* full-attention layers: OLMo 2's post-norm block (norms on the attention's and the MLP's outputs) with RMS norms
  over the whole q / k projections; RoPE unless the ``rope_theta`` transformers reads is null (the released
  checkpoints': ``rope_parameters`` with a null ``rope_theta``, or a top-level ``rope_theta: null``; a config without
  either gets transformers' default 10000).
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
from dualpath.model.llama import ForwardState, RMSNorm, _rope
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.qwen_hybrid import GatedDeltaNet
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype
from dualpath.model.state_pages import state_bytes

ARCH = "olmo_hybrid"
TYPES = ("linear_attention", "full_attention")
#: OlmoHybridConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 100352, "hidden_size": 3840, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 30, "hidden_act": "silu", "max_position_embeddings": 65536, "rms_norm_eps": 1e-6,
    "bos_token_id": None, "eos_token_id": 100257, "tie_word_embeddings": False, "attention_bias": False,
    "linear_conv_kernel_dim": 4, "linear_allow_neg_eigval": True,
}


@dataclass(frozen=True)
class OlmoHybridSpec(StatePagesSpec, ModelSpec):
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)  # empty: no RoPE
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 4
    neg_eigval: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.lin_v_heads % self.lin_k_heads:
            raise ModelError(f"model config: linear_num_value_heads ({self.lin_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.lin_k_heads})")

    @property
    def conv_dim(self) -> int:
        return 2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.conv_dim, self.conv_kernel, self.lin_v_heads, self.lin_k_dim, self.lin_v_dim)

    def to_hf_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "architectures": ["OlmoHybridForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "layer_types": list(self.layer_types), "linear_num_key_heads": self.lin_k_heads,
            "linear_num_value_heads": self.lin_v_heads, "linear_key_head_dim": self.lin_k_dim,
            "linear_value_head_dim": self.lin_v_dim, "linear_conv_kernel_dim": self.conv_kernel,
            "linear_allow_neg_eigval": self.neg_eigval, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "dtype": self.dtype, "pad_token_id": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": None},  # (no RoPE: a theta of null)
        }
        if self.rope_by_type:
            cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_by_type["full_attention"][0]}
        return cfg


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> OlmoHybridSpec:
    """The spec of an OLMo Hybrid config (its keys over OlmoHybridConfig's defaults, its derived linear-attention
    sizes as transformers derives them)."""
    rope = cfg.get("rope_parameters")
    if not (isinstance(rope, dict) and "rope_theta" in rope):  # (transformers: the top-level key, else 10000)
        rope = {**(rope if isinstance(rope, dict) else {}), "rope_theta": cfg.get("rope_theta", 10000.0)} \
            if rope is None or isinstance(rope, dict) else rope
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its MLPs' and Gated DeltaNet convolutions')
    n, hidden = cfg_int(cfg, "num_hidden_layers", where), cfg_int(cfg, "hidden_size", where)
    heads = cfg_int(cfg, "num_attention_heads", where)
    default = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
    if "full_attention" not in default:
        default[-1] = "full_attention"
    types = cfg_kinds(cfg, "layer_types", n, TYPES, where, default)
    kh = cfg.get("linear_num_key_heads") or heads
    kd = cfg.get("linear_key_head_dim") or int(0.75 * hidden / kh)
    rope_by_type: dict[str, tuple[float, float]] = {}
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        if rope.get("rope_type", "default") != "default":
            raise ModelError(f"{where}: rope_parameters: only a 'default' RoPE is supported for {ARCH}, got {rope!r}")
        rope_by_type = {"full_attention": (cfg_num(rope, "rope_theta", where), 1.0)}
    elif rope is not None and not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object or null")
    return OlmoHybridSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=cfg_int({"k": cfg.get("num_key_value_heads") or heads}, "k", where), head_dim=hidden // heads,
        rms_eps=cfg_num(cfg, "rms_norm_eps", where), max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=bool(cfg["tie_word_embeddings"]), attention_bias=bool(cfg["attention_bias"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(types), rope_by_type=rope_by_type,
        lin_k_heads=cfg_int({"k": kh}, "k", where),
        lin_v_heads=cfg_int({"v": cfg.get("linear_num_value_heads") or heads}, "v", where),
        lin_k_dim=cfg_int({"d": kd}, "d", where),
        lin_v_dim=cfg_int({"d": cfg.get("linear_value_head_dim") or 2 * kd}, "d", where),
        conv_kernel=cfg_int(cfg, "linear_conv_kernel_dim", where),
        neg_eigval=bool(cfg["linear_allow_neg_eigval"]),
    )


class Attention(nn.Module):
    def __init__(self, spec: OlmoHybridSpec) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(h * d, spec.rms_eps)
        self.k_norm = RMSNorm(hkv * d, spec.rms_eps)


class DecoderLayer(nn.Module):
    def __init__(self, spec: OlmoHybridSpec, layer: int) -> None:
        super().__init__()
        self.mlp = FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec))
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        if spec.layer_types[layer] == "linear_attention":
            self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
            self.linear_attn = GatedDeltaNet(spec)  # type: ignore[arg-type]
            self.linear_attn.norm.eps = 1e-5  # (OLMo's o_norm)
            self.linear_attn.beta_scale = 2.0 if spec.neg_eigval else 1.0
        else:
            self.self_attn = Attention(spec)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)



class OlmoHybridModel(HybridDecoder):
    """OLMo Hybrid (module docstring) over a paged KV pool with state pages."""

    def __init__(self, spec: OlmoHybridSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda i: DecoderLayer(spec, i)), device, backend)
        self.spec: OlmoHybridSpec = spec

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        mod = cast(DecoderLayer, mod)
        spec, b = self.spec, state.batch
        d = spec.head_dim
        if spec.layer_types[layer] == "linear_attention":
            h = st.hidden + cast(GatedDeltaNet, mod.linear_attn)(mod.input_layernorm(st.hidden), b, kv_layer)
            st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        else:
            attn = cast(Attention, mod.self_attn)
            x = st.hidden
            n, hq, hkv = x.shape[0], spec.n_heads, spec.n_kv_heads
            q = attn.q_norm(attn.q_proj(x)).view(n, hq, d)
            k = attn.k_norm(attn.k_proj(x)).view(n, hkv, d)
            if spec.rope_by_type:  # (OLMo-core's float32 tables)
                cos, sin = st.tables["full_attention"]
                cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
                q, k = _rope(q.float(), cos, sin).to(q.dtype), _rope(k.float(), cos, sin).to(k.dtype)
            kv = layer_view(kv_layer, hkv, d)
            o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv, b, d ** -0.5)
            h = x + mod.post_attention_layernorm(attn.o_proj(o.reshape(n, hq * d)))
            st.hidden = h + mod.post_feedforward_layernorm(mod.mlp(h))
        state.next_layer += 1


_LINEAR = {"g_proj": "in_proj_z", "b_proj": "in_proj_b", "a_proj": "in_proj_a", "o_proj": "out_proj",
           "o_norm": "norm"}
#: the checkpoint's norm names -> transformers' (and ours)
_NORMS = ((".attention_layer_norm.", ".input_layernorm."), (".feedforward_layer_norm.", ".post_attention_layernorm."))
_STACKED = {"q_proj": "in_proj_qkv", "k_proj": "in_proj_qkv", "v_proj": "in_proj_qkv",
            "q_conv1d": "conv1d", "k_conv1d": "conv1d", "v_conv1d": "conv1d"}


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's names as ours: its norms' names; the linear layers' separate q / k / v projections and
    convolutions stacked as the convolution sees them (transformers' own ``conv1d`` read as it is)."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        for theirs, ours in _NORMS:
            name = name.replace(theirs, ours)
        head, _, tail = name.partition(".linear_attn.")
        if not tail:
            out[name] = t
            continue
        proj, _, rest = tail.partition(".")
        if proj in _STACKED:
            stacks.setdefault((head, _STACKED[proj]), {})[proj[0]] = t
        else:
            out[f"{head}.linear_attn.{_LINEAR.get(proj, proj)}" + (f".{rest}" if rest else "")] = t
    for (head, ours), parts in stacks.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"checkpoint: {head}.linear_attn needs its q, k and v parts of {ours}, got {sorted(parts)}")
        out[f"{head}.linear_attn.{ours}.weight"] = torch.cat([parts[p] for p in "qkv"])
    return out


def tensors_out(spec: OlmoHybridSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint's names."""
    back = {ours: theirs for theirs, ours in _LINEAR.items()}
    kd, vd = spec.lin_k_heads * spec.lin_k_dim, spec.lin_v_heads * spec.lin_v_dim
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        for theirs, ours in _NORMS:
            name = name.replace(ours, theirs)
        head, _, tail = name.partition(".linear_attn.")
        if not tail:
            out[name] = t
            continue
        proj, _, rest = tail.partition(".")
        if proj in ("in_proj_qkv", "conv1d"):
            suffix = "proj" if proj == "in_proj_qkv" else "conv1d"
            for p, part in zip("qkv", t.split((kd, kd, vd)), strict=True):
                out[f"{head}.linear_attn.{p}_{suffix}.{rest}"] = part
        else:
            out[f"{head}.linear_attn.{back.get(proj, proj)}" + (f".{rest}" if rest else "")] = t
    return out
