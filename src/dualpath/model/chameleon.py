"""Chameleon (``ChameleonForConditionalGeneration``, model_type ``chameleon``), as transformers runs it on text, over
the paged KV pool.

Llama's decoder (GQA over ``hidden / heads``-wide heads, RoPE over each whole head, a SwiGLU MLP with optional
biases) with:

* **per-head LayerNorms on queries and keys**: statistics over each head's ``head_dim`` values (eps 1e-5), then a
  weight and bias of their own for every head and channel (``q_norm`` / ``k_norm``, ``[heads, head_dim]``);
* **swin norm** (``swin_norm: true``, Chameleon 30B): the norms after each sublayer instead of before it;
* **image tokens masked out of the logits**: every ``IMGIMG*`` entry of ``vocabulary_map`` gets the dtype's
  minimum, so text generation never emits an image code (the begin/end-of-image tokens stay).

The VQ image tokenizer (``model.vqmodel.*``) is left out: requests carry text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, _rope
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype, parse_rope

__all__ = ["ARCH", "ChameleonModel", "ChameleonSpec", "spec_from_config", "tensors_in"]

ARCH = "chameleon"
#: ChameleonConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "swin_norm": False,
}


@dataclass(frozen=True)
class ChameleonSpec(ModelSpec):
    """A :class:`ModelSpec` plus Chameleon's swin norm, MLP biases and the image tokens its logits mask."""

    swin_norm: bool = False
    mlp_bias: bool = False
    image_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "image_tokens", tuple(sorted(int(t) for t in self.image_tokens)))
        if any(not 0 <= t < self.vocab_size for t in self.image_tokens):
            raise ModelError(f"model config: vocabulary_map names image tokens outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        return {"all": (self.rope_theta, 1.0)}

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["ChameleonForConditionalGeneration"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias, "swin_norm": self.swin_norm,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "vocabulary_map": {f"IMGIMG{i}": t for i, t in enumerate(self.image_tokens)},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> ChameleonSpec:
    """The spec of a Chameleon config over ChameleonConfig's defaults."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(norm, where)
    hidden, heads = cfg_int(norm, "hidden_size", where), cfg_int(norm, "num_attention_heads", where)
    if hidden % heads:
        raise ModelError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    theta, scaling = parse_rope(norm, where)
    if scaling is not None:
        raise ModelError(f"{where}: rope_parameters of type {scaling.get('rope_type')!r} unsupported for Chameleon "
                         "(only 'default')")
    vocab_map = norm.get("vocabulary_map") or {}
    if not isinstance(vocab_map, dict) or any(isinstance(v, bool) or not isinstance(v, int)
                                              for v in vocab_map.values()):
        raise ModelError(f"{where}: vocabulary_map must map token names to integer ids")
    return ChameleonSpec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=cfg_int(norm, "num_hidden_layers", where),
        n_heads=heads, n_kv_heads=cfg_int(norm, "num_key_value_heads", where), head_dim=hidden // heads,
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=bool(norm["tie_word_embeddings"]),
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        swin_norm=bool(norm["swin_norm"]), mlp_bias=bool(norm["mlp_bias"]), activation=act,
        image_tokens=tuple(v for k, v in vocab_map.items() if str(k).startswith("IMGIMG")))


class HeadNorm(nn.Module):
    """LayerNorm statistics over each head's values (eps 1e-5), then that head's own weight and bias."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))
        self.bias = nn.Parameter(torch.zeros(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, spec: ChameleonSpec) -> None:
        super().__init__()
        hq, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=bias)
        self.q_norm = HeadNorm(hq, d)
        self.k_norm = HeadNorm(hkv, d)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ChameleonSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp = FeedForward(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias, act=activation_of(spec))


class ChameleonModel(TypedRopeDecoder):
    """Chameleon's decoder (module docstring) over a paged KV pool."""

    def __init__(self, spec: ChameleonSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec, lambda i: DecoderLayer(spec)), device, backend)
        self.spec: ChameleonSpec = spec
        self._typed_rope(spec)
        self.register_buffer("image_tokens", torch.tensor(spec.image_tokens, dtype=torch.long, device=device),
                             persistent=False)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(cast(RMSNorm, self.model.norm)(h))
        if self.spec.image_tokens:  # (no image code from a text prompt: the dtype's minimum, as transformers)
            logits[:, self.image_tokens] = torch.finfo(logits.dtype).min
        return cast(torch.Tensor, logits.float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = st.hidden if spec.swin_norm else mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables["all"]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)), cos[:, None, :], sin[:, None, :])
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos[:, None, :], sin[:, None, :])
        o = attn.o_proj(self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv_layer, b, d ** -0.5).reshape(n, hq * d))
        if spec.swin_norm:  # (Chameleon 30B: each sublayer's output normed before the residual)
            h = st.hidden + mod.input_layernorm(o)
            st.hidden = h + mod.post_attention_layernorm(mod.mlp(h))
        else:
            h = st.hidden + o
            st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's tensors; the VQ image tokenizer (``model.vqmodel.``) left out."""
    return {k: v for k, v in tensors.items() if not k.startswith("model.vqmodel.")}
