"""Unit cases of the scheduler core: Algorithm 1, the DE two-level scheme, path choice, split, batching."""

from __future__ import annotations

import pytest

from dualpath.errors import SchedulerError
from dualpath.scheduler import (
    ABLATION_LADDER,
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
    choose_read_side,
    get_policy,
    pack_forward_batch,
    split_blocks,
)
from dualpath.scheduler.decode import z_threshold
from dualpath.scheduler.prefill import C1_OVERLOADED, C2_SHORT_QUEUE, C3_LONG_QUEUE, classify
from dualpath.scheduler.state import EngineLoad
from dualpath.types import PathKind

P = SchedulerParams(alpha_tokens=1000, beta_tokens=5000, block_tokens=64)


def req(rid: int, tokens: int = 100, hit: int = 0, gen: int = 10) -> RequestInfo:
    return RequestInfo(rid=rid, context=hit, append=tokens - hit, hit=hit, gen=gen)


def pe(engine: int, node: int, tok: int = 0, read_q: int = 0, seq: int = 0, work: int = -1) -> EngineSnapshot:
    return EngineSnapshot(engine=engine, node=node, seq=seq, tok=tok, read_q=read_q, work=work)


def de(
    engine: int, node: int, tok: int = 0, free: int = 10**6, seq: int = 0, read_q: int = 0
) -> EngineSnapshot:
    return EngineSnapshot(engine=engine, node=node, seq=seq, tok=tok, read_q=read_q, free_kv_tokens=free)


# --- policies and params ---------------------------------------------------------------------------------------


def test_policies_and_ladder() -> None:
    assert set(ABLATION_LADDER) <= set(POLICIES)
    assert get_policy("basic").layerwise is False and get_policy("basic").read_side == "pe"
    assert not get_policy("basic").smart_assign and get_policy("dualpath").smart_assign
    assert get_policy("oracle").oracle and get_policy("dualpath").read_side == "queue"
    assert get_policy("dualpath", layerwise=False).layerwise is False
    with pytest.raises(SchedulerError, match="dualpath"):
        get_policy("nope")


def test_params_from_rates_and_kv_need() -> None:
    p = SchedulerParams.from_rates(storage_tokens_per_s=1000.0, gpu_tokens_per_s=200.0)
    assert (p.alpha_tokens, p.beta_tokens) == (3000, 1000)
    assert P.kv_need(100, 28) == 128 and P.kv_need(100, 29) == 192
    with pytest.raises(SchedulerError):
        SchedulerParams(alpha_tokens=1, beta_tokens=0)


# --- Algorithm 1 -------------------------------------------------------------------------------------------------


def test_classify() -> None:
    assert classify(5001, 0, P) == C1_OVERLOADED
    assert classify(5000, 1000, P) == C2_SHORT_QUEUE
    assert classify(0, 1001, P) == C3_LONG_QUEUE


def test_prefill_prefers_short_queue_then_least_tokens() -> None:
    engines = [pe(0, 0, tok=0, read_q=2000), pe(1, 1, tok=300), pe(2, 1, tok=200)]
    # engine 2: C2 with fewest tokens; after it takes 500 tokens (700), engine 1 (300) wins; then 2 (700) vs 1 (800)
    out = assign_prefill([req(1, 500), req(2, 500), req(3, 100)], engines, P)
    assert out == [(1, 2), (2, 1), (3, 2)]


def test_prefill_falls_back_to_long_queue_and_skips_overloaded() -> None:
    engines = [pe(0, 0, tok=6000), pe(1, 1, tok=100, read_q=5000)]
    assert assign_prefill([req(1), req(2)], engines, P) == [(1, 1), (2, 1)]


def test_prefill_reevaluates_overload_and_stops_fifo() -> None:
    engines = [pe(0, 0, tok=4800)]
    # a busy engine takes requests while it stays within beta; the first one it would pass beta with waits, and so
    # do the ones behind it (FIFO prefix only)
    assert assign_prefill([req(1, 200), req(2, 1), req(3, 1)], engines, P) == [(1, 0)]
    assert assign_prefill([req(1, 201), req(2, 1)], engines, P) == []
    assert assign_prefill([req(1)], [pe(0, 0, tok=5001)], P) == []


