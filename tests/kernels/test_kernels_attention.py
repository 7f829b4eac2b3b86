"""Triton paged attention against the pure-torch reference (interpreter on CPU, native on CUDA)."""

from __future__ import annotations

import pytest
import torch

from dualpath.errors import KernelError
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


def _batch(seqs: list[tuple[int, int]], bt: int, hkv: int, d: int, dtype: torch.dtype, device: str,
           seed: int) -> tuple[torch.Tensor, ...]:
    """``(kv, tables, cu_seqlens_q, seq_lens, start_pos)`` of a prefill batch of ``(cached, new)`` sequences."""
    lens = [c + n for c, n in seqs]
    nb = sum(-(-n // bt) for n in lens) + 2
    kv = _pool(nb, bt, hkv, d, dtype, device, seed=seed)
    tables = _tables(lens, bt, nb, seed=seed).to(device)
    cu = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    starts = torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=device)
    return kv, tables, cu, seq_lens, starts


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
    kv, tables, cu, seq_lens, starts = _batch(seqs, bt, hkv, d, dtype, device, seed=1)
    ntok = sum(n for _, n in seqs)
    q = torch.randn((ntok, hq, d), generator=torch.Generator().manual_seed(6)).to(dtype=dtype, device=device)
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


_PACK_FEATURES = {
    "plain": {},
    "window": {"window": 7},
    "chunk": {"chunk": 16, "window": 40},
    "softcap": {"softcap": 2.0},
    "sinks": {"sinks": True},
    "alibi": {"alibi": True},
    "alibi_bf16": {"alibi": True, "alibi_bf16": True},
}


@pytest.mark.parametrize("feature", list(_PACK_FEATURES))
def test_prefill_heads_per_program_matches_reference(device, feature):
    """Several query heads of a KV head in one program (6 per KV head, packed 1 (the GPU default), 3 or 6 (the interpreter's) at a time, 2 too without a feature; three tokens x
    two heads (eight tokens), five tokens x three heads and two x six per 16-row tile: rows left over and partial last tiles), with every
    per-head input (sinks, ALiBi slopes) and every mask, each against the torch reference."""
    bt, hq, hkv, d = 16, 6, 1, 16
    seqs = [(0, 13), (29, 6), (64, 1), (10, 9)]  # (cached, new)
    kv, tables, cu, seq_lens, starts = _batch(seqs, bt, hkv, d, torch.float32, device, seed=21)
    g = torch.Generator().manual_seed(22)
    q = torch.randn((sum(n for _, n in seqs), hq, d), generator=g).to(device)
    kw = dict(_PACK_FEATURES[feature])
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(hq, generator=g).to(device)
    if kw.pop("alibi", False):
        kw["alibi"] = (2.0 ** -torch.arange(1, hq + 1, dtype=torch.float32) * 4).to(device)
    want = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, **kw)
    packs = [(1, 16), (3, 16), (None, None)] + ([(2, 16), (6, 16)] if feature == "plain" else [])
    for pack, block_m in packs:
        got = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, block_m=block_m, block_n=16,
                                          heads_per_program=pack, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m, p=pack: f"pack {p}: {m}")
    with pytest.raises(KernelError, match="heads_per_program must divide the 6 query heads per KV head, got 4"):
        tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, heads_per_program=4)
    with pytest.raises(KernelError, match=r"block_m \(4\) must hold at least heads_per_program \(6\) rows"):
        tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, block_m=4, heads_per_program=6)


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
    kv, tables, cu, seq_lens, starts = _batch(seqs, bt, hkv, d, torch.float32, device, seed=11)
    ntok = sum(n for _, n in seqs)
    q = torch.randn((ntok, hq, d), generator=torch.Generator().manual_seed(12)).to(device)
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


