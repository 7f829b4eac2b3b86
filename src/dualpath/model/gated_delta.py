"""The gated delta rule (Gated DeltaNet: Qwen3-Next's and Qwen3.5's linear-attention layers) over state pages.

A linear-attention layer keeps, per sequence, a recurrent state ``S [Hv, Dk, Dv]`` and the last ``K - 1`` inputs of
its causal depthwise convolution (``conv [C, K - 1]``), instead of per-token keys and values. Token ``t`` (keys and
queries L2-normalized, queries scaled by ``Dk ** -0.5``; decay ``g_t <= 0``, rate ``beta_t``)::

    S <- exp(g_t) * S;   S <- S + k_t (beta_t * (v_t - S^T k_t))^T;   o_t = S^T q_t

The state lives in the layer's pages (:mod:`dualpath.model.state_pages`). Kimi Delta Attention (KDA: Kimi Linear's
linear layers) is the same rule with a decay per key channel, ``g_t [Dk]``: ``S <- diag(exp(g_t)) S`` (:func:`kda_segment`;
:func:`delta_step` takes either).

:func:`delta_segment` runs one segment in closed form (the UT transform: one triangular solve per segment, the
DeltaNet papers' chunked form); segments never cross a block boundary, so every snapshot is exact.
"""

from __future__ import annotations

import torch

__all__ = ["delta_segment", "delta_step", "kda_segment", "l2norm"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (the normalization Gated DeltaNet applies to q and k)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment of ``L`` tokens from state ``s0 [H, Dk, Dv]``: ``q, k [H, L, Dk]`` (normalized, q scaled),
    ``v [H, L, Dv]``, ``g, beta [H, L]``, all fp32. Returns ``(o [H, L, Dv], state after the last token)``.

    With ``G`` the cumulative sum of ``g`` and ``A[t, i] = beta_t (k_t . k_i) exp(G_t - G_i)`` for ``i < t``, the
    corrections ``u_t = beta_t (v_t - S_{t-1}'^T k_t)`` solve ``(I + A) U = beta V - (beta exp(G) K) s0``; then
    ``o_t = exp(G_t) s0^T q_t + sum_{i <= t} exp(G_t - G_i) (q_t . k_i) u_i`` and the state is
    ``exp(G_L) s0 + sum_i exp(G_L - G_i) k_i u_i^T``."""
    n = q.shape[1]
    gc = g.cumsum(dim=-1)
    diff = gc[:, :, None] - gc[:, None, :]  # G_t - G_i
    below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    decay = diff.masked_fill(~below, float("-inf")).exp()  # (masked before exp: G_t - G_i > 0 above)
    a = beta[:, :, None] * (k @ k.transpose(-1, -2)) * decay
    eg = gc.exp()
    rhs = beta[:, :, None] * v - (beta * eg)[:, :, None] * (k @ s0)
    u = torch.linalg.solve_triangular(a + torch.eye(n, dtype=a.dtype, device=a.device), rhs, upper=False,
                                      unitriangular=True)
    causal = diff.masked_fill(~(below | torch.eye(n, dtype=torch.bool, device=q.device)), float("-inf")).exp()
    o = eg[:, :, None] * (q @ s0) + ((q @ k.transpose(-1, -2)) * causal) @ u
    last = gc[:, -1:]
    s1 = last.exp()[:, :, None] * s0 + (k * (last - gc).exp()[:, :, None]).transpose(-1, -2) @ u
    return o, s1


def kda_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`delta_segment` with a decay per key channel (KDA): ``g [H, L, Dk]``, the rest as there.

    With ``G`` the per-channel cumulative sum and ``D[t, i] = exp(G_t - G_i)`` (``[Dk]``, ``i <= t``), the pair
    weights become ``k_t . (D[t, i] * k_i)`` and ``q_t . (D[t, i] * k_i)``; ``(I + A) U = beta V - (beta exp(G) * K) s0``;
    ``o_t = (exp(G_t) * q_t) s0 + sum_{i <= t} (q_t . D[t, i] k_i) u_i``; the state
    ``exp(G_L) * s0 + sum_i (exp(G_L - G_i) * k_i) u_i^T``. ``D`` is formed whole (``[H, L, L, Dk]``), masked before
    its exponential, so no factor ``exp(-G_i)`` can overflow however strong the decay."""
    n = q.shape[1]
    gc = g.cumsum(dim=1)                                                   # [H, L, Dk]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    decay = (gc[:, :, None, :] - gc[:, None, :, :]).masked_fill(~causal[:, :, None], float("-inf")).exp()
    kd = k[:, None, :, :] * decay                                          # [H, t, i, Dk]: D[t, i] * k_i
    a = beta[:, :, None] * (k[:, :, None, :] * kd).sum(-1).tril(-1)
    eg = gc.exp()
    rhs = beta[:, :, None] * (v - (k * eg) @ s0)
    u = torch.linalg.solve_triangular(a + torch.eye(n, dtype=a.dtype, device=a.device), rhs, upper=False,
                                      unitriangular=True)
    o = (q * eg) @ s0 + (q[:, :, None, :] * kd).sum(-1) @ u
    last = gc[:, -1:]                                                      # [H, 1, Dk]
    s1 = last.exp().transpose(1, 2) * s0 + (k * (last - gc).exp()).transpose(-1, -2) @ u
    return o, s1


def delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for each of ``B`` sequences: ``q, k [B, H, Dk]``, ``v [B, H, Dv]``, ``g, beta [B, H]`` (KDA: ``g
    [B, H, Dk]``, a decay per key channel), state ``s [B, H, Dk, Dv]`` (fp32). Returns ``(o [B, H, Dv], new
    state)``."""
    s = s * (g.exp()[:, :, :, None] if g.dim() == 3 else g.exp()[:, :, None, None])
    mem = (s * k[:, :, :, None]).sum(dim=-2)
    s = s + k[:, :, :, None] * ((v - mem) * beta[:, :, None])[:, :, None, :]
    return (s * q[:, :, :, None]).sum(dim=-2), s
