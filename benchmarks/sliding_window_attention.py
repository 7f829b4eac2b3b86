"""Paged attention with a sliding window vs without, at long context: a windowed layer reads only its window's
blocks (the torch reference, the CPU default backend). Prints, for one layer, the time of a decode step for a
batch of sequences at ``--context`` tokens and of a ``--chunk``-token prefill chunk after a ``--context``-token
cached prefix, full and with ``--window``, and their ratios (both arms measured in this run, alternating).

    python benchmarks/sliding_window_attention.py [--context 8192] [--window 512] [--batch 8] [--chunk 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dualpath.kernels import paged_decode_attention, paged_prefill_attention


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    bt, hq, hkv, d = 16, 8, 2, 64  # a small GQA layer
    nb_seq = -(-a.context // bt)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((nb_seq * a.batch, bt, 2, hkv, d), generator=g, dtype=torch.float32).to(torch.bfloat16)
    tables = torch.randperm(nb_seq * a.batch, generator=g).to(torch.int32).reshape(a.batch, nb_seq)
    q = torch.randn((a.batch, hq, d), generator=g).to(torch.bfloat16)
    lens = torch.full((a.batch,), a.context, dtype=torch.int32)
    times: dict[str, list[float]] = {"full": [], "window": []}
    for _ in range(a.iters):  # alternate, so load on the machine hits both alike
        for name, w in (("full", None), ("window", a.window)):
            t0 = time.perf_counter()
            paged_decode_attention(q, kv, tables, lens, d ** -0.5, backend="torch", window=w)
            times[name].append(time.perf_counter() - t0)
    full, win = (statistics.median(times[k]) * 1e3 for k in ("full", "window"))
    print(f"decode attention, {a.batch} sequences x {a.context} tokens, one layer (torch backend): "
          f"full {full:.2f} ms, window {a.window} {win:.2f} ms, window / full {win / full:.3f}")
    # prefill: one sequence, a chunk of new tokens after the cached context (its K/V already in the pool)
    seq = a.context + a.chunk
    nb = -(-seq // bt)
    kv1 = torch.randn((nb, bt, 2, hkv, d), generator=g, dtype=torch.float32).to(torch.bfloat16)
    table = torch.arange(nb, dtype=torch.int32)[None, :]
    qp = torch.randn((a.chunk, hq, d), generator=g).to(torch.bfloat16)
    cu = torch.tensor([0, a.chunk], dtype=torch.int32)
    seq_lens, starts = torch.tensor([seq], dtype=torch.int32), torch.tensor([a.context], dtype=torch.int32)
    times = {"full": [], "window": []}
    for _ in range(a.iters):
        for name, w in (("full", None), ("window", a.window)):
            t0 = time.perf_counter()
            paged_prefill_attention(qp, kv1, table, cu, seq_lens, starts, d ** -0.5, backend="torch", window=w)
            times[name].append(time.perf_counter() - t0)
    full, win = (statistics.median(times[k]) * 1e3 for k in ("full", "window"))
    print(f"prefill attention, a {a.chunk}-token chunk after {a.context} cached tokens, one layer (torch backend): "
          f"full {full:.2f} ms, window {a.window} {win:.2f} ms, window / full {win / full:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
