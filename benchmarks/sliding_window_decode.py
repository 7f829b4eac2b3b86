"""Decode attention with a sliding window vs without, at long context: a windowed layer reads only its window's
blocks (the torch reference, the CPU default backend). Prints the time per decode step of one layer for a batch
of sequences at ``--context`` tokens, full and with ``--window``, and their ratio (both measured in this run).

    python benchmarks/sliding_window_decode.py [--context 8192] [--window 512] [--batch 8] [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dualpath.kernels import paged_decode_attention


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
