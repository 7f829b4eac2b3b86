"""The never-lose workload matrix: DualPath against Basic and ``pe_only`` on every kind of workload.

A cell is (model preset, P/D, workload, mode). Workloads are generated here, two families:

* ``hit{h}-app{a}``: multi-turn sessions whose appends average ``a`` tokens (lognormal, sigma 0.5; generation
  ``a / 8``), with a mixture of session lengths chosen so the session-prefix hit rate is about ``h``
  (hit rates near 1 need long sessions; sessions are capped at ``max_len`` tokens, so a cell reports the hit
  rate it reached);
* ``tracelike``: what public request traces look like: many short sessions (geometric turns, mean 2), a first
  prompt of about 6K tokens (lognormal, median 6,000, sigma 0.9), follow-ups of about 1.5K, generations of
  about 300, low reuse.

Offline: every session starts at 0. Online: sessions arrive as a Poisson process spread over ``online_span``
times Basic's offline JCT of the same cell (a load a little above Basic's capacity: queues build, nothing is
idle for lack of work for long). The figure of merit is the same in both modes: the time to serve the whole
workload (equal work, so the inverse ratio of throughputs), taken when 95 % of the requests are done:
``ratio = min(T95_basic, T95_pe_only) / T95_dualpath``; the never-lose property is ``ratio >= 0.98``. The last
5 % are the drain, when fewer sessions than engines are left and which engine gets the last long session
decides the end (``ratio_all``, over every request, is reported beside it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dualpath.errors import ConfigError
from dualpath.workload.trajectory import Trajectory, Turn

#: the matrix's axes (``dualpath simulate --matrix``)
HIT_RATES = (0.1, 0.5, 0.9, 0.98)
APPENDS = (512, 4096)
PD = ((1, 1), (1, 2), (2, 1), (2, 4))
MODELS = (("ds_v32", "h800"), ("ds27b", "h800"), ("qwen25_32b", "h200"))
MODES = ("offline", "online")
POLICIES = ("basic", "pe_only", "dualpath")


def _session_hit(turns: int, a: float, g: float) -> float:
    """Hit rate of a session of ``turns`` turns appending ``a`` and generating ``g`` (each hits its context)."""
    hit = prompt = ctx = 0.0
    for _ in range(turns):
        hit += ctx
        prompt += ctx + a
        ctx += a + g
    return hit / prompt if prompt else 0.0


def hit_workload(hit: float, append: int, n_agents: int, seed: int = 0, max_len: int = 65536) -> list[Trajectory]:
    """Sessions with appends of about ``append`` tokens and a session-prefix hit rate of about ``hit``."""
    rng = np.random.default_rng([seed, int(hit * 1000), append])
    g = max(1.0, append / 8)
    t_cap = max(1, int(max_len // (append + g) * 0.8))
    # the smallest session length reaching the target (capped), then a mixture with one turn fewer to land on it
    t_hi = 1
    while t_hi < t_cap and _session_hit(t_hi, append, g) < hit:
        t_hi += 1
    t_lo = max(1, t_hi - 1)
    h_hi, h_lo = _session_hit(t_hi, append, g), _session_hit(t_lo, append, g)
    # token-weighted mixture: p sessions of t_hi turns, the rest of t_lo
    w_hi, w_lo = t_hi * t_hi, t_lo * t_lo
    p = 1.0 if h_hi <= h_lo else min(1.0, max(0.0, (hit - h_lo) * w_lo / ((h_hi - hit) * w_hi + (hit - h_lo) * w_lo)))
    out = []
    for i in range(n_agents):
        t = t_hi if rng.random() < p else t_lo
        turns = [Turn(max(1, int(append * rng.lognormal(0, 0.5))), max(1, int(g * rng.lognormal(0, 0.5))))
                 for _ in range(t)]
        out.append(Trajectory(i, turns).truncated(max_len))
    return out


def tracelike_workload(n_agents: int, seed: int = 0, max_len: int = 65536) -> list[Trajectory]:
    """Many short sessions, low reuse: the shape of public request traces (module docstring)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n_agents):
        t = 1 + int(rng.geometric(0.5)) - 1
        turns = [Turn(max(16, int(6000 * rng.lognormal(0, 0.9))), max(1, int(300 * rng.lognormal(0, 0.7))))]
        for _ in range(t - 1):
            turns.append(Turn(max(16, int(1500 * rng.lognormal(0, 0.9))), max(1, int(300 * rng.lognormal(0, 0.7)))))
        out.append(Trajectory(i, turns).truncated(max_len))
    return out


