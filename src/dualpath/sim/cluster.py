"""The simulated cluster: nodes, PE/DE engines, the two read paths, driven by the shared scheduler core.

The life of a request (one agent turn), as events:

1. **submit** to :class:`~dualpath.scheduler.core.GlobalScheduler` (the runtime's core). A fetch round runs at most
   every ``fetch_interval_s`` while requests wait, over snapshots of every engine (``seq``, ``tok``, the node's
   ``read_q`` in tokens, ``free_kv_tokens``); each :class:`~dualpath.scheduler.state.Assignment` fixes PE, DE and
   the read side. The engines' ``seq``/``tok``/free KV are charged as the core charged its private copies.
2. **read**: the hit Full Blocks are read over the chosen node's storage NIC into its DRAM buffer (a FIFO of
   read tasks per node, ``read_slots`` at a time sharing the SNIC link; a task waits while the buffer is full).
   ``split`` reads on both sides. ``oracle`` reads nothing.
3. **prefill**: once its reads are done the request is pending on its PE. An idle PE packs a forward batch with
   :func:`~dualpath.scheduler.batching.pack_forward_batch` (the DualPath quota on predicted attention time for
   the smart policies; otherwise up to ``max_batch_tokens`` new tokens, and for non-layer-wise prefill the whole
   batch's KV must fit ``pe_hbm_kv_tokens``). Per-link bytes follow the paper's steps (digest 3.2/3.3):
   PE path: PE CNIC read = cached (H2D source) + KV out; PE CNIC write = cached; DE CNIC write = KV out
   (hit + new on the first chunk, new later). DE path: DE CNIC read = cached hit; PE CNIC write = cached;
   PE CNIC read = new KV out; DE CNIC write = new KV. Layer-wise: all of a batch's flows run concurrently with its
   compute and the batch ends when the last is done (per-layer pipelining, one fluid flow per link per batch).
   Not layer-wise: H2D flows, then compute, then the KV out, in sequence.
4. **to decode**: the DE copies the whole prompt KV DRAM -> HBM (DE CNIC read + write), then joins its decode
   batch. Every DE step serves all its requests; the step time is constant between joins and leaves, so decode
   advances analytically on a step counter (one event per leave). The first token is the prefill's, the second
   comes one step after the join.
5. **persist**: at the end the DE writes the request's new Full Blocks (counted on its node's SNIC write side;
   writes never block reads). The agent's next turn hits every full block of its context. A trace's
   content-keyed request (Mooncake ``hash_ids``) hits the longest stored prefix of its ids, whichever session
   stored them, looked up as the scheduler assigns it (``GlobalScheduler.refresh_hit``): blocks stored while it
   queued count. A request's full input blocks count as stored from its decode start, when the runtime's DE
   persists them (``DecodeEngine._persist_prompt``), not from its end.

Simplifications (documented): engines of a node do not barrier per forward (the scheduler balances them);
DRAM bandwidth is counted, not enforced (the analysis checks it); the decode KV footprint is fixed at join.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from dualpath.errors import ConfigError
from dualpath.scheduler.batching import PendingPrefill, pack_forward_batch
from dualpath.scheduler.core import GlobalScheduler
from dualpath.scheduler.inflight import InflightKeys
from dualpath.scheduler.params import SchedulerParams
from dualpath.scheduler.policies import Policy
from dualpath.scheduler.state import EngineSnapshot, RequestInfo
from dualpath.sim import traffic
from dualpath.sim.compute import curve_efficiency, efficient_batch_tokens
from dualpath.sim.events import EventLoop
from dualpath.sim.links import KV, Link
from dualpath.sim.measures import Meter
from dualpath.sim.scenario import SimScenario, as_turns
from dualpath.types import PathKind
from dualpath.workload.traces import content_hit


def _trace_meta(trajs: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Per agent: the turns' (hash ids, block) content keys, their request times and their think times, or None
    when no turn has them."""
    keys: list[Any] = []
    times: list[Any] = []
    thinks: list[Any] = []
    for t in trajs:
        turns = list(getattr(t, "turns", ()))
        k = [(u.hash_ids, u.hash_block) if getattr(u, "hash_ids", None) is not None else None for u in turns]
        a = [getattr(u, "at", None) for u in turns]
        th = [getattr(u, "think", None) or 0.0 for u in turns]
        keys.append(k if any(x is not None for x in k) else None)
        times.append([x if x is not None else -1.0 for x in a] if any(x is not None for x in a) else None)
        thinks.append(th if any(th) else None)
    return keys, times, thinks


