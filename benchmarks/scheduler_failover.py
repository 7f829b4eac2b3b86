"""Scheduler failover of a multi-process deployment (issue 13): not part of the test suite.

Stops the scheduler of a running deployment (1 prefill + 1 decode engine process, synthetic model) while a
client waits on a turn, ``--kills`` times, and reports, per failure:

* ``noticed``: from the failure until the waiting client's turn failed with ``SchedulerLost``, in heartbeat
  intervals (``serve.heartbeat_s``; the target is <= 3);
* ``killed`` (``--hang``): from the SIGSTOP until the launcher, whose pings the stopped event loop no longer
  answers, SIGKILLed the scheduler (``serve.scheduler_hung_after_s``), in heartbeat intervals;
* ``serving``: from the failure until a new turn (fresh client, same config) returned its tokens, against the
  10 s target; and whether a warm standby or a cold process took over.

The failures come back to back (``--gap-s`` after the deployment serves again; the next standby is started right
after a takeover, so a second failure soon after the first is warm too). It runs once with the warm standby
scheduler (``serve.scheduler_standby``, the default) and once with a cold restart (a fresh process), so the two
are compared in the same run.

    python benchmarks/scheduler_failover.py --kills 3            # SIGKILL
    python benchmarks/scheduler_failover.py --kills 3 --hang     # SIGSTOP: alive but not answering
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


def _one_kill(dep: Deployment, cfg: Any, hang: bool) -> dict[str, Any]:
    t: dict[str, float] = {}
    hung0, warm0 = dep.hung_kills, dep.standby_takeovers

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
            dep.kill("scheduler", signal.SIGSTOP if hang else signal.SIGKILL)
            t["kill"] = time.monotonic()
            while hang and dep.hung_kills == hung0:
                await anyio.sleep(0.01)
            t["killed"] = time.monotonic()
        while True:  # a fresh client, the same config, until a turn comes back
            try:
                async with ServeClient.from_config(dep.address, cfg) as c:
                    await c.run_turn(2, [1, 2, 3, 4, 5], 2, deadline_s=5.0)
                    t["serving"] = time.monotonic()
                    return
            except Exception:
                await anyio.sleep(0.05)

    anyio.run(main)
    return {"noticed_s": t["noticed"] - t["kill"], "killed_s": t["killed"] - t["kill"],
            "serving_s": t["serving"] - t["kill"], "warm": dep.standby_takeovers > warm0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    p.add_argument("--hang", action="store_true", help="SIGSTOP the scheduler instead of SIGKILL")
    p.add_argument("--gap-s", type=float, default=1.0, help="pause after serving again before the next failure")
    p.add_argument("--json")
    a = p.parse_args()
    hb = a.heartbeat_s
    out: dict[str, Any] = {"mode": "hang" if a.hang else "kill", "heartbeat_s": hb, "runs": []}
    for standby in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config(Path(tmp) / "kv", standby, hb)
            with Deployment(cfg, workdir=Path(tmp) / "work") as dep:
                time.sleep(5.0)  # (the first standby's imports)
                runs = []
                for _ in range(a.kills):
                    runs.append(_one_kill(dep, cfg, a.hang))
                    time.sleep(a.gap_s)
        name = "standby" if standby else "cold"
        noticed = statistics.median(r["noticed_s"] for r in runs)
        killed = statistics.median(r["killed_s"] for r in runs)
        serving = statistics.median(r["serving_s"] for r in runs)
        out["runs"].append({"restart": name, "failures": runs, "noticed_heartbeats": noticed / hb,
                            "killed_heartbeats": killed / hb, "serving_s": serving,
                            "serving_vs_10s_target": serving / 10.0,
                            "warm_takeovers": sum(1 for r in runs if r["warm"])})
        hang = f"launcher killed it after {killed:.2f} s = {killed / hb:.1f} heartbeats; " if a.hang else ""
        each = ", ".join(f"{r['serving_s']:.2f}" for r in runs)
        print(f"{name:8s} {out['mode']}: client noticed after {noticed:.3f} s = {noticed / hb:.2f} heartbeats "
              f"(target <= 3); {hang}serving again after {serving:.2f} s = {serving / 10.0:.2f} of the 10 s target "
              f"(median of {a.kills}; each: {each} s; "
              f"{sum(1 for r in runs if r['warm'])} warm)")
    ratio = out["runs"][1]["serving_s"] / out["runs"][0]["serving_s"]
    out["ratio"] = ratio
    print(f"cold/standby time to serve again: {ratio:.1f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
