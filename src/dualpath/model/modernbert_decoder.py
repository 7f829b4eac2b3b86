"""The ModernBERT decoder (``ModernBertDecoderForCausalLM``, model_type ``modernbert-decoder``: the Ettin decoders),
as transformers runs it, over the paged KV pool.

A pre-norm decoder with ModernBERT's parts:

* its token embeddings normed (``embeddings.norm``), LayerNorms with a bias only with ``norm_bias``, and no norm
  before the first layer's attention;
* multi-head attention (``Wo`` its output projection), full in the ``full_attention`` layers (every
  ``global_attn_every_n_layers``-th from the first, or ``layer_types``) and over ``local_attention // 2`` tokens in
  the others, with a RoPE base per layer type (``rope_parameters``, or ``global_rope_theta`` / ``local_rope_theta``:
  160,000 and 10,000 by default);
* a GLU MLP: ``Wo(act(a) * b)`` where ``a, b`` are the two halves of ``Wi(x)``;
* logits through ModernBERT's prediction head: the final norm, then ``dense``, its activation
  (``classifier_activation``) and a norm, then the ``decoder`` projection (tied to the embeddings by default, biased
  with ``decoder_bias``).

Checkpoint names are read into the Llama-shaped ones the layer-wise decoder uses (:func:`tensors_in`) and written
back (:func:`tensors_out`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.model.llama import (
    ForwardState,
    TypedRopeDecoder,
    _rope,
)
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_bool, cfg_int, config_dtype

ARCH = "modernbert-decoder"
TYPES = ("sliding_attention", "full_attention")
#: ModernBertDecoderConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
    "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192, "norm_eps": 1e-5,
    "norm_bias": False, "pad_token_id": 50283, "eos_token_id": 50282, "bos_token_id": 50281, "attention_bias": False,
    "mlp_bias": False, "decoder_bias": True, "classifier_bias": False, "classifier_activation": "gelu",
    "local_attention": 128, "tie_word_embeddings": True,
}
_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}
#: ours -> the checkpoint's (the prefixes that differ)
_NAMES = (("model.embed_tokens.", "model.embeddings.tok_embeddings."), ("model.embed_norm.", "model.embeddings.norm."),
          ("model.norm.", "model.final_norm."), ("head_transform.", "lm_head."), ("lm_head.", "decoder."))


@dataclass(frozen=True)
class ModernBertDecoderSpec(ModelSpec):
    """A :class:`ModelSpec` plus the ModernBERT decoder's fields."""

    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, float] = field(default_factory=dict)  # layer type -> RoPE base
    hidden_activation: str = "gelu"
    head_activation: str = "gelu"
    norm_bias: bool = False
    mlp_bias_: bool = False
    head_dense_bias: bool = False
    decoder_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'sliding_attention' or 'full_attention' for each "
                             f"of the {self.n_layers} layers, got {list(self.layer_types)}")
        for t in set(self.layer_types):
            if not self.rope_by_type.get(t, 0) > 0:
                raise ModelError(f"model config: the {t} layers need a positive RoPE base, got "
                                 f"{self.rope_by_type.get(t)!r}")
        from dualpath.model.layernorm_family import ACTIVATIONS

        for name in ("hidden_activation", "head_activation"):
            if getattr(self, name) not in set(ACTIVATIONS.values()):
                raise ModelError(f"model config: {name} {getattr(self, name)!r} unsupported; expected one of "
                                 f"{sorted(set(ACTIVATIONS.values()))}")

    @property
    def lm_head_bias(self) -> bool:
        return self.decoder_bias

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------






