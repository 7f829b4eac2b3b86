"""``dualpath simulate``: discrete-event simulation of a DualPath cluster, comparing policies.

Offline (default): every agent starts at 0; the table gives JCT and the speed-up vs ``basic`` next to the storage
ceiling (P+D)/P. Online (``--mode online --aps X``): Poisson arrivals for ``--horizon`` simulated seconds, latency
measured after a warm-up. ``--capacity``: the largest APS meeting the SLO (TTFT <= 4 s, TPOT <= 50 ms, means over the
measured window), by bisection, per policy.
"""

from __future__ import annotations

import argparse

from dualpath.workload.csvtrace import FORMATS as TRACE_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="named scenario (default ds660b-2p4d-64k); --list-presets shows them")
    parser.add_argument("--config", help="YAML/TOML/JSON file with a 'sim' section (SimConfig)")
    parser.add_argument("--list-presets", action="store_true", help="list scenarios and preset values with sources")
    parser.add_argument("--policy", action="append", dest="policies",
                        help="policy (repeatable or comma-separated; 'ladder' for the whole ablation and the oracle; "
                             "default basic, dualpath)")
    parser.add_argument("--agents", type=int, help="number of agents (offline)")
    parser.add_argument("--dataset", help="dataset generator: 32k, 48k, 64k, small, tiny")
    parser.add_argument("--P", type=int, dest="P", help="prefill nodes (overrides the preset)")
    parser.add_argument("--D", type=int, dest="D", help="decode nodes (overrides the preset)")
    parser.add_argument("--mode", choices=["offline", "online"], help="offline (default) or online")
    parser.add_argument("--aps", type=float, help="online: agents arriving per second")
    parser.add_argument("--horizon", type=float, help="online: simulated seconds (default 3000)")
    parser.add_argument("--warmup", type=float, help="online: start of the measured window, s (default horizon/3)")
    parser.add_argument("--capacity", action="store_true", help="online: search the max APS under the SLO")
    parser.add_argument("--aps-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="capacity search bounds (default 0.02 2.0)")
    parser.add_argument("--iters", type=int, default=7, help="capacity bisection steps")
    parser.add_argument("--no-indexer-kv", action="store_true", help="KV blocks without the DSA indexer key")
    parser.add_argument("--append-scale", type=float, help="multiply every turn's append length (then truncate at "
                        "the dataset's MaxLen; paper Fig. 9)")
    parser.add_argument("--gen-scale", type=float, help="multiply every turn's generation length (paper Fig. 9)")
    parser.add_argument("--whatif-prefill-slowdown", type=float, default=None, metavar="X",
                        help="what-if, not a preset: every prefill (and quota) time x X (docs/simulator.md)")
    parser.add_argument("--whatif-decode-slowdown", type=float, default=None, metavar="X",
                        help="what-if, not a preset: every decode step time x X")
    parser.add_argument("--no-isolation", action="store_true",
                        help="no traffic manager: model (all-to-all) and KV traffic share the compute NICs fairly")
    parser.add_argument("--no-ep-traffic", action="store_true",
                        help="do not model the MoE all-to-all on the compute NICs")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", dest="json_out", help="write {'runs': [...], 'speedup': {...}, 'ceiling': x}")
    parser.add_argument("--plot", help="write a PNG comparing the policies")
    parser.add_argument("--trace", help="simulate a request trace as it is (every request; see --trace-format)")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS, default=None,
                        help="format of --trace: auto (default), jsonl, mooncake, bailian, csv, sharegpt or weka")
    parser.add_argument("--max-requests", type=int, help="trace: only its first N requests (in time order)")
    parser.add_argument("--repeat", type=int, help="trace: K copies (no shared content between copies)")
    parser.add_argument("--time-scale", type=float, metavar="F",
                        help="trace, online: its times F times faster (2: twice its request rate; 0.5: half)")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-engine time breakdown (compute, small batches, read/scheduler waits, queueing)")
    parser.add_argument("--matrix", nargs="?", const="full", choices=["full", "quick"],
                        help="the never-lose workload matrix: DualPath / max(Basic, pe_only) per cell")
    parser.add_argument("--select", help="--matrix: only cells whose name contains this")


