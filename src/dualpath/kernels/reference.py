"""Pure-torch reference implementations of the paged-KV kernels (the CPU default and the tests' oracle).

Paged pool layout, one tensor per layer: ``kv_layer[num_blocks, block_tokens, 2, n_kv_heads, head_dim]``;
``kv_layer[b]`` is the Layer Block of physical block ``b`` (index 0 of dim 2 is K, 1 is V). A sequence's
token ``t`` lives at ``kv_layer[block_table[t // block_tokens], t % block_tokens]``; its *slot* is
``block_table[t // block_tokens] * block_tokens + t % block_tokens``.
Attention is computed in fp32 and returned in ``q``'s dtype. ``softcap`` (Gemma 2's ``attn_logit_softcapping``):
the scaled scores become ``softcap * tanh(scores / softcap)`` before the mask and the softmax. ``window`` (a
sliding attention window, as transformers masks it): a query at position ``p`` sees only the keys at positions
``> p - window`` (``window`` keys, itself included); None: every earlier key. ``sinks`` (gpt-oss's attention
sinks, ``[Hq]``, used as fp32): query head ``h``'s softmax gets an extra logit ``sinks[h]`` (not scaled, not capped,
not masked) whose probability weights no value. ``alibi`` (ALiBi slopes, ``[Hq]``, used as fp32; Bloom): query head
``h``'s score of the key at position ``k`` from the query at ``p`` gets ``alibi[h] * (k - p)`` added after the
scale (and the cap), before the mask. With ``alibi_bf16`` (Falcon's ALiBi, as transformers builds it) the key at
position ``k`` instead gets ``bf16(alibi[h] * bf16(k))`` added before the scale: the same bias up to a per-query
constant (which the softmax ignores), rounded as Falcon rounds it (positions past 256 too).
"""

from __future__ import annotations

import torch


