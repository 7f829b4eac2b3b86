"""PE assignment: the paper's Algorithm 1 (section 7.2).

Each PE e is classified on ``tok_e`` and its node's read queue: C1 overloaded (``tok_e > beta``) never gets work,
C2 (``read_q <= alpha``) is preferred, then C3 (``read_q > alpha``); within a class the PE with the least queued
work wins: its unfinished tokens (the paper's ``tok_e``), or the work its caller predicts
(``EngineSnapshot.work``, :attr:`~dualpath.scheduler.core.GlobalScheduler.pe_work`). The waiting queue is served
FIFO and a fetch ends at the first request no PE can take.

Choices the paper leaves open, and what we chose:

* Classes are re-evaluated after every assignment (``tok_e`` grows by the request's tokens, so an engine can
  become overloaded within one fetch).
* An engine that has work takes a request only while its tokens stay within beta (:func:`takes`); an idle one takes
  any request, so a request larger than beta still runs. The paper's listing lets any engine under beta take any
  request, which piles a request onto an engine that has just taken a long prompt while another engine is about to
  free: on random small traces that wait decided the end of the run (``benchmarks/never_lose_fuzz.py``; DualPath
  runs below 0.99 of Basic 42 -> 11 of 1,500). Where beta is calibrated on a workload whose requests are far
  below it (the presets' agentic datasets) the rule never binds. A request goes to the engine with the least work
  among those of the best class that take it; the fetch ends at a request that no engine of that class takes
  (FIFO). Ranked by tokens this is the same as stopping where the chosen engine does not take it (an engine with
  more tokens would not take it either); ranked by work it is not, and stopping there starved the engines.
* ``tokens(r)`` is the whole prompt, context + append (``RequestInfo.tokens``).
* ``assign_prefill`` does not change read queues (it does not know the read side); the
  :class:`~dualpath.scheduler.core.GlobalScheduler` does, after choosing each request's side.
* Ties on work go to fewer ``seq_e``, then the lower engine id (deterministic).
* The simulator ranks by predicted work (``SimScenario.work_ranking``): an agent's next turn is mostly stored
  tokens and costs far less than a first prompt of the same length, so ``tok_e`` sent it to PEs about to compute a
  whole first prompt. Classes and beta still count tokens.
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
    engines: Sequence[EngineLoad], read_q: Mapping[int, int], params: SchedulerParams, tokens: int | None = None
) -> EngineLoad | None:
    """Algorithm 1's choice for the next request, or None when every PE is overloaded. With ``tokens``, the choice
    among the engines of the best class that take a request of that many tokens (:func:`takes`), None when none
    of them does."""
    keyed = [((cls, e.work, e.seq, e.engine), e) for e in engines
             if (cls := classify(e.tok, read_q.get(e.node, 0), params)) != C1_OVERLOADED]
    if not keyed:
        return None
    best_cls = min(k[0] for k, _ in keyed)
    ok = [(k, e) for k, e in keyed if k[0] == best_cls and (tokens is None or takes(e, tokens, params))]
    return min(ok, key=lambda ke: ke[0])[1] if ok else None


def takes(e: EngineLoad, tokens: int, params: SchedulerParams) -> bool:
    """Whether engine ``e``, chosen for a request of ``tokens``, takes it: idle, or staying within beta."""
    return e.tok == 0 or e.tok + tokens <= params.beta_tokens


def pick_least_loaded(
    engines: Sequence[EngineLoad], params: SchedulerParams, tokens: int | None = None
) -> EngineLoad | None:
    """Simple assignment (``smart_assign=False``): least work (tokens, unless the caller reports work) among PEs that
    are not overloaded and, with ``tokens``, take a request of that many tokens."""
    ok = [e for e in engines if e.tok <= params.beta_tokens and (tokens is None or takes(e, tokens, params))]
    return min(ok, key=lambda e: (e.work, e.seq, e.engine)) if ok else None


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
        e = picker.pick(r.tokens)
        if e is None:
            break
        e.tok += r.tokens
        e.work += r.tokens
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
            heapq.heappush(self._heap, (cls, e.work, e.seq, e.engine, self._ver[i], i))

    def touch(self, e: EngineLoad) -> None:
        i = self._idx[id(e)]
        self._ver[i] += 1
        self._push(i)

    def touch_node(self, node: int) -> None:
        if self.use_read_q:
            for i in self._by_node.get(node, ()):
                self._ver[i] += 1
                self._push(i)

    def pick(self, tokens: int | None = None) -> EngineLoad | None:
        """The choice (as :func:`pick_prefill_engine`): with ``tokens``, the first engine of the best class that
        takes a request of that many tokens, None when none of that class does."""
        h = self._heap
        while h:
            *_, ver, i = h[0]
            if ver == self._ver[i]:
                break
            heapq.heappop(h)
        else:
            return None
        e = self.engines[h[0][-1]]
        if tokens is None or takes(e, tokens, self.params):
            return e
        cls = h[0][0]
        skipped = []
        found: EngineLoad | None = None
        while h and h[0][0] == cls:
            item = heapq.heappop(h)
            if item[4] != self._ver[item[5]]:
                continue
            skipped.append(item)
            if takes(self.engines[item[5]], tokens, self.params):
                found = self.engines[item[5]]
                break
        for item in skipped:
            heapq.heappush(h, item)
        return found
