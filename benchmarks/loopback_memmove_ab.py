"""Loopback's fused host copy: where memmove stops and torch ``copy_`` takes over, arm against arm, in one process.

Runs ``dualpath bench transport``'s loopback bench with each arm's limits, alternating, ``--rounds`` times, and
prints the median ratio of each arm against the bench's two baselines (a plain ``copy_`` and a plain ``memmove``
of the same bytes). Arms: every copy through ``copy_``; memmove up to 1 MiB (with several torch threads: up to
128 KiB, the earlier limit); and up to torch's grain size with several threads (the shipped limits).

    python3 benchmarks/loopback_memmove_ab.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics

import anyio
import torch

import dualpath.transports.loopback as lb
from dualpath.commands.bench_transport import bench_loopback

KiB, MiB = 1024, 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--mib-per-point", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [64 * KiB, 128 * KiB, 256 * KiB, MiB, 4 * MiB]
    arms = {"copy_ only": (0, 0), "memmove, 128 KiB threaded": (MiB, 128 * KiB),
            "memmove, grain threaded (now)": (MiB, 32 * KiB)}
    res: dict[str, dict[int, list[tuple[float, float]]]] = {arm: {} for arm in arms}
    for _ in range(args.rounds):
        for arm, (limit, threaded) in arms.items():
            lb._MEMMOVE_MAX, lb._MEMMOVE_MAX_THREADED = limit, threaded  # read by each endpoint's start()
            for r in anyio.run(bench_loopback, sizes, 1, args.mib_per_point):
                res[arm].setdefault(r["size_bytes"], []).append((r["ratio"], r["ratio_vs_memmove"]))
    print(f"torch threads {torch.get_num_threads()}; medians of {args.rounds} rounds: ratio vs copy_ / vs memmove")
    for arm, by_size in res.items():
        cells = [f"{s // KiB} KiB {statistics.median(a for a, _ in v):.2f} / {statistics.median(b for _, b in v):.2f}"
                 for s, v in by_size.items()]
        print(f"  {arm:30s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
