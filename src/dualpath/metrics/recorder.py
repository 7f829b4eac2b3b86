"""The recorder the runtime and the simulator both fill, and its summary (one JSON-able dict)."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from dualpath.errors import DualPathError
from dualpath.metrics.links import LINK_KINDS, LinkSeries, span, storage_balance, window_edges
from dualpath.metrics.records import RequestRecord, percentiles


class MetricsRecorder:
    """Collects request records and link samples; :meth:`summary` turns them into figures.

    Link samples are cumulative byte counters: ``record_link(name, kind, t, cumulative_bytes)`` (kinds: ``snic``,
    ``cnic_in``, ``cnic_out``), or a whole timeline at once with :meth:`add_link_timeline`.
    """

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.requests: list[RequestRecord] = []
        self.links: dict[str, LinkSeries] = {}
        self.extra: dict[str, Any] = {}

    def add_request(self, rec: RequestRecord) -> None:
        self.requests.append(rec)

    def _series(self, name: str, kind: str, capacity: float | None) -> LinkSeries:
        if kind not in LINK_KINDS:
            raise DualPathError(f"link {name}: kind must be one of {LINK_KINDS}, got {kind!r}")
        s = self.links.get(name)
        if s is None:
            s = self.links[name] = LinkSeries(name, kind, capacity)
        elif s.kind != kind:
            raise DualPathError(f"link {name} was recorded as {s.kind!r}, now {kind!r}")
        if capacity is not None:
            s.capacity_bytes_per_s = capacity
        return s

    def record_link(
        self,
        name: str,
        kind: str,
        t: float,
        cumulative_bytes: float,
        capacity_bytes_per_s: float | None = None,
    ) -> None:
        """One sample of link ``name``'s cumulative byte counter at time ``t``."""
        self._series(name, kind, capacity_bytes_per_s).add(t, cumulative_bytes)

    def add_link_timeline(
        self,
        name: str,
        kind: str,
        times: list[float],
        bytes_per_interval: list[float],
        capacity_bytes_per_s: float | None = None,
    ) -> None:
        """A timeline of bytes moved in ``[times[k], times[k+1])`` (len(times) == len(bytes) + 1)."""
        if len(times) != len(bytes_per_interval) + 1:
            raise DualPathError(f"link {name}: need len(times) == len(bytes) + 1")
        s = self._series(name, kind, capacity_bytes_per_s)
        cum = s.cum[-1] if s.cum else 0.0
        s.add(times[0], cum)
        for t, b in zip(times[1:], bytes_per_interval, strict=True):
            cum += b
            s.add(t, cum)

    # --- figures ----------------------------------------------------------------------------------------------

    def snics(self) -> dict[str, LinkSeries]:
        return {n: s for n, s in self.links.items() if s.kind == "snic"}

    def link_timeline(self, name: str, window_s: float) -> dict[str, Any]:
        """Per-window throughput (bytes/s) and utilisation (None without a capacity) of one link."""
        s = self.links[name]
        t0, t1 = span(self.links)
        edges = window_edges(t0, t1, window_s)
        rate = s.window_bytes(edges) / np.diff(edges)
        cap = s.capacity_bytes_per_s
        return {
            "kind": s.kind,
            "t": [float(x) for x in edges[:-1]],
            "bytes_per_s": [float(x) for x in rate],
            "util": [float(x) / cap for x in rate] if cap else None,
        }

    def summary(self, window_s: float | None = None, balance_window_s: float = 1.0) -> dict[str, Any]:
        """Every figure of the run (see the keys); ``window_s`` sets the timeline resolution (auto: ~200 points)."""
        reqs = self.requests
        done = [r for r in reqs if r.t_done is not None]
        t_start = min((r.t_submit for r in reqs), default=0.0)
        t_end = max((r.t_done for r in done if r.t_done is not None), default=t_start)
        makespan = t_end - t_start
        by_tid: dict[int, list[RequestRecord]] = defaultdict(list)
        for r in reqs:
            by_tid[r.tid].append(r)
        traj_jct = [
            max(r.t_done for r in rs if r.t_done is not None) - min(r.t_submit for r in rs)
            for rs in by_tid.values()
            if all(r.t_done is not None for r in rs)
        ]
        prompt = sum(r.prompt_tokens for r in done)
        gen = sum(r.gen_tokens for r in done)
        hit = sum(r.hit_tokens for r in done)
        out: dict[str, Any] = {
            "label": self.label,
            "n_requests": len(reqs),
            "n_done": len(done),
            "n_trajectories": len(by_tid),
            "jct_s": makespan,
            "trajectory_jct_s": percentiles(traj_jct),
            "throughput": {
                "tokens_per_s": (prompt + gen) / makespan if makespan > 0 else None,
                "prompt_tokens_per_s": prompt / makespan if makespan > 0 else None,
                "gen_tokens_per_s": gen / makespan if makespan > 0 else None,
            },
            "ttft_s": percentiles(r.ttft for r in done),
            "ttst_s": percentiles(r.ttst for r in done),
            "tpot_s": percentiles(r.tpot for r in done),
            "request_jct_s": percentiles(r.jct for r in done),
            "hit_rate": {
                "rate": hit / prompt if prompt else None,
                "hit_tokens": hit,
                "prompt_tokens": prompt,
            },
            "bytes": {
                "pe_path": sum(r.bytes_pe_path for r in done),
                "de_path": sum(r.bytes_de_path for r in done),
            },
            "paths": dict(Counter(r.path for r in done)),
        }
        links: dict[str, Any] = {}
        if self.links:
            t0, t1 = span(self.links)
            w = window_s if window_s is not None else max((t1 - t0) / 200.0, 1e-6)
            for name in sorted(self.links):
                s = self.links[name]
                tl = self.link_timeline(name, w)
                dur = t1 - t0
                cap = s.capacity_bytes_per_s
                links[name] = {
                    "kind": s.kind,
                    "bytes": s.total_bytes,
                    "capacity_bytes_per_s": cap,
                    "mean_util": s.total_bytes / (cap * dur) if cap and dur > 0 else None,
                    "peak_util": max(tl["util"]) if tl["util"] else None,
                    "timeline": tl,
                }
            out["window_s"] = w
        out["links"] = links
        snics = self.snics()
        out["snic_balance"] = storage_balance(snics, balance_window_s) if len(snics) > 1 else None
        out["snic_balance_window_s"] = balance_window_s
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self, path: str | os.PathLike[str] | None = None, **summary_kw: Any) -> str:
        """The summary as JSON (written to ``path`` when given), with the per-request records."""
        doc = self.summary(**summary_kw)
        doc["requests"] = [r.to_dict() for r in self.requests]
        text = json.dumps(doc, indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text
