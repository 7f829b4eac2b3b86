"""PE assignment: the paper's Algorithm 1 (section 7.2).

Each PE e is classified on ``tok_e`` and its node's read queue: C1 overloaded (``tok_e > beta``) never gets work,
C2 (``read_q <= alpha``) is preferred, then C3 (``read_q > alpha``); within a class the PE with the fewest
unfinished tokens wins. The waiting queue is served FIFO and a fetch ends at the first request no PE can take.

Choices the paper leaves open, and what we chose:

* Classes are re-evaluated after every assignment (``tok_e`` grows by the request's tokens, so an engine can
  become overloaded within one fetch).
* An engine that has work takes a request only while its tokens stay within beta (:func:`takes`); an idle one takes
  any request, so a request larger than beta still runs. The paper's listing lets any engine under beta take any
  request, which piles a request onto an engine that has just taken a long prompt while another engine is about to
  free: on random small traces that wait decided the end of the run (``benchmarks/never_lose_fuzz.py``; DualPath
  runs below 0.99 of Basic 42 -> 11 of 1,500). Where beta is calibrated on a workload whose requests are far
  below it (the presets' agentic datasets) the rule never binds. The fetch ends at a request the chosen engine does
  not take (FIFO).
* ``tokens(r)`` is the whole prompt, context + append (``RequestInfo.tokens``).
* ``assign_prefill`` does not change read queues (it does not know the read side); the
  :class:`~dualpath.scheduler.core.GlobalScheduler` does, after choosing each request's side.
* Ties on ``tok_e`` go to fewer ``seq_e``, then the lower engine id (deterministic).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.state import EngineLoad, EngineSnapshot, RequestInfo

C1_OVERLOADED, C2_SHORT_QUEUE, C3_LONG_QUEUE = 1, 2, 3


def classify(tok: int, read_q: int, params: SchedulerParams) -> int:
    """The Algorithm 1 class of an engine: 1 overloaded, 2 short read queue, 3 long read queue."""
    if tok > params.beta_tokens:
        return C1_OVERLOADED
    return C2_SHORT_QUEUE if read_q <= params.alpha_tokens else C3_LONG_QUEUE


def pick_prefill_engine(
    engines: Sequence[EngineLoad], read_q: Mapping[int, int], params: SchedulerParams
) -> EngineLoad | None:
    """Algorithm 1's choice for the next request, or None when every PE is overloaded."""
    best: EngineLoad | None = None
    best_key: tuple[int, int, int, int] | None = None
    for e in engines:
        cls = classify(e.tok, read_q.get(e.node, 0), params)
        if cls == C1_OVERLOADED:
            continue
        key = (cls, e.tok, e.seq, e.engine)
        if best_key is None or key < best_key:
            best, best_key = e, key
    return best


def takes(e: EngineLoad, tokens: int, params: SchedulerParams) -> bool:
    """Whether engine ``e``, chosen for a request of ``tokens``, takes it: idle, or staying within beta."""
    return e.tok == 0 or e.tok + tokens <= params.beta_tokens


def pick_least_loaded(engines: Sequence[EngineLoad], params: SchedulerParams) -> EngineLoad | None:
    """Simple assignment (``smart_assign=False``): fewest tokens among PEs that are not overloaded."""
    ok = [e for e in engines if e.tok <= params.beta_tokens]
    return min(ok, key=lambda e: (e.tok, e.seq, e.engine)) if ok else None


def node_read_q(engines: Sequence[EngineSnapshot]) -> dict[int, int]:
    """Read queue per node; engines of one node should report the same value, the largest one is kept."""
    out: dict[int, int] = {}
    for s in engines:
        out[s.node] = max(out.get(s.node, 0), s.read_q)
    return out


def assign_prefill(
    waiting: Sequence[RequestInfo], engines: Sequence[EngineSnapshot], params: SchedulerParams
) -> list[tuple[int, int]]:
    """Algorithm 1 over ``waiting`` (FIFO): ``(rid, engine)`` for the prefix of requests that get a PE."""
    loads = [EngineLoad.of(s) for s in engines]
    read_q = node_read_q(engines)
    picker = PrefillPicker(loads, read_q, params)
    out: list[tuple[int, int]] = []
    for r in waiting:
        e = picker.pick()
        if e is None or not takes(e, r.tokens, params):
            break
        e.tok += r.tokens
        e.seq += 1
        picker.touch(e)
        out.append((r.rid, e.engine))
    return out


class PrefillPicker:
    """Algorithm 1's choice in O(log n) per request: a heap of ``(class, tok, seq, engine)`` with lazy deletion.

    Same decisions as :func:`pick_prefill_engine` (``use_read_q=False``: as :func:`pick_least_loaded`). The caller
    mutates the :class:`EngineLoad` objects and then calls :meth:`touch` (an engine's tok/seq changed) or
    :meth:`touch_node` (a node's read queue in ``read_q`` changed).
    """

    def __init__(
        self,
        engines: Sequence[EngineLoad],
        read_q: Mapping[int, int],
        params: SchedulerParams,
        use_read_q: bool = True,
    ) -> None:
        self.engines = list(engines)
        self.read_q = read_q
        self.params = params
        self.use_read_q = use_read_q
        self._ver = [0] * len(self.engines)
        self._idx = {id(e): i for i, e in enumerate(self.engines)}
        self._by_node: dict[int, list[int]] = {}
        self._heap: list[tuple[int, int, int, int, int, int]] = []
        for i, e in enumerate(self.engines):
            self._by_node.setdefault(e.node, []).append(i)
            self._push(i)

    def _push(self, i: int) -> None:
        e = self.engines[i]
        rq = self.read_q.get(e.node, 0) if self.use_read_q else 0
        cls = classify(e.tok, rq, self.params)
        if cls != C1_OVERLOADED:
            heapq.heappush(self._heap, (cls, e.tok, e.seq, e.engine, self._ver[i], i))

    def touch(self, e: EngineLoad) -> None:
        i = self._idx[id(e)]
        self._ver[i] += 1
        self._push(i)

    def touch_node(self, node: int) -> None:
        if self.use_read_q:
            for i in self._by_node.get(node, ()):
                self._ver[i] += 1
                self._push(i)

    def pick(self) -> EngineLoad | None:
        h = self._heap
        while h:
            *_, ver, i = h[0]
            if ver == self._ver[i]:
                return self.engines[i]
            heapq.heappop(h)
        return None
