"""Run one policy on a fresh emulated cluster: fresh storage, the same trace, the scheduler driver, a client.

Every policy gets its own cluster and an empty storage directory, so all policies see the same trace and the
same cold storage. :func:`run_policy` fills a :class:`PolicyRun` as turns finish, so a cancelled run (Ctrl-C)
still has what finished. :func:`summarize` turns a run into the figures of the report.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from dualpath.config import DualPathConfig
from dualpath.errors import ConfigError, EngineError, ModelError
from dualpath.metrics import MetricsRecorder, RequestRecord, storage_balance
from dualpath.runtime.clients import (
    ClientResult,
    SloCheck,
    TurnRecord,
    run_offline_into,
    run_online_into,
)
from dualpath.scheduler.core import GlobalScheduler
from dualpath.scheduler.driver import DriverStats, SchedulerDriver
from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.policies import get_policy
from dualpath.storage.config import rooted
from dualpath.workload.arrivals import SLO, poisson_arrivals
from dualpath.workload.trajectory import Trajectory

#: width of the bins of the link timelines (seconds)
SERIES_BIN_S = 0.1


class Progress:
    """Progress on stderr: ``label  done/total turns  elapsed``, one line rewritten in place on a terminal."""

    def __init__(self, label: str, total: int, stream: Any = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._last = 0.0
        self._shown = -1  # the count the last line written showed
        self.started = False
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False

    def start(self) -> None:
        """Show the line (called once the run's checks passed and the first turn is about to start)."""
        self.started = True
        self.t0 = time.perf_counter()
        if self.enabled:
            self._write()

    def update(self, _rec: TurnRecord | None = None) -> None:
        self.done += 1
        now = time.perf_counter()
        # a terminal gets one line rewritten ~10 times a second; a file or pipe a line every 5 s
        if self.enabled and (now - self._last >= (0.1 if self.tty else 5.0) or self.done == self.total):
            self._last = now
            self._write()

    def _write(self, end: str = "") -> None:
        self._shown = self.done
        el = time.perf_counter() - self.t0
        text = f"  {self.label:<12} {self.done:>5}/{self.total} turns  {el:6.1f} s{end}"
        self.stream.write("\r" + text if self.tty else text + ("" if end.endswith("\n") else "\n"))
        self.stream.flush()

    def close(self, note: str = "") -> None:
        if self.enabled and self.started:
            if not self.tty and not note and self._shown == self.done:
                return  # (a file or pipe has this line already: the last update wrote it)
            self._write(f"  {note}\n" if note else "\n")


@dataclass
class PolicyRun:
    """One policy's run: its turns, the link counters and series, the driver's counters."""

    policy: str
    client: ClientResult = field(default_factory=lambda: ClientResult([], 0.0, 0.0, 0, 0))
    complete: bool = False
    wall_s: float = 0.0
    links: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"bandwidth", "bytes", ...}
    recorder: MetricsRecorder = field(default_factory=MetricsRecorder)
    driver: DriverStats = field(default_factory=DriverStats)
    slo_met: bool | None = None
    slo_attainment: float | None = None  # online: the share of turns meeting the TTFT and TPOT SLOs
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds: start, turns, close, cleanup
    prefill: dict[str, int] = field(default_factory=dict)  # PE forwards and quota-cut chunks, summed over PEs

    @property
    def records(self) -> list[TurnRecord]:
        return self.client.records


