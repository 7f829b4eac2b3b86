"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the lightning indexer and the keys it selects for each query.

GLM-5 (``glm_moe_dsa``) differs in two ways: its indexer rotates interleaved pairs, and its "shared" layers have no
indexer and reuse the selection of the last layer before them that has one (their rows' key slot stays unused).

Per layer, the indexer has its own small projections (transformers' and DeepSeek's names: ``wq_b``, ``wk``,
``k_norm``, ``weights_proj`` under ``self_attn.indexer``). Each token's indexer key is ``k_norm(wk(x))`` (a
LayerNorm) with RoPE on its first ``qk_rope_head_dim`` values (half-split pairs, unlike MLA's interleaved ones);
it is stored in the token's KV row after the latent (:meth:`dualpath.model.spec.DeepseekV3Spec.kv_spec`), so a
prefix read from storage or forwarded by a decode engine brings its keys along. A query's ``index_n_heads``
indexer queries ``wq_b(q_resid)`` (RoPE'd the same way) score every visible key ``t``::

    score[t] = sum_h  w[h] * relu(q[h] . k[t] / sqrt(index_head_dim)),   w = weights_proj(x) / sqrt(index_n_heads)

and the query attends to its ``index_topk`` highest-scoring keys only (every visible key while there are no more
than that). transformers' eager DeepseekV32 computes the same: its scores in fp32, ``topk`` over each query's row of
the keys so far with the future masked. The selection here is that ``topk`` over the same rows (a sequence's keys
so far: a chunk's queries see the prefix and the chunk, as transformers' cached forward does), so where scores tie
exactly (a ReLU zeroes every head's term of many keys, common with few indexer heads) the same keys are kept; with
1 or 2 indexer heads the logits over turns of chunks and decode steps equal transformers' (``test_deepseek_v32.py``;
a stable sort keeping the earlier keys, used before, differed by up to 6 logits there). DeepSeek's kernels
additionally quantize to FP8 and rotate by a Hadamard transform, which preserves the dot products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.model.mla_spec import DeepseekV3Spec

__all__ = ["Indexer", "pooled_selection", "selected_keys"]


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False,
               tail: bool = False) -> torch.Tensor:
    """RoPE over the first ``2 * cos.shape[-1]`` values of ``x [..., D]`` (the last ones with ``tail``: Hy4's
    indexer), pairs ``(i, i + P/2)``; with ``interleave`` (GLM-5's indexer) pairs ``(2i, 2i + 1)``, laid out
    de-interleaved as transformers does (the same permutation of queries and keys: no dot product changes)."""
    p = 2 * cos.shape[-1]
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if tail:
        rest, rot = x[..., :x.shape[-1] - p], x[..., x.shape[-1] - p:]
        a, b = (rot[..., 0::2], rot[..., 1::2]) if interleave else (rot[..., : p // 2], rot[..., p // 2:])
        return torch.cat((rest, a * cos - b * sin, b * cos + a * sin), dim=-1)
    rot, rest = x[..., :p], x[..., p:]
    if interleave:
        a, b = rot[..., 0::2], rot[..., 1::2]
    else:
        a, b = rot[..., : p // 2], rot[..., p // 2:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin, rest), dim=-1)


class Indexer(nn.Module):
    """One layer's lightning indexer (see the module docstring)."""

    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        assert spec.q_lora_rank is not None  # (the spec requires it for DeepSeek-V3.2)
        h, d = spec.index_n_heads, spec.index_head_dim
        self.n_heads, self.head_dim = h, d
        self.wq_b = nn.Linear(spec.q_lora_rank, h * d, bias=False)
        self.wk = nn.Linear(spec.hidden_size, d, bias=False)
        # (Hy4's LayerNorm takes the config's rms_norm_eps; it and weights_proj stay fp32 in a bf16 model there)
        self.k_norm = nn.LayerNorm(d, eps=spec.rms_eps if spec.index_rope_tail else 1e-6)
        self.weights_proj = nn.Linear(spec.hidden_size, h, bias=False)
        self.interleave, self.tail = spec.index_rope_interleave, spec.index_rope_tail
        self.kpool = spec.index_kpool
        if self.kpool:  # (GLM-5.3-Flash: keys pooled over kpool tokens by a softmax gate per channel)
            self.index_kpool_compress_ape = nn.Parameter(torch.zeros(self.kpool, d))
            self.index_kpool_compress_gate = nn.Parameter(torch.zeros(d, spec.hidden_size))

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Indexer keys ``[N, D]`` of the tokens ``x [N, hidden]`` (``cos, sin [N, rope/2]``)."""
        k = self.k_norm(self.wk(x).to(self.k_norm.weight.dtype)).to(x.dtype)
        k = _rope_half(k, cos, sin, self.interleave, self.tail)
        if self.kpool:  # (the pooling gate's logits follow the key in the row)
            k = torch.cat((k, F.linear(x, self.index_kpool_compress_gate)), dim=-1)
        return k

    def queries(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q [N, H, D], weights [N, H] fp32)`` of the tokens ``x`` with their ``q_a_layernorm(q_a_proj(x))``."""
        q = self.wq_b(q_resid).view(x.shape[0], self.n_heads, self.head_dim)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads ** -0.5
        return _rope_half(q, cos, sin, self.interleave, self.tail), w


def selected_keys(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, topk: int) -> torch.Tensor:
    """Which keys each query attends to: ``[M, n]`` bool for queries ``q [M, H, D]`` (weights ``w [M, H]``) at
    positions ``qpos [M]`` over a sequence's ``n`` keys ``keys [n, D]`` (positions ``0 .. n-1``): the ``topk``
    highest-scoring visible keys (all of them when no more are visible)."""
    n = keys.shape[0]
    scores = torch.relu(torch.matmul(q.float(), keys.float().t()[None]) * q.shape[-1] ** -0.5)   # [M, H, n]
    index = torch.matmul(w[:, None, :], scores).squeeze(1)                                      # [M, n]
    visible = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
    index = index.masked_fill(~visible, float("-inf"))
    # transformers' own top-k over the same rows (each query's scores over the sequence's keys so far, the hidden
    # ones at -inf): equal scores (a ReLU zeroes every head's term of many keys) then go as its go, row by row
    pick = index.topk(min(topk, n), dim=-1).indices
    chosen = torch.zeros_like(visible).scatter_(1, pick, True)
    return chosen & visible


def pooled_selection(q: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, ape: torch.Tensor, qpos: torch.Tensor,
                     topk: int, kpool: int) -> torch.Tensor:
    """GLM-5.3-Flash's selection: ``[M, n]`` bool for queries ``q [M, H, D]`` (weights ``w [M, H]``) at positions
    ``qpos`` over a sequence's ``n`` indexer rows ``rows [n, 2 D]`` (each token's key, then its pooling gate's
    logits). Complete pools of ``kpool`` tokens from the first get one key each, the tokens' keys weighted by a
    softmax over the pool of ``gate + ape`` per channel; a query scores the pools it has seen whole
    (``sum_h w[h] relu(q[h] . key / sqrt(D))``), keeps the ``topk // kpool`` best, and sees their tokens plus its own
    open pool's tokens up to itself."""
    n, d = rows.shape[0], q.shape[-1]
    pools = n // kpool
    visible = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
    tail = torch.arange(n, device=q.device)[None, :] >= ((qpos + 1) // kpool * kpool)[:, None]
    chosen = visible & tail
    if pools == 0:
        return chosen
    keys, gates = rows[: pools * kpool, :d].view(pools, kpool, d), rows[: pools * kpool, d:].view(pools, kpool, d)
    probs = (gates.float() + ape.float()[None]).softmax(dim=1).to(keys.dtype)
    pooled = (probs * keys).sum(dim=1)                                                          # [P, D]
    scores = torch.relu(torch.matmul(q.float(), pooled.float().t()[None]) * d ** -0.5)         # [M, H, P]
    index = torch.matmul(w[:, None, :], scores).squeeze(1)                                      # [M, P]
    closed = (torch.arange(pools, device=q.device)[None, :] + 1) * kpool <= (qpos[:, None] + 1)
    index = index.masked_fill(~closed, torch.finfo(index.dtype).min)
    pick = index.topk(min(topk // kpool, pools), dim=-1).indices
    kept = torch.zeros_like(closed).scatter_(1, pick, True) & closed                            # [M, P]
    by_token = kept.repeat_interleave(kpool, dim=1)
    chosen[:, : pools * kpool] |= by_token
    return chosen & visible
