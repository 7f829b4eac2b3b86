"""Chunked prefill on the runtime PE: `dualpath run --policy dualpath` with a compute quota that binds, against
the same run with a quota that never binds (one forward per request or batch) and, optionally, against another
prefill engine (e.g. the engine before chunked prefill, which ran a request the quota would cut whole):

    python3 benchmarks/chunked_prefill.py CONFIG.yaml [--agents N] [--repeats K] [--baseline-engine FILE.py]

``--baseline-engine``: a Python file defining ``PrefillEngine`` (for the engine before chunked prefill:
``git show 2f317d5:src/dualpath/engine/prefill.py > /tmp/whole_prefill.py``). Variants run interleaved, K times
each; the script prints the medians and the ratios chunked / baseline (JCT, throughput, TTFT p50/p99, TPOT p50),
and each PE's forwards and chunks. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

import dualpath.cluster.runner as cluster_runner
from dualpath.cli import main
from dualpath.engine.prefill import PrefillEngine

METRICS = ("jct_s", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "prefill_forwards",
           "prefill_chunks")


def _engine_from(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("baseline_prefill", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PrefillEngine


def _run(engine: Any, config: Path, agents: int, out: Path) -> dict[str, Any]:
    cluster_runner.PrefillEngine = engine  # type: ignore[misc]
    try:
        rc = main(["run", "--agents", str(agents), "--policy", "dualpath", "--quiet", "--config", str(config),
                   "--json", str(out)])
    finally:
        cluster_runner.PrefillEngine = PrefillEngine  # type: ignore[misc]
    run = json.loads(out.read_text())["runs"][0]
    if rc != 0 or not run["complete"]:
        raise SystemExit(f"run failed: {run.get('error')}")
    return run


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-engine")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chunked-bench-"))
    base = yaml.safe_load(Path(a.config).read_text()) or {}
    quota = base.get("scheduler", {}).get("compute_quota_s")
    if quota is None:
        raise SystemExit("the config must set scheduler.compute_quota_s (a quota that binds)")
    loose = json.loads(json.dumps(base))
    loose["scheduler"]["compute_quota_s"] = 1e9
    loose_path = tmp / "no-binding-quota.yaml"
    loose_path.write_text(yaml.safe_dump(loose))
    variants: dict[str, tuple[Any, Path]] = {"chunked": (PrefillEngine, Path(a.config)),
                                             "quota-not-binding": (PrefillEngine, loose_path)}
    if a.baseline_engine:
        variants["baseline-engine"] = (_engine_from(a.baseline_engine), Path(a.config))
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for rep in range(a.repeats):
        for name, (engine, cfg) in variants.items():
            run = _run(engine, cfg, a.agents, tmp / "run.json")
            res[name].append({m: run.get(m) for m in METRICS})
            print(f"repeat {rep} {name}: " + ", ".join(f"{m}={run.get(m)}" for m in METRICS), flush=True)
    med = {k: {m: statistics.median(x[m] or 0 for x in v) for m in METRICS} for k, v in res.items()}
    print(json.dumps(med, indent=1))
    for other in variants:
        if other == "chunked":
            continue
        ratios = ", ".join(f"{m} {med['chunked'][m] / med[other][m]:.3f}" for m in METRICS[:5] if med[other][m])
        print(f"chunked / {other} (medians of {a.repeats}): {ratios}")


if __name__ == "__main__":
    main_()
