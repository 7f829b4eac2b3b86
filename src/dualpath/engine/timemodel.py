"""A forward-time model of a real (computing) model, calibrated from measured layer-wise forwards.

The synthetic model knows its own time (FLOPs over a rate). A real checkpoint does not, so the PE's compute quota
(paper 7.5) and Algorithm 1's beta would have nothing to work with. :func:`calibrate_layer_time` runs a handful of
real one-layer forwards over a small grid of (new tokens ``n``, cached context ``c``) on the model's own device and
fits, by least squares with non-negative coefficients and relative weighting (every point counts by its relative
error), the per-layer time

    ``t(n, c) = a + b * n + g * c + e * n * c + d * n**2``      (seconds, one layer, one sequence)

``b`` carries the linear layers, ``g`` reading the cached KV, ``e`` the attention over cached keys, ``d`` the
causal attention among the new tokens. A prefill of ``n`` tokens over ``c`` cached ones is predicted as
``n_layers * t(n, c)``.

Bounded and cached: measurement stops at a deadline (``budget_s``; the grid is ordered so that a cut-off still
leaves a well-posed fit) and the fit is stored as JSON under ``$DUALPATH_CACHE/timemodel`` (default
``~/.cache/dualpath/timemodel``), keyed by the model's fingerprint, the device, torch's version and thread count,
so a second engine start reuses it (unless the fit was poor: median leave-one-out error over 50 %, the mark
of a calibration disturbed by other work). ``DUALPATH_TIMEMODEL=off`` (or the model config's ``time_model: off``)
turns it off: the model then predicts nothing, as before. The fit reports its error: the median / max
relative error over the measured points (in-sample) and the median leave-one-out error (each point predicted
by a fit without it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where a model is measured: the scheduler process reads a fitted model without it
    import torch

log = logging.getLogger("dualpath.timemodel")

__all__ = ["LayerTimeModel", "cache_dir", "calibrate_layer_time", "default_grid", "fit_layer_time",
           "measure_layer_times", "nnls", "time_model_for"]

GRID_VERSION = 2  # 2: points average over layer kinds (dense and MoE layers)
#: a fit whose median leave-one-out error exceeds this is used but not cached (a start on a busy machine)
MAX_CACHED_LOO_ERR = 0.5
#: (new tokens, cached tokens), in measuring order: the corners first (a cut-off still leaves a fit), then more.
_BASE_GRID: tuple[tuple[int, int], ...] = (
    (16, 0), (128, 0), (16, 1024), (128, 1024), (64, 256), (256, 0), (32, 2048), (256, 512),
    (64, 4096), (128, 2048), (512, 0), (32, 256), (384, 1024), (192, 3072), (512, 1024),
)


@dataclass(frozen=True)
class LayerTimeModel:
    """Per-layer time ``a + b*n + g*c + e*n*c + d*n^2`` (seconds) of ``n`` new tokens over ``c`` cached ones, and the
    fit's quality. ``rel_err_*``: |predicted - measured| / measured over the calibration points."""

    a: float
    b: float
    e: float
    d: float
    n_layers: int
    g: float = 0.0
    samples: int = 0
    rel_err_median: float = 0.0
    rel_err_max: float = 0.0
    loo_err_median: float = 0.0
    wall_s: float = 0.0
    device: str = "cpu"
    key: str = ""

    def layer_s(self, new: int, cached: int) -> float:
        """Predicted seconds of one layer computing ``new`` tokens over ``cached`` ones (0 for no tokens)."""
        if new <= 0:
            return 0.0
        return self.a + self.b * new + self.g * cached + self.e * new * cached + self.d * new * new

    def prefill_s(self, cached: int, new: int) -> float:
        """Predicted seconds of a whole prefill forward (all layers) of one sequence."""
        return self.n_layers * self.layer_s(new, cached)

    def efficient_batch_tokens(self, cap: int, share: float = 0.9) -> int:
        """The fewest fresh tokens per forward (at most ``cap``) whose predicted throughput reaches ``share`` of
        the best over ``1..cap``: below it the forward's fixed cost dominates. 1 when there is no fixed cost."""
        cap = max(1, int(cap))
        grid = sorted({1, cap, *(1 << k for k in range(cap.bit_length()) if (1 << k) <= cap)})
        rate = {n: n / t if (t := self.prefill_s(0, n)) > 0 else float("inf") for n in grid}
        best = max(rate.values())
        lo = next(n for n in grid if rate[n] >= share * best)
        prev = max([n for n in grid if n < lo], default=0)
        while lo - prev > 1:  # the fewest tokens between the two grid points that still reach the share
            mid = (lo + prev) // 2
            t = self.prefill_s(0, mid)
            if (mid / t if t > 0 else float("inf")) >= share * best:
                lo = mid
            else:
                prev = mid
        return lo

    def tokens_per_s(self, new: int = 1024) -> float:
        """Prefill throughput of a batch of ``new`` fresh tokens (for Algorithm 1's beta)."""
        t = self.prefill_s(0, new)
        return new / t if t > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerTimeModel:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        return (f"per layer: {self.a * 1e6:.1f} us + {self.b * 1e6:.3f} us/token + {self.g * 1e9:.2f} ns/ctx + "
                f"{self.e * 1e9:.4f} ns/(token*ctx)"
                f" + {self.d * 1e9:.4f} ns/token^2; {self.samples} points, relative error median "
                f"{self.rel_err_median:.1%} max {self.rel_err_max:.1%}, leave-one-out median {self.loo_err_median:.1%}"
                f"; calibrated in {self.wall_s:.2f} s on {self.device}")


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0, by trying every support (fine for up to ~5 unknowns)."""
    n = a.shape[1]
    best: np.ndarray | None = None
    best_err = float("inf")
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        x_sub, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.any(x_sub < 0):
            continue
        x = np.zeros(n)
        x[cols] = x_sub
        err = float(np.sum((a @ x - y) ** 2))
        if err < best_err:
            best, best_err = x, err
    return best if best is not None else np.zeros(n)


def _features(points: Sequence[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([[1.0, n, n * c, n * n, c] for n, c, _ in points], dtype=np.float64)
    y = np.array([t for _, _, t in points], dtype=np.float64)
    return a, y


def _fit_coeffs(points: Sequence[tuple[int, int, float]]) -> np.ndarray:
    a, y = _features(points)
    if len(points) < 6:  # too few points for five terms: no n^2 and no context-only term (d = g = 0)
        a = a.copy()
        a[:, 3:] = 0.0
    w = 1.0 / np.maximum(y, 1e-9)  # relative error: every point weighs by its own size
    # scale columns so that the solver sees comparable magnitudes
    scale = np.maximum(np.abs(a * w[:, None]).max(axis=0), 1e-30)
    x = nnls(a * w[:, None] / scale, y * w)
    return np.asarray(x / scale)


def fit_layer_time(points: Sequence[tuple[int, int, float]], n_layers: int, *, device: str = "cpu",
                   key: str = "", wall_s: float = 0.0) -> LayerTimeModel:
    """Fit ``(new, cached, seconds per layer)`` points (at least 3; under 6, without the ``n^2`` and ``c`` terms) to a
    :class:`LayerTimeModel`."""
    if len(points) < 3:
        raise ValueError(f"a time model needs at least 3 measured points, got {len(points)}")
    x = _fit_coeffs(points)
    a, y = _features(points)
    rel = np.abs(a @ x - y) / np.maximum(y, 1e-12)
    loo: list[float] = []
    for i in range(len(points)):
        rest = [p for j, p in enumerate(points) if j != i]
        xi = _fit_coeffs(rest)
        loo.append(float(abs(a[i] @ xi - y[i]) / max(y[i], 1e-12)))
    return LayerTimeModel(
        float(x[0]), float(x[1]), float(x[2]), float(x[3]), int(n_layers), float(x[4]), len(points),
        float(np.median(rel)), float(rel.max()), float(statistics.median(loo)), wall_s, device, key,
    )


def default_grid(max_context: int) -> list[tuple[int, int]]:
    """The calibration grid, clipped to ``max_context`` (points that do not fit are scaled down)."""
    out: list[tuple[int, int]] = []
    for n, c in _BASE_GRID:
        if n + c > max_context:
            f = max_context / (n + c)
            n, c = max(1, int(n * f)), int(c * f)
        if (n, c) not in out:
            out.append((n, c))
    return out


def measure_layer_times(model: Any, kv_spec: Any, block_tokens: int, device: torch.device,
                        grid: Sequence[tuple[int, int]], *, reps: int = 5, deadline: float | None = None,
                        vocab_size: int = 2) -> list[tuple[int, int, float]]:
    """Seconds of one layer's forward for each ``(new, cached)`` of ``grid``: the fastest of ``reps`` samples
    (layers spread over the model's depth, one sequence), i.e. the least disturbed by other work on the machine.
    A model whose layers differ (dense and MoE feed-forwards: DeepSeek's first layers, Qwen-MoE's
    ``mlp_only_layers``/``decoder_sparse_step``) is sampled in every kind of layer; a point is then the average
    over the model's layers of each kind's fastest sample (the fastest sample overall would be a dense layer's,
    and the model's time would be underestimated).

    With a ``deadline`` (a ``time.perf_counter()`` value), a point stops at 3 samples once it took 1/15 of the
    time left at the start (at 1 sample past 2/15), and measuring stops at the deadline (overrunning it by at
    most one layer's forward)."""
    import torch

    from dualpath.engine.model_api import PrefillSeq, _llama_prefill_begin, _llama_prefill_layer
    from dualpath.kv.layout import KVLayout

    layout = KVLayout(kv_spec, block_tokens)
    n_layers = int(kv_spec.n_layers)
    most = max(n + c for n, c in grid)
    blocks = -(-most // block_tokens)
    rows = torch.zeros(blocks, block_tokens, kv_spec.bytes_per_token_layer, dtype=torch.uint8, device=device)
    kv = layout.as_kv(rows)
    table = torch.arange(blocks, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    layers = sorted({round(i * (n_layers - 1) / max(1, reps - 1)) for i in range(reps)}) if reps > 1 else [0]
    kinds = layer_kinds(model, n_layers)
    for k in sorted(set(kinds)):  # at least one layer of every kind, the first kinds sampled first
        if not any(kinds[j] == k for j in layers):
            layers.insert(0, kinds.index(k))
    weight = {k: kinds.count(k) / n_layers for k in set(kinds)}

    def one(n: int, c: int, timed: bool) -> list[tuple[str, float]]:
        ids = torch.randint(1, max(2, vocab_size), (n,), generator=gen, dtype=torch.int64)
        need = -(-(n + c) // block_tokens)
        state = _llama_prefill_begin(model, [PrefillSeq(ids, c, table[:need])], block_tokens, device)
        out: list[tuple[str, float]] = []
        start = time.perf_counter()
        for i in range(max(reps, len(layers)) if timed else 1):
            layer = layers[i % len(layers)]
            state.next_layer = layer  # layers are independent for timing: skip to a spread-out one
            t0 = time.perf_counter()
            _llama_prefill_layer(model, state, layer, kv)
            t1 = time.perf_counter()
            out.append((kinds[layer], t1 - t0))
            # an expensive point takes 3 samples (fewer past 2/15 of the budget or the deadline), not ``reps``
            spent = t1 - start
            if deadline is not None and (t1 > deadline or spent > 2 * point_cap
                                         or (len(out) >= 3 and spent > point_cap)):
                break
        return out

    point_cap = (deadline - time.perf_counter()) / 15 if deadline is not None else 0.0
    one(*grid[0], timed=False)  # warm-up (allocator, kernels' first call)
    points: list[tuple[int, int, float]] = []
    for n, c in grid:
        if deadline is not None and time.perf_counter() > deadline:
            break
        points.append((n, c, _layer_average(one(n, c, timed=True), weight)))
    return points


def layer_kinds(model: Any, n_layers: int) -> list[str]:
    """Each layer's kind (its feed-forward module's class: ``MLP``, ``SparseMoE``, ...); all alike when the model
    does not say."""
    mods = getattr(getattr(model, "model", None), "layers", None)
    if mods is None or len(mods) != n_layers:
        return ["layer"] * n_layers
    return [type(getattr(m, "mlp", None)).__name__ for m in mods]


def _layer_average(samples: list[tuple[str, float]], weight: dict[str, float]) -> float:
    """Each sampled kind's fastest sample, averaged with the kinds' shares of the model's layers (renormalized
    over the kinds sampled: a point cut short by the deadline may miss one)."""
    best: dict[str, float] = {}
    for k, t in samples:
        best[k] = min(t, best.get(k, t))
    total = sum(weight[k] for k in best)
    return sum(weight[k] * t for k, t in best.items()) / total


def cache_dir() -> Path:
    """Where fitted time models are kept: ``$DUALPATH_CACHE/timemodel`` (default ``~/.cache/dualpath``)."""
    base = os.environ.get("DUALPATH_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "dualpath") / "timemodel"


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{os.cpu_count()}cpu"


def _cache_key(fingerprint: str, device: torch.device, extra: str = "") -> str:
    import torch

    text = "|".join([fingerprint, _device_name(device), torch.__version__, str(torch.get_num_threads()),
                     str(GRID_VERSION), extra])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load(path: Path) -> LayerTimeModel | None:
    try:
        return LayerTimeModel.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("%s: unreadable time model (%s); recalibrating", path, exc)
        return None


def _store(path: Path, tm: LayerTimeModel) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tm-")
        with os.fdopen(fd, "w") as f:
            json.dump(tm.to_json(), f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop an engine
        log.warning("cannot cache the time model at %s (%s)", path, exc)


def calibrate_layer_time(model: Any, kv_spec: Any, block_tokens: int, device: torch.device, *,
                         max_context: int, vocab_size: int, budget_s: float = 2.0, reps: int = 5,
                         key: str = "") -> LayerTimeModel | None:
    """Measure and fit (see the module docstring); None when the deadline left fewer than 3 points."""
    import torch

    t0 = time.perf_counter()
    grid = default_grid(max_context)
    with torch.inference_mode():
        points = measure_layer_times(model, kv_spec, block_tokens, device, grid, reps=reps,
                                     deadline=t0 + budget_s, vocab_size=vocab_size)
    if len(points) < 3:
        log.warning("time model: only %d points measured within %.1f s; the model predicts no time",
                    len(points), budget_s)
        return None
    return fit_layer_time(points, int(kv_spec.n_layers), device=_device_name(device), key=key,
                          wall_s=time.perf_counter() - t0)


def time_model_for(model: Any, kv_spec: Any, fingerprint: str, block_tokens: int, device: torch.device, *,
                   max_context: int, vocab_size: int, budget_s: float = 2.0,
                   use_cache: bool = True) -> LayerTimeModel | None:
    """The cached time model of ``model`` on ``device``, calibrating (and caching) it on a miss; None when turned
    off by ``DUALPATH_TIMEMODEL=off`` or when calibration could not measure enough points."""
    if os.environ.get("DUALPATH_TIMEMODEL", "").lower() in ("off", "0", "false", "no"):
        return None
    key = _cache_key(fingerprint, device, f"bt{block_tokens}")
    path = cache_dir() / f"{key}.json"
    if use_cache:
        cached = _load(path)
        if cached is not None and cached.n_layers == kv_spec.n_layers:
            return cached
    tm = calibrate_layer_time(model, kv_spec, block_tokens, device, max_context=max_context,
                              vocab_size=vocab_size, budget_s=budget_s, key=key)
    if tm is not None:
        log.info("time model of %s: %s", fingerprint[:12], tm.describe())
        if tm.loo_err_median > MAX_CACHED_LOO_ERR:  # a disturbed calibration is used now, not kept for later
            log.warning("time model of %s: leave-one-out error %.0f%% (machine busy?); not cached",
                        fingerprint[:12], 100 * tm.loo_err_median)
        elif use_cache:
            _store(path, tm)
    return tm
