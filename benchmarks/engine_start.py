"""Engine process starts of a multi-process deployment: forked from the fork server vs fresh processes.

Not part of the test suite. For each mode (``serve.fork_engines`` true, then false), ``--rounds`` times in
alternation, it starts a deployment (synthetic model, ``--prefill`` prefill + 1 decode engine processes), and
measures:

* ``start_s``: ``Deployment.start()`` until every engine has registered;
* ``restart_s``: an engine SIGKILLed until the scheduler counts it alive again under its new pid;
* ``serving_s``: a turn's round trip after the restart (the restarted engine serves).

It prints the medians and the ratios forked / fresh, measured in the same run, and writes them to ``--json``.

    python benchmarks/engine_start.py --rounds 3 --json benchmarks/results/engine_start_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from dualpath.config import load_config
from dualpath.control.client import ServeClient
from dualpath.control.launcher import Deployment


def _config(root: Path, fork: bool, prefill: int) -> Any:
    return load_config(None, env={}, overrides={
        "storage": {"kind": "posix", "root": str(root)},
        "transport": {"kind": "zmq"},
        "model": {"kind": "synthetic", "n_layers": 2, "n_kv_heads": 1, "head_dim": 8, "vocab_size": 1000,
                  "decode_step_s": 0.002, "device_tflops": 1000.0, "max_context": 4096},
        "cluster": {"block_tokens": 16, "host_buffer_bytes": 4_000_000, "kv_pool_tokens": 8192, "snic_gbps": None,
                    "devices": "cpu", "deadline_s": 5.0, "prefill_nodes": prefill, "decode_nodes": 1},
        "serve": {"port": 0, "heartbeat_s": 0.1, "dead_after_s": 1.0, "request_deadline_s": 60.0,
                  "fork_engines": fork, "scheduler_standby": False},
    })


def _stats(dep: Deployment, cfg: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with ServeClient.from_config(dep.address, cfg) as c:
            return await c.stats(timeout=5.0)

    return anyio.run(main)


def _turn(dep: Deployment, cfg: Any) -> None:
    async def main() -> None:
        async with ServeClient.from_config(dep.address, cfg) as c:
            await c.run_turn(7, list(range(1, 40)), 4, deadline_s=30.0)

    anyio.run(main)


def _one(fork: bool, prefill: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(Path(tmp) / "kv", fork, prefill)
        dep = Deployment(cfg, workdir=Path(tmp) / "work")
        t0 = time.monotonic()
        dep.start()
        t_start = time.monotonic() - t0
        try:
            _turn(dep, cfg)
            time.sleep(0.5)
            old = dep.kill("pe0")
            t0 = time.monotonic()
            while True:
                new = dep.pid("pe0")
                if new != old:
                    try:
                        st = _stats(dep, cfg)
                    except Exception:
                        st = {}
                    if st.get("pe0.pid") == new and st.get("pe0.alive") == 1:
                        break
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("pe0 did not come back within 60 s")
                time.sleep(0.02)
            t_restart = time.monotonic() - t0
            t0 = time.monotonic()
            _turn(dep, cfg)
            t_serve = time.monotonic() - t0
            forked = dep.forked
        finally:
            dep.stop()
    return {"start_s": t_start, "restart_s": t_restart, "serving_s": t_serve, "forked": forked}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefill", type=int, default=2, help="prefill engine processes (plus 1 decode)")
    p.add_argument("--json")
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"forked": [], "fresh": []}
    for _ in range(a.rounds):  # alternating, so a drift in the machine's speed hits both
        for fork in (True, False):
            runs["forked" if fork else "fresh"].append(_one(fork, a.prefill))
    out: dict[str, Any] = {"engines": a.prefill + 1, "cpus": os.cpu_count(), "rounds": a.rounds, "runs": runs}
    for what in ("start_s", "restart_s"):
        f = statistics.median(r[what] for r in runs["forked"])
        c = statistics.median(r[what] for r in runs["fresh"])
        out[what] = {"forked": f, "fresh": c, "ratio": f / c}
        print(f"{what:10s} forked {f:.2f} s  fresh {c:.2f} s  ratio {f / c:.2f}  "
              f"(each: {', '.join(f'{r[what]:.2f}' for r in runs['forked'])} | "
              f"{', '.join(f'{r[what]:.2f}' for r in runs['fresh'])})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