def _list_presets() -> None:
    from dualpath.sim.presets import BATCH_CURVE_SOURCE, DRAM_BUFFER, GPUS, MODELS, NODES, SCENARIOS

    print("scenarios:")
    for s in SCENARIOS.values():
        print(f"  {s.name:22s} model={s.model} gpu={s.gpu} node={s.node} {s.P}P{s.D}D dataset={s.dataset} "
              f"agents={s.agents}  {s.note}")
    for title, table in (("models", MODELS), ("gpus", GPUS), ("nodes", NODES)):
        print(f"{title}:")
        for p in table.values():
            print(f"  {p.name}:")
            for k, src in p.sources.items():
                print(f"    {k} = {getattr(p, k)!r}   source: {src}")
    print("dram buffer per node: " + ", ".join(f"{k}={v / 1e9:g} GB ({s})" for k, (v, s) in DRAM_BUFFER.items()))
    print(f"prefill batch efficiency: {BATCH_CURVE_SOURCE}")


def _policies(values: list[str] | None) -> list[str] | None:
    """``--policy`` values as ``dualpath run`` reads them: repeatable, comma-separated, ``ladder`` for the
    ablation ladder and the oracle; None when none were given (the scenario's own)."""
    if not values:
        return None
    from dualpath.runtime.app import parse_policies

    return parse_policies(values)


def _cfg(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dualpath.errors import ConfigError
    from dualpath.sim.config import SimConfig

    data: dict = {}
    if args.config:
        from pathlib import Path

        from dualpath.config import _read_file

        raw = _read_file(Path(args.config))
        data = dict(raw.get("sim", raw))
    if args.preset and args.config:
        raise ConfigError("give --preset or --config, not both")
    for key, val in (("preset", args.preset), ("agents", args.agents), ("dataset", args.dataset), ("P", args.P),
                     ("D", args.D), ("mode", args.mode), ("rate_aps", args.aps), ("horizon_s", args.horizon), ("warmup_s", args.warmup),
                     ("seed", args.seed), ("policies", _policies(args.policies))):
        if val is not None:
            data[key] = val
    if args.no_indexer_kv:
        data["include_indexer_kv"] = False
    for key, val in (("append_scale", args.append_scale), ("gen_scale", args.gen_scale),
                     ("prefill_slowdown", args.whatif_prefill_slowdown),
                     ("decode_slowdown", args.whatif_decode_slowdown)):
        if val is not None:
            data[key] = val
    if args.no_isolation or args.no_ep_traffic:
        ov = dict(data.get("overrides") or {})
        if args.no_isolation:
            ov["traffic_isolation"] = False
        if args.no_ep_traffic:
            ov["ep_traffic"] = False
        data["overrides"] = ov
    if args.capacity:
        data["mode"] = "online"
    from pydantic import ValidationError

    from dualpath.config import format_validation_error

    try:
        return SimConfig(**data)
    except ValidationError as exc:  # one line per field: "<file or simulate>: sim.<field>: <message>"
        where = args.config or "simulate"
        raise ConfigError(format_validation_error(exc, where).replace(f"{where}: ", f"{where}: sim.")) from None
    except Exception as exc:
        raise ConfigError(f"{args.config or 'simulate'}: invalid sim config: {exc}") from exc


def _fmt(x: float, scale: float = 1.0, nd: int = 2) -> str:
    import math

    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{nd}f}"


def _table(runs: list[dict], speed: dict[str, float]) -> None:
    hdr = (f"{'policy':12s} {'JCT s':>9s} {'req/s':>8s} {'TTFT p50':>8s} {'p99':>7s} {'TTST p50':>8s} "
           f"{'TPOT p50 ms':>11s} {'p99':>6s} {'hit':>6s} {'SNIC PE':>7s} {'SNIC DE':>7s} {'bal':>5s} "
           f"{'PE util':>7s} {'speedup':>7s} {'wall s':>7s} {'cpu s':>6s}")
    print(hdr)
    for r in runs:
        print(f"{r['policy']:12s} {_fmt(r['jct_s'], 1, 0):>9s} {_fmt(r['throughput_req_s']):>8s} "
              f"{_fmt(r['ttft_p50_s']):>8s} {_fmt(r['ttft_p99_s']):>7s} {_fmt(r['ttst_p50_s']):>8s} "
              f"{_fmt(r['tpot_p50_s'], 1e3, 1):>11s} {_fmt(r['tpot_p99_s'], 1e3, 1):>6s} {_fmt(r['hit_rate'], 1, 3):>6s} "
              f"{_fmt(r['snic_util_pe']):>7s} {_fmt(r['snic_util_de']):>7s} {_fmt(r['snic_balance_max_avg']):>5s} "
              f"{_fmt(r['pe_compute_util']):>7s} {_fmt(speed.get(r['policy'], float('nan'))):>7s} "
              f"{_fmt(r['wall_s'], 1, 1):>7s} {_fmt(r.get('cpu_s', float('nan')), 1, 1):>6s}")