def test_an_idle_prefill_engine_takes_a_request_larger_than_beta() -> None:
    """A request longer than beta still runs: an idle engine takes it (and then nothing more until it drains), while
    a busy engine that another request would push past beta is not chosen for it."""
    assert assign_prefill([req(1, 9000), req(2, 1)], [pe(0, 0)], P) == [(1, 0)]
    assert assign_prefill([req(1, 9000)], [pe(0, 0, tok=1)], P) == []
    # the least-loaded engine is busy and would pass beta: the fetch ends there (FIFO), the idle C3 engine waits
    engines = [pe(0, 0, tok=10), pe(1, 1, read_q=5000)]
    assert assign_prefill([req(1, 4995)], engines, P) == []
    assert assign_prefill([req(1, 4990)], engines, P) == [(1, 0)]


def test_prefill_ranks_engines_by_reported_work_and_bounds_their_tokens() -> None:
    """Within a class the engine with the least reported work wins (tokens when it reports none); classes and beta
    still count tokens."""
    # engine 0 holds a 4,000-token first prompt, engine 1 4,500 tokens of mostly stored turns: less work
    engines = [pe(0, 0, tok=4000, seq=1), pe(1, 0, tok=4500, seq=3)]
    assert assign_prefill([req(1, 100)], engines, P) == [(1, 0)]  # the paper's ranking: fewest tokens
    engines = [pe(0, 0, tok=4000, seq=1, work=3900), pe(1, 0, tok=4500, seq=3, work=600)]
    assert assign_prefill([req(1, 100)], engines, P) == [(1, 1)]
    # engine 1 would pass beta in tokens with this one: the engine of its class with the least work that stays
    # within beta takes it; when none does, the fetch ends there (FIFO)
    assert assign_prefill([req(1, 600), req(2, 1)], engines, P) == [(1, 0), (2, 1)]
    assert assign_prefill([req(1, 1001), req(2, 1)], engines, P) == []
    # the short-queue class still comes first: engine 1 on a node with a long read queue loses despite its work
    engines = [pe(0, 0, tok=4000, seq=1, work=3900), pe(1, 1, tok=4500, seq=3, read_q=2000, work=600)]
    assert assign_prefill([req(1, 100)], engines, P) == [(1, 0)]
    # work charged within a round: the requests' tokens without a predictor
    engines = [pe(0, 0, tok=1000, seq=1, work=300), pe(1, 0, tok=500, seq=1, work=500)]
    assert assign_prefill([req(1, 300), req(2, 100)], engines, P) == [(1, 0), (2, 1)]


def test_global_scheduler_charges_the_work_its_caller_predicts() -> None:
    s = GlobalScheduler(get_policy("dualpath"), P)
    s.pe_work = lambda r: r.miss  # e.g. a request's new tokens
    s.submit(req(0, 500, hit=448))  # 52 new tokens
    s.submit(req(1, 500, hit=448))
    s.submit(req(2, 1001))  # all new
    s.submit(req(3, 100))
    # engine 0 computes a 1,500-token first prompt; engine 1 holds 3,000 tokens of stored turns (work 300), engine 2
    # 4,500 (work 500)
    pes = [[pe(0, 0, tok=1500, seq=1, work=1500), pe(1, 0, tok=3000, seq=2, work=300),
            pe(2, 0, tok=4500, seq=1, work=500)]]
    out = s.schedule(pes, [[de(0, 0)]])
    # 0 and 1 -> engine 1 (work 352, then 404 < 500: charged its tokens instead, 800, request 1 would go to engine 2;
    # tokens 4,000 of beta's 5,000); request 2 would pass beta on engines 1 and 2, so engine 0 takes it (work 2,501),
    # and request 3 goes back to engine 1 (work 404)
    assert [(a.rid, a.pe) for a in out] == [(0, 1), (1, 1), (2, 0), (3, 1)]
    assert s.waiting() == 0
    for bad in (-1, 2.5, True):  # a predictor's bad answer is refused by name, not charged
        c = GlobalScheduler(get_policy("dualpath"), P)
        c.pe_work = lambda r, bad=bad: bad  # type: ignore[misc]
        c.submit(req(0, 100))
        with pytest.raises(SchedulerError, match="pe_work gave"):
            c.schedule([[pe(0, 0)]], [[de(0, 0)]])
    # engines that report no work are ranked by tokens, engine 0 (1,500) first, and charged tokens without a
    # predictor: three requests of 500 tokens go 0, 0, 0 (2,000 < 3,000), then 1 (2,500 vs 3,000)
    b = GlobalScheduler(get_policy("dualpath"), P)
    for i in range(4):
        b.submit(req(i, 500, hit=448))
    assert [a.pe for a in b.schedule([[pe(0, 0, tok=1500, seq=1), pe(1, 0, tok=3000, seq=2)]], [[de(0, 0)]])] == [
        0, 0, 0, 1]


# --- DE two-level ----------------------------------------------------------------------------------------------


