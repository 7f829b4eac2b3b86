"""Clients that replay agent trajectories against something that runs turns (paper appendix A.3).

* **Offline** (RL rollout): every agent starts at once; each sends its next turn when the previous one
  finished (no tool latency, no think time). The figure is the job completion time (JCT).
* **Online** (serving): agents arrive as a Poisson process of rate ``rate_aps``; each replays its trajectory
  from turn 0. SLOs bound TTFT and TPOT; :func:`capacity_search` finds the highest rate that meets them.

A turn's prompt is the session so far (every earlier prompt and generated token) plus the turn's appended
tokens, so the prefix of every turn is the previous turn's prompt and output: the KV the cluster persisted is a
hit for the next turn. Appended token ids are deterministic per (agent, turn) and distinct across agents, so
two agents never share a cached prefix (the paper's hits are within a trajectory only).

The clients know nothing about clusters: they drive any :class:`TurnService` (the scheduler driver, or a
test double).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import numpy as np

from dualpath.engine.request import TurnResult, TurnTimings
from dualpath.errors import WorkloadError
from dualpath.types import PathKind
from dualpath.workload.arrivals import SLO
from dualpath.workload.trajectory import Trajectory, Turn


class TurnOutcome(TurnResult):
    """Deprecated name of :class:`dualpath.TurnResult`, kept with its flat constructor.

    Builds a :class:`TurnResult` from the flat fields a remote client receives (``tokens``, ``t_submit``,
    ``t_first_token``, ...). Every turn API returns a :class:`TurnResult`; use that name in new code.
    """

    def __init__(
        self,
        session: Any,
        tokens: list[int],
        prompt_tokens: int,
        hit_tokens: int,
        t_submit: float,
        t_first_token: float,
        t_second_token: float | None,
        t_done: float,
        path: str = "pe",
        pe: int = 0,
        de: int = 0,
        t_scheduled: float | None = None,
        bytes: dict[str, int] | None = None,  # noqa: A002 - the historical field name
    ) -> None:
        timings = TurnTimings(t_submit=t_submit, t_first_token=t_first_token, t_second_token=t_second_token or 0.0,
                              t_done=t_done, t_scheduled=t_scheduled or 0.0)
        super().__init__(rid=0, session=session, token_ids=list(tokens), prompt_tokens=prompt_tokens,
                         hit_tokens=hit_tokens, stored_tokens=hit_tokens, path=PathKind(path), pe=pe, de=de,
                         timings=timings, link_bytes=dict(bytes or {}))


class TurnService(Protocol):
    """Something that runs one turn: prefill ``prompt_ids`` for ``session`` and generate ``gen_tokens``.

    It returns when the last token is out. Implementations: :class:`dualpath.scheduler.driver.SchedulerDriver`
    (a real emulated cluster) and test doubles.
    """

    async def run_turn(self, session: int, prompt_ids: np.ndarray, gen_tokens: int) -> TurnResult: ...


@dataclass
class TurnRecord:
    """One finished turn as the client saw it (index ``turn`` within agent ``agent``)."""

    agent: int
    turn: int
    append: int
    gen: int
    outcome: TurnResult


#: called after every finished turn (progress display, metrics recording)
TurnCallback = Callable[[TurnRecord], None]


def append_token_ids(agent: int, turn: int, spec: Turn, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The appended token ids of a turn: the trace's own, or deterministic pseudo-random ids."""
    if spec.append_ids is not None:
        return np.asarray(spec.append_ids, dtype=np.int64)
    rng = np.random.default_rng([seed, agent, turn])
    return rng.integers(1, vocab_size, size=spec.append, dtype=np.int64)