def _trace(args: argparse.Namespace, cfg):  # type: ignore[no-untyped-def]
    """The trace of --trace (None without one); limits of --max-requests/--repeat; bad files exit 2."""
    from dualpath.errors import ConfigError

    if args.trace is None:
        if args.max_requests is not None or args.repeat is not None or args.trace_format is not None \
                or args.time_scale is not None:
            raise ConfigError("--max-requests, --repeat, --time-scale and --trace-format need --trace")
        return None
    if args.capacity:
        raise ConfigError("--trace: a trace is replayed at its own times; --capacity searches a generated workload")
    if args.agents is not None or args.dataset is not None or args.aps is not None:
        raise ConfigError("--trace serves the trace as it is: use --max-requests / --repeat, not --agents/--dataset/--aps")
    from dualpath.workload.traces import load_trace

    return load_trace(args.trace, args.trace_format or "auto", max_requests=args.max_requests,
                      repeat=args.repeat or 1, time_scale=1.0 if args.time_scale is None else args.time_scale)


def _breakdown_table(runs: list[dict]) -> None:
    print("per-PE time breakdown (share of PE-seconds; small batch = compute lost to batches below the saturating size)")
    print(f"{'policy':12s} {'compute':>8s} {'small b.':>8s} {'transfer':>8s} {'read w.':>8s} {'sched w.':>8s} "
          f"{'no work':>8s} {'batch tok':>9s} {'queue s':>8s} {'read s':>7s} {'prefill s':>9s}")
    for r in runs:
        b = r.get("breakdown")
        if not b:
            continue
        print(f"{r['policy']:12s} {b['compute']:8.3f} {b['small_batch']:8.3f} {b['transfer']:8.3f} "
              f"{b['read_wait']:8.3f} {b['sched_wait']:8.3f} {b['no_work']:8.3f} {b['mean_batch_tokens']:9.0f} "
              f"{b['req_queue_s']:8.2f} {b['req_read_s']:7.3f} {b['req_prefill_s']:9.2f}")


