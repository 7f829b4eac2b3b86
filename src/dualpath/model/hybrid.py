"""What the hybrid decoders share (recurrent layers over state pages, :mod:`dualpath.model.state_pages`, beside
attention layers): the page layout from a spec's ``state_bytes`` (:class:`StatePagesSpec`), and the decoder's setup,
per-layer checks and paged attention (:class:`HybridDecoder`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.kv.layout import KVSpec
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, TypedRopeState
from dualpath.model.state_pages import widened_kv_spec

#: the block size :meth:`StatePagesSpec.kv_spec` sizes state pages for (a deployment passes its own)
DEFAULT_STATE_BLOCK = 64


class StatePagesSpec:
    """Mixed into a hybrid model's spec (a :class:`~dualpath.model.spec.ModelSpec` with a ``state_bytes``
    property): its page layout for a block size. ``both_in_page``: every layer has attention and a state (Falcon-H1),
    so a page holds both."""

    both_in_page = False
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def state_bytes(self) -> int:
        """Bytes of one recurrent layer's state (each spec says)."""
        raise NotImplementedError

    def paged_kv_spec(self, block_tokens: int) -> KVSpec:
        return widened_kv_spec(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype, self.state_bytes,
                               block_tokens, both=self.both_in_page)

    def kv_spec(self) -> KVSpec:
        return self.paged_kv_spec(DEFAULT_STATE_BLOCK)


class HybridDecoder(TypedRopeDecoder):
    """A :class:`TypedRopeDecoder` whose layers' pages may hold states (rows widened past the KV heads)."""

    def _setup(self, spec: Any, backbone: nn.Module, device: str | torch.device, backend: str) -> None:
        self._build(spec, backbone, device, backend)
        self.spec = spec
        self._typed_rope(spec)

    def begin_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> tuple[TypedRopeState, Any]:
        """Check the layer's order and page shape; ``(state, the layer's module)``."""
        heads = int(kv_layer.shape[3]) if kv_layer.dim() == 5 else self.spec.n_kv_heads
        return self.layer_state(layer, state, kv_layer, max(heads, self.spec.n_kv_heads)), self.model.layers[layer]



def final_norm_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's ``model.final_layernorm.*`` (Bamba, Jamba, Falcon-H1) under our ``model.norm.*``."""
    return {("model.norm." + k[len("model.final_layernorm."):] if k.startswith("model.final_layernorm.") else k): v
            for k, v in tensors.items()}


def final_norm_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``model.norm.*`` under the checkpoint's ``model.final_layernorm.*``."""
    return {("model.final_layernorm." + k[len("model.norm."):] if k.startswith("model.norm.") else k): v
            for k, v in tensors.items()}


class FloatGatedNorm(nn.Module):
    """A linear layer's output norm as Kimi Linear, Bailing hybrid and Lara-mini apply it: per-head RMS norm in fp32,
    times ``weight`` in fp32, times ``act(gate)`` (``sigmoid`` or ``silu``), back to the input's dtype."""

    def __init__(self, dim: int, eps: float, act: str = "sigmoid") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.act = torch.sigmoid if act == "sigmoid" else F.silu

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = self.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
        return (h * self.act(gate.float())).to(x.dtype)


class NormedAttention(nn.Module):
    """Qwen3's attention projections: ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` (biases by
    ``attention_bias``) and per-head ``q_norm`` / ``k_norm`` (weights multiplied in fp32 with ``fp32_scale``)."""

    def __init__(self, spec: Any, fp32_scale: bool = False) -> None:
        super().__init__()
        h, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, spec.rms_eps, fp32_scale=fp32_scale)
        self.k_norm = RMSNorm(d, spec.rms_eps, fp32_scale=fp32_scale)


class Backbone(nn.Module):
    """A hybrid decoder's embeddings, its layers (``make_layer(i)`` for each of ``spec.n_layers``) and its final
    ``norm`` (an RMS norm at ``spec.rms_eps`` unless given)."""

    def __init__(self, spec: Any, make_layer: Callable[[int], nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(spec.n_layers))
        self.norm = norm if norm is not None else RMSNorm(spec.hidden_size, spec.rms_eps)
