"""Dory (``DoryForCausalLM``, model_type ``dory``), as transformers runs it, over the paged KV pool.

An nGPT-style looped decoder: every hidden state lives on the unit sphere (L2 norms, ``x / |x|``, in place of RMS
norms), and each block moves the state *towards* its normalized update at a learned per-channel rate
(``h + |lambda| (norm(update) - h)``) instead of adding it. Attention is Trinity's (gated output, per-head q/k norms,
now L2) with queries rescaled per channel by ``(sqk x sqrt(head_dim) / init)^2`` after RoPE (a base per layer
type), the gate's logits by ``(s_gate x hidden^0.25 / init)^2``, and an L2 norm before ``o_proj``; the MLP scales
gate and up per channel (``suv_*``) and L2-normalizes before ``down_proj``; the head scales each token's logit by a
learned ``logit_scale``.

The layers form an input section, a **recurrent section run ``n_recurrent_loops`` times** (each loop restarting from
the normalized state plus the input section's normalized output) and an output section. transformers' default
``per_loop`` cache gives each loop pass its own KV; here each *pass* is a layer of the paged pool (``n_layers`` counts
passes), so every pass's keys and values live in their own pages, move between engines and reach storage like any
layer's. ``recurrent_kv_cache_mode: last_loop`` (earlier loops reading the last loop's cache) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import HybridDecoder
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, TypedRopeState, _rope
from dualpath.model.moe import gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "dory"
KINDS = ("sliding_attention", "full_attention")
#: DoryConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 2560, "intermediate_size": 7168, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "hidden_act": "silu",
    "max_position_embeddings": 8192, "initializer_range": 0.0177, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "sliding_window": 1024, "ngpt_alpha_init": 0.05,
    "n_input_layers": 8, "n_output_layers": 8, "n_recurrent_loops": 2, "recurrent_kv_cache_mode": "per_loop",
}
_THETAS = {"sliding_attention": 10_000.0, "full_attention": 10_000_000.0}


@dataclass(frozen=True)
class DorySpec(ModelSpec):
    """A :class:`ModelSpec` whose ``n_layers`` counts layer *passes* (the recurrent section once per loop); the
    checkpoint's layers are ``module_types``."""

    module_types: tuple[str, ...] = ()
    n_input: int = 8
    n_output: int = 8
    loops: int = 2
    window: int = 1024
    init_range: float = 0.0177
    alpha_init: float = 0.05
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "module_types", tuple(self.module_types))
        m = len(self.module_types)
        if any(t not in KINDS for t in self.module_types):
            raise ModelError(f"model config: layer_types must name {list(KINDS)} (and 'mlp' blocks), got "
                             f"{list(self.module_types)}")
        if self.loops < 1 or self.n_input < 0 or self.n_output < 0 or self.n_input + self.n_output >= m:
            raise ModelError(f"model config: n_input_layers ({self.n_input}) + n_output_layers ({self.n_output}) "
                             f"must leave a recurrent layer of num_hidden_layers ({m}), and n_recurrent_loops "
                             f"({self.loops}) be >= 1")
        if self.n_layers != len(self.passes):
            raise ModelError(f"model config: {self.n_layers} layer passes, expected {len(self.passes)}")
        for t in dict.fromkeys(self.module_types):
            if t not in self.rope_by_type:
                raise ModelError(f"model config: rope_parameters.{t} missing")

    @property
    def n_recurrent(self) -> int:
        return len(self.module_types) - self.n_input - self.n_output

    @property
    def passes(self) -> tuple[int, ...]:
        """The checkpoint layer each pass runs: the input section, the recurrent section ``loops`` times, the
        output section."""
        m, a, r = len(self.module_types), self.n_input, self.n_recurrent
        return tuple(range(a)) + tuple(range(a, a + r)) * self.loops + tuple(range(a + r, m))

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.module_types[self.passes[layer]] == "sliding_attention" else None

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["DoryForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 2 * len(self.module_types), "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": hf_activation(self.activation), "attention_bias": self.attention_bias,
            "mlp_bias": bool(self.mlp_has_bias),
            "max_position_embeddings": self.max_position, "initializer_range": self.init_range,
            "tie_word_embeddings": self.tie_embeddings, "sliding_window": self.window,
            "ngpt_alpha_init": self.alpha_init, "n_input_layers": 2 * self.n_input,
            "n_recurrent_layers": 2 * self.n_recurrent, "n_output_layers": 2 * self.n_output,
            "n_recurrent_loops": self.loops, "recurrent_kv_cache_mode": "per_loop",
            "layer_types": [b for t in self.module_types for b in (t, "mlp")],
            "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta}
                                for t, (theta, _) in self.rope_by_type.items()},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> DorySpec:
    """The spec of a Dory config (its keys over DoryConfig's defaults; the released layout, which lists each layer
    as an attention block and an ``mlp`` block and counts both, read as transformers reads it)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)
    for key in ("attention_bias", "mlp_bias"):  # (q/k/v/o's biases, not the gate's; the MLP's three)
        if not isinstance(cfg.get(key), bool):
            raise ModelError(f"{where}: {key} must be true or false, got {cfg.get(key)!r}")
    if cfg.get("recurrent_kv_cache_mode") != "per_loop":
        raise ModelError(f"{where}: recurrent_kv_cache_mode {cfg.get('recurrent_kv_cache_mode')!r} unsupported (only "
                         "'per_loop': each loop's keys and values are its own)")
    n = cfg_int(cfg, "num_hidden_layers", where)
    n_in, n_out = cfg_int(cfg, "n_input_layers", where, 0), cfg_int(cfg, "n_output_layers", where, 0)
    n_rec = cfg.get("n_recurrent_layers")
    types = cfg.get("layer_types")
    if isinstance(types, list) and "mlp" in types:  # (the released layout: an attention and an mlp block per layer)
        types, n, n_in, n_out = types[::2], n // 2, n_in // 2, n_out // 2
        n_rec = None if n_rec is None else int(n_rec) // 2
    if types is None:
        types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise ModelError(f"{where}: layer_types must name each of the {n} layers, got {types!r}")
    if n_rec is not None and n_in + int(n_rec) + n_out != n:
        raise ModelError(f"{where}: n_input_layers + n_recurrent_layers + n_output_layers must equal "
                         f"num_hidden_layers ({n_in} + {n_rec} + {n_out} != {n})")
    rope = cfg.get("rope_parameters") or {t: {"rope_type": "default", "rope_theta": _THETAS.get(t, 1e4)}
                                          for t in dict.fromkeys(types)}
    rope_by_type: dict[str, tuple[float, float]] = {}
    for t in dict.fromkeys(types):
        p = rope.get(t) if isinstance(rope, dict) else None
        if not isinstance(p, dict) or p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: a 'default' RoPE per layer type is supported, got {p!r}")
        rope_by_type[t] = (cfg_num(p, "rope_theta", f"{where}: rope_parameters.{t}"), 1.0)
    loops = cfg_int(cfg, "n_recurrent_loops", where)
    passes = n + (loops - 1) * (n - n_in - n_out)
    return DorySpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=passes,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rope_theta=next(iter(rope_by_type.values()))[0],
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, module_types=tuple(types), n_input=n_in, n_output=n_out, loops=loops,
        window=cfg_int(cfg, "sliding_window", where), init_range=cfg_num(cfg, "initializer_range", where),
        alpha_init=cfg_num(cfg, "ngpt_alpha_init", where), rope_by_type=rope_by_type,
        attention_bias=cfg["attention_bias"], mlp_has_bias=cfg["mlp_bias"] or None,
    )


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` in fp32, back to ``x``'s dtype (Dory's norm: unit length, not unit RMS)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + eps)).type_as(x)


# --- modules (the checkpoints' names) ----------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: DorySpec) -> None:
        super().__init__()
        h, hq, hkv, d = spec.hidden_size, spec.n_heads, spec.n_kv_heads, spec.head_dim
        b = spec.attention_bias  # (on q/k/v/o, as transformers builds them; never on the gate)
        self.q_proj = nn.Linear(h, hq * d, bias=b)
        self.k_proj = nn.Linear(h, hkv * d, bias=b)
        self.v_proj = nn.Linear(h, hkv * d, bias=b)
        self.gate_proj = nn.Linear(h, hq * d, bias=False)
        self.o_proj = nn.Linear(hq * d, h, bias=b)
        self.sqk = nn.Parameter(torch.full((hq * d,), spec.init_range))
        self.s_gate = nn.Parameter(torch.full((hq * d,), spec.init_range))


class Mlp(nn.Module):
    def __init__(self, spec: DorySpec) -> None:
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        b = bool(spec.mlp_has_bias)
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.suv_gate = nn.Parameter(torch.ones(i))
        self.suv_up = nn.Parameter(torch.ones(i))
        self.scale = spec.hidden_size ** 0.5
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x) * (self.suv_gate * self.scale)
        up = self.up_proj(x) * (self.suv_up * self.scale)
        return cast(torch.Tensor, self.down_proj(l2_norm(self.act(gate) * up)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DorySpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = Mlp(spec)
        self.lambda_1 = nn.Parameter(torch.full((spec.hidden_size,), spec.init_range))
        self.lambda_2 = nn.Parameter(torch.full((spec.hidden_size,), spec.init_range))


class Backbone(nn.Module):
    def __init__(self, spec: DorySpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in spec.module_types)


@dataclass
class DoryState(TypedRopeState):
    """:class:`TypedRopeState` plus the input section's normalized output, which every loop restarts from."""

    looped_from: torch.Tensor | None = None


