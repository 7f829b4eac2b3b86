"""Sim-to-real: the simulator on the same configuration as a ``dualpath run``.

:func:`scenario_from_run_config` turns a run configuration (the same nodes, link bandwidths, KV bytes per token,
KV pool, buffers, scheduler constants and the same trajectories) plus a compute profile measured on this
machine (:func:`dualpath.runtime.calibrate.calibrate`) into a :class:`~dualpath.sim.scenario.SimScenario`.
:func:`predict` simulates each policy; :func:`sim_to_real` sets the predictions against measured JCTs
(predicted / measured; the target band is 0.8-1.25).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dualpath.config import DualPathConfig
from dualpath.runtime.calibrate import ComputeProfileFit, calibrate
from dualpath.runtime.runner import policy_config
from dualpath.runtime.workload import load_trajectories
from dualpath.workload.trajectory import Trajectory

#: bandwidth standing in for an unlimited link (bytes/s)
UNLIMITED_BW = 1e13


def kv_bytes_per_token(cfg: DualPathConfig) -> float:
    m = cfg.model
    if m.kind == "synthetic":
        from dualpath.kv.layout import KVSpec

        return float(KVSpec.mha(m.n_layers, m.n_kv_heads, m.head_dim, m.kv_dtype).bytes_per_token)
    from dualpath.cluster import Cluster

    return float(Cluster(cfg).layout.spec.bytes_per_token)


def scenario_from_run_config(
    cfg: DualPathConfig, trajs: Sequence[Trajectory], profile: ComputeProfileFit, policy: str = "dualpath"
) -> Any:
    """A :class:`SimScenario` with the numbers of ``cfg`` (as run under ``policy``) and the measured ``profile``."""
    from dualpath.sim.compute import ProfiledCompute
    from dualpath.sim.scenario import SimScenario

    pc = policy_config(cfg, policy, None)
    c, s, w = pc.cluster, pc.scheduler, pc.workload
    compute = ProfiledCompute(
        prefill_fn=lambda chunks: profile.prefill_time(list(chunks)),
        attention_fn=profile.attention_time,
        step_fn=lambda n, _b, _f: profile.decode_step(n),
    )
    return SimScenario(
        P=c.prefill_nodes,
        D=c.decode_nodes,
        gpus_per_node=c.engines_per_node,
        snic_bw=c.snic_gbps * 1e9 if c.snic_gbps else UNLIMITED_BW,
        cnic_bw=c.cnic_gbps * 1e9 if c.cnic_gbps else UNLIMITED_BW,
        kv_bytes_per_token=kv_bytes_per_token(pc),
        compute=compute,
        de_kv_tokens=c.kv_pool_tokens,
        trajectories=list(trajs),
        dram_buffer_bytes=float(c.host_buffer_bytes * c.engines_per_node),
        block_tokens=c.block_tokens,
        kv_share=c.kv_share,
        alpha_s=s.alpha_s,
        beta_s=s.beta_s,
        quota_s=s.compute_quota_s,
        z_factor=s.z_factor,
        fetch_interval_s=s.fetch_interval_s,
        inflight_prefix_min_tokens=s.inflight_prefix_min_tokens if s.inflight_prefix_wait_s > 0 else None,
        inflight_prefix_wait_s=s.inflight_prefix_wait_s,
        max_batch_tokens=c.prefill_max_batch_tokens,
        mode="offline",
        ttft_slo_s=w.ttft_slo_s,
        tpot_slo_s=w.tpot_slo_s,
        name=f"run-config-{c.prefill_nodes}p{c.decode_nodes}d",
        info={"source": "dualpath run config", "profile": profile.to_json()},
    )


def predict(
    cfg: DualPathConfig, policies: Sequence[str], profile: ComputeProfileFit | None = None,
    trajs: Sequence[Trajectory] | None = None,
) -> dict[str, dict[str, Any]]:
    """Simulated figures of each policy on ``cfg`` (calibrating first when no ``profile`` is given)."""
    from dualpath.sim.runner import run_policy as sim_run_policy

    profile = profile if profile is not None else calibrate(cfg)
    trajs = trajs if trajs is not None else load_trajectories(cfg.workload)
    out: dict[str, dict[str, Any]] = {}
    for p in policies:
        out[p] = sim_run_policy(scenario_from_run_config(cfg, trajs, profile, p), p)
    return out


def sim_to_real(
    cfg: DualPathConfig, policies: Sequence[str], measured: Mapping[str, Mapping[str, Any]], stream: Any = None
) -> dict[str, Any]:
    """Calibrate, simulate each measured policy, print and return predicted / measured JCT."""
    stream = stream if stream is not None else sys.stdout
    profile = calibrate(cfg)
    names = [p for p in policies if p in measured and measured[p].get("complete")]
    pred = predict(cfg, names, profile)
    rows: dict[str, Any] = {}
    print(f"sim-to-real (compute profile measured on this machine in {profile.wall_s:.1f} s):", file=stream)
    for p in names:
        m = measured[p].get("jct_s")
        s = pred[p].get("jct_s")
        ratio = (s / m) if m and s and s == s else None
        rows[p] = {"predicted_jct_s": s, "measured_jct_s": m, "ratio": ratio,
                   "predicted_snic_balance": pred[p].get("snic_balance_max_avg")}
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"  {p:<12} predicted JCT {s:7.2f} s  measured {m:7.2f} s  predicted/measured {shown}", file=stream)
    return {"profile": profile.to_json(), "policies": rows}


RUN_SECTIONS = ("storage", "transport", "model", "cluster", "scheduler", "workload")


def is_run_config(path: str) -> bool:
    """Whether a config file describes a ``dualpath run`` (run sections, no ``sim`` section)."""
    from pathlib import Path

    from dualpath.config import _read_file

    data = _read_file(Path(path))
    return "sim" not in data and any(k in data for k in RUN_SECTIONS)


def simulate_command(args: Any) -> int:
    """``dualpath simulate --config RUN_CONFIG``: calibrate on this machine, predict each policy of the run."""
    import json

    from dualpath.errors import ConfigError
    from dualpath.runtime.app import RunRequest, apply_request, parse_policies
    from dualpath.runtime.defaults import load_run_config
    from dualpath.runtime.report import ceiling

    # the flags of the simulator's own scenarios have no meaning for a run config: refused, not ignored
    foreign = {"preset": "--preset", "P": "--P", "D": "--D", "aps": "--aps", "horizon": "--horizon",
               "warmup": "--warmup", "aps_range": "--aps-range", "append_scale": "--append-scale",
               "gen_scale": "--gen-scale", "whatif_prefill_slowdown": "--whatif-prefill-slowdown",
               "whatif_decode_slowdown": "--whatif-decode-slowdown", "plot": "--plot"}
    flags = {"capacity": "--capacity", "breakdown": "--breakdown", "no_isolation": "--no-isolation",
             "no_ep_traffic": "--no-ep-traffic", "no_indexer_kv": "--no-indexer-kv"}
    given = [flag for key, flag in foreign.items() if getattr(args, key, None) is not None]
    given += [flag for key, flag in flags.items() if getattr(args, key, False)]
    if getattr(args, "mode", None) == "online":
        given.append("--mode online")
    if given:
        raise ConfigError(f"{', '.join(given)}: not with --config {args.config}, the configuration of a `dualpath "
                          "run` (it is predicted offline as that run would go; those flags shape the simulator's "
                          "own scenarios: --preset or a config with a 'sim' section)")
    cfg = load_run_config(args.config)
    if getattr(args, "dataset", None) is not None:
        cfg.workload.dataset = args.dataset
    if getattr(args, "seed", None) is not None:
        cfg.workload.seed = args.seed
    cfg = apply_request(cfg, RunRequest(
        agents=getattr(args, "agents", None), trace=getattr(args, "trace", None),
        trace_format=getattr(args, "trace_format", None), max_requests=getattr(args, "max_requests", None),
        repeat=getattr(args, "repeat", None)))
    policies = parse_policies(getattr(args, "policies", None))
    trajs = load_trajectories(cfg.workload)
    print(f"calibrating the compute profile of {cfg.model.kind} model on this machine ...", file=sys.stderr)
    profile = calibrate(cfg)
    pred = predict(cfg, policies, profile, trajs)
    c = cfg.cluster
    ceil = ceiling(c.prefill_nodes, c.decode_nodes)
    print(f"simulated {c.prefill_nodes}P{c.decode_nodes}D from {args.config}: {len(trajs)} agents, "
          f"{sum(t.n_turns for t in trajs)} turns; ceiling (P+D)/P = {ceil:.2f}")
    print(f"{'policy':<12} {'JCT s':>8} {'TTFT p50':>9} {'TPOT p50':>9} {'SNIC max/avg':>12}")
    for p, r in pred.items():
        print(f"{p:<12} {r['jct_s']:8.2f} {r['ttft_p50_s']:8.2f}s {r['tpot_p50_s'] * 1e3:7.1f}ms "
              f"{r['snic_balance_max_avg']:12.2f}")
    base = next((pred[n] for n in ("pe_only", "basic") if n in pred), None)
    dual = next((pred[n] for n in ("dualpath", "split", "round_robin") if n in pred), None)
    speedup = base["jct_s"] / dual["jct_s"] if base is not None and dual is not None and dual["jct_s"] > 0 else None
    if speedup is not None and base is not None and dual is not None:
        print(f"predicted speed-up {dual['policy']}/{base['policy']}: {speedup:.2f}x (ceiling {ceil:.2f}x)")
    if getattr(args, "json_out", None):
        doc = {"runs": list(pred.values()), "speedup": speedup, "ceiling": ceil, "profile": profile.to_json()}
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0
