"""Triton paged attention: decode (one query per sequence, split-K over the context) and prefill with a cached
prefix (flash-attention over the pages: full over the prefix, causal over the new tokens).

Same signatures and semantics as :mod:`dualpath.kernels.reference`. Pages are gathered per token through the
block table, so any block size works and tiles may span pages; block ids are widened to int64 before they
are multiplied by strides (large pools do not overflow). Softmax runs in fp32 (exp2 domain).
Under ``TRITON_INTERPRET=1`` dot operands are cast to fp32 (the interpreter's bf16 dot is wrong).
``softcap`` (Gemma 2): scores ``softcap * tanh(scale * q.k / softcap)`` before the mask, as the torch reference.
``window`` (a sliding attention window): a query at position ``p`` sees keys ``p - window + 1 .. p`` only; ``chunk``
(Llama 4's chunked attention): only the keys of its own chunk, ``p // chunk * chunk .. p``. Both give each query a
first visible key, non-decreasing in ``p``: decode starts each sequence's scan there; prefill starts each query
tile's scan at its first row's and masks the rest (a row whose keys in a tile are all masked keeps its running
max: no NaN).
``alibi`` (Bloom, ``[Hq]`` slopes, fp32): ``slope[h] * (key position - query position)`` added to each score, in the
exp2 domain, after the scale and any cap, as the torch reference; ``alibi_bf16`` (Falcon): ``bf16(slope[h] *
bf16(key position))`` times the scale instead, rounded as the reference rounds it (``_bf16``).
``sinks`` (gpt-oss, ``[Hq]``, fp32): an extra per-head logit in the softmax denominator that weights no value,
added by decode's split reduction and at prefill's final normalisation (rescaled to ``max(m, sink)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualpath.errors import KernelError
from dualpath.kernels._checks import (
    INT_DTYPES,
    check_kv_layer,
    check_shape,
    check_sinks,
    check_tensor,
    check_window,
    interpreting,
    next_pow2,
)

LOG2E = 1.4426950408889634


@triton.jit
def _softcap(s, cap):
    """``cap * tanh(s / cap)`` (tanh as ``1 - 2 / (exp(2x) + 1)``: exact at both tails, no tl.tanh in Triton)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * (s / cap)) + 1.0))