class DoryModel(HybridDecoder):
    """Dory (module docstring) over a paged KV pool, a layer of pages per layer pass."""

    def __init__(self, spec: DorySpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec), device, backend)
        self.spec: DorySpec = spec
        self.lm_head.logit_scale = nn.Parameter(torch.full((spec.vocab_size,), spec.init_range,
                                                           dtype=self.lm_head.weight.dtype,
                                                           device=self.lm_head.weight.device))
        self.windows = [spec.layer_window(i) for i in range(spec.n_layers)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(l2_norm(h)).float()
        scale = cast(torch.Tensor, self.lm_head.logit_scale)
        return logits * (scale.float() * (1 / self.spec.init_range))

    @torch.no_grad()
    def prefill_begin(self, batch: Any) -> ForwardState:
        st = cast(TypedRopeState, super().prefill_begin(batch))
        return DoryState(batch=st.batch, hidden=st.hidden, cos=st.cos, sin=st.sin, tables=st.tables)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        spec = self.spec
        self.check_layer(layer, state, kv_layer, (state.batch.block_tokens, 2, spec.n_kv_heads, spec.head_dim))
        st = cast(DoryState, state)
        module = spec.passes[layer]
        rec_start = spec.n_input
        if module == rec_start and layer in (rec_start + k * spec.n_recurrent for k in range(spec.loops)):
            if layer == rec_start:  # (each loop restarts from the input section's normalized output)
                st.looped_from = l2_norm(st.hidden)
            assert st.looped_from is not None
            st.hidden = l2_norm(st.hidden) + st.looped_from
        blk = cast(DecoderLayer, self.model.layers[module])
        attn = blk.self_attn
        n, hq, hkv, d = st.hidden.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        h = l2_norm(st.hidden)
        q = l2_norm(attn.q_proj(h).view(n, hq, d))
        k = l2_norm(attn.k_proj(h).view(n, hkv, d))
        cos, sin = st.tables[spec.module_types[module]]
        q, k = _rope(q, cos[:, None, :], sin[:, None, :]), _rope(k, cos[:, None, :], sin[:, None, :])
        q = q * ((attn.sqk * (d ** 0.5 / spec.init_range)).view(hq, d)).square()
        kv = layer_view(kv_layer, hkv, d)
        o = self.attend(q, k, attn.v_proj(h).view(n, hkv, d), kv, st.batch, d ** -0.5,
                        window=self.windows[layer]).reshape(n, hq * d)
        o = o * torch.sigmoid(attn.gate_proj(h) * (attn.s_gate * (spec.hidden_size ** 0.25 / spec.init_range)).square())
        out = l2_norm(attn.o_proj(l2_norm(o)))
        scale = spec.alpha_init / spec.init_range
        h = h + (blk.lambda_1 * scale).abs() * (out - h)
        h = l2_norm(h)
        out = l2_norm(blk.mlp(h))
        st.hidden = h + (blk.lambda_2 * scale).abs() * (out - h)
        state.next_layer += 1


_PAIR = re.compile(r"layers\.(\d+)\.(mixer|attn_alpha|mlp_alpha)(?=\.|$)")


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for a checkpoint's tensors: as transformers' save_pretrained writes them (``backbone.``,
    ``embeddings``, ``g_proj``), or the released two-block layout (``layers.{2i}.mixer`` the attention,
    ``layers.{2i+1}.mixer`` the MLP, ``attn_alpha`` / ``mlp_alpha``); rotary buffers left out."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if "rotary_emb." in key:
            continue
        m = _PAIR.search(key)
        if m is not None:
            i, name = int(m[1]), m[2]
            name = {"attn_alpha": "lambda_1", "mlp_alpha": "lambda_2"}.get(name, ("self_attn", "mlp")[i % 2])
            key = key[:m.start()] + f"layers.{i // 2}.{name}" + key[m.end():]
        if key.startswith("backbone."):
            key = "model." + key[len("backbone."):]
        out[key.replace(".embeddings.", ".embed_tokens.").replace(".self_attn.g_proj.", ".self_attn.gate_proj.")] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the names transformers' save_pretrained writes."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("model."):
            key = "backbone." + key[len("model."):]
        out[key.replace(".embed_tokens.", ".embeddings.").replace(".self_attn.gate_proj.", ".self_attn.g_proj.")] = t
    return out