def _act(cfg: Mapping[str, Any], key: str, where: str) -> str:
    from dualpath.model.layernorm_family import ACTIVATIONS

    v = cfg.get(key)
    if v not in ACTIVATIONS:
        raise ModelError(f"{where}: {key} {v!r} unsupported; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[str(v)]


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> ModernBertDecoderSpec:
    """The spec of a ModernBERT decoder config (its keys over ModernBertDecoderConfig's defaults, read as its
    ``__post_init__`` reads them)."""

    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "local_attention"}}
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg.get("layer_types")
    if types is None:
        every = cfg_int({"global_attn_every_n_layers": cfg.get("global_attn_every_n_layers", 3)},
                     "global_attn_every_n_layers", where)
        types = ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in TYPES for t in types):
        raise ModelError(f"{where}: layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                         f"{n} layers, got {types!r}")
    local = cfg.get("local_attention")
    saved = cfg.get("sliding_window")  # (transformers derives it from local_attention, then a saved key overrides it)
    window: int | None = None
    if "sliding_attention" in types:
        if isinstance(saved, int) and not isinstance(saved, bool) and saved > 0:
            window = saved
        elif isinstance(local, bool) or not isinstance(local, int) or local < 2:
            raise ModelError(f"{where}: local_attention must be an integer >= 2 (its sliding layers attend over "
                             f"local_attention // 2 tokens), got {local!r}")
        else:
            window = local // 2
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object of layer type -> RoPE parameters")
    scaling = cfg.get("rope_scaling")
    thetas: dict[str, float] = {}
    for t in TYPES:
        p = {**(scaling or {}), **(rope.get(t) or {})}
        if p.get("rope_type", p.get("type", "default")) != "default":
            raise ModelError(f"{where}: rope_parameters.{t}: only a 'default' RoPE is supported for "
                             f"modernbert-decoder, got {p!r}")
        theta = p.get("rope_theta", cfg.get("global_rope_theta" if t == "full_attention" else "local_rope_theta",
                                            _THETA[t]))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ModelError(f"{where}: rope_parameters.{t}.rope_theta must be a positive number, got {theta!r}")
        thetas[t] = float(theta)
    dtype = config_dtype(cfg, dtype)
    hidden, heads = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_attention_heads", where)
    if hidden % heads:
        raise ModelError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    eps = cfg.get("norm_eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ModelError(f"{where}: norm_eps must be a positive number, got {eps!r}")
    return ModernBertDecoderSpec(
        architecture=ARCH, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where), n_layers=n, n_heads=heads, n_kv_heads=heads,
        head_dim=hidden // heads, rms_eps=float(eps), rope_theta=thetas["full_attention"],
        max_position=cfg_int(cfg, "max_position_embeddings", where),
        tie_embeddings=cfg_bool(cfg, "tie_word_embeddings", where),
        attention_bias=cfg_bool(cfg, "attention_bias", where),
        dtype=dtype, bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        sliding_window=window,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention") if window else (),
        context_cap=max_context, layer_types=tuple(types), rope_by_type=thetas,
        hidden_activation=_act(cfg, "hidden_activation", where),
        head_activation=_act(cfg, "classifier_activation", where), norm_bias=cfg_bool(cfg, "norm_bias", where),
        mlp_bias_=cfg_bool(cfg, "mlp_bias", where), head_dense_bias=cfg_bool(cfg, "classifier_bias", where),
        decoder_bias=cfg_bool(cfg, "decoder_bias", where),
    )


def _special_ids(vocab: int) -> dict[str, int]:
    """The pad / cls / sep ids ModernBertDecoderConfig requires (integers inside the vocabulary; they do not enter
    the forward, so the spec does not keep them): its defaults where they fit, else 0."""
    return {k: v if v < vocab else 0 for k, v in (("pad_token_id", 50283), ("cls_token_id", 50281),
                                                  ("sep_token_id", 50282))}


def hf_config(spec: ModernBertDecoderSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers (and :func:`spec_from_config`) read back to ``spec``."""
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}.get(spec.hidden_activation, spec.hidden_activation)
    head = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}.get(spec.head_activation, spec.head_activation)
    return {
        "architectures": ["ModernBertDecoderForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads, "hidden_activation": act,
        "max_position_embeddings": spec.max_position, "norm_eps": spec.rms_eps, "norm_bias": spec.norm_bias,
        "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias_, "decoder_bias": spec.decoder_bias,
        "classifier_bias": spec.head_dense_bias, "classifier_activation": head,
        "local_attention": 2 * (spec.sliding_window or 64), "sliding_window": spec.sliding_window or 64,
        "layer_types": list(spec.layer_types),
        "tie_word_embeddings": spec.tie_embeddings, "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, **_special_ids(spec.vocab_size), "dtype": spec.dtype,
        "rope_parameters": {t: {"rope_type": "default", "rope_theta": theta} for t, theta in spec.rope_by_type.items()},
    }


# --- modules -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: ModernBertDecoderSpec) -> None:
        super().__init__()
        h, bias = spec.hidden_size, spec.attention_bias
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.Wo = nn.Linear(h, h, bias=bias)


class MLP(nn.Module):
    def __init__(self, spec: ModernBertDecoderSpec) -> None:
        from dualpath.model.layernorm_family import activation

        super().__init__()
        self.Wi = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias_)
        self.Wo = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias_)
        self.act = activation(spec.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.Wi(x).chunk(2, dim=-1)
        return cast(torch.Tensor, self.Wo(self.act(a) * b))


def _norm(spec: ModernBertDecoderSpec) -> nn.LayerNorm:
    return nn.LayerNorm(spec.hidden_size, eps=spec.rms_eps, bias=spec.norm_bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModernBertDecoderSpec, layer: int) -> None:
        super().__init__()
        self.attn_norm = _norm(spec) if layer else None  # (none before the first layer's attention)
        self.attn = Attention(spec)
        self.mlp_norm = _norm(spec)
        self.mlp = MLP(spec)


class Backbone(nn.Module):
    def __init__(self, spec: ModernBertDecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embed_norm = _norm(spec)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = _norm(spec)


class HeadTransform(nn.Module):
    """ModernBERT's prediction head before the vocabulary projection: ``norm(act(dense(x)))``."""

    def __init__(self, spec: ModernBertDecoderSpec) -> None:
        from dualpath.model.layernorm_family import activation

        super().__init__()
        self.dense = nn.Linear(spec.hidden_size, spec.hidden_size, bias=spec.head_dense_bias)
        self.norm = _norm(spec)
        self.act = activation(spec.head_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.norm(self.act(self.dense(x))))


class ModernBertDecoderModel(TypedRopeDecoder):
    """The ModernBERT decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: ModernBertDecoderSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self.head_transform = HeadTransform(spec)
        self._build(spec, Backbone(spec), device, backend)
        self.spec: ModernBertDecoderSpec = spec
        self._typed_rope(spec)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.lm_head(self.head_transform(self.model.norm(h))).float())

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.embed_norm(self.model.embed_tokens(ids)))

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.attn
        x = st.hidden if mod.attn_norm is None else mod.attn_norm(st.hidden)
        n, h, d = x.shape[0], spec.n_heads, spec.head_dim
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_proj(x).view(n, h, d), cos, sin)
        k = _rope(attn.k_proj(x).view(n, h, d), cos, sin)
        store_kv(k, attn.v_proj(x).view(n, h, d), kv_layer, b.slot_mapping, backend=self.backend)
        if b.is_decode:
            o = paged_decode_attention(q, kv_layer, b.block_tables, b.seq_lens, d ** -0.5, backend=self.backend,
                                       window=self.windows[layer])
        else:
            o = paged_prefill_attention(q, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                        d ** -0.5, backend=self.backend, window=self.windows[layer])
        hidden = st.hidden + attn.Wo(o.reshape(n, h * d))
        st.hidden = hidden + mod.mlp(mod.mlp_norm(hidden))
        state.next_layer += 1


# --- tensors -------------------------------------------------------------------------------------------------


def _renamed(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under our names (its prediction head ``lm_head.`` is our ``head_transform.``, its
    ``decoder.`` our ``lm_head.``)."""
    theirs = tuple((t, o) for o, t in _NAMES)
    return {_renamed(k, theirs): v for k, v in tensors.items()}


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the checkpoint's names (the inverse of :func:`tensors_in`)."""
    return {_renamed(k, _NAMES): v for k, v in tensors.items()}