def _naive_sinks(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, qpos: list[int], scale: float,
                 sinks: list[float], window: int | None = None) -> torch.Tensor:
    """Query by query, key by key: a softmax over ``[scores..., sinks[h]]`` whose last (sink) column is dropped."""
    bt, hq, hkv = kv.shape[1], q.shape[1], kv.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, p in enumerate(qpos):
        keys = [t for t in range(p + 1) if window is None or p - t < window]
        rows = torch.stack([kv[int(table[t // bt]), t % bt].double().cpu() for t in keys])  # [n, 2, Hkv, D]
        for h in range(hq):
            k, v = rows[:, 0, h // (hq // hkv)], rows[:, 1, h // (hq // hkv)]
            logits = torch.cat(((k @ q[i, h].double().cpu()) * scale, torch.tensor([sinks[h]], dtype=torch.float64)))
            out[i, h] = torch.softmax(logits, dim=0)[:-1] @ v
    return out.float()


def _sink_case(device: str) -> tuple:
    """The shapes of ``test_sliding_window_matches_naive``: prefill inputs and decode queries."""
    bt, hq, hkv, d = 16, 4, 2, 16
    seqs = [(0, 45), (37, 9), (70, 1), (5, 30)]  # (cached, new)
    kv, tables, cu, seq_lens, starts = _batch(seqs, bt, hkv, d, torch.float32, device, seed=21)
    q = torch.randn((sum(n for _, n in seqs), hq, d), generator=torch.Generator().manual_seed(22)).to(device)
    qd = torch.randn((len(seqs), hq, d), generator=torch.Generator().manual_seed(23)).to(device)
    return seqs, kv, tables, q, cu, seq_lens, starts, qd


@pytest.mark.parametrize("window", [None, 8])
def test_sinks_match_naive(device, window):
    """gpt-oss attention sinks, alone and with a sliding window, Triton and the torch reference against a key-by-key
    loop: decode (split-K reduction over several partitions) and prefill (with a window of 8: chunks that start
    inside (5, 30) and outside (37, 9) the window, query tiles whose later rows see no key of their first key tile,
    padding rows that see no key at all); sinks of large magnitude both ways (+40 dwarfs every score: the rescale
    must not overflow)."""
    seqs, kv, tables, q, cu, seq_lens, starts, qd = _sink_case(device)
    sink_list = [-30.0, 0.5, 4.0, 40.0]
    sinks = torch.tensor(sink_list, device=device)
    want = torch.cat([_naive_sinks(q[int(cu[b]):int(cu[b + 1])], kv, tables[b], list(range(c, c + n)), 0.3,
                                   sink_list, window) for b, (c, n) in enumerate(seqs)])
    got_ref = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, sinks=sinks)
    got_tri = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, sinks=sinks,
                                          block_m=16, block_n=16)
    assert torch.isfinite(got_tri).all()
    torch.testing.assert_close(got_ref.cpu(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_tri.cpu(), want, atol=2e-5, rtol=1e-4)
    want_d = torch.cat([_naive_sinks(qd[b:b + 1], kv, tables[b], [c + n - 1], 0.3, sink_list, window)
                        for b, (c, n) in enumerate(seqs)])
    got_d = tri.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, sinks=sinks, partition=32,
                                       block_n=16)
    assert torch.isfinite(got_d).all()
    torch.testing.assert_close(ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window,
                                                          sinks=sinks).cpu(), want_d, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_d.cpu(), want_d, atol=2e-5, rtol=1e-4)


def test_very_negative_sinks_are_no_sinks(device):
    """A sink of -1e4 (bf16: any float dtype) takes no probability: with a soft cap and a window, both backends equal
    the reference without sinks (itself checked against Triton without sinks above)."""
    seqs, kv, tables, q, cu, seq_lens, starts, qd = _sink_case(device)
    sinks = torch.full((q.shape[1],), -1e4, dtype=torch.bfloat16, device=device)
    kw = {"softcap": 5.0, "window": 7}
    want = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, **kw)
    want_d = ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, **kw)
    for got in (ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, sinks=sinks, **kw),
                tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, sinks=sinks, block_m=16,
                                            block_n=16, **kw)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for got in (ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, sinks=sinks, **kw),
                tri.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, sinks=sinks, partition=32, block_n=16, **kw)):
        torch.testing.assert_close(got, want_d, atol=2e-5, rtol=1e-4)


