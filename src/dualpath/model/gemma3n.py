"""Gemma 3n's text model (``Gemma3nForCausalLM``, model_type ``gemma3n_text``; the language model of
``Gemma3nForConditionalGeneration`` checkpoints: gemma-3n-E2B / E4B), as transformers runs it, over the paged KV pool.

It shares Gemma 4's attention (:mod:`dualpath.model.gemma4`: per-head q/k norms, a weightless value norm, scale 1,
a RoPE per layer type, the last ``num_kv_shared_layers`` layers attending with an earlier layer's keys and values,
written into their own pages too) and per-layer embeddings, and adds:

* **AltUp**: the hidden state is ``altup_num_inputs`` (4) streams. The embeddings' stream is projected into the
  others (each rescaled to its magnitude); before each layer a router (tanh of a linear map of the active stream,
  normed and scaled by ``1 / hidden``) mixes the streams into predictions, the layer runs on the active one, and its
  output corrects every stream (``correction_coefs``); the corrected active stream, scaled by
  ``correct_output_scale``, gates the per-layer input that is added to the other streams. After the last layer the
  other streams are projected back, rescaled to the active one's magnitude and averaged.
* **Laurel**: a low-rank residual (``laurel_rank``) on the layer's normed input, averaged with the attention's
  residual (divided by sqrt 2).
* MLPs ``intermediate_size`` wide per layer (a list), and in the ``activation_sparsity_pattern`` layers the gate
  sparsified by a Gaussian top-k: values below ``mean + std * Phi^-1(sparsity)`` of each row cut to zero.

A token past the per-layer embeddings' table (the vision / audio soft tokens) reads its row 0, as transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.kv.layout import KVSpec
from dualpath.model.gemma4 import (
    Attention,
    Gemma4Model,
    Gemma4Spec,
    Gemma4State,
    Norm,
    read_activation,
    rope_inv_freq,
)
from dualpath.model.llama import ForwardState, LayerwiseDecoder, SeqBatch, _rope, rope_tables
from dualpath.model.spec_common import cfg_int, config_dtype

ARCH = "gemma3n_text"
TYPES = ("sliding_attention", "full_attention")
#: Gemma3nTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 262400, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 35,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False,
    "sliding_window": 512, "final_logit_softcapping": 30.0, "vocab_size_per_layer_input": 262144,
    "hidden_size_per_layer_input": 256, "altup_active_idx": 0, "altup_correct_scale": True, "altup_num_inputs": 4,
    "num_kv_shared_layers": 15, "laurel_rank": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}
_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


@dataclass(frozen=True)
class Gemma3nSpec(Gemma4Spec):
    """A :class:`Gemma4Spec` (its attention, shared KV and per-layer embeddings) plus Gemma 3n's fields."""

    altup_inputs: int = 4
    altup_active: int = 0
    altup_correct_scale: bool = True
    laurel_rank: int = 64
    intermediate_sizes: tuple[int, ...] = ()
    sparsity: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_layers
        object.__setattr__(self, "intermediate_sizes", tuple(int(x) for x in self.intermediate_sizes))
        object.__setattr__(self, "sparsity", tuple(float(x) for x in self.sparsity))
        if len(self.intermediate_sizes) != n or any(x <= 0 for x in self.intermediate_sizes):
            raise ModelError(f"model config: intermediate_size must be a positive integer or one per layer ({n}), "
                             f"got {list(self.intermediate_sizes)}")
        if len(self.sparsity) != n or any(not 0 <= x < 1 for x in self.sparsity):
            raise ModelError(f"model config: activation_sparsity_pattern needs one value in [0, 1) per layer ({n}), "
                             f"got {list(self.sparsity)}")
        if self.altup_inputs < 2 or not 0 <= self.altup_active < self.altup_inputs or self.laurel_rank <= 0:
            raise ModelError(f"model config: altup_num_inputs ({self.altup_inputs}) must be >= 2 with "
                             f"altup_active_idx ({self.altup_active}) one of them, and laurel_rank "
                             f"({self.laurel_rank}) positive")
        if not self.ple_size:
            raise ModelError("model config: gemma3n needs hidden_size_per_layer_input (its per-layer embeddings)")

    def mlp_width(self, layer: int) -> int:
        return self.intermediate_sizes[layer]

    def kv_spec(self) -> KVSpec:
        return KVSpec.mha(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)

    def to_hf_config(self) -> dict[str, Any]:
        return hf_config(self)


