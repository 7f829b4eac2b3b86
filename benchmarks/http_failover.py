"""Scheduler failover as an OpenAI client sees it: ``dualpath serve --http`` (scheduler + 1 prefill + 1 decode
engine process, synthetic model), the scheduler SIGKILLed (or SIGSTOPped) while a streamed completion is in
flight, ``--kills`` times.

For each kill it reports: the time from the signal to the first successful HTTP completion (a client retrying
every 50 ms, each try with a 10 s timeout), how the in-flight stream ended (it must end with an OpenAI error
event, within its deadline) and when ``/health`` went 503 and back to 200. Prints one JSON object (median of the
recovery times); exits 1 if a completion never came back or the in-flight stream did not end with an error.

With ``--baseline`` every HTTP kill alternates with one measured through the project's own msgpack client
(connected before the kill, retrying a turn every 50 ms) on the same deployment, and the ratio of the medians is
reported: what the HTTP front adds to the recovery.

    python benchmarks/http_failover.py [--kills 3] [--signal KILL|STOP] [--baseline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from dualpath.config import load_config


def tiny_config(root: Path, decode_step_s: float) -> dict[str, Any]:
    """Synthetic 2-layer model, 16-token blocks, posix storage under ``root``, zmq transport on loopback."""
    return {
        "storage": {"kind": "posix", "root": str(root)},
        "transport": {"kind": "zmq", "pending_timeout_s": 5.0},
        "model": {"kind": "synthetic", "n_layers": 2, "n_kv_heads": 1, "head_dim": 8, "vocab_size": 1000,
                  "decode_step_s": decode_step_s, "device_tflops": 1000.0, "max_context": 4096},
        "cluster": {"block_tokens": 16, "host_buffer_bytes": 4_000_000, "kv_pool_tokens": 8192,
                    "prefill_max_batch_tokens": 2048, "snic_gbps": None, "devices": "cpu", "deadline_s": 5.0},
        "scheduler": {"policy": "dualpath"},
        "serve": {"port": 0, "heartbeat_s": 0.1, "dead_after_s": 1.0, "request_deadline_s": 30.0,
                  "startup_timeout_s": 120.0},
        "http": {"request_timeout_s": 30},
    }


def listener_pid(port: int, candidates: list[int]) -> int | None:
    """The process among ``candidates`` (and their children) listening on TCP ``port`` (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    pids = set(candidates)
    for p in candidates:
        try:
            for task in os.listdir(f"/proc/{p}/task"):  # (children of every thread: the launcher's too)
                pids |= {int(x) for x in Path(f"/proc/{p}/task/{task}/children").read_text().split()}
        except OSError:
            pass
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                with_link = os.readlink(f"/proc/{p}/fd/{fd}")
                if with_link.startswith("socket:[") and with_link[8:-1] in inodes:
                    return p
        except OSError:
            continue
    return None


def stream_once(url: str, prompt: list[int], max_tokens: int, out: dict[str, Any], started: threading.Event) -> None:
    """A streamed completion; records how it ended (``events``, ``error`` event, status, duration)."""
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(60.0)) as cl, cl.stream(
                "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                                                 "ignore_eos": True, "temperature": 0,
                                                 "return_token_ids": True}) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["body"] = r.read().decode(errors="replace")
                return
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()
                    if '"error"' in line:
                        out["error"] = json.loads(line[6:])["error"]
            out["events"] = len(events)
            out["done"] = bool(events) and events[-1] == "[DONE]"
    except Exception as exc:
        out["exception"] = f"{type(exc).__name__}: {exc}"
    finally:
        out["seconds"] = time.monotonic() - t0
        started.set()


