"""The reproduction's Markdown report and PNG plots (shaped like the paper's figures)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from dualpath.repro.suite import LABEL, WHATIF_NOTE, Results, Row, Size, _k


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return f"{_f(x[0], nd)}-{_f(x[1], nd)}"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}g}"
    return str(x)


def markdown(size: Size, rows: Sequence[Row], meta: dict[str, Any], plots: Sequence[str]) -> str:
    whatif = [r for r in rows if r.kind == "whatif"]
    rows = [r for r in rows if r.kind != "whatif"]
    judged = [r for r in rows if r.within is not None]
    ok = sum(1 for r in judged if r.within)
    lines = [
        f"# DualPath paper evaluation, reproduced by the simulator ({size.name.upper()})",
        "",
        f"Command: `{meta.get('command', 'dualpath reproduce')}`. Wall time {meta.get('wall_s', 0):.0f} s with "
        f"{meta.get('jobs', 1)} worker process(es); {meta.get('cpu_s', 0):.0f} CPU-seconds of simulation in "
        f"{meta.get('runs', 0)} runs (on 2 idle cores: about {meta.get('cpu_s', 0) / 2 / 60:.0f} min); dualpath "
        f"{meta.get('version', '?')}.",
        "",
        f"**Size: {size.name}.** {size.note}",
        "",
        "One preset set for every row (`dualpath simulate --list-presets`; sources in `sim/presets.py`); nothing is "
        "set per figure. Paper values: `shared/reference/dualpath-paper.md` (section in the source column; "
        "[fig-read] = read off a figure). Tolerance: +-10 % offline, +-15 % online; bands are checked as "
        "[lo, hi] widened by the tolerance. Ratio = measured / paper (band: / its midpoint).",
        "",
        f"**{ok} of {len(judged)} judged rows within tolerance**; rows without a paper number are reported only.",
        "",
        "| figure | setting | metric | paper | measured | ratio | within | why not | source |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = "-" if r.within is None else ("yes" if r.within else "**no**")
        why = r.why if r.within is False else ""
        if r.evidence and r.within is False:
            why = f"{why} (evidence: {r.evidence})" if why else f"evidence: {r.evidence}"
        lines.append(f"| {r.figure} | {r.setting} | {r.metric} | {_f(r.paper)} | {_f(r.measured)} | {_f(r.ratio)} | "
                     f"{w} | {why} | {r.source} |")
    if whatif:
        wok = sum(1 for r in whatif if r.within)
        lines += [
            "", "## What-if: the engine as slow as the paper's own figures imply (not a preset; not counted above)", "",
            f"Every run above uses the sourced presets. The misses share one measured pattern: the paper's absolute "
            f"times are slower than our sourced roofline engine (prefill at the DAY6 production rate, decode at the HBM "
            f"roofline). This section re-runs the missed metrics with two factors, each derived from ONE paper figure "
            f"and then held fixed ({WHATIF_NOTE}; `sim.compute.RooflineCompute.prefill_slowdown` / `decode_slowdown`, "
            f"`dualpath simulate --whatif-prefill-slowdown 1.63 --whatif-decode-slowdown 2.93`). A row that moves into "
            f"tolerance here is explained by engine speed; one that does not is not. {wok} of {len(whatif)} within "
            "tolerance.",
            "",
            "| figure | setting | metric | paper | shipped presets | what-if | ratio | within |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in whatif:
            w = "-" if r.within is None else ("yes" if r.within else "**no**")
            lines.append(f"| {r.figure} | {r.setting} | {r.metric} | {_f(r.paper)} | {_f(r.base)} | {_f(r.measured)} | "
                         f"{_f(r.ratio)} | {w} |")
    lines += ["", "## Plots", ""]
    for p in plots:
        lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    lines += ["", "## Evidence per row", ""]
    for r in rows + whatif:
        if r.evidence:
            tag = "what-if, " if r.kind == "whatif" else ""
            lines.append(f"- {tag}{r.figure}, {r.setting}, {r.metric}: {r.evidence}")
    return "\n".join(lines) + "\n"


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


COLORS = {"basic": "tab:gray", "layerwise": "tab:olive", "round_robin": "tab:orange", "dualpath": "tab:blue",
          "oracle": "tab:green"}


def plots(size: Size, res: Results, out_dir: str) -> list[str]:
    """Write the PNGs; returns their paths."""
    plt = _plt()
    paths: list[str] = []

    def save(fig: Any, name: str) -> None:
        p = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    # Fig. 7: rows = models, columns = MAL; x = agents; bars = policies (JCT)
    models = list(size.f7)
    dss = ["32k", "48k", "64k"]
    fig, axes = plt.subplots(len(models), 3, figsize=(12, 3 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, ds in enumerate(dss):
            ax = axes[i][j]
            agents = size.f7[m].get(ds, [])
            if not agents:
                ax.text(0.5, 0.5, f"not run at size {size.name}", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            for k, pol in enumerate(("basic", "dualpath", "oracle")):
                ys = [res.val(_k("off", m, ds, n), pol, "jct_s") for n in agents]
                ax.bar([x + (k - 1) * 0.27 for x in range(len(agents))], ys, 0.27, label=pol, color=COLORS[pol])
            ax.set_xticks(range(len(agents)), [str(n) for n in agents])
            ax.set_title(f"{LABEL[m]} {ds.upper()}", fontsize=9)
            if j == 0:
                ax.set_ylabel("JCT (s)")
            if i == len(models) - 1:
                ax.set_xlabel("agents")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fig. 7: offline JCT")
    save(fig, "fig07_offline.png")

    # Fig. 8: P/D ratios
    fig, axes = plt.subplots(1, len(size.f8_datasets), figsize=(4 * len(size.f8_datasets), 3.2), squeeze=False)
    n = size.f8_agents[-1]
    for j, ds in enumerate(size.f8_datasets):
        ax = axes[0][j]
        keys = [("1P1D", _k("off", "ds27b", ds, n)), ("2P1D", _k("pd", "2P1D", ds, n)), ("1P2D", _k("pd", "1P2D", ds, n))]
        for k, pol in enumerate(("basic", "dualpath")):
            ax.bar([x + (k - 0.5) * 0.4 for x in range(3)], [res.val(key, pol, "jct_s") for _, key in keys], 0.4,
                   label=pol, color=COLORS[pol])
        ax.set_xticks(range(3), [lab for lab, _ in keys])
        ax.set_title(f"DS 27B {ds.upper()} {n} agents", fontsize=9)
        ax.set_ylabel("JCT (s)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fig. 8: P/D ratio")
    save(fig, "fig08_pd_ratio.png")

    # Fig. 9: append / generation scaling
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    n = size.f9_agents
    for ax, scales, kind in ((axes[0], size.append_scales, "append"), (axes[1], size.gen_scales, "gen")):
        for pol in size.f9_policies:
            ys = [res.val(_k("off", "ds660b", "64k", n) if s == 1.0 else _k(kind, s, n), pol, "jct_s") for s in scales]
            ax.plot(scales, ys, "o-", label=pol, color=COLORS[pol])
        ax.set_xlabel(f"{kind} length scale")
        ax.set_ylabel("JCT (s)")
        ax.set_title(f"DS 660B 64K {n} agents", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Fig. 9: append / generation length")
    save(fig, "fig09_scaling.png")

    # Fig. 10: TTFT / TPOT vs APS per capacity search; Fig. 11: mean JCT vs APS
    caps = [m for m in ("ds27b", "ds660b") if m in size.capacity]
    if caps:
        fig, axes = plt.subplots(len(caps), 3, figsize=(12, 3 * len(caps)), squeeze=False)
        for i, m in enumerate(caps):
            for pol in ("basic", "dualpath"):
                tr = sorted(res.trials.get((_k("cap", m), pol), []), key=lambda t: t["aps"])
                xs = [t["aps"] for t in tr]
                for j, (fld, scale, lab) in enumerate((("ttft_mean_s", 1, "mean TTFT (s)"),
                                                       ("ttst_p50_s", 1, "TTST p50 (s)"),
                                                       ("tpot_mean_s", 1e3, "mean TPOT (ms)"))):
                    axes[i][j].plot(xs, [t[fld] * scale for t in tr], "o-", label=pol, color=COLORS[pol])
                    axes[i][j].set_ylabel(lab)
                    axes[i][j].set_xlabel("APS")
                    axes[i][j].set_title(LABEL[m], fontsize=9)
            axes[i][0].axhline(4.0, ls="--", color="r", lw=0.8)
            axes[i][2].axhline(50.0, ls="--", color="r", lw=0.8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Fig. 10: online latency vs APS (capacity-search trials; dashed: SLO)")
        save(fig, "fig10_online.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for pol in ("basic", "dualpath", "oracle"):
        pts = sorted((a, res.val(_k("on", "ds660b", a), pol, "jct_mean_s")) for a in size.online_aps
                     if res.get(_k("on", "ds660b", a), pol))
        pts += [(t["aps"], t["jct_mean_s"]) for t in res.trials.get((_k("cap", "ds660b"), pol), [])]
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=pol, color=COLORS[pol])
    ax.set_xlabel("APS")
    ax.set_ylabel("mean JCT (s, Little's law)")
    ax.legend(fontsize=7)
    ax.set_title("Fig. 11: DS 660B mean JCT vs APS", fontsize=9)
    save(fig, "fig11_jct_vs_aps.png")

    # Fig. 12: TTFT composition (left) and ablation (right)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    labels, q, rd, pf = [], [], [], []
    for aps in size.online_aps:
        for pol in ("basic", "dualpath"):
            key = _k("on", "ds660b", aps)
            labels.append(f"{'B' if pol == 'basic' else 'DP'} {aps:g}")
            q.append(res.val(key, pol, "ttft_queue_s"))
            rd.append(res.val(key, pol, "ttft_read_s"))
            pf.append(res.val(key, pol, "ttft_prefill_s"))
    x = range(len(labels))
    ax.bar(x, q, label="queueing (Sch.+A.)", color="tab:red")
    ax.bar(x, rd, bottom=q, label="KV read (R.)", color="tab:orange")
    ax.bar(x, pf, bottom=[a + b for a, b in zip(q, rd, strict=True)], label="prefill (PF.)", color="tab:blue")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("mean TTFT (s)")
    ax.legend(fontsize=7)
    ax.set_title("TTFT composition, DS 660B online", fontsize=9)
    ax = axes[1]
    pols = ["basic", "layerwise", "round_robin", "dualpath"]
    for k, n in enumerate(size.ablation_agents):
        key = _k("off", "ds660b", "64k", n)
        ax.bar([i + k * 0.4 for i in range(4)], [res.val(key, p, "jct_s") for p in pols], 0.4, label=f"{n} agents")
    ax.set_xticks([i + 0.2 * (len(size.ablation_agents) - 1) for i in range(4)],
                  ["Basic", "+layer-wise", "+dual-path", "+scheduler"], fontsize=8)
    ax.set_ylabel("JCT (s)")
    ax.legend(fontsize=7)
    ax.set_title("Ablation, DS 660B 64K", fontsize=9)
    fig.suptitle("Fig. 12")
    save(fig, "fig12_ttft_ablation.png")

    # Figs. 13-14: balance
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    k13 = _k("pd", "1P2D", "48k", size.f13_agents)
    axes[0].bar(["round-robin", "DualPath"], [res.val(k13, p, "snic_balance_max_avg") for p in ("round_robin", "dualpath")],
                color=[COLORS["round_robin"], COLORS["dualpath"]])
    axes[0].axhline(1.0, color="k", lw=0.6)
    axes[0].set_ylabel("SNIC traffic max/avg")
    axes[0].set_title("Fig. 13: storage NIC balance (DS 27B 1P2D)", fontsize=9)
    k14 = _k("off", "ds660b", "64k", size.ablation_agents[-1])
    axes[1].bar(["first 5%", "whole run"], [res.val(k14, "dualpath", "attn_balance_first5"),
                                            res.val(k14, "dualpath", "attn_balance_mean")], color=COLORS["dualpath"])
    axes[1].axhline(1.06, color="r", ls="--", lw=0.8, label="paper 1.06")
    axes[1].set_ylabel("PE attention max/avg")
    axes[1].legend(fontsize=7)
    axes[1].set_title("Fig. 14: attention balance (DS 660B)", fontsize=9)
    save(fig, "fig13_14_balance.png")
    return paths
