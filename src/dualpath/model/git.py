"""GIT (``GitForCausalLM``, model_type ``git``: Microsoft's Generative Image-to-text Transformer), as transformers
runs it on text, over the paged KV pool.

Its text decoder is BERT's post-LayerNorm encoder made causal:

* embeddings: word embeddings plus learned absolute positions (position ``p`` reads row ``p``), then a LayerNorm;
* each block: multi-head attention with biased ``query`` / ``key`` / ``value``, scores over ``sqrt(head_dim)``, a
  biased output ``dense``, then ``LayerNorm(x + attn)``; an MLP ``dense(act(dense(h)))`` (``hidden_act``, GELU by
  default), then ``LayerNorm(h + mlp)``; no final norm;
* a biased LM head (``output``), its weight tied to the word embeddings when ``tie_word_embeddings`` says so.

Without ``pixel_values`` transformers puts no image tokens before the text, so a text prompt is the decoder's
alone. The image encoder and its projection (``git.image_encoder.*``, ``git.visual_projection.*``,
``git.img_temporal_embedding.*``) are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone
from dualpath.model.layernorm_family import ACTIVATIONS, activation
from dualpath.model.llama import ForwardState, TypedRopeDecoder
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

__all__ = ["ARCH", "GitModel", "GitSpec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "git"
ARCHITECTURE = "GitForCausalLM"
#: GitConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 1024, "layer_norm_eps": 1e-12,
    "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102,
}
#: the placeholder vision config written by :meth:`GitSpec.to_hf_config` (no vision weights are written)
_VISION_PLACEHOLDER: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8}


@dataclass(frozen=True)
class GitSpec(ModelSpec):
    """A :class:`ModelSpec` plus GIT's activation."""

    act: str = "gelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act not in ACTIVATIONS:
            raise ModelError(f"model config: hidden_act {self.act!r} unsupported; expected one of "
                             f"{sorted(ACTIVATIONS)}")

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {}

    @property
    def lm_head_bias(self) -> bool:
        return True

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": [ARCHITECTURE], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "intermediate_size": self.intermediate_size, "hidden_act": self.act,
            "max_position_embeddings": self.max_position, "layer_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": None, "vision_config": dict(_VISION_PLACEHOLDER),
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> GitSpec:
    """The spec of a GIT config over GitConfig's defaults."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if norm.get("hidden_act") not in ACTIVATIONS:
        raise ModelError(f"{where}: hidden_act {norm.get('hidden_act')!r} unsupported; expected one of "
                         f"{sorted(ACTIVATIONS)}")
    if norm.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{where}: position_embedding_type {norm['position_embedding_type']!r} unsupported "
                         "(transformers' GIT reads absolute positions only)")
    hidden, heads = cfg_int(norm, "hidden_size", where), cfg_int(norm, "num_attention_heads", where)
    if hidden % heads:
        raise ModelError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    return GitSpec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=cfg_int(norm, "num_hidden_layers", where),
        n_heads=heads, n_kv_heads=heads, head_dim=hidden // heads, rms_eps=cfg_num(norm, "layer_norm_eps", where),
        rope_theta=1.0, max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm["tie_word_embeddings"]), attention_bias=True, dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        act=str(norm["hidden_act"]))


class DecoderLayer(nn.Module):
    """One BERT block: ``query`` / ``key`` / ``value``, ``attn_out`` then ``attn_norm``; ``mlp_in``, ``mlp_out``
    then ``out_norm``."""

    def __init__(self, spec: GitSpec) -> None:
        super().__init__()
        h, i, eps = spec.hidden_size, spec.intermediate_size, spec.rms_eps
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=eps)
        self.mlp_in = nn.Linear(h, i)
        self.mlp_out = nn.Linear(i, h)
        self.out_norm = nn.LayerNorm(h, eps=eps)


class GitModel(TypedRopeDecoder):
    """GIT's text decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: GitSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: DecoderLayer(spec), norm=nn.Identity())
        backbone.embed_positions = nn.Embedding(spec.max_position, spec.hidden_size)
        backbone.embed_norm = nn.LayerNorm(spec.hidden_size, eps=spec.rms_eps)
        self._build(spec, backbone, device, backend)
        self.spec: GitSpec = spec
        self._typed_rope(spec)
        self.act = activation(ACTIVATIONS[spec.act])

    @torch.no_grad()
    def prefill_begin(self, batch: Any) -> ForwardState:
        if int(batch.positions.max()) >= self.spec.max_position:
            raise ModelError(f"position {int(batch.positions.max())} is past GIT's {self.spec.max_position} learned "
                             "positions (max_position_embeddings)")
        state = super().prefill_begin(batch)
        pos = self.model.embed_positions(batch.positions.to(self.device))
        state.hidden = self.model.embed_norm(state.hidden + pos)
        return state

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        x = st.hidden
        n, h, d = x.shape[0], spec.n_heads, spec.head_dim
        o = self.attend(mod.query(x).view(n, h, d), mod.key(x).view(n, h, d), mod.value(x).view(n, h, d), kv_layer, b,
                        d ** -0.5)
        a = mod.attn_norm(mod.attn_out(o.reshape(n, h * d)) + x)
        st.hidden = mod.out_norm(mod.mlp_out(self.act(mod.mlp_in(a))) + a)
        state.next_layer += 1


#: transformers' names in a block -> ours
_BLOCK = {"attention.self.query.": "query.", "attention.self.key.": "key.", "attention.self.value.": "value.",
          "attention.output.dense.": "attn_out.", "attention.output.LayerNorm.": "attn_norm.",
          "intermediate.dense.": "mlp_in.", "output.dense.": "mlp_out.", "output.LayerNorm.": "out_norm."}
#: transformers' names outside the blocks -> ours
_TOP = {"git.embeddings.word_embeddings.": "model.embed_tokens.",
        "git.embeddings.position_embeddings.": "model.embed_positions.",
        "git.embeddings.LayerNorm.": "model.embed_norm.", "output.": "lm_head."}
_LAYERS = "git.encoder.layer."
_UNLOADED = ("git.image_encoder.", "git.visual_projection.", "git.img_temporal_embedding.")


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GIT's tensors under our names; the image encoder and projection left out."""
    out = {}
    for name, t in tensors.items():
        if name.startswith(_UNLOADED):
            continue
        if name.startswith(_LAYERS):
            layer, _, rest = name[len(_LAYERS):].partition(".")
            mine = next((o + rest[len(k):] for k, o in _BLOCK.items() if rest.startswith(k)), None)
            if mine is None:
                raise ModelError(f"unexpected tensor {name!r} in a GIT block")
            out[f"model.layers.{layer}.{mine}"] = t
            continue
        out[next((o + name[len(k):] for k, o in _TOP.items() if name.startswith(k)), name)] = t
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under GIT's names (what transformers writes and reads)."""
    block = {o: k for k, o in _BLOCK.items()}
    top = {o: k for k, o in _TOP.items()}
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.layers."):
            layer, _, rest = name[len("model.layers."):].partition(".")
            out[f"{_LAYERS}{layer}." + next(k + rest[len(o):] for o, k in block.items() if rest.startswith(o))] = t
            continue
        out[next((k + name[len(o):] for o, k in top.items() if name.startswith(o)), name)] = t
    return out