# --- config in and out ---------------------------------------------------------------------------------------




def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Gemma3nSpec:
    """The spec of a Gemma 3n text config (its keys over Gemma3nTextConfig's defaults, read as its
    ``__post_init__`` reads them)."""

    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "final_logit_softcapping"}}
    gelu, other = read_activation(cfg, where)
    n = cfg_int(cfg, "num_hidden_layers", where)
    width = cfg["intermediate_size"]
    widths = width if isinstance(width, list) else [width] * n
    if len(widths) != n or any(isinstance(w, bool) or not isinstance(w, int) for w in widths):
        raise ModelError(f"{where}: intermediate_size must be an integer or one per layer ({n}), got {width!r}")
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                                       for i in range(n)]
    if not isinstance(types, list) or len(types) != n or any(t not in TYPES for t in types):
        raise ModelError(f"{where}: layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                         f"{n} layers, got {types!r}")
    sparsity = cfg.get("activation_sparsity_pattern")
    if sparsity is None:
        sparsity = [0.95] * (10 if n > 10 else 0) + [0.0] * (n - (10 if n > 10 else 0))
    if not isinstance(sparsity, list) or len(sparsity) != n or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) for x in sparsity):
        raise ModelError(f"{where}: activation_sparsity_pattern must give a number for each of the {n} layers, got "
                         f"{sparsity!r}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelError(f"{where}: rope_parameters must be an object of layer type -> RoPE parameters")
    legacy = {"full_attention": cfg.get("rope_theta"), "sliding_attention": cfg.get("rope_local_base_freq")}
    rope_types: dict[str, dict[str, Any]] = {}
    for t in TYPES:
        p = {**((cfg.get("rope_scaling") or {}) if t == "full_attention" else {}), **(rope.get(t) or {})}
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ModelError(f"{where}: rope_parameters.{t}.rope_type {kind!r} unsupported for gemma3n; expected "
                             f"'default' or 'linear'")
        theta: Any = p.get("rope_theta", legacy[t] if legacy[t] is not None else _THETA[t])
        factor = p.get("factor", 1.0)
        for name, v in (("rope_theta", theta), ("factor", factor)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ModelError(f"{where}: rope_parameters.{t}.{name} must be a positive number, got {v!r}")
        rope_types[t] = {"rope_type": kind, "rope_theta": float(theta), "factor": float(factor),
                         "partial_rotary_factor": 1.0}
    window = cfg_int(cfg, "sliding_window", where)
    heads, dim = cfg_int(cfg, "num_key_value_heads", where), cfg_int(cfg, "head_dim", where)
    dtype = config_dtype(cfg, dtype)
    correct = cfg.get("altup_correct_scale")
    if not isinstance(correct, bool):
        raise ModelError(f"{where}: altup_correct_scale must be true or false, got {correct!r}")
    return Gemma3nSpec(
        architecture=ARCH, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=max(widths), n_layers=n, n_heads=cfg_int(cfg, "num_attention_heads", where),
        n_kv_heads=heads, head_dim=dim, rms_eps=float(cfg["rms_norm_eps"]),
        rope_theta=rope_types["full_attention"]["rope_theta"],
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg["attention_bias"]), dtype=dtype, bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        sliding_window=window if "sliding_attention" in types else None,
        full_attention_layers=tuple(i for i, t in enumerate(types) if t == "full_attention")
        if "sliding_attention" in types else (),
        final_logit_softcapping=cfg.get("final_logit_softcapping"), context_cap=max_context,
        layer_types=tuple(types), layer_kv=((heads, dim),) * n,
        kv_shared_layers=cfg_int(cfg, "num_kv_shared_layers", where, 0),
        ple_size=cfg_int(cfg, "hidden_size_per_layer_input", where),
        ple_vocab=cfg_int(cfg, "vocab_size_per_layer_input", where), gelu_approx=gelu, activation=other,
        rope_types=rope_types, altup_inputs=cfg_int(cfg, "altup_num_inputs", where),
        altup_active=cfg_int(cfg, "altup_active_idx", where, 0), altup_correct_scale=correct,
        laurel_rank=cfg_int(cfg, "laurel_rank", where), intermediate_sizes=tuple(widths), sparsity=tuple(sparsity),
    )


def hf_config(spec: Gemma3nSpec) -> dict[str, Any]:
    """A ``config.json`` that transformers' Gemma3nForCausalLM (and :func:`spec_from_config`) read back to
    ``spec``."""
    return {
        "architectures": ["Gemma3nForCausalLM"], "model_type": ARCH, "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": list(spec.intermediate_sizes),
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
        "hidden_activation": spec.hf_activation(),
        "max_position_embeddings": spec.max_position, "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.attention_bias,
        "sliding_window": spec.sliding_window or 512, "layer_types": list(spec.layer_types),
        "final_logit_softcapping": spec.final_logit_softcapping, "vocab_size_per_layer_input": spec.ple_vocab,
        "hidden_size_per_layer_input": spec.ple_size, "altup_active_idx": spec.altup_active,
        "altup_correct_scale": spec.altup_correct_scale, "altup_num_inputs": spec.altup_inputs,
        "num_kv_shared_layers": spec.kv_shared_layers, "laurel_rank": spec.laurel_rank,
        "activation_sparsity_pattern": list(spec.sparsity), "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id, "dtype": spec.dtype,
        "rope_parameters": {t: {"rope_type": p["rope_type"], "rope_theta": p["rope_theta"],
                                **({"factor": p["factor"]} if p["rope_type"] != "default" else {})}
                            for t, p in spec.rope_types.items()},
    }


# --- modules -------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """The gated MLP of its layer's width; in a sparse layer the gate is cut below ``mean + std * Phi^-1(s)``."""

    def __init__(self, spec: Gemma3nSpec, layer: int) -> None:
        super().__init__()
        width = spec.mlp_width(layer)
        self.gate_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, spec.hidden_size, bias=False)
        self.act = spec.gate_act()
        self.sparsity = spec.sparsity[layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.sparsity > 0:
            mult = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.sparsity, dtype=torch.float32))
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * mult.to(gate.dtype)
            gate = F.relu(gate - cutoff)
        return cast(torch.Tensor, self.down_proj(self.act(gate) * self.up_proj(x)))


