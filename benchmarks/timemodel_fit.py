"""Fit error of the real-model forward-time model (dualpath.engine.timemodel) on this machine.

Calibrates the layer time model of a real model (default: the embedded SmolLM2-135M-Instruct), then measures
held-out (new tokens, cached context) points that are not on the calibration grid, several times, and prints
each point's predicted / measured ratio (medians of repeats) next to the fit's own in-sample and leave-one-out
errors. No cache is read or written.

    python3 benchmarks/timemodel_fit.py [--path MODEL] [--budget 2.0] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--budget", type=float, default=2.0, help="calibration budget, seconds")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each held-out measurement")
    ap.add_argument("--block-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from dualpath.engine.model_api import LlamaAdapter
    from dualpath.engine.timemodel import calibrate_layer_time, measure_layer_times
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    t0 = time.perf_counter()
    model, _ = load_model(LlamaModelConfig(path=a.path), "cpu", with_tokenizer=False)
    ad = LlamaAdapter(model, a.block_tokens, time_model="off")
    dev = torch.device("cpu")
    print(f"model: {model.spec.n_layers} layers, hidden {model.spec.hidden_size}; loaded in "
          f"{time.perf_counter() - t0:.1f} s; torch threads {a.threads}", file=sys.stderr)
    tm = calibrate_layer_time(model, ad.kv_spec, a.block_tokens, dev, max_context=ad.max_context,
                              vocab_size=ad.vocab_size, budget_s=a.budget)
    if tm is None:
        print("calibration measured fewer than 4 points within the budget", file=sys.stderr)
        return 1
    print(tm.describe())
    held = [(48, 0), (96, 384), (200, 1500), (320, 640), (100, 3000), (400, 2000)]
    held = [(n, c) for n, c in held if n + c <= ad.max_context]
    runs = []
    with torch.inference_mode():
        for _ in range(a.repeats):
            runs.append(measure_layer_times(model, ad.kv_spec, a.block_tokens, dev, held, reps=5,
                                            vocab_size=ad.vocab_size))
    ratios = []
    print(f"{'new':>5} {'cached':>6} {'measured ms':>11} {'predicted ms':>12} {'pred/meas':>9}")
    for i, (n, c) in enumerate(held):
        meas = statistics.median(r[i][2] for r in runs)
        pred = tm.layer_s(n, c)
        ratios.append(pred / meas)
        print(f"{n:>5} {c:>6} {meas * 1e3:>11.2f} {pred * 1e3:>12.2f} {pred / meas:>9.2f}")
    errs = [abs(r - 1) for r in ratios]
    print(f"held-out: median |pred/meas - 1| {statistics.median(errs):.1%}, max {max(errs):.1%} "
          f"({len(held)} points x {a.repeats} repeats)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
