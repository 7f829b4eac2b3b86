"""Triton KV copies: store new tokens' K/V into pages by slot mapping, and gather/scatter Layer Blocks between a
pool layer and a contiguous staging buffer (DualPath's transfer unit). Same signatures as
:mod:`dualpath.kernels.reference`. Offsets are computed in int64; every load and store is masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dualpath.errors import KernelError
from dualpath.kernels._checks import (
    FLOAT_DTYPES,
    check_kv_layer,
    check_shape,
    check_tensor,
    interpreting,
    next_pow2,
)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slot_ptr, N,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_b, stride_t, stride_kv, stride_h, NB,
    H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's tokens
    slot = tl.load(slot_ptr + n, mask=n < N, other=-1).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    ok = (n < N) & (slot >= 0) & (slot // BT < NB)
    mask = ok[:, None, None] & (h < H) & (d < D)
    safe = tl.maximum(slot, 0)
    dst = kv_ptr + ((safe // BT) * stride_b + (safe % BT) * stride_t)[:, None, None] + h * stride_h + d
    n = n[:, None, None]
    k = tl.load(k_ptr + n * stride_kn + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + n * stride_vn + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, *,
             block_n: int | None = None) -> None:
    """Write ``k, v [N, Hkv, D]`` into ``kv_layer`` at ``slot_mapping [N]`` (int64, negative = skip).
    ``block_n``: tokens per program (a power of two; default one on a GPU, up to 64 in the interpreter, whose cost
    is per program rather than per element)."""
    kv = check_kv_layer(kv_layer)
    nb, bt, _, hkv, d = kv.shape
    k = check_tensor("k", k, dim=3, dtypes=FLOAT_DTYPES, device=kv.device, last_contiguous=True)
    v = check_tensor("v", v, dim=3, dtypes=FLOAT_DTYPES, device=kv.device, last_contiguous=True)
    check_shape("k", k, (None, hkv, d))
    check_shape("v", v, (k.shape[0], hkv, d))
    slots = check_tensor("slot_mapping", slot_mapping, dim=1, dtypes=(torch.int64,), device=kv.device)
    check_shape("slot_mapping", slots, (k.shape[0],))
    n = k.shape[0]
    if n == 0:
        return
    if block_n is None:
        block_n = min(64, next_pow2(n)) if interpreting() else 1
    elif block_n < 1 or block_n & (block_n - 1):
        raise KernelError(f"block_n must be a power of two, got {block_n}")
    _store_kv_kernel[(triton.cdiv(n, block_n),)](
        k, v, kv, slots.contiguous(), n,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), nb,
        H=hkv, D=d, BT=bt, BLOCK_N=block_n, BLOCK_H=next_pow2(hkv), BLOCK_D=next_pow2(d),
    )


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr, stride_src, stride_dst, E, NB,
    GATHER: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < E) & (blk >= 0) & (blk < NB)  # an invalid block id copies nothing
    if GATHER:
        src = src_ptr + blk * stride_src + offs
        dst = dst_ptr + i * stride_dst + offs
    else:
        src = src_ptr + i * stride_src + offs
        dst = dst_ptr + blk * stride_dst + offs
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def _pages_2d(kv: torch.Tensor) -> torch.Tensor:
    nb = kv.shape[0]
    inner = kv[0] if nb else kv
    if nb and not inner.is_contiguous():
        raise KernelError(f"kv_layer pages must be contiguous within a block (strides {kv.stride()})")
    return kv.as_strided((nb, kv[0].numel() if nb else 0), (kv.stride(0), 1))


def _staging_2d(name: str, staging: torch.Tensor, kv: torch.Tensor, n: int) -> torch.Tensor:
    """A staging buffer as ``[n, elems_per_block]`` rows of the pool dtype (typed pages or uint8 rows)."""
    check_tensor(name, staging, dtypes=(kv.dtype, torch.uint8), device=kv.device)
    per_block_bytes = kv[0].numel() * kv.element_size() if kv.shape[0] else 0
    if staging.dim() < 2 or staging.shape[0] != n:
        raise KernelError(f"{name} must have {n} blocks in dim 0, got shape {tuple(staging.shape)}")
    if staging.dtype != kv.dtype:
        nbytes = staging[0].numel() * staging.element_size() if n else per_block_bytes
        if nbytes != per_block_bytes:
            raise KernelError(f"{name} holds {nbytes} bytes per block, a Layer Block is {per_block_bytes}")
    elif tuple(staging.shape[1:]) != tuple(kv.shape[1:]) and (  # uint8 pools (FP8 latent rows): byte views
            kv.dtype != torch.uint8 or math.prod(staging.shape[1:]) != math.prod(kv.shape[1:])):
        raise KernelError(f"{name} has shape {tuple(staging.shape)}, expected [{n}, {', '.join(map(str, kv.shape[1:]))}]")
    if n and not staging[0].is_contiguous():
        raise KernelError(f"{name} must be contiguous within each block (strides {staging.stride()})")
    if staging.dtype != kv.dtype:
        if (staging.stride(0) * staging.element_size()) % kv.element_size() or staging.storage_offset() % kv.element_size():
            raise KernelError(f"{name}: block stride/offset not aligned to {kv.dtype}")
        staging = staging.as_strided((n, per_block_bytes), (staging.stride(0), 1)).view(kv.dtype)
        return staging
    return staging.as_strided((n, kv[0].numel()), (staging.stride(0), 1))


def _check_pages(kv_layer: object) -> torch.Tensor:
    """A paged pool layer ``[num_blocks, *page]``: MHA ``[.., bt, 2, H, D]``, MLA ``[.., bt, latent]`` or uint8 rows."""
    return check_tensor("kv_layer", kv_layer, dtypes=(*FLOAT_DTYPES, torch.uint8), last_contiguous=True)


def _ids(block_ids: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    ids = check_tensor("block_ids", block_ids, dim=1, dtypes=(torch.int32, torch.int64), device=kv.device)
    return ids.contiguous()


def _launch(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
    n = ids.shape[0]
    e = src.shape[1]
    nb = (src if gather else dst).shape[0]
    if n == 0 or e == 0:
        return
    if ids.device.type == "cpu" and (int(ids.min()) < 0 or int(ids.max()) >= nb):
        raise KernelError(f"block_ids out of range [0, {nb}): min {int(ids.min())}, max {int(ids.max())}")
    block = min(next_pow2(e), 1 << 16) if interpreting() else 4096
    _copy_blocks_kernel[(n, triton.cdiv(e, block))](
        src, dst, ids, src.stride(0), dst.stride(0), e, nb, GATHER=gather, BLOCK=block,
    )


def gather_layer_blocks(kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] = kv_layer[block_ids[i]]``; ``out`` typed ``[n, bt, 2, H, D]`` or uint8 rows (e.g. a Full Block
    buffer's layer slice ``[n, 1, bt, bytes]``); allocated contiguous when None. Block ids are not range-checked
    on the device: callers own their block tables. Any page shape works (MLA latent pages included)."""
    kv = _check_pages(kv_layer)
    ids = _ids(block_ids, kv)
    n = ids.shape[0]
    if out is None:
        out = torch.empty((n, *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
    _launch(_pages_2d(kv), _staging_2d("out", out, kv, n), ids, gather=True)
    return out


def scatter_layer_blocks(staging: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> None:
    """``kv_layer[block_ids[i]] = staging[i]`` (staging as in :func:`gather_layer_blocks`)."""
    kv = _check_pages(kv_layer)
    ids = _ids(block_ids, kv)
    src = _staging_2d("staging", staging, kv, ids.shape[0])
    _launch(src, _pages_2d(kv), ids, gather=False)
