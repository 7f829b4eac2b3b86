"""PNG plots of the figures (matplotlib with the Agg backend, imported lazily)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dualpath.metrics.recorder import MetricsRecorder


def _summary(x: MetricsRecorder | Mapping[str, Any]) -> Mapping[str, Any]:
    return x.summary() if isinstance(x, MetricsRecorder) else x


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_link_utilisation(
    results: Mapping[str, MetricsRecorder | Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    kinds: tuple[str, ...] = ("snic",),
) -> None:
    """One panel per policy: utilisation (or GB/s when a link has no capacity) of each link of ``kinds`` over time.

    ``results`` maps a policy name to its recorder or its :meth:`MetricsRecorder.summary`.
    """
    plt = _pyplot()
    n = max(1, len(results))
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), squeeze=False, sharex=True)
    for ax, (policy, res) in zip(axes[:, 0], results.items(), strict=False):
        summ = _summary(res)
        any_util = False
        for name, link in summ.get("links", {}).items():
            if link["kind"] not in kinds:
                continue
            tl = link["timeline"]
            if tl["util"] is not None:
                ax.plot(tl["t"], tl["util"], label=name, lw=1)
                any_util = True
            else:
                ax.plot(tl["t"], [b / 1e9 for b in tl["bytes_per_s"]], label=name, lw=1)
        bal = summ.get("snic_balance")
        title = policy + (f"  (SNIC max/avg {bal:.2f})" if bal is not None else "")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("utilisation" if any_util else "GB/s")
        if ax.has_data():
            ax.legend(fontsize=7, loc="upper right", ncol=4)
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_jct_bars(
    results: Mapping[str, MetricsRecorder | Mapping[str, Any] | float],
    out_png: str | os.PathLike[str],
    baseline: str | None = None,
) -> None:
    """Bars of JCT per policy (in the given order), each labelled with its speedup over ``baseline``
    (default: the first policy)."""
    plt = _pyplot()
    names = list(results)
    jct = [float(v) if isinstance(v, (int, float)) else float(_summary(v)["jct_s"]) for v in results.values()]
    base = jct[names.index(baseline)] if baseline in names else (jct[0] if jct else 1.0)
    fig, ax = plt.subplots(figsize=(1.2 * max(3, len(names)) + 1, 3.2))
    bars = ax.bar(names, jct, color="tab:blue")
    for b, v in zip(bars, jct, strict=True):
        ax.annotate(f"{base / v:.2f}x" if v > 0 else "-", (b.get_x() + b.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("JCT (s)")
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
