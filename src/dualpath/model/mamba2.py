"""Mamba-2's mixer (the state-space duality form) over state pages (:mod:`dualpath.model.state_pages`).

Per head ``h`` (``H`` heads of ``P`` channels, ``G`` groups of ``N``-wide ``B`` and ``C`` shared by ``H / G`` heads),
with ``dt = softplus(dt_raw + dt_bias)`` and ``A = -exp(A_log)``, token ``t`` updates the state ``S [H, P, N]``::

    S <- exp(dt_t A) S + dt_t x_t B_t^T;   y_t = S C_t + D x_t

The mixer: ``in_proj`` gives the gate ``z``, ``xBC`` and ``dt_raw``; ``xBC`` goes through a causal depthwise
convolution (with its bias) and SiLU; ``y`` times ``silu(z)`` is RMS-normalized in ``G`` groups, scaled, and projected
by ``out_proj`` (transformers' ``norm_before_gate=False``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.model.moe import Activation
from dualpath.model.state_pages import ConvAct, decode_states, scan_sequences, state_bytes, state_views

__all__ = ["Mamba2Mixer", "ssd_segment", "ssd_step"]


def ssd_segment(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment of ``L`` tokens from ``s0 [H, P, N]``: ``x [H, L, P]``, ``dt``, ``a = dt * A`` ``[H, L]``,
    ``b, c [H, L, N]`` (fp32). Returns ``(y [H, L, P]`` without the ``D`` term, the state after the last token).
    With ``G`` the cumulative sum of ``a``: ``y_t = exp(G_t) s0 C_t + sum_{i <= t} exp(G_t - G_i) (C_t . B_i) dt_i
    x_i`` and ``S_L = exp(G_L) s0 + sum_i exp(G_L - G_i) dt_i x_i B_i^T``."""
    n = x.shape[1]
    gc = a.cumsum(dim=-1)
    diff = gc[:, :, None] - gc[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    decay = diff.masked_fill(~causal, float("-inf")).exp()
    xd = x * dt[:, :, None]
    y = ((c @ b.transpose(-1, -2)) * decay) @ xd + gc.exp()[:, :, None] * (c @ s0.transpose(-1, -2))
    last = gc[:, -1:]
    s1 = last.exp()[:, :, None] * s0 + (xd * (last - gc).exp()[:, :, None]).transpose(-1, -2) @ b
    return y, s1


def ssd_step(x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for ``B`` sequences: ``x [B, H, P]``, ``dt, a [B, H]``, ``b, c [B, H, N]``, ``s [B, H, P, N]``."""
    s = s * a.exp()[:, :, None, None] + (dt[:, :, None] * x)[:, :, :, None] * b[:, :, None, :]
    return (s * c[:, :, None, :]).sum(dim=-1), s


class GroupedGatedRMSNorm(nn.Module):
    """``weight * rms_norm(y * silu(z))`` over ``groups`` groups of channels, in fp32, the product rounded to the
    input's dtype (transformers' ``MambaRMSNormGated`` with ``norm_before_gate=False``)."""

    def __init__(self, dim: int, groups: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups, self.eps = groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dt = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], self.groups, -1)
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).view(h.shape)
        return self.weight * h.to(dt)


class Mamba2Mixer(nn.Module):
    """The mixer over state pages. ``heads`` x ``head_dim`` = ``inner`` channels; ``groups`` x ``state`` for B, C."""

    def __init__(self, hidden: int, inner: int, heads: int, groups: int, state: int, kernel: int, eps: float, *,
                 conv_bias: bool, proj_bias: bool, dt_min: float = 0.0, out_bias: bool | None = None,
                 act: Activation | None = None) -> None:
        super().__init__()
        self.act: ConvAct = True if act is None else act  # (the convolution's: SiLU, or the config's hidden_act)
        self.dt_min = dt_min  # (Nemotron-H: a prefill's dt clamped below, as transformers' chunked scan does)
        self.inner, self.heads, self.groups, self.state, self.kernel = inner, heads, groups, state, kernel
        self.head_dim = inner // heads
        self.conv_dim = inner + 2 * groups * state
        self.in_proj = nn.Linear(hidden, inner + self.conv_dim + heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, bias=conv_bias,
                                padding=kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm: nn.Module = GroupedGatedRMSNorm(inner, groups, eps)
        self.out_proj = nn.Linear(inner, hidden, bias=proj_bias if out_bias is None else out_bias)

    @property
    def state_bytes(self) -> int:
        return state_bytes(self.conv_dim, self.kernel, self.heads, self.head_dim, self.state)

    def _split(self, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved ``[..., C]`` -> fp32 ``x [..., H, P]``, ``B, C [..., H, N]`` (groups repeated per head)."""
        gn = self.groups * self.state
        x, b, c = conv.float().split((self.inner, gn, gn), dim=-1)
        rep = self.heads // self.groups
        lead = conv.shape[:-1]
        b = b.reshape(*lead, self.groups, self.state).repeat_interleave(rep, dim=-2)
        c = c.reshape(*lead, self.groups, self.state).repeat_interleave(rep, dim=-2)
        return x.reshape(*lead, self.heads, self.head_dim), b, c

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """``in_proj`` (Falcon-H1 scales around it)."""
        return cast(torch.Tensor, self.in_proj(h))

    def gate_and_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``y * silu(z)`` normalized (Falcon-H1 has its own orders)."""
        return cast(torch.Tensor, self.norm(y, z))

    def forward(self, h: torch.Tensor, batch: Any, kv_layer: torch.Tensor,
                pages: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        conv_pages, rec_pages = pages if pages is not None else state_views(
            kv_layer, self.conv_dim, self.kernel, self.heads, self.head_dim, self.state)
        z, xbc, dt_raw = self.project(h).split((self.inner, self.conv_dim, self.heads), dim=-1)
        a_log = -self.A_log.float().exp()
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        d = self.D.float()
        dt = F.softplus(dt_raw + self.dt_bias.to(dt_raw.dtype)).float()  # (in the model's dtype, as transformers)
        if batch.is_decode:  # (transformers' step rounds its output to the model's dtype)
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, xbc, weight, bias, self.act)
            x, b, c = self._split(conv)
            y, s1 = ssd_step(x, dt, dt * a_log, b, c, s0)
            commit(s1)
            y = (y + x * d[:, None]).to(h.dtype)
        else:
            if self.dt_min > 0:
                dt = dt.clamp(min=self.dt_min)
            y = torch.empty(h.shape[0], self.heads, self.head_dim, dtype=torch.float32, device=h.device)

            def run(conv: torch.Tensor, r0: int, r1: int, s: torch.Tensor) -> torch.Tensor:
                x, b, c = self._split(conv)
                seg_dt = dt[r0:r1].t()
                out, s = ssd_segment(x.transpose(0, 1), seg_dt, seg_dt * a_log[:, None], b.transpose(0, 1),
                                     c.transpose(0, 1), s)
                y[r0:r1] = out.transpose(0, 1) + x * d[:, None]
                return s

            scan_sequences(batch, conv_pages, rec_pages, xbc, weight, bias, run, self.act)
        out = self.gate_and_norm(y.reshape(h.shape[0], self.inner), z)
        return cast(torch.Tensor, self.out_proj(out.to(h.dtype)))
