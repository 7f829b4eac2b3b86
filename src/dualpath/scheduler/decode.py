"""DE assignment: the paper's two-level scheme (section 7.3).

Phase 1 (across groups; a group = the DEs of one node): each request goes to the group whose summed ``tok`` is
smallest. Phase 2 (within a group): R = the head of the group's private queue that fits the group's summed free
KV memory; ``Z = z_factor * (sum_{r in R} len_r + sum_e tok_e) / |E|``. For the head request, among DEs with
enough free KV memory, a "low-token" DE has ``tok_e + len_r <= Z``: pick the low-token DE with the fewest
requests, else the DE with the fewest tokens. If no DE of the group fits, the group stops.

Choices the paper leaves open, and what we chose:

* A request reserves ``kv_need = ceil((prompt + gen) / block) * block`` tokens of KV on its DE
  (:meth:`SchedulerParams.kv_need`): the whole decode footprint, so a DE is never over-committed. ``len_r`` (for
  Z and ``tok``) is the prompt, ``RequestInfo.tokens``.
* Phase 1 only routes a request to groups whose summed free KV memory (less what this round already routed
  there) can hold it; the paper routes blindly and lets the group's private queue wait. A request that no group
  can hold ends phase 1 (later requests stay queued), which keeps the queue FIFO.
* Z is computed once per group per round from the requests phase 1 routed to it, as the paper does per fetch.
* Ties: fewer ``seq``/``tok`` as stated, then fewer tokens/requests, then the lower engine id.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.state import EngineLoad, EngineSnapshot, RequestInfo


class GroupRouter:
    """Phase 1 state: summed ``tok`` and summed free KV memory per group, updated as requests are routed."""

    def __init__(self, groups: Sequence[Sequence[EngineLoad]], params: SchedulerParams) -> None:
        self.params = params
        self.g_tok = [sum(e.tok for e in g) for g in groups]
        self.g_free = [sum(e.free_kv_tokens for e in g) if g else -1 for g in groups]

    def route(self, r: RequestInfo) -> int | None:
        """The group for ``r`` (fewest summed tokens among groups that can hold it), or None."""
        need = self.params.kv_need(r.tokens, r.gen)
        best: int | None = None
        for i, free in enumerate(self.g_free):
            if free >= need and (best is None or self.g_tok[i] < self.g_tok[best]):
                best = i
        if best is not None:
            self.g_tok[best] += r.tokens
            self.g_free[best] -= need
        return best


def route_groups(
    waiting: Sequence[RequestInfo], groups: Sequence[Sequence[EngineLoad]], params: SchedulerParams
) -> list[int]:
    """Phase 1: the group index of each request of a FIFO prefix of ``waiting`` (shorter when one cannot fit)."""
    router = GroupRouter(groups, params)
    out: list[int] = []
    for r in waiting:
        g = router.route(r)
        if g is None:
            break
        out.append(g)
    return out


def z_threshold(
    group: Sequence[EngineLoad], private_queue: Sequence[RequestInfo], params: SchedulerParams
) -> float:
    """Phase 2's high-token threshold Z for one group and its private queue."""
    if not group:
        return 0.0
    free = sum(e.free_kv_tokens for e in group)
    r_len = 0
    for r in private_queue:
        need = params.kv_need(r.tokens, r.gen)
        if need > free:
            break
        free -= need
        r_len += r.tokens
    return params.z_factor * (r_len + sum(e.tok for e in group)) / len(group)


def pick_decode_engine(
    req: RequestInfo, group: Sequence[EngineLoad], z: float, params: SchedulerParams
) -> EngineLoad | None:
    """Phase 2's choice for ``req`` within one group, or None when no DE has enough free KV memory."""
    need = params.kv_need(req.tokens, req.gen)
    fit = [e for e in group if e.free_kv_tokens >= need]
    if not fit:
        return None
    low = [e for e in fit if e.tok + req.tokens <= z]
    if low:
        return min(low, key=lambda e: (e.seq, e.tok, e.engine))
    return min(fit, key=lambda e: (e.tok, e.seq, e.engine))


def pick_least_loaded_de(
    req: RequestInfo, engines: Sequence[EngineLoad], params: SchedulerParams
) -> EngineLoad | None:
    """Simple assignment (``smart_assign=False``): fewest tokens among all DEs whose free KV memory holds ``req``."""
    need = params.kv_need(req.tokens, req.gen)
    fit = [e for e in engines if e.free_kv_tokens >= need]
    return min(fit, key=lambda e: (e.tok, e.seq, e.engine)) if fit else None


def commit_decode(e: EngineLoad, req: RequestInfo, params: SchedulerParams) -> None:
    """Charge ``req`` to the private copy of its DE."""
    e.tok += req.tokens
    e.seq += 1
    e.free_kv_tokens -= params.kv_need(req.tokens, req.gen)


def assign_decode(
    waiting: Sequence[RequestInfo], groups: Sequence[Sequence[EngineSnapshot]], params: SchedulerParams
) -> list[tuple[int, int]]:
    """The two-level scheme over ``waiting``: ``(rid, engine)`` in waiting order.

    As in the paper, global FIFO is not preserved: a group stops at its first request that fits none of its DEs
    while other groups go on. (The :class:`~dualpath.scheduler.core.GlobalScheduler` stops the whole round there
    instead, to keep the prefill queue FIFO.)
    """
    loads = [[EngineLoad.of(s) for s in g] for g in groups]
    routed = route_groups(waiting, loads, params)
    queues: list[list[RequestInfo]] = [[] for _ in groups]
    for r, gi in zip(waiting, routed, strict=False):
        queues[gi].append(r)
    chosen: dict[int, int] = {}
    for gi, q in enumerate(queues):
        z = z_threshold(loads[gi], q, params)
        for r in q:
            e = pick_decode_engine(r, loads[gi], z, params)
            if e is None:
                break
            commit_decode(e, r, params)
            chosen[r.rid] = e.engine
    return [(r.rid, chosen[r.rid]) for r in waiting if r.rid in chosen]


class LeastLoadedDE:
    """:func:`pick_least_loaded_de` over a heap (lazy deletion); call :meth:`touch` after charging an engine."""

    def __init__(self, engines: Sequence[EngineLoad], params: SchedulerParams) -> None:
        self.engines = list(engines)
        self.params = params
        self._ver = [0] * len(self.engines)
        self._idx = {id(e): i for i, e in enumerate(self.engines)}
        self._heap = [(e.tok, e.seq, e.engine, 0, i) for i, e in enumerate(self.engines)]
        heapq.heapify(self._heap)

    def touch(self, e: EngineLoad) -> None:
        i = self._idx[id(e)]
        self._ver[i] += 1
        heapq.heappush(self._heap, (e.tok, e.seq, e.engine, self._ver[i], i))

    def pick(self, req: RequestInfo) -> EngineLoad | None:
        need = self.params.kv_need(req.tokens, req.gen)
        skipped = []
        found: EngineLoad | None = None
        while self._heap:
            item = heapq.heappop(self._heap)
            i = item[-1]
            if item[3] != self._ver[i]:
                continue
            skipped.append(item)
            if self.engines[i].free_kv_tokens >= need:
                found = self.engines[i]
                break
        for item in skipped:
            heapq.heappush(self._heap, item)
        return found