def _seq_kv(kv_layer: torch.Tensor, table: torch.Tensor, n: int,
            first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the sequence's tokens ``first .. n - 1`` (only their blocks are gathered), as fp32."""
    bt = kv_layer.shape[1]
    b0, nb = first // bt, (n + bt - 1) // bt
    rows = kv_layer.index_select(0, table[b0:nb].long()).reshape((nb - b0) * bt, *kv_layer.shape[2:])
    rows = rows[first - b0 * bt: n - b0 * bt]
    return rows[:, 0].float(), rows[:, 1].float()  # [n - first, Hkv, D]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None,
            softcap: float | None = None, sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
            rel: torch.Tensor | None = None, kpos: torch.Tensor | None = None) -> torch.Tensor:
    # q [M, Hq, D], k/v [N, Hkv, D]; query head h reads KV head h // (Hq // Hkv); rel [M, N]: key - query position;
    # kpos [1, N]: the keys' positions, for Falcon's rounded bias (alibi_bf16: rel is None then)
    m, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(m, hkv, hq // hkv, d).permute(1, 2, 0, 3)      # [Hkv, G, M, D]
    s = torch.matmul(qg, k.permute(1, 2, 0)[:, None]) * scale            # [Hkv, G, M, N]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if alibi is not None and rel is not None:
        s = s + alibi.float().reshape(hkv, hq // hkv, 1, 1) * rel.float()
    elif alibi is not None and kpos is not None:
        s = s + (alibi.float().reshape(hkv, hq // hkv, 1, 1) * kpos.bfloat16().float()).bfloat16().float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:  # one extra logit per query head in the denominator; its column is dropped (it weights no value)
        sink = sinks.float().reshape(hkv, hq // hkv, 1, 1).expand(-1, -1, m, 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    o = torch.matmul(p, v.permute(1, 0, 2)[:, None])                     # [Hkv, G, M, D]
    return o.permute(2, 0, 1, 3).reshape(m, hq, d)


def first_visible(n: int, window: int | None, chunk: int | None) -> int:
    """The first key position a decode query (at position ``n - 1``) sees: the last ``window`` keys, those of its
    own ``chunk`` only."""
    first = max(0, n - window) if window is not None else 0
    if chunk is not None:
        first = max(first, (n - 1) // chunk * chunk)
    return first


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    alibi_bf16: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """One query token per sequence attending to its first ``seq_lens[b]`` cached tokens (the last ``window`` of
    them with a window; those of its own ``chunk`` with a chunk).

    ``q [B, Hq, D]``, ``block_tables [B, max_blocks]`` int32, ``seq_lens [B]`` int32 -> ``[B, Hq, D]``.
    ``sinks [Hq]``: per-head sink logits (see the module docstring), or None.
    """
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        first = first_visible(n, window, chunk)
        k, v = _seq_kv(kv_layer, block_tables[b], n, first)
        kpos = None if alibi is None else torch.arange(first, n, device=q.device)[None, :]
        rel = None if kpos is None or alibi_bf16 else kpos - (n - 1)
        out[b] = _attend(q[b : b + 1], k, v, scale, None, softcap, sinks, alibi, rel, kpos)[0].to(q.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    start_pos: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    alibi_bf16: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Queries of each sequence's new tokens over its cached prefix (full) and its new tokens (causal); with a
    ``window``, each query over the last ``window`` positions up to its own; with a ``chunk``, over the positions of
    its own chunk (``p // chunk * chunk .. p``).

    ``q [Ntok, Hq, D]``: the new tokens of all sequences, concatenated; sequence ``b`` owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` at positions ``start_pos[b] + i``; ``seq_lens[b] = start_pos[b] +
    new_b``. The new tokens' K/V must already be in ``kv_layer`` (see :func:`store_kv`). ``sinks [Hq]``: per-head
    sink logits (see the module docstring), or None.
    """
    out = torch.empty_like(q)
    for b in range(block_tables.shape[0]):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if hi == lo:
            continue
        n, start = int(seq_lens[b]), int(start_pos[b])
        first = 0 if window is None else max(0, start - window + 1)  # no query of the chunk sees a key before it
        if chunk is not None:
            first = max(first, start // chunk * chunk)
        k, v = _seq_kv(kv_layer, block_tables[b], n, first)
        qpos = torch.arange(start, start + hi - lo, device=q.device)
        kpos = torch.arange(first, n, device=q.device)[None, :]
        mask = kpos <= qpos[:, None]
        if window is not None:
            mask &= kpos > qpos[:, None] - window
        if chunk is not None:
            mask &= kpos >= (qpos // chunk * chunk)[:, None]
        rel = None if alibi is None or alibi_bf16 else kpos - qpos[:, None]
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, mask, softcap, sinks, alibi, rel, kpos).to(q.dtype)
    return out


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [N, Hkv, D]`` into the pool at flat slots ``slot_mapping [N]`` (negative slots skipped)."""
    bt = kv_layer.shape[1]
    slots = slot_mapping.long()
    if kv_layer.is_contiguous() and not bool((slots < 0).any()):  # one row copy per token into the flat pool
        flat = kv_layer.view(-1, *kv_layer.shape[2:])
        flat.index_copy_(0, slots, torch.stack((k, v), dim=1).to(kv_layer.dtype))
        return
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


# --- MLA: paged latent KV ---------------------------------------------------------------------------------------
#
# An MLA pool layer is ``kv_layer[num_blocks, block_tokens, R + P]`` of a float dtype (the normalized latent ``c``
# of ``R = kv_lora_rank`` values, then the RoPE'd key part of ``P`` values) or, in the FP8 latent format,
# ``uint8[num_blocks, block_tokens, R + 4 * R / 128 + 2 * P]`` rows: R float8_e4m3fn values, R / 128 fp32 scales
# (one per 128-value tile: value = fp8 * scale), P bfloat16 RoPE values.

FP8_TILE = 128
FP8_MAX = 448.0


def quantize_latent_fp8(latent: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """``latent [N, R + P]`` (any float dtype) -> FP8 latent rows ``uint8 [N, R + R / 32 + 2 P]``.

    Each 128-value tile gets ``scale = max(|x|) / 448`` (1 when the tile is all zero); the RoPE part is rounded
    to bfloat16.
    """
    n, width = latent.shape
    r, p = kv_lora_rank, width - kv_lora_rank
    x = latent[:, :r].float().reshape(n, r // FP8_TILE, FP8_TILE)
    amax = x.abs().amax(-1)
    # divided by a tensor, not a Python scalar: on CUDA torch turns ``t / scalar`` into ``t * (1 / scalar)``, one
    # ulp off the correctly rounded quotient the CPU and the Triton kernel (div_rn) give: the bytes differed by device
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))  # [N, R / 128]
    q = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(n, r)
    out = torch.empty((n, r + 4 * (r // FP8_TILE) + 2 * p), dtype=torch.uint8, device=latent.device)
    out[:, :r] = q.view(torch.uint8)
    out[:, r : r + 4 * (r // FP8_TILE)] = scale.contiguous().view(torch.uint8).reshape(n, -1)
    out[:, r + 4 * (r // FP8_TILE) :] = latent[:, r:].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(n, -1)
    return out


def dequantize_latent_fp8(rows: torch.Tensor, kv_lora_rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 latent rows ``uint8 [N, bytes]`` -> ``[N, R + P]`` of ``dtype`` (the inverse of the quantizer)."""
    n = rows.shape[0]
    r = kv_lora_rank
    ns = r // FP8_TILE
    p = (rows.shape[1] - r - 4 * ns) // 2
    rows = rows.contiguous()
    q = rows[:, :r].contiguous().view(torch.float8_e4m3fn).float().reshape(n, ns, FP8_TILE)
    scale = rows[:, r : r + 4 * ns].contiguous().view(torch.float32)               # [N, ns]
    rope = rows[:, r + 4 * ns : r + 4 * ns + 2 * p].contiguous().view(torch.bfloat16).float()
    return torch.cat(((q * scale[..., None]).reshape(n, r), rope), dim=-1).to(dtype)


def store_latent(latent: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, kv_lora_rank: int) -> None:
    """Write latent rows ``[N, R + P]`` into an MLA pool layer at flat slots (negative slots skipped),
    quantizing to the FP8 latent format when the pool is uint8."""
    bt = kv_layer.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    rows = latent[keep]
    if kv_layer.dtype == torch.uint8:
        rows = quantize_latent_fp8(rows, kv_lora_rank)
    kv_layer[slots // bt, slots % bt] = rows.to(kv_layer.dtype)


def _seq_latent(kv_layer: torch.Tensor, table: torch.Tensor, n: int, kv_lora_rank: int) -> torch.Tensor:
    bt = kv_layer.shape[1]
    nb = (n + bt - 1) // bt
    rows = kv_layer.index_select(0, table[:nb].long()).reshape(nb * bt, kv_layer.shape[2])[:n]
    if rows.dtype == torch.uint8:
        return dequantize_latent_fp8(rows, kv_lora_rank)
    return rows.float()  # [n, R + P]


def _mla_attend(q: torch.Tensor, kv: torch.Tensor, scale: float, r: int, mask: torch.Tensor | None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    # q [M, H, R + P] against latent rows kv [N, R + P]; values are the first R columns -> [M, H, R]; sinks [H]: a
    # logit per head in each softmax's denominator (Hy4's)
    s = torch.einsum("mhd,nd->mhn", q.float(), kv) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    if sinks is not None:
        s = torch.cat((s, sinks.float()[None, :, None].expand(s.shape[0], -1, 1)), dim=-1)
        return torch.einsum("mhn,nr->mhr", torch.softmax(s, dim=-1)[..., :-1], kv[:, :r])
    return torch.einsum("mhn,nr->mhr", torch.softmax(s, dim=-1), kv[:, :r])


def mla_masked_attention(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor, n: int, scale: float,
                         kv_lora_rank: int, mask: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA of one sequence's queries ``q [M, H, R + P]`` over its first ``n`` paged latent rows, each query
    seeing only the keys ``mask [M, n]`` marks (DeepSeek-V3.2's sparse selection, or the causal mask) -> ``[M, H,
    R]`` in ``q``'s dtype; ``sinks [H]``: a logit per head in each softmax's denominator (Hy4). One query (a decode
    step) reads only its selected rows from the pool."""
    if q.shape[0] == 1:
        pos = mask[0].nonzero().squeeze(1)
        bt = kv_layer.shape[1]
        rows = kv_layer[table.long()[pos // bt], pos % bt]
        rows = dequantize_latent_fp8(rows, kv_lora_rank) if rows.dtype == torch.uint8 else rows.float()
        return _mla_attend(q, rows, scale, kv_lora_rank, None, sinks).to(q.dtype)
    kv = _seq_latent(kv_layer, table, n, kv_lora_rank)
    return _mla_attend(q, kv, scale, kv_lora_rank, mask, sinks).to(q.dtype)


def mla_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA decode: ``q [B, H, R + P]`` (the absorbed latent query, then the RoPE'd query part) over each
    sequence's ``seq_lens[b]`` paged latent rows -> ``[B, H, R]`` (attention-weighted latents) in ``q``'s dtype."""
    out = torch.empty((*q.shape[:2], kv_lora_rank), dtype=q.dtype, device=q.device)
    for b in range(q.shape[0]):
        kv = _seq_latent(kv_layer, block_tables[b], int(seq_lens[b]), kv_lora_rank)
        out[b] = _mla_attend(q[b : b + 1], kv, scale, kv_lora_rank, None)[0].to(q.dtype)
    return out


def mla_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, start_pos: torch.Tensor, scale: float,
                          kv_lora_rank: int) -> torch.Tensor:
    """Absorbed MLA prefill with a cached prefix: new tokens' ``q [Ntok, H, R + P]`` attend fully over the cached
    latent prefix and causally over the new rows (already stored) -> ``[Ntok, H, R]``."""
    out = torch.empty((*q.shape[:2], kv_lora_rank), dtype=q.dtype, device=q.device)
    for b in range(block_tables.shape[0]):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if hi == lo:
            continue
        n, start = int(seq_lens[b]), int(start_pos[b])
        kv = _seq_latent(kv_layer, block_tables[b], n, kv_lora_rank)
        qpos = torch.arange(start, start + hi - lo, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
        out[lo:hi] = _mla_attend(q[lo:hi], kv, scale, kv_lora_rank, mask).to(q.dtype)
    return out
