"""Inference traffic on the compute NICs: the MoE all-to-all of every PE forward and DE decode step (paper 5.1).

The compute model says how many bytes a forward puts on the GPU's compute NIC per direction
(``prefill_comm_bytes(new_tokens)``, ``decode_comm_bytes(n)``; zero when the EP group is one node, where the
all-to-all runs on NVLink). The all-to-all moves in bursts, one per layer, at line rate; two micro-batches overlap
one's communication with the other's compute (DAY6), so the forward takes ``max(compute, bytes / burst rate)``.
With traffic isolation (the traffic manager, default) a burst gets the line (HIGH before KV); without it
(``traffic_isolation=False``, one class) it is one flow among the KV flows active on the link, ``bw / (n_kv + 1)``,
and a forward whose all-to-all cannot keep up is stretched (the paper's point: without isolation, KV traffic
inflates TPOT). KV loses the all-to-all's average rate (bytes / forward time): it is a HIGH reservation on the
engine's CNIC read and write links while the forward runs.

The rate is fixed when the forward (or a decode batch's step time) is computed; KV flows that start later slow
down under isolation but do not re-stretch a running forward without it (one evaluation per forward / per change
of a DE's batch).
"""

from __future__ import annotations

from typing import Any


def setup(sim: Any) -> None:
    """Set the isolation mode of every compute-NIC link and the per-DE reservation table."""
    sc = sim.sc
    iso = bool(getattr(sc, "traffic_isolation", True))
    for e in list(sim.pes) + list(sim.des):
        e.cnic_r.isolation = iso
        e.cnic_w.isolation = iso
    sim.de_high = [0.0] * len(sim.des)
    sim.ep_on = bool(getattr(sc, "ep_traffic", True)) and hasattr(sc.compute, "decode_comm_bytes")
    sim.high_stretch_s = 0.0  # compute seconds added by all-to-all that could not keep up


def _burst_time(eng: Any, nbytes: float) -> float:
    """Seconds the all-to-all's ``nbytes`` take at the burst rate the engine's CNIC gives HIGH traffic now."""
    lr, lw = eng.cnic_r, eng.cnic_w
    rate = min(lr.high_rate_for(lr.bw), lw.high_rate_for(lw.bw))
    return nbytes / rate if rate > 0 else 0.0


def prefill_start(sim: Any, b: Any, done: Any) -> None:
    """Start batch ``b``'s compute now; ``done(b)`` runs when it ends (reservation released)."""
    pe = b.pe
    rate = 0.0
    if sim.ep_on and b.compute_s > 0:
        nbytes = sim.sc.compute.prefill_comm_bytes(sum(n for _, n in b.chunks))
        if nbytes > 0:
            t = _burst_time(pe, nbytes)
            if t > b.compute_s:
                sim.high_stretch_s += t - b.compute_s
                pe.compute_s += t - b.compute_s
                b.compute_s = t
            rate = nbytes / b.compute_s
            pe.cnic_r.reserve(rate)
            pe.cnic_w.reserve(rate)
    sim.loop.after(b.compute_s, _prefill_end, pe, rate, done, b)


def _prefill_end(pe: Any, rate: float, done: Any, b: Any) -> None:
    if rate > 0:
        pe.cnic_r.release(rate)
        pe.cnic_w.release(rate)
    done(b)


def decode_step(sim: Any, de: Any, n: int, tau: float) -> float:
    """The step time of DE ``de`` with ``n`` requests and compute step ``tau``, its all-to-all reserved."""
    old = sim.de_high[de.idx]
    lr, lw = de.cnic_r, de.cnic_w
    if old > 0:  # released first (the burst rate below sees the links without it); rescheduled once, below
        lr.release(old, reschedule=False)
        lw.release(old, reschedule=False)
        sim.de_high[de.idx] = 0.0
    step = tau
    rate = 0.0
    if sim.ep_on and n > 0 and tau > 0:
        nbytes = sim.sc.compute.decode_comm_bytes(n)
        if nbytes > 0:
            step = max(tau, _burst_time(de, nbytes))
            rate = nbytes / step
    if rate > 0:
        lr.reserve(rate)
        lw.reserve(rate)
        sim.de_high[de.idx] = rate
    elif old > 0:
        lr._reschedule()
        lw._reschedule()
    return step
