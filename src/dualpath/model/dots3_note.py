"""dots3-note's language model (``Dots3NoteForCausalLM``, model_type ``dots3_note_text``; also the language model of
``Dots3NoteForConditionalGeneration``), as transformers runs it, over the paged latent KV pool of DeepSeek-V3's MLA
(:mod:`dualpath.model.deepseek`).

* **Three kinds of MLA layer** (``layer_types``): ``indexed_attention`` (DeepSeek Sparse Attention: a lightning
  indexer with GLM-5's interleaved RoPE picks each query's ``index_topk`` keys), ``full_attention`` (dense) and
  ``sliding_attention`` (over the last ``sliding_window`` keys, on the torch reference). A layer's own shapes come
  from ``per_layer_config`` (by default the sliding layers': 64 heads, a 1024-wide query and key latent, ...), so the
  pool's rows are as wide as the widest layer's latent (each layer uses the front of its rows) plus the indexer key.
* **MLA** with the query latent scaled by ``sqrt(hidden / q_lora_rank)`` (before ``q_b_proj`` *and* the indexer's
  ``wq_b``), the normed key latent by ``sqrt(hidden / kv_lora_rank)``, the shared RoPE key part RMS-normed
  (``k_rope_only_layernorm``) before its interleaved RoPE, a RoPE per layer type (the indexed layers' tables in
  fp32, as transformers computes them), and each head's output times ``sigmoid(g_proj(x))``.
* **MLPs**: dense layers by ``mlp_layer_types`` (from ``first_k_dense_replace`` / ``moe_layer_freq`` when absent),
  else DeepSeek-V3's grouped sigmoid router with a correction bias over routed experts, plus shared experts
  ``shared_experts_intermediate_size`` wide each.

Tensor names are transformers' (``model.layers.N.self_attn.k_rope_only_layernorm.weight``, per-expert or packed
experts; the image-text checkpoint's ``model.language_model.`` prefix); the vision and audio towers and the
multi-token-prediction layers (``mtp.*``, layers past ``num_hidden_layers``) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import mla_decode_attention, mla_prefill_attention, store_latent
from dualpath.kernels.reference import mla_masked_attention
from dualpath.kv.layout import KVSpec
from dualpath.model.deepseek import DeepseekV3Model, Router, _rotate
from dualpath.model.dsa import Indexer
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.rope import rope_frequencies
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, inherit_outer, parse_rope

__all__ = ["ARCH", "Dots3NoteModel", "Dots3NoteSpec", "spec_from_config", "tensors_in"]

ARCH = "dots3_note_text"
TYPES = ("indexed_attention", "full_attention", "sliding_attention")
#: Dots3NoteTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824, "moe_intermediate_size": 1536,
    "num_hidden_layers": 46, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": 1024, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "hidden_act": "silu", "max_position_embeddings": 524288, "rms_norm_eps": 1e-5, "bos_token_id": 151643,
    "eos_token_id": 151668, "tie_word_embeddings": False, "attention_bias": False, "index_topk": 2048,
    "index_head_dim": 128, "index_n_heads": 64, "head_dim": 256, "shared_experts_intermediate_size": 1536,
}
#: the sliding layers' shapes when the config names none (its ``swa_*`` keys)
_SWA = {"num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1024, "kv_lora_rank": 1024,
        "head_dim": 256, "qk_nope_head_dim": 192, "v_head_dim": 128}
#: what ``per_layer_config`` may set for a layer
_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "head_dim",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class Dots3NoteSpec(DeepseekV3Spec):
    """A :class:`DeepseekV3Spec` (its MLA fields: the indexed and full layers' shapes) plus each layer's kind and
    shapes, the sliding window, each kind's RoPE and the shared experts' width."""

    layer_types: tuple[str, ...] = ()
    #: per layer: (heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
    layer_dims: tuple[tuple[int, int, int, int, int, int], ...] = ()
    dense_layers: tuple[int, ...] = ()
    window: int = 0
    #: layer type -> (rope_theta, its scaling parameters or None)
    rope_by_type: dict[str, tuple[float, Any]] = field(default_factory=dict)
    shared_width: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "layer_dims", tuple(tuple(d) for d in self.layer_dims))
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if len(self.layer_types) != n or set(self.layer_types) - set(TYPES):
            raise ModelError(f"model config: layer_types must name one of {list(TYPES)} for each of the {n} layers, "
                             f"got {list(self.layer_types)}")
        if len(self.layer_dims) != n or any(min(d[:3] + d[4:]) <= 0 or d[3] < 0 or d[4] % 2 for d in self.layer_dims):
            raise ModelError("model config: every layer needs positive heads, q_lora_rank, kv_lora_rank, "
                             "qk_rope_head_dim (even) and v_head_dim")
        if self.kv_format != "auto":
            raise ModelError(f"KV format {self.kv_format!r} unsupported for dots3-note (its layers' latents differ "
                             "in width; only 'auto')")
        if "sliding_attention" in self.layer_types and self.window <= 0:
            raise ModelError(f"model config: sliding_window must be positive, got {self.window}")
        for t in set(self.layer_types):
            first = self.layer_dims[self.layer_types.index(t)][4]
            if any(d[4] != first for d, lt in zip(self.layer_dims, self.layer_types, strict=True) if lt == t):
                raise ModelError(f"model config: the {t} layers rotate different widths, but transformers builds one "
                                 "RoPE table per layer type")
            if t not in self.rope_by_type:
                raise ModelError(f"model config: rope_parameters has no entry for the {t} layers")
        if "indexed_attention" in self.layer_types and any(
                d[4] > self.index_head_dim for d, t in zip(self.layer_dims, self.layer_types, strict=True)
                if t == "indexed_attention"):
            raise ModelError("model config: qk_rope_head_dim must not exceed index_head_dim")
        g = (self.n_heads, self.q_lora_rank, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim,
             self.v_head_dim)
        if any(d != g for d, t in zip(self.layer_dims, self.layer_types, strict=True) if t == "indexed_attention"):
            raise ModelError("model config: per_layer_config changes an indexed layer's shapes; the indexed layers "
                             "must share the model's MLA shapes")
        if self.shared_width <= 0 and len(self.dense_layers) < n:
            raise ModelError("model config: shared_experts_intermediate_size must be positive")

    def has_indexer(self, layer: int) -> bool:
        return self.layer_types[layer] == "indexed_attention"

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def max_latent(self) -> int:
        return max(d[2] + d[4] for d in self.layer_dims)

    def kv_spec(self) -> KVSpec:
        """Rows as wide as the widest layer's latent (``kv_lora_rank + qk_rope_head_dim``), then the indexer key."""
        esize = torch.empty((), dtype=self.torch_dtype).element_size()
        return KVSpec.mla(self.n_layers, self.max_latent, self.dtype, rope_dim=self.qk_rope_head_dim,
                          extra_bytes=esize * self.index_head_dim)

    def to_hf_config(self) -> dict[str, Any]:
        n = self.n_layers
        g = (self.n_heads, self.q_lora_rank, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim,
             self.v_head_dim)
        per_layer = {str(i): {"num_attention_heads": d[0], "num_key_value_heads": d[0], "q_lora_rank": d[1],
                              "kv_lora_rank": d[2], "qk_nope_head_dim": d[3], "qk_rope_head_dim": d[4],
                              "head_dim": d[3] + d[4], "v_head_dim": d[5]}
                     for i, d in enumerate(self.layer_dims) if d != g}
        rope: dict[str, Any] = {}
        for t, (theta, scaling) in self.rope_by_type.items():
            i = self.layer_types.index(t)
            rope[t] = {"rope_type": "default", "rope_theta": theta, **(scaling or {}),
                       "partial_rotary_factor": self.layer_dims[i][4] / (self.layer_dims[i][3] + self.layer_dims[i][4])}
        return {
            "architectures": ["Dots3NoteForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size, "num_hidden_layers": n,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads,
            "n_shared_experts": self.n_shared_experts, "n_routed_experts": self.n_routed_experts,
            "routed_scaling_factor": self.routed_scaling_factor, "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim, "head_dim": self.qk_head_dim, "n_group": self.n_group,
            "topk_group": self.topk_group, "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob,
            "hidden_act": hf_activation(self.activation), "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_eps, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "index_topk": self.index_topk,
            "index_head_dim": self.index_head_dim, "index_n_heads": self.index_n_heads,
            "layer_types": list(self.layer_types), "per_layer_config": per_layer,
            "mlp_layer_types": ["dense" if i in self.dense_layers else "sparse" for i in range(n)],
            "sliding_window": self.window or None, "shared_experts_intermediate_size": self.shared_width or 1,
            "rope_parameters": rope, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": None, "dtype": self.dtype,
        }


def text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of a ``Dots3NoteForConditionalGeneration`` checkpoint (its ``text_config``, or
    the top level's keys when it has none, as Dots3NoteConfig builds it)."""
    text = cfg.get("text_config")
    if text is None:
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "vision_config",
                                                           "audio_config")}
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (dots3-note's language model)")
    out = dict(text)
    inherit_outer(out, text, cfg)
    if "tie_word_embeddings" in cfg:
        out["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return out


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                     max_context: int | None = None) -> Dots3NoteSpec:
    """The spec of a dots3-note config (the text model's, or the image-text checkpoint's) over Dots3NoteTextConfig's
    defaults, its derived keys (``use_dsa``, ``use_sliding_window``, ``swa_*``, ``first_k_dense_replace``,
    ``moe_layer_freq``) read as transformers derives them."""
    archs = cfg.get("architectures") or []
    if "Dots3NoteForConditionalGeneration" in archs or (not archs and cfg.get("model_type") == "dots3_note"):
        cfg = text_config(cfg, where)
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("num_local_experts") is not None and cfg.get("n_routed_experts") is None:  # (its attribute map)
        norm["n_routed_experts"] = cfg["num_local_experts"]
    if "moe_shared_expert_intermediate_size" in cfg:
        norm["shared_experts_intermediate_size"] = cfg["moe_shared_expert_intermediate_size"]
    act = gate_activation(norm, where)
    n = cfg_int(norm, "num_hidden_layers", where)
    use_dsa = cfg.get("use_dsa", None if "per_layer_config" in cfg else True)
    if cfg.get("layer_types") is None:
        full = "full_attention" if use_dsa is False else "indexed_attention"
        sliding = bool(cfg.get("use_sliding_window", True))
        types = [full if not sliding or i < 2 or i % 4 == 1 else "sliding_attention" for i in range(n)]
    else:
        types = cfg_kinds(norm, "layer_types", n, TYPES, where, [])
    if use_dsa is not None:  # (transformers turns the full layers indexed, or back)
        old, new = ("full_attention", "indexed_attention") if use_dsa else ("indexed_attention", "full_attention")
        types = [new if t == old else t for t in types]
    first_dense = cfg.get("first_k_dense_replace", 1)
    freq = cfg.get("moe_layer_freq", 1)
    default_mlp = ["sparse" if i >= first_dense and (bool(freq[i]) if isinstance(freq, list) else i % freq == 0)
                   else "dense" for i in range(n)]
    mlp = cfg_kinds(norm, "mlp_layer_types", n, ("dense", "sparse"), where, default_mlp)
    glob = {k: norm[k] for k in ("num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                 "qk_rope_head_dim", "v_head_dim", "head_dim")}
    glob["num_key_value_heads"] = norm.get("num_key_value_heads", glob["num_attention_heads"])
    swa = {k: cfg.get(f"swa_{k}", v) for k, v in _SWA.items()}
    swa["qk_rope_head_dim"] = cfg.get("swa_qk_rope_head_dim", swa["head_dim"] - swa["qk_nope_head_dim"])
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:
        per_layer = {str(i): swa for i, t in enumerate(types) if t == "sliding_attention"}
    if not isinstance(per_layer, dict):
        raise ModelError(f"{where}: per_layer_config must be an object of layer -> overrides")
    layers = [dict(glob) for _ in range(n)]
    for key, over in per_layer.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < n or not isinstance(over, dict) or set(over) - set(_LAYER_KEYS):
            raise ModelError(f"{where}: per_layer_config[{key!r}] may set {list(_LAYER_KEYS)} of a layer in "
                             f"0..{n - 1}, got {over!r}")
        layers[i].update(over)
    dims: list[Any] = []
    for i, d in enumerate(layers):
        if d["num_key_value_heads"] != d["num_attention_heads"]:
            raise ModelError(f"{where}: layer {i}: num_key_value_heads must match num_attention_heads (MLA)")
        if d["q_lora_rank"] is None:
            raise ModelError(f"{where}: layer {i}: dots3-note's queries always have a q_lora_rank")
        try:
            dims.append(tuple(int(d[k]) for k in ("num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")))
        except (TypeError, ValueError):
            raise ModelError(f"{where}: layer {i}: its MLA shapes must be integers, got {d!r}") from None
    rope_by_type = _rope_by_type(norm, cfg, types, where)
    g = next((dims[i] for i, t in enumerate(types) if t != "sliding_attention"), dims[0])
    if dtype is None:
        dtype = str(norm.get("torch_dtype") or norm.get("dtype") or "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = "float32"
    first = rope_by_type[types[0]]
    return Dots3NoteSpec(
        activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "intermediate_size", where),
        moe_intermediate_size=cfg_int(norm, "moe_intermediate_size", where), n_layers=n, n_heads=g[0],
        kv_lora_rank=g[2], qk_nope_head_dim=g[3], qk_rope_head_dim=g[4], v_head_dim=g[5], q_lora_rank=g[1],
        n_routed_experts=cfg_int(norm, "n_routed_experts", where),
        n_shared_experts=cfg_int(norm, "n_shared_experts", where),
        num_experts_per_tok=cfg_int(norm, "num_experts_per_tok", where),
        n_group=cfg_int(norm, "n_group", where), topk_group=cfg_int(norm, "topk_group", where),
        norm_topk_prob=bool(norm["norm_topk_prob"]),
        routed_scaling_factor=cfg_num(norm, "routed_scaling_factor", where), first_k_dense_replace=0,
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=first[0], rope_scaling=first[1],
        rope_interleave=True, max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm["tie_word_embeddings"]), attention_bias=bool(norm["attention_bias"]), dtype=dtype,
        kv_format=kv_format, bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"),
        model_type=ARCH, topk_method="noaux_tc", index_topk=cfg_int(norm, "index_topk", where),
        index_n_heads=cfg_int(norm, "index_n_heads", where), index_head_dim=cfg_int(norm, "index_head_dim", where),
        context_cap=max_context, layer_types=tuple(types), layer_dims=tuple(dims),
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        window=cfg_int(norm, "sliding_window", where) if cfg.get("sliding_window") is not None
        else int(cfg.get("sliding_window_size", 512)),
        rope_by_type=rope_by_type, shared_width=cfg_int(norm, "shared_experts_intermediate_size", where))


def _rope_by_type(norm: dict[str, Any], cfg: dict[str, Any], types: list[str],
                  where: str) -> dict[str, tuple[float, Any]]:
    """Each layer type's ``(rope_theta, scaling or None)``: ``rope_parameters`` keyed by type, else one for every
    type (the sliding layers' base ``swa_rope_theta``, 50,000 by default; the others' ``rope_theta``, 8e7)."""
    rp = norm.get("rope_parameters")
    keyed = isinstance(rp, dict) and all(isinstance(rp.get(t), dict) for t in set(types))
    out: dict[str, tuple[float, Any]] = {}
    for t in sorted(set(types)):
        if keyed:
            params = dict(cast(dict[str, Any], rp)[t])
        elif isinstance(rp, dict) and rp:
            params = dict(rp)
        else:
            params = {"rope_type": "default", "rope_theta": cfg.get("swa_rope_theta", 50000.0)
                      if t == "sliding_attention" else cfg.get("rope_theta", 80000000.0)}
        params.pop("partial_rotary_factor", None)  # (the rotated width is the layer's qk_rope_head_dim)
        theta, scaling = parse_rope({"rope_parameters": params}, where)
        if scaling is not None and scaling.get("rope_type") not in ("linear", "yarn"):
            raise ModelError(f"{where}: rope_parameters.{t}: RoPE type {scaling.get('rope_type')!r} unsupported "
                             "(default, linear or yarn)")
        out[t] = (theta, scaling)
    return out


# --- modules -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, spec: Dots3NoteSpec, layer: int) -> None:
        super().__init__()
        h, ql, kl, nope, rope, vd = spec.layer_dims[layer]
        bias = spec.attention_bias
        self.q_a_proj = nn.Linear(spec.hidden_size, ql, bias=bias)
        self.q_a_layernorm = RMSNorm(ql, spec.rms_eps)
        self.q_b_proj = nn.Linear(ql, h * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(spec.hidden_size, kl + rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(kl, spec.rms_eps)
        self.k_rope_only_layernorm = RMSNorm(rope, spec.rms_eps)
        self.kv_b_proj = nn.Linear(kl, h * (nope + vd), bias=False)
        self.o_proj = nn.Linear(h * vd, spec.hidden_size, bias=bias)
        self.g_proj = nn.Linear(spec.hidden_size, h, bias=False)
        self.indexer = Indexer(spec) if spec.has_indexer(layer) else None
        self.q_scale = (spec.hidden_size / ql) ** 0.5
        self.kv_scale = (spec.hidden_size / kl) ** 0.5


class MoE(nn.Module):
    def __init__(self, spec: Dots3NoteSpec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_intermediate_size, act=activation_of(spec))
                                     for _ in range(spec.n_routed_experts))
        self.shared_experts = FeedForward(spec.hidden_size, spec.shared_width * spec.n_shared_experts,
                                          act=activation_of(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x)
        return dispatch_experts(x, idx, w, self.experts) + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, spec: Dots3NoteSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (MoE(spec) if spec.is_moe_layer(layer)
                               else FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)))


class _Backbone(nn.Module):
    def __init__(self, spec: Dots3NoteSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class Dots3NoteModel(DeepseekV3Model):
    """dots3-note's language model (module docstring) over a paged latent KV pool."""

    def __init__(self, spec: Dots3NoteSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        if not isinstance(spec, Dots3NoteSpec):
            raise ModelError(f"Dots3NoteModel runs dots3-note specs, got {type(spec).__name__}")
        super().__init__(spec, device=device, backend=backend, backbone=_Backbone(spec))
        self.prefill_form = "absorbed"  # (the attention below runs the absorbed form only)
        self.scale = spec.qk_head_dim ** -0.5  # (the indexed layers', which the sparse path reads; no YaRN mscale)
        self._rope: dict[str, tuple[torch.Tensor, float]] = {}
        for t, (theta, scaling) in spec.rope_by_type.items():
            rope = spec.layer_dims[spec.layer_types.index(t)][4]
            inv, scale = rope_frequencies(rope, theta, scaling, spec.max_position)
            self._rope[t] = (inv.to(self.device), scale)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        state = super().prefill_begin(batch)
        pos = batch.positions.to(self.device, torch.float32)[:, None]
        dt = self.spec.torch_dtype
        tables = {}
        for t, (inv, scale) in self._rope.items():
            freqs = pos * inv[None, :]
            out = torch.float32 if t == "indexed_attention" else dt  # (transformers: fp32 tables for these)
            tables[t] = ((freqs.cos() * scale).to(out), (freqs.sin() * scale).to(out))
        if "indexed_attention" in tables:  # (what the indexer's keys and queries turn with)
            state.cos, state.sin = tables["indexed_attention"]
        state.carry = tables
        return state

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        self._check_kv(layer, kv_layer, state.batch.block_tokens)
        mod = cast(DecoderLayer, self.model.layers[layer])
        h = state.hidden + self._attend(layer, cast(Attention, mod.self_attn), mod.input_layernorm(state.hidden),
                                        state, kv_layer)
        state.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1

    def _attend(self, layer: int, attn: Attention, x: torch.Tensor, state: ForwardState,
                kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b = cast(Dots3NoteSpec, self.spec), state.batch
        kind = spec.layer_types[layer]
        h, _, kl, nope, rope, vd = spec.layer_dims[layer]
        n, dt = x.shape[0], x.dtype
        cos, sin = state.carry[kind]
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x)) * attn.q_scale
        q_nope, q_rot = attn.q_b_proj(q_resid).view(n, h, nope + rope).split([nope, rope], dim=-1)
        c, k_rot = attn.kv_a_proj_with_mqa(x).split([kl, rope], dim=-1)
        c = attn.kv_a_layernorm(c) * attn.kv_scale
        k_rot = attn.k_rope_only_layernorm(k_rot)
        q_rot = _rotate(q_rot, cos, sin, True).to(dt)
        k_rot = _rotate(k_rot, cos, sin, True).to(dt)
        latent = kv_layer[..., : kl + rope]
        store_latent(torch.cat((c, k_rot), dim=-1), latent, b.slot_mapping, kl, backend=self.backend)
        if attn.indexer is not None:
            self._store_index_keys(attn.indexer, x, state, kv_layer)
        w = attn.kv_b_proj.weight.view(h, nope + vd, kl).float()
        qq = torch.cat((torch.einsum("nhd,hdr->nhr", q_nope.float(), w[:, :nope]), q_rot.float()), dim=-1)
        qq = qq.contiguous()
        scale = (nope + rope) ** -0.5
        if kind == "sliding_attention":
            o_lat = self._window_attention(qq, latent, b, scale, kl, spec.window)
        elif state.sparse and attn.indexer is not None:
            o_lat = self._sparse_attention(attn.indexer, x, q_resid, qq, state, kv_layer, latent)
        elif b.is_decode:
            o_lat = mla_decode_attention(qq, latent, b.block_tables, b.seq_lens, scale, kl, backend=self.backend)
        else:
            o_lat = mla_prefill_attention(qq, latent, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos, scale,
                                          kl, backend=self.backend)
        o = torch.einsum("nhr,hvr->nhv", o_lat, w[:, nope:]).to(dt)
        o = o * torch.sigmoid(attn.g_proj(x)).view(n, h, 1)
        return cast(torch.Tensor, attn.o_proj(o.reshape(n, h * vd)))

    @staticmethod
    def _window_attention(qq: torch.Tensor, latent: torch.Tensor, b: SeqBatch, scale: float, kl: int,
                          window: int) -> torch.Tensor:
        """Absorbed attention over each query's last ``window`` keys (itself included), on the torch reference."""
        out = torch.empty((*qq.shape[:2], kl), dtype=qq.dtype, device=qq.device)
        cu = b.cu_seqlens_q.tolist()
        for i in range(b.batch_size):
            lo, hi = cu[i], cu[i + 1]
            if hi == lo:
                continue
            n = int(b.seq_lens[i])
            qpos = b.positions[lo:hi].to(qq.device)
            kpos = torch.arange(n, device=qq.device)[None, :]
            mask = (kpos <= qpos[:, None]) & (qpos[:, None] - kpos < window)
            out[lo:hi] = mla_masked_attention(qq[lo:hi], latent, b.block_tables[i], n, scale, kl, mask)
        return out


def tensors_in(spec: Dots3NoteSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors (``model.language_model.`` -> ``model.``), the towers and the
    multi-token-prediction layers left out."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(("model.vision_tower.", "model.audio_tower.", "model.vision_encoder.",
                            "model.audio_encoder.", "model.audio_adapter.", "vision_encoder.", "audio_encoder.",
                            "audio_adapter.", "model.mtp.", "model.language_model.mtp.", "mtp.")):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        out[name] = t
    return out