def spread_arrivals(trajs: list[Trajectory], span_s: float, seed: int = 0) -> list[Trajectory]:
    """Copies of ``trajs`` arriving as a Poisson process over about ``span_s`` seconds."""
    n = len(trajs)
    gaps = np.random.default_rng([seed, 11]).exponential(span_s / max(1, n), size=n)
    at = np.cumsum(gaps) - gaps[0]
    return [Trajectory(t.tid, t.turns, float(a)) for t, a in zip(trajs, at, strict=True)]


@dataclass(frozen=True)
class Cell:
    model: str
    gpu: str
    P: int
    D: int
    workload: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.model}-{self.P}p{self.D}d-{self.workload}-{self.mode}"


def cells(quick: bool = False) -> list[Cell]:
    """The matrix's cells; ``quick``: a small subset that still crosses every regime (the test suite's)."""
    if quick:
        wl = ["hit0.1-app4096", "hit0.5-app512", "hit0.98-app512", "tracelike"]
        return [Cell(m, g, P, D, w, mode) for (m, g, P, D) in (("ds27b", "h800", 1, 1), ("ds_v32", "h800", 2, 4))
                for w in wl for mode in MODES]
    wls = [f"hit{h:g}-app{a}" for h in HIT_RATES for a in APPENDS] + ["tracelike"]
    return [Cell(m, g, P, D, w, mode) for (m, g) in MODELS for (P, D) in PD for w in wls for mode in MODES]


def _workload(name: str, n_agents: int, seed: int, max_len: int) -> list[Trajectory]:
    if name == "tracelike":
        return tracelike_workload(n_agents, seed, max_len)
    h, a = name.removeprefix("hit").split("-app")
    return hit_workload(float(h), int(a), n_agents, seed, max_len)


