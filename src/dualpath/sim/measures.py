"""Metrics the paper reports that a run's raw records do not give directly (paper 9.4-9.8).

:class:`Meter` rides along a :class:`~dualpath.sim.cluster.Simulation` (three hooks) and :meth:`Meter.summary`
adds to a run's summary:

* **TTFT composition** (Fig. 12 left): mean ``queue`` (submit -> the scheduler assigns PE/DE/path: Sch.+A.),
  ``read`` (assignment -> the request's hit KV is in the DRAM buffer: R.), ``prefill`` (read done -> first token:
  PE queue + forward, PF.), over the measured window (online: requests submitted after the warm-up).
* **TTST as the paper's Table 3 uses it**: first token -> second token (``ttst_gap_mean_s`` / ``_p50_s``; the PD
  transfer, the DE's join and one decode step), next to ``ttst_*`` (submit -> second token).
* **Attention balance** (Fig. 14): max/avg across the PEs of the prefill EP group (all PEs; an idle one counts 0,
  as it would run an empty forward) of the predicted attention time of the forward each runs (paper 7.5: the
  quota exists so that data-parallel attention does not leave the EP group waiting), sampled at most every
  ``attn_dt`` seconds while a PE computes; ``attn_balance_first5`` averages the samples of the first 5 % of the
  run (where the paper measures). ``de_attn_balance_mean``: the same over the DEs (KV bytes a step reads).
* **Mean JCT online** by Little's law: ``T = L / lambda``, ``L`` = mean number of agents alive in the window,
  ``lambda`` = agent arrivals per second in the window (exact for a stationary window; agents still running at
  the horizon count, unlike a mean over completed agents, which is biased towards short ones).
* **Working set** (paper 9.8): ``lambda x T x total_len_avg / 2`` tokens (x KV bytes per token).
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np


class Meter:
    """Per-run collector; ``sim`` is the :class:`~dualpath.sim.cluster.Simulation` it measures."""

    def __init__(self, sim: Any, attn_dt: float = 1.0) -> None:
        self.sim = sim
        self.attn_dt = attn_dt
        self._next_attn = 0.0
        self.attn_t = array("d")
        self.attn_ratio = array("d")
        self.de_ratio = array("d")
        self.pe_attn = [0.0] * len(sim.pes)
        self.n = 0
        self.queue_s = 0.0
        self.read_s = 0.0
        self.prefill_s = 0.0
        self.ttst_gap = array("d")

    # -- hooks ------------------------------------------------------------------------------------------------
    def request_done(self, r: Any, now: float) -> None:
        sc = self.sim.sc
        if sc.mode == "online" and r.t_submit < sc.warmup_s:
            return
        self.n += 1
        self.queue_s += max(0.0, r.t_assign - r.t_submit)
        self.read_s += max(0.0, r.t_ready - r.t_assign)
        self.prefill_s += max(0.0, r.t_first - r.t_ready)
        steps = r.gen - 1
        if steps > 0 and r.t_join >= 0:
            self.ttst_gap.append(r.t_join + (now - r.t_join) / steps - r.t_first)

    def batch_started(self, pe: int, chunks: list[tuple[Any, int]]) -> None:
        at = self.sim.attn_time
        self.pe_attn[pe] = sum(at(r.cached, n) for r, n in chunks)

    def sample_attention(self, now: float) -> None:
        if now < self._next_attn:
            return
        self._next_attn = now + self.attn_dt
        pes = self.sim.pes
        vals = [a if pe.busy else 0.0 for a, pe in zip(self.pe_attn, pes, strict=True)]
        tot = sum(vals)
        if tot > 0:
            self.attn_t.append(now)
            self.attn_ratio.append(max(vals) * len(vals) / tot)
        dv = [de.bytes for de in self.sim.des]
        dt = sum(dv)
        if dt > 0:
            self.de_ratio.append(max(dv) * len(dv) / dt)

    # -- results ----------------------------------------------------------------------------------------------
    def summary(self, end: float) -> dict[str, Any]:
        sim = self.sim
        sc = sim.sc
        n = max(1, self.n)
        out: dict[str, Any] = {
            "ttft_queue_s": self.queue_s / n if self.n else float("nan"),
            "ttft_read_s": self.read_s / n if self.n else float("nan"),
            "ttft_prefill_s": self.prefill_s / n if self.n else float("nan"),
        }
        gap = np.frombuffer(self.ttst_gap, dtype=np.float64)
        out["ttst_gap_mean_s"] = float(gap.mean()) if gap.size else float("nan")
        out["ttst_gap_p50_s"] = float(np.percentile(gap, 50)) if gap.size else float("nan")
        t = np.frombuffer(self.attn_t, dtype=np.float64)
        ratio = np.frombuffer(self.attn_ratio, dtype=np.float64)
        first = ratio[t <= 0.05 * end] if end > 0 else ratio[:0]
        out["attn_balance_first5"] = float(first.mean()) if first.size else float("nan")
        out["attn_balance_mean"] = float(ratio.mean()) if ratio.size else float("nan")
        out["de_attn_balance_mean"] = float(np.mean(self.de_ratio)) if len(self.de_ratio) else float("nan")
        arrivals = np.array([float(getattr(tr, "arrival", 0.0)) if sc.mode == "online" else 0.0
                             for tr in sc.trajectories], dtype=np.float64)
        done = np.array(sim.agent_done, dtype=np.float64)
        lens = np.array([sum(a + g for a, g in turns) for turns in sim.turns], dtype=np.float64)
        mean_len = float(lens.mean()) if lens.size else 0.0
        if sc.mode == "online":
            w0, w1 = float(sc.warmup_s), float(end)
            span = w1 - w0
            if span > 0:
                stop = np.where(done >= 0, done, w1)
                alive = np.clip(np.minimum(stop, w1) - np.maximum(arrivals, w0), 0.0, None).sum() / span
                lam = float(((arrivals >= w0) & (arrivals < w1)).sum()) / span
                jct = alive / lam if lam > 0 else float("nan")
            else:
                alive, lam, jct = float("nan"), float("nan"), float("nan")
            out["agents_alive_mean"] = float(alive)
            out["arrival_aps"] = lam
            out["jct_mean_s"] = float(jct)
            ws_tok = lam * jct * mean_len / 2.0 if lam == lam and jct == jct else float("nan")
        else:
            out["jct_mean_s"] = float(done.mean()) if done.size and bool(np.all(done >= 0)) else float("nan")
            ws_tok = float("nan")
        out["working_set_tokens"] = ws_tok
        out["working_set_bytes"] = ws_tok * float(sc.kv_bytes_per_token)
        out["total_len_mean"] = mean_len
        return out
