"""``dualpath bench serve``: the same trace and config served in one process and as a deployment.

In-process: the emulated cluster through the scheduler driver (:func:`dualpath.runtime.runner.run_policy`, the
loopback transport). Deployment: engines and the scheduler as separate processes (``Deployment``, the zmq
transport between engines, the control protocol between scheduler and engines) driven by a client over the
serve port. Both run the same offline trace (agents x turns, seeded) on the same model, storage kind and
cluster; each side gets a fresh storage root, so the two start equally cold.

Throughput is completed turns per second of the client's job completion time (the deployment's start-up is not
counted). JSON: top-level ``"ratio"`` (deployment / in-process throughput; the target is >= 0.90) and
``"same_tokens"`` (every turn produced identical tokens on both sides), plus both sides' figures.

    dualpath bench serve --json serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

VOCAB = 32000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    parser.add_argument("--agents", type=int, default=8, help="agents in the trace (default 8)")
    parser.add_argument("--turns", type=int, default=4, help="turns per agent (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per side, alternating, median reported (default 3: one run swings +-10 %% here)")
    parser.add_argument("--root", default=None, help="directory for the storage roots (default: a temp dir)")


def bench_config(root: Path) -> Any:
    """The deployment's config: a small synthetic model, posix storage, zmq between engines, CPU devices."""
    from dualpath.config import load_config

    return load_config(None, env={}, overrides={
        "storage": {"kind": "posix", "root": str(root)},
        "transport": {"kind": "zmq"},
        "model": {"kind": "synthetic", "n_layers": 4, "n_kv_heads": 2, "head_dim": 64, "vocab_size": VOCAB,
                  "decode_step_s": 0.01, "device_tflops": 20.0, "max_context": 16384},
        "cluster": {"block_tokens": 64, "snic_gbps": None, "devices": "cpu", "kv_pool_tokens": 65536,
                    "host_buffer_bytes": 64 << 20},
        "serve": {"port": 0},
        "workload": {"ttft_slo_s": 2.0, "tpot_slo_s": 0.1},
    })


def make_trace(n: int, turns: int, seed: int) -> list[Any]:
    import numpy as np

    from dualpath.workload.trajectory import Trajectory, Turn

    rng = np.random.default_rng(seed)
    return [Trajectory(a, [Turn(int(rng.integers(100, 400)), int(rng.integers(8, 24))) for _ in range(turns)])
            for a in range(n)]


def _tokens(res: Any) -> dict[tuple[int, int], list[int]]:
    return {(r.agent, r.turn): list(r.outcome.tokens) for r in res.records}


def run_inprocess(cfg: Any, trajs: list[Any], root: Path) -> Any:
    import anyio

    from dualpath.config import DualPathConfig
    from dualpath.runtime.runner import PolicyRun, run_policy

    data = cfg.model_dump(mode="python")
    data["transport"] = {"kind": "loopback"}
    data["storage"]["root"] = str(root)
    inproc_cfg = DualPathConfig.model_validate(data)
    run = PolicyRun("dualpath")
    anyio.run(lambda: run_policy(inproc_cfg, "dualpath", trajs, run))
    return run.client


def run_deployment(cfg: Any, trajs: list[Any], root: Path, workdir: Path) -> tuple[Any, float]:
    import anyio

    from dualpath.config import DualPathConfig
    from dualpath.control.client import ServeClient
    from dualpath.control.launcher import Deployment
    from dualpath.runtime.clients import run_offline

    data = cfg.model_dump(mode="python")
    data["storage"]["root"] = str(root)
    dep_cfg = DualPathConfig.model_validate(data)
    t0 = time.perf_counter()
    with Deployment(dep_cfg, workdir=workdir) as dep:
        startup = time.perf_counter() - t0

        async def go() -> Any:
            async with ServeClient.from_config(dep.address, dep_cfg) as c:
                return await run_offline(c, trajs, vocab_size=VOCAB)

        return anyio.run(go), startup


def _side(res: Any) -> dict[str, Any]:
    n = len(res.records)
    return {"turns": n, "jct_s": round(res.jct, 4), "turns_per_s": round(n / res.jct, 3) if res.jct else 0.0}


def run(args: argparse.Namespace) -> int:
    import statistics

    from dualpath.errors import ConfigError

    agents, turns, repeats = int(args.agents), int(args.turns), int(args.repeats)
    if min(agents, turns, repeats) <= 0:
        raise ConfigError("bench serve: --agents, --turns and --repeats must be positive")
    if int(args.seed) < 0:
        raise ConfigError(f"bench serve: --seed must be >= 0, got {args.seed}")
    if args.root is not None and (not args.root or not Path(args.root).is_dir()):  # ('' would be the cwd)
        raise ConfigError(f"bench serve: --root {args.root!r}: not a directory")
    trajs = make_trace(agents, turns, int(args.seed))
    inproc: list[dict[str, Any]] = []
    multi: list[dict[str, Any]] = []
    same = True
    with tempfile.TemporaryDirectory(prefix="dualpath-bench-serve-", dir=args.root) as tmp:
        work = Path(tmp)
        cfg = bench_config(work / "kv")
        for r in range(repeats):  # alternate, so drift on a shared box hits both sides alike
            a = run_inprocess(cfg, trajs, work / f"inproc-kv-{r}")
            inproc.append(_side(a))
            print(f"  in-process:  {inproc[-1]['turns_per_s']:.2f} turns/s ({inproc[-1]['turns']} turns)", flush=True)
            b, startup = run_deployment(cfg, trajs, work / f"multi-kv-{r}", work / f"dep-{r}")
            multi.append({**_side(b), "startup_s": round(startup, 3)})
            print(f"  deployment:  {multi[-1]['turns_per_s']:.2f} turns/s ({multi[-1]['turns']} turns, "
                  f"start-up {startup:.1f} s)", flush=True)
            same = same and _tokens(a) == _tokens(b)
    ip = statistics.median(x["turns_per_s"] for x in inproc)
    mp = statistics.median(x["turns_per_s"] for x in multi)
    ratio = mp / ip if ip else 0.0
    result = {
        "bench": "serve", "ratio": round(ratio, 3), "same_tokens": same, "target": 0.90, "met": ratio >= 0.90,
        "ratio_definition": "deployment (multi-process, zmq) / in-process (loopback) throughput, completed turns "
                            "per second of the client's job completion time; medians over repeats",
        "inprocess_turns_per_s": round(ip, 3), "multiprocess_turns_per_s": round(mp, 3),
        "inprocess": inproc, "multiprocess": multi,
        "trace": {"agents": agents, "turns": turns, "seed": int(args.seed)}, "repeats": repeats,
        "cpu_count": os.cpu_count(),
    }
    print(f"ratio (deployment / in-process) = {ratio:.3f}; same tokens: {same}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json_out}")
    return 0 if same else 1
