"""The scheduler driver: the async loop that feeds the pure :class:`GlobalScheduler` from running engines.

Clients call :meth:`SchedulerDriver.run_turn` (it implements :class:`dualpath.runtime.clients.TurnService`):
the driver looks the prompt up in storage (its hit length), submits a :class:`RequestInfo` to the global waiting
queue and waits. A single loop task pulls on behalf of every engine group, as the paper's leader engines do
(section 7.1): each round it takes the engines' snapshots (``seq``, ``tok``, their node's ``read_q``, free KV
memory), groups them by node, asks the core for assignments, and starts each assigned turn on the cluster with
its PE, DE, read side and split. The PE packs its own forward batches and chunks (``pack_forward_batch``) under
the compute quota as requests reach it.

A turn that shares at least ``inflight_prefix_min_tokens`` past its stored prefix with a turn being prefilled waits
for that prefix to be stored (the other turn's decode engine stores its prompt as its decode starts), at most
``inflight_prefix_wait_s``, and then reads it instead of computing it again: turns of a trace that arrive together
with one system prompt compute it once (:attr:`GlobalScheduler.hold`; a prefix that is being written as the turn
looks it up counts whole, its written blocks too). The driver registers the blocks each
assigned turn computes, and holds a turn while the blocks after its stored prefix are registered. This needs a
cluster that names its prompts' block keys (``prompt_keys``, ``block_tokens``) and stores prompts (``persists``,
if it says); over any other, no turn waits.
Where the cluster's ``stored_blocks`` answers synchronously (the in-process :class:`dualpath.cluster.Cluster`),
a held turn goes as soon as its lookup finds the blocks stored, and a turn's registration lasts until it ends.
Otherwise (the deployment's :class:`~dualpath.control.schedulerd.RemoteCluster`) the cluster says when a turn's
prompt is stored by calling :data:`turn_stored` (set for the turn's ``run_turn``); its blocks then count as
stored for later turns' decisions (:attr:`SchedulerDriver.known_stored`, bounded) and its registration ends.

DualPath's policies rank the PEs of a class by predicted work, not prompt tokens (``work_ranking``, on by default;
:mod:`dualpath.engine.work`): where the cluster offers ``work_predictor`` (the in-process cluster, the deployment)
and its model predicts time, its PEs report their work and the predictor becomes the core's ``pe_work``.

Rounds run every ``fetch_interval_s`` while requests wait; an idle loop sleeps until a request arrives, and a
finished turn (which frees engine capacity) wakes it early. Assigned turns run in the driver's task group: a
failure of one fails the caller's ``run_turn`` with that error; cancelling the driver cancels every turn.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import anyio
import numpy as np
from anyio.abc import TaskGroup

from dualpath.engine.request import TurnResult, TurnTimings
from dualpath.errors import EngineError, SchedulerError
from dualpath.scheduler.core import GlobalScheduler
from dualpath.scheduler.inflight import InflightKeys
from dualpath.scheduler.state import Assignment, EngineSnapshot, RequestInfo
from dualpath.types import PathKind

#: set by the driver for each turn's ``cluster.run_turn`` (None outside one): a cluster without a synchronous
#: ``stored_blocks`` calls it once the turn's prompt blocks are stored (see the module docstring)
turn_stored: ContextVar[Callable[[], None] | None] = ContextVar("turn_stored", default=None)

#: block keys remembered as stored from ``turn_stored`` calls (the oldest are forgotten first)
KNOWN_STORED_MAX = 1 << 16


class ClusterLike(Protocol):
    """What the driver needs from a cluster (the emulated :class:`dualpath.cluster.Cluster`, or a double)."""

    def snapshots(self) -> tuple[Sequence[EngineSnapshot], Sequence[EngineSnapshot]]: ...

    def lookup(self, prompt_ids: Any) -> int | Awaitable[int]: ...

    async def run_turn(
        self,
        session: int,
        prompt_ids: Any,
        gen_tokens: int,
        pe: int,
        de: int,
        path: PathKind,
        pe_blocks: int | None = None,
    ) -> Any: ...


def group_by_node(snaps: Sequence[EngineSnapshot]) -> list[list[EngineSnapshot]]:
    """Engine groups = nodes (paper 7.1), ordered by node id; engines within a group by engine id."""
    groups: dict[int, list[EngineSnapshot]] = {}
    for s in snaps:
        groups.setdefault(s.node, []).append(s)
    return [sorted(groups[n], key=lambda s: s.engine) for n in sorted(groups)]


@dataclass
class _Pending:
    session: int
    prompt_ids: Any
    gen: int
    hit: int
    t_submit: float
    done: anyio.Event = field(default_factory=anyio.Event)
    assignment: Assignment | None = None
    t_scheduled: float | None = None
    result: Any = None
    error: BaseException | None = None
    keys: list[Any] | None = None  # its prompt's block keys, and how many it may hit (prompt_keys), when asked
    usable: int = 0
    computing: list[Any] = field(default_factory=list)  # keys it computes, registered while it runs
    t_held: float | None = None  # when it first waited for a prefix being computed
    salt: str | None = None  # its cache salt (its blocks are keyed apart: kv/keys.py)

    @property
    def salted(self) -> dict[str, Any]:
        return _salted(self.salt)


def _salted(salt: str | None) -> dict[str, Any]:
    """The ``salt`` keyword of the cluster's calls for a turn (none without one: a double need not take it)."""
    return {} if salt is None else {"salt": salt}