async def replay_agent(
    service: TurnService,
    agent: Trajectory,
    *,
    vocab_size: int,
    seed: int = 0,
    on_turn: TurnCallback | None = None,
    records: list[TurnRecord] | None = None,
    t_start: float | None = None,
) -> list[TurnRecord]:
    """Replay one agent's turns in order on ``service``; each turn's prompt = context + appended tokens.

    A trace turn with ``hash_ids`` (Mooncake) sends the trace's content instead: the prompt's tokens derived
    from its hash ids (:func:`dualpath.workload.traces.hash_prompt_tokens`), so storage sees the trace's reuse
    across sessions. ``t_start`` (online): a turn waits its ``think`` time after the previous turn ended (after
    the agent started, for the first), and a turn with a trace time ``at`` is not sent before ``t_start + at``.
    """
    from dualpath.workload.traces import hash_prompt_tokens

    out = records if records is not None else []
    context = np.zeros(0, dtype=np.int64)
    ctx_len = 0
    for i, spec in enumerate(agent.turns):
        if t_start is not None and spec.think:
            await anyio.sleep(spec.think)
        if t_start is not None and spec.at is not None:
            delay = t_start + spec.at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
        if spec.hash_ids is not None:
            # (blocks past a short hash-id list: this request's own content, never reused)
            prompt = hash_prompt_tokens(spec.hash_ids, ctx_len + spec.append, spec.hash_block, vocab_size,
                                        salt=(agent.tid, i))
        else:
            prompt = np.concatenate([context, append_token_ids(agent.tid, i, spec, vocab_size, seed)])
        ctx_len += spec.append + spec.gen
        outcome = await service.run_turn(agent.tid, prompt, max(1, spec.gen))
        rec = TurnRecord(agent.tid, i, spec.append, spec.gen, outcome)
        out.append(rec)
        if on_turn is not None:
            on_turn(rec)
        context = np.concatenate([prompt, np.asarray(outcome.tokens, dtype=np.int64)])
    return out


@dataclass
class ClientResult:
    """Every finished turn, and the wall span of the run (start of the first agent to the last turn's end)."""

    records: list[TurnRecord]
    t_start: float
    t_end: float
    agents_done: int
    agents_total: int

    @property
    def jct(self) -> float:
        return self.t_end - self.t_start


async def run_offline(
    service: TurnService,
    agents: Sequence[Trajectory],
    *,
    vocab_size: int,
    seed: int = 0,
    on_turn: TurnCallback | None = None,
) -> ClientResult:
    """All agents start together; each sends its next turn when its previous one finished.

    If cancelled, the records gathered so far stay in the list passed around; use :func:`run_offline_into`
    to keep them on cancellation.
    """
    res = ClientResult([], time.perf_counter(), 0.0, 0, len(agents))
    await run_offline_into(service, agents, res, vocab_size=vocab_size, seed=seed, on_turn=on_turn)
    return res


async def run_offline_into(
    service: TurnService,
    agents: Sequence[Trajectory],
    result: ClientResult,
    *,
    vocab_size: int,
    seed: int = 0,
    on_turn: TurnCallback | None = None,
) -> None:
    """:func:`run_offline` filling ``result`` as turns finish (so a cancelled run keeps what finished)."""
    result.t_start = time.perf_counter()
    result.agents_total = len(agents)

    def _cb(rec: TurnRecord) -> None:
        result.t_end = max(result.t_end, rec.outcome.t_done)
        if on_turn is not None:
            on_turn(rec)

    async def one(agent: Trajectory) -> None:
        await replay_agent(service, agent, vocab_size=vocab_size, seed=seed, on_turn=_cb, records=result.records)
        result.agents_done += 1

    async with anyio.create_task_group() as tg:
        for a in agents:
            tg.start_soon(one, a)
    result.t_end = max(result.t_end, time.perf_counter()) if result.records else time.perf_counter()


