"""Triton KV store and Layer Block gather/scatter against the torch reference, plus launcher validation."""

from __future__ import annotations

import pytest
import torch

from dualpath.errors import KernelError
from dualpath.kernels import kv_copy as tri
from dualpath.kernels import reference as ref
from dualpath.kernels import resolve_backend
from dualpath.kv.layout import KVLayout, KVSpec


@pytest.mark.parametrize(("bt", "hkv", "d", "dtype"), [(16, 1, 16, torch.float32), (32, 3, 48, torch.bfloat16),
                                                       (64, 2, 64, torch.float16), (128, 8, 16, torch.float32)])
@pytest.mark.parametrize("skip", [True, False], ids=["a-slot-skipped", "every-slot"])
@pytest.mark.parametrize("block_n", [None, 1, 8])
def test_store_kv_matches_reference(device, bt, hkv, d, dtype, skip, block_n):
    """The Triton store against the reference, with a skipped slot (the reference's masked path) and without (its
    one-copy path): the same pool, bit for bit, and every stored row where its slot says. One token per program
    (a GPU's default), 8 (29 tokens: the last program's tokens past the end masked) and the default here."""
    nb, n = 7, 29
    g = torch.Generator().manual_seed(0)
    # inputs in the pool dtype, except fp16 pools fed fp32 (the cast path; the interpreter truncates fp32->bf16)
    in_dtype = torch.float32 if dtype == torch.float16 else dtype
    k = torch.randn((n, hkv, d), generator=g).to(device=device, dtype=in_dtype)
    v = torch.randn((n, hkv, d), generator=g).to(device=device, dtype=in_dtype)
    slots = torch.randperm(nb * bt, generator=g)[:n].to(device)
    if skip:
        slots[3] = -1
    a = torch.zeros((nb, bt, 2, hkv, d), dtype=dtype, device=device)
    b = a.clone()
    ref.store_kv(k, v, a, slots)
    tri.store_kv(k, v, b, slots, block_n=block_n)
    assert torch.equal(a, b)
    for i in (0, 3, n - 1):
        s_ = int(slots[i])
        if s_ >= 0:
            assert torch.equal(a[s_ // bt, s_ % bt, 0], k[i].to(dtype)) and torch.equal(a[s_ // bt, s_ % bt, 1],
                                                                                          v[i].to(dtype))
    assert int(a.abs().sum(dim=(2, 3, 4)).ne(0).sum()) == n - int(skip)


def test_store_kv_large_block_ids(device):
    bt, hkv, d = 16, 1, 16
    nb = (1 << 31) // (bt * 2 * hkv * d) + 8
    pool = torch.empty((nb, bt, 2, hkv, d), dtype=torch.float16, device=device)
    slots = torch.tensor([(nb - 1) * bt + 5, (nb - 3) * bt], dtype=torch.int64, device=device)
    k = torch.randn((2, hkv, d), device=device, dtype=torch.float16)
    v = torch.randn((2, hkv, d), device=device, dtype=torch.float16)
    tri.store_kv(k, v, pool, slots)
    assert torch.equal(pool[nb - 1, 5, 0], k[0]) and torch.equal(pool[nb - 3, 0, 1], v[1])
    staged = tri.gather_layer_blocks(pool, torch.tensor([nb - 1, nb - 3], device=device))
    assert torch.equal(staged[0, 5, 0], k[0]) and torch.equal(staged[1, 0, 1], v[1])
    tri.scatter_layer_blocks(staged.flip(0), pool, torch.tensor([nb - 2, nb - 4], device=device))
    assert torch.equal(pool[nb - 4, 5, 0], k[0]) and torch.equal(pool[nb - 2, 0, 1], v[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter_typed_and_full_block_bytes(device, dtype):
    n_layers, nb, bt, hkv, d = 3, 11, 16, 2, 32
    spec = KVSpec.mha(n_layers, hkv, d, {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    layout = KVLayout(spec, bt)
    g = torch.Generator().manual_seed(1)
    data = torch.randn((n_layers, nb, bt, 2, hkv, d), generator=g).to(device=device, dtype=dtype)
    ids = torch.tensor([9, 2, 5, 10], device=device)
    layer = data[1]  # a view with a storage offset
    # typed staging
    staged = tri.gather_layer_blocks(layer, ids)
    assert torch.equal(staged, ref.gather_layer_blocks(layer, ids))
    # into a Full Block buffer's layer slice (uint8, strided across blocks): bytes equal the layout's Layer Block
    full = layout.alloc_full_blocks(4, device=device)
    full.zero_()
    tri.gather_layer_blocks(layer, ids, full[:, 1:2])
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(full[i, 1], layer[b].view(torch.uint8).reshape(bt, -1))
    assert int(full[:, 0].count_nonzero()) == 0 and int(full[:, 2].count_nonzero()) == 0
    # scatter back into other blocks of another layer, from both staging forms
    other = data[2].clone()
    want = other.clone()
    ref.scatter_layer_blocks(full[:, 1:2], want, torch.tensor([0, 1, 3, 4], device=device))
    tri.scatter_layer_blocks(full[:, 1:2], other, torch.tensor([0, 1, 3, 4], device=device))
    assert torch.equal(other, want)
    assert torch.equal(other[[0, 1, 3, 4]], staged)
    other2 = data[0].clone()
    tri.scatter_layer_blocks(staged, other2, torch.tensor([6, 7, 8, 1], dtype=torch.int32, device=device))
    assert torch.equal(other2[[6, 7, 8, 1]], staged)
    untouched = [i for i in range(nb) if i not in (6, 7, 8, 1)]
    assert torch.equal(other2[untouched], data[0][untouched])


def test_launchers_reject_bad_arguments(device):
    kv = torch.zeros((4, 16, 2, 2, 16), device=device)
    q = torch.zeros((1, 4, 16), device=device)
    tables = torch.zeros((1, 2), dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    from dualpath.kernels import paged_attention as pa

    with pytest.raises(KernelError, match="dtype"):
        pa.paged_decode_attention(q.half(), kv, tables, lens, 1.0)
    with pytest.raises(KernelError, match="q has shape"):
        pa.paged_decode_attention(torch.zeros((1, 4, 8), device=device), kv, tables, lens, 1.0)
    with pytest.raises(KernelError, match="multiple"):
        pa.paged_decode_attention(torch.zeros((1, 3, 16), device=device), kv, tables, lens, 1.0)
    with pytest.raises(KernelError, match="kv_layer"):
        pa.paged_decode_attention(q, kv[:, :, :1], tables, lens, 1.0)
    with pytest.raises(KernelError, match="last dimension"):
        pa.paged_decode_attention(q, kv.transpose(3, 4), tables, lens, 1.0)
    with pytest.raises(KernelError, match="seq_lens"):
        pa.paged_decode_attention(q, kv, tables, lens.float(), 1.0)
    with pytest.raises(KernelError, match="cu_seqlens_q"):
        pa.paged_prefill_attention(q, kv, tables, torch.tensor([0, 2], dtype=torch.int32, device=device), lens,
                                   lens - 1, 1.0)
    with pytest.raises(KernelError, match="slot_mapping"):
        tri.store_kv(q[:, :2], q[:, :2], kv, torch.zeros(1, dtype=torch.int32, device=device))
    with pytest.raises(KernelError, match="block_n must be a power of two, got 3"):
        tri.store_kv(q[:, :2], q[:, :2], kv, torch.zeros(1, dtype=torch.int64, device=device), block_n=3)
    with pytest.raises(KernelError, match="bytes per block"):
        tri.gather_layer_blocks(kv, torch.tensor([0], device=device), torch.zeros((1, 100), dtype=torch.uint8,
                                                                                   device=device))
    if device == "cpu":
        with pytest.raises(KernelError, match="out of range"):
            tri.gather_layer_blocks(kv, torch.tensor([4]))


def test_backend_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("DUALPATH_KERNELS", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("DUALPATH_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(None, cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(KernelError, match="unknown kernel backend"):
        resolve_backend("cuda-graphs", cpu)
