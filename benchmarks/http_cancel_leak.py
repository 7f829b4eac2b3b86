"""500 cancelled streams against the HTTP API (in-process cluster, synthetic model): nothing may be left behind.

Each client opens a streamed completion of 1,500 tokens, reads its first event and disconnects, ``--parallel`` at
a time. Afterwards the decode pool must be whole, no host buffer held, no turn assigned to an engine, no request
in flight, and the process's RSS must not have grown by more than ``--max-rss-growth-mb`` after the first
100 (allocator warm-up). Prints one JSON line; exits 1 on a leak.

    python benchmarks/http_cancel_leak.py [--n 500] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import anyio
import httpx

from dualpath.config import DualPathConfig, load_config
from dualpath.control.gauges import process_gauges
from dualpath.http.backend import InProcessBackend
from dualpath.http.config import HttpConfig
from dualpath.http.server import serve_app
from dualpath.model.config import SyntheticModelConfig


def config(root: str) -> DualPathConfig:
    """Posix storage (the blocks each turn persists go to files, not to this process's RSS)."""
    cfg = load_config(None, env={}, overrides={"storage": {"kind": "posix", "root": root}})
    cfg.model = SyntheticModelConfig(n_layers=4, n_kv_heads=2, head_dim=64, device_tflops=1e4, decode_step_s=0.002,
                                     max_context=8192, vocab_size=1000)
    c = cfg.cluster
    c.block_tokens, c.snic_gbps, c.cnic_gbps = 16, None, None
    c.host_buffer_bytes, c.kv_pool_tokens, c.deadline_s = 64 << 20, 32768, 10.0
    return cfg


async def main(n: int, parallel: int, max_growth_mb: float) -> int:
    with tempfile.TemporaryDirectory(prefix="dualpath-cancel-") as root:
        return await _run(config(root), n, parallel, max_growth_mb)


async def _run(cfg: DualPathConfig, n: int, parallel: int, max_growth_mb: float) -> int:
    backend = InProcessBackend(cfg)
    ready, stop = anyio.Event(), anyio.Event()
    box: dict[str, str] = {}

    def on_ready(url: str) -> None:
        box["url"] = url
        ready.set()

    out: dict[str, object] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_app(backend, HttpConfig(port=0, max_inflight=4 * parallel), on_ready=on_ready,
                                        stop=stop))
        await ready.wait()
        async with httpx.AsyncClient(base_url=box["url"], timeout=60,
                                     limits=httpx.Limits(max_connections=4 * parallel)) as cl:
            codes: dict[int, int] = {}

            async def one(i: int) -> None:
                body = {"prompt": [i % 997 + 1, *range(1, 150)], "max_tokens": 1500, "stream": True,
                        "temperature": 0, "return_token_ids": True}
                async with cl.stream("POST", "/v1/completions", json=body) as resp:
                    codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
                    async for _ in resp.aiter_lines():
                        break

            t0 = time.perf_counter()
            rss0 = 0
            for start in range(0, n, parallel):
                if start >= 100 and not rss0:
                    rss0 = process_gauges()["rss"]
                async with anyio.create_task_group() as burst:
                    for i in range(start, min(n, start + parallel)):
                        burst.start_soon(one, i)
            wall = time.perf_counter() - t0
            c = backend.cluster
            with anyio.move_on_after(30):
                while backend.inflight or any(e.seq for e in (*c.pes, *c.des)):
                    await anyio.sleep(0.1)
            rss1 = process_gauges()["rss"]
            leaks = {
                "inflight": backend.inflight,
                "driver_in_flight": backend.driver.in_flight,
                "kv_pool_missing_tokens": sum(cfg.cluster.kv_pool_tokens - d.free_kv_tokens() for d in c.des),
                "host_bytes_held": sum(e.host.used_bytes for e in (*c.pes, *c.des)),
                "turns_assigned": sum(e.seq for e in (*c.pes, *c.des)),
                "decoding": sum(len(d.running) for d in c.des),
            }
            growth_mb = (rss1 - rss0) / 2**20 if rss0 else 0.0
            ok = not any(leaks.values()) and growth_mb <= max_growth_mb
            out = {"cancelled_streams": n, "status_codes": codes, "wall_s": round(wall, 2), **leaks,
                   "rss_growth_mb_after_100": round(growth_mb, 1), "ok": ok}
        stop.set()
    print(json.dumps(out))
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    a = p.parse_args()
    sys.exit(anyio.run(main, a.n, a.parallel, a.max_rss_growth_mb))