def test_decode_group_with_fewest_tokens() -> None:
    groups = [[de(0, 0, tok=1000), de(1, 0, tok=1000)], [de(2, 1, tok=100), de(3, 1, tok=300)]]
    out = assign_decode([req(1, 500)], groups, P)
    assert out == [(1, 2)]


def test_decode_z_low_token_min_seq_else_min_tok() -> None:
    group = [EngineLoad(0, 0, seq=5, tok=100, free_kv_tokens=10**6), EngineLoad(1, 0, 1, 900, 10**6)]
    # R = {r}: Z = 1.05 * (200 + 1000) / 2 = 630; engine 0: 300 <= Z low; engine 1: 1100 > Z high
    r = req(1, 200)
    assert z_threshold(group, [r], P) == pytest.approx(630.0)
    groups = [[de(0, 0, tok=100, seq=5), de(1, 0, tok=900, seq=1)]]
    assert assign_decode([r], groups, P) == [(1, 0)]
    # both low-token: the one with fewer requests wins even with more tokens
    # Z = 1.05 * (10 + 200) / 2 = 110.25: both have 110 <= Z
    groups = [[de(0, 0, tok=100, seq=5), de(1, 0, tok=100, seq=1)]]
    assert assign_decode([req(1, 10)], groups, P) == [(1, 1)]
    # no low-token DE fits (engine 0 has no memory): the high-token DE with fewest tokens
    groups = [[de(0, 0, tok=0, free=0), de(1, 0, tok=900, seq=0), de(2, 0, tok=800, seq=9)]]
    assert assign_decode([req(1, 10)], groups, P) == [(1, 2)]


def test_decode_respects_hbm() -> None:
    groups = [[de(0, 0, free=128), de(1, 0, free=64)]]
    # needs: 100+10 -> 128 tokens; the second request fits nowhere after the first
    assert assign_decode([req(1, 100), req(2, 50, gen=10)], groups, P) == [(1, 0), (2, 1)]
    assert assign_decode([req(1, 100), req(2, 100)], groups, P) == [(1, 0)]


# --- path choice and split -------------------------------------------------------------------------------------


def test_choose_read_side() -> None:
    r = req(1, 1000, hit=640)
    a, b = pe(0, 0, read_q=500), de(7, 3, read_q=400)
    q = choose_read_side(r, a, b, get_policy("dualpath"), 0)
    assert (q.path, q.pe, q.de, q.pe_blocks) == (PathKind.DE, 0, 7, 0)
    tie = choose_read_side(r, pe(0, 0, read_q=400), b, get_policy("dualpath"), 0)
    assert tie.path is PathKind.PE and tie.pe_blocks == 10
    rr = get_policy("round_robin")
    assert [choose_read_side(r, a, b, rr, i).path for i in range(3)] == [
        PathKind.PE,
        PathKind.DE,
        PathKind.PE,
    ]
    assert choose_read_side(r, a, b, get_policy("pe_only"), 1).path is PathKind.PE
    assert choose_read_side(r, a, b, get_policy("de_only"), 0).path is PathKind.DE


def test_split_equalises_finish() -> None:
    assert split_blocks(10, 0, 0, 64) == 5
    # PE queue is 4 blocks longer: PE side gets 3, DE gets 7 -> 4+3 == 0+7
    assert split_blocks(10, 256, 0, 64) == 3
    assert split_blocks(10, 0, 64 * 100, 64) == 10
    r = req(1, 1000, hit=640)
    a = choose_read_side(r, pe(0, 0, read_q=256), de(1, 0, read_q=0), get_policy("split"), 0)
    assert (a.path, a.pe_blocks) == (PathKind.SPLIT, 3)
    full = choose_read_side(r, pe(0, 0), de(1, 0, read_q=10**6), get_policy("split"), 0)
    assert (full.path, full.pe_blocks) == (PathKind.PE, 10)


# --- batching --------------------------------------------------------------------------------------------------


def lin(cached: int, new: int) -> float:
    return float(new)  # one time unit per token


def test_attention_time_causal_flops() -> None:
    prof = ComputeProfile(n_layers=2, n_heads=4, head_dim=8, flops_per_s=1.0)
    # new=3 over cached=5: pairs = 15 + 6 = 21; flops = 4*2*4*8*21
    assert attention_time(5, 3, prof) == pytest.approx(4 * 2 * 4 * 8 * 21)
    assert attention_time(5, 0, prof) == 0.0
    assert attention_time(100, 10, prof) > attention_time(0, 10, prof)


