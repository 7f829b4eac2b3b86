"""``dualpath run`` end to end: config, workload, checks, one fresh cluster per policy, the report.

Everything that can be refused is refused before the first turn: an invalid config, an unknown policy, a trace
that is missing, empty, malformed or longer than the model's context (file:line), and a cluster that cannot
hold the largest turn. Ctrl-C cancels the running policy cleanly and prints the table of what finished.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from dualpath.config import DualPathConfig
from dualpath.errors import ConfigError, DualPathError
from dualpath.runtime.defaults import DEFAULT_POLICIES, load_run_config
from dualpath.runtime.report import format_report, order_policies, report_json
from dualpath.runtime.runner import PolicyRun, Progress, run_policy, summarize
from dualpath.runtime.workload import check_trajectories, load_trajectories
from dualpath.scheduler.policies import ABLATION_LADDER, POLICIES
from dualpath.workload.arrivals import SLO
from dualpath.workload.trajectory import Trajectory

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


@dataclass
class RunRequest:
    """What the command line asks for (None = the config's value)."""

    config: str | None = None
    policies: list[str] | None = None
    trace: str | None = None
    trace_format: str | None = None
    agents: int | None = None
    mode: str | None = None
    rate: float | None = None
    capacity: bool = False
    sim: bool = False
    json_out: str | None = None
    plot: str | None = None
    progress: bool = True
    out: Any = None  # stream of the report (default stdout)
    err: Any = None  # stream of the progress lines (default stderr)


def parse_policies(values: list[str] | None) -> list[str]:
    """Policy names from ``--policy`` values (repeatable, comma-separated, ``ladder`` = the ablation + oracle),
    in report order. Unknown names are a ConfigError."""
    if not values:
        return list(DEFAULT_POLICIES)
    names: list[str] = []
    for v in values:
        for n in (x.strip() for x in v.split(",")):
            if not n:
                continue
            expand = [*ABLATION_LADDER, "oracle"] if n == "ladder" else [n]
            for m in expand:
                if m not in POLICIES:
                    raise ConfigError(f"--policy: unknown policy {m!r}; known: {', '.join(POLICIES)}, ladder")
                if m not in names:
                    names.append(m)
    return order_policies(names)


def apply_request(cfg: DualPathConfig, req: RunRequest) -> DualPathConfig:
    """The config with the command line's workload options applied."""
    cfg = cfg.model_copy(deep=True)
    w = cfg.workload
    if req.trace is not None:
        w.trace = req.trace
    if req.trace_format is not None:
        w.trace_format = req.trace_format  # type: ignore[assignment]
    if req.agents is not None:
        if req.agents < 1:
            raise ConfigError(f"--agents must be >= 1, got {req.agents}")
        w.n_agents = req.agents
    if req.mode is not None:
        w.mode = req.mode  # type: ignore[assignment]
    if req.rate is not None:
        if req.rate <= 0:
            raise ConfigError(f"--rate must be > 0, got {req.rate}")
        w.rate_aps = req.rate
    if req.capacity:
        w.mode = "online"
    return cfg


def model_limits(cfg: DualPathConfig) -> tuple[int, int] | None:
    """(max context, vocabulary) of the configured model when known without loading it."""
    m = cfg.model
    if m.kind == "synthetic":
        return m.max_context, m.vocab_size
    return None


def describe(cfg: DualPathConfig, trajs: list[Trajectory], policies: list[str]) -> str:
    c, m, w = cfg.cluster, cfg.model, cfg.workload
    bw = (lambda g: "unlimited" if g is None else f"{g * 1e3:g} MB/s")  # noqa: E731
    model = (f"synthetic model ({m.n_layers} layers, {m.n_kv_heads}x{m.head_dim} KV heads, {m.kv_dtype})"
             if m.kind == "synthetic" else f"llama model ({m.path or 'embedded SmolLM2-135M'})")
    turns = sum(t.n_turns for t in trajs)
    src = w.trace or f"{w.dataset} generator"
    return (
        f"dualpath run: emulated {c.prefill_nodes}P{c.decode_nodes}D cluster ({c.engines_per_node} engine/node), "
        f"storage NIC {bw(c.snic_gbps)} per node, compute NIC {bw(c.cnic_gbps)} per engine, "
        f"{cfg.storage.kind} storage\n"
        f"  {model}; workload: {src}, {len(trajs)} agents, {turns} turns, {w.mode}; "
        f"policies: {', '.join(policies)}"
    )


def _leaf_error(exc: BaseException) -> BaseException:
    """The first DualPathError inside (nested) exception groups, else ``exc``."""
    stack = [exc]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        elif isinstance(e, DualPathError):
            return e
    return exc


@dataclass
class RunOutcome:
    """What :func:`execute` produced: per-policy runs (possibly partial) and their summaries."""

    config: DualPathConfig
    policies: list[str]
    runs: dict[str, PolicyRun] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    capacity: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    wall_s: float = 0.0


def prepare(req: RunRequest) -> tuple[DualPathConfig, list[str], list[Trajectory]]:
    """Config, policies and trajectories, every check that does not need a cluster done."""
    cfg = apply_request(load_run_config(req.config), req)
    policies = parse_policies(req.policies)
    trajs = load_trajectories(cfg.workload)
    limits = model_limits(cfg)
    if limits is not None:
        check_trajectories(trajs, cfg.workload, max_context=limits[0], vocab_size=limits[1])
    return cfg, policies, trajs


def execute(req: RunRequest) -> RunOutcome:
    """Run every policy (one fresh cluster each) and summarise; Ctrl-C keeps what finished."""
    cfg, policies, trajs = prepare(req)
    err = req.err if req.err is not None else sys.stderr
    out = RunOutcome(cfg, policies)
    total = sum(t.n_turns for t in trajs)
    w = cfg.workload
    slo = SLO(w.ttft_slo_s, w.tpot_slo_s)
    t0 = time.perf_counter()

    async def one(policy: str, mode: str, rate: float, label: str, run: PolicyRun | None = None) -> PolicyRun:
        run = run if run is not None else PolicyRun(policy)
        prog = Progress(label, total, stream=err, enabled=req.progress)
        note = ""
        try:
            await run_policy(cfg, policy, trajs, run, mode=mode, rate_aps=rate, slo=slo, seed=w.seed,
                             progress=prog)
        except BaseException:
            note = "(stopped)"
            raise
        finally:
            prog.close(note)
        return run

    async def main() -> None:
        for p in policies:
            if req.capacity:
                out.capacity[p] = await _capacity(p, one, w.rate_aps)
                continue
            out.runs[p] = PolicyRun(p)  # filled as turns finish: a cancelled run keeps what finished
            await one(p, w.mode, w.rate_aps, p, out.runs[p])

    try:
        anyio.run(main)
    except KeyboardInterrupt:
        out.interrupted = True
    except BaseException as exc:
        leaf = _leaf_error(exc)
        if leaf is not exc:
            raise leaf from None
        raise
    out.wall_s = time.perf_counter() - t0
    out.summaries = {p: summarize(r) for p, r in out.runs.items() if r.records}
    return out


async def _capacity(policy: str, one: Any, rate0: float) -> dict[str, Any]:
    from dualpath.runtime.clients import capacity_search

    async def trial(rate: float) -> tuple[bool, float, float, int]:
        run = await one(policy, "online", rate, f"{policy}@{rate:.3g}")
        s = summarize(run)
        ok = bool(run.slo_met)
        return ok, s["ttft_p50_s"] or math.nan, s["tpot_p50_s"] or math.nan, s["turns"]

    res = await capacity_search(trial, lo=rate0 / 2, hi=rate0 * 2, iterations=3)
    return {"capacity_aps": res.capacity_aps,
            "points": [p.__dict__ for p in res.points]}


def _write_json(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=str)


def run_command(req: RunRequest) -> int:
    """The whole command: run, print the report, write JSON and the plot. Returns the exit status."""
    res = execute(req)
    stream = req.out if req.out is not None else sys.stdout
    cfg = res.config
    P, D = cfg.cluster.prefill_nodes, cfg.cluster.decode_nodes
    extra: dict[str, Any] = {"wall_s": res.wall_s, "interrupted": res.interrupted,
                             "config": cfg.model_dump(mode="json")}
    if res.capacity:
        extra["capacity"] = res.capacity
    if req.json_out:  # written first, then again with the sim-to-real figures when asked for
        _write_json(req.json_out, report_json(res.summaries, P, D, **extra))
    print(describe(cfg, load_trajectories(cfg.workload), res.policies), file=stream)
    if res.capacity:
        for p, c in res.capacity.items():
            print(f"  {p}: capacity {c['capacity_aps']:.3g} agents/s under the SLO", file=stream)
    if res.summaries:
        print(format_report(res.summaries, P, D), file=stream)
    if res.interrupted:
        done = [p for p, r in res.runs.items() if r.complete]
        print(f"interrupted: {len(done)} of {len(res.policies)} policies finished"
              f" ({', '.join(done) or 'none'}); partial runs are marked (partial)", file=stream)
    print(f"wall time {res.wall_s:.1f} s", file=stream)
    if req.sim and res.summaries and not res.interrupted:
        from dualpath.runtime.sim2real import sim_to_real

        extra["sim_to_real"] = sim_to_real(cfg, res.policies, res.summaries, stream=stream)
        if req.json_out:
            _write_json(req.json_out, report_json(res.summaries, P, D, **extra))
    if req.plot and res.summaries:
        from dualpath.metrics.plots import plot_link_utilisation

        # panel titles show the same balance figure as the table (busy windows)
        panels = {p: dict(res.summaries[p]["metrics"], snic_balance=res.summaries[p]["snic_balance"])
                  for p in order_policies(list(res.summaries))}
        plot_link_utilisation(panels, req.plot, kinds=("snic",))
        print(f"plot: {req.plot}", file=stream)
    return 130 if res.interrupted else 0
