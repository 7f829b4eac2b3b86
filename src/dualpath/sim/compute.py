"""Compute models: how long a PE forward batch and a DE decode step take.

:class:`RooflineCompute` derives both from a model preset and a GPU preset (no fitting):

* prefill of a forward batch = its FLOPs (linear + attention + indexer, :meth:`ModelPreset.prefill_flops`)
  / (``mfu`` x dense peak of the model's dtype x ``batch_efficiency(new tokens)``), where the efficiency curve is the
  paper's Fig. 3 (relative prefill throughput vs batch size) normalised to its saturation;
* the PE compute quota (paper 7.5) bounds the predicted *attention* time (attention + indexer FLOPs / rate);
* a decode step of a DE holding ``n`` requests is a per-operator roofline, the operators running one after the
  other: the weight GEMMs take max(weights / HBM rate, n x linear FLOPs / rate) and attention takes
  max(KV bytes read / HBM rate, attention FLOPs / rate) (sparse attention reads top-k entries + all indexer keys).
  One roofline over the whole step (the max of the sums) would let the attention's KV reads hide under the GEMMs'
  compute, which no kernel does. Check against DAY6 (independent of DualPath): V3 at ~92 requests per GPU (1.85k
  tok/s at 20 tok/s per user), 5K context, EP144 gives ~41 ms per step; DeepSeek reports 45-50 ms (20-22 tok/s);
* inference traffic: the MoE all-to-all of a forward puts ``ep_bytes_per_token`` on each GPU's compute NIC (both
  directions) per token (:meth:`ModelPreset.ep_bytes_per_token`; zero inside one node, where it runs on NVLink).

Any object with the same four methods can replace it (e.g. a profile measured on a real run, for sim-to-real).

``prefill_slowdown`` / ``decode_slowdown`` (default 1: the sourced roofline) multiply every prefill (and quota) time /
every decode step time. They are **what-if knobs, not presets**: ``dualpath reproduce`` uses them only in its
labelled what-if section, to measure how the misses move when the engine runs as slowly as the paper's own figures
imply (docs/simulator.md); no measured row of the report uses them.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dualpath.errors import ConfigError
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


def efficient_batch_tokens(compute: object, cap: int) -> int:
    """New tokens per forward at which ``compute``'s prefill throughput saturates (its batch-efficiency curve's
    last point; ``compute.efficient_batch_tokens`` when it has one), at most ``cap``; 0 when unknown."""
    v = getattr(compute, "efficient_batch_tokens", None)
    if v is None:
        curve = getattr(compute, "batch_curve", None)
        v = curve[-1][0] if curve else 0
    return int(min(cap, float(v)))


@dataclass
class RooflineCompute:
    """Compute from presets; ``n_pe_gpus`` / ``n_de_gpus`` set the expert-parallel sharding of the weights."""

    model: ModelPreset
    gpu: GPUPreset
    n_pe_gpus: int
    n_de_gpus: int
    batch_curve: Sequence[tuple[float, float]] = BATCH_CURVE
    gpus_per_node: int = 8
    prefill_slowdown: float = 1.0
    decode_slowdown: float = 1.0

    def __post_init__(self) -> None:
        if not (self.prefill_slowdown > 0 and self.decode_slowdown > 0):
            raise ConfigError(f"RooflineCompute: prefill_slowdown and decode_slowdown must be > 0, got "
                              f"{self.prefill_slowdown}, {self.decode_slowdown}")
        self.rate = self.gpu.flops_per_s(self.model.compute_dtype)
        self.hbm_rate = self.gpu.hbm_bw * self.gpu.hbm_efficiency
        self.de_weight_bytes = self.model.weight_bytes_per_gpu(self.n_de_gpus)
        g = max(1, self.gpus_per_node)
        self.pe_ep_bytes = self.model.ep_bytes_per_token(max(1, self.n_pe_gpus // g))
        self.de_ep_bytes = self.model.ep_bytes_per_token(max(1, self.n_de_gpus // g))
        self.linear_flops = self.model.decode_linear_flops()

    def prefill_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        flops = 0.0
        new = 0
        pf = self.model.prefill_flops
        for cached, n in chunks:
            flops += pf(cached, n)
            new += n
        if new <= 0:
            return 0.0
        return flops * self.prefill_slowdown / (self.rate * curve_efficiency(new, self.batch_curve))

    def attention_time(self, cached: int, new: int) -> float:
        return self.model.attention_flops(cached, new) * self.prefill_slowdown / self.rate

    def decode_request_cost(self, context: int) -> tuple[float, float]:
        """(KV bytes read, attention FLOPs) of one request's decode step; the linear part depends on ``n`` only."""
        return self.model.decode_kv_bytes(context), self.model.decode_attention_flops(context)

    def decode_step_time(self, n: int, kv_bytes: float, flops: float) -> float:
        if n <= 0:
            return 0.0
        gemm = max(self.de_weight_bytes / self.hbm_rate, n * self.linear_flops / self.rate)
        return (gemm + max(kv_bytes / self.hbm_rate, flops / self.rate)) * self.decode_slowdown

    def prefill_comm_bytes(self, new_tokens: int) -> float:
        """All-to-all bytes a PE's forward of ``new_tokens`` puts on its compute NIC, each direction."""
        return new_tokens * self.pe_ep_bytes

    def decode_comm_bytes(self, n: int) -> float:
        """All-to-all bytes a DE's decode step over ``n`` requests puts on its compute NIC, each direction."""
        return n * self.de_ep_bytes

    def pe_free_hbm(self) -> float:
        """HBM a PE has for the KV of a non-layer-wise batch."""
        return self.gpu.hbm_bytes - self.model.weight_bytes_per_gpu(self.n_pe_gpus) - self.gpu.activation_reserve_bytes

    def pe_hbm_budget(self, context_tokens: float = 0.0) -> dict[str, float]:
        """The first-principles check of the PE-HBM cap of non-layer-wise (full-block) prefill: what one PE GPU holds
        (bytes: ``hbm``, ``replicated_weights``, ``expert_weights`` = its share of the routed experts under EP over
        ``n_pe_gpus``, ``activation_reserve``), what is left for the batch's KV (``free``), how many KV tokens that is
        (all layers: ``kv_tokens``; one layer, as layer-wise prefill holds: ``kv_tokens_layerwise``) and, for
        ``context_tokens`` > 0, how many requests of that context fit (``requests``)."""
        m = self.model
        rep = m.replicated_params * m.weight_bytes_per_param
        exp = m.expert_params / max(1, self.n_pe_gpus) * m.weight_bytes_per_param
        free = self.pe_free_hbm()
        kvb = float(m.kv_bytes_per_token)
        out = {"hbm": self.gpu.hbm_bytes, "replicated_weights": rep, "expert_weights": exp,
               "activation_reserve": self.gpu.activation_reserve_bytes, "free": free,
               "kv_bytes_per_token": kvb, "kv_tokens": max(0.0, free) / kvb,
               "kv_tokens_layerwise": max(0.0, free) / (kvb / max(1, m.n_layers))}
        if context_tokens > 0:
            out["requests"] = out["kv_tokens"] / context_tokens
        return out

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