class AltUp(nn.Module):
    """Alternating updates over the ``A`` hidden streams ``[A, N, H]`` (module docstring)."""

    router_input_scale: torch.Tensor

    def __init__(self, spec: Gemma3nSpec) -> None:
        super().__init__()
        a, h = spec.altup_inputs, spec.hidden_size
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = nn.Linear(a, a, bias=False)
        self.prediction_coefs = nn.Linear(a, a * a, bias=False)
        self.modality_router = nn.Linear(h, a, bias=False)
        self.router_norm = Norm(h, spec.rms_eps)
        self.register_buffer("router_input_scale", torch.tensor(h ** -1.0), persistent=False)
        self.a, self.active = a, spec.altup_active

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        n = streams.shape[1]
        coefs = self.prediction_coefs(self.modalities(streams[self.active])).reshape(n, self.a, self.a)
        pred = torch.matmul(streams.permute(1, 2, 0), coefs.transpose(1, 2)).permute(2, 0, 1)
        return (pred + streams).contiguous().type_as(streams)

    def correct(self, pred: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        innovation = (activated - pred[self.active]).repeat(self.a, 1, 1)
        coefs = (self.correction_coefs(self.modalities(activated)) + 1.0).permute(1, 0).unsqueeze(-1)
        return (innovation * coefs + pred).contiguous().type_as(activated)


class Laurel(nn.Module):
    def __init__(self, spec: Gemma3nSpec) -> None:
        super().__init__()
        self.linear_left = nn.Linear(spec.hidden_size, spec.laurel_rank, bias=False)
        self.linear_right = nn.Linear(spec.laurel_rank, spec.hidden_size, bias=False)
        self.post_laurel_norm = Norm(spec.hidden_size, spec.rms_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: Gemma3nSpec, layer: int) -> None:
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_eps
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec, layer)
        self.input_layernorm = Norm(h, eps)
        self.post_attention_layernorm = Norm(h, eps)
        self.pre_feedforward_layernorm = Norm(h, eps)
        self.post_feedforward_layernorm = Norm(h, eps)
        self.altup = AltUp(spec)
        self.laurel = Laurel(spec)
        self.per_layer_input_gate = nn.Linear(h, spec.ple_size, bias=False)
        self.per_layer_projection = nn.Linear(spec.ple_size, h, bias=False)
        self.post_per_layer_input_norm = Norm(h, eps)