async def run_online_into(
    service: TurnService,
    agents: Sequence[Trajectory],
    arrivals: Sequence[float],
    result: ClientResult,
    *,
    vocab_size: int,
    seed: int = 0,
    on_turn: TurnCallback | None = None,
    stop_when: Callable[[TurnRecord], bool] | None = None,
) -> bool:
    """Agent ``i`` starts at ``arrivals[i]`` seconds after the start and replays its trajectory.

    ``stop_when(record)`` returning True stops the run early (an SLO is already lost); returns False then,
    True when every agent finished.
    """
    if len(arrivals) != len(agents):
        raise WorkloadError(f"{len(arrivals)} arrival times for {len(agents)} agents")
    result.t_start = time.perf_counter()
    result.agents_total = len(agents)
    stopped = False

    async with anyio.create_task_group() as tg:

        def _cb(rec: TurnRecord) -> None:
            nonlocal stopped
            result.t_end = max(result.t_end, rec.outcome.t_done)
            if on_turn is not None:
                on_turn(rec)
            if stop_when is not None and stop_when(rec) and not stopped:
                stopped = True
                tg.cancel_scope.cancel()

        async def one(agent: Trajectory, at: float) -> None:
            delay = result.t_start + at - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            await replay_agent(
                service, agent, vocab_size=vocab_size, seed=seed, on_turn=_cb, records=result.records,
                t_start=result.t_start,
            )
            result.agents_done += 1

        for a, at in zip(agents, arrivals, strict=True):
            tg.start_soon(one, a, float(at))
    if not result.records:
        result.t_end = time.perf_counter()
    return not stopped


@dataclass(frozen=True)
class SloCheck:
    """A run meets the SLO when at least ``attainment`` of its turns meet TTFT and TPOT bounds (``slo``).

    The paper stops a run once TTFT exceeds 4 s; :meth:`hopeless` is the early stop (a turn at twice the TTFT
    bound), :meth:`measure` the TTFT and TPOT at the attainment percentile.
    """

    slo: SLO
    attainment: float = 0.9

    def measure(self, records: Sequence[TurnRecord]) -> tuple[float, float]:
        pct = 100.0 * self.attainment
        ttft = [r.outcome.ttft for r in records]
        tpot = [t for r in records if (t := r.outcome.tpot) is not None]
        a = float(np.percentile(ttft, pct)) if ttft else math.nan
        b = float(np.percentile(tpot, pct)) if tpot else math.nan
        return a, b

    def fraction(self, records: Sequence[TurnRecord]) -> float:
        """The share of ``records`` meeting both bounds (0 for none): the run's SLO attainment."""
        if not records:
            return 0.0
        return sum(1 for r in records if self.slo.met(r.outcome.ttft, r.outcome.tpot)) / len(records)

    def met(self, records: Sequence[TurnRecord]) -> bool:
        return bool(records) and self.fraction(records) >= self.attainment

    def hopeless(self, rec: TurnRecord) -> bool:
        return rec.outcome.ttft > 2.0 * self.slo.ttft_s


@dataclass
class CapacityPoint:
    rate_aps: float
    ok: bool
    ttft_s: float
    tpot_s: float
    turns: int


@dataclass
class CapacityResult:
    """The highest rate found that meets the SLO (0.0 if none) and every rate tried, in order."""

    capacity_aps: float
    points: list[CapacityPoint]


async def capacity_search(
    trial: Callable[[float], Awaitable[tuple[bool, float, float, int]]],
    *,
    lo: float,
    hi: float,
    iterations: int = 5,
    rel_tol: float = 0.05,
) -> CapacityResult:
    """Bisect the arrival rate: ``trial(rate) -> (slo_met, ttft, tpot, turns)`` runs one fresh online run.

    ``hi`` is doubled (up to 4 times) while it still meets the SLO; then the bracket is bisected
    ``iterations`` times or until it is within ``rel_tol``. SLO attainment is assumed monotone in the rate.
    """
    if not 0 < lo < hi:
        raise WorkloadError(f"capacity search needs 0 < lo < hi, got lo={lo}, hi={hi}")
    points: list[CapacityPoint] = []

    async def probe(rate: float) -> bool:
        ok, ttft, tpot, n = await trial(rate)
        points.append(CapacityPoint(rate, ok, ttft, tpot, n))
        return ok

    if not await probe(lo):
        return CapacityResult(0.0, points)
    best = lo
    for _ in range(4):
        if not await probe(hi):
            break
        best, lo, hi = hi, hi, hi * 2
    else:
        return CapacityResult(best, points)
    for _ in range(iterations):
        if (hi - lo) <= rel_tol * hi:
            break
        mid = 0.5 * (lo + hi)
        if await probe(mid):
            best = lo = mid
        else:
            hi = mid
    return CapacityResult(best, points)
