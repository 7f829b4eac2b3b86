"""The cost of the synchronous facade: the same turns through ``dualpath.Session`` (a blocking portal: the cluster
runs on an event loop in a background thread) and through ``dualpath.AsyncSession`` awaited directly.

Prints the wall time of each, alternating which goes first, and the ratio Session / AsyncSession (1.0 = no cost).
Usage: ``python3 benchmarks/bench_session.py [--turns N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import dualpath


def _config() -> dualpath.DualPathConfig:
    return dualpath.load_config(env={}, model={"n_layers": 2, "decode_step_s": 0.0},
                                cluster={"block_tokens": 16, "snic_gbps": None, "cnic_gbps": None})


def _prompts(turns: int) -> list[list[int]]:
    return [[1000 * (i + 1) + t for t in range(256)] for i in range(turns)]


def run_sync_session(turns: int) -> float:
    with dualpath.Session(_config()) as s:
        t0 = time.perf_counter()
        for p in _prompts(turns):
            s.run_turn(p, 4)
        return time.perf_counter() - t0


def run_async_session(turns: int) -> float:
    async def main() -> float:
        async with dualpath.AsyncSession(_config()) as s:
            t0 = time.perf_counter()
            for p in _prompts(turns):
                await s.run_turn(p, 4)
            return time.perf_counter() - t0

    return dualpath.run_sync(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    sync_s, async_s = [], []
    for r in range(a.repeats):
        order = (run_sync_session, run_async_session) if r % 2 == 0 else (run_async_session, run_sync_session)
        for fn in order:
            (sync_s if fn is run_sync_session else async_s).append(fn(a.turns))
    s, t = statistics.median(sync_s), statistics.median(async_s)
    print(f"{a.turns} sequential turns, median of {a.repeats}: Session {s:.3f} s, AsyncSession {t:.3f} s")
    print(f"ratio Session/AsyncSession: {s / t:.3f}")


if __name__ == "__main__":
    main()
