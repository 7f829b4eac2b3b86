"""Scheduler failover of a multi-process deployment (issue 13): not part of the test suite.

SIGKILLs the scheduler of a running deployment (1 prefill + 1 decode engine process, synthetic model) while a
client waits on a turn, ``--kills`` times, and reports, per kill:

* ``noticed``: from the kill until the waiting client's turn failed with ``SchedulerLost``, in heartbeat
  intervals (``serve.heartbeat_s``; the target is <= 3);
* ``serving``: from the kill until a new turn (fresh client, same config) returned its tokens, against the
  10 s target.

It runs once with the warm standby scheduler (``serve.scheduler_standby``, the default) and once with a cold
restart (a fresh process), so the two are compared in the same run.

    python benchmarks/scheduler_failover.py --kills 3
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from dualpath.config import load_config
from dualpath.control.client import SchedulerLost, ServeClient
from dualpath.control.launcher import Deployment


def _config(root: Path, standby: bool, heartbeat_s: float) -> Any:
    return load_config(None, env={}, overrides={
        "storage": {"kind": "posix", "root": str(root)},
        "transport": {"kind": "zmq"},
        "model": {"kind": "synthetic", "n_layers": 2, "n_kv_heads": 1, "head_dim": 8, "vocab_size": 1000,
                  "decode_step_s": 0.01, "device_tflops": 1000.0, "max_context": 4096},
        "cluster": {"block_tokens": 16, "host_buffer_bytes": 4_000_000, "kv_pool_tokens": 8192, "snic_gbps": None,
                    "devices": "cpu", "deadline_s": 5.0},
        "serve": {"port": 0, "heartbeat_s": heartbeat_s, "dead_after_s": 1.0, "request_deadline_s": 60.0,
                  "scheduler_standby": standby},
    })


def _one_kill(dep: Deployment, cfg: Any) -> dict[str, float]:
    t: dict[str, float] = {}

    async def waiter() -> None:
        async with ServeClient.from_config(dep.address, cfg) as c:
            try:
                await c.run_turn(1, list(range(1, 40)), 4000)  # long enough to be in flight at the kill
            except SchedulerLost:
                t["noticed"] = time.monotonic()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.sleep(1.0)
            dep.kill("scheduler", signal.SIGKILL)
            t["kill"] = time.monotonic()
        while True:  # a fresh client, the same config, until a turn comes back
            try:
                async with ServeClient.from_config(dep.address, cfg) as c:
                    await c.run_turn(2, [1, 2, 3, 4, 5], 2, deadline_s=5.0)
                    t["serving"] = time.monotonic()
                    return
            except Exception:
                await anyio.sleep(0.05)

    anyio.run(main)
    return {"noticed_s": t["noticed"] - t["kill"], "serving_s": t["serving"] - t["kill"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    p.add_argument("--json")
    a = p.parse_args()
    out: dict[str, Any] = {}
    for standby in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config(Path(tmp) / "kv", standby, a.heartbeat_s)
            with Deployment(cfg, workdir=Path(tmp) / "work") as dep:
                runs = []
                for _ in range(a.kills):
                    time.sleep(14.0 if standby else 0.5)  # (the next standby is ready ~13 s after a takeover)
                    runs.append(_one_kill(dep, cfg))
        name = "standby" if standby else "cold"
        noticed = statistics.median(r["noticed_s"] for r in runs)
        serving = statistics.median(r["serving_s"] for r in runs)
        out[name] = {"runs": runs, "noticed_heartbeats": noticed / a.heartbeat_s, "serving_s": serving,
                     "serving_vs_10s_target": serving / 10.0}
        print(f"{name:8s} scheduler restart: noticed after {noticed:.3f} s = {noticed / a.heartbeat_s:.2f} heartbeats "
              f"(target <= 3); serving again after {serving:.2f} s = {serving / 10.0:.2f} of the 10 s target "
              f"(median of {a.kills})")
    print(f"cold/standby time to serve again: {out['cold']['serving_s'] / out['standby']['serving_s']:.1f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
