"""Gemma 4's text model (``Gemma4ForCausalLM``, model_type ``gemma4_text``; the language model of
``Gemma4ForConditionalGeneration`` checkpoints), as transformers runs it, over the paged KV pool.

What it adds to Gemma 3:

* **Per-layer KV shapes.** Full-attention layers have their own head width (``global_head_dim``, 512 by default)
  and, when ``attention_k_eq_v``, their own KV-head count (``num_global_key_value_heads``); or any layer its own
  (``head_dim``, ``num_key_value_heads``) through ``per_layer_config``, as transformers 5 writes it. The pool holds
  one page shape for every layer (:meth:`Gemma4Spec.kv_spec`: the widest layer's ``[2, H, D]``); a narrower layer
  uses the front of each token's row of its page (:func:`layer_view`), so pages, Layer Blocks and Full Blocks keep
  one size and move unchanged.
* **Keys as values** (``attention_k_eq_v``): the full layers have no ``v_proj``; the value is the key projection,
  normed by a weightless RMS norm (every layer's value is) and not rotated.
* **Shared KV** (``num_kv_shared_layers``): the last layers compute no key or value; each attends with those of the
  last earlier non-shared layer of its type. Here a shared layer writes that layer's new keys and values into its
  own pages too, so every layer's pages are complete on their own (a prefix read from storage serves every layer;
  the price is the shared layers' KV bytes, which transformers does not keep).
* **Per-layer embeddings** (``hidden_size_per_layer_input``): a second embedding table ``[vocab, layers x P]`` plus
  a projection of the token's embedding, normed, feed each layer a ``P``-wide input, gated into the residual after
  the MLP.
* A **MoE block** beside the MLP (``enable_moe_block``): a router on the block's input (weightless norm, a learned
  scale, softmax, the top ``top_k_experts`` renormalized, each times its ``per_expert_scale``), experts packed
  ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``; MLP and experts are normed apart and summed.
* **Double-wide MLPs** on the shared layers (``use_double_wide_mlp``), a learned ``layer_scalar`` on each layer's
  output, RMS norms that scale by ``weight`` (not Gemma 3's ``1 + weight``), attention scale 1 (queries and keys
  are RMS-normed per head), and a RoPE per layer type from ``rope_parameters``: ``default``, ``linear`` or
  ``proportional`` (the first ``partial_rotary_factor`` of each head's frequency pairs turn, the rest stay).

A ``use_bidirectional_attention: "all"`` model (every token attending both ways) is refused; ``"vision"`` attends
causally over text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.kv.layout import KVSpec
from dualpath.model.layernorm_family import ACTIVATIONS, activation, hf_activation
from dualpath.model.llama import ForwardState, LayerwiseDecoder, SeqBatch, TypedRopeState, _rope, rope_tables
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, config_dtype

ARCH = "gemma4_text"
TYPES = ("sliding_attention", "full_attention")
#: Gemma4TextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "sliding_window": 512, "final_logit_softcapping": None, "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 256, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
    "enable_moe_block": False, "use_double_wide_mlp": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}
#: Gemma4UnifiedTextConfig's (``gemma4_unified_text``: Gemma 4 without per-layer embeddings or a MoE block)
UNIFIED_DEFAULTS: dict[str, Any] = {"sliding_window": 1024, "max_position_embeddings": 262144}
_UNIFIED_NONE = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block", "num_experts",
                 "top_k_experts", "moe_intermediate_size")
_ROPE_DEFAULTS = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                     "rope_theta": 1000000.0}}
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
_LAYER_KEYS = ("head_dim", "num_key_value_heads")


@dataclass(frozen=True)
class Gemma4Spec(ModelSpec):
    """A :class:`ModelSpec` (``n_kv_heads`` / ``head_dim``: the sliding layers') plus Gemma 4's own fields."""

    layer_types: tuple[str, ...] = ()
    layer_kv: tuple[tuple[int, int], ...] = ()  # each layer's (KV heads, head_dim)
    k_eq_v: bool = False
    kv_shared_layers: int = 0
    ple_size: int = 0  # hidden_size_per_layer_input (0: no per-layer embeddings)
    ple_vocab: int = 0
    double_wide_mlp: bool = False
    moe_experts: int = 0  # (0: no MoE block)
    moe_top_k: int = 0
    moe_width: int = 0
    gelu_approx: str = "tanh"  # hidden_activation's GELU: "tanh" or "none" (exact); ModelSpec's ``activation``
    rope_types: dict[str, dict[str, Any]] = field(default_factory=dict)  # when it names another one

    def gate_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``hidden_activation`` as a function (transformers' ``ACT2FN[hidden_activation]``: the MLPs', the experts'
        and the per-layer input gate's)."""
        if self.activation is not None:
            return activation(self.activation)
        approx = self.gelu_approx
        return lambda x: F.gelu(x, approximate=approx)

    def hf_activation(self) -> str:
        """transformers' name of :meth:`gate_act`."""
        if self.activation is not None:
            return hf_activation(self.activation)
        return "gelu_pytorch_tanh" if self.gelu_approx == "tanh" else "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "layer_kv", tuple((int(h), int(d)) for h, d in self.layer_kv))
        if len(self.layer_types) != n or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {n} layers, got {list(self.layer_types)}")
        if len(self.layer_kv) != n:
            raise ModelError(f"model config: layer_kv needs one (heads, head_dim) per layer, got {len(self.layer_kv)}")
        for i, (h, d) in enumerate(self.layer_kv):
            if h <= 0 or d <= 0 or self.n_heads % h:
                raise ModelError(f"model config: layer {i} has {h} KV heads of dim {d}; both must be positive and "
                                 f"divide num_attention_heads ({self.n_heads})")
        for t in set(self.layer_types):
            dims = {self.layer_kv[i][1] for i, x in enumerate(self.layer_types) if x == t}
            if len(dims) > 1:  # (transformers builds one RoPE table per layer type, from its layers' head_dim)
                raise ModelError(f"model config: the {t} layers have different head_dim {sorted(dims)}; one RoPE "
                                 f"per layer type needs one head_dim per type")
            if t not in self.rope_types:
                raise ModelError(f"model config: rope_parameters has no entry for the {t} layers")
        if not 0 <= self.kv_shared_layers < n:
            raise ModelError(f"model config: num_kv_shared_layers must be in [0, {n - 1}] (a layer must compute the KV "
                             f"the shared ones read), got {self.kv_shared_layers}")
        for i in range(self.first_shared, n):  # (raises when a shared layer's type has no layer to read from)
            self.kv_source(i)
        if self.ple_size < 0 or (self.ple_size and self.ple_vocab <= 0):
            raise ModelError(f"model config: hidden_size_per_layer_input ({self.ple_size}) must be >= 0 with a "
                             f"positive vocab_size_per_layer_input ({self.ple_vocab})")
        if self.moe_experts and not (0 < self.moe_top_k <= self.moe_experts and self.moe_width > 0):
            raise ModelError(f"model config: a MoE block needs 1 <= top_k_experts ({self.moe_top_k}) <= num_experts "
                             f"({self.moe_experts}) and a positive moe_intermediate_size ({self.moe_width})")

    # --- layers --------------------------------------------------------------------------------------------
    @property
    def first_shared(self) -> int:
        return self.n_layers - self.kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values layer ``layer`` attends with: itself, or for a shared layer the last
        non-shared layer of its type (transformers' ``kv_sharing_modes``)."""
        if layer < self.first_shared:
            return layer
        t = self.layer_types[layer]
        for i in range(self.first_shared - 1, -1, -1):
            if self.layer_types[i] == t:
                return i
        raise ModelError(f"model config: shared layer {layer} ({t}) has no earlier non-shared {t} layer to read "
                         f"keys and values from")

    def is_full(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def mlp_width(self, layer: int) -> int:
        return self.intermediate_size * (2 if self.double_wide_mlp and layer >= self.first_shared else 1)

    def kv_spec(self) -> KVSpec:
        """One page shape for every layer: the widest layer's ``[2, H, D]`` (:func:`layer_view`)."""
        h, d = max(self.layer_kv, key=lambda hd: hd[0] * hd[1])
        return KVSpec.mha(self.n_layers, h, d, self.dtype)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


def layer_view(kv_layer: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """A layer's ``[num_blocks, bt, 2, heads, dim]`` view of pages shaped for the widest layer: the front
    ``heads * dim`` elements of each token's K and V rows (the rest unused)."""
    if tuple(kv_layer.shape[3:]) == (heads, dim):
        return kv_layer
    return kv_layer.flatten(3)[..., : heads * dim].unflatten(3, (heads, dim))


# --- config in -----------------------------------------------------------------------------------------------




def _layer_types(cfg: dict[str, Any], n: int, where: str) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:  # Gemma4TextConfig: five sliding layers to one full
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in TYPES for t in types):
        raise ModelError(f"{where}: layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                         f"{n} layers, got {types!r}")
    return [*types[:-1], "full_attention"]  # (transformers forces the last layer to full attention)


def _layer_kv(cfg: dict[str, Any], types: list[str], where: str) -> list[tuple[int, int]]:
    heads, dim = cfg_int(cfg, "num_key_value_heads", where, 1), cfg_int(cfg, "head_dim", where, 1)
    per_layer = cfg.get("per_layer_config")
    out = [(heads, dim)] * len(types)
    if per_layer is not None:  # transformers 5: sparse overrides by layer index
        if not isinstance(per_layer, dict):
            raise ModelError(f"{where}: per_layer_config must be an object of layer index -> overrides")
        for key, over in per_layer.items():
            try:
                i = int(key)
            except (TypeError, ValueError):
                raise ModelError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
            if not 0 <= i < len(types) or not isinstance(over, dict):
                raise ModelError(f"{where}: per_layer_config[{key!r}] must be an object for a layer of "
                                 f"0..{len(types) - 1}")
            extra = sorted(set(over) - set(_LAYER_KEYS))
            if extra:
                raise ModelError(f"{where}: per_layer_config[{key!r}] overrides {extra}; only {list(_LAYER_KEYS)} "
                                 f"per layer are supported")
            out[i] = (cfg_int({**{"num_key_value_heads": heads}, **over}, "num_key_value_heads", where, 1),
                      cfg_int({**{"head_dim": dim}, **over}, "head_dim", where, 1))
        return out
    gdim = cfg.get("global_head_dim", 512)  # (Gemma4TextConfig's default, whatever head_dim is)
    gdim = cfg_int({"global_head_dim": gdim}, "global_head_dim", where, 1)
    gheads = cfg.get("num_global_key_value_heads") if cfg.get("attention_k_eq_v") else None
    if gheads is not None:
        gheads = cfg_int({"num_global_key_value_heads": gheads}, "num_global_key_value_heads", where, 1)
    return [(gheads or heads, gdim) if t == "full_attention" else (heads, dim) for t in types]


def read_activation(cfg: Mapping[str, Any], where: str) -> tuple[str, str | None]:
    """``(gelu_approx, activation)`` of ``hidden_activation`` (or ``hidden_act``): a GELU by its approximation, or
    another activation by its :data:`~dualpath.model.layernorm_family.ACTIVATIONS` value."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[str(act)], None
    if act not in ACTIVATIONS:
        raise ModelError(f"{where}: hidden_activation {act!r} unsupported; expected one of {sorted(ACTIVATIONS)}")
    return "tanh", ACTIVATIONS[str(act)]


def _rope_types(cfg: dict[str, Any], types: list[str], where: str) -> dict[str, dict[str, Any]]:
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = _ROPE_DEFAULTS
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object of layer type -> RoPE parameters")
    out = {}
    for t in sorted(set(types)):
        p = rope.get(t)
        if not isinstance(p, dict):
            raise ModelError(f"{where}: rope_parameters.{t} must be an object (the {t} layers' RoPE)")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear", "proportional"):
            raise ModelError(f"{where}: rope_parameters.{t}.rope_type {kind!r} unsupported for gemma4; expected "
                             f"'default', 'linear' or 'proportional'")
        theta = p.get("rope_theta", _ROPE_DEFAULTS[t]["rope_theta"])
        factor = p.get("factor", 1.0)
        partial = p.get("partial_rotary_factor", 1.0) if kind == "proportional" else 1.0
        for name, v in (("rope_theta", theta), ("factor", factor), ("partial_rotary_factor", partial)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ModelError(f"{where}: rope_parameters.{t}.{name} must be a positive number, got {v!r}")
        if kind == "linear" and "factor" not in p:
            raise ModelError(f"{where}: rope_parameters.{t}: a linear RoPE needs a 'factor'")
        out[t] = {"rope_type": kind, "rope_theta": float(theta), "factor": float(factor),
                  "partial_rotary_factor": float(partial)}
    return out


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Gemma4Spec:
    """The spec of a Gemma 4 text config (its keys over Gemma4TextConfig's defaults; a ``gemma4_unified_text``
    config over Gemma4UnifiedTextConfig's, which has no per-layer embeddings or MoE block)."""

    given = {k: v for k, v in cfg.items() if v is not None or k in ("final_logit_softcapping", "sliding_window")}
    if is_unified(cfg):
        given = {**UNIFIED_DEFAULTS, **{k: v for k, v in given.items() if k not in _UNIFIED_NONE},
                 "hidden_size_per_layer_input": 0}
    cfg = {**DEFAULTS, **given}
    if cfg.get("use_bidirectional_attention") == "all":
        raise ModelError(f"{where}: use_bidirectional_attention 'all' (every token attending both ways) is not an "
                         f"autoregressive decoder; unsupported")
    gelu, other = read_activation(cfg, where)
    n = cfg_int(cfg, "num_hidden_layers", where, 1)
    types = _layer_types(cfg, n, where)
    layer_kv = _layer_kv(cfg, types, where)
    window = cfg.get("sliding_window")
    if window is not None:
        window = cfg_int(cfg, "sliding_window", where, 1)
    moe = bool(cfg.get("enable_moe_block"))
    dtype = config_dtype(cfg, dtype)
    ple = cfg.get("hidden_size_per_layer_input") or 0
    cap = cfg.get("final_logit_softcapping")
    return Gemma4Spec(
        architecture=ARCH,
        vocab_size=cfg_int(cfg, "vocab_size", where, 1),
        hidden_size=cfg_int(cfg, "hidden_size", where, 1),
        intermediate_size=cfg_int(cfg, "intermediate_size", where, 1),
        n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where, 1),
        n_kv_heads=cfg_int(cfg, "num_key_value_heads", where, 1),
        head_dim=cfg_int(cfg, "head_dim", where, 1),
        rms_eps=float(cfg["rms_norm_eps"]),
        rope_theta=_rope_types(cfg, types, where)[types[-1]]["rope_theta"],
        max_position=cfg_int(cfg, "max_position_embeddings", where, 1),
        tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]),
        dtype=dtype,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if window is not None and "sliding_attention" in types else (),
        final_logit_softcapping=cap,
        context_cap=max_context,
        layer_types=tuple(types),
        layer_kv=tuple(layer_kv),
        k_eq_v=bool(cfg.get("attention_k_eq_v")),
        kv_shared_layers=cfg_int(cfg, "num_kv_shared_layers", where, 0),
        ple_size=cfg_int({"hidden_size_per_layer_input": ple}, "hidden_size_per_layer_input", where, 0),
        ple_vocab=cfg_int(cfg, "vocab_size_per_layer_input", where, 1) if ple else 0,
        double_wide_mlp=bool(cfg.get("use_double_wide_mlp")),
        moe_experts=cfg_int(cfg, "num_experts", where, 1) if moe else 0,
        moe_top_k=cfg_int(cfg, "top_k_experts", where, 1) if moe else 0,
        moe_width=cfg_int(cfg, "moe_intermediate_size", where, 1) if moe else 0,
        gelu_approx=gelu, activation=other,
        rope_types=_rope_types(cfg, types, where),
    )


# --- config out ----------------------------------------------------------------------------------------------


def hf_config(spec: Gemma4Spec) -> dict[str, Any]:
    """A ``config.json`` that transformers' Gemma4ForCausalLM (and :func:`spec_from_config`) read back to ``spec``."""
    base = (spec.n_kv_heads, spec.head_dim)
    full = {spec.layer_kv[i] for i in range(spec.n_layers) if spec.is_full(i)}
    sliding_ok = all(spec.layer_kv[i] == base for i in range(spec.n_layers) if not spec.is_full(i))
    cfg: dict[str, Any] = {
        "architectures": ["Gemma4ForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "hidden_activation": spec.hf_activation(),
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.attention_bias,
        "sliding_window": spec.sliding_window or 512, "layer_types": list(spec.layer_types),
        "final_logit_softcapping": spec.final_logit_softcapping,
        "hidden_size_per_layer_input": spec.ple_size, "vocab_size_per_layer_input": spec.ple_vocab or spec.vocab_size,
        "attention_k_eq_v": spec.k_eq_v, "num_kv_shared_layers": spec.kv_shared_layers,
        "use_double_wide_mlp": spec.double_wide_mlp, "enable_moe_block": bool(spec.moe_experts),
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
        "rope_parameters": {t: {k: v for k, v in p.items()
                                if not (k == "partial_rotary_factor" and p["rope_type"] != "proportional")
                                and not (k == "factor" and p["rope_type"] == "default")}
                            for t, p in spec.rope_types.items()},
    }
    if spec.moe_experts:
        cfg.update(num_experts=spec.moe_experts, top_k_experts=spec.moe_top_k, moe_intermediate_size=spec.moe_width)
    if sliding_ok and len(full) <= 1 and (not full or spec.k_eq_v or next(iter(full))[0] == spec.n_kv_heads):
        if full:
            heads, dim = next(iter(full))
            cfg["global_head_dim"] = dim
            if spec.k_eq_v:
                cfg["num_global_key_value_heads"] = heads
    else:  # any other pattern: transformers 5's explicit per-layer overrides
        cfg["per_layer_config"] = {str(i): {"num_key_value_heads": h, "head_dim": d}
                                   for i, (h, d) in enumerate(spec.layer_kv) if (h, d) != base}
    return cfg


# --- modules -------------------------------------------------------------------------------------------------


class Norm(nn.Module):
    """Gemma 4's RMS norm: ``x * (mean(x^2) + eps) ** -0.5`` in fp32, times ``weight`` (none when unscaled)."""

    def __init__(self, dim: int, eps: float, scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.float()
        y = f * torch.pow(f.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, spec: Gemma4Spec, layer: int) -> None:
        super().__init__()
        heads, dim = spec.layer_kv[layer]
        bias = spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, spec.n_heads * dim, bias=bias)
        self.q_norm = Norm(dim, spec.rms_eps)
        if spec.kv_source(layer) == layer:  # (a shared layer has no key / value weights)
            self.k_proj = nn.Linear(spec.hidden_size, heads * dim, bias=bias)
            self.v_proj = None if spec.k_eq_v and spec.is_full(layer) else nn.Linear(spec.hidden_size, heads * dim,
                                                                                      bias=bias)
            self.k_norm = Norm(dim, spec.rms_eps)
            self.v_norm = Norm(dim, spec.rms_eps, scale=False)
        self.o_proj = nn.Linear(spec.n_heads * dim, spec.hidden_size, bias=bias)


class MLP(nn.Module):
    def __init__(self, spec: Gemma4Spec, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, spec.hidden_size, bias=False)
        self.act = spec.gate_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, spec: Gemma4Spec) -> None:
        super().__init__()
        self.norm = Norm(spec.hidden_size, spec.rms_eps, scale=False)
        self.proj = nn.Linear(spec.hidden_size, spec.moe_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(spec.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(spec.moe_experts))
        self.root = spec.hidden_size ** -0.5
        self.k = spec.moe_top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [N, k] fp32, expert ids [N, k])``."""
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    def __init__(self, spec: Gemma4Spec) -> None:
        super().__init__()
        e, i, h = spec.moe_experts, spec.moe_width, spec.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = spec.gate_act()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            gate, up = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[e])
            out.index_add_(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: Gemma4Spec, layer: int) -> None:
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_eps
        self.input_layernorm = Norm(h, eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = Norm(h, eps)
        self.pre_feedforward_layernorm = Norm(h, eps)
        self.mlp = MLP(spec, spec.mlp_width(layer))
        self.post_feedforward_layernorm = Norm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))
        if spec.ple_size:
            self.per_layer_input_gate = nn.Linear(h, spec.ple_size, bias=False)
            self.per_layer_projection = nn.Linear(spec.ple_size, h, bias=False)
            self.post_per_layer_input_norm = Norm(h, eps)
        if spec.moe_experts:
            self.router = Router(spec)
            self.experts = Experts(spec)
            self.post_feedforward_layernorm_1 = Norm(h, eps)
            self.post_feedforward_layernorm_2 = Norm(h, eps)
            self.pre_feedforward_layernorm_2 = Norm(h, eps)


class Backbone(nn.Module):
    def __init__(self, spec: Gemma4Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = Norm(spec.hidden_size, spec.rms_eps)
        if spec.ple_size:
            width = spec.n_layers * spec.ple_size
            self.embed_tokens_per_layer = nn.Embedding(spec.ple_vocab, width)
            self.per_layer_model_projection = nn.Linear(spec.hidden_size, width, bias=False)
            self.per_layer_projection_norm = Norm(spec.ple_size, spec.rms_eps)


# --- the model -----------------------------------------------------------------------------------------------


def rope_inv_freq(params: Mapping[str, Any], dim: int) -> torch.Tensor:
    """A layer type's inverse frequencies ``[dim // 2]`` (fp32), as transformers computes them: ``default``,
    ``linear`` (divided by ``factor``) or ``proportional`` (the first ``int(partial * dim // 2)`` pairs turn, the rest
    have frequency 0; divided by ``factor``)."""
    base = float(params["rope_theta"])
    pairs = dim // 2
    if params["rope_type"] == "proportional":
        pairs = int(params["partial_rotary_factor"] * dim // 2)
    inv = 1.0 / (base ** (torch.arange(0, 2 * pairs, 2, dtype=torch.int64).float() / dim))
    inv = torch.cat((inv, torch.zeros(dim // 2 - pairs)))
    return inv / float(params.get("factor", 1.0)) if params["rope_type"] != "default" else inv


@dataclass
class Gemma4State(TypedRopeState):
    """:class:`TypedRopeState` plus the per-layer inputs and the keys and values the shared layers read."""

    per_layer: torch.Tensor | None = None  # [N, layers, P]
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Gemma4Model(LayerwiseDecoder):
    """Gemma 4's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: Gemma4Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: Gemma4Spec = spec
        self.gate_act = spec.gate_act()  # (the per-layer input gate's)
        dims = {t: spec.layer_kv[spec.layer_types.index(t)][1] for t in set(spec.layer_types)}
        self.inv_freq = {t: rope_inv_freq(spec.rope_types[t], d) for t, d in dims.items()}
        dt = spec.torch_dtype
        self.embed_scale = torch.tensor(spec.hidden_size ** 0.5).to(dt)
        self.ple_scale = torch.tensor(spec.ple_size ** 0.5).to(dt) if spec.ple_size else None
        self.windows = [spec.layer_window(i) for i in range(spec.n_layers)]
        # the non-shared layers some shared layer reads; the pages' shape (the widest layer's)
        self._sources = {spec.kv_source(i) for i in range(spec.first_shared, spec.n_layers)}
        self._page = spec.kv_spec()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h))
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return cast(torch.Tensor, logits.float())

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        spec = self.spec
        ids = self.checked_ids(batch)
        if spec.ple_size and int(ids.max()) >= spec.ple_vocab:
            raise ModelError(f"token id {int(ids.max())} is past the per-layer embeddings' vocabulary "
                             f"(vocab_size_per_layer_input {spec.ple_vocab})")
        dt = spec.torch_dtype
        positions = batch.positions.to(self.device, torch.float32)
        tables = rope_tables(positions, self.inv_freq, dt)
        embed = self.model.embed_tokens(ids)
        hidden = embed * self.embed_scale.to(self.device, embed.dtype)
        per_layer = None
        if spec.ple_size:
            n = ids.shape[0]
            tok = self.model.embed_tokens_per_layer(ids) * cast(torch.Tensor, self.ple_scale).to(self.device, dt)
            proj = self.model.per_layer_model_projection(hidden) * spec.hidden_size ** -0.5
            proj = self.model.per_layer_projection_norm(proj.reshape(n, spec.n_layers, spec.ple_size))
            per_layer = (proj + tok.reshape(n, spec.n_layers, spec.ple_size)) * 2.0 ** -0.5
        cos, sin = tables[spec.layer_types[-1]]
        return Gemma4State(batch=batch, hidden=hidden, cos=cos, sin=sin, tables=tables, per_layer=per_layer)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        """Run layer ``layer`` (in order) over pages shaped as :meth:`Gemma4Spec.kv_spec` says."""
        st = cast(Gemma4State, state)
        spec, b = self.spec, state.batch
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, self._page.n_kv_heads, self._page.head_dim))
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        heads, dim = spec.layer_kv[layer]
        x = mod.input_layernorm(st.hidden)
        n = x.shape[0]
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, spec.n_heads, dim)), cos, sin)
        src = spec.kv_source(layer)
        if src == layer:
            k = attn.k_proj(x).view(n, heads, dim)
            v = k if attn.v_proj is None else attn.v_proj(x).view(n, heads, dim)
            k, v = _rope(attn.k_norm(k), cos, sin), attn.v_norm(v)
            if layer in self._sources:
                st.shared[layer] = (k, v)
        else:
            k, v = st.shared[src]
        kv = layer_view(kv_layer, heads, dim)
        store_kv(k, v, kv, b.slot_mapping, backend=self.backend)
        if b.is_decode:
            o = paged_decode_attention(q, kv, b.block_tables, b.seq_lens, 1.0, backend=self.backend,
                                       window=self.windows[layer])
        else:
            o = paged_prefill_attention(q, kv, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos, 1.0,
                                        backend=self.backend, window=self.windows[layer])
        a = mod.post_attention_layernorm(attn.o_proj(o.reshape(n, spec.n_heads * dim)))
        h = st.hidden + a
        m = mod.mlp(mod.pre_feedforward_layernorm(h))
        if spec.moe_experts:
            w, idx = mod.router(h)
            e = mod.experts(mod.pre_feedforward_layernorm_2(h), w, idx)
            m = mod.post_feedforward_layernorm_1(m) + mod.post_feedforward_layernorm_2(e)
        h = h + mod.post_feedforward_layernorm(m)
        if st.per_layer is not None:
            g = self.gate_act(mod.per_layer_input_gate(h)) * st.per_layer[:, layer]
            h = h + mod.post_per_layer_input_norm(mod.per_layer_projection(g))
        st.hidden = h * mod.layer_scalar
        if layer == spec.n_layers - 1:
            st.shared.clear()
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def tensors_in(spec: Gemma4Spec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors less the key / value weights some checkpoints keep for the shared layers (which
    transformers does not load either)."""
    drop = tuple(f"model.layers.{i}.self_attn.{name}." for i in range(spec.first_shared, spec.n_layers)
                 for name in ("k_proj", "v_proj", "k_norm", "v_norm"))
    return {k: t for k, t in tensors.items() if not k.startswith(drop)}


def random_init_overrides(model: Gemma4Model, gen: torch.Generator) -> None:
    """Seeded random weights that keep the model's scale: every norm, router scale and ``layer_scalar`` near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_1.weight", "norm_2.weight", "router.scale", "per_expert_scale",
                              "layer_scalar")):
                p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def is_unified(cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` is a Gemma 4 "unified" text model's (``Gemma4UnifiedForCausalLM``)."""
    archs = cfg.get("architectures") or []
    return "Gemma4UnifiedForCausalLM" in archs or (not archs and cfg.get("model_type") == "gemma4_unified_text")


__all__ = ["Gemma4Model", "Gemma4Spec", "hf_config", "is_unified", "layer_view", "spec_from_config", "tensors_in"]
