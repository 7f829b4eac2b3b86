"""Triton absorbed MLA attention over paged latent KV: decode and prefill-with-prefix in one kernel.

Every head of every new token is one *row* of the query matrix (``row = token * H + head``), and all rows of a
sequence attend to the same latent rows (MQA): key = ``[c, k_rot]`` (``R + P`` wide), value = ``c`` (``R`` wide).
A program owns ``BLOCK_M`` rows of one sequence and walks its pages through the block table, flash-attention
style (online softmax in the exp2 domain, fp32 accumulators); a row at position ``pos`` sees keys ``<= pos``
(decode: the whole context). Pages are plain ``[NB, bt, R + P]`` float rows or FP8 latent rows (``uint8``:
``R`` e4m3 bytes, ``R / 128`` fp32 scales, ``P`` bf16), dequantized in registers (the e4m3 decode is done with
integer ops, exact on every backend). Same signatures as :mod:`dualpath.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualpath.errors import KernelError
from dualpath.kernels._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_shape,
    check_tensor,
    interpreting,
    next_pow2,
)

LOG2E = 1.4426950408889634
FP8_TILE = 128


@triton.jit
def _e4m3_to_f32(x):
    """float8_e4m3fn bytes (uint8) -> fp32, with integer ops (no fp8 cast: exact in the interpreter too)."""
    b = x.to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, m * 0.001953125, (m + 8.0) * tl.exp2((e - 10).to(tl.float32)))
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def _mla_attn_kernel(
    q_ptr, kv_ptr, kvf_ptr, kvh_ptr, table_ptr, cu_ptr, lens_ptr, start_ptr, o_ptr, lse_ptr,
    stride_qn, stride_qh, stride_on, stride_oh, stride_os, stride_ln, stride_lh,
    stride_kb, stride_kt, stride_tb,
    qk_scale, PARTITION,
    H: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, FP8: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    PREC: tl.constexpr, LOWP: tl.constexpr, NATIVE_FP8: tl.constexpr,
):
    b = tl.program_id(0)
    mt = tl.program_id(1)
    split = tl.program_id(2)
    q_lo = tl.load(cu_ptr + b).to(tl.int32)
    n_new = tl.load(cu_ptr + b + 1).to(tl.int32) - q_lo
    if mt * BLOCK_M < n_new * H:
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
        start = tl.load(start_ptr + b).to(tl.int32)
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_new * H
        tok = rows // H
        head = rows % H
        qpos = start + tok
        r = tl.arange(0, BLOCK_R)
        p = tl.arange(0, BLOCK_P)
        rm = r < R
        pm = p < P
        qrow = (q_lo + tok).to(tl.int64) * stride_qn + head.to(tl.int64) * stride_qh
        q_lat = tl.load(q_ptr + qrow[:, None] + r[None, :], mask=rmask[:, None] & rm[None, :], other=0.0)
        q_rot = tl.load(q_ptr + qrow[:, None] + R + p[None, :], mask=rmask[:, None] & pm[None, :], other=0.0)
        if LOWP:  # bf16 tensor-core dots (GPU, bf16/FP8 pages); fp32 accumulators either way
            q_lat = q_lat.to(tl.bfloat16)
            q_rot = q_rot.to(tl.bfloat16)
        else:
            q_lat = q_lat.to(tl.float32)
            q_rot = q_rot.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        last_tok = tl.minimum(mt * BLOCK_M + BLOCK_M - 1, n_new * H - 1) // H
        hi = tl.minimum(seq_len, start + last_tok + 1)
        lo = 0
        if SPLIT:  # decode split-K: this program's share of the context (partial result + log-sum-exp)
            lo = split * PARTITION
            hi = tl.minimum(hi, lo + PARTITION)
        table_row = table_ptr + b.to(tl.int64) * stride_tb
        for k0 in range(lo, hi, BLOCK_N):
            t = k0 + tl.arange(0, BLOCK_N)
            tmask = t < hi
            blk = tl.load(table_row + t // BT, mask=tmask, other=0).to(tl.int64)
            row = blk * stride_kb + (t % BT).to(tl.int64) * stride_kt   # element (byte, for FP8) offset of the row
            if FP8:
                raw = tl.load(kv_ptr + row[:, None] + r[None, :], mask=tmask[:, None] & rm[None, :], other=0)
                sc = tl.load(kvf_ptr + (row // 4 + R // 4)[:, None] + (r // 128)[None, :],
                             mask=tmask[:, None] & rm[None, :], other=0.0)
                if NATIVE_FP8:  # the GPU's own e4m3 conversion (exact: every e4m3 value is an fp32 value)
                    c = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sc
                else:
                    c = _e4m3_to_f32(raw) * sc
                kr = tl.load(kvh_ptr + (row // 2 + R // 2 + (R // 128) * 2)[:, None] + p[None, :],
                             mask=tmask[:, None] & pm[None, :], other=0.0).to(tl.float32)
            else:
                c = tl.load(kv_ptr + row[:, None] + r[None, :], mask=tmask[:, None] & rm[None, :],
                            other=0.0).to(tl.float32)
                kr = tl.load(kv_ptr + row[:, None] + R + p[None, :], mask=tmask[:, None] & pm[None, :],
                             other=0.0).to(tl.float32)
            if LOWP:
                c = c.to(tl.bfloat16)
                kr = kr.to(tl.bfloat16)
            s = tl.dot(q_lat, tl.trans(c), input_precision=PREC) + tl.dot(q_rot, tl.trans(kr), input_precision=PREC)
            s = s * qk_scale
            ok = tmask[None, :] & (t[None, :] <= qpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            pr = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None] + tl.dot(pr.to(c.dtype), c, input_precision=PREC)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        orow = (q_lo + tok).to(tl.int64) * stride_on + head.to(tl.int64) * stride_oh + split * stride_os
        tl.store(o_ptr + orow[:, None] + r[None, :], out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & rm[None, :])
        if SPLIT:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            lrow = (q_lo + tok).to(tl.int64) * stride_ln + head.to(tl.int64) * stride_lh + split
            tl.store(lse_ptr + lrow, lse, mask=rmask)


@triton.jit
def _split_reduce_kernel(po_ptr, lse_ptr, out_ptr, stride_pn, stride_ph, stride_ps, stride_ln, stride_lh,
                         stride_on, stride_oh, NUM_SPLITS, R: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    r = tl.arange(0, BLOCK_R)
    smask = s < NUM_SPLITS
    lse = tl.load(lse_ptr + n * stride_ln + h * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    po = tl.load(po_ptr + n * stride_pn + h * stride_ph + s[:, None] * stride_ps + r[None, :],
                 mask=smask[:, None] & (r[None, :] < R), other=0.0)
    out = tl.sum(po * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + n * stride_on + h * stride_oh + r, out.to(out_ptr.dtype.element_ty), mask=r < R)


def _check_latent_pages(kv_layer: object, kv_lora_rank: int) -> tuple[torch.Tensor, int, bool]:
    kv = check_tensor("kv_layer", kv_layer, dim=3, dtypes=(*FLOAT_DTYPES, torch.uint8), last_contiguous=True)
    r = int(kv_lora_rank)
    if r <= 0:
        raise KernelError(f"kv_lora_rank must be positive, got {r}")
    fp8 = kv.dtype == torch.uint8
    if fp8:
        if r % FP8_TILE:
            raise KernelError(f"FP8 latent pages need kv_lora_rank divisible by {FP8_TILE}, got {r}")
        rope2 = kv.shape[2] - r - 4 * (r // FP8_TILE)
        if rope2 <= 0 or rope2 % 4:
            raise KernelError(f"kv_layer rows of {kv.shape[2]} bytes are not FP8 latent rows for kv_lora_rank {r}")
        p = rope2 // 2
        if kv.stride(0) % 4 or kv.stride(1) % 4 or kv.storage_offset() % 4:
            raise KernelError("FP8 latent pages must be 4-byte aligned (block and row strides)")
    else:
        p = kv.shape[2] - r
        if p <= 0:
            raise KernelError(f"kv_layer rows of {kv.shape[2]} values leave no RoPE part after kv_lora_rank {r}")
    return kv, p, fp8


def _native_fp8(dev: torch.device) -> bool:
    """The device converts e4m3 in hardware (compute capability 8.9 and up; not in the interpreter)."""
    return dev.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(dev) >= (8, 9)


# (block_m, block_n, num_warps, num_stages) measured fastest on an H200 (benchmarks/gpu_mla_sweep.py, 128 heads,
# latent 512 + 64): bf16 pages 2.45x the previous (32, 32, 8, 2) for decode and 2.48x for prefill; FP8 pages
# 2.16x ((64, 64, 8, 2) needs 312 KiB of shared memory there). They need Hopper's shared memory per block.
_TUNED_16BIT = (64, 64, 8, 2)
_TUNED_FP8 = (64, 64, 8, 1)
_TUNED_MIN_SMEM = 227 * 1024


def _tuned_settings(dev: torch.device, dtype: torch.dtype, fp8: bool) -> tuple[int, int, int, int] | None:
    """The measured settings where they fit (16-bit and FP8 pages on a card with Hopper's shared memory)."""
    if dev.type != "cuda" or not (fp8 or dtype in (torch.bfloat16, torch.float16)):
        return None
    props = torch.cuda.get_device_properties(dev)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if smem < _TUNED_MIN_SMEM:
        return None
    return _TUNED_FP8 if fp8 else _TUNED_16BIT


def _launch(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, cu: torch.Tensor,
            seq_lens: torch.Tensor, start_pos: torch.Tensor, scale: float, kv_lora_rank: int, max_new: int,
            block_m: int | None, block_n: int | None, partition: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    kv, p, fp8 = _check_latent_pages(kv_layer, kv_lora_rank)
    dev = kv.device
    r = int(kv_lora_rank)
    q = check_tensor("q", q, dim=3, dtypes=FLOAT_DTYPES, device=dev, last_contiguous=True)
    check_shape("q", q, (None, None, r + p))
    bsz = int(block_tables.shape[0])
    tables = check_tensor("block_tables", block_tables, dim=2, dtypes=INT_DTYPES, device=dev, last_contiguous=True)
    lens = check_tensor("seq_lens", seq_lens, dim=1, dtypes=INT_DTYPES, device=dev)
    check_shape("seq_lens", lens, (bsz,))
    h = int(q.shape[1])
    out = torch.empty((q.shape[0], h, r), dtype=q.dtype, device=dev)
    if bsz == 0 or q.shape[0] == 0:
        return out
    interp = interpreting()
    tuned = _tuned_settings(dev, kv.dtype, fp8) if not interp else None
    if tuned is not None:  # measured on an H200 (benchmarks/gpu_mla_sweep.py), for cards with as much shared memory
        block_m = block_m or tuned[0]
        block_n = block_n or tuned[1]
        num_warps = num_warps or tuned[2]
        num_stages = num_stages or tuned[3]
    block_m = block_m or (16 if interp else 32)
    block_n = block_n or (32 if interp else 32)
    block_r, block_p = next_pow2(max(r, 16)), next_pow2(max(p, 16))
    kvf = kv.view(torch.float32) if fp8 else kv
    kvh = kv.view(torch.bfloat16) if fp8 else kv
    mtiles = triton.cdiv(max_new * h, block_m)
    max_len = int(tables.shape[1]) * int(kv.shape[1])
    splits = 1
    if max_new == 1:  # decode: split the context when (sequences x row tiles) would leave the GPU idle
        if partition is None and not interp and dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            want = -(-2 * sms // (bsz * mtiles))
            partition = -(-max_len // max(1, min(want, max_len // 256)))
        if partition is not None:
            partition = -(-int(partition) // block_n) * block_n
            splits = max(1, -(-max_len // partition))
    split = splits > 1
    po = torch.empty((q.shape[0], h, splits, r), dtype=torch.float32, device=dev) if split else out
    lse = torch.empty((q.shape[0], h, splits), dtype=torch.float32, device=dev) if split else out
    _mla_attn_kernel[(bsz, mtiles, splits)](
        q, kv, kvf, kvh, tables, cu.contiguous(), lens.contiguous(), start_pos.contiguous(), po, lse,
        q.stride(0), q.stride(1), po.stride(0), po.stride(1), po.stride(2) if split else 0,
        lse.stride(0) if split else 0, lse.stride(1) if split else 0,
        kv.stride(0), kv.stride(1), tables.stride(0),
        float(scale) * LOG2E, int(partition or max_len),
        H=h, R=r, P=p, BT=int(kv.shape[1]), FP8=fp8, SPLIT=split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=block_p,
        PREC="ieee" if interp else "tf32", LOWP=(not interp) and kv.dtype != torch.float32,
        NATIVE_FP8=fp8 and _native_fp8(dev),
        # 512-wide tiles: keep shared memory in bounds
        **({} if interp else {"num_warps": num_warps or 8, "num_stages": num_stages or 2}),
    )
    if split:
        _split_reduce_kernel[(q.shape[0], h)](
            po, lse, out, po.stride(0), po.stride(1), po.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), splits, R=r, BLOCK_S=next_pow2(splits), BLOCK_R=block_r,
        )
    return out


def mla_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, kv_lora_rank: int, *, block_m: int | None = None,
                         block_n: int | None = None, partition: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None) -> torch.Tensor:
    """``q [B, H, R + P]`` over each sequence's ``seq_lens[b]`` latent rows -> ``[B, H, R]`` in ``q``'s dtype.
    ``partition``: keys per split-K program (default on CUDA: enough splits to fill the GPU; none otherwise);
    ``block_m`` / ``block_n`` / ``num_warps`` / ``num_stages``: tile and launch settings (GPU tuning)."""
    bsz = int(q.shape[0])
    dev = q.device
    cu = torch.arange(bsz + 1, dtype=torch.int32, device=dev)
    lens = seq_lens.to(torch.int32)
    return _launch(q, kv_layer, block_tables, cu, lens, lens - 1, scale, kv_lora_rank, 1, block_m, block_n,
                   partition, num_warps, num_stages)


def mla_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, start_pos: torch.Tensor, scale: float,
                          kv_lora_rank: int, *, block_m: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """New tokens' ``q [Ntok, H, R + P]`` over the cached latent prefix (full) and the new rows (causal)."""
    cu = check_tensor("cu_seqlens_q", cu_seqlens_q, dim=1, dtypes=INT_DTYPES, device=q.device)
    check_shape("cu_seqlens_q", cu, (int(block_tables.shape[0]) + 1,))
    max_new = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return _launch(q, kv_layer, block_tables, cu.to(torch.int32), seq_lens, start_pos.to(torch.int32), scale,
                   kv_lora_rank, max_new, block_m, block_n, num_warps=num_warps, num_stages=num_stages)
