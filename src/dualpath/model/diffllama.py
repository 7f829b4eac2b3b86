"""DiffLlama (``DiffLlamaForCausalLM``, model_type ``diffllama``): Llama with differential attention
(arXiv 2410.05258), as transformers runs it, over the paged KV pool.

Each query head attends once, with two value sets: the first half of the KV heads' values (repeated over both
halves) and the second half's. The head outputs, concatenated, are split by head: the first half of the heads'
``[out1 | out2]`` minus ``lambda`` times the second half's, RMS-normed (no weight), times ``1 - lambda_init``, where
``lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init`` and ``lambda_init = 0.8 - 0.6
exp(-0.3 layer)``.

The paged kernels take one value per key, so a page row holds, per KV head ``g``, its key padded with zeros to
``2 head_dim`` and the value pair ``[v[g mod H/2], v[H/2 + g mod H/2]]``: one attention call over zero-padded queries
gives every head's ``[out1 | out2]`` (the scores are unchanged; the scale stays ``head_dim ** -0.5``). The KV bytes
are twice Llama's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.kv.layout import KVSpec
from dualpath.model.llama import ForwardState, LlamaModel, _rope
from dualpath.model.spec import ModelSpec


@dataclass(frozen=True)
class DiffLlamaSpec(ModelSpec):
    """A Llama :class:`ModelSpec` whose KV pages hold zero-padded keys and value pairs (module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_kv_heads % 2 or self.n_heads % 2:
            raise ModelError(f"model config: diffllama splits its heads in two: num_key_value_heads "
                             f"({self.n_kv_heads}) and num_attention_heads ({self.n_heads}) must be even")

    def kv_spec(self) -> KVSpec:
        return KVSpec.mha(self.n_layers, self.n_kv_heads, 2 * self.head_dim, self.dtype)


def lambda_init(layer: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class DiffLlamaModel(LlamaModel):
    """Llama's decoder with differential attention (module docstring)."""

    _first: torch.Tensor
    _second: torch.Tensor

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__(spec, device, backend)
        for layer in self.model.layers:
            attn = cast(Any, layer.self_attn)
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                attn.register_parameter(name, nn.Parameter(torch.zeros(spec.head_dim, device=self.device,
                                                                       dtype=spec.torch_dtype)))
        h2 = spec.n_kv_heads // 2
        heads = torch.arange(spec.n_kv_heads, device=device) % h2  # (each KV head's value pair: first, second half)
        self.register_buffer("_first", heads, persistent=False)
        self.register_buffer("_second", h2 + heads, persistent=False)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        spec, b = self.spec, state.batch
        hq, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.check_layer(layer, state, kv_layer, (b.block_tokens, 2, hkv, 2 * d))
        mod = cast(Any, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(state.hidden)
        n = x.shape[0]
        cos, sin = state.cos[:, None, :], state.sin[:, None, :]
        q = _rope(attn.q_proj(x).view(n, hq, d), cos, sin)
        k = _rope(attn.k_proj(x).view(n, hkv, d), cos, sin)
        v = attn.v_proj(x).view(n, hkv, d)
        store_kv(F.pad(k, (0, d)), torch.cat([v[:, self._first], v[:, self._second]], dim=-1), kv_layer, b.slot_mapping,
                 backend=self.backend)
        qp, scale = F.pad(q, (0, d)), d ** -0.5
        if b.is_decode:
            o = paged_decode_attention(qp, kv_layer, b.block_tables, b.seq_lens, scale, backend=self.backend)
        else:
            o = paged_prefill_attention(qp, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                        scale, backend=self.backend)
        dt = q.dtype
        lam1 = torch.exp(torch.sum(attn.lambda_q1 * attn.lambda_k1, dim=-1, dtype=torch.float32)).to(dt)
        lam2 = torch.exp(torch.sum(attn.lambda_q2 * attn.lambda_k2, dim=-1, dtype=torch.float32)).to(dt)
        init = lambda_init(layer)
        out = o[:, : hq // 2] - (lam1 - lam2 + init) * o[:, hq // 2:]
        out = (1 - init) * F.rms_norm(out, (2 * d,), eps=spec.rms_eps)
        h = state.hidden + attn.o_proj(out.reshape(n, hq * d))
        state.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1
