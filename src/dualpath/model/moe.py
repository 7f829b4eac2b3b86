"""What every mixture-of-experts feed-forward here shares: the gated expert (:class:`FeedForward`, also the dense
MLP and shared experts; SwiGLU, or the activation a config's ``hidden_act`` names, :func:`activation_of`) and the
one expert loop (:func:`dispatch_experts`) that DeepSeek-V2/V3, Mixtral, Qwen2-MoE
and Qwen3-MoE run after their own routers pick each token's experts and weights.

The loop follows transformers' eager experts: only the experts some token picked run, in ascending expert order;
each adds ``expert(x[tokens]) * weight`` (the product in the weight's dtype, usually fp32) into an output of
``x``'s dtype, so the sums round in the same order as the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.model.layernorm_family import activation

__all__ = ["Activation", "FeedForward", "activation_of", "dispatch_experts", "dispatch_packed", "gate_fn",
           "softmax_topk"]


Activation = Callable[[torch.Tensor], torch.Tensor]


class FeedForward(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` of width ``inter`` (biases on all three with ``bias``): SwiGLU by
    default, or the activation a config names (``act``: transformers' ``ACT2FN[hidden_act]``, which its experts
    apply to the gate whatever it is)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False, act: Activation | None = None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act: Activation = F.silu if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


def activation_of(spec: object) -> Activation | None:
    """The gate activation a spec's ``activation`` field names (None: SiLU, the default)."""
    name = getattr(spec, "activation", None)
    return None if name in (None, "silu") else activation(str(name))


def gate_fn(spec: object) -> Activation:
    """:func:`activation_of` as a function always (SiLU where the spec names none)."""
    return activation_of(spec) or F.silu


def dispatch_experts(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                     experts: Sequence[Callable[[torch.Tensor], torch.Tensor]] | nn.ModuleList) -> torch.Tensor:
    """``sum_k weights[n, k] * experts[idx[n, k]](x[n])`` for every token ``n`` of ``x [N, H]``.

    ``idx [N, K]`` int expert ids, ``weights [N, K]``. Returns ``[N, H]`` in ``x``'s dtype."""
    out = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():   # only the experts some token picked, in expert order
        tok, pos = torch.where(idx == e)
        y = experts[e](x[tok]) * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class SigmoidBiasRouter(nn.Module):
    """MiniMax-M3's and Step 3.7's router: logits in the weight's dtype, their sigmoid in fp32 plus a correction bias
    for the choice only, the chosen scores renormalized: ``(weights [N, k] fp32, expert ids [N, k])``."""

    def __init__(self, hidden: int, n_experts: int, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.to(self.weight.dtype), self.weight).float())
        idx = torch.topk(scores + self.e_score_correction_bias, self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        return w / w.sum(dim=-1, keepdim=True), idx


class _PackedExpert:
    """Expert ``e`` of packed ``gate_up [E, 2I, H]`` / ``down [E, H, I]`` tensors: ``down(act(gate) * up)`` (SiLU
    unless ``act``), the gate clamped above and the up projection to +-``limit`` when given (DeepSeek-V4's)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, e: int, limit: float | None,
                 act: Activation | None = None) -> None:
        self.gate_up, self.down, self.e, self.limit = gate_up, down, e, limit
        self.act: Activation = F.silu if act is None else act

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, self.gate_up[self.e]).chunk(2, dim=-1)
        if self.limit is not None:
            g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        return F.linear(self.act(g) * u, self.down[self.e])


def dispatch_packed(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, limit: float | None = None, act: Activation | None = None) -> torch.Tensor:
    """:func:`dispatch_experts` over packed gated experts (transformers' ``gate_up_proj`` / ``down_proj``)."""
    return dispatch_experts(x, idx, weights,
                            [_PackedExpert(gate_up, down, e, limit, act) for e in range(gate_up.shape[0])])


def sparsemixer_top2(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer router at inference: the best expert, weighted by the softmax over the experts whose
    logit is within ``2 * jitter_eps`` (relative) of the best; then the best of the others, weighted the same way
    among the rest. Returns ``(idx [N, 2], weights [N, 2])`` in ``logits``' dtype (as transformers computes)."""
    def pick(scores: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = masked.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=top)
        gates = masked.masked_fill((top - logits) / factor > 2 * jitter_eps, float("-inf"))
        return idx, torch.softmax(gates, dim=-1).gather(-1, idx)

    first, w1 = pick(logits, logits)
    second, w2 = pick(logits, torch.scatter(logits, -1, first, float("-inf")))
    return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1)


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax router of Mixtral / Qwen-MoE: softmax over all experts in fp32, the ``k`` best, renormalized
    to sum 1 when ``renormalize``. Returns ``(idx [N, k], weights [N, k] fp32)``."""
    probs = logits.float().softmax(dim=-1)
    w, idx = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w
