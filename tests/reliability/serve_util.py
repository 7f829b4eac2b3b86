"""Shared by the multi-process tests: tiny configs, a small trace, the in-process reference, deployments that
always clean up their processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from dualpath.config import DualPathConfig, load_config
from dualpath.control.client import ServeClient
from dualpath.control.launcher import Deployment
from dualpath.runtime.clients import ClientResult, append_token_ids, run_offline
from dualpath.workload.trajectory import Trajectory, Turn

VOCAB = 1000
BT = 16


def tiny_config(root: Path, *, prefill_nodes: int = 1, decode_nodes: int = 1, **over: Any) -> DualPathConfig:
    """Synthetic 2-layer model, 16-token blocks, posix storage under ``root``, zmq transport on loopback."""
    base: dict[str, Any] = {
        "storage": {"kind": "posix", "root": str(root)},
        "transport": {"kind": "zmq", "pending_timeout_s": 5.0},
        "model": {"kind": "synthetic", "n_layers": 2, "n_kv_heads": 1, "head_dim": 8, "vocab_size": VOCAB,
                  "decode_step_s": 0.002, "device_tflops": 1000.0, "max_context": 4096},
        "cluster": {"block_tokens": BT, "host_buffer_bytes": 4_000_000, "kv_pool_tokens": 8192,
                    "prefill_max_batch_tokens": 2048, "snic_gbps": None, "devices": "cpu", "deadline_s": 5.0,
                    "prefill_nodes": prefill_nodes, "decode_nodes": decode_nodes},
        "scheduler": {"policy": "dualpath"},
        "serve": {"port": 0, "heartbeat_s": 0.1, "dead_after_s": 1.0, "request_deadline_s": 60.0,
                  "startup_timeout_s": 90.0},
    }
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_config(None, env={}, overrides=base)


def trace(n_agents: int = 4, n_turns: int = 3, append: int = 37, gen: int = 6) -> list[Trajectory]:
    return [Trajectory(a, [Turn(append + 5 * t, gen) for t in range(n_turns)]) for a in range(n_agents)]


def reference_tokens(config: DualPathConfig, agents: list[Trajectory]) -> dict[tuple[int, int], list[int]]:
    """Every turn's tokens from the in-process cluster (memory storage, loopback transport)."""
    from dualpath.cluster import Cluster

    data = config.model_dump(mode="python")
    data["storage"] = {"kind": "memory"}
    data["transport"] = {"kind": "loopback"}
    if data["model"].get("kind") == "synthetic":  # its tokens do not depend on its emulated times: no waiting
        data["model"].update(decode_step_s=0.0, device_tflops=1e6)
    cfg = DualPathConfig.model_validate(data)
    out: dict[tuple[int, int], list[int]] = {}

    async def agent(c: Any, a: Trajectory) -> None:
        context = np.zeros(0, dtype=np.int64)
        for i, spec in enumerate(a.turns):
            prompt = np.concatenate([context, append_token_ids(a.tid, i, spec, VOCAB)])
            r = await c.run_turn(str(a.tid), [int(x) for x in prompt], spec.gen)
            out[(a.tid, i)] = list(r.token_ids)
            context = np.concatenate([prompt, np.asarray(r.token_ids, dtype=np.int64)])

    async def main() -> None:
        async with Cluster(cfg) as c, anyio.create_task_group() as tg:
            for a in agents:  # agents are independent: their turns overlap as a deployment's do
                tg.start_soon(agent, c, a)

    anyio.run(main)
    return out


def tokens_of(result: ClientResult) -> dict[tuple[int, int], list[int]]:
    return {(r.agent, r.turn): list(r.outcome.tokens) for r in result.records}


def replay(address: str, agents: list[Trajectory], config: DualPathConfig) -> ClientResult:
    async def main() -> ClientResult:
        async with ServeClient.from_config(address, config) as c:
            return await run_offline(c, agents, vocab_size=VOCAB)

    return anyio.run(main)


def stats(address: str, config: DualPathConfig) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with ServeClient.from_config(address, config) as c:
            return await c.stats()

    return anyio.run(main)


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    """``pred()``'s first truthy value within ``timeout`` s (an exception counts as not yet: a restarting
    scheduler); an AssertionError naming ``what`` when it never comes."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            v = pred()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The child processes of ``pid`` (those forked by any of its threads), sorted."""
    tasks = Path(f"/proc/{pid}/task")
    return sorted(int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split())


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send ``sig`` to a server process still running and wait for it; kill it past ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def survivors(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """The processes among ``pids`` still alive after up to ``grace_s`` seconds."""
    t_end = time.monotonic() + grace_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < t_end:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


@contextlib.contextmanager
def deployment(config: DualPathConfig, workdir: Path, **kw: Any) -> Iterator[Deployment]:
    """A started deployment; stopped (and checked for orphans) on exit, even when the test failed."""
    dep = Deployment(config, workdir=workdir, **kw)
    pids: set[int] = set()
    try:
        dep.start()
        yield dep
    finally:
        pids |= {c.pid for c in dep.children.values() if c.pid > 0}
        if dep.forkserver_pid is not None:
            pids.add(dep.forkserver_pid)
        dep.stop(timeout=10.0)
        orphans = [p for p in pids if pid_alive(p)]
        assert not orphans, f"processes left behind: {orphans}"


def metric_value(url: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in an HTTP server's ``/metrics``."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def cached_tokens_total(url: str) -> float:
    """An HTTP server's ``dualpath_cached_tokens_total`` (prompt tokens loaded from storage), from ``/metrics``."""
    return metric_value(url, "dualpath_cached_tokens_total")


def free_port() -> int:
    """A loopback TCP port free at the time of asking (for a server that must come back on the same address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scheduler_loaded_torch(dep: Deployment) -> bool:
    """Whether the deployment's scheduler process has torch mapped (it needs none: a lazy import of it stalls its
    event loop for seconds, long enough to fail every client's heartbeats)."""
    maps = Path(f"/proc/{dep.pid('scheduler')}/maps")
    return maps.exists() and "libtorch" in maps.read_text()