def run_cell(cell: Cell, *, requests_per_pe: int = 128, prompt_tokens_per_pe: float = 0.0, min_agents_per_pe: int = 16, seed: int = 0, online_span: float = 0.9,
             breakdown_dt: float = 0.0, policies: Sequence[str] = POLICIES, quota_floor: bool = True) -> dict[str, Any]:
    """Simulate ``cell`` under ``policies``; the row of the matrix (``ratio`` = never-lose figure).

    ``quota_floor=False`` runs without the never-lose batching rule (to show what it fixes)."""
    from dualpath.sim.presets import ScenarioPreset, get_gpu, get_model, get_node
    from dualpath.sim.runner import run_policy, scenario_from_preset

    node = get_node("hopper8")
    n_pe = cell.P * node.gpus
    sp = ScenarioPreset(cell.name, cell.model, cell.gpu, "hopper8", cell.P, cell.D, "64k", 0)
    # sessions no longer than a DE holds (the 660B's DE on few nodes holds little KV)
    from dualpath.sim.compute import RooflineCompute

    comp = RooflineCompute(get_model(cell.model), get_gpu(cell.gpu), cell.P * node.gpus, cell.D * node.gpus)
    de_tok = int(comp.de_free_hbm() // get_model(cell.model).kv_bytes_per_token)
    if de_tok < 4096:
        return {"cell": cell.name, **cell.__dict__, "skipped": f"a DE holds {max(0, de_tok)} KV tokens"}
    max_len = min(65536, int(de_tok * 0.9))
    probe = _workload(cell.workload, 64, seed, max_len)
    mean_turns = sum(t.n_turns for t in probe) / max(1, len(probe))
    mean_prompt = sum(t.prompt_len(i) for t in probe for i in range(t.n_turns)) / max(1, sum(t.n_turns for t in probe))
    # enough requests that the run's tail (the last sessions) is small next to its steady state: at least
    # requests_per_pe requests and prompt_tokens_per_pe prompt tokens per PE
    per_pe = max(requests_per_pe, prompt_tokens_per_pe / max(1.0, mean_prompt))
    n_agents = max(min_agents_per_pe * n_pe, math.ceil(per_pe * n_pe / mean_turns))
    trajs = _workload(cell.workload, n_agents, seed, max_len)
    row: dict[str, Any] = {"cell": cell.name, **cell.__dict__, "requests": sum(t.n_turns for t in trajs)}
    runs: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if cell.mode == "online":
        base = run_policy(scenario_from_preset(sp, trajectories=trajs), "basic")
        trajs = spread_arrivals(trajs, online_span * base["sim_time_s"], seed)
    try:
        sc = scenario_from_preset(sp, trajectories=trajs, mode=cell.mode, rate_aps=1.0)
    except ConfigError as exc:
        return {**row, "skipped": str(exc)}
    if cell.mode == "online":  # keep the generated arrivals (scenario_from_preset draws Poisson ones)
        sc.trajectories = trajs
    sc.quota_floor = quota_floor
    for p in policies:
        runs[p] = run_policy(sc, p, breakdown_dt=breakdown_dt)
    row["wall_s"] = time.perf_counter() - t0
    row["hit_rate"] = runs[policies[0]]["hit_rate"]
    row["time_s"] = {p: r["sim_time_s"] for p, r in runs.items()}
    row["pe_util"] = {p: r["pe_compute_util"] for p, r in runs.items()}
    row["snic_util"] = {p: r["snic_util"] for p, r in runs.items()}
    if breakdown_dt > 0:
        row["breakdown"] = {p: r["breakdown"] for p, r in runs.items()}
    row["t95_s"] = {p: r["done_p95_s"] for p, r in runs.items()}
    if "dualpath" in runs:
        # the never-lose figure: time to serve 95 % of the requests (the drain of the last sessions, when fewer
        # sessions than engines are left, decides the last 5 % by which engine gets the last long session)
        best = min(runs[p]["done_p95_s"] for p in runs if p != "dualpath")
        row["ratio"] = best / runs["dualpath"]["done_p95_s"]
        row["ratio_all"] = min(runs[p]["sim_time_s"] for p in runs if p != "dualpath") / runs["dualpath"]["sim_time_s"]
        if "basic" in runs:
            row["vs_basic"] = runs["basic"]["done_p95_s"] / runs["dualpath"]["done_p95_s"]
    return row


def run_matrix(quick: bool = False, *, progress: Callable[[str], None] | None = None,
               select: str | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Every cell (``select``: only cells whose name contains it); ``kw`` go to :func:`run_cell` (the matrix
    asks for at least 500K prompt tokens per PE unless told otherwise)."""
    kw.setdefault("prompt_tokens_per_pe", 500_000.0)
    rows = []
    for c in cells(quick):
        if select and select not in c.name:
            continue
        row = run_cell(c, **kw)
        rows.append(row)
        if progress is not None:
            progress(format_row(row))
    return rows


def format_row(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{row['cell']:42s} skipped: {row['skipped']}"
    t = row["time_s"]
    return (f"{row['cell']:42s} req {row['requests']:>6d} hit {row['hit_rate']:.2f} "
            f"basic {t.get('basic', math.nan):8.1f}s pe_only {t.get('pe_only', math.nan):8.1f}s "
            f"dualpath {t.get('dualpath', math.nan):8.1f}s  DP/Basic {row.get('vs_basic', math.nan):5.2f} "
            f"DP/max(B,PE) {row.get('ratio', math.nan):5.3f} (all requests {row.get('ratio_all', math.nan):5.3f})")


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if "ratio" in r]
    worst = min(ok, key=lambda r: r["ratio"]) if ok else None
    return {"cells": len(rows), "run": len(ok), "min_ratio": worst["ratio"] if worst else math.nan,
            "worst_cell": worst["cell"] if worst else None,
            "losing": [r["cell"] for r in ok if r["ratio"] < 0.98]}
