"""``dualpath run`` end to end: config, workload, checks, one fresh cluster per policy, the report.

Everything that can be refused is refused before the first turn: an invalid config, an unknown policy, a trace
that is missing, empty, malformed or longer than the model's context (file:line), and a cluster that cannot
hold the largest turn. Ctrl-C cancels the running policy cleanly and prints the table of what finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from dualpath.commands import check_output_file
from dualpath.config import DualPathConfig
from dualpath.errors import ConfigError, DualPathError
from dualpath.runtime.defaults import DEFAULT_POLICIES, load_run_config
from dualpath.runtime.report import format_report, order_policies, report_json
from dualpath.runtime.runner import PolicyRun, Progress, run_policy, summarize
from dualpath.runtime.workload import check_trajectories, fit_to_workload, load_trajectories, workload_source
from dualpath.scheduler.policies import ABLATION_LADDER, POLICIES
from dualpath.workload.arrivals import SLO
from dualpath.workload.trajectory import Trajectory

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


@dataclass
class RunRequest:
    """What the command line asks for (None = the config's value).

    ``config``: a file path, a mapping of sections (both merged over the ``demo`` preset and the ``DUALPATH_*``
    environment) or a complete :class:`DualPathConfig` (used as it is). ``out``: where :func:`execute` writes the
    report (header and table; nothing when None) and where :func:`run_command` prints it (default stdout).
    """

    config: str | Path | Mapping[str, Any] | DualPathConfig | None = None
    policies: list[str] | None = None
    trace: str | None = None
    trace_format: str | None = None
    max_requests: int | None = None  # trace: only its first N requests
    repeat: int | None = None  # trace: K copies
    time_scale: float | None = None  # trace: its times divided by this
    agents: int | None = None
    mode: str | None = None
    rate: float | None = None
    capacity: bool = False
    sim: bool = False
    json_out: str | None = None
    plot: str | None = None
    progress: bool = True
    out: Any = None  # stream of the report (execute: none; run_command: stdout)
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
    if not names:
        raise ConfigError(f"--policy: no policy named in {' '.join(values)!r}; known: {', '.join(POLICIES)}, ladder")
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
        if w.trace is not None:
            w.max_agents = req.agents  # a trace: its first N sessions (never cycled to reach N)
        else:
            w.n_agents = req.agents
    if req.max_requests is not None or req.repeat is not None or req.time_scale is not None:
        if w.trace is None:
            raise ConfigError("--max-requests, --repeat and --time-scale apply to a trace (--trace FILE)")
        if req.time_scale is not None:
            if not (math.isfinite(req.time_scale) and req.time_scale > 0):
                raise ConfigError(f"--time-scale must be a positive number, got {req.time_scale}")
            w.time_scale = req.time_scale
        if req.max_requests is not None:
            if req.max_requests < 1:
                raise ConfigError(f"--max-requests must be >= 1, got {req.max_requests}")
            w.max_requests = req.max_requests
        if req.repeat is not None:
            if req.repeat < 1:
                raise ConfigError(f"--repeat must be >= 1, got {req.repeat}")
            w.repeat = req.repeat
    if req.mode is not None:
        w.mode = req.mode  # type: ignore[assignment]
    if req.rate is not None:
        if not (math.isfinite(req.rate) and req.rate > 0):
            raise ConfigError(f"--rate must be a finite number > 0, got {req.rate}")
        w.rate_aps = req.rate
    if req.capacity:
        if req.mode == "offline":
            raise ConfigError("--capacity searches the online arrival rate; it cannot run with --mode offline")
        w.mode = "online"
    for flag, out in (("--json", req.json_out), ("--plot", req.plot)):  # refused now, not after the whole run
        if out:
            check_output_file(flag, out)
    return cfg


def model_limits(cfg: DualPathConfig) -> tuple[int, int] | None:
    """(max context, vocabulary) of the configured model when known without loading it."""
    m = cfg.model
    if m.kind == "synthetic":
        return m.max_context, m.vocab_size
    return None


def _bw(gbps: float | None) -> str:
    return "unlimited" if gbps is None else f"{gbps * 1e3:g} MB/s"


def describe(cfg: DualPathConfig, trajs: list[Trajectory], policies: list[str]) -> str:
    """The report's header: the cluster, then what is real (moves real bytes, computes) and what is modelled."""
    c, m, w, st = cfg.cluster, cfg.model, cfg.workload, cfg.storage
    turns = sum(t.n_turns for t in trajs)
    src = workload_source(cfg, trajs)
    where = getattr(st, "root", None)
    storage = f"{st.kind} storage" + (f" under {where}" if where else " (in memory)" if st.kind == "memory" else "")
    transport = {"loopback": "in-process transport (device copies)"}.get(cfg.transport.kind,
                                                                      f"{cfg.transport.kind} transport")
    if m.kind == "synthetic":
        heads = f"{m.n_kv_heads} KV head{'s' if m.n_kv_heads != 1 else ''} of dim {m.head_dim}"
        model = f"synthetic model ({m.n_layers} layers, {heads}, {m.kv_dtype} KV)"
        compute = (f"compute time of the synthetic model (sleeps sized by FLOPs at {m.device_tflops:g} TFLOPS, "
                   f"a fixed {m.decode_step_s * 1e3:g} ms decode step)")
        real_compute = "KV bytes of the synthetic model"
    else:
        path = getattr(m, "path", None)
        model = f"{m.kind} model ({path or ('embedded SmolLM2-135M' if m.kind == 'llama' else 'built in')})"
        compute = ""
        real_compute = "the model's forward passes and KV"
    modelled = [f"storage NICs {_bw(c.snic_gbps)} per node and compute NICs {_bw(c.cnic_gbps)} per engine "
                f"(emulated links: bytes are charged time at these rates"
                f"{'; unlimited for oracle' if 'oracle' in policies else ''})"]
    if compute:
        modelled.append(compute)
    return (
        f"dualpath run: emulated {c.prefill_nodes}P{c.decode_nodes}D cluster on this machine "
        f"({c.engines_per_node} engine/node, {model})\n"
        f"  real:     {storage}, {transport}, {real_compute}, the scheduler\n"
        f"  modelled: {'; '.join(modelled)}\n"
        f"  workload: {src}, {len(trajs)} agents, {turns} turns, {w.mode}; policies: {', '.join(policies)}"
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
    io: dict[str, dict[str, int]] = field(default_factory=dict)  # per policy: bytes really moved

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per policy (numbers and strings only): ready for ``pandas.DataFrame(rows)``."""
        out = []
        for p, s in self.summaries.items():
            row: dict[str, Any] = {"policy": p}
            row.update({k: v for k, v in s.items() if isinstance(v, int | float | str | bool) or v is None})
            out.append(row)
        return out

    def turns(self) -> list[dict[str, Any]]:
        """One flat dict per finished turn of every policy (times in seconds from the run's start)."""
        out = []
        for p, run in self.runs.items():
            t0 = run.client.t_start
            for r in run.records:
                o = r.outcome
                out.append({
                    "policy": p, "agent": r.agent, "turn": r.turn, "prompt_tokens": o.prompt_tokens,
                    "hit_tokens": o.hit_tokens, "gen_tokens": len(o.tokens), "path": str(o.path), "pe": o.pe,
                    "de": o.de, "t_submit": o.t_submit - t0, "ttft": o.ttft, "tpot": o.tpot,
                    "t_done": o.t_done - t0,
                })
        return out

    def report(self) -> str:
        """The command's text: the header and the table with the speed-up lines."""
        cfg = self.config
        text = describe(cfg, load_trajectories(cfg.workload), self.policies)
        if self.summaries:
            text += "\n" + format_report(self.summaries, cfg.cluster.prefill_nodes, cfg.cluster.decode_nodes)
        return text


def prepare(req: RunRequest) -> tuple[DualPathConfig, list[str], list[Trajectory]]:
    """Config, policies and trajectories, every check that does not need a cluster done."""
    cfg = apply_request(load_run_config(req.config), req)
    policies = parse_policies(req.policies)
    trajs = load_trajectories(cfg.workload)
    cfg = fit_to_workload(cfg, trajs)  # a trace sizes the synthetic model's context and the PE scratch
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
        clusters: list[Any] = []

        def factory(c: DualPathConfig) -> Any:
            from dualpath.cluster import Cluster

            clusters.append(Cluster(c))
            return clusters[-1]

        try:
            await run_policy(cfg, policy, trajs, run, mode=mode, rate_aps=rate, slo=slo, seed=w.seed,
                             progress=prog, cluster_factory=factory)
        except BaseException:
            note = "(stopped)"
            raise
        finally:
            prog.close(note)
            if clusters:
                out.io[label] = clusters[-1].io_stats()
        return run

    async def runs() -> None:
        for p in policies:
            if req.capacity:
                out.capacity[p] = await _capacity(p, one, w.rate_aps)
                continue
            out.runs[p] = PolicyRun(p)  # filled as turns finish: a cancelled run keeps what finished
            await one(p, w.mode, w.rate_aps, p, out.runs[p])

    async def on_sigint(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                out.interrupted = True
                scope.cancel()
                return

    async def main() -> None:
        """The runs, stopped by Ctrl-C through a cancel scope: asyncio's own SIGINT handling cancels the main
        task natively, which a cancel scope cancelled at the same moment (a deadline) can absorb, and the runs
        would go on."""
        if threading.current_thread() is not threading.main_thread():
            await runs()  # (signals reach the main thread only; there, Ctrl-C is the caller's)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(on_sigint, tg.cancel_scope)
            await runs()
            tg.cancel_scope.cancel()  # (the Ctrl-C watcher)

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
    out.summaries = {p: with_real_bytes(summarize(r), out.io.get(p)) for p, r in out.runs.items() if r.records}
    if req.out is not None:
        print(out.report(), file=req.out)
    return out


def with_real_bytes(summary: dict[str, Any], io: Mapping[str, int] | None) -> dict[str, Any]:
    """``summary`` with the bytes storage and transports really moved beside those charged to emulated links:
    ``real_storage_read_bytes``, ``real_storage_written_bytes``, ``real_transport_bytes`` and
    ``link_storage_read_bytes`` (every storage NIC's read link), ``link_cnic_bytes`` (every compute NIC, both
    directions: transport bytes plus host-device copies, the paper's CNIC-centric rule)."""
    links = summary.get("link_bytes") or {}
    summary["link_storage_read_bytes"] = sum(v for k, v in links.items() if k.endswith("snic.read"))
    summary["link_storage_write_bytes"] = sum(v for k, v in links.items() if k.endswith("snic.write"))
    summary["link_cnic_bytes"] = sum(v for k, v in links.items() if ".cnic." in k)
    if io is not None:
        summary["real_storage_read_bytes"] = io.get("storage_read")
        summary["real_storage_written_bytes"] = io.get("storage_written")
        summary["real_transport_bytes"] = io.get("transport_sent")
    return summary


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
    res = execute(dataclasses.replace(req, out=None))
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