def test_pack_fifo_and_binary_search_chunk() -> None:
    pend = [PendingPrefill(1, 0, 100), PendingPrefill(2, 50, 250), PendingPrefill(3, 0, 10)]
    b = pack_forward_batch(pend, 300.0, lin)
    assert [(c.rid, c.cached, c.new) for c in b.chunks] == [(1, 0, 100), (2, 50, 200)]
    rest = advance(pend, b)
    assert rest == [PendingPrefill(2, 250, 50), PendingPrefill(3, 0, 10)]
    b2 = pack_forward_batch(rest, 300.0, lin)
    assert [(c.rid, c.new) for c in b2.chunks] == [(2, 50), (3, 10)]


def test_pack_progress_and_max_tokens() -> None:
    b = pack_forward_batch([PendingPrefill(1, 0, 10)], 0.0, lin)
    assert [(c.rid, c.new) for c in b.chunks] == [(1, 1)]
    b = pack_forward_batch([PendingPrefill(1, 0, 10), PendingPrefill(2, 0, 10)], 1000.0, lin, max_tokens=15)
    assert [(c.rid, c.new) for c in b.chunks] == [(1, 10), (2, 5)]


def test_pack_with_quadratic_profile_is_maximal() -> None:
    prof = ComputeProfile(n_layers=1, n_heads=1, head_dim=1, flops_per_s=4.0)  # time = pairs

    def tf(c: int, n: int) -> float:
        return attention_time(c, n, prof)

    b = pack_forward_batch([PendingPrefill(1, 10, 1000)], 100.0, tf)
    n = b.chunks[0].new
    assert tf(10, n) <= 100.0 < tf(10, n + 1)


# --- GlobalScheduler -------------------------------------------------------------------------------------------


def test_global_scheduler_round() -> None:
    s = GlobalScheduler(get_policy("dualpath"), P)
    for i in range(4):
        s.submit(req(i, 1000, hit=640))
    with pytest.raises(SchedulerError):
        s.submit(req(0))
    with pytest.raises(SchedulerError):
        s.submit(RequestInfo(9, context=10, append=0, hit=64, gen=1))
    pes = [[pe(0, 0), pe(1, 0)]]
    des = [[de(0, 0), de(1, 0)]]
    out = s.schedule(pes, des)
    assert [a.rid for a in out] == [0, 1, 2, 3] and s.waiting() == 0
    # read queues are updated within the round: sides alternate as each read lengthens one queue
    assert [a.path for a in out] == [PathKind.PE, PathKind.DE, PathKind.PE, PathKind.DE]
    assert sorted(a.pe for a in out) == [0, 0, 1, 1] and sorted(a.de for a in out) == [0, 0, 1, 1]


def test_global_scheduler_stops_without_de_and_keeps_fifo() -> None:
    s = GlobalScheduler(get_policy("dualpath"), P)
    for i in range(3):
        s.submit(req(i, 100))
    out = s.schedule([[pe(0, 0)]], [[de(0, 0, free=128)]])
    assert [a.rid for a in out] == [0]
    assert s.waiting_rids() == [1, 2]
    assert s.schedule([[pe(0, 0, tok=10**6)]], [[de(0, 0)]]) == []
    assert s.cancel(1) and not s.cancel(1) and s.waiting_rids() == [2]


def test_global_scheduler_oracle_and_basic() -> None:
    s = GlobalScheduler(get_policy("oracle"), P)
    for i in range(2):
        s.submit(req(i, 1000, hit=640))
    out = s.schedule([[pe(0, 0)]], [[de(0, 0)]])
    assert all(a.path is PathKind.PE for a in out)  # no read queue grows: no side alternation
    b = GlobalScheduler(get_policy("basic"), P)
    for i in range(4):
        b.submit(req(i, 100 * (i + 1)))
    out = b.schedule([[pe(0, 0, read_q=10**6), pe(1, 1)]], [[de(0, 0)], [de(1, 1)]])
    assert [a.pe for a in out] == [0, 1, 0, 1] and all(a.path is PathKind.PE for a in out)


