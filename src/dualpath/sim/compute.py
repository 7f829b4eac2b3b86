"""Compute models: how long a PE forward batch and a DE decode step take.

:class:`RooflineCompute` derives both from a model preset and a GPU preset (no fitting):

* prefill of a forward batch = its FLOPs (linear + attention + indexer, :meth:`ModelPreset.prefill_flops`)
  / (``mfu`` x dense peak of the model's dtype x ``batch_efficiency(new tokens)``), where the efficiency curve is the
  paper's Fig. 3 (relative prefill throughput vs batch size) normalised to its saturation;
* the PE compute quota (paper 7.5) bounds the predicted *attention* time (attention + indexer FLOPs / rate);
* a decode step of a DE holding ``n`` requests = max(HBM bytes / (hbm_bw x hbm_efficiency), FLOPs / rate), the bytes
  being the GPU's weights plus each request's KV read (sparse attention reads top-k entries + all indexer keys).

Any object with the same four methods can replace it (e.g. a profile measured on a real run, for sim-to-real).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dualpath.sim.presets import BATCH_CURVE, GPUPreset, ModelPreset


class ComputeModel(Protocol):
    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds of one PE forward over ``(cached, new)`` chunks."""
        ...

    def attention_time(self, cached: int, new: int) -> float:
        """Predicted attention seconds of one chunk (what the compute quota bounds)."""
        ...

    def decode_request_cost(self, context: int) -> tuple[float, float]:
        """(HBM bytes, FLOPs) one decode step spends on one request with ``context`` tokens."""
        ...

    def decode_step_time(self, n: int, kv_bytes: float, flops: float) -> float:
        """Seconds of one DE decode step over ``n`` requests with summed per-request bytes and FLOPs."""
        ...


def curve_efficiency(new_tokens: float, curve: Sequence[tuple[float, float]] = BATCH_CURVE) -> float:
    """Piecewise-linear efficiency in (0, 1]; below the first point the batch pays the first point's time."""
    xs = [p[0] for p in curve]
    if new_tokens <= xs[0]:
        return max(1e-9, curve[0][1] * new_tokens / xs[0])
    if new_tokens >= xs[-1]:
        return curve[-1][1]
    i = bisect.bisect_right(xs, new_tokens)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (new_tokens - x0) / (x1 - x0)


@dataclass
class RooflineCompute:
    """Compute from presets; ``n_pe_gpus`` / ``n_de_gpus`` set the expert-parallel sharding of the weights."""

    model: ModelPreset
    gpu: GPUPreset
    n_pe_gpus: int
    n_de_gpus: int
    batch_curve: Sequence[tuple[float, float]] = BATCH_CURVE

    def __post_init__(self) -> None:
        self.rate = self.gpu.flops_per_s(self.model.compute_dtype)
        self.hbm_rate = self.gpu.hbm_bw * self.gpu.hbm_efficiency
        self.de_weight_bytes = self.model.weight_bytes_per_gpu(self.n_de_gpus)

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        flops = 0.0
        new = 0
        pf = self.model.prefill_flops
        for cached, n in chunks:
            flops += pf(cached, n)
            new += n
        if new <= 0:
            return 0.0
        return flops / (self.rate * curve_efficiency(new, self.batch_curve))

    def attention_time(self, cached: int, new: int) -> float:
        return self.model.attention_flops(cached, new) / self.rate

    def decode_request_cost(self, context: int) -> tuple[float, float]:
        return self.model.decode_kv_bytes(context), self.model.decode_flops(context)

    def decode_step_time(self, n: int, kv_bytes: float, flops: float) -> float:
        if n <= 0:
            return 0.0
        return max((self.de_weight_bytes + kv_bytes) / self.hbm_rate, flops / self.rate)

    def pe_free_hbm(self) -> float:
        """HBM a PE has for the KV of a non-layer-wise batch."""
        return self.gpu.hbm_bytes - self.model.weight_bytes_per_gpu(self.n_pe_gpus) - self.gpu.activation_reserve_bytes

    def de_free_hbm(self) -> float:
        """HBM a DE has for decode KV."""
        return self.gpu.hbm_bytes - self.de_weight_bytes - self.gpu.activation_reserve_bytes


@dataclass
class ProfiledCompute:
    """Compute from measured functions (sim-to-real): ``prefill_fn(chunks) -> s``, ``attention_fn(cached, new)
    -> s``, ``step_fn(n, kv_bytes, flops) -> s``, ``request_cost_fn(context) -> (bytes, flops)``."""

    prefill_fn: Callable[[Sequence[tuple[int, int]]], float]
    attention_fn: Callable[[int, int], float]
    step_fn: Callable[[int, float, float], float]
    request_cost_fn: Callable[[int], tuple[float, float]] = lambda ctx: (float(ctx), 0.0)

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        return self.prefill_fn(chunks)

    def attention_time(self, cached: int, new: int) -> float:
        return self.attention_fn(cached, new)

    def decode_request_cost(self, context: int) -> tuple[float, float]:
        return self.request_cost_fn(context)

    def decode_step_time(self, n: int, kv_bytes: float, flops: float) -> float:
        return self.step_fn(n, kv_bytes, flops) if n > 0 else 0.0