def _matrix(args: argparse.Namespace) -> int:
    import json

    from dualpath.sim.matrix import run_matrix, summary

    rows = run_matrix(args.matrix == "quick", select=args.select, breakdown_dt=0.25 if args.breakdown else 0.0,
                      progress=lambda line: print(line, flush=True))
    s = summary(rows)
    print(f"never-lose matrix: {s['run']} of {s['cells']} cells run; min DualPath / max(Basic, pe_only) = "
          f"{s['min_ratio']:.3f} ({s['worst_cell']}); cells below 0.98: {', '.join(s['losing']) or 'none'}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "summary": s}, f, indent=1, default=str)
    return 0 if not s["losing"] else 1


def _plot(path: str, runs: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    key = "jct_s" if runs and runs[0]["mode"] == "offline" else "ttft_mean_s"
    axes[0].bar(names, [r[key] for r in runs], color="tab:blue")
    axes[0].set_ylabel("JCT (s)" if key == "jct_s" else "mean TTFT (s)")
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [r["snic_util_pe"] for r in runs], width=0.4, label="PE-node SNICs")
    axes[1].bar([i + 0.2 for i in x], [r["snic_util_de"] for r in runs], width=0.4, label="DE-node SNICs")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("mean storage NIC utilisation")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    if args.list_presets:
        _list_presets()
        return 0
    if args.config:
        from dualpath.runtime.sim2real import is_run_config, simulate_command

        if is_run_config(args.config):  # the configuration of a `dualpath run`: calibrate and predict it
            return simulate_command(args)
    if args.matrix:
        return _matrix(args)
    from dualpath.analysis import Hardware, check_pd
    from dualpath.scheduler.policies import get_policy
    from dualpath.sim.runner import SimResult, build_scenario, capacity, simulate, speedups

    cfg = _cfg(args)
    trace = _trace(args, cfg)
    for p in cfg.policies:
        get_policy(p)  # unknown policy: clean error before any work

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if args.capacity:
        lo, hi = args.aps_range or (0.02, 2.0)
        probe = build_scenario(cfg, rate_aps=lo)
        runs, caps = [], {}
        for p in cfg.policies:
            progress(f"capacity search {probe.name} policy={p} in [{lo}, {hi}] ...")
            c = capacity(lambda aps: build_scenario(cfg, rate_aps=aps), p, lo, hi, iters=args.iters,
                         progress=progress)
            caps[p] = c["aps"]
            run = dict(c["at_capacity"])
            run["capacity_aps"] = c["aps"]
            run["capacity_trials"] = c["trials"]
            runs.append(run)
        base = caps.get("basic")
        result = SimResult(runs, {p: v / base for p, v in caps.items()} if base else {},
                           (probe.P + probe.D) / probe.P, dict(probe.info))
        result.info["capacity_aps"] = caps
        sc = probe
        print("capacity (APS under TTFT <= 4 s, TPOT <= 50 ms): "
              + ", ".join(f"{p}={v:.3f}" for p, v in caps.items()))
    else:
        sc = build_scenario(cfg, trajectories=trace.trajectories if trace is not None else None)
        if trace is not None:
            from dualpath.workload.traces import check_fits, ideal_hit_rate

            check_fits(trace, sc.de_kv_tokens, f"a decode engine's KV memory in {sc.name}")

            sc.info["trace"] = {"path": trace.path, "format": trace.fmt, "note": trace.note,
                                "ideal_hit_rate": ideal_hit_rate(trace.trajectories)}
        bd = 0.25 if args.breakdown else 0.0
        result = simulate(sc, cfg.policies, progress=progress, breakdown_dt=bd)
    g = sc.gpus_per_node
    hw = Hardware.of(g, sc.snic_bw / sc.cnic_bw, sc.cnic_bw / 1e9, sc.dram_bw / 1e9)
    warnings = check_pd(sc.P, sc.D, hw)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    result.info["warnings"] = warnings
    result.info["wall_s"] = time.perf_counter() - t0
    if not args.capacity:
        result.speedup = speedups(result.runs)
    agents = "agents per rate" if args.capacity else f"{len(sc.trajectories)} agents"
    print(f"{sc.name}: {sc.P}P{sc.D}D x {g} GPUs, {agents}, mode={sc.mode}, "
          f"KV {sc.kv_bytes_per_token:.0f} B/token, storage ceiling (P+D)/P = {result.ceiling:.2f}")
    if trace is not None:
        ti = sc.info["trace"]
        print(f"trace {trace.path} ({trace.fmt}): {trace.note}; {len(trace.trajectories)} sessions; "
              f"ideal hit rate (unlimited cache) {ti['ideal_hit_rate']:.3f}; "
              + ("online at the trace's timestamps" + (" and think times" if any(
                  getattr(u, "think", None) for t in trace.trajectories for u in t.turns) else "")
                 if sc.mode == "online" else
                 "offline: every session at t=0, each turn when the previous one ends"))
    _table(result.runs, result.speedup)
    if trace is not None:
        print("hit rate achieved / ideal: " + ", ".join(
            f"{r['policy']}={r['hit_rate']:.3f}/{sc.info['trace']['ideal_hit_rate']:.3f}" for r in result.runs))
    if args.breakdown:
        _breakdown_table(result.runs)
    if args.capacity and result.speedup:
        print("capacity ratio vs basic: " + ", ".join(f"{p}={v:.2f}" for p, v in result.speedup.items()))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=2, default=str)
    if args.plot:
        _plot(args.plot, result.runs, f"{sc.name} ({sc.mode})")
    return 0
