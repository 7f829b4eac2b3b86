"""Kosmos-2.5's language model (``Kosmos2_5ForConditionalGeneration``'s ``kosmos_2_5_text_model``), as transformers
runs it on text, over the paged KV pool.

fairseq's decoder in Magneto's form (transformers' ``Kosmos2_5TextTransformer``):

* token embeddings times ``sqrt(embed_dim)`` (``scale_embedding``), plus fairseq's **sinusoidal positions** counted
  from the padding id (a token at position ``p`` reads row ``p + pad_token_id + 1``; the padding id's row is zero),
  plus the **segment embedding** of text (``segment_emb`` row 0; row 1 marks image embeddings, which a text prompt
  does not have);
* pre-LayerNorm blocks: multi-head attention with biased q/k/v/out projections (queries scaled by
  ``head_dim ** -0.5`` before the scores, as transformers scales them), then an MLP ``fc2(ln(act(fc1(x))))`` with a
  **LayerNorm inside** (``ffn_layernorm``, over ``ffn_dim``); a final LayerNorm; the head tied to the embeddings by the
  text config's ``tie_word_embeddings`` (transformers ties by it, whatever the image-text config says).

A padding id inside a sequence: transformers gives it the zero row and counts only the other tokens of the forward it
is in, so the positions after it depend on how the sequence was cut into forwards (a full recompute and a cached
decode disagree). Here the padding id reads the zero row and every other token its own position, the same however
the sequence is cut: equal to transformers' wherever no padding id came earlier in the same forward (a generated one
included). A config without ``pad_token_id`` is refused: transformers cannot build its positions.

The vision tower and its projection (``vision_model.*``, ``image_to_text_projection.*``) are left out: requests
carry text, and without an image transformers adds nothing to the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hf_config import canonical_keys
from dualpath.model.hybrid import Backbone
from dualpath.model.layernorm_family import ACTIVATIONS, activation
from dualpath.model.llama import ForwardState, SinusoidalPositions, TypedRopeDecoder
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype, inherit_outer

__all__ = ["ARCH", "Kosmos25Model", "Kosmos25Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "kosmos2_5_text"
ARCHITECTURE = "Kosmos2_5ForConditionalGeneration"
#: Kosmos2_5TextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 108481, "max_position_embeddings": 4096, "embed_dim": 1536, "layers": 24, "ffn_dim": 6144,
    "attention_heads": 16, "activation_function": "gelu", "layer_norm_eps": 1e-5, "scale_embedding": True,
    "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
#: the placeholder vision tower written by :meth:`Kosmos25Spec.to_hf_config` (no vision weights are written)
_VISION_PLACEHOLDER: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "head_dim": 8, "patch_embed_hidden_size": 16}


@dataclass(frozen=True)
class Kosmos25Spec(ModelSpec):
    """A :class:`ModelSpec` plus Kosmos-2.5's activation, padding id (its positions' origin) and embedding scale."""

    act: str = "gelu"
    pad_token_id: int = 1
    scale_embedding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act not in ACTIVATIONS:
            raise ModelError(f"model config: activation_function {self.act!r} unsupported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ModelError(f"model config: pad_token_id must be a non-negative integer (the origin of Kosmos-2.5's "
                             f"positions; transformers cannot build them without one), got {self.pad_token_id!r}")

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {}

    @property
    def position_offset(self) -> int:
        return self.pad_token_id + 1

    def to_hf_config(self) -> dict[str, Any]:
        text = {
            "model_type": "kosmos_2_5_text_model", "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position, "embed_dim": self.hidden_size, "layers": self.n_layers,
            "ffn_dim": self.intermediate_size, "attention_heads": self.n_heads, "activation_function": self.act,
            "layer_norm_eps": self.rms_eps, "scale_embedding": self.scale_embedding,
            "tie_word_embeddings": self.tie_embeddings, "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }
        return {"architectures": [ARCHITECTURE], "model_type": "kosmos-2.5", "text_config": text,
                "vision_config": dict(_VISION_PLACEHOLDER), "latent_query_num": 1, "dtype": self.dtype}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Kosmos25Spec:
    """The spec of a Kosmos-2.5 config (the image-text checkpoint's ``text_config``, or the text model's config
    alone) over Kosmos2_5TextConfig's defaults."""
    text = cfg.get("text_config", cfg) if cfg.get("model_type") != "kosmos_2_5_text_model" else cfg
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Kosmos-2.5's language model)")
    # (Kosmos2_5TextConfig's attribute_map, for a text config that names no model_type too)
    text = canonical_keys({**text, "model_type": "kosmos_2_5_text_model"}, where)
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None or k == "pad_token_id"}}
    inherit_outer(norm, text, cfg)
    if norm.get("pad_token_id") is None:
        raise ModelError(f"{where}: text_config.pad_token_id is null: Kosmos-2.5's positions count from the padding "
                         "id, and transformers cannot build them without one")
    if norm.get("activation_function") not in ACTIVATIONS:
        raise ModelError(f"{where}: text_config.activation_function {norm.get('activation_function')!r} unsupported; "
                         f"expected one of {sorted(ACTIVATIONS)}")
    hidden, heads = cfg_int(norm, "embed_dim", where), cfg_int(norm, "attention_heads", where)
    if hidden % heads:
        raise ModelError(f"{where}: text_config.embed_dim ({hidden}) must be a multiple of attention_heads ({heads})")
    return Kosmos25Spec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(norm, "ffn_dim", where), n_layers=cfg_int(norm, "layers", where), n_heads=heads,
        n_kv_heads=heads, head_dim=hidden // heads, rms_eps=cfg_num(norm, "layer_norm_eps", where), rope_theta=1.0,
        max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm["tie_word_embeddings"]), attention_bias=True, dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        act=str(norm["activation_function"]), pad_token_id=norm["pad_token_id"],
        scale_embedding=bool(norm["scale_embedding"]))


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)


