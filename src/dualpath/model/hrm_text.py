"""HRM-Text (``HrmTextForCausalLM``, model_type ``hrm_text``), as transformers runs it, over the paged KV pool.

A hierarchical looped decoder: two stacks of ``num_layers_per_stack`` layers, a fast low-level one (L) and a slow
high-level one (H), share nothing but their use of the same positions. The embeddings (times ``embedding_scale``)
start the high-level state ``z_H``; ``z_L`` starts at the learned ``z_L_init``. For each of ``H_cycles`` cycles the
L stack runs ``L_cycles`` times on ``z_L + z_H``, then the H stack once on ``z_H + z_L``; each stack ends with a
weightless RMS norm, and the head reads the final ``z_H``. Layers: weightless RMS pre-norms, multi-head attention
(RoPE over ``head_dim``) whose output is gated per channel by ``sigmoid(gate_proj(x))``, a SwiGLU MLP.

Every stack *invocation* has its own keys and values (transformers' cache slot
``(h (L_cycles + 1) + l) num_layers_per_stack + layer``): here each is a layer of the paged pool, so ``n_layers``
counts invocations (``num_hidden_layers`` = ``num_layers_per_stack x H_cycles x (L_cycles + 1)``) and each
invocation's KV lives in its own pages, moves between engines and reaches storage like any layer's.

``prefix_lm`` only acts with ``token_type_ids`` (a bidirectional prefix), which requests here do not carry: every
token attends causally, as transformers' model does without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, SeqBatch, TypedRopeDecoder, _rope
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype, parse_rope

__all__ = ["ARCH", "HrmTextModel", "HrmTextSpec", "spec_from_config"]

ARCH = "hrm_text"
#: HrmTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151808, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16,
    "num_attention_heads": 12, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "head_dim": 128, "H_cycles": 2, "L_cycles": 3,
}


@dataclass(frozen=True)
class HrmTextSpec(ModelSpec):
    """A :class:`ModelSpec` whose ``n_layers`` counts stack invocations, plus HRM's loop and stack fields."""

    per_stack: int = 0
    h_cycles: int = 1
    l_cycles: int = 1
    embedding_scale: float = 1.0
    mlp_bias: bool = False
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.per_stack, self.h_cycles) < 1 or self.l_cycles < 0:
            raise ModelError(f"model config: num_layers_per_stack and H_cycles must be >= 1, L_cycles >= 0, got "
                             f"{self.per_stack}, {self.h_cycles}, {self.l_cycles}")
        if self.n_layers != self.per_stack * self.h_cycles * (self.l_cycles + 1):
            raise ModelError(f"model config: num_hidden_layers ({self.n_layers}) must be num_layers_per_stack x "
                             f"H_cycles x (L_cycles + 1) = {self.per_stack * self.h_cycles * (self.l_cycles + 1)}")
        if self.n_kv_heads != self.n_heads:
            raise ModelError("model config: HRM-Text's attention is multi-head (num_key_value_heads = "
                             "num_attention_heads)")

    def invocation(self, layer: int) -> tuple[bool, int, bool, bool]:
        """KV layer ``layer`` as ``(high-level stack?, its layer, the stack's first layer?, its last?)``."""
        slot, module = divmod(layer, self.per_stack)
        high = slot % (self.l_cycles + 1) == self.l_cycles
        return high, module, module == 0, module == self.per_stack - 1

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["HrmTextForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_layers_per_stack": self.per_stack,
            "num_attention_heads": self.n_heads, "head_dim": self.head_dim, "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "H_cycles": self.h_cycles, "L_cycles": self.l_cycles,
            "embedding_scale": self.embedding_scale, "prefix_lm": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> HrmTextSpec:
    """The spec of an HRM-Text config (its keys over HrmTextConfig's defaults; ``num_layers_per_stack`` absent:
    ``num_hidden_layers`` is the stack's depth, as HrmTextConfig reads it)."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(norm, where)
    h, low = cfg_int(norm, "H_cycles", where), cfg_int(norm, "L_cycles", where, minimum=0)
    if cfg.get("num_layers_per_stack") is None:
        per = cfg_int(norm, "num_hidden_layers", where)
        total = per * h * (low + 1)
    else:
        per, total = cfg_int(norm, "num_layers_per_stack", where), cfg_int(norm, "num_hidden_layers", where)
    scale = norm.get("embedding_scale")
    if scale is None:
        scale = 1.0 / cfg_num(norm, "initializer_range", where)
    theta, scaling = parse_rope(norm, where)
    if scaling is not None:
        raise ModelError(f"{where}: rope_parameters of type {scaling.get('rope_type')!r} unsupported for HRM-Text "
                         "(only 'default')")
    heads = cfg_int(norm, "num_attention_heads", where)
    return HrmTextSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=total, n_heads=heads, n_kv_heads=heads,
        head_dim=cfg_int(norm, "head_dim", where), rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=bool(norm["tie_word_embeddings"]),
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        per_stack=per, h_cycles=h, l_cycles=low, embedding_scale=cfg_num({"s": scale}, "s", where),
        mlp_bias=bool(norm["mlp_bias"]), rope_by_type={"all": (theta, 1.0)},
    )


# --- modules -------------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """A weightless RMS norm (in fp32, back to ``x``'s dtype)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: HrmTextSpec) -> None:
        super().__init__()
        width, bias = spec.n_heads * spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, width, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, width, bias=bias)
        self.o_proj = nn.Linear(width, spec.hidden_size, bias=bias)
        self.gate_proj = nn.Linear(spec.hidden_size, width, bias=bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: HrmTextSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = FeedForward(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, act=activation_of(spec))


class Stack(nn.Module):
    def __init__(self, spec: HrmTextSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.per_stack))


class Backbone(nn.Module):
    def __init__(self, spec: HrmTextSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.L_module = Stack(spec)
        self.H_module = Stack(spec)
        self.z_L_init = nn.Parameter(torch.zeros(spec.hidden_size), requires_grad=False)
        self.norm = nn.Identity()  # (each stack ends with its own weightless norm; the head reads z_H as it is)


class HrmTextModel(TypedRopeDecoder):
    """HRM-Text (module docstring) over a paged KV pool: one pool layer per stack invocation."""

    def __init__(self, spec: HrmTextSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: HrmTextSpec = spec
        self._typed_rope(spec)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.embed_tokens(ids) * self.spec.embedding_scale)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        state = super().prefill_begin(batch)
        z_low = self.model.z_L_init.to(state.hidden.dtype).expand_as(state.hidden).contiguous()
        state.carry = {"low": z_low, "x": None}  # hidden is z_H; x the running stack input
        return state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(h).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        high, module, first, last = spec.invocation(layer)
        carry = st.carry
        if first:  # (L: z_L + z_H; H: z_H + z_L)
            carry["x"] = st.hidden + carry["low"] if high else carry["low"] + st.hidden
        stack = cast(Stack, self.model.H_module if high else self.model.L_module)
        blk = cast(DecoderLayer, stack.layers[module])
        attn = blk.self_attn
        x = carry["x"]
        hn = _rms(x, spec.rms_eps)
        n, hq, d = x.shape[0], spec.n_heads, spec.head_dim
        cos, sin = st.tables["all"]
        q = _rope(attn.q_proj(hn).view(n, hq, d), cos[:, None, :], sin[:, None, :])
        k = _rope(attn.k_proj(hn).view(n, hq, d), cos[:, None, :], sin[:, None, :])
        o = self.attend(q, k, attn.v_proj(hn).view(n, hq, d), kv_layer, b, d ** -0.5)
        o = torch.sigmoid(attn.gate_proj(hn)).view(n, hq, d) * o
        x = x + attn.o_proj(o.reshape(n, hq * d))
        x = x + blk.mlp(_rms(x, spec.rms_eps))
        if last:  # (the stack's closing norm gives its new state)
            out = _rms(x, spec.rms_eps)
            if high:
                st.hidden = out
            else:
                carry["low"] = out
        carry["x"] = x
        state.next_layer += 1


_FUSED = {".attn.gqkv_proj.": (".self_attn.", ("gate_proj", "q_proj", "k_proj", "v_proj")),
          ".mlp.gate_up_proj.": (".mlp.", ("gate_proj", "up_proj"))}


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our (transformers' in-memory) names: the released fused ``attn.gqkv_proj``
    (gate, q, k, v rows) and ``mlp.gate_up_proj`` split, ``attn.o_proj`` renamed."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        for fused, (prefix, parts) in _FUSED.items():
            if fused in name:
                head, tail = name.split(fused)
                if t.shape[0] % len(parts):
                    raise ModelError(f"fused tensor {name!r} has {t.shape[0]} rows, not {len(parts)} equal parts")
                for part, chunk in zip(parts, t.chunk(len(parts), dim=0), strict=True):
                    out[f"{head}{prefix}{part}.{tail}"] = chunk
                break
        else:
            out[name.replace(".attn.o_proj.", ".self_attn.o_proj.")] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours in the released layout (what transformers' save_pretrained writes): the fused projections."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        fused = False
        for theirs, (prefix, parts) in _FUSED.items():
            for part in parts:
                marker = f"{prefix}{part}."
                if marker in name:
                    head, tail = name.split(marker)
                    if part == parts[0]:
                        out[f"{head}{theirs}{tail}"] = torch.cat(
                            [tensors[f"{head}{prefix}{p}.{tail}"] for p in parts], dim=0)
                    fused = True
                    break
            if fused:
                break
        if not fused:
            out[name.replace(".self_attn.o_proj.", ".attn.o_proj.")] = t
    return out