def policy_config(base: DualPathConfig, policy: str, storage_root: Path | None) -> DualPathConfig:
    """``base`` with the policy's scheduler settings and (for file storage) an empty storage root.

    ``oracle`` (a performance bound, not a policy one would deploy) runs with unlimited storage and compute NICs:
    its KV I/O takes no emulated time.
    """
    pol = get_policy(policy)
    cfg = base.model_copy(deep=True)
    cfg.scheduler.policy = pol.name  # type: ignore[assignment]
    cfg.scheduler.layerwise = pol.layerwise
    if "layerwise" in type(cfg.cluster).model_fields:  # engines that can prefill without streaming
        cfg.cluster.layerwise = pol.layerwise  # type: ignore[attr-defined]
    # the DualPath scheduler's intra-engine batching: the compute quota on each PE forward (paper 7.5); the
    # simple-assignment baselines batch by size only, as the simulator does
    cfg.cluster.prefill_quota_s = cfg.scheduler.compute_quota_s if pol.smart_assign else None
    if pol.oracle:
        # the bound: every KV byte still moves (the engines need it) but no link charges time for it
        cfg.cluster.snic_gbps = None
        cfg.cluster.cnic_gbps = None
    store = rooted(cfg.storage)  # (the store a faults wrapper holds too)
    if storage_root is not None and store is not None:
        store.root = storage_root
    return cfg


def kv_bytes_per_token(cfg: DualPathConfig) -> int:
    """Bytes of KV per token over all layers, from the model config (synthetic) or the cluster's layout."""
    m = cfg.model
    if m.kind == "synthetic":
        from dualpath.kv.layout import KVSpec

        return KVSpec.mha(m.n_layers, m.n_kv_heads, m.head_dim, m.kv_dtype).bytes_per_token
    raise ConfigError("kv_bytes_per_token: only known for the synthetic model before the cluster starts")


def scheduler_params(cfg: DualPathConfig, bytes_per_token: int, gpu_tokens_per_s: float | None = None) -> SchedulerParams:
    """alpha/beta in tokens from the storage-NIC rate and a GPU's prefill rate (paper appendix A.4)."""
    snic = cfg.cluster.snic_gbps
    storage_tps = (snic * 1e9 / bytes_per_token) if snic else 1e9
    if gpu_tokens_per_s is None:
        m = cfg.model
        if m.kind == "synthetic" and m.linear_flops_per_token > 0:
            gpu_tokens_per_s = m.device_tflops * 1e12 / m.linear_flops_per_token
        else:
            gpu_tokens_per_s = 5000.0
    return SchedulerParams.from_config(cfg.scheduler, storage_tps, gpu_tokens_per_s, cfg.cluster.block_tokens)


