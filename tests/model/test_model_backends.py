"""The model with the Triton kernels (interpreter on CPU, native on CUDA) equals the model with the torch
reference kernels; decode through the paged decode kernel equals a prefill of the same token."""

from __future__ import annotations

import os

import pytest
import torch

from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.loader import build_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SPEC = ModelSpec(architecture="qwen2", vocab_size=97, hidden_size=64, intermediate_size=80, n_layers=2, n_heads=4,
                 n_kv_heads=2, head_dim=16, rope_theta=10000.0, attention_bias=True)


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_backend_matches_torch_backend(dtype):
    spec = SPEC.with_dtype(dtype)
    outs = []
    for backend in ("torch", "triton"):
        model = build_model(spec, None, seed=3, device=DEVICE, backend=backend)
        pool = KVPool(spec.kv_spec(), num_blocks=9, block_tokens=16, device=DEVICE, backend=backend)
        t0, t1 = pool.allocate(3), pool.allocate(2)
        first = model(SeqBatch.build([list(range(5, 30)), list(range(40, 57))], [0, 0], [t0, t1], 16, DEVICE),
                      pool.layers)
        # second turn: prefix reuse from the pool, mixed chunk sizes
        second = model(SeqBatch.build([[1, 2, 3, 4, 5, 6, 7], [9]], [25, 17], [t0, t1], 16, DEVICE), pool.layers)
        dec = model.decode_step(torch.tensor([11, 12], device=DEVICE), torch.tensor([32, 18], device=DEVICE),
                                torch.tensor([t0, t1 + [0]], dtype=torch.int32, device=DEVICE), pool.layers)
        outs.append((first, second, dec, pool.data.clone()))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == "float32" else {"atol": 6e-2, "rtol": 5e-2}
    for a, b in zip(outs[0][:3], outs[1][:3], strict=True):
        torch.testing.assert_close(b, a, **tol)
    torch.testing.assert_close(outs[1][3].float(), outs[0][3].float(), **tol)


def test_decode_step_equals_one_token_prefill():
    model = build_model(SPEC, None, seed=1)
    pool = KVPool(SPEC.kv_spec(), num_blocks=6, block_tokens=16)
    table = pool.allocate(3)
    model(SeqBatch.build([list(range(1, 34))], [0], [table], 16), pool.layers)
    snapshot = pool.data.clone()
    dec = model.decode_step(torch.tensor([7]), torch.tensor([33]), torch.tensor([table], dtype=torch.int32),
                            pool.layers)
    pool.data.copy_(snapshot)
    batch = SeqBatch.build([[7, 8]], [33], [table], 16)  # two new tokens: the prefill kernel path
    pre = model(batch, pool.layers, all_positions=True)[0]
    torch.testing.assert_close(dec[0], pre, atol=1e-5, rtol=1e-5)
