"""Requests that share a prefix while it is being computed: the hit achieved against the trace's ideal, and Basic
against DualPath, with and without holding them until the prefix is stored (``GlobalScheduler.hold``).

Simulates ``synthetic_mooncake(n, seed)`` (Mooncake-format traces whose sessions share system prompts) for n in
50, 200, 800 and 2000 and seeds 0-2, on DS 660B 2P4D and DS 27B 1P1D, offline and online: 48 cells, each run
once holding (the default, ``inflight_prefix_min_tokens`` 256) and once not (``None``). Prints one line per cell
(hit / ideal and Basic / DualPath JCT, both ways) and the extremes; ``--json OUT`` writes them.

    python benchmarks/shared_prefix_hold.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from dualpath.sim.runner import run_policy, scenario_from_preset
from dualpath.workload.traces import ideal_hit_rate, load_trace, synthetic_mooncake

PRESETS = ("ds660b-2p4d-64k", "ds27b-1p1d-64k")


def _cell(trajs: list, preset: str, mode: str, hold: bool) -> tuple[float, float]:
    """(DualPath's achieved hit rate, Basic JCT / DualPath JCT)."""
    runs = {}
    for policy in ("basic", "dualpath"):
        sc = scenario_from_preset(preset, trajectories=trajs)
        sc.mode = mode
        if not hold:
            sc.inflight_prefix_min_tokens = None
        runs[policy] = run_policy(sc, policy)
    return runs["dualpath"]["hit_rate"], runs["basic"]["jct_s"] / runs["dualpath"]["jct_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (50, 200, 800, 2000):
            for seed in (0, 1, 2):
                path = Path(tmp) / f"mc{n}-s{seed}.jsonl"
                path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_mooncake(n, seed)))
                trajs = load_trace(path, "mooncake").trajectories
                ideal = ideal_hit_rate(trajs)
                for preset in PRESETS:
                    for mode in ("offline", "online"):
                        hit, ratio = _cell(trajs, preset, mode, True)
                        hit0, ratio0 = _cell(trajs, preset, mode, False)
                        rows.append({"n": n, "seed": seed, "preset": preset, "mode": mode, "ideal_hit": ideal,
                                     "hit": hit, "ratio": ratio, "hit_no_hold": hit0, "ratio_no_hold": ratio0})
                        print(f"{n:5d} s{seed} {preset:16s} {mode:8s} hit {hit:.3f} (no hold {hit0:.3f}) of "
                              f"{ideal:.3f}; Basic/DualPath JCT {ratio:.3f} (no hold {ratio0:.3f})", flush=True)
    short = min(r["hit"] / r["ideal_hit"] for r in rows if r["ideal_hit"] > 0)
    short0 = min(r["hit_no_hold"] / r["ideal_hit"] for r in rows if r["ideal_hit"] > 0)
    worst = min(rows, key=lambda r: r["ratio"])
    worst0 = min(r["ratio_no_hold"] for r in rows)
    print(f"{len(rows)} cells: min hit / ideal {short:.3f} (no hold {short0:.3f}); min Basic / DualPath JCT "
          f"{worst['ratio']:.3f} (n={worst['n']}, s{worst['seed']}, {worst['preset']}, {worst['mode']}; no hold "
          f"{worst0:.3f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cells": rows, "min_hit_over_ideal": short,
                                                   "min_ratio": worst["ratio"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
