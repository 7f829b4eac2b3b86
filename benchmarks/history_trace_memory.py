"""Memory and time of loading an AIPerf history trace (``messages`` rows repeating each session's whole
conversation), as ``dualpath`` reads it: row by row, each row reduced to its new messages at once.

    python3 benchmarks/history_trace_memory.py [--sessions 1000] [--turns 20] [--keep FILE]

Generates the trace (seeded words), then loads it in a fresh process twice: parsed with a word counter (no
tokenizer: the trace's own share of the memory), and as ``dualpath`` loads it (the embedded tokenizer counting);
plus the tokenizer alone, the baseline the second figure includes. Prints the file size, each peak RSS and time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

_CHILD = r"""
import resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if mode == "tokenizer":
    from dualpath.workload.sharegpt import default_counter
    default_counter()(["hello world"])
    n = 0
elif mode == "parse":
    from dualpath.workload.loaders import _lines
    from dualpath.workload.mooncake_sessions import load_session_rows
    st = load_session_rows(_lines(path), path, count_tokens=lambda xs: [len(x.split()) for x in xs])
    n = sum(len(tr.turns) for tr in st.trajectories)
else:
    from dualpath.workload.loaders import load_mooncake_trace
    trajs, _ = load_mooncake_trace(path)
    n = sum(len(tr.turns) for tr in trajs)
print(n, round(time.perf_counter() - t, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def write_trace(path: str, sessions: int, turns: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were", "her", "she", "there", "been", "one", "all", "would", "their", "we", "him"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with open(path, "w") as f:
        for s in range(sessions):
            hist = [{"role": "system", "content": text(60)}]
            for t in range(turns):
                hist = [*hist, {"role": "user", "content": text(110)}]
                row = {"session_id": f"s{s}", "messages": hist, "output_length": 50}
                if t:
                    row["delay"] = 1000
                f.write(json.dumps(row) + "\n")
                hist = [*hist, {"role": "assistant", "content": text(100)}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--keep", help="write the trace here (default: a temporary file, removed)")
    args = ap.parse_args()
    path = args.keep or tempfile.mktemp(suffix=".jsonl")
    write_trace(path, args.sessions, args.turns)
    try:
        print(f"trace: {os.path.getsize(path) / 1e6:.1f} MB, {args.sessions} sessions x {args.turns} turns")
        for mode in ("tokenizer", "parse", "load"):
            out = subprocess.run([sys.executable, "-c", _CHILD, mode, path], check=True, capture_output=True,
                                 text=True).stdout.split()
            print(f"  {mode:9s} turns {out[0]:>6s}  {out[1]:>6s} s  peak RSS {out[2]:>5s} MB")
    finally:
        if not args.keep:
            os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
