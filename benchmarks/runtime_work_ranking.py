"""DualPath in the runtime ranked by predicted work vs by prompt tokens, against Basic, on bursts of agents.

The simulator's fuzz (``never_lose_fuzz.py``) found DualPath losing to Basic where an agent's next turn (mostly
stored, so little to compute) was ranked by its prompt tokens against first prompts (everything to compute):
Algorithm 1 then sends new work to the PE whose queue holds the most compute. The simulator ranks by predicted
work since; this runs the same comparison through the runtime: the in-process cluster of real engines (2 PEs and
2 DEs on one node each, the synthetic model, whose forwards take the time their FLOPs would on
``--tflops``, memory storage, emulated storage and compute NICs), the scheduler driver and the offline client.

Each seed draws ``--agents`` agents as the fuzz's ``burst`` shape does, in blocks of ``--block`` tokens: a first
prompt of 1-100 blocks, then 2-6 turns appending 1-8 blocks each, 1-60 generated tokens per turn. Every agent starts
at once (offline: an agent's next turn follows its previous one). Three runs per seed: ``basic``, ``dualpath``
ranked by tokens (``scheduler.work_ranking: false``, the paper's Algorithm 1) and ``dualpath`` ranked by work (the
default). Prints each run's JCT (the last agent's end, wall seconds) and the ratios Basic / DualPath; ``--json OUT``
writes them.

``--case handoff`` runs the mechanism by itself, online, with trace times: agent B's first turn (7,000 tokens) at
t = 0; at 1.5 s agent A's first prompt (6,000 fresh tokens) and B's next turn (64 more tokens, the rest stored) take
the two PEs; at 1.55 s agent C sends 2,000 fresh tokens. By tokens C goes to A's PE (6,000 < 7,064) and waits for
A's prompt; by work it goes to B's, which has about 70 ms left. Prints C's time to first token per arm (``--repeat``
times).

    python benchmarks/runtime_work_ranking.py [--seeds 0 1 2 3 4 5] [--agents 12] [--json OUT]
    python benchmarks/runtime_work_ranking.py --case handoff [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from typing import Any

import anyio

from dualpath.config import DualPathConfig, load_config
from dualpath.runtime.runner import PolicyRun, run_policy
from dualpath.workload.trajectory import Trajectory, Turn

ARMS = (("basic", True), ("dualpath", False), ("dualpath", True))


def config(tflops: float) -> DualPathConfig:
    return load_config(None, env={}, overrides={
        "storage": {"kind": "memory"},
        "transport": {"kind": "loopback"},
        # (small KV rows and NIC rates scaled down to match: the emulated times of a 2 KiB-per-token model, with
        # an eighth of the bytes to copy, so this 2-core machine's own copies disturb the timing less)
        "model": {"kind": "synthetic", "n_layers": 4, "n_kv_heads": 1, "head_dim": 16, "kv_dtype": "bfloat16",
                  "vocab_size": 1000, "max_context": 16384, "device_tflops": tflops, "decode_step_s": 0.004},
        "cluster": {"prefill_nodes": 1, "decode_nodes": 1, "engines_per_node": 2, "block_tokens": 64,
                    "snic_gbps": 0.05 / 8, "cnic_gbps": 0.2 / 8, "host_buffer_bytes": 96 << 20,
                    "kv_pool_tokens": 65536, "prefill_max_batch_tokens": 16384, "devices": "cpu"},
    })


def agents(seed: int, n: int, block: int) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for a in range(n):
        turns = [Turn(rng.randint(1, 100) * block - rng.randint(0, block - 1), rng.randint(1, 60))]
        turns += [Turn(rng.randint(1, 8) * block, rng.randint(1, 60)) for _ in range(rng.randint(2, 6))]
        out.append(Trajectory(a, turns))
    return out


def handoff() -> list[Trajectory]:
    return [Trajectory(0, [Turn(6000, 4, at=3.0)], arrival=3.0),  # A
            Trajectory(1, [Turn(7000, 1, at=0.0), Turn(64, 4, at=3.0)], arrival=0.0),  # B
            Trajectory(2, [Turn(2000, 4, at=3.05)], arrival=3.05)]  # C


def run(cfg: DualPathConfig, policy: str, ranking: bool, trajs: list[Trajectory],
        mode: str = "offline") -> dict[str, Any]:
    c = cfg.model_copy(deep=True)
    c.scheduler.work_ranking = ranking
    pr = PolicyRun(policy)
    t0 = time.perf_counter()
    anyio.run(lambda: run_policy(c, policy, trajs, pr, mode=mode))
    if not pr.complete:
        raise SystemExit(f"{policy} (work_ranking={ranking}) did not complete: {pr.error}")
    ttft = {(r.agent, r.turn): r.outcome.ttft for r in pr.records}
    return {"jct_s": pr.client.jct, "wall_s": time.perf_counter() - t0, "turns": len(pr.records),
            "ttft_c_s": ttft.get((2, 0))}


def main_handoff(args: argparse.Namespace, cfg: DualPathConfig) -> int:
    rows = []
    for i in range(args.repeat):
        res = {("tokens", "work")[r]: run(cfg, "dualpath", r, handoff(), mode="online") for r in (False, True)}
        rows.append({"repeat": i, **{f"ttft_c_{k}_s": v["ttft_c_s"] for k, v in res.items()},
                     **{f"jct_{k}_s": v["jct_s"] for k, v in res.items()}})
        print(f"repeat {i}: C's TTFT by tokens {res['tokens']['ttft_c_s']:.3f} s, by work "
              f"{res['work']['ttft_c_s']:.3f} s ({res['tokens']['ttft_c_s'] / res['work']['ttft_c_s']:.2f}x)",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/runtime_work_ranking.py " + " ".join(sys.argv[1:]),
                       "args": vars(args), "rows": rows}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--agents", type=int, default=12)
    ap.add_argument("--block", type=int, default=64, help="tokens per block of the burst shape")
    ap.add_argument("--tflops", type=float, default=12.8, help="the synthetic model's prefill rate")
    ap.add_argument("--json", help="write the rows and the summary here")
    ap.add_argument("--case", choices=("bursts", "handoff"), default="bursts")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each arm (--case handoff)")
    args = ap.parse_args(argv)
    cfg = config(args.tflops)
    if args.case == "handoff":
        return main_handoff(args, cfg)
    rows = []
    for seed in args.seeds:
        trajs = agents(seed, args.agents, args.block)
        res = {f"{p}{'' if p == 'basic' else ('_work' if r else '_tokens')}": run(cfg, p, r, trajs) for p, r in ARMS}
        basic = res["basic"]["jct_s"]
        row = {"seed": seed, "turns": res["basic"]["turns"], **{f"{k}_jct_s": v["jct_s"] for k, v in res.items()},
               "ratio_tokens": basic / res["dualpath_tokens"]["jct_s"],
               "ratio_work": basic / res["dualpath_work"]["jct_s"]}
        rows.append(row)
        print(f"seed {seed}: {row['turns']} turns, JCT basic {basic:.2f} s, dualpath by tokens "
              f"{row['dualpath_tokens_jct_s']:.2f} s ({row['ratio_tokens']:.3f}), by work "
              f"{row['dualpath_work_jct_s']:.2f} s ({row['ratio_work']:.3f})", flush=True)
    summary = {k: {"min": min(r[k] for r in rows), "median": statistics.median(r[k] for r in rows),
                   "mean": statistics.fmean(r[k] for r in rows), "below_1": sum(r[k] < 1.0 for r in rows)}
               for k in ("ratio_tokens", "ratio_work")}
    for k, v in summary.items():
        print(f"Basic / DualPath {k[6:]:>6}: min {v['min']:.3f} median {v['median']:.3f} mean {v['mean']:.3f}, "
              f"{v['below_1']} of {len(rows)} below 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/runtime_work_ranking.py " + " ".join(sys.argv[1:]),
                       "args": vars(args), "rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
