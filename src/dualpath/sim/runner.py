"""Running simulations: scenarios from presets, per-policy runs and summaries, online capacity search.

Public API::

    scenario_from_preset(name, agents=None, dataset=None, mode="offline", rate_aps=None, ...) -> SimScenario
    run_policy(scenario, policy_name) -> dict            # one run's summary (the JSON "runs" entry)
    simulate(scenario, policies) -> SimResult            # runs + speed-up vs basic + the (P+D)/P ceiling
    capacity(scenario_factory, policy_name, lo, hi, ...) -> dict  # max APS under the SLO (bisection)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualpath.errors import ConfigError
from dualpath.scheduler.policies import get_policy
from dualpath.sim.cluster import Simulation
from dualpath.sim.compute import RooflineCompute
from dualpath.sim.presets import (
    DRAM_BUFFER,
    MAX_BATCH_TOKENS,
    ScenarioPreset,
    get_gpu,
    get_model,
    get_node,
    get_scenario,
)
from dualpath.sim.scenario import SimScenario


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def load_trajectories(dataset: str, n: int, seed: int = 0, append_scale: float = 1.0,
                      gen_scale: float = 1.0) -> list[Any]:
    """``n`` trajectories of a built-in dataset (the workload package's generator); the scales multiply every
    turn's append / generation length before the trajectory is truncated at the dataset's MaxLen (paper Fig. 9)."""
    from dualpath.workload import generate_dataset  # type: ignore[attr-defined]

    return list(generate_dataset(dataset, n, seed=seed, append_scale=append_scale, gen_scale=gen_scale))


def scenario_from_preset(
    name: str | ScenarioPreset,
    *,
    agents: int | None = None,
    dataset: str | None = None,
    mode: str = "offline",
    rate_aps: float | None = None,
    horizon_s: float | None = None,
    seed: int = 0,
    include_indexer_kv: bool | None = None,
    trajectories: Sequence[Any] | None = None,
    overrides: dict[str, Any] | None = None,
    append_scale: float = 1.0,
    gen_scale: float = 1.0,
    prefill_slowdown: float = 1.0,
    decode_slowdown: float = 1.0,
) -> SimScenario:
    """A scenario from a named preset (``dualpath simulate --list-presets``); ``overrides`` sets SimScenario fields.

    ``prefill_slowdown`` / ``decode_slowdown``: what-if knobs of :class:`RooflineCompute` (not presets; 1 = sourced)."""
    import dataclasses

    if mode not in ("offline", "online"):
        raise ConfigError(f"mode: expected 'offline' or 'online', got {mode!r}")
    sp = name if isinstance(name, ScenarioPreset) else get_scenario(name)
    name = sp.name
    model = get_model(sp.model)
    if include_indexer_kv is not None:
        model = dataclasses.replace(model, include_indexer_kv=include_indexer_kv)
    gpu, node = get_gpu(sp.gpu), get_node(sp.node)
    g = node.gpus
    comp = RooflineCompute(model, gpu, n_pe_gpus=sp.P * g, n_de_gpus=sp.D * g, gpus_per_node=g,
                           prefill_slowdown=prefill_slowdown, decode_slowdown=decode_slowdown)
    kvb = model.kv_bytes_per_token
    if comp.de_free_hbm() < kvb * 1024:  # not even a thousand tokens of KV beside the weights
        gib = 1 << 30
        raise ConfigError(
            f"D = {sp.D} decode node(s) ({sp.D * g} GPUs): {model.name}'s weights take "
            f"{comp.de_weight_bytes / gib:.1f} GiB of each GPU's {gpu.hbm_bytes / gib:.0f} GiB, leaving no room for "
            "decode KV; give more decode nodes (--D)")
    n_agents = agents if agents is not None else sp.agents
    if trajectories is None:
        trajectories = load_trajectories(dataset or sp.dataset, n_agents, seed, append_scale, gen_scale)
    if mode == "online":
        if rate_aps is None or rate_aps <= 0:
            raise ConfigError("online mode needs rate_aps > 0")
        from dualpath.workload.arrivals import poisson_arrivals, with_arrivals

        trajectories = with_arrivals(trajectories, poisson_arrivals(len(trajectories), rate_aps, seed))
    sc = SimScenario(
        P=sp.P,
        D=sp.D,
        gpus_per_node=g,
        snic_bw=node.snic_bw,
        cnic_bw=node.cnic_bw,
        dram_bw=node.dram_bw,
        kv_bytes_per_token=kvb,
        compute=comp,
        de_kv_tokens=int(comp.de_free_hbm() // kvb),
        pe_hbm_kv_tokens=max(1, int(comp.pe_free_hbm() // kvb)),
        dram_buffer_bytes=DRAM_BUFFER[model.name][0],
        kv_share=node.kv_share,
        read_slots=node.read_slots,
        max_batch_tokens=MAX_BATCH_TOKENS,
        trajectories=trajectories,
        mode=mode,
        horizon_s=horizon_s,
        name=name,
        info={"preset": name, "model": model.name, "gpu": gpu.name, "node": node.name, "dataset": dataset or sp.dataset,
              "agents": len(trajectories), "include_indexer_kv": model.include_indexer_kv,
              "kv_bytes_per_token": kvb, "effective_tflops": comp.rate / 1e12,
              **({"whatif_prefill_slowdown": prefill_slowdown, "whatif_decode_slowdown": decode_slowdown}
                 if (prefill_slowdown, decode_slowdown) != (1.0, 1.0) else {})},
    )
    for k, v in (overrides or {}).items():
        if not hasattr(sc, k):
            raise ConfigError(f"sim override: unknown field {k!r}")
        setattr(sc, k, v)
    return sc


def build_scenario(cfg: Any, rate_aps: float | None = None, trajectories: Sequence[Any] | None = None) -> SimScenario:
    """A scenario from a :class:`~dualpath.sim.config.SimConfig` (online: ``rate_aps`` overrides the config's).

    ``trajectories`` (a user trace): served as they are, every one to completion; online, at their own
    ``arrival`` and turn times (no horizon, no warm-up window)."""
    if cfg.model is not None:
        if cfg.P is None or cfg.D is None:
            raise ConfigError("sim config: a model preset needs P and D (nodes)")
        sp = ScenarioPreset(f"{cfg.model}-{cfg.P}p{cfg.D}d", cfg.model, cfg.gpu, cfg.node, cfg.P, cfg.D,
                            cfg.dataset or "64k", cfg.agents or 64)
    else:
        sp = get_scenario(cfg.preset or "")
        if cfg.P is not None or cfg.D is not None:
            sp = ScenarioPreset(sp.name, sp.model, sp.gpu, sp.node, cfg.P or sp.P, cfg.D or sp.D, sp.dataset,
                                sp.agents, sp.note)
    if trajectories is not None:
        sc = scenario_from_preset(sp, trajectories=trajectories, seed=cfg.seed,
                                  include_indexer_kv=cfg.include_indexer_kv, overrides=dict(cfg.overrides),
                                  prefill_slowdown=cfg.prefill_slowdown, decode_slowdown=cfg.decode_slowdown)
        sc.mode = cfg.mode
        return sc
    rate = rate_aps if rate_aps is not None else cfg.rate_aps
    agents = cfg.agents
    horizon = None
    warm = 0.0
    if cfg.mode == "online":
        if rate is None:
            raise ConfigError("sim config: online mode needs rate_aps (or use --capacity)")
        agents = int(math.ceil(rate * cfg.horizon_s * 1.1)) + 8
        horizon = cfg.horizon_s
        warm = cfg.warmup_s if cfg.warmup_s is not None else cfg.horizon_s / 3
    sc = scenario_from_preset(sp, agents=agents, dataset=cfg.dataset, mode=cfg.mode, rate_aps=rate,
                              append_scale=cfg.append_scale, gen_scale=cfg.gen_scale,
                              horizon_s=horizon, seed=cfg.seed, include_indexer_kv=cfg.include_indexer_kv,
                              overrides=dict(cfg.overrides), prefill_slowdown=cfg.prefill_slowdown,
                              decode_slowdown=cfg.decode_slowdown)
    sc.warmup_s = warm
    return sc


def summarize(sim: Simulation, wall_s: float) -> dict[str, Any]:
    """One run's figures (the JSON ``runs`` entry)."""
    sc = sim.sc
    # offline: rates over the run up to its last completion (a progress tick may leave the clock later)
    # (a trace replayed online has no horizon: it runs to its last completion, like offline)
    end = sim.loop.now if (sc.mode == "online" and sc.horizon_s is not None) or not sim.rec_done else max(sim.rec_done)
    submit = np.frombuffer(sim.rec_submit, dtype=np.float64)
    ttft = np.frombuffer(sim.rec_ttft, dtype=np.float64)
    ttst = np.frombuffer(sim.rec_ttst, dtype=np.float64)
    tpot = np.frombuffer(sim.rec_tpot, dtype=np.float64)
    done_t = np.array(sim.agent_done)
    if sc.mode == "online":
        # measured window: requests submitted after warm-up; unfinished ones count with their TTFT so far
        sel = submit >= sc.warmup_s
        late = [end - r.t_submit if r.t_first < 0 else r.t_first - r.t_submit
                for r in sim.unfinished() if r.t_submit >= sc.warmup_s]
        ttft_w = np.concatenate([ttft[sel], np.array(late, dtype=np.float64)])
        tpot_w = tpot[sel]
        ttst_w = ttst[sel]
    else:
        ttft_w, tpot_w, ttst_w = ttft, tpot, ttst
    tpot_w = tpot_w[tpot_w > 0]
    links = sim.links()

    def util(lks: list[Any]) -> float:
        return float(np.mean([lk.utilisation(end) for lk in lks])) if lks and end > 0 else 0.0

    snics = links["snic_pe"] + links["snic_de"]
    wins: dict[int, list[float]] = {}
    for i, lk in enumerate(snics):
        for w, b in lk.windows.items():
            wins.setdefault(w, [0.0] * len(snics))[i] = b
    # max/avg SNIC bytes per window (paper 9.6), over the busy windows (total >= half the busiest), as
    # dualpath.metrics.storage_balance(min_fraction=0.5) computes it
    busiest = max((sum(v) for v in wins.values()), default=0.0)
    ratios = [max(v) / (sum(v) / len(v)) for v in wins.values() if sum(v) > 0 and sum(v) >= 0.5 * busiest]
    n_agents = len(sim.turns)
    de_busy = sum(d.busy_s for d in sim.des)
    all_done = bool(np.all(done_t >= 0))
    jct = float(done_t.max()) if all_done and n_agents else float("nan")
    out = {
        "policy": sim.policy.name,
        "scenario": sc.name,
        "mode": sc.mode,
        "P": sc.P,
        "D": sc.D,
        "gpus": (sc.P + sc.D) * sc.gpus_per_node,
        "agents": n_agents,
        "requests": sim.completed,
        "all_done": all_done,
        "jct_s": jct,
        "sim_time_s": end,
        "throughput_req_s": sim.completed / end if end > 0 else 0.0,
        # when 95 % of the requests were done: the run without its drain (the last sessions, fewer than engines)
        "done_p95_s": _pct(np.frombuffer(sim.rec_done, dtype=np.float64), 95),
        "prompt_tokens_per_s": sim.prompt_tokens / end if end > 0 else 0.0,
        "gen_tokens_per_s": sim.gen_tokens / end if end > 0 else 0.0,
        "ttft_mean_s": float(ttft_w.mean()) if ttft_w.size else float("nan"),
        "ttft_p50_s": _pct(ttft_w, 50),
        "ttft_p99_s": _pct(ttft_w, 99),
        "ttst_p50_s": _pct(ttst_w, 50),
        "ttst_p99_s": _pct(ttst_w, 99),
        "tpot_mean_s": float(tpot_w.mean()) if tpot_w.size else float("nan"),
        "tpot_p50_s": _pct(tpot_w, 50),
        "tpot_p99_s": _pct(tpot_w, 99),
        "hit_rate": sim.hit_tokens / sim.prompt_tokens if sim.prompt_tokens else 0.0,
        "hit_tokens": sim.hit_tokens,
        "prompt_tokens": sim.prompt_tokens,
        "bytes_read_pe_path": sim.bytes_pe_path,
        "bytes_read_de_path": sim.bytes_de_path,
        "bytes_persisted": sum(n.write_bytes for n in sim.de_nodes),
        "snic_util_pe": util(links["snic_pe"]),
        "snic_util_de": util(links["snic_de"]),
        "snic_util": util(snics),
        "snic_balance_max_avg": float(np.mean(ratios)) if ratios else float("nan"),
        "cnic_util_max": max((lk.utilisation(end) for k in links if k.startswith("cnic") for lk in links[k]),
                             default=0.0),
        "dram_gbs_max": max((n.dram_bytes / end / 1e9 for n in sim.pe_nodes + sim.de_nodes), default=0.0)
        if end > 0 else 0.0,
        "pe_compute_util": sum(p.compute_s for p in sim.pes) / (len(sim.pes) * end) if end > 0 else 0.0,
        "de_busy_util": sum(d.busy_s for d in sim.des) / (len(sim.des) * end) if end > 0 else 0.0,
        # requests in a DE's decode step, averaged over the time DEs are decoding; and the step time of one request
        # (the weights-read floor of the per-operator roofline): TPOT evidence
        "de_batch_mean": sum(d.req_s for d in sim.des) / de_busy if de_busy > 0 else 0.0,
        "decode_step_floor_s": sc.compute.decode_step_time(1, 0.0, 0.0),
        "pe_batches": sum(p.batches for p in sim.pes),
        "events": sim.loop.events,
        "fetches": sim.fetches,
        "wall_s": wall_s,
    }
    out.update(sim.meter.summary(end))  # TTFT composition, attention balance, online mean JCT, working set
    if sim.breakdown_dt > 0:
        out["breakdown"] = sim.breakdown()
    return out


def run_policy(sc: SimScenario, policy: str, progress: Callable[[str], None] | None = None,
               breakdown_dt: float = 0.0) -> dict[str, Any]:
    """Simulate ``sc`` under ``policy`` and summarise (``wall_s`` and ``cpu_s`` of the run included);
    ``breakdown_dt`` > 0 adds the per-engine time breakdown sampled that often (``Simulation.breakdown``)."""
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(sc, get_policy(policy))
    sim.breakdown_dt = breakdown_dt
    sim.run(progress)
    out = summarize(sim, time.perf_counter() - t0)
    out["cpu_s"] = time.process_time() - c0
    return out


@dataclass
class SimResult:
    runs: list[dict[str, Any]]
    speedup: dict[str, float] = field(default_factory=dict)
    ceiling: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "speedup": self.speedup, "ceiling": self.ceiling, "info": self.info}


def speedups(runs: list[dict[str, Any]], base: str | None = None) -> dict[str, float]:
    """JCT speed-up of each run vs ``base`` (offline); prompt throughput ratio when JCT is undefined. ``base``
    None: ``basic`` when it ran, else ``pe_only`` (the baseline ``dualpath run`` compares with)."""
    names = [r["policy"] for r in runs]
    base = base or next((n for n in ("basic", "pe_only") if n in names), None)
    b = next((r for r in runs if r["policy"] == base), None)
    if b is None:
        return {}
    out = {}
    for r in runs:
        if math.isfinite(b["jct_s"]) and math.isfinite(r["jct_s"]) and r["jct_s"] > 0:
            out[r["policy"]] = b["jct_s"] / r["jct_s"]
        elif b["prompt_tokens_per_s"] > 0:
            out[r["policy"]] = r["prompt_tokens_per_s"] / b["prompt_tokens_per_s"]
    return out


def simulate(sc: SimScenario | str, policies: Sequence[str] | str, progress: Callable[[str], None] | None = None,
             breakdown_dt: float = 0.0) -> SimResult:
    """Run every policy on ``sc`` (a scenario, or a preset's name: its scenario as shipped); ``policies``: names,
    or one name. Speed-ups are vs ``basic`` when it is among them, else vs ``pe_only``."""
    if isinstance(sc, str):
        sc = scenario_from_preset(sc)
    elif not isinstance(sc, SimScenario):
        raise ConfigError(f"simulate: expected a SimScenario or a preset's name, got {type(sc).__name__}")
    if isinstance(policies, str):
        policies = [policies]
    elif not isinstance(policies, Sequence) or not all(isinstance(p, str) for p in policies):
        raise ConfigError(f"simulate: policies must be a policy name or a list of them, got {policies!r}")
    runs = []
    for p in policies:
        if progress:
            progress(f"simulating {sc.name} policy={p} ...")
        runs.append(run_policy(sc, p, progress, breakdown_dt=breakdown_dt))
    return SimResult(runs, speedups(runs), (sc.P + sc.D) / sc.P, dict(sc.info))


def capacity(
    make: Callable[[float], SimScenario],
    policy: str,
    lo: float,
    hi: float,
    *,
    iters: int = 7,
    ttft_slo_s: float = 4.0,
    tpot_slo_s: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Largest agents-per-second rate in [lo, hi] whose run meets the SLO (mean TTFT and mean TPOT over the
    measured window), by bisection; ``make(aps)`` builds the online scenario for a rate."""

    def ok(aps: float) -> tuple[bool, dict[str, Any]]:
        r = run_policy(make(aps), policy)
        good = r["ttft_mean_s"] <= ttft_slo_s and not (r["tpot_mean_s"] > tpot_slo_s)
        if progress:
            progress(f"  {policy} aps={aps:.4g}: ttft_mean={r['ttft_mean_s']:.2f}s tpot={r['tpot_mean_s'] * 1e3:.1f}ms "
                     f"{'ok' if good else 'violates'} ({r['wall_s']:.1f}s wall)")
        return good, r

    trials = []
    good_lo, r_lo = ok(lo)
    trials.append((lo, good_lo))
    if not good_lo:
        return {"policy": policy, "aps": 0.0, "trials": trials, "at_capacity": r_lo}
    best, best_r = lo, r_lo
    good_hi, r_hi = ok(hi)
    trials.append((hi, good_hi))
    if good_hi:
        return {"policy": policy, "aps": hi, "trials": trials, "at_capacity": r_hi, "note": "hi bound met the SLO"}
    a, b = lo, hi
    for _ in range(iters):
        mid = math.sqrt(a * b)
        good, r = ok(mid)
        trials.append((mid, good))
        if good:
            a, best, best_r = mid, mid, r
        else:
            b = mid
    return {"policy": policy, "aps": best, "aps_upper": b, "trials": trials, "at_capacity": best_r}
