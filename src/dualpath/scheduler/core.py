"""The global scheduler: a stateful but pure facade (no I/O, no clock) that the runtime and the simulator drive.

One call to :meth:`GlobalScheduler.schedule` is one fetch round over every PE and DE group. Requests are taken
from the global waiting queue strictly FIFO; for each head request, in this order:

1. its PE (Algorithm 1 with ``smart_assign``, else least-loaded), among the engines of the best class that take it
   (idle, or staying within beta: :func:`dualpath.scheduler.prefill.takes`); none -> the round ends;
2. its DE (the two-level scheme, else least-loaded among DEs whose free KV memory holds it); none -> the round
   ends and the request stays at the head (its PE is not charged);
3. its read side (:func:`dualpath.scheduler.path.decide_side`), from the PE node's and the DE node's read queues.

A request's ``hit`` is what was stored when it was submitted. A request that waited may find more: another
request with the same prefix finished meanwhile (public traces share prompts across sessions, and under a queue
the sharer is often still running at submission). With :attr:`GlobalScheduler.refresh_hit` set, the core asks it
for the hit as of now, once per request, as the request is assigned and before its side is chosen, so what was
stored while it waited is read instead of recomputed.

A request may also be better off waiting: another request computing the same prefix now will store it at its
decode start, and the waiting one then reads what it would otherwise compute a second time (requests of a public
trace that arrive together with one system prompt; SGLang's in-batch prefix-caching check does the same). With
:attr:`GlobalScheduler.hold` set, the core asks it, per round, for each request it reaches; a held request keeps
its place and the round goes on with the requests behind it. :attr:`GlobalScheduler.on_assign` tells the caller
of each assignment as it is made, so requests that arrive together are held on the first of them. At most
:attr:`GlobalScheduler.hold_scan` held requests are passed over in one round (the round ends there), so a round
costs O(assigned + hold_scan). The caller decides what is worth waiting for and for how long (callers track the
blocks being computed with :class:`dualpath.scheduler.inflight.InflightKeys`); the core only skips.

The paper leaves this sequencing open. We assign PE and DE together, at once, because the DE must be known
before the read starts (the DE read path reads into the DE's node) and its KV memory must be reserved before the
PE ships the prompt KV; the side needs both nodes. Stopping at the first request without a DE keeps the waiting
queue FIFO, which is stricter than the paper's DE private queues (there global FIFO is not preserved).

Algorithm 1 ranks the PEs of a class by ``tok``, their prompt tokens, which stands for their queued work only while
requests reuse a similar share of their prompt. In agentic traces they do not: a session's next turn (40K tokens,
39K of them stored) costs a fraction of a first prompt of the same length, so a turn sent to the PE with the fewest
tokens can wait behind a whole first prompt while another PE is almost free (on random traces that wait decided
the end of the run: ``benchmarks/never_lose_fuzz.py``). With :attr:`GlobalScheduler.pe_work` set, the core charges
each PE the work the caller predicts for the request (``EngineSnapshot.work``, in ``tok``'s unit) and ranks PEs by
that; classes, beta and the stay-within-beta rule still count tokens, as the paper's do. Without it, work is tokens
and the ranking is the paper's.

Within a round the core updates private copies of the snapshots (:class:`EngineLoad`): the PE's ``tok``/``seq``,
the DE's ``tok``/``seq``/``free_kv_tokens`` (``kv_need``), and the read queue of the node(s) that will read the
hit tokens (not for ``oracle``). So Algorithm 1's classes and the side choice see this round's earlier reads.

Phase 1 of the DE scheme routes requests lazily: the first window (at least as many head requests as the PEs could
take: tokens up to their summed headroom under beta, plus one per non-overloaded PE) is routed up front and gives each
group's Z; requests past it are routed on demand. A request that needs more KV memory than any DE group has
free blocks the queue until memory frees; the caller should reject requests larger than a DE's total KV memory.
Node ids are per role: a PE node and a DE node may share an id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from dualpath.errors import SchedulerError
from dualpath.scheduler.decode import (
    GroupRouter,
    LeastLoadedDE,
    commit_decode,
    pick_decode_engine,
    z_threshold,
)
from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.path import decide_side, side_tokens
from dualpath.scheduler.policies import Policy
from dualpath.scheduler.prefill import PrefillPicker, node_read_q
from dualpath.scheduler.state import Assignment, EngineLoad, EngineSnapshot, RequestInfo


class GlobalScheduler:
    """Global FIFO waiting queue + one decision function per fetch round."""

    def __init__(self, policy: Policy, params: SchedulerParams) -> None:
        self.policy = policy
        self.params = params
        self._queue: deque[RequestInfo] = deque()
        self._rids: set[int] = set()
        self.rr_counter = 0
        #: the hit of a waiting request as of now (stored-prefix tokens, at most its prompt), asked once as the
        #: request is assigned; None: the hit given at submit stands (see the module docstring)
        self.refresh_hit: Callable[[RequestInfo], int] | None = None
        #: whether a waiting request should wait this round (for a prefix another request is computing; see the
        #: module docstring); None: no request is held
        self.hold: Callable[[RequestInfo], bool] | None = None
        #: held requests passed over at most in one round
        self.hold_scan = 64
        #: called with each request as it is assigned, within the round (so ``hold`` sees this round's earlier
        #: assignments: requests that arrive together); None: not called
        self.on_assign: Callable[[RequestInfo], None] | None = None
        #: a request's work on its PE, what the PE's ``work`` is charged and Algorithm 1 ranks PEs by within a class
        #: (asked once per request, as it is assigned); None: its tokens (see the module docstring)
        self.pe_work: Callable[[RequestInfo], int] | None = None

    def submit(self, req: RequestInfo) -> None:
        """Append ``req`` to the global waiting queue."""
        if req.rid in self._rids:
            raise SchedulerError(f"request {req.rid} is already waiting")
        if min(req.context, req.append, req.hit, req.gen) < 0 or req.hit > req.prompt:
            raise SchedulerError(
                f"request {req.rid}: need 0 <= hit <= context + append and non-negative counts, got {req}"
            )
        self._queue.append(req)
        self._rids.add(req.rid)

    def waiting(self) -> int:
        return len(self._queue)

    def waiting_rids(self) -> list[int]:
        return [r.rid for r in self._queue]

    def cancel(self, rid: int) -> bool:
        """Remove a waiting request; False when it is not waiting."""
        if rid not in self._rids:
            return False
        self._queue = deque(r for r in self._queue if r.rid != rid)
        self._rids.discard(rid)
        return True

    def _refreshed(self, r: RequestInfo) -> RequestInfo:
        assert self.refresh_hit is not None
        hit = self.refresh_hit(r)
        if hit == r.hit:
            return r
        if isinstance(hit, bool) or not isinstance(hit, int) or not 0 <= hit <= r.prompt:
            raise SchedulerError(f"request {r.rid}: refresh_hit gave {hit!r}, need an int in 0..{r.prompt}")
        return replace(r, hit=hit)

    def _work(self, r: RequestInfo) -> int:
        assert self.pe_work is not None
        w = self.pe_work(r)
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise SchedulerError(f"request {r.rid}: pe_work gave {w!r}, need a non-negative int")
        return w

    def _window(self, pes: Sequence[EngineLoad], cands: _Candidates) -> int:
        beta = self.params.beta_tokens
        headroom = sum(max(0, beta - e.tok) for e in pes)
        n = sum(1 for e in pes if e.tok <= beta)
        cum = i = 0
        while (r := cands.get(i)) is not None:
            cum += r.tokens
            if cum > headroom:
                break
            n += 1
            i += 1
        return n

    def schedule(
        self, pe_groups: Sequence[Sequence[EngineSnapshot]], de_groups: Sequence[Sequence[EngineSnapshot]]
    ) -> list[Assignment]:
        """One fetch round: assignments for a FIFO prefix of the waiting queue, held requests passed over (the rest
        stays queued, in its order)."""
        pe_flat = [s for g in pe_groups for s in g]
        de_flat = [s for g in de_groups for s in g]
        if not self._queue or not pe_flat or not de_flat:
            return []
        pes = [EngineLoad.of(s) for s in pe_flat]
        de_groups_l = [[EngineLoad.of(s) for s in g] for g in de_groups]
        des = [e for g in de_groups_l for e in g]
        pe_rq = node_read_q(pe_flat)
        de_rq = node_read_q(de_flat)
        p, smart, bt = self.params, self.policy.smart_assign, self.params.block_tokens

        cands = _Candidates(self._queue, self.hold, self.hold_scan)
        router = GroupRouter(de_groups_l, p) if smart else None
        routed: list[int] = []
        z: list[float] = []
        if router is not None:
            queues: list[list[RequestInfo]] = [[] for _ in de_groups_l]
            for i in range(self._window(pes, cands)):
                r = cands.get(i)
                if r is None:
                    break
                g = router.route(r)
                if g is None:
                    break
                routed.append(g)
                queues[g].append(r)
            z = [z_threshold(g, q, p) for g, q in zip(de_groups_l, queues, strict=True)]

        picker = PrefillPicker(pes, pe_rq, p, use_read_q=smart)
        de_pick = None if smart else LeastLoadedDE(des, p)
        out: list[Assignment] = []
        i = -1
        while (r := cands.get(i + 1)) is not None:
            i += 1
            if out and cands.held_now(r):  # held on a request assigned earlier in this round
                if cands.held > cands.scan:
                    break
                if router is not None and i == len(routed):
                    routed.append(-1)  # (not routed: routed[] stays indexed by candidate)
                continue
            pe = picker.pick(r.tokens)
            if pe is None:
                break
            if router is not None:
                if i == len(routed):
                    g = router.route(r)
                    if g is None:
                        break
                    routed.append(g)
                de = pick_decode_engine(r, de_groups_l[routed[i]], z[routed[i]], p)
            else:
                assert de_pick is not None
                de = de_pick.pick(r)
            if de is None:
                break
            if self.refresh_hit is not None:
                r = self._refreshed(r)
            a = decide_side(
                r,
                pe.engine,
                de.engine,
                pe_rq.get(pe.node, 0),
                de_rq.get(de.node, 0),
                self.policy,
                self.rr_counter,
                bt,
            )
            self.rr_counter += 1
            if self.on_assign is not None:
                self.on_assign(r)
            pe.tok += r.tokens
            pe.work += r.tokens if self.pe_work is None else self._work(r)
            pe.seq += 1
            picker.touch(pe)
            commit_decode(de, r, p)
            if de_pick is not None:
                de_pick.touch(de)
            if not self.policy.oracle:
                pe_tok, de_tok = side_tokens(a, r, bt)
                if pe_tok:
                    pe_rq[pe.node] = pe_rq.get(pe.node, 0) + pe_tok
                    picker.touch_node(pe.node)
                de_rq[de.node] = de_rq.get(de.node, 0) + de_tok
            out.append(a)
        cands.take({a.rid for a in out}, self._rids)
        return out


class _Candidates:
    """The waiting queue as a round sees it: requests in FIFO order, the held ones passed over (at most ``scan`` of
    them), found lazily as the round reaches them."""

    def __init__(self, queue: deque[RequestInfo], hold: Callable[[RequestInfo], bool] | None, scan: int) -> None:
        self.queue = queue
        self.hold = hold
        self.scan = scan
        self.items: list[RequestInfo] = []
        self._it = iter(queue)  # the queue is not changed during a round (take runs after it)
        self.held = 0
        self.ended = False

    def get(self, i: int) -> RequestInfo | None:
        """The ``i``-th request not held, or None past the last one this round may reach."""
        items = self.items
        while len(items) <= i and not self.ended:
            r = next(self._it, None)
            if r is None:
                self.ended = True
                break
            if self.hold is not None and self.hold(r):
                self.held += 1
                if self.held > self.scan:
                    self.ended = True
                continue
            items.append(r)
        return items[i] if i < len(items) else None

    def held_now(self, r: RequestInfo) -> bool:
        """``hold`` asked again for a request found not held earlier in the round (assignments made since may hold
        it); counts it as held (the round ends past ``scan``)."""
        if self.hold is None or not self.hold(r):
            return False
        self.held += 1
        return True

    def take(self, assigned: set[int], rids: set[int]) -> None:
        """Remove the ``assigned`` requests from the queue; the others keep their place and order."""
        q = self.queue
        if not self.held:  # the assigned ones are the head of the queue
            for _ in range(len(assigned)):
                rids.discard(q.popleft().rid)
            return
        kept: list[RequestInfo] = []
        left = set(assigned)
        while left:
            r = q.popleft()
            if r.rid in left:
                left.discard(r.rid)
                rids.discard(r.rid)
            else:
                kept.append(r)
        q.extendleft(reversed(kept))
