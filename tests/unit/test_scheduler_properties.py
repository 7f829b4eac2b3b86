"""Property tests (hypothesis) of the scheduler core's invariants."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath.scheduler import (
    POLICIES,
    ComputeProfile,
    EngineSnapshot,
    GlobalScheduler,
    PendingPrefill,
    RequestInfo,
    SchedulerParams,
    advance,
    assign_decode,
    assign_prefill,
    attention_time,
    get_policy,
    pack_forward_batch,
)
from dualpath.scheduler.decode import LeastLoadedDE, commit_decode, pick_least_loaded_de
from dualpath.scheduler.path import side_tokens
from dualpath.scheduler.prefill import PrefillPicker, node_read_q, pick_least_loaded, pick_prefill_engine
from dualpath.scheduler.state import EngineLoad

BT = 16
PARAMS = st.builds(
    SchedulerParams,
    alpha_tokens=st.integers(0, 2000),
    beta_tokens=st.integers(1, 3000),
    z_factor=st.floats(0.5, 2.0),
    block_tokens=st.just(BT),
)


@st.composite
def requests(draw: st.DrawFn, n_max: int = 25) -> list[RequestInfo]:
    out = []
    for rid in range(draw(st.integers(0, n_max))):
        ctx = draw(st.integers(0, 800))
        app = draw(st.integers(1, 400))
        hit = draw(st.integers(0, (ctx + app) // BT)) * BT
        out.append(RequestInfo(rid, ctx, app, hit, draw(st.integers(0, 200))))
    return out


@st.composite
def groups(draw: st.DrawFn, kv: bool) -> list[list[EngineSnapshot]]:
    out: list[list[EngineSnapshot]] = []
    eid = 0
    for node in range(draw(st.integers(1, 3))):
        rq = draw(st.integers(0, 3000))
        g = []
        for _ in range(draw(st.integers(1, 3))):
            seq = draw(st.integers(0, 5))
            g.append(
                EngineSnapshot(
                    eid,
                    node,
                    seq,
                    draw(st.integers(0, 4000)) if seq else 0,
                    rq,
                    draw(st.integers(0, 3000)) if kv else 0,
                    -1 if kv else draw(st.one_of(st.just(-1), st.integers(0, 4000))),  # work; -1: tok
                )
            )
            eid += 1
        out.append(g)
    return out


def _check_pe(assigned: list[tuple[int, int]], reqs: dict[int, RequestInfo], pes, params) -> None:  # type: ignore[no-untyped-def]
    tok = {s.engine: s.tok for g in pes for s in g}
    for rid, e in assigned:
        assert tok[e] <= params.beta_tokens, "overloaded PE was given work"
        assert tok[e] == 0 or tok[e] + reqs[rid].tokens <= params.beta_tokens, "a busy PE was pushed past beta"
        tok[e] += reqs[rid].tokens


def _check_de(assigned: list[tuple[int, int]], reqs: dict[int, RequestInfo], des, params) -> None:  # type: ignore[no-untyped-def]
    free = {s.engine: s.free_kv_tokens for g in des for s in g}
    for rid, e in assigned:
        free[e] -= params.kv_need(reqs[rid].tokens, reqs[rid].gen)
        assert free[e] >= 0, "DE KV memory over-committed"


@settings(max_examples=150, deadline=None)
@given(reqs=requests(), pes=groups(kv=False), params=PARAMS)
def test_assign_prefill_never_overloads_and_is_fifo(reqs, pes, params) -> None:  # type: ignore[no-untyped-def]
    flat = [s for g in pes for s in g]
    out = assign_prefill(reqs, flat, params)
    assert [rid for rid, _ in out] == [r.rid for r in reqs[: len(out)]]
    _check_pe(out, {r.rid: r for r in reqs}, pes, params)
    if len(out) < len(reqs):  # stopped only where Algorithm 1's choice for the next request does not take it
        loads = [EngineLoad.of(s) for s in flat]
        by_engine = {e.engine: e for e in loads}
        for rid, e in out:
            by_engine[e].tok += reqs[rid].tokens
            by_engine[e].work += reqs[rid].tokens
            by_engine[e].seq += 1
        nxt = reqs[len(out)]
        assert pick_prefill_engine(loads, node_read_q(flat), params, nxt.tokens) is None
        chosen = pick_prefill_engine(loads, node_read_q(flat), params)  # (the best class has no engine that takes it)
        assert chosen is None or (chosen.tok > 0 and chosen.tok + nxt.tokens > params.beta_tokens)


@settings(max_examples=150, deadline=None)
@given(reqs=requests(), des=groups(kv=True), params=PARAMS)
def test_assign_decode_never_overcommits(reqs, des, params) -> None:  # type: ignore[no-untyped-def]
    out = assign_decode(reqs, des, params)
    assert len({rid for rid, _ in out}) == len(out)
    _check_de(out, {r.rid: r for r in reqs}, des, params)


@settings(max_examples=200, deadline=None)
@given(
    reqs=requests(),
    pes=groups(kv=False),
    des=groups(kv=True),
    params=PARAMS,
    policy=st.sampled_from(sorted(POLICIES)),
    rounds=st.integers(1, 3),
)
def test_global_scheduler_invariants(reqs, pes, des, params, policy, rounds) -> None:  # type: ignore[no-untyped-def]
    s = GlobalScheduler(get_policy(policy), params)
    for r in reqs:
        s.submit(r)
    by_rid = {r.rid: r for r in reqs}
    done: list[int] = []
    for _ in range(rounds):
        out = s.schedule(pes, des)
        _check_pe([(a.rid, a.pe) for a in out], by_rid, pes, params)
        _check_de([(a.rid, a.de) for a in out], by_rid, des, params)
        for a in out:
            pe_t, de_t = side_tokens(a, by_rid[a.rid], params.block_tokens)
            assert pe_t >= 0 and de_t >= 0 and pe_t + de_t == by_rid[a.rid].hit
        done += [a.rid for a in out]
        # FIFO: everything assigned so far is a prefix of the submission order, the rest waits in order
        assert done + s.waiting_rids() == [r.rid for r in reqs]


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 500), st.integers(1, 600)), min_size=1, max_size=8),
    quota=st.floats(0.0, 5e5),
    quad=st.booleans(),
    max_tokens=st.one_of(st.none(), st.integers(1, 700)),
)
def test_chunks_cover_each_request_exactly_once(items, quota, quad, max_tokens) -> None:  # type: ignore[no-untyped-def]
    prof = ComputeProfile(1, 1, 1, flops_per_s=4.0 if quad else 1e12, per_token_s=0.0 if quad else 500.0)

    def tf(c: int, n: int) -> float:
        return attention_time(c, n, prof)

    pend = [PendingPrefill(i, c, n) for i, (c, n) in enumerate(items)]
    seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
    steps = 0
    while pend:
        b = pack_forward_batch(pend, quota, tf, max_tokens=max_tokens)
        assert b.chunks, "a batch must make progress"
        assert [c.rid for c in b.chunks] == [p.rid for p in pend[: len(b.chunks)]], "FIFO packing"
        if len(b.chunks) > 1:
            assert sum(tf(c.cached, c.new) for c in b.chunks) <= quota
        if max_tokens is not None:
            assert b.new_tokens <= max_tokens
        for c in b.chunks:
            seen[c.rid].append((c.cached, c.new))
        pend = advance(pend, b)
        steps += 1
        assert steps <= sum(n for _, n in items)
    for i, (c0, n) in enumerate(items):
        pos = c0
        for cached, new in seen[i]:
            assert cached == pos and new >= 1
            pos += new
        assert pos == c0 + n


@settings(max_examples=150, deadline=None)
@given(
    pes=groups(kv=False),
    params=PARAMS,
    steps=st.lists(st.tuples(st.integers(1, 900), st.integers(0, 1500), st.integers(0, 900)), max_size=30),
    use_read_q=st.booleans(),
)
def test_prefill_picker_matches_reference(pes, params, steps, use_read_q) -> None:  # type: ignore[no-untyped-def]
    flat = [s for g in pes for s in g]
    loads = [EngineLoad.of(s) for s in flat]
    rq = node_read_q(flat)
    picker = PrefillPicker(loads, rq, params, use_read_q=use_read_q)
    for tokens, read, work in steps:
        ref = pick_prefill_engine(loads, rq, params) if use_read_q else pick_least_loaded(loads, params)
        got = picker.pick()
        assert got is ref
        # the engine that takes a request of ``tokens`` (as assignment asks)
        ref = pick_prefill_engine(loads, rq, params, tokens) if use_read_q else pick_least_loaded(loads, params, tokens)
        assert picker.pick(tokens) is ref
        if got is None:
            break
        got.tok += tokens
        got.work += work
        got.seq += 1
        picker.touch(got)
        rq[got.node] = rq.get(got.node, 0) + read
        picker.touch_node(got.node)


@settings(max_examples=150, deadline=None)
@given(reqs=requests(), des=groups(kv=True), params=PARAMS)
def test_least_loaded_de_matches_reference(reqs, des, params) -> None:  # type: ignore[no-untyped-def]
    loads = [EngineLoad.of(s) for g in des for s in g]
    fast = LeastLoadedDE(loads, params)
    for r in reqs:
        ref = pick_least_loaded_de(r, loads, params)
        got = fast.pick(r)
        assert got is ref
        if got is not None:
            commit_decode(got, r, params)
            fast.touch(got)