def msgpack_recovery(config: Any, address: str, prompt: list[int], pid: int, sig: int) -> tuple[float | None, int, float]:
    """The baseline: the project's own client, connected before the kill, retrying a turn every 50 ms until one
    succeeds. Returns (seconds from the signal to that success or None, tries, the signal's monotonic time)."""
    import anyio

    from dualpath.control.client import ServeClient
    from dualpath.errors import DualPathError

    box: dict[str, Any] = {"tries": 0, "ok": None, "t0": time.monotonic()}

    async def run() -> None:
        async with ServeClient.from_config(address, config) as c:
            await c.ping()
            os.kill(pid, sig)
            box["t0"] = t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                box["tries"] += 1
                try:
                    await c.run_turn(10_000 + box["tries"], [*prompt, box["tries"]], 4, deadline_s=10.0)
                    box["ok"] = time.monotonic() - t0
                    return
                except DualPathError:
                    await anyio.sleep(0.05)

    anyio.run(run)
    return box["ok"], box["tries"], box["t0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    ap.add_argument("--decode-step-s", type=float, default=0.01)
    ap.add_argument("--baseline", action="store_true",
                    help="alternate each HTTP kill with one measured through the msgpack client (the ratio)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args()
    sig = signal.SIGKILL if a.signal == "KILL" else signal.SIGSTOP
    tmp = Path(tempfile.mkdtemp(prefix="http-failover-"))
    cfg = tmp / "serve.json"
    cfg.write_text(json.dumps(tiny_config(tmp / "kv", a.decode_step_s)))
    addr = tmp / "http.addr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    log = open(tmp / "serve.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg), "--http",
                             "127.0.0.1:0", "--http-address-file", str(addr), "--workdir", str(tmp / "work")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    runs: list[dict[str, Any]] = []
    ok = True
    try:
        t_end = time.monotonic() + 180
        while not addr.exists():
            if proc.poll() is not None or time.monotonic() > t_end:
                print((tmp / "serve.out").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        url = addr.read_text().strip()
        sched_addr = (tmp / "work" / "scheduler.addr").read_text().strip()
        sched_port = int(sched_addr.rsplit(":", 1)[1])
        prompt = list(range(3, 60))
        config = load_config(str(cfg), env={})
        with httpx.Client(base_url=url, timeout=10.0) as cl:
            assert cl.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}).status_code == 200
            for k in range(2 * a.kills if a.baseline else a.kills):
                via = "msgpack" if a.baseline and k % 2 else "http"
                time.sleep(3.0)  # the launcher's next warm standby is importing: let it get ready
                inflight: dict[str, Any] = {}
                started = threading.Event()
                th = threading.Thread(target=stream_once, args=(url, [*prompt, 100 + k], 400, inflight, started))
                th.start()
                started.wait(30)
                pid = listener_pid(sched_port, [proc.pid])
                if pid is None:
                    raise RuntimeError("no scheduler process listens on the scheduler's port")
                health: list[tuple[float, int]] = []
                tries = 0
                t_ok: float | None = None
                if via == "msgpack":
                    t_ok, tries, t0 = msgpack_recovery(config, sched_addr, [*prompt, 200 + k], pid, sig)
                else:
                    os.kill(pid, sig)
                    t0 = time.monotonic()
                    while time.monotonic() - t0 < 60:
                        tries += 1
                        try:
                            r = cl.post("/v1/completions", json={"prompt": [*prompt, 200 + k, tries],
                                                                 "max_tokens": 4})
                            if r.status_code == 200:
                                t_ok = time.monotonic() - t0
                                break
                        except httpx.HTTPError:
                            pass
                        h = cl.get("/health").status_code
                        health.append((round(time.monotonic() - t0, 3), h))
                        time.sleep(0.05)
                th.join(60)
                t_healthy = None
                while time.monotonic() - t0 < 60:
                    if cl.get("/health").status_code == 200:
                        t_healthy = time.monotonic() - t0
                        break
                    time.sleep(0.05)
                first_503 = next((t for t, h in health if h == 503), None)
                run = {"kill": k, "via": via, "pid": pid, "first_success_s": t_ok, "tries": tries,
                       "health_503_at_s": first_503, "healthy_again_s": t_healthy, "inflight": inflight}
                runs.append(run)
                print(json.dumps(run), file=sys.stderr, flush=True)
                ended_with_error = "error" in inflight or inflight.get("status", 200) >= 500
                ok = ok and t_ok is not None and ended_with_error and not th.is_alive()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    def median(via: str) -> float | None:
        t = [r["first_success_s"] for r in runs if r["via"] == via and r["first_success_s"] is not None]
        return statistics.median(t) if t else None

    http_s, msgpack_s = median("http"), median("msgpack")
    res = {"signal": a.signal, "kills": a.kills, "median_first_success_s": http_s,
           "first_success_s": [r["first_success_s"] for r in runs if r["via"] == "http"], "ok": ok}
    if a.baseline:
        res["msgpack_median_first_success_s"] = msgpack_s
        res["ratio_http_over_msgpack"] = http_s / msgpack_s if http_s and msgpack_s else None
    print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": res, "runs": runs}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
