"""Triton kernels of the FP8 latent KV format and the latent store.

An FP8 latent row (FlashMLA's "FP8 with scale" layout; 656 bytes for ``R = 512``, ``P = 64``): ``R``
float8_e4m3fn values, ``R / 128`` fp32 scales (value = fp8 * scale, ``scale = amax(|tile|) / 448``), then ``P``
bfloat16 RoPE values. The e4m3 encode (round to nearest even, saturating at 448) and decode are integer/bit
operations rather than fp8 casts, and the divisions correctly rounded (``tl.div_rn``), so the bytes are identical
on GPU, in the interpreter and in the torch reference.
Same signatures as :mod:`dualpath.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dualpath.errors import KernelError
from dualpath.kernels._checks import FLOAT_DTYPES, check_shape, check_tensor, next_pow2
from dualpath.kernels.mla_attention import FP8_TILE, _e4m3_to_f32

FP8_MAX = 448.0


@triton.jit
def _f32_to_e4m3(y):
    """fp32 in [-448, 448] -> float8_e4m3fn bytes (int32 0..255), round to nearest even."""
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 255) - 127, -6)                    # exponent of |y| (subnormal floor -6)
    x = a * tl.exp2((3 - e).to(tl.float32))                           # exact: a power-of-two scaling
    fl = tl.floor(x)
    frac = x - fl
    odd = (fl.to(tl.int32) & 1) == 1
    q = fl.to(tl.int32) + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1, 0)
    code = ((e + 6) << 3) + q                                         # a mantissa carry bumps the exponent
    code = tl.minimum(code, 126)                                      # saturate at 448 (0x7E)
    return tl.where(y < 0, code | 128, code)


@triton.jit
def _f32_to_bf16_bits(x):
    """fp32 -> bfloat16 bits (int16), round to nearest even (the interpreter's bf16 cast truncates)."""
    b = x.to(tl.int32, bitcast=True)
    r = (b + 32767 + ((b >> 16) & 1)) >> 16
    return r.to(tl.int16)


@triton.jit
def _store_latent_kernel(
    x_ptr, kv_ptr, kvf_ptr, kvh_ptr, slot_ptr, out_ptr, stride_x, stride_kb, stride_kt, NB,
    R: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, FP8: tl.constexpr, TO_ROWS: tl.constexpr,
    NS: tl.constexpr, BLOCK_NS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    if TO_ROWS:   # quantize into a dense [N, row_bytes] output
        ok = n >= 0
        row = n * stride_kb
    else:         # store into pages at the token's slot
        slot = tl.load(slot_ptr + n).to(tl.int64)
        ok = (slot >= 0) & (slot // BT < NB)
        safe = tl.maximum(slot, 0)
        row = (safe // BT) * stride_kb + (safe % BT) * stride_kt
    xrow = x_ptr + n * stride_x
    if FP8:
        s = tl.arange(0, BLOCK_NS)
        c = tl.arange(0, 128)
        smask = (s < NS) & ok
        idx = s[:, None] * 128 + c[None, :]
        x = tl.load(xrow + idx, mask=smask[:, None], other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        # correctly rounded divisions (div_rn): Triton's ``/`` is an approximate division on CUDA (div.full.f32),
        # which made the scales and codes differ from the reference's by an ulp
        scale = tl.where(amax > 0.0, tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None] + tl.zeros_like(x)), -448.0), 448.0)
        tl.store(kv_ptr + row + idx, _f32_to_e4m3(y).to(tl.uint8), mask=smask[:, None])
        tl.store(kvf_ptr + row // 4 + R // 4 + s, scale, mask=smask)
        p = tl.arange(0, BLOCK_P)
        pm = (p < P) & ok
        rope = tl.load(xrow + R + p, mask=pm, other=0.0).to(tl.float32)
        tl.store(kvh_ptr + row // 2 + R // 2 + NS * 2 + p, _f32_to_bf16_bits(rope), mask=pm)
    else:
        w = tl.arange(0, BLOCK_W)
        wm = (w < R + P) & ok
        v = tl.load(xrow + w, mask=wm, other=0.0)
        tl.store(kv_ptr + row + w, v.to(kv_ptr.dtype.element_ty), mask=wm)


@triton.jit
def _dequant_kernel(
    rows_ptr, rowsf_ptr, rowsh_ptr, out_ptr, stride_r, stride_o,
    R: tl.constexpr, P: tl.constexpr, NS: tl.constexpr, BLOCK_NS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row = n * stride_r
    s = tl.arange(0, BLOCK_NS)
    c = tl.arange(0, 128)
    smask = s < NS
    idx = s[:, None] * 128 + c[None, :]
    raw = tl.load(rows_ptr + row + idx, mask=smask[:, None], other=0)
    scale = tl.load(rowsf_ptr + row // 4 + R // 4 + s, mask=smask, other=0.0)
    val = _e4m3_to_f32(raw) * scale[:, None]
    tl.store(out_ptr + n * stride_o + idx, val.to(out_ptr.dtype.element_ty), mask=smask[:, None])
    p = tl.arange(0, BLOCK_P)
    pm = p < P
    rope = tl.load(rowsh_ptr + row // 2 + R // 2 + NS * 2 + p, mask=pm, other=0.0)
    tl.store(out_ptr + n * stride_o + R + p, rope.to(out_ptr.dtype.element_ty), mask=pm)


def _row_bytes(r: int, p: int) -> int:
    return r + 4 * (r // FP8_TILE) + 2 * p


def _check_rank(r: int) -> None:
    if r <= 0 or r % FP8_TILE:
        raise KernelError(f"the FP8 latent format needs kv_lora_rank divisible by {FP8_TILE}, got {r}")


def store_latent(latent: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, kv_lora_rank: int) -> None:
    """Write latent rows ``[N, R + P]`` into pages ``[NB, bt, R + P]`` (float) or ``uint8 [NB, bt, row_bytes]``
    (quantized to FP8 latent rows) at ``slot_mapping [N]`` (int64; negative = skip)."""
    kv = check_tensor("kv_layer", kv_layer, dim=3, dtypes=(*FLOAT_DTYPES, torch.uint8), last_contiguous=True)
    dev = kv.device
    x = check_tensor("latent", latent, dim=2, dtypes=FLOAT_DTYPES, device=dev, last_contiguous=True)
    r = int(kv_lora_rank)
    p = x.shape[1] - r
    fp8 = kv.dtype == torch.uint8
    if p <= 0:
        raise KernelError(f"latent of width {x.shape[1]} leaves no RoPE part after kv_lora_rank {r}")
    if fp8:
        _check_rank(r)
        if kv.shape[2] != _row_bytes(r, p):
            raise KernelError(f"kv_layer rows are {kv.shape[2]} bytes, FP8 latent rows of {r}+{p} are {_row_bytes(r, p)}")
        if kv.stride(0) % 4 or kv.stride(1) % 4 or kv.storage_offset() % 4:
            raise KernelError("FP8 latent pages must be 4-byte aligned")
    else:
        check_shape("kv_layer", kv, (None, None, r + p))
    slots = check_tensor("slot_mapping", slot_mapping, dim=1, dtypes=(torch.int64,), device=dev)
    check_shape("slot_mapping", slots, (x.shape[0],))
    if x.shape[0] == 0:
        return
    ns = r // FP8_TILE
    _store_latent_kernel[(x.shape[0],)](
        x, kv, kv.view(torch.float32) if fp8 else kv, kv.view(torch.int16) if fp8 else kv, slots.contiguous(), kv,
        x.stride(0), kv.stride(0), kv.stride(1), kv.shape[0],
        R=r, P=p, BT=kv.shape[1], FP8=fp8, TO_ROWS=False, NS=max(ns, 1), BLOCK_NS=next_pow2(max(ns, 1)),
        BLOCK_P=next_pow2(p), BLOCK_W=next_pow2(r + p),
    )


def quantize_latent_fp8(latent: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """``latent [N, R + P]`` -> FP8 latent rows ``uint8 [N, R + R / 32 + 2 P]``."""
    x = check_tensor("latent", latent, dim=2, dtypes=FLOAT_DTYPES, last_contiguous=True)
    r = int(kv_lora_rank)
    _check_rank(r)
    p = x.shape[1] - r
    if p <= 0 or p % 2:
        raise KernelError(f"latent of width {x.shape[1]}: the RoPE part after kv_lora_rank {r} must be even and > 0")
    out = torch.empty((x.shape[0], _row_bytes(r, p)), dtype=torch.uint8, device=x.device)
    if x.shape[0] == 0:
        return out
    ns = r // FP8_TILE
    _store_latent_kernel[(x.shape[0],)](
        x, out, out.view(torch.float32), out.view(torch.int16), x, out,
        x.stride(0), out.stride(0), 0, x.shape[0],
        R=r, P=p, BT=1, FP8=True, TO_ROWS=True, NS=ns, BLOCK_NS=next_pow2(ns), BLOCK_P=next_pow2(p),
        BLOCK_W=next_pow2(r + p),
    )
    return out


def dequantize_latent_fp8(rows: torch.Tensor, kv_lora_rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 latent rows ``uint8 [N, bytes]`` -> ``[N, R + P]`` of ``dtype``."""
    x = check_tensor("rows", rows, dim=2, dtypes=(torch.uint8,), last_contiguous=True)
    r = int(kv_lora_rank)
    _check_rank(r)
    ns = r // FP8_TILE
    p2 = x.shape[1] - r - 4 * ns
    if p2 <= 0 or p2 % 4 or x.stride(0) % 4 or x.storage_offset() % 4:
        raise KernelError(f"rows of {x.shape[1]} bytes are not 4-byte-aligned FP8 latent rows for kv_lora_rank {r}")
    p = p2 // 2
    out = torch.empty((x.shape[0], r + p), dtype=dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    _dequant_kernel[(x.shape[0],)](
        x, x.view(torch.float32), x.view(torch.bfloat16), out, x.stride(0), out.stride(0),
        R=r, P=p, NS=ns, BLOCK_NS=next_pow2(ns), BLOCK_P=next_pow2(p),
    )
    return out