class Req:
    __slots__ = (
        "rid", "agent", "context", "append", "hit", "gen", "prompt", "pe", "de", "path", "pe_tok", "de_tok",
        "reads_left", "cached", "remaining", "first_chunk", "t_submit", "t_first", "t_join", "s_end", "t_assign",
        "t_ready", "turn", "computing", "t_held", "work",
    )

    def __init__(self, rid: int, agent: int, context: int, append: int, hit: int, gen: int, t: float) -> None:
        self.rid = rid
        self.agent = agent
        self.context = context
        self.append = append
        self.hit = hit
        self.gen = gen
        self.prompt = context + append
        self.pe = -1
        self.de = -1
        self.path = PathKind.PE
        self.pe_tok = 0
        self.de_tok = 0
        self.reads_left = 0
        self.cached = hit
        self.remaining = self.prompt - hit
        self.first_chunk = True
        self.t_submit = t
        self.t_first = -1.0
        self.t_join = -1.0
        self.s_end = 0.0
        self.t_assign = t
        self.t_ready = t
        self.turn = 0
        self.computing: list[int] = []  # content keys this request computes and stores at its join
        self.t_held = -1.0  # when the scheduler first held it for a prefix being computed (_hold), or -1
        self.work = self.prompt  # PE work charged at assignment (Simulation._pe_work; the prompt without it)


class Node:
    __slots__ = ("idx", "role", "snic", "queue", "active", "read_q", "buf_used", "buf_cap", "write_bytes",
                 "dram_bytes", "read_bytes")

    def __init__(self, idx: int, role: str, snic: Link, buf_cap: float) -> None:
        self.idx = idx
        self.role = role
        self.snic = snic
        self.queue: deque[tuple[Req, int, float]] = deque()
        self.active = 0
        self.read_q = 0
        self.buf_used = 0.0
        self.buf_cap = buf_cap
        self.write_bytes = 0.0
        self.dram_bytes = 0.0
        self.read_bytes = 0.0


class PE:
    __slots__ = ("idx", "node", "seq", "tok", "work", "pending", "busy", "cnic_r", "cnic_w", "compute_s", "batches",
                 "comp_start", "comp_end", "small_s", "new_tok")

    def __init__(self, idx: int, node: Node, cnic_r: Link, cnic_w: Link) -> None:
        self.idx = idx
        self.node = node
        self.seq = 0
        self.tok = 0
        self.work = 0  # queued work not yet in a forward (Simulation._pe_work); Algorithm 1 ranks PEs by it
        self.pending: list[Req] = []
        self.busy = False
        self.cnic_r = cnic_r
        self.cnic_w = cnic_w
        self.compute_s = 0.0
        self.batches = 0
        self.comp_start = 0.0  # the running batch's compute interval (breakdown)
        self.comp_end = 0.0
        self.small_s = 0.0  # compute seconds lost to batches below the saturating size
        self.new_tok = 0


class DE:
    __slots__ = ("idx", "node", "seq", "tok", "free_kv", "cnic_r", "cnic_w", "heap", "S", "t", "tau", "bytes",
                 "flops", "ver", "busy_s", "req_s")

    def __init__(self, idx: int, node: Node, cnic_r: Link, cnic_w: Link, kv_tokens: int) -> None:
        self.idx = idx
        self.node = node
        self.seq = 0
        self.tok = 0
        self.free_kv = kv_tokens
        self.cnic_r = cnic_r
        self.cnic_w = cnic_w
        self.heap: list[tuple[float, int, Req]] = []
        self.S = 0.0  # decode steps done (fluid)
        self.t = 0.0
        self.tau = 0.0
        self.bytes = 0.0
        self.flops = 0.0
        self.ver = 0
        self.busy_s = 0.0
        self.req_s = 0.0  # request-seconds in decode steps (mean decode batch = req_s / busy_s)


class Batch:
    __slots__ = ("pe", "chunks", "left", "phase", "out", "compute_s")

    def __init__(self, pe: PE, chunks: list[tuple[Req, int]]) -> None:
        self.pe = pe
        self.chunks = chunks
        self.left = 0
        self.phase = 0
        self.out: list[tuple[Link, float]] = []
        self.compute_s = 0.0


