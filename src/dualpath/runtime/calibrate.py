"""Calibration: this machine's compute profile of the configured model, for sim-to-real.

A short run on the configured cluster with **unlimited links** (so only compute and the runtime's own overhead
remain) measures:

* **prefill**: ``t_prefill_done - t_prefill_start`` of single-request forwards over a grid of (cached, new)
  sizes; fitted as ``modelled(cached, new) + a + b * new + c * (cached + new)`` where ``modelled`` is the
  synthetic model's own FLOP time (0 for a real model, whose time is then all in ``a, b, c``);
* **decode**: the time per output token of ``n`` concurrent requests, ``n`` in {1, 4}; fitted as
  ``d0 + d1 * n``.

The fit is least squares with non-negative coefficients (a coefficient the data cannot support is 0).

This is the whole-run profile for sim-to-real. The engines' own per-layer forward-time model of a real model
(what the PE's compute quota and Algorithm 1's beta use) is :mod:`dualpath.engine.timemodel`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from dualpath.config import DualPathConfig
from dualpath.engine.timemodel import nnls
from dualpath.storage.config import rooted
from dualpath.types import PathKind


@dataclass
class ComputeProfileFit:
    """The measured profile (seconds). ``flops_rate`` / ``linear_flops`` / ``attn_flops_key_layer`` /
    ``n_layers`` describe the synthetic model's modelled time (zeros for a real model)."""

    prefill_a: float
    prefill_b: float
    prefill_c: float
    decode_d0: float
    decode_d1: float
    flops_rate: float = 0.0
    linear_flops: float = 0.0
    attn_flops_key_layer: float = 0.0
    n_layers: int = 0
    samples: int = 0
    wall_s: float = 0.0

    def modelled(self, cached: int, new: int) -> float:
        if self.flops_rate <= 0 or new <= 0:
            return 0.0
        keys = new * cached + new * (new + 1) / 2
        per_layer = new * self.linear_flops / max(1, self.n_layers) + self.attn_flops_key_layer * keys
        return per_layer * self.n_layers / self.flops_rate

    def prefill_time(self, chunks: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> float:
        if not chunks:
            return 0.0
        t = self.prefill_a
        for cached, new in chunks:
            t += self.modelled(cached, new) + self.prefill_b * new + self.prefill_c * (cached + new)
        return t

    def attention_time(self, cached: int, new: int) -> float:
        if self.flops_rate <= 0:
            return self.prefill_c * (cached + new)
        keys = new * cached + new * (new + 1) / 2
        return self.attn_flops_key_layer * keys * self.n_layers / self.flops_rate

    def decode_step(self, n: int) -> float:
        return self.decode_d0 + self.decode_d1 * n if n > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (shared with the real model's layer time model)."""
    return nnls(a, y)


def _unlimited(cfg: DualPathConfig, root: str) -> DualPathConfig:
    c = cfg.model_copy(deep=True)
    c.cluster.snic_gbps = None
    c.cluster.cnic_gbps = None
    store = rooted(c.storage)
    if store is not None:
        store.root = Path(root)
    return c


async def _measure(cfg: DualPathConfig) -> tuple[list[tuple[int, int, float]], list[tuple[int, float]]]:
    from dualpath.cluster import Cluster

    prefill: list[tuple[int, int, float]] = []
    decode: list[tuple[int, float]] = []
    rng = np.random.default_rng(0)
    async with Cluster(cfg) as c:
        vocab, bt = c.vocab_size, cfg.cluster.block_tokens
        limit = max(bt * 2, min(c.max_context // 2, 4096))
        sizes = sorted({s for s in (bt, 512, 2048, limit) if s < limit} | {limit})
        for n in sizes:
            for rep in range(2):
                ids = rng.integers(1, vocab, n).tolist()
                r = await c.run_turn(f"cal-p{n}-{rep}", ids, 1, 0, 0, PathKind.PE)
                t = r.timings
                prefill.append((0, n, t.t_prefill_done - t.t_prefill_start))
                # a second turn on top: cached = n (a hit), new = a small append
                ids2 = ids + r.token_ids + rng.integers(1, vocab, 64).tolist()
                r2 = await c.run_turn(f"cal-p{n}-{rep}", ids2, 1, 0, 0, PathKind.PE)
                t2 = r2.timings
                prefill.append((r2.hit_tokens, len(ids2) - r2.hit_tokens, t2.t_prefill_done - t2.t_prefill_start))
        gen = 24
        for n_conc in (1, 4):
            results: list[Any] = []

            async def one(k: int, n_conc: int = n_conc, results: list[Any] = results) -> None:
                ids = rng.integers(1, vocab, 256).tolist()
                results.append(await c.run_turn(f"cal-d{n_conc}-{k}", ids, gen, 0, 0, PathKind.PE))

            async with anyio.create_task_group() as tg:
                for k in range(n_conc):
                    tg.start_soon(one, k)
            for r in results:
                t = r.timings
                if t.t_second_token and t.t_done > t.t_second_token:
                    decode.append((n_conc, (t.t_done - t.t_second_token) / (gen - 2)))
    return prefill, decode


def calibrate(cfg: DualPathConfig) -> ComputeProfileFit:
    """Measure the compute profile of ``cfg``'s model and runtime on this machine (a few seconds)."""
    from dualpath.runtime.runner import limit_torch_threads

    t0 = time.perf_counter()
    with limit_torch_threads(cfg.model.kind == "synthetic"), tempfile.TemporaryDirectory(
        prefix="dualpath-cal-"
    ) as root:
        prefill, decode = anyio.run(_measure, _unlimited(cfg, root))
    m = cfg.model
    fit = ComputeProfileFit(0.0, 0.0, 0.0, 0.0, 0.0)
    if m.kind == "synthetic":
        fit.flops_rate = m.device_tflops * 1e12
        fit.linear_flops = m.linear_flops_per_token
        fit.attn_flops_key_layer = m.attn_flops_per_key_layer
        fit.n_layers = m.n_layers
    a = np.array([[1.0, n, c + n] for c, n, _ in prefill])
    y = np.array([max(0.0, t - fit.modelled(c, n)) for c, n, t in prefill])
    fit.prefill_a, fit.prefill_b, fit.prefill_c = (float(x) for x in _nnls(a, y))
    if decode:
        ad = np.array([[1.0, n] for n, _ in decode])
        yd = np.array([t for _, t in decode])
        fit.decode_d0, fit.decode_d1 = (float(x) for x in _nnls(ad, yd))
    fit.samples = len(prefill) + len(decode)
    fit.wall_s = time.perf_counter() - t0
    return fit
