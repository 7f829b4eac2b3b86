"""gpt-oss's mixture-of-experts block (``GptOssForCausalLM``): a biased linear router and packed experts with a
clamped SwiGLU. The attention (biases, per-head sinks, alternating sliding windows, YaRN) is the shared Llama path.

Parameter names and shapes are transformers' (``mlp.router.weight [E, H]``, ``mlp.router.bias [E]``,
``mlp.experts.gate_up_proj [E, H, 2I]`` with gate and up interleaved column by column, ``gate_up_proj_bias
[E, 2I]``, ``mlp.experts.down_proj [E, I, H]``, ``down_proj_bias [E, H]``), so a dense (or dequantized MXFP4,
:mod:`dualpath.model.mxfp4`) checkpoint loads as is.

Routing: the router's logits (in the compute dtype), the ``k`` largest, a softmax over those ``k`` in the same
dtype. An expert computes ``gate_up = x @ gate_up_proj[e] + bias``; ``gate = min(gate_up[..., 0::2], limit)``,
``up = clamp(gate_up[..., 1::2], -limit, limit)``; ``(up + 1) * gate * sigmoid(alpha * gate)`` goes through
``down_proj[e] + bias`` and is scaled by the token's weight; experts run in ascending order, as transformers' eager
loop adds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.model.spec import ModelSpec

__all__ = ["GptOssExperts", "GptOssMoE", "GptOssRouter"]


class GptOssRouter(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.n_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(spec.n_experts, spec.hidden_size))
        self.bias = nn.Parameter(torch.zeros(spec.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert ids [N, k], weights [N, k])``: the top-k logits, softmaxed in the compute dtype."""
        logits = F.linear(x, self.weight, self.bias)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1, dtype=top.dtype)


class GptOssExperts(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        e, h, i = spec.n_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
        self.down_proj = nn.Parameter(torch.zeros(e, i, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        assert spec.swiglu_limit is not None and spec.swiglu_alpha is not None  # the spec checks gpt_oss has both
        self.limit = spec.swiglu_limit
        self.alpha = spec.swiglu_alpha

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x [n, H]``."""
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate = gate_up[..., 0::2].clamp(max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu @ self.down_proj[e] + self.down_proj_bias[e]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():  # only the experts some token picked, in expert order
            tok, pos = torch.where(idx == e)
            y = self.expert(e, x[tok]) * weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class GptOssMoE(nn.Module):
    """``mlp`` of a gpt-oss layer: :class:`GptOssRouter` then :class:`GptOssExperts`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.router = GptOssRouter(spec)
        self.experts = GptOssExperts(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.router(x)
        return self.experts(x, idx, weights)  # type: ignore[no-any-return]
