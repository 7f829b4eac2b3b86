"""Simulation tasks of the reproduction: one run, or one online capacity search, described by plain data.

A task is a dict (picklable, so tasks run in worker processes); :func:`run_task` returns the run summaries
(:func:`dualpath.sim.runner.run_policy`'s dicts) it produced, each tagged with the task's ``key``.
"""

from __future__ import annotations

import math
from typing import Any

from dualpath.sim.presets import ScenarioPreset, get_scenario


def run_spec(
    key: str,
    preset: str,
    policy: str,
    *,
    agents: int,
    P: int | None = None,
    D: int | None = None,
    dataset: str | None = None,
    append_scale: float = 1.0,
    gen_scale: float = 1.0,
    mode: str = "offline",
    aps: float | None = None,
    horizon_s: float | None = None,
    warmup_s: float | None = None,
    overrides: dict[str, Any] | None = None,
    engine: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One simulation run (a task); ``engine``: what-if slowdowns (``prefill_slowdown``, ``decode_slowdown``)."""
    return {"kind": "run", "key": key, "preset": preset, "policy": policy, "agents": agents, "P": P, "D": D,
            "dataset": dataset, "append_scale": append_scale, "gen_scale": gen_scale, "mode": mode, "aps": aps,
            "horizon_s": horizon_s, "warmup_s": warmup_s, "overrides": dict(overrides or {}),
            "engine": dict(engine or {})}


def capacity_spec(key: str, preset: str, policy: str, lo: float, hi: float, iters: int, horizon_s: float,
                  warmup_s: float, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A capacity search (a task): geometric bisection on APS; every trial's run is kept."""
    return {"kind": "capacity", "key": key, "preset": preset, "policy": policy, "lo": lo, "hi": hi, "iters": iters,
            "horizon_s": horizon_s, "warmup_s": warmup_s, "overrides": dict(overrides or {})}


def _scenario(spec: dict[str, Any], aps: float | None = None) -> Any:
    from dualpath.sim.runner import scenario_from_preset
    from dualpath.workload import generate_dataset  # type: ignore[attr-defined]

    sp = get_scenario(spec["preset"])
    P, D = spec.get("P") or sp.P, spec.get("D") or sp.D
    dataset = spec.get("dataset") or sp.dataset
    name = f"{sp.model}-{P}p{D}d-{dataset}" if (P, D, dataset) != (sp.P, sp.D, sp.dataset) else sp.name
    sp = ScenarioPreset(name, sp.model, sp.gpu, sp.node, P, D, dataset, sp.agents, sp.note)
    mode = spec.get("mode", "offline")
    rate = aps if aps is not None else spec.get("aps")
    horizon = spec.get("horizon_s")
    if mode == "online":
        assert rate is not None and horizon is not None
        agents = int(math.ceil(rate * horizon * 1.1)) + 8
    else:
        agents = int(spec["agents"])
    trajs = generate_dataset(dataset, agents, seed=0, append_scale=spec.get("append_scale", 1.0),
                             gen_scale=spec.get("gen_scale", 1.0))
    eng = spec.get("engine") or {}
    sc = scenario_from_preset(sp, agents=agents, dataset=dataset, mode=mode, rate_aps=rate, horizon_s=horizon,
                              trajectories=trajs, overrides=spec.get("overrides") or None,
                              prefill_slowdown=float(eng.get("prefill_slowdown", 1.0)),
                              decode_slowdown=float(eng.get("decode_slowdown", 1.0)))
    if mode == "online":
        w = spec.get("warmup_s")
        sc.warmup_s = float(w if w is not None else float(horizon or 0.0) / 2)
    return sc


def run_task(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one task; returns its run summaries (a capacity search: every trial, the best one flagged)."""
    from dualpath.sim.runner import run_policy

    if spec["kind"] == "run":
        r = run_policy(_scenario(spec), spec["policy"])
        r.update(key=spec["key"], task=_public(spec))
        return [r]
    runs: list[dict[str, Any]] = []
    slo_ttft, slo_tpot = 4.0, 0.05

    def trial(aps: float) -> bool:
        s = dict(spec, mode="online", aps=aps)
        r = run_policy(_scenario(s, aps), spec["policy"])
        good = r["ttft_mean_s"] <= slo_ttft and not (r["tpot_mean_s"] > slo_tpot)
        r.update(key=spec["key"], task=_public(s), aps=aps, slo_met=good)
        runs.append(r)
        return good

    lo, hi = float(spec["lo"]), float(spec["hi"])
    best = 0.0
    if trial(lo):
        best = lo
        if trial(hi):
            best = hi
        else:
            a, b = lo, hi
            for _ in range(int(spec["iters"])):
                mid = math.sqrt(a * b)
                if trial(mid):
                    a = best = mid
                else:
                    b = mid
    for r in runs:
        r["capacity_aps"] = best
    return runs


def _public(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("kind",)}


def run_tasks(specs: list[dict[str, Any]], jobs: int = 1, progress: Any = None) -> list[dict[str, Any]]:
    """Run ``specs`` (``jobs`` worker processes when > 1), longest-looking first; all summaries, in spec order."""
    results: dict[int, list[dict[str, Any]]] = {}
    if jobs <= 1:
        for i, s in enumerate(specs):
            results[i] = run_task(s)
            if progress:
                progress(f"[{len(results)}/{len(specs)}] {s['key']} {s['policy']}: "
                         f"{sum(r['wall_s'] for r in results[i]):.1f}s")
    else:
        import multiprocessing as mp

        order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))
        pool = mp.get_context("spawn").Pool(jobs)
        try:
            for i, out in pool.imap_unordered(_indexed, [(i, specs[i]) for i in order]):
                results[i] = out
                if progress:
                    s = specs[i]
                    progress(f"[{len(results)}/{len(specs)}] {s['key']} {s['policy']}: "
                             f"{sum(r['wall_s'] for r in out):.1f}s")
            pool.close()
        finally:
            pool.terminate()  # an interrupted reproduction leaves no worker behind
            pool.join()
    return [r for i in range(len(specs)) for r in results[i]]


def _indexed(arg: tuple[int, dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    return arg[0], run_task(arg[1])


def _cost(spec: dict[str, Any]) -> float:
    if spec["kind"] == "capacity":
        return 1e9 + spec["horizon_s"] * (spec["iters"] + 2)
    if spec.get("mode") == "online":
        return 1e6 + float(spec.get("aps") or 0) * float(spec.get("horizon_s") or 0)
    return float(spec["agents"]) * ((spec.get("P") or 2) + (spec.get("D") or 4))