class FFN(nn.Module):
    """``fc2(ffn_layernorm(act(fc1(x))))``."""

    def __init__(self, spec: Kosmos25Spec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size)
        self.ffn_layernorm = nn.LayerNorm(spec.intermediate_size, eps=spec.rms_eps)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size)
        self.act = activation(ACTIVATIONS[spec.act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.fc2(self.ffn_layernorm(self.act(self.fc1(x)))))


class DecoderLayer(nn.Module):
    def __init__(self, spec: Kosmos25Spec) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(spec.hidden_size, eps=spec.rms_eps)
        self.self_attn = Attention(spec.hidden_size)
        self.final_layer_norm = nn.LayerNorm(spec.hidden_size, eps=spec.rms_eps)
        self.ffn = FFN(spec)


class Kosmos25Model(TypedRopeDecoder):
    """Kosmos-2.5's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: Kosmos25Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: DecoderLayer(spec), norm=nn.LayerNorm(spec.hidden_size, eps=spec.rms_eps))
        backbone.embed_positions = SinusoidalPositions(spec.max_position + spec.position_offset, spec.hidden_size,
                                                       padding_row=spec.pad_token_id)
        backbone.segment_emb = nn.Embedding(2, spec.hidden_size)
        self._build(spec, backbone, device, backend)
        self.spec: Kosmos25Spec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_begin(self, batch: Any) -> ForwardState:
        state = super().prefill_begin(batch)
        spec = self.spec
        ids = batch.input_ids.to(self.device)
        rows = torch.where(ids == spec.pad_token_id, spec.pad_token_id,
                           batch.positions.to(self.device) + spec.position_offset)
        dt = state.hidden.dtype
        pos = self.model.embed_positions(rows).to(dt) + self.model.segment_emb.weight[0]
        hidden = state.hidden * math.sqrt(spec.hidden_size) if spec.scale_embedding else state.hidden
        state.hidden = hidden + pos
        return state

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.self_attn_layer_norm(st.hidden)
        n, h, d = x.shape[0], spec.n_heads, spec.head_dim
        q = (attn.q_proj(x) * d ** -0.5).view(n, h, d)  # (scaled before the scores, as transformers does)
        o = self.attend(q, attn.k_proj(x).view(n, h, d), attn.v_proj(x).view(n, h, d), kv_layer, b, 1.0)
        hid = st.hidden + attn.out_proj(o.reshape(n, h * d))
        st.hidden = hid + mod.ffn(mod.final_layer_norm(hid))
        state.next_layer += 1


_PREFIX = "text_model."


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors under our names (``text_model.model.layer_norm`` is the final ``model.norm``);
    the vision tower and its projection left out."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(_PREFIX):
            name = name[len(_PREFIX):]
        elif name.startswith(("vision_model.", "image_to_text_projection.")):
            continue
        if name.startswith("model.layer_norm."):
            name = "model.norm." + name[len("model.layer_norm."):]
        out[name] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the image-text checkpoint's names (what transformers writes and reads)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.norm."):
            name = "model.layer_norm." + name[len("model.norm."):]
        out[_PREFIX + name] = t
    return out