def test_global_scheduler_refreshes_the_hit_as_it_assigns() -> None:
    s = GlobalScheduler(get_policy("split"), P)
    for i in range(3):
        s.submit(req(i, 1000, hit=0))  # submitted before anything was stored
    asked: list[int] = []

    def refresh(r: RequestInfo) -> int:
        asked.append(r.rid)
        return 640 if r.rid < 2 else 0  # requests 0 and 1 find 10 stored blocks now

    s.refresh_hit = refresh
    out = s.schedule([[pe(0, 0)]], [[de(0, 1)]])
    assert asked == [0, 1, 2]  # once per request, as it is assigned
    # split over equal read queues: request 0 reads 5 blocks per side; request 1 then sees the queues this round's
    # reads left (PE 320, DE 320 tokens) and splits the same way; request 2 has nothing to read
    assert [(a.path, a.pe_blocks) for a in out] == [(PathKind.SPLIT, 5), (PathKind.SPLIT, 5), (PathKind.PE, 0)]
    s.submit(req(7, 100))
    s.refresh_hit = lambda r: 101  # more than the prompt: a bug in the caller, named
    with pytest.raises(SchedulerError, match="request 7: refresh_hit gave 101"):
        s.schedule([[pe(0, 0)]], [[de(0, 1)]])


@pytest.mark.parametrize("policy", ["basic", "dualpath"])  # least-loaded and the two-level DE router
def test_global_scheduler_holds_a_request_on_one_assigned_before_it(policy: str) -> None:
    s = GlobalScheduler(get_policy(policy), P)
    for i in range(5):
        s.submit(req(i, 1000))
    computing: set[int] = set()  # rids whose "prefix" is being computed; 0 and 2 share with 1 and 3
    shares = {1: 0, 3: 2}
    s.hold = lambda r: shares.get(r.rid) in computing
    seen: list[int] = []

    def assigned(r: RequestInfo) -> None:
        seen.append(r.rid)
        computing.add(r.rid)

    s.on_assign = assigned
    out = s.schedule([[pe(0, 0), pe(1, 0)]], [[de(0, 1), de(1, 1)]])
    # 1 is held on 0 and 3 on 2, both assigned earlier in this very round; 4 goes past them
    assert [a.rid for a in out] == seen == [0, 2, 4]
    assert s.waiting_rids() == [1, 3]  # the held ones keep their place and order
    computing.clear()  # their prefixes are stored
    assert [a.rid for a in s.schedule([[pe(0, 0)]], [[de(0, 1)]])] == [1, 3]
    assert s.waiting() == 0


def test_global_scheduler_passes_over_at_most_hold_scan_held_requests() -> None:
    s = GlobalScheduler(get_policy("basic"), P)
    for i in range(4):
        s.submit(req(i, 100))
    s.hold = lambda r: r.rid < 3
    s.hold_scan = 2
    assert s.schedule([[pe(0, 0)]], [[de(0, 1)]]) == []  # three held before request 3: the round ends at two
    s.hold_scan = 3
    assert [a.rid for a in s.schedule([[pe(0, 0)]], [[de(0, 1)]])] == [3]
    assert s.waiting_rids() == [0, 1, 2]


def test_held_requests_past_the_routed_window_keep_the_de_routing_aligned() -> None:
    # dualpath routes a window of head requests (11 here: beta 5000, 500-token requests, one PE) to DE groups up front
    # and the rest on demand, by candidate index; the PE takes 10 (the 11th would pass beta). A request past the window that a hold holds only when asked again
    # (rids 11 and 12: a caller's hold may change its answer within a round) is passed over without a route, and
    # those behind it are still routed and assigned
    s = GlobalScheduler(get_policy("dualpath"), P)
    for i in range(30):
        s.submit(req(i, 500))
    asks: dict[int, int] = {}
    assigned: list[int] = []

    def hold(r: RequestInfo) -> bool:
        asks[r.rid] = asks.get(r.rid, 0) + 1
        return (5 <= r.rid < 11 and bool(assigned)) or (r.rid in (11, 12) and asks[r.rid] > 1)

    s.hold = hold
    s.on_assign = lambda r: assigned.append(r.rid)
    out = s.schedule([[pe(0, 0)]], [[de(0, 1)], [de(1, 2)]])
    assert [a.rid for a in out] == assigned == [0, 1, 2, 3, 4, *range(13, 18)]
    assert s.waiting_rids()[:8] == list(range(5, 13))


def test_inflight_keys_count_each_computing_request() -> None:
    from dualpath.scheduler.inflight import InflightKeys

    k = InflightKeys()
    assert not k
    k.add(["a", "b", "c"])
    k.add(["b", "c"])  # a second request computes b and c too
    assert k.run(["a", "b", "c", "d"], 0, 4) == 3 and k.run(["x", "b"], 1, 2) == 1 and k.run(["a", "b"], 0, 1) == 1
    k.remove(["a", "b", "c"])  # the first is stored: b and c are still being computed by the second
    assert "a" not in k and k.run(["a", "b", "c"], 1, 3) == 2
    k.remove(["b", "c"])
    assert not k
    k.remove(["zz"])  # releasing what was never added is harmless
    assert not k