@dataclass
class DriverStats:
    """Counters of the driver: rounds, assignments per read side, time spent inside the core."""

    rounds: int = 0
    assigned: int = 0
    held: int = 0  # turns that waited for a prefix another turn was computing
    paths: Counter[str] = field(default_factory=Counter)
    core_s: float = 0.0


def _outcome(p: _Pending, res: Any) -> TurnResult:
    """The cluster's :class:`TurnResult` with the driver's submission and scheduling instants (so ``ttft``
    includes the wait for the scheduler); anything else duck-typed (``token_ids``/``tokens``, ``timings``,
    ``link_bytes``/``bytes``, ...: a test double) is converted into one."""
    a = p.assignment
    assert a is not None
    if isinstance(res, TurnResult):
        res.session = p.session
        res.timings.t_submit = p.t_submit
        res.timings.t_scheduled = p.t_scheduled or 0.0
        return res
    tm = getattr(res, "timings", res)
    tokens = [int(t) for t in getattr(res, "token_ids", None) or getattr(res, "tokens", [])]
    t_second = getattr(tm, "t_second_token", None)
    link_bytes = getattr(res, "link_bytes", None) or getattr(res, "bytes", None) or {}
    timings = TurnTimings(
        t_submit=p.t_submit,
        t_scheduled=p.t_scheduled or 0.0,
        t_first_token=float(getattr(tm, "t_first_token", math.nan)),
        t_second_token=float(t_second) if t_second else 0.0,
        t_last_token=float(getattr(tm, "t_last_token", 0.0) or 0.0),
        t_done=float(getattr(tm, "t_done", 0.0) or time.perf_counter()),
    )
    hit = int(getattr(res, "hit_tokens", p.hit))
    return TurnResult(
        rid=int(getattr(res, "rid", 0)),
        session=p.session,
        token_ids=tokens,
        prompt_tokens=int(getattr(res, "prompt_tokens", len(p.prompt_ids))),
        hit_tokens=hit,
        stored_tokens=int(getattr(res, "stored_tokens", hit)),
        path=PathKind(getattr(res, "path", a.path)),
        pe=a.pe,
        de=a.de,
        timings=timings,
        link_bytes={str(k): int(v) for k, v in dict(link_bytes).items()},
    )


