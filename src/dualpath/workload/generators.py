"""Synthetic agent trajectories matching the paper's datasets (Table 2), and scaled-down variants for a CPU.

Table 2 gives, per MaxLen, averages *per trajectory*: turns, append per turn and generation per turn (each the
mean over the trajectory's turns, then averaged over trajectories), total tokens (the session length) and
context (the mean over turns of the tokens before the turn's append). Note 60 turns x (608 + 148) is far above
the 28,639 total tokens: turn count and turn size are strongly anti-correlated (long sessions have short turns).

Our parametric model (all choices are ours; the paper publishes only these means), per trajectory:

* ``T`` dataset turns ~ lognormal(mu, sigma), at least 2; the session length ``L`` ~ MaxLen x U[lo, hi],
  independent of ``T`` (so ``E[L/T] = E[L] E[1/T]`` is what makes per-turn sizes large);
* turn 1's append carries an extra ``first_frac * L`` tokens (the task prompt; it lifts the mean context to
  ~0.6 L as in Table 2); the remaining budget is spread over the turns with lognormal(0, 0.8) weights, each
  turn's budget split into generation (``gen_frac`` +- 50 %, at least 1 token) and append (at least 1);
* ``T`` and ``L`` use stratified quantiles (one per trajectory, shuffled) so that 500 trajectories match the
  means within about 2 %, whatever the seed;
* a synthetic first round (``synthetic_append`` random tokens, ``g_1 = 1``; paper appendix A.3) is prepended so
  no two trajectories share a prefix. :func:`dataset_stats` skips it, and it counts towards MaxLen.

The parameters of "32k", "48k" and "64k" were calibrated against Table 2 with this generator. "tiny" and
"small" are CPU-sized shapes of the same family (not from the paper).

``scale`` shrinks every length and MaxLen by the same factor (a shape-preserving CPU variant: "32k" at
``scale=1/32`` keeps the turn counts with 1K-token sessions). ``append_scale`` / ``gen_scale`` are the paper's
sensitivity study (section 9.3): each turn's append (generation) is multiplied, then the session is truncated at
MaxLen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dualpath.errors import WorkloadError
from dualpath.workload.trajectory import Trajectory, Turn


@dataclass(frozen=True)
class DatasetSpec:
    max_len: int
    turns_mu: float
    turns_sigma: float
    len_lo: float
    len_hi: float
    first_frac: float
    gen_frac: float
    weight_sigma: float = 0.8
    synthetic_append: int = 64
    min_turns: int = 2
    #: The paper's datasets hold 500 trajectories each; more agents re-use them (appendix A.3: "an existing
    #: trajectory is sampled and a synthetic first round is prepended"). None: every agent is drawn afresh.
    base_trajectories: int | None = None


#: Table 2 targets: (turns, append/turn, gen/turn, total tokens, context) per MaxLen.
TABLE2: dict[str, tuple[float, float, float, float, float]] = {
    "32k": (60, 608, 148, 28_639, 17_183),
    "48k": (106, 474, 172, 42_607, 25_120),
    "64k": (157, 429, 176, 55_958, 32_721),
}

DATASETS: dict[str, DatasetSpec] = {
    "32k": DatasetSpec(32 * 1024, turns_mu=3.8646, turns_sigma=0.6778, len_lo=0.7500, len_hi=0.998,
                       first_frac=0.2335, gen_frac=0.2556, base_trajectories=500),
    "48k": DatasetSpec(48 * 1024, turns_mu=4.4269, turns_sigma=0.6879, len_lo=0.7357, len_hi=0.998,
                       first_frac=0.1969, gen_frac=0.3318, base_trajectories=500),
    "64k": DatasetSpec(64 * 1024, turns_mu=4.7920, turns_sigma=0.7266, len_lo=0.7097, len_hi=0.998,
                       first_frac=0.1827, gen_frac=0.3561, base_trajectories=500),
    "small": DatasetSpec(4096, turns_mu=2.3, turns_sigma=0.4, len_lo=0.5, len_hi=0.95, first_frac=0.2,
                         gen_frac=0.25, synthetic_append=32),
    "tiny": DatasetSpec(1024, turns_mu=1.3, turns_sigma=0.3, len_lo=0.4, len_hi=0.9, first_frac=0.25,
                        gen_frac=0.2, synthetic_append=16),
}  # fmt: skip


def _stratified(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.permutation(n) + rng.random(n)) / n


def _norm_ppf(u: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = [
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    ]
    b = [
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    ]
    c = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    ]
    d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00]  # fmt: skip
    u = np.clip(u, 1e-12, 1 - 1e-12)
    out = np.empty_like(u)
    lo, hi = u < 0.02425, u > 1 - 0.02425
    mid = ~(lo | hi)
    q = np.sqrt(-2 * np.log(u[lo]))
    out[lo] = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
        (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
    )
    q = np.sqrt(-2 * np.log(1 - u[hi]))
    out[hi] = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
        (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
    )
    q = u[mid] - 0.5
    r = q * q
    out[mid] = (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )
    return out


def generate_from_spec(
    spec: DatasetSpec,
    n: int,
    seed: int = 0,
    scale: float = 1.0,
    max_len: int | None = None,
    append_scale: float = 1.0,
    gen_scale: float = 1.0,
    synthetic_first: bool = True,
) -> list[Trajectory]:
    """``n`` trajectories of the model described in the module docstring.

    With ``spec.base_trajectories`` set and ``n`` larger, the agents replay a base set of that many
    trajectories, each used ``n / base`` times in a shuffled round-robin (the paper's way to make more agents;
    each copy is a separate session: its synthetic first round keeps it from sharing a prefix with the others).
    So the longest trajectory does not grow with the number of agents, as it would with fresh draws.
    """
    if n < 0 or scale <= 0 or append_scale <= 0 or gen_scale <= 0:
        raise WorkloadError(f"need n >= 0 and positive scales, got n={n}, scale={scale}")
    base = spec.base_trajectories
    if base is not None and n > base:
        pool = generate_from_spec(replace(spec, base_trajectories=None), base, seed, scale, max_len,
                                  append_scale, gen_scale, synthetic_first)
        order_rng = np.random.default_rng([seed, 1])
        order = np.concatenate([order_rng.permutation(base) for _ in range(-(-n // base))])[:n]
        return [Trajectory(i, list(pool[int(j)].turns)) for i, j in enumerate(order)]
    rng = np.random.default_rng(seed)
    cap = max_len if max_len is not None else max(8, int(spec.max_len * scale))
    synth = max(1, round(spec.synthetic_append * scale)) if synthetic_first else 0
    turns_n = np.maximum(spec.min_turns, np.rint(np.exp(spec.turns_mu + spec.turns_sigma * _norm_ppf(
        _stratified(rng, n))))).astype(int)  # fmt: skip
    lengths = spec.max_len * (spec.len_lo + (spec.len_hi - spec.len_lo) * _stratified(rng, n))
    out: list[Trajectory] = []
    for tid in range(n):
        t_n, length = int(turns_n[tid]), float(lengths[tid])
        w = rng.lognormal(0.0, spec.weight_sigma, size=t_n)
        budget = (1.0 - spec.first_frac) * length * w / w.sum()
        gfrac = spec.gen_frac * rng.uniform(0.5, 1.5, size=t_n)
        turns: list[Turn] = []
        for i in range(t_n):
            g = max(1.0, budget[i] * gfrac[i])
            a = max(1.0, budget[i] - g) + (spec.first_frac * length if i == 0 else 0.0)
            turns.append(Turn(max(1, round(a * scale * append_scale)), max(1, round(g * scale * gen_scale))))
        if synthetic_first:
            turns.insert(0, Turn(synth, 1))
        out.append(Trajectory(tid, turns).truncated(cap))
    return out


def generate_dataset(
    name: str,
    n: int,
    seed: int = 0,
    scale: float = 1.0,
    max_len: int | None = None,
    *,
    append_scale: float = 1.0,
    gen_scale: float = 1.0,
    synthetic_first: bool = True,
) -> list[Trajectory]:
    """``n`` trajectories shaped like dataset ``name`` ("32k", "48k", "64k", "small", "tiny"); see the module."""
    try:
        spec = DATASETS[name.lower()]
    except KeyError:
        raise WorkloadError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    return generate_from_spec(spec, n, seed, scale, max_len, append_scale, gen_scale, synthetic_first)


def dataset_stats(trajs: list[Trajectory], skip_first: bool = True) -> dict[str, float]:
    """Table 2's per-trajectory averages: turns, append, gen, total, context (see the module docstring).

    ``skip_first`` leaves out each trajectory's first turn (the synthetic round).
    """
    rows = []
    for t in trajs:
        turns = t.turns[1:] if skip_first else t.turns
        if not turns:
            continue
        ctx, contexts = 0, []
        for u in turns:
            contexts.append(ctx)
            ctx += u.append + u.gen
        k = len(turns)
        rows.append(
            (k, sum(u.append for u in turns) / k, sum(u.gen for u in turns) / k, ctx, sum(contexts) / k)
        )
    if not rows:
        raise WorkloadError("no trajectory has a turn to measure")
    m = np.asarray(rows, dtype=float).mean(axis=0)
    return dict(zip(("turns", "append", "gen", "total", "context"), (float(x) for x in m), strict=True))


def fill_random_ids(trajs: list[Trajectory], vocab_size: int, seed: int = 0) -> list[Trajectory]:
    """Copies of ``trajs`` whose turns carry random token ids in ``[0, vocab_size)`` (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in trajs:
        turns = [Turn(u.append, u.gen, rng.integers(0, vocab_size, size=u.append).tolist()) for u in t.turns]
        out.append(Trajectory(t.tid, turns, t.arrival))
    return out


def calibrate_spec(
    spec: DatasetSpec, target: tuple[float, float, float, float, float], n: int = 3000, iters: int = 40
) -> DatasetSpec:
    """Fit ``spec``'s free parameters so :func:`dataset_stats` matches ``target`` (Table 2's row).

    This is how the constants of ``DATASETS`` were obtained (``calibrate_spec(DATASETS["32k"], TABLE2["32k"])``).
    Fixed-point updates: turns -> mu, per-turn size -> sigma, total -> lo, gen share -> gen_frac, context -> first_frac.
    """
    t_turns, t_app, t_gen, t_tot, t_ctx = target
    s = spec
    for _ in range(iters):
        g = dataset_stats(generate_from_spec(s, n, seed=12345))
        per_turn = np.log((t_app + t_gen) / (g["append"] + g["gen"]))
        s = DatasetSpec(
            s.max_len,
            turns_mu=float(s.turns_mu + 0.8 * np.log(t_turns / g["turns"]) + 0.4 * per_turn * s.turns_sigma),
            turns_sigma=float(np.sqrt(max(0.01, s.turns_sigma**2 + 0.8 * per_turn))),
            len_lo=min(s.len_hi - 0.01, s.len_lo + 1.6 * (t_tot - g["total"]) / s.max_len),
            len_hi=s.len_hi,
            first_frac=min(0.9, max(0.0, s.first_frac + 1.2 * (t_ctx / t_tot - g["context"] / g["total"]))),
            gen_frac=s.gen_frac * (t_gen / (t_app + t_gen)) / (g["gen"] / (g["append"] + g["gen"])),
            weight_sigma=s.weight_sigma,
            synthetic_append=s.synthetic_append,
            min_turns=s.min_turns,
        )
    return s