class Simulation:
    """One run of one policy over one scenario. ``run()`` returns the raw recorder; see :mod:`.runner`."""

    def __init__(self, sc: SimScenario, policy: Policy) -> None:
        sc.validate()
        self.sc = sc
        self.policy = policy
        self.loop = loop = EventLoop()
        g = sc.gpus_per_node
        kvb = float(sc.kv_bytes_per_token)
        self.kvb = kvb
        bt = sc.block_tokens
        self.bt = bt
        win = sc.balance_window_s
        self.pe_nodes = [Node(i, "pe", Link(loop, f"snic.pe{i}", sc.snic_bw, sc.kv_share, win), sc.dram_buffer_bytes)
                         for i in range(sc.P)]
        self.de_nodes = [Node(i, "de", Link(loop, f"snic.de{i}", sc.snic_bw, sc.kv_share, win), sc.dram_buffer_bytes)
                         for i in range(sc.D)]
        self.pes = [PE(i, self.pe_nodes[i // g], Link(loop, f"cnic_r.pe{i}", sc.cnic_bw, sc.kv_share),
                       Link(loop, f"cnic_w.pe{i}", sc.cnic_bw, sc.kv_share)) for i in range(sc.P * g)]
        self.des = [DE(i, self.de_nodes[i // g], Link(loop, f"cnic_r.de{i}", sc.cnic_bw, sc.kv_share),
                       Link(loop, f"cnic_w.de{i}", sc.cnic_bw, sc.kv_share), sc.de_kv_tokens)
                    for i in range(sc.D * g)]
        comp = sc.compute
        # alpha: tokens one node's SNIC reads in alpha_s; beta: prompt tokens one GPU prefills in beta_s.
        trajs = [as_turns(t) for t in sc.trajectories]
        self.turns = trajs
        # trace turns: content keys of a global prefix cache (Mooncake hash ids) and request times (online)
        self.turn_keys, self.turn_at, self.turn_think = _trace_meta(sc.trajectories)
        self.agent_thought = [-1] * len(self.turn_think)  # per agent: the last turn whose think time has passed
        self.stored_keys: set[int] = set()
        self.computing = InflightKeys()  # content keys assigned requests compute (until their join stores them)
        self.curve = getattr(comp, "batch_curve", None)
        # per-engine time breakdown (Simulation.breakdown); sampled every breakdown_dt sim-seconds when > 0
        self.breakdown_dt = 0.0
        self.bd_pe = [0.0] * 5  # compute, transfer wait, read wait, scheduler wait, no work (PE-seconds)
        self.bd_req = [0.0] * 3  # global queue, reads, PE queue + prefill (request-seconds)
        n_turns = sum(len(t) for t in trajs)
        mean_ctx, mean_app = self._mean_request(trajs)
        k = max(1, math.ceil(6000 / max(1, mean_app)))
        t_req = comp.prefill_time([(mean_ctx, mean_app)] * k) / k
        gpu_tok_s = (mean_ctx + mean_app) / t_req if t_req > 0 else 1e9
        self.params = SchedulerParams.from_rates(sc.snic_bw / kvb, gpu_tok_s, sc.alpha_s, sc.beta_s, sc.z_factor, bt)
        self.sched = GlobalScheduler(policy, self.params)
        self._gpu_tok_s = gpu_tok_s
        if policy.smart_assign and sc.work_ranking:  # Algorithm 1 ranks PEs by queued work (docs/simulator.md)
            self.sched.pe_work = self._pe_work
        if any(tk is not None for tk in self.turn_keys):  # a shared prefix stored while a request waited is read
            self.sched.refresh_hit = self._refresh_hit
            if sc.inflight_prefix_min_tokens is not None:  # wait for a shared prefix being computed (_hold)
                self.sched.hold = self._hold
                self.sched.on_assign = self._computes
        self.layerwise = policy.layerwise
        self.oracle = policy.oracle
        self.quota = sc.quota_s if policy.smart_assign else float("inf")
        # never lose (docs/simulator.md): the quota does not cut a batch below the size where prefill saturates
        self.min_batch = efficient_batch_tokens(comp, sc.max_batch_tokens) if sc.quota_floor else 0
        self.hbm_tok = None if (policy.layerwise or sc.pe_hbm_kv_tokens is None) else sc.pe_hbm_kv_tokens
        self.attn_time: Callable[[int, int], float] = comp.attention_time
        # recording
        self.n_requests = n_turns
        self.rec_submit = array("d")
        self.rec_ttft = array("d")
        self.rec_ttst = array("d")
        self.rec_tpot = array("d")
        self.rec_done = array("d")
        traffic.setup(self)  # inference (HIGH) traffic on the compute NICs, isolation on/off (sim/traffic.py)
        self.meter = Meter(self)  # paper metrics (sim/measures.py): TTFT composition, attention balance, agents
        self.agent_turn = [0] * len(trajs)
        self.agent_done = array("d", [-1.0]) * len(trajs)
        self.agent_ctx = [0] * len(trajs)
        self.hit_tokens = 0
        self.prompt_tokens = 0
        self.gen_tokens = 0
        self.bytes_pe_path = 0.0
        self.bytes_de_path = 0.0
        self.completed = 0
        self.fetches = 0
        self._fetch_at = -1.0
        self._last_fetch = -1e18
        self._rid = 0
        self._check_capacity(trajs)

    @staticmethod
    def _mean_request(trajs: list[list[tuple[int, int]]]) -> tuple[int, int]:
        n = ctx_sum = app_sum = 0
        for turns in trajs:
            ctx = 0
            for a, gtok in turns:
                ctx_sum += ctx
                app_sum += a
                ctx += a + gtok
                n += 1
        return (ctx_sum // max(1, n), max(1, app_sum // max(1, n)))

    def _check_capacity(self, trajs: list[list[tuple[int, int]]]) -> None:
        longest = max((sum(a + g for a, g in t) for t in trajs), default=0)
        if self.params.kv_need(longest, 0) > self.sc.de_kv_tokens:
            raise ConfigError(
                f"sim scenario {self.sc.name}: a trajectory reaches {longest} tokens but a DE holds only "
                f"{self.sc.de_kv_tokens} KV tokens (de_kv_tokens); use a larger GPU, more memory or a shorter max_len"
            )

    # ---------------------------------------------------------------------------------------------------------
    # agents and submission
    # ---------------------------------------------------------------------------------------------------------
    def _next_turn(self, agent: int) -> None:
        i = self.agent_turn[agent]
        turns = self.turns[agent]
        if i >= len(turns):
            self.agent_done[agent] = self.loop.now
            return
        append, gen = turns[i]
        th = self.turn_think[agent]
        if th is not None and self.sc.mode == "online" and th[i] > 0 and self.agent_thought[agent] < i:
            self.agent_thought[agent] = i  # a trace's think time: after the previous turn ended (or the start)
            self.loop.at(self.loop.now + th[i], self._next_turn, agent)
            return
        tat = self.turn_at[agent]
        if tat is not None and self.sc.mode == "online" and tat[i] > self.loop.now:
            self.loop.at(tat[i], self._next_turn, agent)  # a trace's request is not sent before its time
            return
        ctx = self.agent_ctx[agent]
        prompt = ctx + append
        bt = self.bt
        tk = self.turn_keys[agent]
        if tk is not None and tk[i] is not None:  # content-keyed: the longest stored prefix, any session
            hit = self._stored_prefix(tk[i], prompt)
        else:
            hit = min((ctx // bt) * bt, ((prompt - 1) // bt) * bt) if prompt > 0 else 0
        req = Req(self._rid, agent, ctx, append, max(0, hit), max(1, gen), self.loop.now)
        req.turn = i
        self._rid += 1
        self.reqs[req.rid] = req
        self.sched.submit(RequestInfo(req.rid, ctx, append, req.hit, req.gen))
        self._want_fetch()

    def _stored_prefix(self, keys: tuple[list[int], int], prompt: int) -> int:
        """Tokens of a content-keyed ``prompt`` (its ``(hash ids, block)``) stored now, in whole blocks of ours,
        leaving at least one token to compute."""
        return min(content_hit(keys[0], prompt, keys[1], self.stored_keys), ((prompt - 1) // self.bt) * self.bt)

    def _pe_work(self, info: RequestInfo) -> int:
        """The scheduler core's ``pe_work``: the PE time a request takes, in the prompt tokens of the workload's mean
        request (beta's unit): its prefill compute at the saturated batch efficiency (a request is batched) and, for
        layer-wise prefill, at least the time its hit KV takes to stream into the PE over its compute NIC. Kept on
        the request: its PE's ``work`` drops by each chunk's share (by new tokens) as the chunk's forward starts,
        and while a forward runs the PE reports what is left of it (:meth:`_work_now`), so a PE's work is the time
        until it has done what it holds."""
        hit, new = info.hit, info.prompt - info.hit
        t = self.sc.compute.prefill_time([(hit, new)])
        if self.curve is not None and new > 0:
            t *= curve_efficiency(new, self.curve) / self.curve[-1][1]
        if not self.oracle and self.layerwise:
            t = max(t, hit * self.kvb / self.sc.cnic_bw)
        work = max(1, round(t * self._gpu_tok_s))
        self.reqs[info.rid].work = work
        return work

    def _work_now(self, pe: PE) -> int:
        """What ``pe`` reports as its work (``EngineSnapshot.work``): its queued work plus, with work ranking, what is
        left of the forward it is computing (in the same unit)."""
        if self.sched.pe_work is None or not pe.busy:
            return pe.work
        return pe.work + max(0, round((pe.comp_end - self.loop.now) * self._gpu_tok_s))

    def _refresh_hit(self, info: RequestInfo) -> int:
        """The scheduler core's ``refresh_hit``: a content-keyed request's stored prefix as of its assignment
        (blocks another session stored while it waited count; stored blocks are never dropped, so it only
        grows)."""
        req = self.reqs[info.rid]
        tk = self.turn_keys[req.agent]
        if tk is None or tk[req.turn] is None:
            return req.hit
        hit = self._stored_prefix(tk[req.turn], req.prompt)
        if hit > req.hit:
            req.hit = req.cached = hit
            req.remaining = req.prompt - hit
        return req.hit

    def _hold(self, info: RequestInfo) -> bool:
        """The scheduler core's ``hold``: a content-keyed request whose next blocks past its stored prefix (at least
        ``inflight_prefix_min_tokens``, and one block) another assigned request is computing now waits until they
        are stored (that request's join), then reads them instead of computing them again; at most
        ``inflight_prefix_wait_s`` from its first hold, as the runtime's driver waits."""
        req = self.reqs[info.rid]
        tk = self.turn_keys[req.agent]
        if tk is None or tk[req.turn] is None or not self.computing:
            return False
        keys, blk = tk[req.turn]
        k = content_hit(keys, req.prompt, blk, self.stored_keys) // blk
        n = self.computing.run(keys, k, (req.prompt - 1) // blk)
        if n == 0 or n * blk < (self.sc.inflight_prefix_min_tokens or 0):
            return False
        limit = self.sc.inflight_prefix_wait_s
        if limit is None:
            return True
        now = self.loop.now
        if req.t_held < 0:
            req.t_held = now
        return now - req.t_held < limit

    def _want_fetch(self) -> None:
        if self._fetch_at >= 0 or not self.sched.waiting():
            return
        t = max(self.loop.now, self._last_fetch + self.sc.fetch_interval_s)
        self._fetch_at = t
        self.loop.at(t, self._fetch)

    def _fetch(self) -> None:
        self._fetch_at = -1.0
        self._last_fetch = self.loop.now
        g = self.sc.gpus_per_node
        pes, des = self.pes, self.des
        beta = self.params.beta_tokens
        if not any(e.tok <= beta for e in pes):
            return  # the core gives nothing to overloaded PEs; a PE that frees asks for a fetch again
        self.fetches += 1
        self.meter.sample_attention(self.loop.now)
        # PEs over beta are left out of the snapshots: the core never gives them work (Algorithm 1's class C1, and
        # the least-loaded rule's cap), every engine of a node reports the node's read queue, and the window/headroom
        # counts only PEs under beta, so the decisions are identical and a fetch costs O(free PEs), not O(all PEs).
        pe_groups = [
            [EngineSnapshot(e.idx, e.node.idx, e.seq, e.tok, e.node.read_q, 0, self._work_now(e))
             for e in pes[n * g:(n + 1) * g] if e.tok <= beta]
            for n in range(self.sc.P)
        ]
        pe_groups = [grp for grp in pe_groups if grp]
        de_groups = [
            [EngineSnapshot(e.idx, e.node.idx, e.seq, e.tok, e.node.read_q, e.free_kv) for e in des[n * g:(n + 1) * g]]
            for n in range(self.sc.D)
        ]
        kv_need = self.params.kv_need
        bt = self.bt
        for a in self.sched.schedule(pe_groups, de_groups):
            req = self.reqs[a.rid]
            pe, de = pes[a.pe], des[a.de]
            req.pe, req.de, req.path = a.pe, a.de, a.path
            req.t_assign = self.loop.now
            pe.seq += 1
            pe.tok += req.prompt
            pe.work += req.work  # (set by _pe_work as the core charged it; else the prompt)
            de.seq += 1
            de.tok += req.prompt
            de.free_kv -= kv_need(req.prompt, req.gen)
            if self.oracle or req.hit == 0:
                req.pe_tok, req.de_tok = 0, 0
            else:
                pe_tok = min(req.hit, a.pe_blocks * bt)
                req.pe_tok, req.de_tok = pe_tok, req.hit - pe_tok
            self.hit_tokens += req.hit
            self.prompt_tokens += req.prompt
            if req.pe_tok:
                req.reads_left += 1
                self._enqueue_read(pe.node, req, req.pe_tok)
            if req.de_tok:
                req.reads_left += 1
                self._enqueue_read(de.node, req, req.de_tok)
            if req.reads_left == 0:
                self._ready(req)
        # requests left waiting are blocked on a full PE or DE: whatever frees one asks for the next fetch

    # ---------------------------------------------------------------------------------------------------------
    # storage reads
    # ---------------------------------------------------------------------------------------------------------
    def _enqueue_read(self, node: Node, req: Req, tokens: int) -> None:
        node.read_q += tokens
        node.queue.append((req, tokens, tokens * self.kvb))
        self._pump_reads(node)

    def _pump_reads(self, node: Node) -> None:
        q = node.queue
        while q and node.active < self.sc.read_slots:
            req, tokens, nbytes = q[0]
            if node.buf_used > 0 and node.buf_used + nbytes > node.buf_cap:
                break
            q.popleft()
            node.active += 1
            node.buf_used += nbytes
            node.read_bytes += nbytes
            node.snic.start(nbytes, KV, self._read_done, node, req, tokens, nbytes)

    def _read_done(self, node: Node, req: Req, tokens: int, nbytes: float) -> None:
        node.active -= 1
        node.read_q -= tokens
        node.dram_bytes += nbytes  # SNIC -> DRAM write
        if node.role == "pe":
            self.bytes_pe_path += nbytes
        else:
            self.bytes_de_path += nbytes
        req.reads_left -= 1
        if req.reads_left == 0:
            self._ready(req)
        self._pump_reads(node)

    # ---------------------------------------------------------------------------------------------------------
    # prefill
    # ---------------------------------------------------------------------------------------------------------
    def _ready(self, req: Req) -> None:
        req.t_ready = self.loop.now
        pe = self.pes[req.pe]
        pe.pending.append(req)
        if not pe.busy:
            self._start_batch(pe)

    def _pack(self, pe: PE) -> list[tuple[Req, int]]:
        pending = pe.pending
        if self.hbm_tok is not None:  # non-layer-wise: the batch's whole KV must fit PE HBM
            cap = self.hbm_tok
            take: list[Req] = []
            used = 0
            for r in pending:
                if take and used + r.prompt > cap:
                    break
                take.append(r)
                used += r.prompt
            pending = take
        pp = [PendingPrefill(r.rid, r.cached, r.remaining) for r in pending[:64]]
        # adaptive never-lose floor: only while the node's storage reads keep up (read queue <= alpha); when storage is
        # the bottleneck the paper's quota applies unchanged
        floor = self.min_batch if pe.node.read_q <= self.params.alpha_tokens else 0
        fb = pack_forward_batch(pp, self.quota, self.attn_time, self.sc.max_batch_tokens, floor,
                                more_queued=len(pending) > len(pp))
        by_rid = {r.rid: r for r in pending}
        return [(by_rid[c.rid], c.new) for c in fb.chunks]

    def _start_batch(self, pe: PE) -> None:
        if not pe.pending:
            return
        chunks = self._pack(pe)
        pe.busy = True
        b = Batch(pe, chunks)
        b.compute_s = self.sc.compute.prefill_time([(r.cached, n) for r, n in chunks])
        pe.compute_s += b.compute_s
        pe.batches += 1
        self.meter.batch_started(pe.idx, chunks)
        new = sum(n for _, n in chunks)
        pe.new_tok += new
        if self.sched.pe_work is not None:  # the forward's share of its requests' work leaves the PE's queue
            for r, n in chunks:
                d = r.work if n >= r.remaining else r.work * n // r.remaining
                r.work -= d
                pe.work -= d
        if self.curve is not None:
            pe.small_s += b.compute_s * (1.0 - curve_efficiency(new, self.curve) / self.curve[-1][1])
        pe.comp_start, pe.comp_end = self.loop.now, self.loop.now + b.compute_s
        if self.oracle:
            b.left = 1
            traffic.prefill_start(self, b, self._batch_part)  # compute + its all-to-all (HIGH) traffic
            return
        kvb = self.kvb
        inflows: dict[Link, float] = {}
        out: dict[Link, float] = {}
        des = self.des
        for r, n in chunks:
            cached_b = r.cached * kvb
            if r.path is PathKind.PE:
                out_b = (n + (r.hit if r.first_chunk else 0)) * kvb
                inflows[pe.cnic_r] = inflows.get(pe.cnic_r, 0.0) + cached_b  # H2D source (DRAM read)
                pe.node.dram_bytes += cached_b
            else:  # DE or SPLIT: hit streamed from the DE (SPLIT: PE part read locally)
                out_b = n * kvb + (r.pe_tok * kvb if r.first_chunk else 0.0)
                de_part = min(cached_b, r.de_tok * kvb)
                pe_part = cached_b - de_part
                de = des[r.de]
                inflows[de.cnic_r] = inflows.get(de.cnic_r, 0.0) + de_part
                de.node.dram_bytes += de_part
                if pe_part > 0:
                    inflows[pe.cnic_r] = inflows.get(pe.cnic_r, 0.0) + pe_part
                    pe.node.dram_bytes += pe_part
            inflows[pe.cnic_w] = inflows.get(pe.cnic_w, 0.0) + cached_b  # into PE HBM
            de_w = des[r.de].cnic_w
            out[pe.cnic_r] = out.get(pe.cnic_r, 0.0) + out_b
            out[de_w] = out.get(de_w, 0.0) + out_b
            des[r.de].node.dram_bytes += out_b
        if self.layerwise:
            for link, nb in out.items():
                inflows[link] = inflows.get(link, 0.0) + nb
            flows = [(lk, nb) for lk, nb in inflows.items() if nb > 0]
            b.left = len(flows) + 1
            for lk, nb in flows:
                lk.start(nb, KV, self._batch_part, b)
            traffic.prefill_start(self, b, self._batch_part)  # compute + its all-to-all (HIGH) traffic
        else:
            b.out = [(lk, nb) for lk, nb in out.items() if nb > 0]
            flows = [(lk, nb) for lk, nb in inflows.items() if nb > 0]
            b.phase = 0
            b.left = len(flows)
            if not flows:
                self._phase_done(b)
            for lk, nb in flows:
                lk.start(nb, KV, self._phase_part, b)

    def _phase_part(self, b: Batch) -> None:
        b.left -= 1
        if b.left == 0:
            self._phase_done(b)

    def _phase_done(self, b: Batch) -> None:
        b.phase += 1
        if b.phase == 1:  # H2D done: compute
            b.pe.comp_start, b.pe.comp_end = self.loop.now, self.loop.now + b.compute_s
            b.left = 1
            traffic.prefill_start(self, b, self._phase_part)
        elif b.phase == 2:  # compute done: ship KV out
            b.left = len(b.out)
            if not b.out:
                self._batch_done(b)
            for lk, nb in b.out:
                lk.start(nb, KV, self._phase_part, b)
        else:
            self._batch_done(b)

    def _batch_part(self, b: Batch) -> None:
        b.left -= 1
        if b.left == 0:
            self._batch_done(b)

    def _batch_done(self, b: Batch) -> None:
        pe = b.pe
        now = self.loop.now
        finished: dict[int, list[Req]] = {}
        done_ids = set()
        for r, n in b.chunks:
            r.cached += n
            r.remaining -= n
            r.first_chunk = False
            if r.remaining <= 0:
                done_ids.add(r.rid)
                r.t_first = now
                pe.seq -= 1
                pe.tok -= r.prompt
                pe.work -= r.work
                if r.pe_tok:
                    pe.node.buf_used -= r.pe_tok * self.kvb
                finished.setdefault(r.de, []).append(r)
        if done_ids:
            pe.pending = [r for r in pe.pending if r.rid not in done_ids]
        pe.busy = False
        if pe.pending:
            self._start_batch(pe)
        for de_idx, reqs in finished.items():
            self._to_decode(self.des[de_idx], reqs)
        if done_ids:
            self._pump_reads(pe.node)
            self._want_fetch()

    # ---------------------------------------------------------------------------------------------------------
    # decode
    # ---------------------------------------------------------------------------------------------------------
    def _to_decode(self, de: DE, reqs: list[Req]) -> None:
        if self.oracle:
            for r in reqs:
                self._join(de, r)
            return
        nbytes = sum(r.prompt for r in reqs) * self.kvb
        de.node.dram_bytes += nbytes
        box = [2]
        de.cnic_r.start(nbytes, KV, self._h2d_part, de, reqs, box)
        de.cnic_w.start(nbytes, KV, self._h2d_part, de, reqs, box)

    def _h2d_part(self, de: DE, reqs: list[Req], box: list[int]) -> None:
        box[0] -= 1
        if box[0]:
            return
        node = de.node
        for r in reqs:
            if r.de_tok:
                node.buf_used -= r.de_tok * self.kvb
            self._join(de, r)
        self._pump_reads(node)

    def _advance_de(self, de: DE) -> None:
        now = self.loop.now
        if de.tau > 0:
            de.S += (now - de.t) / de.tau
            de.busy_s += now - de.t
            de.req_s += len(de.heap) * (now - de.t)
        de.t = now

    def _join(self, de: DE, r: Req) -> None:
        self._advance_de(de)
        r.t_join = self.loop.now
        tk = self.turn_keys[r.agent]
        if tk is not None and tk[r.turn] is not None:  # the DE persists the prompt's full blocks as decode starts
            keys, blk = tk[r.turn]
            self.stored_keys.update(keys[: r.prompt // blk])
            if r.computing:
                self._stored(r)
        steps = r.gen - 1
        if steps <= 0:
            self._finish(de, r, self.loop.now + 0.0)
            return
        kb, fl = self.sc.compute.decode_request_cost(r.prompt)
        de.bytes += kb
        de.flops += fl
        r.s_end = de.S + steps
        heapq.heappush(de.heap, (r.s_end, r.rid, r))
        self._retime(de)

    def _computes(self, info: RequestInfo) -> None:
        """The core's ``on_assign``: register the content keys an assigned request computes (past its hit, up to
        its full input blocks) until its join stores them."""
        req = self.reqs[info.rid]
        tk = self.turn_keys[req.agent]
        if tk is None or tk[req.turn] is None:
            return
        keys, blk = tk[req.turn]
        req.computing = keys[req.hit // blk: req.prompt // blk]
        self.computing.add(req.computing)

    def _stored(self, r: Req) -> None:
        """A request's computed keys are stored (its join): requests held on them may go."""
        self.computing.remove(r.computing)
        r.computing = []
        self._want_fetch()

    def _retime(self, de: DE) -> None:
        n = len(de.heap)
        de.tau = self.sc.compute.decode_step_time(n, de.bytes, de.flops) if n else 0.0
        de.tau = traffic.decode_step(self, de, n, de.tau)  # the step's all-to-all on the DE's CNIC
        de.ver += 1
        if n:
            dt = max(0.0, (de.heap[0][0] - de.S) * de.tau)
            self.loop.after(dt, self._de_event, de, de.ver)

    def _de_event(self, de: DE, ver: int) -> None:
        if ver != de.ver:
            return
        self._advance_de(de)
        h = de.heap
        done = []
        now, tau = self.loop.now, de.tau
        # done: within the step tolerance, or too close for the clock to reach (as for a link's flows)
        while h and (h[0][0] - de.S <= 1e-7 * (1.0 + h[0][0]) or now + (h[0][0] - de.S) * tau <= now):
            _, _, r = heapq.heappop(h)
            kb, fl = self.sc.compute.decode_request_cost(r.prompt)
            de.bytes -= kb
            de.flops -= fl
            done.append(r)
        if not h:
            de.bytes = de.flops = 0.0
            de.S = 0.0
        for r in done:
            self._finish(de, r, now)
        self._retime(de)

    def _finish(self, de: DE, r: Req, now: float) -> None:
        de.seq -= 1
        de.tok -= r.prompt
        de.free_kv += self.params.kv_need(r.prompt, r.gen)
        steps = r.gen - 1
        self.rec_submit.append(r.t_submit)
        self.rec_ttft.append(r.t_first - r.t_submit)
        t_second = r.t_join + ((now - r.t_join) / steps if steps > 0 else 0.0)
        self.rec_ttst.append(t_second - r.t_submit)
        self.rec_tpot.append((now - r.t_join) / steps if steps > 0 else 0.0)
        self.rec_done.append(now)
        self.meter.request_done(r, now)
        self.gen_tokens += r.gen
        self.completed += 1
        bt = self.bt
        persist = ((r.prompt + r.gen) // bt - r.hit // bt) * bt * self.kvb
        if not self.oracle and persist > 0:
            de.node.write_bytes += persist
            de.node.dram_bytes += 2 * persist
        del self.reqs[r.rid]
        agent = r.agent
        br = self.bd_req
        br[0] += r.t_assign - r.t_submit
        br[1] += r.t_ready - r.t_assign
        br[2] += r.t_first - r.t_ready
        self.agent_ctx[agent] = r.prompt + r.gen
        self.agent_turn[agent] += 1
        self._want_fetch()
        self._next_turn(agent)

    # ---------------------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[str], None] | None = None, every_s: float = 500.0) -> Simulation:
        """Run to the end (offline) or the horizon (online); ``progress`` gets a line every ``every_s`` sim-seconds."""
        self.reqs: dict[int, Req] = {}
        sc = self.sc
        for a, traj in enumerate(sc.trajectories):
            t0 = float(getattr(traj, "arrival", 0.0)) if sc.mode == "online" else 0.0
            self.loop.at(t0, self._next_turn, a)
        if progress is not None:
            self._progress = progress
            self.loop.at(every_s, self._tick, every_s)
        if self.breakdown_dt > 0:
            self.loop.at(self.breakdown_dt / 2, self._sample, self.breakdown_dt)
        self.loop.run(until=sc.horizon_s)
        return self

    def _sample(self, dt: float) -> None:
        """One breakdown sample: what every PE is doing now, counted for ``dt`` seconds."""
        now = self.loop.now
        waiting = self.sched.waiting() > 0
        acc = self.bd_pe
        for pe in self.pes:
            if pe.busy:
                acc[0 if pe.comp_start <= now < pe.comp_end else 1] += dt
            elif pe.seq > 0:
                acc[2] += dt
            else:
                acc[3 if waiting else 4] += dt
        if len(self.loop) and self.completed < self.n_requests:
            self.loop.after(dt, self._sample, dt)

    def breakdown(self) -> dict[str, Any]:
        """Per-PE time shares (sampled: ``breakdown_dt`` > 0 before :meth:`run`) and per-request waits.

        ``compute``: a forward is computing (``small_batch`` of it: the time lost to batches below the saturating
        size, exact); ``transfer``: a batch waits for its KV flows (non-layer-wise H2D / KV out, or layer-wise
        flows outlasting compute); ``read_wait``: idle, its assigned requests are still being read from storage;
        ``sched_wait``: idle with requests waiting in the global queue (fetch interval, DE memory, thresholds);
        ``no_work``: idle, nothing waiting. Request means: global queue, storage read, PE queue + prefill.
        """
        tot = sum(self.bd_pe)
        comp = sum(p.compute_s for p in self.pes)
        n = max(1, self.completed)
        names = ("compute", "transfer", "read_wait", "sched_wait", "no_work")
        out: dict[str, Any] = {k: (v / tot if tot else float("nan")) for k, v in zip(names, self.bd_pe, strict=True)}
        out["small_batch"] = (sum(p.small_s for p in self.pes) / comp * out["compute"]) if comp and tot else float("nan")
        batches = sum(p.batches for p in self.pes)
        out["mean_batch_tokens"] = sum(p.new_tok for p in self.pes) / batches if batches else 0.0
        out["req_queue_s"], out["req_read_s"], out["req_prefill_s"] = (x / n for x in self.bd_req)
        return out

    def _tick(self, every_s: float) -> None:
        self._progress(f"  t={self.loop.now:.0f}s: {self.completed}/{self.n_requests} requests done, "
                       f"{self.sched.waiting()} waiting")
        if self.completed < self.n_requests and (self.reqs or self.sched.waiting()):
            self.loop.after(every_s, self._tick, every_s)

    # live requests at the end (online runs stop at the horizon)
    def unfinished(self) -> list[Req]:
        return list(self.reqs.values())

    def links(self) -> dict[str, list[Link]]:
        return {
            "snic_pe": [n.snic for n in self.pe_nodes],
            "snic_de": [n.snic for n in self.de_nodes],
            "cnic_pe_read": [e.cnic_r for e in self.pes],
            "cnic_pe_write": [e.cnic_w for e in self.pes],
            "cnic_de_read": [e.cnic_r for e in self.des],
            "cnic_de_write": [e.cnic_w for e in self.des],
        }

    def stats(self) -> dict[str, Any]:
        return {"events": self.loop.events, "fetches": self.fetches}