class SchedulerDriver:
    """Feeds ``scheduler`` from ``cluster`` and applies its decisions. Use as ``async with driver: ...``.

    ``max_request_tokens``: KV tokens (prompt + generation) the largest decode engine can hold; a request
    needing more is rejected at submission with :class:`EngineError` instead of blocking the queue forever.
    """

    def __init__(
        self,
        cluster: ClusterLike,
        scheduler: GlobalScheduler,
        *,
        fetch_interval_s: float = 0.005,
        max_request_tokens: int | None = None,
        inflight_prefix_min_tokens: int = 256,
        inflight_prefix_wait_s: float = 30.0,
        work_ranking: bool = True,
    ) -> None:
        if fetch_interval_s <= 0:
            raise SchedulerError(f"fetch_interval_s must be > 0, got {fetch_interval_s}")
        if inflight_prefix_min_tokens < 1 or inflight_prefix_wait_s < 0:
            raise SchedulerError("inflight_prefix_min_tokens must be >= 1 and inflight_prefix_wait_s >= 0, got "
                                 f"{inflight_prefix_min_tokens} and {inflight_prefix_wait_s}")
        self.cluster = cluster
        self.scheduler = scheduler
        self.fetch_interval_s = fetch_interval_s
        self.max_request_tokens = max_request_tokens
        self.stats = DriverStats()
        self._pending: dict[int, _Pending] = {}
        self._next_rid = 0
        if scheduler.refresh_hit is None and not inspect.iscoroutinefunction(getattr(cluster, "lookup", None)):
            scheduler.refresh_hit = self._refresh_hit  # a prefix stored while a turn waited is read (core docstring)
        self.inflight_prefix_min_tokens = inflight_prefix_min_tokens
        self.inflight_prefix_wait_s = inflight_prefix_wait_s
        self._computing = InflightKeys()  # block keys assigned turns compute (until stored, or they end)
        self._block_tokens = int(getattr(cluster, "block_tokens", 0) or 0)
        #: the cluster answers ``stored_blocks`` synchronously (else: turn_stored calls and known_stored)
        self._sync_stored = callable(getattr(cluster, "stored_blocks", None))
        self.known_stored: OrderedDict[Any, None] = OrderedDict()
        if (self._block_tokens > 0 and inflight_prefix_wait_s > 0 and scheduler.hold is None
                and getattr(cluster, "persists", True)  # (nothing stored: no turn would ever find the prefix)
                and scheduler.on_assign is None and callable(getattr(cluster, "prompt_keys", None))
                and scheduler.refresh_hit == (self._refresh_hit if self._sync_stored else None)):
            scheduler.hold, scheduler.on_assign = self._hold, self._on_assign
            if not self._sync_stored:  # blocks known stored since submission count for the side
                scheduler.refresh_hit = self._refresh_known
        self._wake = anyio.Event()
        self._tg: TaskGroup | None = None
        self.work_ranking = work_ranking and scheduler.pe_work is None and scheduler.policy.smart_assign

    async def _rank_by_work(self) -> None:
        """DualPath's PE ranking by predicted work (module docstring): the cluster's PEs report their work and its
        predictor charges each assignment. A cluster without one, or whose model predicts no time, ranks by
        tokens."""
        make = getattr(self.cluster, "work_predictor", None)
        if not self.work_ranking or not callable(make):
            return
        pred = await anyio.to_thread.run_sync(make)  # (a real model's time model may calibrate first)
        if pred is not None:
            self.scheduler.pe_work = pred

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def __aenter__(self) -> SchedulerDriver:
        await self._rank_by_work()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._loop, name="scheduler-driver")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._tg.__aexit__(et, exc, tb)
        finally:
            self._tg = None
            for p in self._pending.values():
                if not p.done.is_set():
                    p.error = p.error or EngineError("the scheduler driver stopped")
                    p.done.set()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished (waiting or running)."""
        return len(self._pending)

    # --- TurnService -------------------------------------------------------------------------------------
    async def run_turn(self, session: int, prompt_ids: Any, gen_tokens: int, *, salt: str | None = None) -> TurnResult:
        """Schedule one turn and return when its last token is out (``ttft`` counts from this call). ``salt``: its
        cache salt (it shares stored and in-flight prefixes only with turns of the same salt; the cluster's
        ``lookup``, ``prompt_keys`` and ``run_turn`` get it)."""
        if self._tg is None:
            raise SchedulerError("the driver is not running (use `async with driver:`)")
        prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
        n = int(prompt_ids.size)
        if n == 0 or gen_tokens < 1:
            raise SchedulerError(f"session {session}: a turn needs a prompt and >= 1 generated token")
        if self.max_request_tokens is not None and n + gen_tokens > self.max_request_tokens:
            raise EngineError(
                f"session {session}: a turn of {n} prompt + {gen_tokens} generated tokens needs more KV memory "
                f"than a decode engine holds ({self.max_request_tokens} tokens)"
            )
        t_submit = time.perf_counter()
        hit = self.cluster.lookup(prompt_ids, **_salted(salt))
        if inspect.isawaitable(hit):
            hit = await hit
        hit = min(int(hit), n)
        rid = self._next_rid
        self._next_rid += 1
        p = _Pending(session, prompt_ids, gen_tokens, hit, t_submit, salt=salt)
        self._pending[rid] = p
        try:
            self.scheduler.submit(RequestInfo(rid, context=hit, append=n - hit, hit=hit, gen=gen_tokens))
            self._wake.set()
            await p.done.wait()
        except BaseException:
            self._pending.pop(rid, None)
            self.scheduler.cancel(rid)
            raise
        self._pending.pop(rid, None)
        if p.error is not None:
            raise p.error
        return _outcome(p, p.result)

    def _refresh_hit(self, r: RequestInfo) -> int:
        """The core's ``refresh_hit`` over an in-process cluster: the turn's stored prefix as of its assignment."""
        p = self._pending.get(r.rid)
        if p is None:
            return r.hit
        if self.scheduler.hold == self._hold and self._sync_stored:  # the prompt's keys are known (hashed once)
            keys = self._prompt_keys(p)
            p.hit = min(self.cluster.stored_blocks(keys[:p.usable]) * self._block_tokens,  # type: ignore[attr-defined]
                        r.prompt)
            return p.hit
        hit = self.cluster.lookup(p.prompt_ids, **p.salted)
        if inspect.isawaitable(hit):  # a lookup that needs the loop: the hit given at submit stands
            close = getattr(hit, "close", None)
            if close is not None:
                close()
            return r.hit
        p.hit = min(int(hit), r.prompt)
        return p.hit

    def _refresh_known(self, r: RequestInfo) -> int:
        """The core's ``refresh_hit`` over a cluster without a synchronous lookup: the hit at submission, or the
        prefix known stored since (turns that said their prompt was stored), whichever is longer."""
        p = self._pending.get(r.rid)
        if p is None:
            return r.hit
        p.hit = min(max(r.hit, self._stored_prefix(p, r.hit) * self._block_tokens), r.prompt)
        return p.hit

    def _prompt_keys(self, p: _Pending) -> list[Any]:
        if p.keys is None:
            keys, usable = self.cluster.prompt_keys(p.prompt_ids, **p.salted)  # type: ignore[attr-defined]
            p.keys, p.usable = list(keys), int(usable)
        return p.keys

    def _stored_prefix(self, p: _Pending, hit: int) -> int:
        """Blocks of the turn's prompt stored now (the cluster's lookup), or known stored (its hit, then the
        blocks of turns that said their prompt was stored)."""
        keys = self._prompt_keys(p)
        if self._sync_stored:
            return int(self.cluster.stored_blocks(keys[:p.usable]))  # type: ignore[attr-defined]
        k = min(hit // self._block_tokens, p.usable)
        known = self.known_stored
        while k < p.usable and keys[k] in known:
            k += 1
        return k

    def _hold(self, r: RequestInfo) -> bool:
        """The core's ``hold`` (module docstring): the turn's next blocks past its stored prefix, at least
        ``inflight_prefix_min_tokens`` of them, are being computed by an assigned turn, and it has not waited
        ``inflight_prefix_wait_s`` yet."""
        p = self._pending.get(r.rid)
        if p is None or not self._computing:
            return False
        keys = self._prompt_keys(p)
        stored = self._stored_prefix(p, r.hit)
        n = self._computing.run(keys, stored, p.usable)
        if n == 0:
            return False
        # a prefix being written right now is stored in part: its blocks already written (still registered by
        # the turn that computed them) count toward the threshold, so a turn that looks up mid-write still waits
        # for the rest (a few blocks past a half-written 300-token prefix are worth the write's tail)
        lead = 0
        while lead < stored and keys[stored - lead - 1] in self._computing:
            lead += 1
        if (n + lead) * self._block_tokens < self.inflight_prefix_min_tokens:
            return False
        now = time.perf_counter()
        if p.t_held is None:
            p.t_held = now
            self.stats.held += 1
        return now - p.t_held < self.inflight_prefix_wait_s

    def _on_assign(self, r: RequestInfo) -> None:
        """The core's ``on_assign``: register the blocks the turn computes (past its hit, which our
        ``refresh_hit`` has just made its stored or known-stored prefix)."""
        p = self._pending.get(r.rid)
        if p is None:
            return
        p.computing = self._prompt_keys(p)[r.hit // self._block_tokens:]
        self._computing.add(p.computing)

    def _release(self, p: _Pending) -> None:
        self._computing.remove(p.computing)
        p.computing = []

    def _stored(self, p: _Pending) -> None:
        """``turn_stored`` of one turn: its prompt's blocks are stored (remembered), its registration ends."""
        if p.keys is not None:
            known = self.known_stored
            for key in p.keys:
                known[key] = None
                known.move_to_end(key)
            while len(known) > KNOWN_STORED_MAX:
                known.popitem(last=False)
        self._release(p)
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------------------
    def schedule_once(self) -> list[Assignment]:
        """One fetch round over every PE and DE group; starts each assigned turn."""
        assert self._tg is not None
        pe_snaps, de_snaps = self.cluster.snapshots()
        t0 = time.perf_counter()
        out = self.scheduler.schedule(group_by_node(pe_snaps), group_by_node(de_snaps))
        now = time.perf_counter()
        self.stats.core_s += now - t0
        self.stats.rounds += 1
        for a in out:
            p = self._pending.get(a.rid)
            if p is None:  # cancelled between submit and schedule
                continue
            p.assignment = a
            p.t_scheduled = now
            self.stats.assigned += 1
            self.stats.paths[a.path.value] += 1
            self._tg.start_soon(self._execute, p, name=f"turn-{a.rid}")
        return out

    async def _loop(self) -> None:
        while True:
            if self.scheduler.waiting() == 0:
                await self._wake.wait()
            self._wake = anyio.Event()
            self.schedule_once()
            # pull period: gives started turns time to register with their engines before the next round
            await anyio.sleep(self.fetch_interval_s)
            if self.scheduler.waiting() and not self._wake.is_set():
                with anyio.move_on_after(self.fetch_interval_s * 4):
                    await self._wake.wait()

    async def _execute(self, p: _Pending) -> None:
        a = p.assignment
        assert a is not None
        token = turn_stored.set(lambda: self._stored(p)) if p.computing and not self._sync_stored else None
        try:
            p.result = await self.cluster.run_turn(
                p.session, p.prompt_ids, p.gen, a.pe, a.de, a.path, a.pe_blocks, **p.salted
            )
        except Exception as exc:  # the caller's run_turn raises it
            p.error = exc
        finally:
            if token is not None:
                turn_stored.reset(token)
            if p.computing and token is not None and p.error is None:
                self._stored(p)  # a turn that ended well stored its prompt: as if it had said so
            elif p.computing:
                self._release(p)
            p.done.set()
            self._wake.set()
