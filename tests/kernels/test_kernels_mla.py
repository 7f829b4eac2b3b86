"""MLA latent kernels: Triton (interpreter on CPU) against the torch references, and the FP8 latent format against
an independent per-tile quantizer written here with torch's own float8 cast."""

from __future__ import annotations

import pytest
import torch

from dualpath.kernels import (
    dequantize_latent_fp8,
    mla_decode_attention,
    mla_prefill_attention,
    quantize_latent_fp8,
    store_latent,
)
from dualpath.kernels import reference as ref
from dualpath.kv.layout import KVLayout, KVSpec


def _latent(n: int, r: int, p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, r + p, generator=g) * torch.logspace(-3, 1, n)[:, None]
    x[0, :128] = 0.0                      # an all-zero tile
    x[1, :8] = torch.tensor([448.0, -448.0, 1.0, 0.5, 1.0625, 1.1875, 2**-9, -(2**-10)])  # exact values and ties
    return x


def _independent_fp8(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-128 tile amax / 448 scaling and torch's float8_e4m3fn cast: (dequantized latent, scales)."""
    t = x[:, :r].reshape(x.shape[0], -1, 128)
    amax = t.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (t / scale).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(x.shape[0], r), scale.squeeze(-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_format_round_trip(backend, device):
    r, p = 256, 64
    x = _latent(7, r, p).to(device)
    rows = quantize_latent_fp8(x, r, backend=backend)
    assert rows.dtype == torch.uint8 and rows.shape == (7, r + 4 * (r // 128) + 2 * p)
    assert KVSpec.mla_fp8(61).bytes_per_token_layer == 656  # the paper's 512 + 64 format
    want, scales = _independent_fp8(x.cpu(), r)
    # layout: r fp8 bytes, r/128 fp32 scales, p bf16 values
    got_scales = rows[:, r : r + 4 * (r // 128)].cpu().contiguous().view(torch.float32)
    torch.testing.assert_close(got_scales, scales, rtol=0, atol=0)
    back = dequantize_latent_fp8(rows, r, torch.float32, backend=backend).cpu()
    torch.testing.assert_close(back[:, :r], want, rtol=0, atol=0)
    torch.testing.assert_close(back[:, r:], x[:, r:].cpu().to(torch.bfloat16).float(), rtol=0, atol=0)
    # within the format's quantization error: half an fp8 ulp (2^-4 relative) or a subnormal step of the tile
    err = (back[:, :r] - x[:, :r].cpu()).abs()
    bound = x[:, :r].cpu().abs() / 16 + scales.repeat_interleave(128, 1) * 2.0**-10
    assert bool((err <= bound * 1.0001).all())
    # Triton and the torch reference write the very same bytes
    if backend == "triton":
        assert torch.equal(rows.cpu(), ref.quantize_latent_fp8(x.cpu(), r))


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "fp8"])
def test_store_latent_matches_reference(fmt, device):
    r, p, bt = 128, 16, 4
    dt = torch.uint8 if fmt == "fp8" else getattr(torch, fmt)
    width = r + 4 + 2 * p if fmt == "fp8" else r + p
    x = _latent(6, r, p, seed=1).to(device)
    slots = torch.tensor([5, 0, -1, 9, 3, 14], dtype=torch.int64, device=device)
    got = torch.zeros(4, bt, width, dtype=dt, device=device)
    want = torch.zeros(4, bt, width, dtype=dt)
    store_latent(x, got, slots, r, backend="triton")
    ref.store_latent(x.cpu(), want, slots.cpu(), r)
    if fmt == "bfloat16":  # an fp32 -> bf16 store: the interpreter truncates where CUDA rounds (1 ulp)
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(got.cpu(), want)
    assert bool((got.cpu().reshape(16, width)[[1, 2, 4, 6, 7, 8, 10, 11, 12, 13, 15]] == 0).all())  # untouched


def _pool(fmt: str, r: int, p: int, n_tokens: int, bt: int, device: str, seed: int = 2):
    """A shuffled paged pool holding ``n_tokens`` latent rows for each of 2 sequences."""
    g = torch.Generator().manual_seed(seed)
    nb_seq = -(-n_tokens // bt)
    perm = torch.randperm(2 * nb_seq + 3, generator=g)
    tables = perm[: 2 * nb_seq].reshape(2, nb_seq).to(torch.int32)
    lat = torch.randn(2, n_tokens, r + p, generator=g)
    if fmt == "fp8":
        pages = torch.zeros(2 * nb_seq + 3, bt, r + 4 * (r // 128) + 2 * p, dtype=torch.uint8)
    else:
        pages = torch.zeros(2 * nb_seq + 3, bt, r + p, dtype=getattr(torch, fmt))
    for b in range(2):
        pos = torch.arange(n_tokens)
        slots = tables[b, pos // bt].long() * bt + pos % bt
        ref.store_latent(lat[b], pages, slots, r)
    return pages.to(device), tables.to(device)


GRID = [("float32", 32, 8, 4), ("bfloat16", 32, 8, 16), ("fp8", 128, 16, 8)]


@pytest.mark.parametrize("partition", [None, 16])  # 16: split-K over the context, then the log-sum-exp reduce
@pytest.mark.parametrize("fmt,r,p,bt", GRID)
def test_mla_decode_matches_reference(fmt, r, p, bt, partition, device):
    h = 4
    pages, tables = _pool(fmt, r, p, 37, bt, device)
    qdt = torch.float32 if fmt == "float32" else torch.bfloat16
    q = torch.randn(2, h, r + p, generator=torch.Generator().manual_seed(3)).to(device, qdt)
    lens = torch.tensor([37, 19], dtype=torch.int32, device=device)
    if partition is None:
        got = mla_decode_attention(q, pages, tables, lens, 0.1, r, backend="triton").float().cpu()
    else:
        from dualpath.kernels.mla_attention import mla_decode_attention as triton_decode

        got = triton_decode(q, pages, tables, lens, 0.1, r, block_n=16, partition=partition).float().cpu()
    want = ref.mla_decode_attention(q.cpu(), pages.cpu(), tables.cpu(), lens.cpu(), 0.1, r).float()
    tol = (1e-4 if device == "cpu" else 5e-3) if qdt == torch.float32 else 2e-2  # tf32 dots on GPU
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("fmt,r,p,bt", GRID)
def test_mla_prefill_with_prefix_matches_reference(fmt, r, p, bt, device):
    h = 3
    pages, tables = _pool(fmt, r, p, 30, bt, device)
    qdt = torch.float32 if fmt == "float32" else torch.bfloat16
    new = [6, 1]
    start = [24, 9]
    cu = torch.tensor([0, 6, 7], dtype=torch.int32, device=device)
    q = torch.randn(sum(new), h, r + p, generator=torch.Generator().manual_seed(4)).to(device, qdt)
    lens = torch.tensor([s + n for s, n in zip(start, new, strict=True)], dtype=torch.int32, device=device)
    sp = torch.tensor(start, dtype=torch.int32, device=device)
    got = mla_prefill_attention(q, pages, tables, cu, lens, sp, 0.1, r, backend="triton").float().cpu()
    want = ref.mla_prefill_attention(q.cpu(), pages.cpu(), tables.cpu(), cu.cpu(), lens.cpu(), sp.cpu(), 0.1, r).float()
    tol = (1e-4 if device == "cpu" else 5e-3) if qdt == torch.float32 else 2e-2  # tf32 dots on GPU
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # the first new token of sequence 0 sees exactly its 25 positions (causality over the new rows)
    only = ref.mla_decode_attention(q[:1].cpu(), pages.cpu(), tables[:1].cpu(), torch.tensor([25], dtype=torch.int32),
                                    0.1, r).float()
    torch.testing.assert_close(got[:1], only, atol=tol, rtol=tol)


def test_fp8_attention_close_to_bf16():
    """Stated tolerance: absorbed attention over FP8 latents stays within 5% relative L2 error of the same attention
    over bf16 latents (512 + 64 dims, 256 tokens, Gaussian latents). e4m3's 3 mantissa bits alone give ~3.6% RMS
    relative error per value, which the attention average neither removes nor amplifies."""
    r, p, bt, n, h = 512, 64, 64, 256, 8
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(n, r + p, generator=g)
    table = torch.arange(n // bt, dtype=torch.int32)[None]
    slots = torch.arange(n)
    outs = []
    for layout in (KVLayout(KVSpec.mla(1, r + p, "bfloat16", rope_dim=p), bt), KVLayout(KVSpec.mla_fp8(1, r, p), bt)):
        pages = torch.zeros((n // bt, *layout.page_shape), dtype=layout.spec.torch_dtype)
        ref.store_latent(lat, pages, slots, r)
        q = torch.randn(1, h, r + p, generator=torch.Generator().manual_seed(6))
        outs.append(ref.mla_decode_attention(q, pages, table, torch.tensor([n], dtype=torch.int32), (r + p) ** -0.5, r))
    rel = float((outs[1] - outs[0]).norm() / outs[0].norm())
    assert 0.0 < rel < 0.05, rel


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", ["bfloat16", "fp8"])
def test_latent_pool_moves_full_blocks_unchanged(fmt, backend, device):
    """Latent pages travel as Layer/Full Blocks byte for byte (the storage and transport unit): pool -> Full Block
    buffer -> another pool, through the gather/scatter kernels."""
    from dualpath.model.kv_pool import KVPool

    spec = KVSpec.mla_fp8(2, 128, 16) if fmt == "fp8" else KVSpec.mla(2, 144, "bfloat16", rope_dim=16)
    assert spec.bytes_per_token_layer == (128 + 4 + 32 if fmt == "fp8" else 288)
    src = KVPool(spec, 6, 4, device, backend=backend)
    dst = KVPool(spec, 6, 4, device, backend=backend)
    assert tuple(src.layer(0).shape) == (6, *KVLayout(spec, 4).page_shape)
    lat = torch.randn(24, 144, generator=torch.Generator().manual_seed(9)).to(device)
    for layer in range(2):
        ref.store_latent(lat * (layer + 1), src.layer(layer), torch.arange(24, device=device), 128)
    full = src.layout.alloc_full_blocks(3, device)
    src.read_full_blocks([4, 1, 2], full)
    # a Layer Block of the Full Block buffer, reinterpreted, is exactly the pool page
    page = src.layout.as_kv(full[0, 1])
    assert torch.equal(page.view(torch.uint8), src.layer(1)[4].view(torch.uint8))
    dst.write_full_blocks([0, 5, 3], full)
    for layer in range(2):
        assert torch.equal(dst.layer(layer)[[0, 5, 3]].view(torch.uint8), src.layer(layer)[[4, 1, 2]].view(torch.uint8))