def test_sinks_bad_input(device):
    """The dispatch functions and the Triton launchers reject malformed sinks with a KernelError naming them; a
    valid float16 tensor dispatches to the backend."""
    from dualpath.errors import KernelError
    from dualpath.kernels import paged_decode_attention, paged_prefill_attention

    kv = _pool(2, 16, 1, 16, torch.float32, device)
    q = torch.randn((1, 2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.full((1,), 5, dtype=torch.int32, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    starts = torch.full((1,), 4, dtype=torch.int32, device=device)
    bad = [torch.zeros(3, device=device), torch.zeros((1, 2), device=device),
           torch.zeros(2, dtype=torch.int32, device=device), [0.0, 1.0]]
    for sinks in bad:
        for backend in ("torch", "triton"):
            with pytest.raises(KernelError, match="sinks"):
                paged_decode_attention(q, kv, tables, lens, 0.25, backend=backend, sinks=sinks)
            with pytest.raises(KernelError, match="sinks"):
                paged_prefill_attention(q, kv, tables, cu, lens, starts, 0.25, backend=backend, sinks=sinks)
        with pytest.raises(KernelError, match="sinks"):
            tri.paged_decode_attention(q, kv, tables, lens, 0.25, sinks=sinks)
        with pytest.raises(KernelError, match="sinks"):
            tri.paged_prefill_attention(q, kv, tables, cu, lens, starts, 0.25, sinks=sinks)
    sinks = torch.tensor([1.0, -2.0], dtype=torch.float16, device=device)
    torch.testing.assert_close(paged_decode_attention(q, kv, tables, lens, 0.25, backend="torch", sinks=sinks),
                               ref.paged_decode_attention(q, kv, tables, lens, 0.25, sinks=sinks))
    torch.testing.assert_close(paged_decode_attention(q, kv, tables, lens, 0.25, backend="triton", sinks=sinks),
                               ref.paged_decode_attention(q, kv, tables, lens, 0.25, sinks=sinks), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(paged_prefill_attention(q, kv, tables, cu, lens, starts, 0.25, backend="triton",
                                                       sinks=sinks),
                               ref.paged_prefill_attention(q, kv, tables, cu, lens, starts, 0.25, sinks=sinks),
                               atol=2e-5, rtol=1e-4)


def _naive_alibi(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, qpos: list[int], scale: float,
                 slopes: list[float], window: int | None = None, falcon: bool = False) -> torch.Tensor:
    """Query by query, key by key, in float64: ``softmax(scale * q.k + slope[h] * key position)`` (Bloom's form:
    the bias of the key's absolute position; a per-query constant, so equal to ``slope * (k - p)``). ``falcon``:
    ``softmax(scale * (q.k + bf16(slope[h] * bf16(key position))))``, transformers' Falcon bias, rounded by torch."""
    bt, hq, hkv = kv.shape[1], q.shape[1], kv.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, p in enumerate(qpos):
        keys = [t for t in range(p + 1) if window is None or p - t < window]
        rows = torch.stack([kv[int(table[t // bt]), t % bt].double().cpu() for t in keys])  # [n, 2, Hkv, D]
        pos = torch.tensor(keys, dtype=torch.float64)
        for h in range(hq):
            k, v = rows[:, 0, h // (hq // hkv)], rows[:, 1, h // (hq // hkv)]
            bias = (torch.tensor(slopes[h], dtype=torch.bfloat16) * pos.bfloat16()).double() * scale if falcon \
                else slopes[h] * pos
            out[i, h] = torch.softmax((k @ q[i, h].double().cpu()) * scale + bias, dim=0) @ v
    return out.float()


@pytest.mark.parametrize("window", [None, 8])
def test_alibi_matches_naive(device, window):
    """ALiBi (Bloom) slopes, alone and with a window, Triton and the torch reference against a key-by-key loop over
    the shapes of the sinks test: prefill chunks over cached prefixes, decode with a split-K reduction; slopes from
    steep (2.0: a far key gets -100 and more) to none."""
    seqs, kv, tables, q, cu, seq_lens, starts, qd = _sink_case(device)
    slope_list = [2.0, 0.25, 0.0039, 0.0]
    slopes = torch.tensor(slope_list, device=device)
    want = torch.cat([_naive_alibi(q[int(cu[b]):int(cu[b + 1])], kv, tables[b], list(range(c, c + n)), 0.3,
                                   slope_list, window) for b, (c, n) in enumerate(seqs)])
    got_ref = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, alibi=slopes)
    got_tri = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, alibi=slopes,
                                          block_m=16, block_n=16)
    torch.testing.assert_close(got_ref.cpu(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_tri.cpu(), want, atol=2e-5, rtol=1e-4)
    want_d = torch.cat([_naive_alibi(qd[b:b + 1], kv, tables[b], [c + n - 1], 0.3, slope_list, window)
                        for b, (c, n) in enumerate(seqs)])
    got_d = tri.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, alibi=slopes, partition=32,
                                       block_n=16)
    torch.testing.assert_close(ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window,
                                                          alibi=slopes).cpu(), want_d, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_d.cpu(), want_d, atol=2e-5, rtol=1e-4)
    no_alibi = ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window)
    assert not torch.allclose(got_d, no_alibi, atol=1e-3)  # (the slopes change the result)


@pytest.mark.parametrize("window", [None, 8])
def test_falcon_alibi_bf16_matches_naive(device, window):
    """Falcon's ALiBi (``alibi_bf16``): ``bf16(slope * bf16(key position))`` added before the scale, as transformers
    rounds it in bfloat16: Triton (whose interpreter truncates its own bf16 casts) and the reference against the
    key-by-key loop, prefill and split-K decode, slopes that bfloat16 rounds (2 ** -0.5, 0.3) and exact ones."""
    seqs, kv, tables, q, cu, seq_lens, starts, qd = _sink_case(device)
    slope_list = [2 ** -0.5, 0.3, 0.25, 0.0]
    slopes = torch.tensor(slope_list, dtype=torch.bfloat16).float().to(device)
    want = torch.cat([_naive_alibi(q[int(cu[b]):int(cu[b + 1])], kv, tables[b], list(range(c, c + n)), 0.3,
                                   slopes.tolist(), window, falcon=True) for b, (c, n) in enumerate(seqs)])
    for impl in (ref, tri):
        got = impl.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, alibi=slopes,
                                           alibi_bf16=True)
        torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=1e-4)
    want_d = torch.cat([_naive_alibi(qd[b:b + 1], kv, tables[b], [c + n - 1], 0.3, slopes.tolist(), window,
                                     falcon=True) for b, (c, n) in enumerate(seqs)])
    for impl, kw in ((ref, {}), (tri, {"partition": 32, "block_n": 16})):
        got_d = impl.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, alibi=slopes,
                                            alibi_bf16=True, **kw)
        torch.testing.assert_close(got_d.cpu(), want_d, atol=2e-5, rtol=1e-4)
    fp32 = ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, alibi=slopes * 0.3)
    assert not torch.allclose(got_d, fp32, atol=1e-5)  # (the rounding changes the result)


def test_alibi_bad_input(device):
    """Malformed slopes are refused by name, by the dispatch functions and the Triton launchers alike."""
    from dualpath.errors import KernelError
    from dualpath.kernels import paged_decode_attention

    kv = _pool(2, 16, 1, 16, torch.float32, device)
    q = torch.randn((1, 2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.full((1,), 5, dtype=torch.int32, device=device)
    for bad in (torch.zeros(3, device=device), torch.zeros(2, dtype=torch.int32, device=device), [0.0, 1.0]):
        with pytest.raises(KernelError, match="alibi"):
            paged_decode_attention(q, kv, tables, lens, 0.25, alibi=bad)
        with pytest.raises(KernelError, match="alibi"):
            tri.paged_decode_attention(q, kv, tables, lens, 0.25, alibi=bad)
    with pytest.raises(KernelError, match="alibi_bf16 needs alibi slopes"):
        paged_decode_attention(q, kv, tables, lens, 0.25, alibi_bf16=True)


@pytest.mark.parametrize("chunk,window", [(16, None), (7, None), (12, 5)])
def test_chunked_attention_matches_naive(device, chunk, window):
    """Llama 4's chunked attention: a query at position ``p`` sees only the keys of its own chunk (``p // chunk *
    chunk .. p``), alone and with a window; Triton and the torch reference against a key-by-key float64 loop over
    the shapes of the sinks test (prefill chunks over cached prefixes that start inside and across chunk
    boundaries, query tiles spanning a boundary, decode with a split-K reduction)."""
    seqs, kv, tables, q, cu, seq_lens, starts, qd = _sink_case(device)
    zero = [0.0] * q.shape[1]

    def naive(qs: torch.Tensor, b: int, qpos: list[int]) -> torch.Tensor:
        out = []
        for i, p in enumerate(qpos):  # chunk, then window: the keys a row may see, as a window from its chunk's start
            w = p - p // chunk * chunk + 1
            w = w if window is None else min(w, window)
            out.append(_naive_alibi(qs[i:i + 1], kv, tables[b], [p], 0.3, zero, w))
        return torch.cat(out)

    want = torch.cat([naive(q[int(cu[b]):int(cu[b + 1])], b, list(range(c, c + n))) for b, (c, n) in enumerate(seqs)])
    got_ref = ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, chunk=chunk)
    got_tri = tri.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3, window=window, chunk=chunk,
                                          block_m=16, block_n=16)
    torch.testing.assert_close(got_ref.cpu(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_tri.cpu(), want, atol=2e-5, rtol=1e-4)
    want_d = torch.cat([naive(qd[b:b + 1], b, [c + n - 1]) for b, (c, n) in enumerate(seqs)])
    got_d = tri.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window, chunk=chunk, partition=32,
                                       block_n=16)
    torch.testing.assert_close(ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3, window=window,
                                                          chunk=chunk).cpu(), want_d, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_d.cpu(), want_d, atol=2e-5, rtol=1e-4)
    if window is None:  # (the chunks change the result; a window of 5 here lies within each query's chunk)
        assert not torch.allclose(got_d, ref.paged_decode_attention(qd, kv, tables, seq_lens, 0.3), atol=1e-3)
    assert not torch.allclose(got_tri, ref.paged_prefill_attention(q, kv, tables, cu, seq_lens, starts, 0.3,
                                                                   window=window), atol=1e-3)


def test_chunk_bad_input(device):
    from dualpath.errors import KernelError
    from dualpath.kernels import paged_decode_attention

    kv = _pool(2, 16, 1, 16, torch.float32, device)
    q = torch.randn((1, 2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.full((1,), 5, dtype=torch.int32, device=device)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(KernelError, match="chunk"):
            paged_decode_attention(q, kv, tables, lens, 0.25, chunk=bad)
        with pytest.raises(KernelError, match="chunk"):
            tri.paged_decode_attention(q, kv, tables, lens, 0.25, chunk=bad)