@triton.jit
def _bf16(x):
    """``x`` (finite fp32) rounded to bfloat16 (to nearest, ties to even, as torch rounds) and back: Falcon's ALiBi
    precision. On the bits: Triton's interpreter truncates in ``.to(tl.bfloat16)``."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, table_ptr, lens_ptr, o_ptr, lse_ptr, alibi_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kkv, stride_kh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    qk_scale, softcap, window, chunk, alibi_scale,
    G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, PARTITION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIBI: tl.constexpr, ALIBI_BF16: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    hi = tl.minimum(split * PARTITION + PARTITION, seq_len)
    lo = tl.maximum(split * PARTITION, seq_len - window)  # window: the sliding window, or >= every length
    lo = tl.maximum(lo, (seq_len - 1) // chunk * chunk)  # chunk: the query's own chunk, or >= every length
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < G
    dmask = d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if ALIBI:  # each head's slope, in the exp2 domain (Falcon's: as given, scaled after its rounding)
        slope = tl.load(alibi_ptr + heads, mask=gmask, other=0.0)
        if not ALIBI_BF16:
            slope = slope * 1.4426950408889634
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = table_ptr + b.to(tl.int64) * stride_tb
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        blk = tl.load(table_row + t // BT, mask=tmask, other=0).to(tl.int64)
        row = blk * stride_kb + (t % BT).to(tl.int64) * stride_kt + kvh * stride_kh
        ld_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=ld_mask, other=0.0)
        v = tl.load(kv_ptr + row[:, None] + stride_kkv + d[None, :], mask=ld_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SOFTCAP:
            s = _softcap(s, softcap) * 1.4426950408889634
        if ALIBI_BF16:  # Falcon: bf16(slope * bf16(key position)), then the scores' scale
            s = s + _bf16(slope[:, None] * _bf16(t.to(tl.float32))[None, :]) * alibi_scale
        elif ALIBI:  # slope * (key position - query position), the query at seq_len - 1
            s = s + slope[:, None] * (t - (seq_len - 1)).to(tl.float32)[None, :]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
             out, mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    po_ptr, lse_ptr, out_ptr, sinks_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    NUM_SPLITS, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    if SINKS:  # the sink's logit (log2 domain) joins the max and the denominator, weighting no value
        sink = tl.load(sinks_ptr + h) * 1.4426950408889634
        m = tl.maximum(m, sink)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    po = tl.load(po_ptr + b.to(tl.int64) * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                 mask=smask[:, None] & (d[None, :] < D), other=0.0)
    den = tl.sum(w, 0)
    if SINKS:
        den = den + tl.exp2(sink - m)
    out = tl.sum(po * w[:, None], 0) / den
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """The kernels' ``(qk_scale, softcap)``: scores in the exp2 domain (``scale * log2 e``), or with a soft cap the
    natural scale (the kernel caps, then multiplies by ``log2 e``)."""
    if softcap is None:
        return float(scale) * LOG2E, 1.0
    if not softcap > 0:
        raise KernelError(f"softcap must be positive, got {softcap}")
    return float(scale), float(softcap)


def _window_arg(window: int | None, name: str = "window") -> int:
    """The kernels' ``window`` (or ``chunk``) argument: the window, or a bound above every sequence length (none)."""
    window = check_window(window, name)
    return 1 << 30 if window is None else min(window, 1 << 30)


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, partition: int | None = None,
                           block_n: int | None = None, softcap: float | None = None,
                           window: int | None = None, sinks: torch.Tensor | None = None,
                           alibi: torch.Tensor | None = None, alibi_bf16: bool = False,
                           chunk: int | None = None) -> torch.Tensor:
    """Triton paged decode. ``q [B, Hq, D]``, ``kv_layer [NB, bt, 2, Hkv, D]``, ``block_tables [B, max_blocks]``,
    ``seq_lens [B]`` (each >= 1), ``sinks [Hq]`` or None, ``alibi [Hq]`` slopes or None -> ``[B, Hq, D]`` in
    ``q``'s dtype."""
    kv = check_kv_layer(kv_layer)
    dev = kv.device
    q = check_tensor("q", q, dim=3, dtypes=(kv.dtype,), device=dev, last_contiguous=True)
    nb, bt, _, hkv, d = kv.shape
    bsz, hq, _ = q.shape
    check_shape("q", q, (None, None, d))
    if hq % hkv:
        raise KernelError(f"q has {hq} heads, not a multiple of kv_layer's {hkv} KV heads")
    tables = check_tensor("block_tables", block_tables, dim=2, dtypes=INT_DTYPES, device=dev, last_contiguous=True)
    check_shape("block_tables", tables, (bsz, None))
    lens = check_tensor("seq_lens", seq_lens, dim=1, dtypes=INT_DTYPES, device=dev)
    check_shape("seq_lens", lens, (bsz,))
    lens = lens.contiguous()
    sinks = check_sinks(sinks, hq, dev)
    alibi = check_sinks(alibi, hq, dev, "alibi")
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    g = hq // hkv
    interp = interpreting()
    block_n = block_n or (128 if interp else 64)
    max_len = tables.shape[1] * bt
    partition = partition or (max(block_n, 1 << 14) if interp else 512)
    partition = -(-partition // block_n) * block_n
    splits = max(1, -(-max_len // partition))
    po = torch.empty((bsz, hq, splits, d), dtype=torch.float32, device=dev)
    lse = torch.empty((bsz, hq, splits), dtype=torch.float32, device=dev)
    block_d = next_pow2(d)
    prec = "ieee" if kv.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(bsz, hkv, splits)](
        q, kv, tables, lens, po, lse, lse if alibi is None else alibi.float().contiguous(),
        q.stride(0), q.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        tables.stride(0),
        po.stride(0), po.stride(1), po.stride(2),
        lse.stride(0), lse.stride(1),
        *_scales(scale, softcap), _window_arg(window), _window_arg(chunk, "chunk"), float(scale) * LOG2E,
        G=g, D=d, BT=bt, PARTITION=partition, SOFTCAP=softcap is not None,
        BLOCK_G=max(16, next_pow2(g)), BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_FP32=interp, PREC=prec, ALIBI=alibi is not None, ALIBI_BF16=alibi is not None and alibi_bf16,
        **({} if interp else {"num_warps": 4, "num_stages": 2}),
    )
    _decode_reduce_kernel[(bsz, hq)](
        po, lse, out, lse if sinks is None else sinks.float().contiguous(),
        po.stride(0), po.stride(1), po.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        splits, D=d, BLOCK_S=next_pow2(splits), BLOCK_D=block_d, SINKS=sinks is not None,
    )
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, kv_ptr, table_ptr, cu_ptr, lens_ptr, start_ptr, o_ptr, sinks_ptr, alibi_ptr,
    stride_qn, stride_qh,
    stride_kb, stride_kt, stride_kkv, stride_kh,
    stride_tb,
    stride_on, stride_oh,
    qk_scale, softcap, window, chunk, alibi_scale,
    G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
    SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr, ALIBI: tl.constexpr, ALIBI_BF16: tl.constexpr,
    PACK: tl.constexpr,
):
    # A program computes BLOCK_M rows: TM = BLOCK_M // PACK new tokens x PACK query heads of one KV head (row r is
    # token r // PACK, head r % PACK of the group), so the group's heads share each K/V tile it loads.
    TM: tl.constexpr = BLOCK_M // PACK
    mblk = tl.program_id(0)
    b = tl.program_id(1)
    h0 = tl.program_id(2) * PACK
    kvh = h0 // G
    q0 = tl.load(cu_ptr + b).to(tl.int32)
    n_new = tl.load(cu_ptr + b + 1).to(tl.int32) - q0
    if mblk * TM < n_new:
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        start = tl.load(start_ptr + b).to(tl.int32)
        r = tl.arange(0, BLOCK_M)
        rows = mblk * TM + r // PACK  # each row's new-token index
        heads = h0 + r % PACK
        rmask = (rows < n_new) & (r < TM * PACK)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        qrow = (q0 + rows).to(tl.int64)
        q = tl.load(q_ptr + qrow[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        qpos = start + rows
        slope = tl.zeros([BLOCK_M], tl.float32)
        if ALIBI:  # each row's head's slope, in the exp2 domain (Falcon's: as given, scaled after its rounding)
            slope = tl.load(alibi_ptr + heads)
            if not ALIBI_BF16:
                slope = slope * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = table_ptr + b.to(tl.int64) * stride_tb
        # keys before the tile's first query are visible to every row: no causal mask there
        full_end = ((start + mblk * TM) // BLOCK_N) * BLOCK_N
        end = tl.minimum(seq_len, start + (mblk + 1) * TM)
        first = 0
        if WINDOW:  # keys below the tile's first row's window (or chunk) are visible to no row of the tile
            q_first = start + mblk * TM
            low = tl.maximum(tl.maximum(q_first - window + 1, 0), q_first // chunk * chunk)
            first = (low // BLOCK_N) * BLOCK_N
        lower = qpos - window + 1  # each row's first visible key (window and chunk; used with WINDOW)
        lower = tl.maximum(lower, qpos // chunk * chunk)
        for kstart in range(first, full_end, BLOCK_N):
            t = kstart + tl.arange(0, BLOCK_N)
            blk = tl.load(table_row + t // BT).to(tl.int64)
            row = blk * stride_kb + (t % BT).to(tl.int64) * stride_kt + kvh * stride_kh
            k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=dmask[None, :], other=0.0)
            v = tl.load(kv_ptr + row[:, None] + stride_kkv + d[None, :], mask=dmask[None, :], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if SOFTCAP:
                s = _softcap(s, softcap) * 1.4426950408889634
            if ALIBI_BF16:
                s = s + _bf16(slope[:, None] * _bf16(t.to(tl.float32))[None, :]) * alibi_scale
            elif ALIBI:
                s = s + slope[:, None] * (t[None, :] - qpos[:, None]).to(tl.float32)
            if WINDOW:
                s = tl.where(t[None, :] >= lower[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if WINDOW:  # a row with no visible key yet: exp2(-inf - -inf) would be NaN
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        for kstart in range(tl.maximum(full_end, first), end, BLOCK_N):
            t = kstart + tl.arange(0, BLOCK_N)
            tmask = t < end
            blk = tl.load(table_row + t // BT, mask=tmask, other=0).to(tl.int64)
            row = blk * stride_kb + (t % BT).to(tl.int64) * stride_kt + kvh * stride_kh
            ld = tmask[:, None] & dmask[None, :]
            k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=ld, other=0.0)
            v = tl.load(kv_ptr + row[:, None] + stride_kkv + d[None, :], mask=ld, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if SOFTCAP:
                s = _softcap(s, softcap) * 1.4426950408889634
            if ALIBI_BF16:
                s = s + _bf16(slope[:, None] * _bf16(t.to(tl.float32))[None, :]) * alibi_scale
            elif ALIBI:
                s = s + slope[:, None] * (t[None, :] - qpos[:, None]).to(tl.float32)
            vis = (t[None, :] <= qpos[:, None]) & tmask[None, :]
            if WINDOW:
                vis = vis & (t[None, :] >= lower[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if WINDOW:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        if SINKS:  # the sink's logit joins the denominator: rescale everything to max(m_i, sink) first
            sink = tl.load(sinks_ptr + heads) * 1.4426950408889634
            m_f = tl.maximum(m_i, sink)
            m_f = tl.where(m_f == float("-inf"), 0.0, m_f)  # no visible key and a -inf sink
            alpha = tl.exp2(m_i - m_f)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha + tl.exp2(sink - m_f)
        if WINDOW:  # padding rows past the tile's last query may see no key at all
            l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(o_ptr + qrow[:, None] * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, start_pos: torch.Tensor,
                            scale: float, *, block_m: int | None = None, block_n: int | None = None,
                            softcap: float | None = None, window: int | None = None,
                            sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
                            alibi_bf16: bool = False, chunk: int | None = None,
                            heads_per_program: int | None = None) -> torch.Tensor:
    """Triton prefill with a cached prefix (``sinks [Hq]`` or None, ``alibi [Hq]`` slopes or None); see
    :func:`dualpath.kernels.reference.paged_prefill_attention`.

    ``heads_per_program``: query heads of one KV head computed by one program (a divisor of Hq / Hkv; ``block_m``
    rows are then ``block_m // heads_per_program`` tokens x those heads, which share each K/V tile loaded). Default:
    1 on a GPU (one head per program, as measured there), all of a KV head's query heads in Triton's interpreter,
    whose cost is per program."""
    kv = check_kv_layer(kv_layer)
    dev = kv.device
    q = check_tensor("q", q, dim=3, dtypes=(kv.dtype,), device=dev, last_contiguous=True)
    nb, bt, _, hkv, d = kv.shape
    ntok, hq, _ = q.shape
    check_shape("q", q, (None, None, d))
    if hq % hkv:
        raise KernelError(f"q has {hq} heads, not a multiple of kv_layer's {hkv} KV heads")
    tables = check_tensor("block_tables", block_tables, dim=2, dtypes=INT_DTYPES, device=dev, last_contiguous=True)
    bsz = tables.shape[0]
    cu = check_tensor("cu_seqlens_q", cu_seqlens_q, dim=1, dtypes=INT_DTYPES, device=dev).contiguous()
    check_shape("cu_seqlens_q", cu, (bsz + 1,))
    lens = check_tensor("seq_lens", seq_lens, dim=1, dtypes=INT_DTYPES, device=dev).contiguous()
    check_shape("seq_lens", lens, (bsz,))
    starts = check_tensor("start_pos", start_pos, dim=1, dtypes=INT_DTYPES, device=dev).contiguous()
    check_shape("start_pos", starts, (bsz,))
    sinks = check_sinks(sinks, hq, dev)
    alibi = check_sinks(alibi, hq, dev, "alibi")
    out = torch.empty_like(q)
    if ntok == 0 or bsz == 0:
        return out
    cu_host = cu.tolist()
    if cu_host[0] != 0 or cu_host[-1] != ntok or any(a > b for a, b in zip(cu_host, cu_host[1:], strict=False)):
        raise KernelError(f"cu_seqlens_q must rise from 0 to q.shape[0]={ntok}, got {cu_host}")
    max_new = max(b - a for a, b in zip(cu_host, cu_host[1:], strict=False))
    interp = interpreting()
    block_d = next_pow2(d)
    group = hq // hkv
    pack = heads_per_program or (group if interp else 1)
    if pack <= 0 or group % pack:
        raise KernelError(f"heads_per_program must divide the {group} query heads per KV head, got {pack}")
    if interp:
        block_m = block_m or max(16, min(128, next_pow2(max_new * pack)))
        block_n = block_n or 64
    else:
        block_m = block_m or (128 if block_d <= 64 else 64)
        block_n = block_n or (64 if block_d <= 128 else 32)
    if block_m < pack:
        raise KernelError(f"block_m ({block_m}) must hold at least heads_per_program ({pack}) rows")
    prec = "ieee" if kv.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_new, block_m // pack), bsz, hq // pack)
    _prefill_kernel[grid](
        q, kv, tables, cu, lens, starts, out, out if sinks is None else sinks.float().contiguous(),
        out if alibi is None else alibi.float().contiguous(),
        q.stride(0), q.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        tables.stride(0),
        out.stride(0), out.stride(1),
        *_scales(scale, softcap), _window_arg(window), _window_arg(chunk, "chunk"), float(scale) * LOG2E,
        G=hq // hkv, D=d, BT=bt, SOFTCAP=softcap is not None, WINDOW=window is not None or chunk is not None,
        SINKS=sinks is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_FP32=interp, PREC=prec, ALIBI=alibi is not None, ALIBI_BF16=alibi is not None and alibi_bf16,
        PACK=pack, **({} if interp else {"num_warps": 4 if block_d <= 64 else 8, "num_stages": 2}),
    )
    return out
