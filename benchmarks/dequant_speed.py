"""How fast packed integer checkpoints are dequantized at load (``dualpath.model.int_quant``), against the cast an
unquantized fp16 checkpoint's weight needs anyway (fp16 -> fp32) in the same run.

One Llama-7B-sized MLP weight (``--out`` x ``--in``, 11008 x 4096 by default) in each layout, from random packed
words: GPTQ 4-bit in groups of 128 (contiguous, and act order), 3-bit and 8-bit; AWQ 4-bit; compressed-tensors
4-bit with zero points, NVFP4 and MXFP4; MLX 4-bit. Each row: best of ``--repeat`` wall times, weights per second, and the ratio of its time to
the fp16 cast's. Run: ``python benchmarks/dequant_speed.py [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from dualpath.model.int_quant import IntQuant, dequantized
from dualpath.model.mlx_quant import MlxQuant, mlx_dequantized
from dualpath.model.mx_quant import mx_dequantized


def _words(*shape: int) -> torch.Tensor:
    return torch.randint(-2 ** 31, 2 ** 31 - 1, shape, dtype=torch.int32)


def _bytes(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def other_cases(n_out: int, n_in: int) -> dict[str, Any]:
    """Readers other than ``int_quant.dequantized``: name -> a call that dequantizes one weight."""
    nv = {"m.weight_packed": _bytes(n_out, n_in // 2), "m.weight_global_scale": torch.tensor([448.0 * 6]),
          "m.weight_scale": (torch.rand(n_out, n_in // 16) + 0.5).to(torch.float8_e4m3fn)}
    mx = {"m.weight_packed": _bytes(n_out, n_in // 2), "m.weight_scale": torch.randint(120, 130, (n_out, n_in // 32),
                                                                                      dtype=torch.uint8)}
    mlx = {"m.weight": _words(n_out, n_in // 8).view(torch.uint32), "m.scales": torch.rand(n_out, n_in // 64).half(),
           "m.biases": torch.rand(n_out, n_in // 64).half()}
    return {"ct_nvfp4": lambda: mx_dequantized(nv), "ct_mxfp4": lambda: mx_dequantized(mx),
            "mlx_4bit": lambda: mlx_dequantized(mlx, MlxQuant(4, 64))}


def cases(n_out: int, n_in: int, group: int = 128) -> dict[str, tuple[dict[str, torch.Tensor], IntQuant]]:
    groups = n_in // group
    out: dict[str, tuple[dict[str, torch.Tensor], IntQuant]] = {}
    for bits, act in ((4, False), (4, True), (3, False), (8, False)):
        g_idx = (torch.randperm(n_in) if act else torch.arange(n_in)) // group
        out[f"gptq_{bits}bit{'_act_order' if act else ''}"] = (
            {"m.qweight": _words(n_in * bits // 32, n_out), "m.qzeros": _words(groups, n_out * bits // 32),
             "m.scales": torch.rand(groups, n_out).half(), "m.g_idx": g_idx.int()}, IntQuant("gptq", (bits,), group))
    out["awq_4bit"] = ({"m.qweight": _words(n_in, n_out // 8), "m.qzeros": _words(groups, n_out // 8),
                        "m.scales": torch.rand(groups, n_out).half()}, IntQuant("awq", (4,), group))
    out["ct_4bit_zero_point"] = ({"m.weight_packed": _words(n_out, n_in // 8), "m.weight_scale": torch.rand(n_out, groups),
                                  "m.weight_shape": torch.tensor([n_out, n_in]),
                                  "m.weight_zero_point": _words(n_out // 8, groups)},
                                 IntQuant("compressed-tensors", (4,)))
    return out


def best(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=11008, dest="n_out")
    ap.add_argument("--in", type=int, default=4096, dest="n_in")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    n = a.n_out * a.n_in
    fp16 = torch.randn(a.n_out, a.n_in).half()
    base = best(lambda: fp16.float(), a.repeat)
    rows = [{"case": "fp16_cast (baseline)", "s": base, "mweights_per_s": n / base / 1e6, "ratio": 1.0}]
    for name, (tensors, q) in cases(a.n_out, a.n_in).items():
        t = best(lambda tensors=tensors, q=q: dequantized(tensors, q), a.repeat)
        rows.append({"case": name, "s": t, "mweights_per_s": n / t / 1e6, "ratio": t / base})
    for name, call in other_cases(a.n_out, a.n_in).items():
        t = best(call, a.repeat)
        rows.append({"case": name, "s": t, "mweights_per_s": n / t / 1e6, "ratio": t / base})
    print(f"{'case':<24} {'ms':>8} {'M weights/s':>12} {'time / fp16 cast':>17}")
    for r in rows:
        print(f"{r['case']:<24} {r['s'] * 1e3:>8.0f} {r['mweights_per_s']:>12.0f} {r['ratio']:>17.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": [a.n_out, a.n_in], "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
