"""Intra-engine batching for prefill (paper section 7.5).

A PE packs its pending requests FIFO into a forward batch while the predicted attention time stays within a
compute quota (300 ms in the paper). The first request that does not fit is cut: its chunk size is binary-searched
down to the largest that fits, and the rest waits for later batches (chunked prefill).

Choices the paper leaves open, and what we chose:

* The quota bounds the summed predicted attention time of one forward pass (all layers), not one layer: this
  reading matches the paper's measured TTFT. Pass a per-layer profile to get the other reading.
* Attention cost of computing ``new`` tokens over ``cached`` ones is causal:
  ``pairs = new * cached + new * (new + 1) / 2`` query-key pairs, times ``4 * n_layers * n_heads * head_dim``
  FLOPs (QK^T and PV), mapped to seconds linearly (:class:`ComputeProfile`); a profiled curve can be passed as
  ``time_fn`` instead.
* Progress is guaranteed: if even one token of the head request exceeds the quota, the batch holds that one
  token. Packing stops at the first request that had to be cut.
* ``min_tokens`` (ours, the never-lose rule): the quota never cuts a batch below ``min_tokens`` new tokens, the
  batch size at which the engine's prefill throughput saturates. Without it, long cached contexts make the
  quota pack a few hundred new tokens per forward, and a PE spends up to 10 % more time on the same work than
  a size-only packer (Basic) does; see docs/simulator.md, "Never lose". Nor does it leave a tail below
  ``min_tokens``: when cutting the last queued request would leave fewer than ``min_tokens`` of it for later, the
  batch takes the whole request (if ``max_tokens`` allows), since nothing queued behind that tail would fill its
  forward (a lone 7K-token request cut into 6,000 + 955 took 9 % longer). With requests queued behind it, the
  tail joins their batch and the quota keeps its hold on attention balance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dualpath.errors import SchedulerError
from dualpath.scheduler.state import Chunk, ForwardBatch


@dataclass(frozen=True)
class ComputeProfile:
    """Maps attention work to seconds: ``overhead_s + per_token_s * new + attn_flops / flops_per_s``."""

    n_layers: int
    n_heads: int
    head_dim: int
    flops_per_s: float
    per_token_s: float = 0.0
    overhead_s: float = 0.0

    def attn_flops(self, cached: int, new: int) -> float:
        pairs = new * cached + new * (new + 1) / 2
        return 4.0 * self.n_layers * self.n_heads * self.head_dim * pairs


@dataclass(frozen=True, slots=True)
class PendingPrefill:
    """A request waiting on a PE: ``cached`` tokens have KV (hit + earlier chunks), ``remaining`` to compute."""

    rid: int
    cached: int
    remaining: int


def attention_time(cached: int, new: int, profile: ComputeProfile) -> float:
    """Predicted attention time (s) of computing ``new`` tokens on top of ``cached`` ones."""
    if new <= 0:
        return 0.0
    return (
        profile.overhead_s + profile.per_token_s * new + profile.attn_flops(cached, new) / profile.flops_per_s
    )


def pack_forward_batch(
    pending: Sequence[PendingPrefill],
    quota_s: float,
    time_fn: Callable[[int, int], float],
    max_tokens: int | None = None,
    min_tokens: int = 0,
    more_queued: bool = False,
) -> ForwardBatch:
    """Pack ``pending`` (FIFO) into one forward batch under ``quota_s`` (and ``max_tokens`` new tokens if set);
    the quota does not cut the batch below ``min_tokens`` new tokens, nor leave the last request a tail shorter
    than that (``more_queued``: requests wait beyond ``pending``, so its last one is not the queue's last).

    ``time_fn(cached, new)`` must be non-decreasing in ``new``.
    """
    if max_tokens is not None and max_tokens < 1:
        raise SchedulerError(f"max_tokens must be >= 1, got {max_tokens}")
    batch = ForwardBatch()
    used = 0.0
    budget_tok = max_tokens
    last = -1 if more_queued else len(pending) - 1
    for i, p in enumerate(pending):
        if p.remaining <= 0:
            raise SchedulerError(f"request {p.rid} has no tokens left to prefill")
        limit = p.remaining if budget_tok is None else min(p.remaining, budget_tok - batch.new_tokens)
        if limit <= 0:
            break
        floor = max(0, min(limit, min_tokens - batch.new_tokens))
        if limit == p.remaining and (limit <= floor or used + time_fn(p.cached, limit) <= quota_s):
            batch.chunks.append(Chunk(p.rid, p.cached, limit))
            used += time_fn(p.cached, limit)
            continue
        # largest n in [floor, limit] with used + time_fn(cached, n) <= quota (floor if none)
        lo, hi = floor, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if used + time_fn(p.cached, mid) <= quota_s:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0 and not batch.chunks:
            lo = 1
        if min_tokens > 0 and i == last and limit == p.remaining and 0 < limit - lo < min_tokens:
            lo = limit  # no tail below the floor: nothing queued behind it would fill that forward
        if lo > 0:
            batch.chunks.append(Chunk(p.rid, p.cached, lo))
        break
    return batch


def advance(pending: Sequence[PendingPrefill], batch: ForwardBatch) -> list[PendingPrefill]:
    """``pending`` after ``batch`` ran: chunked requests move forward, finished ones leave; order is kept."""
    done = {c.rid: c for c in batch.chunks}
    out: list[PendingPrefill] = []
    for p in pending:
        c = done.get(p.rid)
        if c is None:
            out.append(p)
        elif c.new < p.remaining:
            out.append(PendingPrefill(p.rid, p.cached + c.new, p.remaining - c.new))
    return out
