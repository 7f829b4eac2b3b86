"""DualPath against Basic on random request traces: how often, and by how much, DualPath finishes after Basic.

The never-lose matrix and ``small_traces_never_lose.py`` run chosen cells; this draws them at random. Each run
writes a Mooncake-format trace (``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids`` of 512-token
blocks) of one of six shapes, 5 to 400 requests at one of five mean gaps (10 ms to 5 s):

* ``mooncake``: sessions that grow by appending 1-8 blocks (half the requests continue a session);
* ``deep``: the same, 90 % continuing, 1-2 blocks per turn;
* ``noreuse``: single requests of 50 to 30,000 tokens, nothing shared (compute only);
* ``burst``: ``mooncake`` with every request at t = 0;
* ``longout``: ``mooncake`` with 500-4,000 output tokens;
* ``mixed``: ``mooncake`` (a different random stream).

and simulates it offline or online (at random) on a preset drawn from DS 660B 2P4D 64K / 48K, DS 27B 1P1D and
Qwen 32B 1P2D, under ``basic`` and ``dualpath``. The ratio is Basic JCT / DualPath JCT (offline: the last agent's
end; online: the last request's), and ``done_p95_s`` (when 95 % of requests were done) gives a second ratio without
the drain. Prints the distribution per shape and per size and the worst runs; ``--json OUT`` writes the rows and
``--keep DIR`` keeps the trace of each run below ``--keep-below`` (default 0.95).

    python benchmarks/never_lose_fuzz.py [--runs 2000] [--seed 0] [--json OUT] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from dualpath.sim.runner import run_policy, scenario_from_preset
from dualpath.workload.traces import load_trace

PRESETS = ("ds660b-2p4d-64k", "ds660b-2p4d-48k", "ds27b-1p1d-64k", "qwen32b-1p2d-64k")
SHAPES = ("mooncake", "deep", "noreuse", "burst", "longout", "mixed")


def trace(rng: random.Random, shape: str, n: int, gap_ms: float) -> list[dict[str, Any]]:
    """``n`` Mooncake-format requests of ``shape`` (module docstring), ``gap_ms`` apart on average."""
    out: list[dict[str, Any]] = []
    sessions: list[list[int]] = []
    next_id, t = 0, 0.0
    for _ in range(n):
        t += 0.0 if shape == "burst" else rng.expovariate(1 / gap_ms)
        if shape == "noreuse":
            tokens = rng.randint(50, 30000)
            blocks = (tokens + 511) // 512
            out.append({"timestamp": int(t), "input_length": tokens, "output_length": rng.randint(1, 2000),
                        "hash_ids": list(range(next_id, next_id + blocks))})
            next_id += blocks
            continue
        if sessions and rng.random() < (0.9 if shape == "deep" else 0.5):
            ids = rng.choice(sessions)
            grow = rng.randint(1, 2 if shape == "deep" else 8)
        else:
            ids = []
            sessions.append(ids)
            grow = rng.randint(1, 100)
        ids += range(next_id, next_id + grow)
        next_id += grow
        del ids[120:]  # (at most 60K tokens)
        gen = rng.randint(500, 4000) if shape == "longout" else rng.randint(1, 600)
        out.append({"timestamp": int(t), "input_length": len(ids) * 512 - rng.randint(0, 511), "output_length": gen,
                    "hash_ids": list(ids)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows and the summary here")
    ap.add_argument("--keep", help="keep the traces of the runs below --keep-below in this directory")
    ap.add_argument("--keep-below", type=float, default=0.95)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            shape, n = rng.choice(SHAPES), rng.choice((5, 20, 60, 150, 400))
            gap = rng.choice((10, 100, 300, 1000, 5000))
            reqs = trace(rng, shape, n, gap)
            path = Path(tmp) / f"run{i}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
            preset, mode = rng.choice(PRESETS), rng.choice(("offline", "online"))
            sc = scenario_from_preset(preset, trajectories=load_trace(path, "mooncake").trajectories)
            sc.mode = mode
            basic, dual = (run_policy(sc, p) for p in ("basic", "dualpath"))
            row = {"run": i, "shape": shape, "requests": n, "gap_ms": gap, "preset": preset, "mode": mode,
                   "basic_jct_s": basic["jct_s"], "dualpath_jct_s": dual["jct_s"],
                   "ratio": basic["jct_s"] / dual["jct_s"], "ratio_p95": basic["done_p95_s"] / dual["done_p95_s"]}
            rows.append(row)
            if args.keep and row["ratio"] < args.keep_below:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / f"run{i}_{shape}_{preset}_{mode}.jsonl").write_text(path.read_text())

    def dist(values: list[float]) -> dict[str, Any]:
        return {"runs": len(values), "min": round(min(values), 3), "median": round(statistics.median(values), 3),
                "mean": round(statistics.mean(values), 3), "below_0.99": sum(v < 0.99 for v in values),
                "below_0.95": sum(v < 0.95 for v in values), "above_1.01": sum(v > 1.01 for v in values)}

    summary: dict[str, Any] = {"all": dist([r["ratio"] for r in rows]),
                               "all_p95": dist([r["ratio_p95"] for r in rows])}
    for key in ("shape", "requests", "preset", "mode"):
        groups: dict[Any, list[float]] = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r["ratio"])
        summary[f"by_{key}"] = {str(k): dist(v) for k, v in sorted(groups.items())}
    print("Basic / DualPath JCT:", summary["all"])
    print("the same at 95 % of requests done:", summary["all_p95"])
    for key in ("shape", "requests"):
        for k, d in summary[f"by_{key}"].items():
            print(f"  {key} {k:>10s}: {d}")
    print("worst runs:")
    for r in sorted(rows, key=lambda r: r["ratio"])[:5]:
        print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"command": "python benchmarks/never_lose_fuzz.py --json OUT",
                                               "seed": args.seed, "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
