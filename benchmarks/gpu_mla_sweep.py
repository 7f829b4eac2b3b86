"""Tile and launch settings of the MLA latent kernels, swept on a GPU: which (block_m, block_n, num_warps,
num_stages) is fastest for absorbed decode (bf16 and FP8 pages) and prefill with a cached prefix.

    PYTHONPATH=src python3 benchmarks/gpu_mla_sweep.py [--heads 128] [--budget-s 200] [--json OUT]

Shapes as benchmarks/gpu_mla_bench.py (decode: batch 64, 8K context; prefill: batch 4, 4K cached + 512 new;
latent 512 + 64, 64-token pages). Every setting's output is compared with the default setting's (max abs
difference); a setting the compiler refuses (shared memory, registers) is recorded as such. Settings are tried
until ``--budget-s`` is spent (compiles dominate), then the best of each case is printed with its speed-up over
the default. ``--smoke`` checks the script on CPU through the Triton interpreter (measures nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

import torch

DEFAULT = (None, None, None, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("gpu_mla_sweep: no CUDA device (use --smoke)", file=sys.stderr)
        return 2
    from dualpath.kernels import mla_attention as k
    from dualpath.kernels import reference as ref

    dev = "cpu" if a.smoke else "cuda"
    t_end = time.perf_counter() + a.budget_s

    def timed(fn: Any) -> float:
        if a.smoke:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        fn()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(a.iters):
            fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3 / a.iters

    r, p, bt, h = 512, 64, 64, a.heads
    b, ctx = (2, 128) if a.smoke else (64, 8192)
    g = torch.Generator(device=dev).manual_seed(0)
    nb = b * ctx // bt
    lat = torch.randn(nb * bt, r + p, device=dev, generator=g, dtype=torch.bfloat16)
    tables = torch.randperm(nb, device=dev, generator=g).to(torch.int32).view(b, ctx // bt)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = (torch.randn(b, h, r + p, device=dev, generator=g) * 0.05).to(torch.bfloat16)
    scale = 192 ** -0.5
    pages = {"bfloat16": lat.view(nb, bt, r + p), "fp8": ref.quantize_latent_fp8(lat, r).view(nb, bt, -1)}

    pb, cached, new = (1, 48, 16) if a.smoke else (4, 4096, 512)
    n = cached + new
    pnb = pb * n // bt
    plat = torch.randn(pnb * bt, r + p, device=dev, generator=g, dtype=torch.bfloat16).view(pnb, bt, r + p)
    ptables = torch.arange(pnb, device=dev, dtype=torch.int32).view(pb, n // bt)
    cu = torch.arange(0, (pb + 1) * new, new, device=dev, dtype=torch.int32)
    plens = torch.full((pb,), n, dtype=torch.int32, device=dev)
    pstart = torch.full((pb,), cached, dtype=torch.int32, device=dev)
    pq = (torch.randn(pb * new, h, r + p, device=dev, generator=g) * 0.05).to(torch.bfloat16)

    def run(case: str, cfg: tuple[Any, ...]) -> torch.Tensor:
        bm, bn, nw, ns = cfg
        if case == "prefill":
            return k.mla_prefill_attention(pq, plat, ptables, cu, plens, pstart, scale, r, block_m=bm, block_n=bn,
                                           num_warps=nw, num_stages=ns)
        return k.mla_decode_attention(q, pages[case.split("_")[1]], tables, lens, scale, r, block_m=bm,
                                      block_n=bn, num_warps=nw, num_stages=ns)

    launch = [(4, 2), (8, 1), (8, 2)] if not a.smoke else [(4, 2)]
    grids = {
        "decode_bfloat16": list(itertools.product([16, 32, 64], [16, 32, 64], launch)),
        "prefill": list(itertools.product([32, 64, 128], [32, 64], launch)),
    }
    if a.smoke:
        grids = {"decode_bfloat16": [(16, 16, (4, 2))], "prefill": [(16, 16, (4, 2))]}
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", "heads": h,
                           "decode_shape": [b, ctx], "prefill_shape": [pb, cached, new], "cases": {}}

    def sweep(case: str, cfgs: list[tuple[Any, ...]]) -> None:
        base = run(case, DEFAULT).float()
        t_def = timed(lambda: run(case, DEFAULT))
        rows: list[dict[str, Any]] = [{"cfg": "default", "ms": t_def * 1e3}]
        print(f"{case}: default {t_def * 1e3:.3f} ms", flush=True)
        for cfg in cfgs:
            if time.perf_counter() > t_end:
                rows.append({"cfg": "budget spent", "untried": len(cfgs) - (len(rows) - 1)})
                break
            try:
                err = float((run(case, cfg).float() - base).abs().max())
                t = timed(lambda c=cfg: run(case, c))
            except Exception as exc:  # out of shared memory / registers: this setting does not exist here
                rows.append({"cfg": list(cfg), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                continue
            rows.append({"cfg": list(cfg), "ms": t * 1e3, "max_diff_vs_default": err, "speedup": t_def / t})
            print(f"  {cfg}: {t * 1e3:.3f} ms ({t_def / t:.2f}x), diff {err:.2e}", flush=True)
        ok = [x for x in rows if "speedup" in x and x["max_diff_vs_default"] < 5e-2]
        best = max(ok, key=lambda x: x["speedup"]) if ok else None
        res["cases"][case] = {"rows": rows, "best": best}
        if best:
            print(f"{case}: best {best['cfg']} {best['ms']:.3f} ms = {best['speedup']:.2f}x the default", flush=True)

    def flat(cfgs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [(bm, bn, nw, ns) for bm, bn, (nw, ns) in cfgs]

    sweep("decode_bfloat16", flat(grids["decode_bfloat16"]))
    # FP8 pages: the best bf16 settings (the dequantization adds work, not tiles) and the default
    bf = res["cases"]["decode_bfloat16"]["rows"]
    top = sorted((x for x in bf if "speedup" in x), key=lambda x: -x["speedup"])[:4]
    sweep("decode_fp8", [tuple(x["cfg"]) for x in top])
    sweep("prefill", flat(grids["prefill"]))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
