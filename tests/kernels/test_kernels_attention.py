"""Triton paged attention against the pure-torch reference (interpreter on CPU, native on CUDA)."""

from __future__ import annotations

import pytest
import torch

from dualpath.kernels import paged_attention as tri
from dualpath.kernels import reference as ref


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _pool(nb: int, bt: int, hkv: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((nb, bt, 2, hkv, d), generator=g).to(dtype=dtype, device=device)


def _tables(lens: list[int], bt: int, nb: int, seed: int = 0, width_extra: int = 1) -> torch.Tensor:
    """Disjoint, shuffled physical blocks per sequence (padded with a valid id)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bt) for n in lens]
    perm = torch.randperm(nb, generator=g).tolist()
    width = max(need) + width_extra
    rows, i = [], 0
    for n in need:
        rows.append(perm[i : i + n] + [perm[0]] * (width - n))
        i += n
    return torch.tensor(rows, dtype=torch.int32)


# (block_tokens, n_q_heads, n_kv_heads, head_dim, dtype): block sizes 16..128, GQA ratios 1/2/4/8
CASES = [
    (16, 4, 4, 16, torch.float32),
    (32, 4, 2, 32, torch.float32),
    (64, 8, 2, 64, torch.float32),
    (128, 8, 1, 16, torch.float32),
    (16, 6, 3, 48, torch.float32),   # head_dim not a power of two, odd head counts
    (32, 8, 2, 64, torch.bfloat16),
    (16, 4, 1, 32, torch.float16),
]


@pytest.mark.parametrize(("bt", "hq", "hkv", "d", "dtype"), CASES)
def test_decode_matches_reference(device, bt, hq, hkv, d, dtype):
    lens = [1, 37, 131]  # mixed and odd lengths in one batch
    nb = sum(-(-n // bt) for n in lens) + 3
    kv = _pool(nb, bt, hkv, d, dtype, device)
    tables = _tables(lens, bt, nb).to(device)
    q = torch.randn((len(lens), hq, d), generator=torch.Generator().manual_seed(5)).to(dtype=dtype, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    want = ref.paged_decode_attention(q, kv, tables, seq_lens, d**-0.5)
    got = tri.paged_decode_attention(q, kv, tables, seq_lens, d**-0.5)
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_decode_split_k_reduction(device):
    """Several context partitions per sequence, empty partitions for short sequences."""
    bt, hq, hkv, d = 16, 4, 2, 32
    lens = [3, 70, 161]
    nb = 20
    kv = _pool(nb, bt, hkv, d, torch.float32, device, seed=3)
    tables = _tables(lens, bt, nb, seed=3).to(device)
    q = torch.randn((3, hq, d), generator=torch.Generator().manual_seed(4)).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    want = ref.paged_decode_attention(q, kv, tables, seq_lens, 0.3)
    got = tri.paged_decode_attention(q, kv, tables, seq_lens, 0.3, partition=32, block_n=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("bt", "hq", "hkv", "d", "dtype"), CASES)
def test_prefill_with_prefix_matches_reference(device, bt, hq, hkv, d, dtype):
    # (cached, new): no prefix, prefix not block-aligned, a one-token chunk, a long chunk after a prefix
    seqs = [(0, 19), (37, 5), (64, 1), (16, 40)]
    lens = [c + n for c, n in seqs]
    nb = sum(-(-n // bt) for n in lens) + 2
    kv = _pool(nb, bt, hkv, d, dtype, device, seed=1)
    tables = _tables(lens, bt, nb, seed=1).to(device)
    ntok = sum(n for _, n in seqs)
    q = torch.randn((ntok, hq, d), generator=torch.Generator().manual_seed(6)).to(dtype=dtype, device=device)
    cu = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device)
    want = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, d**-0.5)
    got = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, d**-0.5)
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_prefill_many_query_tiles(device):
    """Small query/key tiles: several M tiles per sequence, unmasked prefix tiles and masked diagonal tiles."""
    bt, hq, hkv, d = 16, 4, 2, 16
    seqs = [(21, 45), (48, 17)]
    lens = [c + n for c, n in seqs]
    nb = 12
    kv = _pool(nb, bt, hkv, d, torch.float32, device, seed=2)
    tables = _tables(lens, bt, nb, seed=2).to(device)
    q = torch.randn((62, hq, d), generator=torch.Generator().manual_seed(7)).to(device)
    cu = torch.tensor([0, 45, 62], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([21, 48], dtype=torch.int32, device=device)
    want = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.25)
    got = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.25, block_m=16, block_n=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_large_physical_block_ids(device):
    """Block ids whose element offset exceeds 2**31: int32 index math would wrap. The pool is allocated with
    torch.empty, so only the touched pages take memory (on CPU)."""
    bt, hkv, d, hq = 16, 1, 16, 2
    per_block = bt * 2 * hkv * d
    nb = (1 << 31) // per_block + 64
    kv = torch.empty((nb, bt, 2, hkv, d), dtype=torch.float16, device=device)
    ids = [nb - 1, nb - 40, 5, nb - 17]
    g = torch.Generator().manual_seed(9)
    for i in ids:
        kv[i] = torch.randn((bt, 2, hkv, d), generator=g).to(device=device, dtype=torch.float16)
    tables = torch.tensor([ids], dtype=torch.int32, device=device)
    q = torch.randn((1, hq, d), generator=g).to(device=device, dtype=torch.float16)
    lens = torch.tensor([61], dtype=torch.int32, device=device)
    torch.testing.assert_close(tri.paged_decode_attention(q, kv, tables, lens, 0.25),
                               ref.paged_decode_attention(q, kv, tables, lens, 0.25), atol=2e-2, rtol=2e-2)
    qp = torch.randn((9, hq, d), generator=g).to(device=device, dtype=torch.float16)
    cu = torch.tensor([0, 9], dtype=torch.int32, device=device)
    starts = torch.tensor([52], dtype=torch.int32, device=device)
    torch.testing.assert_close(tri.paged_prefill_attention(qp, kv, tables, cu, lens, starts, 0.25),
                               ref.paged_prefill_attention(qp, kv, tables, cu, lens, starts, 0.25),
                               atol=2e-2, rtol=2e-2)


def _naive_window(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, qpos: list[int], scale: float,
                  window: int) -> torch.Tensor:
    """Query by query, key by key: what a sliding window means, independent of the reference's masking."""
    bt, hq, hkv = kv.shape[1], q.shape[1], kv.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i, p in enumerate(qpos):
        keys = [t for t in range(p + 1) if p - t < window]
        rows = torch.stack([kv[int(table[t // bt]), t % bt].float().cpu() for t in keys])  # [n, 2, Hkv, D]
        for h in range(hq):
            k, v = rows[:, 0, h // (hq // hkv)], rows[:, 1, h // (hq // hkv)]
            w = torch.softmax((k @ q[i, h].float().cpu()) * scale, dim=0)
            out[i, h] = w @ v
    return out


@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
def test_sliding_window_matches_naive(device, window):
    """A window of ``w`` keys (itself included), as transformers masks it: decode and prefill (a cached prefix,
    chunks that start inside and outside the window, query tiles whose first rows see no key of a key tile),
    Triton and the torch reference against a key-by-key loop; a window above every length is plain attention."""
    bt, hq, hkv, d = 16, 4, 2, 16
    seqs = [(0, 45), (37, 9), (70, 1), (5, 30)]  # (cached, new)
    lens = [c + n for c, n in seqs]
    nb = sum(-(-n // bt) for n in lens) + 2
    kv = _pool(nb, bt, hkv, d, torch.float32, device, seed=11)
    tables = _tables(lens, bt, nb, seed=11).to(device)
    ntok = sum(n for _, n in seqs)
    q = torch.randn((ntok, hq, d), generator=torch.Generator().manual_seed(12)).to(device)
    cu = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device)
    want = torch.cat([_naive_window(q[int(cu[b]):int(cu[b + 1])], kv, tables[b], list(range(c, c + n)), 0.3, window)
                      for b, (c, n) in enumerate(seqs)])
    got_ref = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window)
    got_tri = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, block_m=16,
                                          block_n=16)
    torch.testing.assert_close(got_ref.cpu(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_tri.cpu(), want, atol=2e-5, rtol=1e-4)
    if window >= max(lens):
        torch.testing.assert_close(got_tri, tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3,
                                                                        block_m=16, block_n=16), atol=2e-5, rtol=1e-4)
    # decode: the last token of each sequence
    qd = torch.randn((len(lens), hq, d), generator=torch.Generator().manual_seed(13)).to(device)
    want_d = torch.cat([_naive_window(qd[b:b + 1], kv, tables[b], [n - 1], 0.3, window) for b, n in enumerate(lens)])
    torch.testing.assert_close(ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window).cpu(), want_d,
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tri.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, partition=32,
                                                          block_n=16).cpu(), want_d, atol=2e-5, rtol=1e-4)


def test_window_must_be_positive(device):
    from dualpath.errors import KernelError
    from dualpath.kernels import paged_decode_attention

    kv = _pool(2, 16, 1, 16, torch.float32, device)
    q = torch.zeros((1, 1, 16), device=device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(KernelError, match="window must be a positive int"):
            paged_decode_attention(q, kv, tables, lens, 0.25, window=bad)
