"""The load run of a multi-process deployment (issue 8): not part of the test suite.

1. **Compare**: the same offline trace on the same config, in-process (the emulated cluster through the
   scheduler driver, :func:`dualpath.runtime.runner.run_policy`) and multi-process (``Deployment`` + client);
   prints both throughputs and their ratio, and checks the tokens are identical.
2. **Load**: an online run (Poisson agent arrivals) at ``--load`` times the capacity rate (estimated from the
   offline throughput) for ``--minutes``; every ``--sample-s`` it records every process's RSS, open fds, asyncio
   tasks, registered transport regions and held turns. Reports peaks, the drift between the first and the last
   third of the run (flat memory = no leak), SLO attainment and requests lost (submitted - completed - failed).

    python benchmarks/load_run.py --minutes 3 --json load.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np

from dualpath.commands.bench_serve import VOCAB, bench_config  # the same deployment
from dualpath.config import DualPathConfig
from dualpath.control.client import ServeClient
from dualpath.control.launcher import Deployment
from dualpath.runtime.clients import ClientResult, run_offline, run_online_into
from dualpath.workload.arrivals import poisson_arrivals
from dualpath.workload.trajectory import Trajectory, Turn


def config(root: Path) -> DualPathConfig:
    """The same small deployment `dualpath bench serve` measures."""
    return cast(DualPathConfig, bench_config(root))


def make_trace(n: int, turns: int, seed: int, first_id: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    return [Trajectory(first_id + a, [Turn(int(rng.integers(100, 400)), int(rng.integers(8, 24)))
                                      for _ in range(turns)]) for a in range(n)]


def _tokens(res: ClientResult) -> dict[tuple[int, int], list[int]]:
    return {(r.agent, r.turn): list(r.outcome.tokens) for r in res.records}


def compare(cfg: DualPathConfig, trajs: list[Trajectory], work: Path) -> dict[str, Any]:
    from dualpath.runtime.runner import PolicyRun, run_policy

    mem = cfg.model_copy(deep=True)
    data = mem.model_dump(mode="python")
    data["transport"] = {"kind": "loopback"}
    data["storage"]["root"] = str(work / "inproc-kv")
    inproc_cfg = DualPathConfig.model_validate(data)
    run = PolicyRun("dualpath")
    anyio.run(lambda: run_policy(inproc_cfg, "dualpath", trajs, run))
    inproc = run.client
    with Deployment(cfg, workdir=work / "cmp") as dep:
        async def go() -> ClientResult:
            async with ServeClient.from_config(dep.address, cfg) as c:
                return await run_offline(c, trajs, vocab_size=VOCAB)
        multi = anyio.run(go)
    n = len(inproc.records)
    same = _tokens(inproc) == _tokens(multi)
    return {"turns": n, "inprocess_jct_s": inproc.jct, "multiprocess_jct_s": multi.jct,
            "inprocess_turns_per_s": n / inproc.jct, "multiprocess_turns_per_s": len(multi.records) / multi.jct,
            "ratio": (len(multi.records) / multi.jct) / (n / inproc.jct), "same_tokens": same}


def load(cfg: DualPathConfig, rate: float, minutes: float, sample_s: float, work: Path) -> dict[str, Any]:
    turns_per_agent = 4
    n_agents = max(1, int(rate * minutes * 60))
    trajs = make_trace(n_agents, turns_per_agent, seed=7, first_id=10_000)
    arrivals = poisson_arrivals(n_agents, rate, seed=7)
    samples: list[dict[str, Any]] = []
    with Deployment(cfg, workdir=work / "load") as dep:
        async def go() -> tuple[ClientResult, dict[str, Any]]:
            res = ClientResult([], 0.0, 0.0, 0, n_agents)
            async with ServeClient.from_config(dep.address, cfg) as c, anyio.create_task_group() as tg:
                async def sampler() -> None:
                    t0 = time.monotonic()
                    while True:
                        st = await c.stats()
                        st["t"] = time.monotonic() - t0
                        samples.append(st)
                        await anyio.sleep(sample_s)

                tg.start_soon(sampler)
                await run_online_into(c, trajs, arrivals, res, vocab_size=VOCAB)
                final = await c.stats()
                tg.cancel_scope.cancel()
            return res, final

        res, final = anyio.run(go)
    keys = [k for k in samples[-1] if any(k.endswith(s) for s in (".rss", ".fds", ".tasks", ".regions", ".inflight"))
            and not k.startswith("peak.")]
    third = max(1, len(samples) // 3)
    series = {}
    for k in keys:
        vals = [s.get(k, 0) for s in samples]
        series[k] = {"first_third_median": statistics.median(vals[:third]),
                     "last_third_median": statistics.median(vals[-third:]), "peak": max(vals)}
    slo_ttft, slo_tpot = cfg.workload.ttft_slo_s, cfg.workload.tpot_slo_s
    recs = res.records
    ttft = sorted(r.outcome.ttft for r in recs)
    tpot = sorted((r.outcome.tpot or 0.0) for r in recs)
    met = sum(1 for r in recs if r.outcome.ttft <= slo_ttft and (r.outcome.tpot or 0.0) <= slo_tpot)
    submitted = int(final.get("submitted", 0))
    return {
        "minutes": minutes, "rate_aps": rate, "agents": n_agents, "turns": len(recs),
        "turns_per_s": len(recs) / res.jct if res.jct else None,
        "submitted": submitted, "completed": int(final.get("completed", 0)), "failed": int(final.get("failed", 0)),
        "lost": submitted - int(final.get("completed", 0)) - int(final.get("failed", 0)),
        "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None, "ttft_p90_s": ttft[int(len(ttft) * 0.9)] if ttft else None,
        "tpot_p90_s": tpot[int(len(tpot) * 0.9)] if tpot else None,
        "slo_attainment": met / len(recs) if recs else None, "slo": {"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        "samples": len(samples), "series": series,
        "peak_rss_mb": {k[:-4]: v["peak"] / 1e6 for k, v in series.items() if k.endswith(".rss")},
        "rss_drift_mb": {k[:-4]: (v["last_third_median"] - v["first_third_median"]) / 1e6
                         for k, v in series.items() if k.endswith(".rss")},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the estimated capacity rate")
    p.add_argument("--rate", type=float, help="agent arrivals per second (default: --load x capacity)")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--json", dest="json_out")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dualpath-load-"))
    cfg = config(work / "kv")
    out: dict[str, Any] = {"runs": []}
    rate = a.rate
    if not a.skip_compare:
        cmp_ = compare(cfg, make_trace(8, 4, seed=1), work)
        out["runs"].append({"name": "compare", **cmp_})
        out["ratio"] = cmp_["ratio"]
        print(f"compare: in-process {cmp_['inprocess_turns_per_s']:.2f} turns/s, multi-process "
              f"{cmp_['multiprocess_turns_per_s']:.2f} turns/s, ratio {cmp_['ratio']:.2f}, "
              f"same tokens: {cmp_['same_tokens']}", flush=True)
        if rate is None:  # agents/s the offline run sustained, scaled
            rate = a.load * cmp_["multiprocess_turns_per_s"] / 4
    rate = rate or 0.5
    res = load(cfg, rate, a.minutes, a.sample_s, work)
    out["runs"].append({"name": "load", **res})
    print(json.dumps({k: v for k, v in res.items() if k != "series"}, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0 if res["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
