"""Pure-torch reference implementations of the paged-KV kernels (the CPU default and the tests' oracle).

Paged pool layout, one tensor per layer: ``kv_layer[num_blocks, block_tokens, 2, n_kv_heads, head_dim]``;
``kv_layer[b]`` is the Layer Block of physical block ``b`` (index 0 of dim 2 is K, 1 is V). A sequence's
token ``t`` lives at ``kv_layer[block_table[t // block_tokens], t % block_tokens]``; its *slot* is
``block_table[t // block_tokens] * block_tokens + t % block_tokens``.
Attention is computed in fp32 and returned in ``q``'s dtype.
"""

from __future__ import annotations

import torch


def _seq_kv(kv_layer: torch.Tensor, table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    bt = kv_layer.shape[1]
    nb = (n + bt - 1) // bt
    rows = kv_layer[table[:nb].long()].reshape(nb * bt, *kv_layer.shape[2:])[:n]
    return rows[:, 0].float(), rows[:, 1].float()  # [n, Hkv, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    # q [M, Hq, D], k/v [N, Hkv, D]; query head h reads KV head h // (Hq // Hkv)
    m, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(m, hkv, hq // hkv, d).permute(1, 2, 0, 3)      # [Hkv, G, M, D]
    s = torch.matmul(qg, k.permute(1, 2, 0)[:, None]) * scale            # [Hkv, G, M, N]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v.permute(1, 0, 2)[:, None])                     # [Hkv, G, M, D]
    return o.permute(2, 0, 1, 3).reshape(m, hq, d)


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its first ``seq_lens[b]`` cached tokens.

    ``q [B, Hq, D]``, ``block_tables [B, max_blocks]`` int32, ``seq_lens [B]`` int32 -> ``[B, Hq, D]``.
    """
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        k, v = _seq_kv(kv_layer, block_tables[b], n)
        out[b] = _attend(q[b : b + 1], k, v, scale, None)[0].to(q.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Queries of each sequence's new tokens over its cached prefix (full) and its new tokens (causal).

    ``q [Ntok, Hq, D]``: the new tokens of all sequences, concatenated; sequence ``b`` owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` at positions ``start_pos[b] + i``; ``seq_lens[b] = start_pos[b] +
    new_b``. The new tokens' K/V must already be in ``kv_layer`` (see :func:`store_kv`).
    """
    out = torch.empty_like(q)
    for b in range(block_tables.shape[0]):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if hi == lo:
            continue
        n, start = int(seq_lens[b]), int(start_pos[b])
        k, v = _seq_kv(kv_layer, block_tables[b], n)
        qpos = torch.arange(start, start + hi - lo, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, mask).to(q.dtype)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [N, Hkv, D]`` into the pool at flat slots ``slot_mapping [N]`` (negative slots skipped)."""
    bt = kv_layer.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blk, off = slots // bt, slots % bt
    kv_layer[blk, off, 0] = k[keep].to(kv_layer.dtype)
    kv_layer[blk, off, 1] = v[keep].to(kv_layer.dtype)


def gather_layer_blocks(kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy Layer Blocks ``kv_layer[block_ids]`` into a contiguous staging buffer ``[n, bt, 2, H, D]``."""
    src = kv_layer[block_ids.long()]
    if out is None:
        return src
    _as_pool_dtype(out, kv_layer).copy_(src)
    return out


def scatter_layer_blocks(staging: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Copy staged Layer Blocks back into the pool: ``kv_layer[block_ids[i]] = staging[i]``."""
    kv_layer[block_ids.long()] = _as_pool_dtype(staging, kv_layer)


def _as_pool_dtype(staging: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
    """View a staging buffer (typed ``[n, bt, 2, H, D]`` or uint8 rows ``[n, (1,) bt, bytes]``) as pool pages."""
    n = staging.shape[0]
    if staging.dtype != kv_layer.dtype:
        staging = staging.view(kv_layer.dtype)
    return staging.view(n, *kv_layer.shape[1:])
