"""Metrics shared by the runtime and the simulator: request records, link timelines, summaries, plots.

Plots import matplotlib lazily: ``from dualpath.metrics.plots import plot_link_utilisation, plot_jct_bars``
(also reachable here as attributes).
"""

from __future__ import annotations

from typing import Any

from dualpath.metrics.links import LinkSeries, storage_balance
from dualpath.metrics.recorder import MetricsRecorder
from dualpath.metrics.records import RequestRecord, percentiles

__all__ = [
    "LinkSeries",
    "MetricsRecorder",
    "RequestRecord",
    "percentiles",
    "plot_jct_bars",
    "plot_link_utilisation",
    "storage_balance",
]


def __getattr__(name: str) -> Any:
    if name in ("plot_jct_bars", "plot_link_utilisation"):
        from dualpath.metrics import plots

        return getattr(plots, name)
    raise AttributeError(name)
