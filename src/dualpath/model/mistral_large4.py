"""Mistral Large 4's language model (``MistralLarge4ForConditionalGeneration``, model_type ``mistral_large4``; its
text model ``mistral_large4_text``), as transformers runs it, over the paged latent KV pool of DeepSeek-V3's MLA
(:mod:`dualpath.model.deepseek`) with DeepSeek Sparse Attention (:mod:`dualpath.model.dsa`).

* **Attention**: MLA without a query LoRA (``q_proj``), RoPE over interleaved pairs of ``qk_rope_head_dim``
  values, under DSA: past ``index_topk`` keys each query attends to its indexer's selection; ``shared`` layers of
  ``indexer_types`` reuse the last selection. Every query (after RoPE) is scaled per head by its position,
  ``scale_h * log(position + 1) + bias_h`` (``softmax_scaling``).
* **NoPE layers** (``no_rope_layers``: 0 marks one; by default every fourth): no rotated part at all. The latent
  row's RoPE slot holds zeros, the whole query head is "nope" against ``kv_b_proj``'s wider key half, and the
  layer's indexer does not rotate either.
* **Shared latent KV** (``kv_source_layers``): a layer that names an earlier layer has no ``kv_a_proj_with_mqa``
  and attends to that layer's latent. It writes the source's new rows into its own pages too, so each layer's
  pages stand alone in storage and on both read paths; the cost is those layers' latent bytes, which transformers
  does not keep. Transformers hands a sharing layer the *latest* earlier source of its RoPE kind, so a config where
  that differs from the layer's named source is refused.
* **Indexer**: its queries come from the hidden state (``q_input_norm``, a LayerNorm, then ``wq_b``), scaled per
  head by position as the attention's are, then rotated; keys ``k_norm(wk(x))`` rotated on their first
  ``qk_rope_head_dim`` values (interleaved); ``weights_proj`` in fp32.
* **LeRoPE**: the inverse frequencies times ``exp(alpha)``, ``alpha`` a learned per-frequency vector (fp32), over
  YaRN by default. **MoE**: Mistral 4's softmax router (groups ranked by their top-2 sum, renormalized, times
  ``routed_scaling_factor``) with shared experts; dense layers by ``mlp_layer_types``. The logits are soft-capped
  (``final_logit_softcapping``, tanh).

Tensor names: the released checkpoint's (Mistral's own, as transformers' ``save_pretrained`` writes them:
``layers.3.attention.wq.weight``, ``layers.3.attention.ssmax_scaling.s``, ``layers.3.experts.7.w1.weight``,
``lerope.alpha``, ``tok_embeddings.weight``, ``output.weight``) or transformers' in-memory ones
(``model.language_model.layers.3.self_attn.q_proj.weight``, packed experts); the vision tower, the projector and
the multi-token-prediction head (``mtp_dspark.*``) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import mla_decode_attention, mla_prefill_attention, store_latent
from dualpath.model.deepseek import DeepseekV3Model, MoE, _rotate
from dualpath.model.dsa import _rope_half
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch
from dualpath.model.mla_spec import DeepseekV3Spec, _glm5_shared_indexer_layers
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec_common import cfg_int, cfg_num, inherit_outer, parse_rope

__all__ = ["ARCH", "MistralLarge4Model", "MistralLarge4Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "mistral_large4_text"
ARCHITECTURE = "MistralLarge4ForConditionalGeneration"

#: MistralLarge4TextConfig's defaults (the released model's shapes)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 204800, "hidden_size": 6144, "intermediate_size": 24576, "moe_intermediate_size": 6144,
    "num_hidden_layers": 72, "num_attention_heads": 64, "n_shared_experts": 1, "n_routed_experts": 128,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 64, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 4, "hidden_act": "silu",
    "max_position_embeddings": 1048576, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "attention_bias": False, "index_topk": 2048, "index_head_dim": 128, "index_n_heads": 32,
    "first_k_dense_replace": 1, "final_logit_softcapping": 30.0,
}
#: its RoPE when the config names none: YaRN over a 512-token window, no magnitude scaling
DEFAULT_ROPE: dict[str, Any] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2048.0,
                                "original_max_position_embeddings": 512, "beta_fast": 32.0, "beta_slow": 1.0,
                                "attention_factor": 1.0}


@dataclass(frozen=True)
class MistralLarge4Spec(DeepseekV3Spec):
    """A :class:`DeepseekV3Spec` (no query LoRA, DSA) plus the NoPE layers, each layer's latent-KV source and the
    logits' soft cap."""

    nope_layers: tuple[int, ...] = ()
    kv_sources: tuple[int, ...] = ()
    final_softcap: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "nope_layers", tuple(int(i) for i in self.nope_layers))
        object.__setattr__(self, "kv_sources", tuple(int(i) for i in self.kv_sources) or tuple(range(self.n_layers)))
        if any(not 0 <= i < self.n_layers for i in self.nope_layers):
            raise ModelError(f"model config: no_rope_layers names layers outside 0..{self.n_layers - 1}")
        if self.q_lora_rank is not None:
            raise ModelError("model config: Mistral Large 4's queries have no LoRA (q_lora_rank must be null)")
        if self.final_softcap < 0:
            raise ModelError(f"model config: final_logit_softcapping must be >= 0, got {self.final_softcap}")
        src = self.kv_sources
        if len(src) != self.n_layers:
            raise ModelError(f"model config: kv_source_layers must name a layer for each of the {self.n_layers} "
                             f"layers, got {list(src)}")
        for i, j in enumerate(src):
            if not 0 <= j <= i or src[j] != j:
                raise ModelError(f"model config: kv_source_layers: layer {i} must share the latent KV of an earlier "
                                 f"layer that keeps its own, got {j}")
            if j == i:
                continue
            if self.rope_layer(i) != self.rope_layer(j):
                raise ModelError(f"model config: kv_source_layers: layer {i} ({'RoPE' if self.rope_layer(i) else 'NoPE'}"
                                 f") shares the latent of layer {j}, which is not the same kind")
            latest = max(k for k in range(i) if k in src[k + 1:] and self.rope_layer(k) == self.rope_layer(i))
            if latest != j:
                raise ModelError(f"model config: kv_source_layers: layer {i} names layer {j}, but transformers hands "
                                 f"it the latest earlier source of its kind, layer {latest}; neither is guessed")

    def rope_layer(self, layer: int) -> bool:
        return layer not in self.nope_layers

    def owns_kv(self, layer: int) -> bool:
        return self.kv_sources[layer] == layer

    def is_kv_source(self, layer: int) -> bool:
        """Whether a later layer attends to this layer's latent."""
        return layer in self.kv_sources[layer + 1:]

    def to_hf_config(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        k = min(self.first_k_dense_replace, self.n_layers)
        text: dict[str, Any] = {
            "model_type": ARCH, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads, "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts, "routed_scaling_factor": self.routed_scaling_factor,
            "kv_lora_rank": self.kv_lora_rank, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "qk_nope_head_dim": self.qk_nope_head_dim, "n_group": self.n_group,
            "topk_group": self.topk_group, "num_experts_per_tok": self.num_experts_per_tok,
            "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "attention_bias": self.attention_bias, "index_topk": self.index_topk,
            "index_head_dim": self.index_head_dim, "index_n_heads": self.index_n_heads,
            "first_k_dense_replace": k, "mlp_layer_types": ["dense"] * k + ["sparse"] * (self.n_layers - k),
            "indexer_types": ["shared" if i in self.index_shared_layers else "full" for i in range(self.n_layers)],
            "no_rope_layers": [int(self.rope_layer(i)) for i in range(self.n_layers)],
            "kv_source_layers": list(self.kv_sources), "final_logit_softcapping": self.final_softcap or None,
            "rope_parameters": rope, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": None, "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype,
        }
        return {"architectures": [ARCHITECTURE], "model_type": "mistral_large4", "text_config": text,
                "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}


def text_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The language model's config of a ``MistralLarge4ForConditionalGeneration`` checkpoint (its ``text_config``;
    a bare ``mistral_large4_text`` config as it is)."""
    if cfg.get("model_type") == ARCH and "text_config" not in cfg:
        return cfg
    text = cfg.get("text_config", {})
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Mistral Large 4's language model)")
    if text.get("model_type", ARCH) != ARCH:
        raise ModelError(f"{where}: text_config.model_type {text['model_type']!r} unsupported (expected {ARCH})")
    out = dict(text)
    inherit_outer(out, text, cfg)
    # (the image-text model ties its head by its own config's key, False by default; never by the text config's)
    out["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def _layer_list(norm: dict[str, Any], key: str, n: int, where: str, default: list[int]) -> list[int]:
    value = norm.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or len(value) < n or any(isinstance(v, bool) or not isinstance(v, int)
                                                            for v in value):
        raise ModelError(f"{where}: {key} must list an integer for each of the {n} layers, got {value!r}")
    return value[:n]


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                     max_context: int | None = None) -> MistralLarge4Spec:
    """The spec of a Mistral Large 4 config (the image-text checkpoint's, or its ``text_config``) over
    MistralLarge4TextConfig's defaults."""
    text = text_config(cfg, where)
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for alias in ("num_local_experts", "num_experts"):  # (its attribute map, and the older key)
        if text.get(alias) is not None and text.get("n_routed_experts") is None:
            norm["n_routed_experts"] = text[alias]
    n = cfg_int(norm, "num_hidden_layers", where)
    act = gate_activation(norm, where)
    interval = norm.get("no_rope_layer_interval", 4)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ModelError(f"{where}: no_rope_layer_interval must be a positive integer, got {interval!r}")
    uses_rope = _layer_list(norm, "no_rope_layers", n, where, [int((i + 1) % interval != 0) for i in range(n)])
    if any(v not in (0, 1) for v in uses_rope):
        raise ModelError(f"{where}: no_rope_layers must be 1 (RoPE) or 0 (NoPE) per layer, got {uses_rope!r}")
    sources = _layer_list(norm, "kv_source_layers", n, where, list(range(n)))
    kinds = norm.get("mlp_layer_types")
    k = min(cfg_int(norm, "first_k_dense_replace", where, minimum=0), n)
    if kinds is not None:
        if not isinstance(kinds, list) or len(kinds) != n or set(kinds) - {"dense", "sparse"}:
            raise ModelError(f"{where}: mlp_layer_types must list 'dense' or 'sparse' for each of the {n} layers, "
                             f"got {kinds!r}")
        k = next((i for i, kind in enumerate(kinds) if kind != "dense"), n)
        if kinds != ["dense"] * k + ["sparse"] * (n - k):
            raise ModelError(f"{where}: mlp_layer_types {kinds!r} unsupported: expected leading dense layers, then "
                             "sparse ones")
    if not isinstance(norm.get("rope_parameters"), dict) and "rope_theta" not in norm and "rope_scaling" not in norm:
        norm["rope_parameters"] = dict(DEFAULT_ROPE)
    rope_theta, rope_scaling = parse_rope(norm, where)
    if rope_scaling is not None:
        rope_scaling.pop("partial_rotary_factor", None)
    softcap = norm.get("final_logit_softcapping")
    if dtype is None:
        dtype = str(text.get("torch_dtype") or text.get("dtype") or "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = "float32"
    return MistralLarge4Spec(
        activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "intermediate_size", where),
        moe_intermediate_size=cfg_int(norm, "moe_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(norm, "num_attention_heads", where), kv_lora_rank=cfg_int(norm, "kv_lora_rank", where),
        qk_nope_head_dim=cfg_int(norm, "qk_nope_head_dim", where, minimum=0),
        qk_rope_head_dim=cfg_int(norm, "qk_rope_head_dim", where), v_head_dim=cfg_int(norm, "v_head_dim", where),
        q_lora_rank=None, n_routed_experts=cfg_int(norm, "n_routed_experts", where),
        n_shared_experts=cfg_int(norm, "n_shared_experts", where, minimum=0),
        num_experts_per_tok=cfg_int(norm, "num_experts_per_tok", where), n_group=cfg_int(norm, "n_group", where),
        topk_group=cfg_int(norm, "topk_group", where), norm_topk_prob=True,
        routed_scaling_factor=cfg_num(norm, "routed_scaling_factor", where), first_k_dense_replace=k,
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rope_interleave=True, max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm.get("tie_word_embeddings")), attention_bias=bool(norm.get("attention_bias")),
        dtype=dtype, kv_format=kv_format, bos_token_id=norm.get("bos_token_id"),
        eos_token_id=norm.get("eos_token_id"), model_type=ARCH, topk_method="noaux_tc",
        index_topk=cfg_int(norm, "index_topk", where), index_n_heads=cfg_int(norm, "index_n_heads", where),
        index_head_dim=cfg_int(norm, "index_head_dim", where),
        index_shared_layers=_glm5_shared_indexer_layers(norm, where, n),
        nope_layers=tuple(i for i, v in enumerate(uses_rope) if v == 0), kv_sources=tuple(sources),
        final_softcap=0.0 if softcap is None else cfg_num(norm, "final_logit_softcapping", where),
        context_cap=max_context)


class SoftmaxScaling(nn.Module):
    """Each head's query times ``scale_h * log(position + 1) + bias_h`` (in the query's dtype)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(heads))
        self.bias = nn.Parameter(torch.ones(heads))

    def forward(self, q: torch.Tensor, log_pos: torch.Tensor) -> torch.Tensor:
        dt = q.dtype
        s = self.scale.to(dt)[None, :] * log_pos.to(dt)[:, None] + self.bias.to(dt)[None, :]
        return q * s.unsqueeze(-1)


class Large4Indexer(nn.Module):
    """One layer's lightning indexer (module docstring); ``queries`` takes each token's ``log(position + 1)``."""

    kpool = 0  # (no pooled selection)

    def __init__(self, spec: MistralLarge4Spec, rope: bool) -> None:
        super().__init__()
        h, d = spec.index_n_heads, spec.index_head_dim
        self.n_heads, self.head_dim, self.rope = h, d, rope
        self.wq_b = nn.Linear(spec.hidden_size, h * d, bias=False)
        self.wk = nn.Linear(spec.hidden_size, d, bias=False)
        self.k_norm = nn.LayerNorm(d, eps=1e-6)
        self.weights_proj = nn.Linear(spec.hidden_size, h, bias=False)
        self.q_input_norm = nn.LayerNorm(spec.hidden_size, eps=1e-6)
        self.softmax_scaling = SoftmaxScaling(h)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        k = self.k_norm(self.wk(x))
        return _rope_half(k, cos, sin, interleave=True) if self.rope else k

    def queries(self, x: torch.Tensor, log_pos: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(self.q_input_norm(x)).view(x.shape[0], self.n_heads, self.head_dim)
        q = self.softmax_scaling(q, log_pos)
        if self.rope:
            q = _rope_half(q, cos, sin, interleave=True)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
        return q, w


class Large4Attention(nn.Module):
    def __init__(self, spec: MistralLarge4Spec, layer: int) -> None:
        super().__init__()
        h, r, bias = spec.n_heads, spec.kv_lora_rank, spec.attention_bias
        self.rope = spec.rope_layer(layer)
        self.rope_dim = spec.qk_rope_head_dim if self.rope else 0
        self.nope_dim = spec.qk_head_dim - self.rope_dim
        self.q_proj = nn.Linear(spec.hidden_size, h * spec.qk_head_dim, bias=False)
        if spec.owns_kv(layer):
            self.kv_a_proj_with_mqa = nn.Linear(spec.hidden_size, r + self.rope_dim, bias=bias)
            self.kv_a_layernorm = RMSNorm(r, spec.rms_eps)
        self.kv_b_proj = nn.Linear(r, h * (self.nope_dim + spec.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * spec.v_head_dim, spec.hidden_size, bias=bias)
        self.softmax_scaling = SoftmaxScaling(h)
        self.indexer = None if layer in spec.index_shared_layers else Large4Indexer(spec, self.rope)


class Large4Layer(nn.Module):
    def __init__(self, spec: MistralLarge4Spec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Large4Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (MoE(spec) if layer >= spec.first_k_dense_replace
                               else FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)))


class _Rotary(nn.Module):
    def __init__(self, spec: MistralLarge4Spec) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(spec.qk_rope_head_dim // 2))  # (LeRoPE: exp(0) = 1, no effect)


class _Backbone(nn.Module):
    def __init__(self, spec: MistralLarge4Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Large4Layer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.rotary_emb = _Rotary(spec)


class MistralLarge4Model(DeepseekV3Model):
    """Mistral Large 4's language model (module docstring) over a paged latent KV pool."""

    def __init__(self, spec: MistralLarge4Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        if not isinstance(spec, MistralLarge4Spec):
            raise ModelError(f"MistralLarge4Model runs Mistral Large 4 specs, got {type(spec).__name__}")
        super().__init__(spec, device=device, backend=backend, backbone=_Backbone(spec))
        self.prefill_form = "absorbed"  # (the attention below runs the absorbed form only)
        with torch.no_grad():  # (transformers keeps these in fp32 in a bf16 model)
            for name, p in self.named_parameters():
                if name.endswith(("rotary_emb.alpha", "indexer.weights_proj.weight")):
                    p.data = p.data.float()

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        state = super().prefill_begin(batch)
        alpha = cast(_Rotary, self.model.rotary_emb).alpha
        freqs = batch.positions.to(self.device, torch.float32)[:, None] * (self.inv_freq * alpha.float().exp())[None]
        dt = self.spec.torch_dtype
        state.cos = (freqs.cos() * self._rope_scale).to(dt)
        state.sin = (freqs.sin() * self._rope_scale).to(dt)
        state.carry = {}  # the KV-source layers' new latent rows, by layer
        return state

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(cast(RMSNorm, self.model.norm)(h))
        cap = cast(MistralLarge4Spec, self.spec).final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return cast(torch.Tensor, logits.float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        self._check_kv(layer, kv_layer, state.batch.block_tokens)
        mod = cast(Large4Layer, self.model.layers[layer])
        h = state.hidden + self._attend(layer, mod.self_attn, mod.input_layernorm(state.hidden), state, kv_layer)
        state.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1

    def _attend(self, layer: int, attn: Large4Attention, x: torch.Tensor, state: ForwardState,
                kv_layer: torch.Tensor) -> torch.Tensor:
        spec, b = cast(MistralLarge4Spec, self.spec), state.batch
        n, h, r, p, vd = x.shape[0], spec.n_heads, spec.kv_lora_rank, spec.qk_rope_head_dim, spec.v_head_dim
        nope = attn.nope_dim
        log_pos = (b.positions.to(x.device) + 1).float().log()
        q = attn.q_proj(x).view(n, h, spec.qk_head_dim)
        if attn.rope:
            q_nope, q_rot = q.split([nope, p], dim=-1)
            q_rot = _rotate(q_rot, state.cos, state.sin, True)
        else:
            q_nope, q_rot = q, q.new_zeros(n, h, p)
        q_nope, q_rot = attn.softmax_scaling(q_nope, log_pos), attn.softmax_scaling(q_rot, log_pos)
        if spec.owns_kv(layer):
            c, k_rot = attn.kv_a_proj_with_mqa(x).split([r, attn.rope_dim], dim=-1)
            c = attn.kv_a_layernorm(c)
            k_rot = _rotate(k_rot, state.cos, state.sin, True) if attn.rope else c.new_zeros(n, p)
            rows = torch.cat((c, k_rot), dim=-1)
            if spec.is_kv_source(layer):
                state.carry[layer] = rows
        else:
            rows = state.carry[spec.kv_sources[layer]]
        latent = kv_layer[..., : self._latent_width]
        store_latent(rows, latent, b.slot_mapping, r, backend=self.backend)
        if attn.indexer is not None:
            self._store_index_keys(cast(Any, attn.indexer), x, state, kv_layer)
        w = attn.kv_b_proj.weight.view(h, nope + vd, r).float()
        qq = torch.cat((torch.einsum("nhd,hdr->nhr", q_nope.float(), w[:, :nope]), q_rot.float()), dim=-1)
        if state.sparse:
            o_lat = self._sparse_attention(cast(Any, attn.indexer), x, log_pos, qq.contiguous(), state, kv_layer,
                                           latent)
        elif b.is_decode:
            o_lat = mla_decode_attention(qq.contiguous(), latent, b.block_tables, b.seq_lens, self.scale, r,
                                         backend=self.backend)
        else:
            o_lat = mla_prefill_attention(qq.contiguous(), latent, b.block_tables, b.cu_seqlens_q, b.seq_lens,
                                          b.start_pos, self.scale, r, backend=self.backend)
        o = torch.einsum("nhr,hvr->nhv", o_lat, w[:, nope:]).to(x.dtype)
        return cast(torch.Tensor, attn.o_proj(o.reshape(n, h * vd)))


# --- tensors in and out --------------------------------------------------------------------------------------

#: the released checkpoint's names (left) for ours (right), inside a layer
_LAYER_NAMES = (
    (".attention.", ".self_attn."), (".wq.", ".q_proj."), (".wkv_a_with_mqa.", ".kv_a_proj_with_mqa."),
    (".wkv_b.", ".kv_b_proj."), (".wo.", ".o_proj."), (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."), (".kv_a_norm.", ".kv_a_layernorm."),
    (".ssmax_scaling.s", ".softmax_scaling.scale"), (".ssmax_scaling.b", ".softmax_scaling.bias"),
)
_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
#: the image-text checkpoint's parts that are not the language model
_OTHER = ("vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.", "mtp_dspark.",
          "model.vision_tower.", "model.multi_modal_projector.")
_ROOT = (("tok_embeddings.", "model.embed_tokens."), ("lerope.alpha", "model.rotary_emb.alpha"),
         ("layers.", "model.layers."), ("norm.", "model.norm."), ("output.", "lm_head."))


def _released_in(name: str) -> str:
    for theirs, ours in _ROOT:
        if name.startswith(theirs):
            name = ours + name[len(theirs):]
            break
    if not name.startswith("model.layers."):
        return name
    for theirs, ours in _LAYER_NAMES:
        name = name.replace(theirs, ours)
    name = re.sub(r"\.(feed_forward|shared_experts|experts\.\d+)\.(w[123])\.",
                  lambda m: f".{m.group(1)}.{_MLP[m.group(2)]}.", name)
    name = re.sub(r"^(model\.layers\.\d+)\.(feed_forward)\.", r"\1.mlp.", name)
    return re.sub(r"^(model\.layers\.\d+)\.(gate|experts|shared_experts)\.", r"\1.mlp.\2.", name)


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's language-model tensors under our names (module docstring): the released names, or
    transformers' in-memory ones (``model.language_model.`` -> ``model.``); the other parts left out."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_OTHER):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif not name.startswith(("model.", "lm_head.")):
            name = _released_in(name)
        out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under the released names, as transformers' save_pretrained writes them (experts one by one)."""
    back = {ours: theirs for theirs, ours in _ROOT}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            name = re.sub(r"^(model\.layers\.\d+)\.mlp\.(gate|experts|shared_experts)\.", r"\1.\2.", name)
            name = re.sub(r"^(model\.layers\.\d+)\.mlp\.", r"\1.feed_forward.", name)
            name = re.sub(r"\.(gate_proj|down_proj|up_proj)\.",
                          lambda m: "." + {v: k for k, v in _MLP.items()}[m.group(1)] + ".", name)
            for theirs, ours in reversed(_LAYER_NAMES):
                name = name.replace(ours, theirs)
            name = "layers." + name[len("model.layers."):]
        else:
            for ours, theirs in back.items():
                if name.startswith(ours) and ours != "model.layers.":
                    name = theirs + name[len(ours):]
                    break
        out[name] = t
    return out
