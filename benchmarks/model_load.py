"""Model load time with and without torch's default weight initialisation at construction.

Not part of the test suite. ``build_model`` overwrites every parameter after building the modules (a checkpoint's
tensors, or its own seeded weights); since this session it builds them under
:func:`dualpath.model.noinit.skip_default_init`. This measures, in one process and alternating the two modes
``--rounds`` times (after one warm-up load each):

* ``embedded``: ``load_model`` of the embedded SmolLM2-135M checkpoint (safetensors on disk, as a server loads it);
* ``llama_270m``: ``build_model`` of a Llama-shaped spec of ~270 M parameters from tensors already in memory
  (the construction and the copy only).

It prints the median wall and CPU time of each mode and the ratios skipped / default, and writes them to ``--json``.

    python benchmarks/model_load.py --rounds 5 --json benchmarks/results/model_load_cpu2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import dualpath.model.loader as loader
from dualpath.model.config import LlamaModelConfig
from dualpath.model.embedded import embedded_model_path
from dualpath.model.spec import ModelSpec


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # (as the test suite and a 2-core engine run it)
    spec = ModelSpec(architecture="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, n_layers=16,
                     n_heads=16, n_kv_heads=4, head_dim=64)
    tensors = loader.state_dict_for_save(loader.build_model(spec, None, seed=0))
    n_params = sum(t.numel() for t in tensors.values())
    cases: dict[str, Callable[[], Any]] = {
        "embedded": lambda: loader.load_model(LlamaModelConfig(path=str(embedded_model_path()), time_model="off")),
        "llama_270m": lambda: loader.build_model(spec, tensors),
    }
    real = loader.skip_default_init
    modes = {"skipped": real, "default": contextlib.nullcontext}
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {c: {m: [] for m in modes} for c in cases}
    for case, fn in cases.items():
        for ctx in modes.values():  # warm-up
            loader.skip_default_init = ctx  # type: ignore[assignment]
            fn()
        for _ in range(args.rounds):
            for mode, ctx in modes.items():
                loader.skip_default_init = ctx  # type: ignore[assignment]
                samples[case][mode].append(_timed(fn))
    loader.skip_default_init = real
    out: dict[str, Any] = {"command": f"python benchmarks/model_load.py --rounds {args.rounds} --json OUT",
                           "torch_threads": 1, "llama_270m_params": n_params, "cases": {}}
    for case, by_mode in samples.items():
        row: dict[str, Any] = {}
        for mode, xs in by_mode.items():
            row[f"{mode}_wall_s"] = round(statistics.median(w for w, _ in xs), 4)
            row[f"{mode}_cpu_s"] = round(statistics.median(c for _, c in xs), 4)
        row["ratio_wall"] = round(row["skipped_wall_s"] / row["default_wall_s"], 3)
        row["ratio_cpu"] = round(row["skipped_cpu_s"] / row["default_cpu_s"], 3)
        out["cases"][case] = row
        print(f"{case:11s} default {row['default_wall_s']:.3f} s  skipped {row['skipped_wall_s']:.3f} s  "
              f"ratio {row['ratio_wall']:.2f} (CPU {row['ratio_cpu']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
