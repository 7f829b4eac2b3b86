"""The torch backend's batched decode attention (:mod:`dualpath.kernels.batched`) against the per-sequence reference
and against ``scaled_dot_product_attention`` over each sequence's keys laid out by hand."""

from __future__ import annotations

import random

import pytest
import torch

from dualpath.errors import KernelError
from dualpath.kernels import batched, paged_decode_attention
from dualpath.kernels import reference as ref


def _case(rng: random.Random, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    bt = rng.choice([1, 4, 16, 32])
    hkv = rng.choice([1, 2, 3])
    g = rng.choice([1, 2, 3, 4])
    d = rng.choice([8, 16, 24])
    lens = [rng.choice([1, 2, bt, bt + 1, rng.randint(1, 200)]) for _ in range(rng.randint(1, 7))]
    need = [-(-n // bt) for n in lens]
    nbk = sum(need) + rng.randint(1, 8)
    perm = torch.randperm(nbk, generator=torch.Generator().manual_seed(rng.randint(0, 1 << 30))).tolist()
    width = max(need) + rng.randint(0, 3)
    pad = rng.choice([-1, 0, nbk + 5])  # what a table holds past a sequence's blocks is never read as a block
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [pad] * (width - n))
        i += n
    gen = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    kv = torch.randn((nbk, bt, 2, hkv, d), generator=gen).to(dtype)
    q = torch.randn((len(lens), hkv * g, d), generator=gen).to(dtype)
    return q, kv, torch.tensor(rows, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)


def _sdpa(q: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
          window: int | None) -> torch.Tensor:
    """Each sequence's keys copied token by token from the pool, attended to with torch's SDPA."""
    bt, hkv = kv.shape[1], kv.shape[3]
    out = []
    for b, n in enumerate(lens.tolist()):
        lo = max(0, n - window) if window else 0
        slots = [(int(tables[b, t // bt]), t % bt) for t in range(lo, n)]
        k = torch.stack([kv[blk, off, 0] for blk, off in slots]).float().transpose(0, 1)  # [Hkv, N, D]
        v = torch.stack([kv[blk, off, 1] for blk, off in slots]).float().transpose(0, 1)
        qb = q[b].float().reshape(hkv, -1, q.shape[-1])  # [Hkv, G, D]
        out.append(torch.nn.functional.scaled_dot_product_attention(qb, k, v, scale=scale).reshape(q.shape[1:]))
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize("seed", range(40))
def test_batched_decode_is_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    q, kv, tables, lens = _case(rng, dtype)
    hq = q.shape[1]
    kw: dict = {}
    if rng.random() < 0.4:
        kw["window"] = rng.randint(1, 64)
    if rng.random() < 0.3:
        kw["chunk"] = rng.randint(1, 64)
    if rng.random() < 0.3:
        kw["softcap"] = rng.choice([5.0, 30.0])
    if rng.random() < 0.3:
        kw["sinks"] = torch.randn(hq, generator=torch.Generator().manual_seed(seed))
    if rng.random() < 0.3:
        kw["alibi"] = torch.rand(hq, generator=torch.Generator().manual_seed(seed + 1))
        kw["alibi_bf16"] = rng.random() < 0.5
    scale = q.shape[-1] ** -0.5
    want = ref.paged_decode_attention(q, kv, tables.clamp(0, kv.shape[0] - 1), lens, scale, **kw)
    got = batched.paged_decode_attention(q, kv, tables, lens, scale, **kw)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, want, **tol)
    assert got.dtype == q.dtype and got.shape == q.shape


@pytest.mark.parametrize("window", [None, 5])
def test_batched_decode_is_sdpa_over_each_sequences_keys(window: int | None) -> None:
    q, kv, tables, lens = _case(random.Random(7), torch.float32)
    got = paged_decode_attention(q, kv, tables, lens, 0.3, backend="torch", window=window)  # the CPU dispatch
    torch.testing.assert_close(got, _sdpa(q, kv, tables, lens, 0.3, window), atol=1e-5, rtol=1e-5)


def test_a_batch_too_large_for_one_group_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    q, kv, tables, lens = _case(rng, torch.float32)
    whole = batched.paged_decode_attention(q, kv, tables, lens, 0.25, window=30)
    monkeypatch.setattr(batched, "GROUP_BYTES", 1)  # every sequence a group of its own
    torch.testing.assert_close(batched.paged_decode_attention(q, kv, tables, lens, 0.25, window=30), whole,
                               atol=1e-6, rtol=1e-6)
    assert batched._groups([5, 40, 17, 40], [0, 0, 0, 0], 16, 1_000_000) == [[1], [3], [2], [0]]
    monkeypatch.setattr(batched, "GROUP_BYTES", 3 * 48 * 1000)  # three 3-block (48-token) spans at 1,000 B/token
    assert batched._groups([5, 40, 17, 40], [0, 0, 0, 0], 16, 1000) == [[1, 3, 2], [0]]


def test_bad_lengths_are_refused() -> None:
    q, kv, tables, lens = _case(random.Random(4), torch.float32)
    with pytest.raises(KernelError, match="seq_lens"):
        batched.paged_decode_attention(q, kv, tables[:, :0], lens, 0.25)
    with pytest.raises(KernelError, match="seq_lens"):
        batched.paged_decode_attention(q, kv, tables, lens * 0, 0.25)
    assert batched.paged_decode_attention(q[:0], kv, tables[:0], lens[:0], 0.25).shape == (0, *q.shape[1:])


def test_a_span_padded_past_the_end_of_its_table() -> None:
    # with chunks, a sequence whose query starts a chunk spans one block while another spans two: the padded span
    # of the first runs past its table's last column, which must not be read as a block (nor fail)
    bt, chunk = 4, 8
    lens = torch.tensor([17, 8], dtype=torch.int32)
    kv = torch.randn((9, bt, 2, 1, 8), generator=torch.Generator().manual_seed(0))
    tables = torch.tensor([[0, 1, 2, 3, 4], [5, 6, -1, -1, -1]], dtype=torch.int32)
    q = torch.randn((2, 2, 8), generator=torch.Generator().manual_seed(1))
    want = ref.paged_decode_attention(q, kv, tables.clamp(min=0), lens, 0.3, chunk=chunk)
    torch.testing.assert_close(batched.paged_decode_attention(q, kv, tables, lens, 0.3, chunk=chunk), want)


def test_slots_never_written_do_not_reach_the_output() -> None:
    # every slot the sequences do not own holds NaN (as a pool from torch.empty may): the output equals the
    # reference's, which never reads them, and has no NaN
    q, kv, tables, lens = _case(random.Random(11), torch.float32)
    poisoned = torch.full_like(kv, float("nan"))
    bt = kv.shape[1]
    for b, n in enumerate(lens.tolist()):
        for t in range(n):
            blk = int(tables[b, t // bt])
            poisoned[blk, t % bt] = kv[blk, t % bt]
    want = ref.paged_decode_attention(q, poisoned, tables.clamp(0, kv.shape[0] - 1), lens, 0.25, window=9)
    got = batched.paged_decode_attention(q, poisoned, tables, lens, 0.25, window=9)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want)
