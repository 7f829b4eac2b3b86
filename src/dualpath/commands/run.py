"""``dualpath run``: serve an agentic workload on an emulated cluster and compare policies.

With no arguments it runs the embedded default (:mod:`dualpath.runtime.defaults`): an I/O-bound emulated 1P1D
cluster, a synthetic model, the built-in agentic trace, policies ``pe_only`` and ``dualpath`` on the same trace.
It shows one progress line per policy on stderr, then the comparison table and the speed-up against the
ceiling (P+D)/P. ``--json`` writes ``{"runs": [...], "speedup": ..., "ceiling": ...}``; ``--plot`` a PNG of the
storage-NIC utilisation over time per policy. Ctrl-C stops cleanly and prints what finished.
"""

from __future__ import annotations

import argparse

from dualpath.workload.csvtrace import FORMATS as TRACE_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/TOML/JSON config file (merged over the embedded default)")
    parser.add_argument(
        "--policy", action="append", dest="policies", metavar="NAME",
        help="policy to run (repeatable or comma-separated): basic, layerwise, round_robin, dualpath, split, "
             "pe_only, de_only, oracle, or 'ladder' for the whole ablation; default pe_only and dualpath",
    )
    parser.add_argument("--trace", help="trace file (our JSONL trajectories, or Mooncake with --trace-format)")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS,
                        help="format of --trace: auto (default: from its first line), jsonl (ours), mooncake, bailian (Qwen-Bailian sessions), csv (Azure/BurstGPT-style columns), sharegpt (ShareGPT / chat-message conversations / agent trajectories) or weka (kv-cache-tester / SemiAnalysis Claude Code traces)")
    parser.add_argument("--agents", type=int,
                        help="number of agents of a generator (default from the config); with --trace: its first N "
                             "sessions (a trace is never replayed to reach N)")
    parser.add_argument("--max-requests", type=int, metavar="N",
                        help="trace: serve only its first N requests (in time order); default every request")
    parser.add_argument("--repeat", type=int, metavar="K",
                        help="trace: serve K copies of it (copies share no content; online, one after another)")
    parser.add_argument("--time-scale", type=float, metavar="F",
                        help="trace, online: replay its times F times faster (2: twice its request rate; 0.5: half)")
    parser.add_argument("--mode", choices=["offline", "online"],
                        help="offline (default: every session at t=0, each turn when the previous one ends) or "
                             "online (a trace at its own timestamps; a generator at --rate)")
    parser.add_argument("--rate", type=float, help="online: agents arriving per second")
    parser.add_argument("--capacity", action="store_true",
                        help="online: search the highest arrival rate that meets the TTFT/TPOT SLO, per policy")
    parser.add_argument("--sim", action="store_true",
                        help="also predict each policy's JCT with the simulator (calibrated on this machine) "
                             "and report predicted / measured")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="OUT.png", help="write a PNG of per-link utilisation over time")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--serve", metavar="ADDR",
                        help="replay the trace against a running `dualpath serve` deployment at ADDR "
                             "(tcp://host:port) instead of an emulated cluster")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "serve", None):
        from dualpath.control.client import run_serve_command
        from dualpath.errors import ConfigError

        # the deployment runs its own policy and has no emulated links: these would be ignored, so they are refused
        given = [flag for flag, v in (("--policy", args.policies), ("--capacity", args.capacity), ("--sim", args.sim),
                                      ("--plot", args.plot)) if v]
        if given:
            raise ConfigError(f"--serve replays the trace against a running deployment, which runs its own policy: "
                              f"{', '.join(given)} cannot be used with it")

        return run_serve_command(args)
    from dualpath.runtime.app import RunRequest, run_command

    req = RunRequest(
        config=args.config,
        policies=args.policies,
        trace=args.trace,
        trace_format=args.trace_format,
        max_requests=args.max_requests,
        repeat=args.repeat,
        time_scale=args.time_scale,
        agents=args.agents,
        mode=args.mode,
        rate=args.rate,
        capacity=args.capacity,
        sim=args.sim,
        json_out=args.json_out,
        plot=args.plot,
        progress=not args.quiet,
    )
    return run_command(req)