class Backbone(nn.Module):
    def __init__(self, spec: Gemma3nSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = Norm(h, spec.rms_eps)
        self.embed_tokens_per_layer = nn.Embedding(spec.ple_vocab, spec.n_layers * spec.ple_size)
        self.per_layer_model_projection = nn.Linear(h, spec.n_layers * spec.ple_size, bias=False)
        self.per_layer_projection_norm = Norm(spec.ple_size, spec.rms_eps)
        self.altup_projections = nn.ModuleList(nn.Linear(h, h, bias=False) for _ in range(1, spec.altup_inputs))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(h, h, bias=False)
                                                       for _ in range(1, spec.altup_inputs))


def _rescaled(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` rescaled to the per-row RMS ``target`` (its own RMS floored at sqrt(1e-5))."""
    return x * target / torch.sqrt(torch.mean(x ** 2, dim=-1, keepdim=True).clamp(min=1e-5))


@dataclass
class Gemma3nState(Gemma4State):
    streams: torch.Tensor | None = None  # [A, N, H]


class Gemma3nModel(LayerwiseDecoder):
    """Gemma 3n's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: Gemma3nSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: Gemma3nSpec = spec
        self.gate_act = spec.gate_act()  # (the per-layer input gate's)
        dims = dict.fromkeys(set(spec.layer_types), spec.head_dim)
        self.inv_freq = {t: rope_inv_freq(spec.rope_types[t], d) for t, d in dims.items()}
        dt = spec.torch_dtype
        self.embed_scale = torch.tensor(spec.hidden_size ** 0.5).to(dt)
        self.ple_scale = torch.tensor(spec.ple_size ** 0.5).to(dt)
        self.ple_proj_scale = torch.tensor(spec.hidden_size ** -0.5).to(dt)
        self.ple_sum_scale = torch.rsqrt(torch.tensor(2.0)).to(dt)
        self.windows = [spec.layer_window(i) for i in range(spec.n_layers)]
        self._sources = {spec.kv_source(i) for i in range(spec.first_shared, spec.n_layers)}

    head = Gemma4Model.head  # (the final norm, the LM head, the final soft cap)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        spec, dev, dt = self.spec, self.device, self.spec.torch_dtype
        ids = self.checked_ids(batch)
        positions = batch.positions.to(dev, torch.float32)
        tables = rope_tables(positions, self.inv_freq, dt)
        m, n = self.model, ids.shape[0]
        embeds = m.embed_tokens(ids) * self.embed_scale.to(dev)
        ple_ids = torch.where(ids < spec.ple_vocab, ids, torch.zeros_like(ids))  # (soft tokens: row 0)
        tok = (m.embed_tokens_per_layer(ple_ids) * self.ple_scale.to(dev)).reshape(n, spec.n_layers, spec.ple_size)
        proj = m.per_layer_model_projection(embeds) * self.ple_proj_scale.to(dev)
        proj = m.per_layer_projection_norm(proj.reshape(n, spec.n_layers, spec.ple_size))
        per_layer = (proj + tok) * self.ple_sum_scale.to(dev)
        target = torch.mean(embeds ** 2, dim=-1, keepdim=True) ** 0.5
        streams = torch.stack([embeds, *(_rescaled(p(embeds), target) for p in m.altup_projections)])
        cos, sin = tables["full_attention"] if "full_attention" in tables else next(iter(tables.values()))
        return Gemma3nState(batch=batch, hidden=embeds, cos=cos, sin=sin, tables=tables, per_layer=per_layer,
                            streams=streams)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = cast(Gemma3nState, state)
        spec, b = self.spec, state.batch
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, spec.n_kv_heads, spec.head_dim))
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn, alt = mod.self_attn, mod.altup
        pred = alt.predict(cast(torch.Tensor, st.streams))
        active = pred[spec.altup_active]
        x = mod.input_layernorm(active)
        laurel = mod.laurel(x)
        n, heads, d = x.shape[0], spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables[spec.layer_types[layer]]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, spec.n_heads, d)), cos, sin)
        src = spec.kv_source(layer)
        if src == layer:
            k = _rope(attn.k_norm(attn.k_proj(x).view(n, heads, d)), cos, sin)
            v = attn.v_norm(cast(nn.Linear, attn.v_proj)(x).view(n, heads, d))
            if layer in self._sources:
                st.shared[layer] = (k, v)
        else:
            k, v = st.shared[src]
        store_kv(k, v, kv_layer, b.slot_mapping, backend=self.backend)
        if b.is_decode:
            o = paged_decode_attention(q, kv_layer, b.block_tables, b.seq_lens, 1.0, backend=self.backend,
                                       window=self.windows[layer])
        else:
            o = paged_prefill_attention(q, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos, 1.0,
                                        backend=self.backend, window=self.windows[layer])
        a = mod.post_attention_layernorm(attn.o_proj(o.reshape(n, spec.n_heads * d)))
        h = (active + a + laurel) / math.sqrt(2)
        h = h + mod.post_feedforward_layernorm(mod.mlp(mod.pre_feedforward_layernorm(h)))
        corrected = alt.correct(pred, h)
        first = corrected[spec.altup_active].clone()
        if spec.altup_correct_scale:
            first = (first.type_as(alt.correct_output_scale) * alt.correct_output_scale).type_as(first)
        first = self.gate_act(mod.per_layer_input_gate(first))
        first = mod.post_per_layer_input_norm(mod.per_layer_projection(first * cast(torch.Tensor,
                                                                                      st.per_layer)[:, layer]))
        corrected[1:] += first
        st.streams = corrected
        if layer == spec.n_layers - 1:  # the streams back into one hidden state
            s0 = corrected[0]
            target = torch.mean(s0 ** 2, dim=-1, keepdim=True) ** 0.5
            outs = [s0, *(_rescaled(p(corrected[i + 1]), target)
                          for i, p in enumerate(self.model.altup_unembed_projections))]
            st.hidden = torch.mean(torch.stack(outs), dim=0)
            st.shared.clear()
        state.next_layer += 1


def tensors_in(spec: Gemma3nSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors less the shared layers' key / value weights (which transformers does not load)."""
    from dualpath.model.gemma4 import tensors_in as gemma4_tensors_in

    return gemma4_tensors_in(spec, tensors)


def random_init_overrides(model: Gemma3nModel, gen: torch.Generator) -> None:
    """Seeded random weights that keep the model's scale: norms and the AltUp output scale near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "correct_output_scale")):
                p.copy_((1.0 + 0.1 * torch.randn(p.shape, generator=gen)).to(p.dtype))
