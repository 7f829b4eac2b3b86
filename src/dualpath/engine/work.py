"""A prefill engine's predicted work: what DualPath's Algorithm 1 ranks the PEs of a class by in the runtime and the
deployment (``GlobalScheduler.pe_work`` and ``EngineSnapshot.work``; see ``docs/simulator.md``, "Never lose").

Prompt tokens measure a PE's queued work only while requests reuse a similar share of their prompt. An agent's next
turn (40K tokens of which 39K are stored) costs a fraction of a first prompt of the same length, so the scheduler
ranks PEs by the time their queue still needs. :class:`PrefillWork` predicts a request's share of that time from the
model's per-layer time model (:class:`~dualpath.engine.timemodel.LayerTimeModel`, calibrated for a real model, exact
for the synthetic one):

* the marginal compute of its new tokens over its stored ones: ``n_layers * (t(n, c) - a)``, without the forward's
  fixed cost ``a``, which the requests of a batch share;
* for layer-wise prefill, at least the time its hit KV takes to stream into the PE over its compute NIC
  (``hit_s_per_token``; 0 when the links do not emulate a rate);

in whole microseconds (at least 1). The unit is the same for every PE of a deployment, so engines on different
devices compare. A PE reports what its queue holds plus what is left of the forward it is computing
(:meth:`dualpath.engine.prefill.PrefillEngine.snapshot`); the scheduler charges each assignment its prediction
within a fetch round. The model crosses the wire in a PE's ``hello`` (:meth:`to_wire`, :meth:`from_wire`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dualpath.cluster.config import ClusterConfig
from dualpath.engine.timemodel import LayerTimeModel
from dualpath.errors import SchedulerError
from dualpath.scheduler.state import RequestInfo

_FIELDS = ("b", "g", "e", "d", "n_layers", "hit_s_per_token")


@dataclass(frozen=True, slots=True)
class PrefillWork:
    """Predicted PE time of a request (module docstring): per layer ``b*n + g*c + e*n*c + d*n^2`` seconds for ``n``
    new tokens over ``c`` stored ones, ``n_layers`` layers, and at least ``hit_s_per_token * c``."""

    b: float
    g: float
    e: float
    d: float
    n_layers: int
    hit_s_per_token: float = 0.0

    def __post_init__(self) -> None:
        for name in _FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise SchedulerError(f"work model: {name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise SchedulerError(f"work model: n_layers must be an int >= 1, got {self.n_layers!r}")

    @classmethod
    def from_time_model(cls, tm: LayerTimeModel, hit_s_per_token: float = 0.0) -> PrefillWork:
        return cls(tm.b, tm.g, tm.e, tm.d, tm.n_layers, hit_s_per_token)

    @classmethod
    def for_engine(cls, tm: LayerTimeModel, cluster: ClusterConfig, bytes_per_token: int) -> PrefillWork:
        """A PE's work model: ``tm`` and, for layer-wise prefill over a compute NIC of ``cluster.cnic_gbps``, the
        time ``bytes_per_token`` (all layers) of hit KV take to stream in."""
        rate = cluster.cnic_gbps
        return cls.from_time_model(tm, bytes_per_token / (rate * 1e9) if cluster.layerwise and rate else 0.0)

    def seconds(self, hit: int, new: int) -> float:
        """Predicted PE seconds of computing ``new`` tokens over ``hit`` stored ones (module docstring)."""
        n, c = max(0, new), max(0, hit)
        compute = self.n_layers * (self.b * n + self.g * c + self.e * n * c + self.d * n * n) if n else 0.0
        return max(compute, self.hit_s_per_token * c)

    def work(self, hit: int, new: int) -> int:
        """:meth:`seconds` in whole microseconds, at least 1 (``EngineSnapshot.work``'s unit here)."""
        return max(1, round(self.seconds(hit, new) * 1e6))

    def __call__(self, info: RequestInfo) -> int:
        """``GlobalScheduler.pe_work``."""
        return self.work(info.hit, info.prompt - info.hit)

    def to_wire(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_wire(cls, body: Any) -> PrefillWork:
        """From a PE's ``hello`` (``work_model``); a bad body raises :class:`SchedulerError` naming the field."""
        if not isinstance(body, dict):
            raise SchedulerError(f"work_model must be a map of {', '.join(_FIELDS)}, got {type(body).__name__}")
        missing = [k for k in _FIELDS if k not in body]
        if missing:
            raise SchedulerError(f"work_model: missing {', '.join(missing)}")
        return cls(**{k: body[k] for k in _FIELDS})
