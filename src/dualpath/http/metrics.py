"""``GET /metrics``: Prometheus text format through ``prometheus_client`` (one registry per app).

Series (see docs/http.md and docs/grafana-dashboard.json):

* per request, as the HTTP client sees it: ``dualpath_ttft_seconds`` and ``dualpath_tpot_seconds``
  histograms, ``dualpath_requests_total{endpoint,code}``, ``dualpath_requests_inflight``,
  ``dualpath_prompt_tokens_total``, ``dualpath_cached_tokens_total`` (prompt tokens whose KV was loaded from
  storage), ``dualpath_completion_tokens_total``, ``dualpath_hit_rate`` (cached / prompt tokens so far) and
  ``dualpath_read_path_total{path}``;
* live, read from the backend at scrape time: ``dualpath_link_bytes_total{link}`` (every emulated link:
  ``pnode0.snic.read``, ``pe0.cnic.in``, ...), ``dualpath_snic_utilization{link}`` (busy fraction of each
  storage NIC since the previous scrape; bandwidth-limited links only), ``dualpath_read_queue_tokens{node}``,
  ``dualpath_scheduler_queue_depth``, ``dualpath_engine_up{engine}``, ``dualpath_free_kv_tokens{engine}``,
  ``dualpath_host_buffer_used_bytes{engine}``, ``dualpath_engine_turns{engine}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LiveCollector(Collector):
    """Figures read from the backend at scrape time."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._busy: dict[str, tuple[float, float]] = {}  # link -> (time, busy seconds) at the previous scrape
        self._t0 = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        g = self.backend.gauges()
        links = CounterMetricFamily("dualpath_link_bytes", "bytes carried per link", labels=["link"])
        util = GaugeMetricFamily("dualpath_snic_utilization",
                                 "busy fraction of each storage NIC since the previous scrape", labels=["link"])
        now = time.monotonic()
        for name, d in sorted(g.get("links", {}).items()):
            links.add_metric([name], float(d.get("bytes", 0)))
            if ".snic." in name:
                busy = float(d.get("busy_s", 0.0))
                t_prev, b_prev = self._busy.get(name, (self._t0, 0.0))
                self._busy[name] = (now, busy)
                frac = (busy - b_prev) / (now - t_prev) if d.get("bandwidth") and now > t_prev else 0.0
                util.add_metric([name], min(1.0, max(0.0, frac)))
        yield links
        yield util
        rq = GaugeMetricFamily("dualpath_read_queue_tokens", "storage read queue (tokens) per node",
                               labels=["node"])
        for node, v in sorted(g.get("read_q_tokens", {}).items()):
            rq.add_metric([node], float(v))
        yield rq
        yield GaugeMetricFamily("dualpath_scheduler_queue_depth", "turns waiting for the scheduler",
                                value=float(g.get("scheduler_queue", 0)))
        up = GaugeMetricFamily("dualpath_engine_up", "1 when the engine is alive", labels=["engine"])
        for name, v in sorted(g.get("engines_alive", {}).items()):
            up.add_metric([name], float(v))
        yield up
        kv = GaugeMetricFamily("dualpath_free_kv_tokens", "free KV pool tokens per decode engine",
                               labels=["engine"])
        for name, v in sorted(g.get("free_kv_tokens", {}).items()):
            kv.add_metric([name], float(v))
        yield kv
        host = GaugeMetricFamily("dualpath_host_buffer_used_bytes", "host buffer bytes held per engine",
                                 labels=["engine"])
        for name, v in sorted(g.get("host_used_bytes", {}).items()):
            host.add_metric([name], float(v))
        yield host
        held = GaugeMetricFamily("dualpath_engine_turns", "turns assigned to each engine and not finished",
                                 labels=["engine"])
        for name, v in sorted(g.get("turns_assigned", {}).items()):
            held.add_metric([name], float(v))
        yield held


class HttpMetrics:
    """The registry of one app and the per-request series (see the module docstring)."""

    def __init__(self, backend: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("dualpath_ttft_seconds", "time to first token seen by the HTTP client",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("dualpath_tpot_seconds", "time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.requests = Counter("dualpath_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.inflight = Gauge("dualpath_requests_inflight", "requests being served", registry=r)
        self.prompt_tokens = Counter("dualpath_prompt_tokens", "prompt tokens served", registry=r)
        self.cached_tokens = Counter("dualpath_cached_tokens", "prompt tokens whose KV was loaded from storage",
                                     registry=r)
        self.completion_tokens = Counter("dualpath_completion_tokens", "generated tokens", registry=r)
        self.paths = Counter("dualpath_read_path", "turns by the side their hit was read on", ["path"], registry=r)
        self.prefix_waits = Counter("dualpath_prefix_waits", "requests that waited for another request's prompt "
                                    "prefix to be stored (http.inflight_prefix_wait_s)", registry=r)
        self.cancelled = Counter("dualpath_cancelled", "turns cancelled (client gone or stop sequence)", registry=r)
        self.hit_rate = Gauge("dualpath_hit_rate", "cached / prompt tokens since start", registry=r)
        self._prompt = 0
        self._cached = 0
        r.register(_LiveCollector(backend))

    def observe_turn(self, *, prompt: int, cached: int, completion: int, path: str, ttft_s: float | None,
                     tpot_s: float | None) -> None:
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.completion_tokens.inc(completion)
        self.paths.labels(path=path).inc()
        self._prompt += prompt
        self._cached += cached
        self.hit_rate.set(self._cached / self._prompt if self._prompt else 0.0)
        if ttft_s is not None:
            self.ttft.observe(max(0.0, ttft_s))
        if tpot_s is not None:
            self.tpot.observe(max(0.0, tpot_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