def largest_turn(trajs: Sequence[Trajectory]) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of the turn that needs the most KV memory."""
    best = (0, 0)
    for t in trajs:
        for i, u in enumerate(t.turns):
            p = t.prompt_len(i)
            if p + u.gen > sum(best):
                best = (p, max(1, u.gen))
    return best


def online_arrivals(trajs: Sequence[Trajectory], rate_aps: float, seed: int = 0,
                    from_trace: bool | None = None) -> list[float]:
    """Online start times: a trace's own (its sessions' ``arrival``, its turns keep their ``at``), else a Poisson
    process of ``rate_aps`` agents/s shifted so the first agent starts at 0. ``from_trace`` None: a trace when a
    turn carries a trace time."""
    if from_trace is None:
        from_trace = any(t.turns and t.turns[0].at is not None for t in trajs)
    if from_trace:
        return [float(t.arrival) for t in trajs]
    arrivals = poisson_arrivals(len(trajs), rate_aps, seed)
    return [a - arrivals[0] for a in arrivals]


def check_cluster_holds(cluster: Any, trajs: Sequence[Trajectory], trace: str | None = None) -> None:
    """Raise before any turn runs when the cluster cannot hold the largest turn of the workload: a ConfigError,
    or, for a ``trace`` file, a WorkloadError naming the file, the line and the turn."""
    from dualpath.workload.traces import largest_turn as largest

    prompt, gen, a, i = largest(trajs)
    if prompt == 0:
        return
    try:
        cluster.check_turn([0] * prompt, gen, 0, 0)
    except (EngineError, ModelError) as exc:
        if trace is not None:
            from dualpath.errors import WorkloadError

            u = trajs[a].turns[i]
            raise WorkloadError(f"session {trajs[a].tid} turn {i} ({prompt} prompt + {gen} generated tokens) does not "
                                f"fit this cluster: {exc}", path=trace, line=u.line) from exc
        raise ConfigError(f"this cluster cannot hold the largest turn of the trace: {exc}") from exc


def _links(cluster: Any) -> dict[str, Any]:
    ls = cluster.links() if callable(cluster.links) else cluster.links
    return dict(getattr(ls, "links", ls))


def _link_now(cluster: Any) -> float:
    """Now on the clock of the cluster's links (they may count from the cluster's start)."""
    for link in _links(cluster).values():
        clock = getattr(link, "clock", None)
        if clock is not None:
            return float(clock.now())
    return anyio.current_time()


def _collect_links(cluster: Any, run: PolicyRun, t0: float, t1: float) -> None:
    """Totals per link and each link's timeline (``SERIES_BIN_S`` bins) into ``run.recorder``.

    Link timelines are on the links' clock (:func:`_link_now`); they are moved onto ``time.perf_counter`` (the clock of the
    request records) with the offset measured now, relative to the client's start (t = 0 when the first agent
    starts), like the request records of :func:`summarize`.
    """
    off = time.perf_counter() - _link_now(cluster) - run.client.t_start
    span = max(t1 - t0, 1e-9)
    nbins = max(1, math.ceil(span / SERIES_BIN_S))
    edges = [off + t0 + i * SERIES_BIN_S for i in range(nbins + 1)]
    for name, link in sorted(_links(cluster).items()):
        st = link.stats
        run.links[name] = {"bandwidth": link.bandwidth, "bytes": int(sum(st.bytes.values()))}
        kind = _link_kind(name)
        if kind is None:
            continue
        b = np.zeros(nbins)
        for t, hi, kv in link.timeline():
            i = int((t - t0) / SERIES_BIN_S)
            if 0 <= i < nbins:
                b[i] += hi + kv
        run.recorder.add_link_timeline(name, kind, edges, [float(x) for x in b], link.bandwidth)


def _link_kind(name: str) -> str | None:
    """The metrics kind of a cluster link: storage reads are ``snic`` (the balance is over them)."""
    if name.endswith("snic.read"):
        return "snic"
    if name.endswith("cnic.in"):
        return "cnic_in"
    if name.endswith("cnic.out"):
        return "cnic_out"
    return None


def record_turn(recorder: MetricsRecorder, rid: int, rec: TurnRecord, t_ref: float = 0.0) -> None:
    """Add one finished turn to ``recorder`` (times relative to ``t_ref``)."""
    o = rec.outcome
    t2 = None if o.t_second_token is None else o.t_second_token - t_ref
    pe_b = sum(v for k, v in o.bytes.items() if k.startswith("pnode") and k.endswith("snic.read"))
    de_b = sum(v for k, v in o.bytes.items() if k.startswith("dnode") and k.endswith("snic.read"))
    recorder.add_request(RequestRecord(
        rid=rid, tid=rec.agent, turn=rec.turn, prompt_tokens=o.prompt_tokens, hit_tokens=o.hit_tokens,
        gen_tokens=len(o.tokens), path=o.path, pe=o.pe, de=o.de, t_submit=o.t_submit - t_ref,
        t_first_token=o.t_first_token - t_ref, t_second_token=t2, t_done=o.t_done - t_ref,
        t_last_token=o.t_last_token - t_ref, bytes_pe_path=pe_b, bytes_de_path=de_b,
    ))  # fmt: skip


def summarize(run: PolicyRun) -> dict[str, Any]:
    """The figures of one run: the flat keys of :data:`dualpath.runtime.report.ROWS` plus the metrics summary."""
    rec = run.recorder
    rec.requests.clear()
    for i, r in enumerate(run.records):
        record_turn(rec, i, r, run.client.t_start)
    s = rec.summary()
    snics = rec.snics()
    # balance only means something over two or more bandwidth-limited storage NICs (not for oracle)
    limited = len(snics) > 1 and all(x.capacity_bytes_per_s for x in snics.values())
    jct = run.client.jct if run.records else None
    thr = s["throughput"]["tokens_per_s"]
    snic = {n: v for n, v in s["links"].items() if v["kind"] == "snic"}
    out: dict[str, Any] = {
        "complete": run.complete,
        "turns": s["n_done"],
        "agents_done": run.client.agents_done,
        "agents": run.client.agents_total,
        "jct_s": jct,
        "wall_s": run.wall_s,
        "throughput_tok_s": thr,
        "ttft_p50_s": s["ttft_s"]["p50"], "ttft_p99_s": s["ttft_s"]["p99"],
        "ttst_p50_s": s["ttst_s"]["p50"], "ttst_p99_s": s["ttst_s"]["p99"],
        "tpot_p50_s": s["tpot_s"]["p50"], "tpot_p99_s": s["tpot_s"]["p99"],
        "hit_rate": s["hit_rate"]["rate"],
        "pe_path_bytes": s["bytes"]["pe_path"],
        "de_path_bytes": s["bytes"]["de_path"],
        "snic_util": {n.split(".")[0]: v["mean_util"] for n, v in snic.items()},
        # busy windows only (>= half the busiest window's traffic), as the simulator computes it
        "snic_balance": storage_balance(snics, 1.0, min_fraction=0.5) if limited else None,
        "snic_balance_all_windows": s["snic_balance"] if limited else None,
        "paths": s["paths"],
        "scheduler_rounds": run.driver.rounds,
        "scheduler_core_s": run.driver.core_s,
        "scheduler_held": run.driver.held,  # turns that waited for a prefix another turn was computing
        "prefill_forwards": run.prefill.get("forwards"),  # None where the engines are not in this process
        "prefill_chunks": run.prefill.get("chunks"),
        "link_bytes": {n: v["bytes"] for n, v in run.links.items()},
        "metrics": s,
    }
    if run.slo_met is not None:
        out["slo_met"] = run.slo_met
    if run.slo_attainment is not None:
        out["slo_attainment"] = run.slo_attainment
    if run.error:
        out["error"] = run.error
    return out


@contextlib.contextmanager
def limit_torch_threads(enabled: bool = True) -> Iterator[None]:
    """One intra-op thread while the block runs (restored after): the emulated cluster runs many small tensor
    ops on its event loop, where torch's thread pool only adds contention (15x slower on a loaded 2-core
    machine)."""
    import torch

    prev = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(prev)


ClusterFactory = Callable[[DualPathConfig], Any]


def _default_cluster(cfg: DualPathConfig) -> Any:
    from dualpath.cluster import Cluster

    return Cluster(cfg)


async def run_policy(
    base: DualPathConfig,
    policy: str,
    trajs: Sequence[Trajectory],
    run: PolicyRun,
    *,
    mode: str = "offline",
    rate_aps: float = 1.0,
    slo: SLO | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    cluster_factory: ClusterFactory = _default_cluster,
    gpu_tokens_per_s: float | None = None,
) -> PolicyRun:
    """Run ``trajs`` under ``policy`` on a fresh cluster with fresh storage; fills and returns ``run``.

    File storage gets an empty directory under the configured ``storage.root`` (removed afterwards).
    """
    with limit_torch_threads(base.model.kind == "synthetic"):
        return await _run_policy(base, policy, trajs, run, mode=mode, rate_aps=rate_aps, slo=slo, seed=seed,
                                 progress=progress, cluster_factory=cluster_factory,
                                 gpu_tokens_per_s=gpu_tokens_per_s)


async def _run_policy(
    base: DualPathConfig,
    policy: str,
    trajs: Sequence[Trajectory],
    run: PolicyRun,
    *,
    mode: str,
    rate_aps: float,
    slo: SLO | None,
    seed: int,
    progress: Progress | None,
    cluster_factory: ClusterFactory,
    gpu_tokens_per_s: float | None,
) -> PolicyRun:
    t_wall = time.perf_counter()
    store = rooted(base.storage)
    parent = store.root if store is not None else None
    try:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{policy}-", dir=parent))
    except OSError as exc:  # read-only, full, not permitted: the config names a root this run cannot use
        where = "storage.root" if parent is not None else "the temporary directory"
        raise ConfigError(f"{where}: cannot make the run's block directory under {parent or tempfile.gettempdir()}: "
                          f"{exc.strerror or exc}") from exc
    try:
        cfg = policy_config(base, policy, tmp)
        cluster = cluster_factory(cfg)
        bpt = cluster.layout.spec.bytes_per_token if hasattr(cluster, "layout") else kv_bytes_per_token(cfg)
        tps = gpu_tokens_per_s
        if tps is None and cfg.model.kind != "synthetic" and hasattr(cluster, "prefill_tokens_per_s"):
            # a real model's rate comes from its calibrated time model (Algorithm 1's beta; None: the default)
            tps = await anyio.to_thread.run_sync(cluster.prefill_tokens_per_s)
        sched = GlobalScheduler(get_policy(policy), scheduler_params(cfg, bpt, tps))
        vocab = int(getattr(cluster, "vocab_size", 32000))
        t0_link = 0.0
        t_phase = time.perf_counter()
        try:
            await cluster.__aenter__()
            run.phases["start"] = time.perf_counter() - t_phase
            async with _Closing(cluster, run):
                if hasattr(cluster, "check_turn"):
                    check_cluster_holds(cluster, trajs, base.workload.trace)
                driver = SchedulerDriver(
                    cluster, sched, fetch_interval_s=cfg.scheduler.fetch_interval_s,
                    max_request_tokens=cfg.cluster.kv_pool_tokens,
                    inflight_prefix_min_tokens=cfg.scheduler.inflight_prefix_min_tokens,
                    inflight_prefix_wait_s=cfg.scheduler.inflight_prefix_wait_s,
                    work_ranking=cfg.scheduler.work_ranking,
                )
                run.driver = driver.stats
                t0_link = _link_now(cluster)
                cb = progress.update if progress is not None else None
                if progress is not None:
                    progress.start()
                try:
                    async with driver:
                        if mode == "online":
                            chk = SloCheck(slo or SLO())
                            arrivals = online_arrivals(trajs, rate_aps, seed, base.workload.trace is not None)
                            finished = await run_online_into(
                                driver, trajs, arrivals, run.client, vocab_size=vocab, seed=seed, on_turn=cb,
                                stop_when=chk.hopeless,
                            )
                            run.slo_met = finished and chk.met(run.client.records)
                            run.slo_attainment = chk.fraction(run.client.records)
                        else:
                            await run_offline_into(driver, trajs, run.client, vocab_size=vocab, seed=seed,
                                                   on_turn=cb)
                        run.complete = True
                finally:
                    t1_link = _link_now(cluster)
                    run.phases["turns"] = t1_link - t0_link
                    _collect_links(cluster, run, t0_link, t1_link)
                    pes = getattr(cluster, "pes", None) or []
                    if pes:
                        run.prefill = {"forwards": sum(getattr(pe, "forwards", 0) for pe in pes),
                                       "chunks": sum(getattr(pe, "chunks", 0) for pe in pes)}
        finally:
            run.wall_s = time.perf_counter() - t_wall
    finally:
        t_phase = time.perf_counter()
        shutil.rmtree(tmp, ignore_errors=True)
        run.phases["cleanup"] = time.perf_counter() - t_phase
        run.wall_s = time.perf_counter() - t_wall
    return run


class _Closing:
    """Closes a started cluster on the way out and times it."""

    def __init__(self, cluster: Any, run: PolicyRun) -> None:
        self.cluster, self.run = cluster, run

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        t = time.perf_counter()
        await self.cluster.__aexit__(None, None, None)
        self.run.phases["close"] = time.perf_counter() - t
