"""Token streaming in the multi-process deployment: what a streaming client gains, and what streaming costs.

Starts a deployment (scheduler + 1 PE + 1 DE process, synthetic model, decode step ``--step-ms``) and runs the
same turn (``--gen`` tokens, fresh prompt each time) alternately without and with ``on_token``, ``--reps`` times
each. Prints one JSON line:

* ``first_token_over_result``: when the first token reached the streaming client ÷ when the result did
  (the baseline: without streaming the client sees every token at the result);
* ``stream_over_plain_turn_s``: a streamed turn's wall time ÷ the same turn's unstreamed wall time (the cost
  of one ``tokens`` + one ``stream`` message per decode step), medians.

    python benchmarks/serve_stream_overhead.py [--gen 300] [--reps 5] [--step-ms 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))

from serve_util import deployment, tiny_config  # noqa: E402

from dualpath.control.client import ServeClient  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gen", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--step-ms", type=float, default=2.0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dualpath-stream-") as tmp:
        cfg = tiny_config(Path(tmp) / "kv", model={"decode_step_s": a.step_ms / 1e3})
        with deployment(cfg, Path(tmp) / "work") as d:
            out = anyio.run(_run, d.address, cfg, a.gen, a.reps)
    print(json.dumps(out))
    return 0


async def _run(address: str, cfg, gen: int, reps: int) -> dict[str, float]:
    plain: list[float] = []
    streamed: list[float] = []
    first_ratio: list[float] = []
    async with ServeClient.from_config(address, cfg) as c:
        await c.run_turn(1, list(range(1, 40)), 8)  # warm-up
        for i in range(reps):
            prompt = [(i * 31 + k) % 900 + 1 for k in range(40)]
            t0 = time.perf_counter()
            await c.run_turn(100 + i, prompt, gen)
            plain.append(time.perf_counter() - t0)
            prompt = [(i * 37 + k) % 900 + 1 for k in range(40)]
            first: list[float] = []
            t0 = time.perf_counter()
            await c.run_turn(200 + i, prompt, gen,
                             on_token=lambda _t, f=first: f.append(time.perf_counter()) if not f else None)
            t1 = time.perf_counter()
            streamed.append(t1 - t0)
            first_ratio.append((first[0] - t0) / (t1 - t0))
    return {"gen": gen, "reps": reps, "plain_turn_s": statistics.median(plain),
            "streamed_turn_s": statistics.median(streamed),
            "stream_over_plain_turn_s": statistics.median(streamed) / statistics.median(plain),
            "first_token_over_result": statistics.median(first_ratio)}


if __name__ == "__main__":
    raise SystemExit(main())
