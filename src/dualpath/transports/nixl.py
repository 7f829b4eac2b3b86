"""NIXL transport: agents over UCX (RDMA where present; TCP or shared memory otherwise).

Memory is registered with the local agent once per buffer (:meth:`register`). A small ZeroMQ side channel (binary
:mod:`~dualpath.transports.wire` headers, no pickle) exchanges agent metadata on :meth:`connect` and the landing
grants. **One handshake per request, not per write**: a sender with no grant for a tag asks for it ``(tag, size)``
(REQ); the receiver answers with that landing's address and, in the same message, the addresses of every other
landing of the tag's *request group* exposed now (:func:`_group`: ``r{rid}/{what}`` of the engines' tags), each
claimed for that sender (so no other arrival lands there) under its own epoch; landings of the group exposed later
are pushed to that sender as they are exposed (one message per event-loop pass). The request leaves at once (the
group's first thing to wait on). Concurrent writes of a group wait for the group's request in flight instead of
asking again; a grant pushed meanwhile wakes them to take it, the rest wait on for the answer. The sender then
writes each layer one-sided: a NIXL WRITE (from descriptor lists prepared once per local span and per remote
landing, :meth:`nixl_agent.prep_xfer_dlist`, and reused) whose notification carries ``(seq, tag, epoch, checksum)``;
the receiver, on that notification, completes the slot. A sender writes once under a grant: a second write of the
tag asks again and is refused. ``write`` returns when NIXL reports the WRITE complete; with a checksum the receiver
first verifies it and acknowledges (ACK), and ``write`` returns on the ACK. Without a checksum a write whose grant
is already held posts at once, and one NIXL completes inside ``transfer`` (a local copy, e.g. UCX's CMA) returns
with no deadline timer, future or event-loop hop (nothing can revoke it in between: one thread). Such writes
issued while another write to the same peer is in flight join a batch posted at the end of the event-loop pass as
one NIXL WRITE of several descriptors (:meth:`NixlTransport._post_batch`), its notification a
:data:`~dualpath.transports.wire.Kind.DONES` naming every landing, each completed by the receiver as if alone;
each still writes once under its own grant, and one revoked before the post is refused alone.

**Revocation fence.** When a granted landing is withdrawn before its notification (``cancel``, a timed-out
``wait``; or another sender asks for it) the receiver revokes ``(tag, epoch)``: the sender drops the grant,
starts no write under it, waits for the one already posted (if any) and acknowledges; notifications of a revoked
epoch are dropped. A grant still in the push box is not sent, and one whose revocation overtook its push (a cancel
right after the expose: the revocation leaves at once, pushes at the end of the loop pass) is ignored on arrival.
The receiver keeps polling while a fence waits (the revoked sender's WRITE in flight may need its progress to end).
The acknowledgement says whether a write without a checksum completed under the grant (``W``; such a writer
returned as delivered, no verdict awaited): when another sender's request took the landing over, that write is then
the landing's one arrival and the request is refused. A timed-out ``wait`` returns only after that
acknowledgement; ``cancel`` (synchronous) starts
the fence and :meth:`NixlTransport.settle` awaits every fence started. A sender that does not acknowledge within
``_FENCE_S`` gets its groups forgotten and the landing's region is deregistered and registered again (its
remote keys invalid; honest peers reload the metadata on their next grant), so a silent sender cannot write
into memory the caller reuses. Side-channel messages are drained in batches and answered with one message per
peer.

**Progress.** A sender polls its posted WRITEs' states on the event loop while any are outstanding (every loop
pass while they progress, as a raw sender spins). A receiver polls the notifications of its outstanding grants
on the event loop too (timed sleeps of ``poll_interval_s``, ~1 ms in practice), so every NIXL call happens on one
thread. With ``notif_thread`` (``auto``: where the process may use at least 8 CPUs) a notification thread (:class:`_NotifPump`) polls them every ``notif_poll_s``
(0.1 ms, a raw receiver's pace) while grants are outstanding, every ``notif_idle_poll_s`` after 20 ms without
one, parked on an event while none is, handing batches to the loop with ``call_soon_threadsafe``; NIXL's agent
locks nothing in its default sync mode (only with its own listener thread), so the agent is then created with
``NIXL_THREAD_SYNC_STRICT`` (one agent-wide lock). On 2 shared cores the thread measured faster only at 16 MiB
and used more CPU (up to 1.6x at 64 KiB; issue 16), hence off there; on a 16-core H200 host (VRAM to VRAM) it
gave 1.7-2.9x the loop's throughput, hence on there. These polls drive UCX progress; NIXL's own progress thread is off
unless ``progress_thread`` (then created with ``progress_thread_delay_us``: the Python wrapper's delay 0 spins a
core even when idle). ``nixl`` is imported lazily here only (``pip install dualpath[nixl]``); ``UCX_TLS``
defaults to ``tcp,self,sm`` when unset (CPU machines; keep ``tcp``), with ``cuda_copy,cuda_ipc`` added where a
CUDA GPU is present (VRAM regions).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import anyio
import torch
import zmq
import zmq.asyncio

from dualpath.errors import PeerTimeout, TransportClosed, TransportError
from dualpath.transports.base import Region, Transport
from dualpath.transports.config import NixlTransportConfig
from dualpath.transports.landing import Rejected, Slot
from dualpath.transports.nixl_agent import (
    _DlistCache,
    _import_nixl,
    _make_agent,
    _mem,
    _NotifPump,
    _release,
    ucx_tls_with_cuda,
)
from dualpath.transports.wire import (
    Header,
    Kind,
    Status,
    WireError,
    checksum_of,
    decode,
    encode,
    encode_fields,
    pack_dones,
    pack_grants,
    unpack_dones,
    unpack_grants,
)

log = logging.getLogger("dualpath.transports.nixl")


_OFFERS = 4096  # request groups remembered as granted to a sender (LRU)
_REVOKED_KEPT = 4096  # revoked (tag, epoch) pairs remembered, so their late notifications are dropped
_FENCE_S = 2.0  # how long a revocation waits for the sender's acknowledgement before re-registering the region
_SPIN_S = 0.005  # a sender with writes posted polls every loop pass while they progressed this recently
_DRAIN = 256  # side-channel messages handled per wake-up before yielding
_PUSH_CHUNK = 32  # pushed grants leave in messages of at most this many (the first ones need not wait for the rest)
_BATCH_BYTES = 32 << 20  # a batch queued for one WRITE is posted as soon as it holds this many bytes (its first
# writer waits for the whole WRITE; 8 MiB measured 0.80 at 1 MiB against 0.87 unbounded)
_SCAN_S = 0.05  # how often outstanding grants are checked for landings withdrawn without a revocation
_PUMP_JOIN_S = 2.0  # close() waits this long for the notification pump to end
_U8 = torch.uint8
_DRAM = ("DRAM", 0)
_EXPIRED = "EXPIRED"  # the state _progress gives a posted WRITE still in progress at its deadline


def _group(tag: str) -> str:
    """The request group of ``tag``: its first two ``/``-separated fields (the engines' ``r{rid}/{what}``), or,
    without ``/``, the tag less its trailing decimal index. Grouping only decides which landings are granted
    together; exactly-once and the revocation fence hold for any grouping."""
    i = tag.find("/")
    if i >= 0:
        j = tag.find("/", i + 1)
        return tag if j < 0 else tag[:j]
    return tag.rstrip("0123456789") or tag


@dataclass(eq=False, slots=True)
class _Grant:
    """A landing claimed for one sender's write under a request-level ``epoch``."""

    slot: Slot
    sender: str
    ident: bytes
    epoch: int


@dataclass(slots=True)
class _Remote:
    """A grant as the sender holds it: where to write ``tag``'s bytes, under which epoch."""

    addr: int
    nbytes: int
    mem: str
    dev: int
    md_epoch: int
    epoch: int


@dataclass(eq=False, slots=True)
class _Batch:
    """Fast-path writes to one peer queued during one event-loop pass, posted together at its end
    (:meth:`NixlTransport._post_batch`): ``(tag, source, grant, local memory, writer's future)`` each."""

    deadline: float
    items: list[tuple[str, torch.Tensor, _Remote, tuple[str, int], asyncio.Future[str]]]
    nbytes: int = 0
    posted: bool = False


def _drop_result(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("side-channel send failed: %r", fut.exception())


class NixlTransport(Transport):
    kind = "nixl"
    receives_into_host_views = False  # the sender's NIXL WRITE lands the bytes

    def __init__(self, name: str, config: NixlTransportConfig | None = None) -> None:
        cfg = config or NixlTransportConfig()
        super().__init__(name, checksum=cfg.checksum, max_pending_bytes=cfg.max_pending_bytes,
                         pending_timeout_s=cfg.pending_timeout_s)
        self.config = cfg
        self._agent: Any = None
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._endpoint = ""
        self._peers: dict[str, _Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)
        self._granted: dict[str, _Grant] = {}  # by tag: landings granted to a sender, not yet notified
        self._offers: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # request group -> (sender, its ident)
        self._idents: dict[str, bytes] = {}  # sender (agent) name -> its side-channel ident, from its HELLO
        self._remote_agents: set[str] = set()  # agents whose metadata we loaded
        self._epochs = itertools.count(1)
        self._revoking: OrderedDict[tuple[str, int], tuple[asyncio.Event, bytes]] = OrderedDict()  # -> (acked, ident)
        #: revoked grants whose sender acknowledged a quiet write under them as done (it returned as delivered)
        self._written: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._held: dict[str, int] = {}  # tags with requests held until exposed (how many)
        # grants pushed on expose, flushed as one GRANTS frame per sender per loop pass
        self._push: dict[bytes, list[tuple[str, int, int, int, int, int]]] = {}
        self.handshakes = 0  # REQ round trips this endpoint made as a sender (one per request group)
        self.shared_writes = 0  # writes posted together with others in one NIXL WRITE (a busy peer's batch)
        # posted WRITEs polled by _progress: (handle, future of its final state, deadline in loop time)
        self._inflight: dict[int, tuple[Any, asyncio.Future[str], float]] = {}
        self._xids = itertools.count(1)
        self._work: asyncio.Event | None = None
        self._local_dl: _DlistCache | None = None
        self._limiter = anyio.CapacityLimiter(2)
        self._md_epoch = 0
        self._fences: set[asyncio.Future[None]] = set()
        self._pump: _NotifPump | None = None
        self._src_region: Region | None = None  # the region of the last fast-path write's source

    @property
    def address(self) -> str:
        if not self._endpoint:
            raise TransportError(f"{self.name}: address is known after start()")
        return self._endpoint

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_open()
        if self._started:
            return
        if self.config.ucx_tls is not None:
            os.environ.setdefault("UCX_TLS", ucx_tls_with_cuda(self.config.ucx_tls))
        nixl_mod = _import_nixl()
        # with the notification pump, two threads call the agent: NIXL's agent-wide lock (STRICT) serialises them
        # (the default mode, without NIXL's listener thread, locks nothing); without it every NIXL call happens
        # on the event loop's thread
        sync = nixl_mod.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT if self.config.uses_notif_thread else None
        conf = nixl_mod.nixl_agent_config(backends=[self.config.backend],
                                          enable_prog_thread=self.config.progress_thread, sync_mode=sync)
        self._agent = await anyio.to_thread.run_sync(
            _make_agent, nixl_mod, self.name, conf,
            self.config.progress_thread_delay_us if self.config.progress_thread else None)
        if self.config.backend not in self._agent.backends:
            raise TransportError(f"{self.name}: NIXL backend {self.config.backend!r} is not available "
                                 f"(plugins: {self._agent.plugin_list})")
        self._local_dl = _DlistCache(self._agent, "NIXL_INIT_AGENT")
        self._work = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://{self.config.host}:{self.config.port or '*'}")
        self._endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
        self._router = router
        self._spawn(self._recv_loop())
        self._spawn(self._progress())
        if self.config.uses_notif_thread:
            self._pump = _NotifPump(self.name, self._agent, asyncio.get_running_loop(), self._deliver, self.config)
            self._pump.start()
        for region in self._regions.values():
            self._register_memory(region)
        await super().start()

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        if self._pump is not None:  # first: no NIXL call from it while the rest is torn down
            if not self._pump.stop(_PUMP_JOIN_S):
                log.warning("%s: the NIXL notification thread did not stop within %g s", self.name, _PUMP_JOIN_S)
            self._pump = None
        for task in [*self._tasks, *self._fences]:
            task.cancel()
        for peer in self._peers.values():
            peer.close(f"{self.name}: transport closed")
        self._peers.clear()
        for handle, fut, _ in self._inflight.values():
            _release(handle)
            if not fut.done():
                fut.set_result("ERR transport closed")
        self._inflight.clear()
        if self._local_dl is not None:
            self._local_dl.drop()
        if self._router is not None:
            self._router.close(linger=0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        await asyncio.sleep(0)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- memory ---------------------------------------------------------------------------------------------
    def _register_memory(self, region: Region) -> None:
        if self._agent is None or region.handle is not None:
            return  # registered at start()
        try:
            region.handle = self._agent.register_memory(region.bytes)
            self._md_epoch += 1  # peers that loaded older metadata refresh it on their next GRANT
        except Exception as exc:
            raise TransportError(f"{self.name}: NIXL could not register {region.nbytes} bytes on "
                                 f"{region.device}: {exc}") from exc

    def _deregister_memory(self, region: Region) -> None:
        if self._src_region is region:
            self._src_region = None  # the fast path looks sources up again (this one may be gone for good)
        if self._agent is not None and region.handle is not None:
            if self._local_dl is not None:
                self._local_dl.drop(region.addr, region.addr + region.nbytes)
            with contextlib.suppress(Exception):
                self._agent.deregister_memory(region.handle)
            region.handle = None

    # --- progress: transfer states on the event loop; notifications on the pump thread (or the loop) ---------
    async def _progress(self) -> None:
        """Poll our posted WRITEs' states while any are outstanding (and, without the pump thread, the
        notifications of outstanding grants); every ``_SCAN_S`` while grants are outstanding, revoke those whose
        landing was withdrawn some other way."""
        assert self._work is not None
        agent, interval = self._agent, self.config.poll_interval_s
        loop = asyncio.get_running_loop()
        last = scanned = loop.time()
        while True:
            if not self._inflight and not self._granted and not self._fences:
                if self._pump is not None:
                    self._pump.pause()
                self._work.clear()
                await self._work.wait()
                last = scanned = loop.time()
                continue
            moved = False
            now = loop.time()
            for xid, (handle, fut, deadline) in list(self._inflight.items()):
                try:
                    state = agent.check_xfer_state(handle)
                except Exception as exc:  # pragma: no cover - NIXL error path
                    state = f"ERR {exc}"
                if state == "PROC" and now >= deadline:
                    state = _EXPIRED  # the writer raises PeerTimeout and releases the handle (NIXL aborts it)
                if state != "PROC":
                    moved = True
                    del self._inflight[xid]
                    if not fut.done():
                        fut.set_result(state)
            if self._granted or self._fences:  # (a fenced sender's write in flight needs our progress to end)
                if self._pump is None:
                    try:
                        notifs = agent.get_new_notifs()
                    except Exception as exc:  # pragma: no cover
                        log.error("%s: polling NIXL notifications failed: %r", self.name, exc)
                        notifs = {}
                    moved = self._deliver(notifs) or moved
                if now - scanned >= _SCAN_S:  # grants whose landing was withdrawn some other way, fenced too
                    scanned = now
                    for tag in [k for k, v in self._granted.items() if v.slot.withdrawn]:
                        self._revoke(tag)
            if moved:
                last = now
            if self._inflight or self._pump is None:
                # our posted writes: poll again after one loop pass, as a raw sender spins on its transfer states
                # (a timed asyncio sleep rounds up to the selector's 1 ms tick, a bubble under sub-millisecond
                # writes); writes that stall (a slow peer) fall back to the timed poll after _SPIN_S without progress
                await asyncio.sleep(0 if moved or (self._inflight and now - last < _SPIN_S) else interval)
            else:  # only grants, their notifications on the pump: wake for the next scan, or for a posted write
                self._work.clear()
                with anyio.move_on_after(_SCAN_S):
                    await self._work.wait()

    def _deliver(self, notifs: dict[str, list[bytes]]) -> bool:
        """Complete the landings of a batch of notifications (on the event loop); whether there were any. The
        pump goes idle once no grant is outstanding."""
        if self._closed:  # handed over by the pump just before close()
            return False
        moved = False
        for agent_name, msgs in notifs.items():
            for msg in msgs:
                moved = True
                self._on_notif(str(agent_name), bytes(msg))
        if self._pump is not None and not self._granted and not self._fences:
            self._pump.pause()
        return moved

    def _kick(self) -> None:
        if self._work is not None:
            self._work.set()
        if self._pump is not None and (self._granted or self._fences):
            self._pump.resume()

    # --- side channel ---------------------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        """Await one message, drain the queued ones without suspending, answer each peer with one message."""
        router = self._router
        assert router is not None
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(router.underlying)
        while True:
            ident = await router.recv()
            out: dict[bytes, list[bytes]] = {}
            for _ in range(_DRAIN):
                frames = [ident]
                while sync.rcvmore:
                    frames.append(sync.recv(zmq.NOBLOCK))
                try:
                    self._on_message(frames, out)
                except Exception as exc:
                    log.error("%s: error handling a side-channel message: %r", self.name, exc)
                try:
                    ident = sync.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            for dest, replies in out.items():  # through the asyncio socket: it re-arms its wake-up
                with contextlib.suppress(zmq.ZMQError):
                    await router.send_multipart([dest, *replies])

    async def _reply(self, ident: bytes, hdr: Header | bytes) -> None:
        if self._router is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                await self._router.send_multipart([ident, hdr if isinstance(hdr, bytes) else encode(hdr)])

    def _on_message(self, frames: list[bytes], out: dict[bytes, list[bytes]]) -> None:
        ident = frames[0]

        def reply(hdr: Header | bytes) -> None:
            if not self._closed:
                out.setdefault(ident, []).append(hdr if isinstance(hdr, bytes) else encode(hdr))

        if len(frames) < 2:
            self._landings.reject("?", "side-channel message without a header frame")
            reply(Header(Kind.ACK, 0, "", status=Status.BAD, extra=b"expected header frames, got none"))
            return
        for frame in frames[1:]:  # a sender batches the requests of its concurrent writes
            try:
                hdr = decode(frame)
            except WireError as exc:
                self._landings.reject("?", f"bad side-channel message: {exc}; nothing written")
                reply(Header(Kind.ACK, 0, "", status=Status.BAD, extra=str(exc).encode()))
                continue
            self._on_request(ident, hdr, reply)

    def _on_request(self, ident: bytes, hdr: Header, reply: Callable[[Header | bytes], None]) -> None:
        if hdr.kind is Kind.REQ:
            self._on_req(ident, hdr.extra.decode("utf-8", "replace"), hdr, reply)
        elif hdr.kind is Kind.DONE and hdr.extra[:1] in (b"R", b"W"):  # a sender's acknowledgement of a revocation
            entry = self._revoking.get((hdr.tag, hdr.arg))
            if entry is not None:
                if hdr.extra[:1] == b"W":  # its write under the grant landed and it returned as delivered
                    self._written[(hdr.tag, hdr.arg)] = None
                    while len(self._written) > _REVOKED_KEPT:
                        self._written.popitem(last=False)
                entry[0].set()
        elif hdr.kind is Kind.HELLO:
            try:
                who = self._load_remote(hdr.tag, hdr.extra)
                idents = self._idents
                idents.pop(who, None)
                idents[who] = ident  # where grants for its writes go, when an expose names it
                if len(idents) > _OFFERS:
                    del idents[next(iter(idents))]
            except Exception as exc:
                reason = f"bad agent metadata: {exc}"
                self._landings.reject("?", reason)
                reply(Header(Kind.HELLO, hdr.seq, "", status=Status.BAD, extra=reason.encode()))
                return
            md = self._agent.get_agent_metadata()
            reply(Header(Kind.HELLO, hdr.seq, self.name, arg=self._md_epoch, extra=md))
        else:
            reason = f"unexpected {hdr.kind.name} on the side channel"
            self._landings.reject("?", reason)
            reply(Header(Kind.ACK, hdr.seq, hdr.tag, status=Status.BAD, extra=reason.encode()))

    def _on_req(self, ident: bytes, sender: str, hdr: Header, reply: Callable[[Header | bytes], None]) -> None:
        try:
            if self.checksum and hdr.checksum is None:
                raise Rejected(f"{self.name}: tag {hdr.tag!r} without a checksum, and this endpoint requires one")
            prior = self._granted.get(hdr.tag)
            if prior is not None and prior.sender != sender:  # granted with its group to another sender
                self._spawn(self._steal(ident, sender, hdr, prior))
                return
            if prior is not None:
                if prior.slot.nbytes == hdr.payload_len:
                    # already granted to this sender (pushed, crossing its request): the same grant again;
                    # the sender refuses a second write under one (tag, epoch), so it cannot land twice
                    reply(self._grant_header(hdr.seq, hdr.tag, prior))
                    return
                del self._granted[hdr.tag]  # pushed, but this write has another size: nothing was written
                err = Rejected(f"{self.name}: size mismatch for tag {hdr.tag!r}: arrival has "
                               f"{hdr.payload_len} bytes, the exposed region has {prior.slot.nbytes}; "
                               "nothing written")
                self._landings.finish(prior.slot, err)
                raise err
            slot = self._landings.claim(hdr.tag, hdr.payload_len)
        except Rejected as exc:
            self._landings.reject(sender, str(exc))
            reply(Header(Kind.GRANT, hdr.seq, hdr.tag, status=Status.REJECTED, extra=str(exc).encode()))
            return
        if slot is None:  # not exposed yet: hold the request (the bytes stay at the sender), grant the rest now
            self._spawn(self._grant_later(ident, sender, hdr))
            pre = self._pregrant(ident, sender, hdr.tag)
            if pre:
                reply(pack_grants(pre, self._md_epoch))
        else:
            for frame in self._grant(ident, sender, hdr, slot):
                reply(frame)

    async def _steal(self, ident: bytes, sender: str, hdr: Header, prior: _Grant) -> None:
        """A request for a landing granted (with its group) to another sender: revoke that grant (fenced), then
        answer the request as if the landing had just been exposed."""

        def reply(h: Header | bytes) -> None:
            self._spawn(self._reply(ident, h))

        if self._granted.get(hdr.tag) is not prior:
            # its notification came (the landing is complete, or being verified) or it changed hands before this
            # task ran: answer the request as things are now (a second arrival is refused)
            self._on_req(ident, sender, hdr, reply)
            return
        fence = self._revoke(hdr.tag, force=True)
        if fence is not None:
            with contextlib.suppress(Exception):
                await fence
        slot = prior.slot
        live = slot.state == "busy" and not slot.done.is_set() and not slot.withdrawn
        written = (hdr.tag, prior.epoch) in self._written
        self._written.pop((hdr.tag, prior.epoch), None)
        if written and live:
            # the holder wrote before it saw the revocation, and returned as delivered (no checksum, no verdict):
            # that was the landing's one arrival (its notification, revoked, is dropped); this request is a second
            self._landings.finish(slot)
            self.stats.arrivals += 1
            self.stats.bytes_received += slot.nbytes
            reason = (f"{self.name}: tag {hdr.tag!r} already arrived from {prior.sender!r}; one arrival per landing, "
                      "nothing written")
            self._landings.reject(sender, reason)
            await self._reply(ident, Header(Kind.GRANT, hdr.seq, hdr.tag, status=Status.REJECTED,
                                            extra=reason.encode()))
            return
        if live:
            slot.state = "exposed"
        self._on_req(ident, sender, hdr, reply)

    def _grant_header(self, seq: int, tag: str, g: _Grant) -> Header:
        mem, dev = _mem(g.slot.view)
        return Header(Kind.GRANT, seq, tag, g.slot.nbytes, arg=g.slot.view.data_ptr(),
                      extra=f"{mem}:{dev}:{self._md_epoch}:{g.epoch}".encode())

    def _grant(self, ident: bytes, sender: str, hdr: Header, slot: Slot) -> list[bytes]:
        """Grant the claimed ``slot`` to ``sender``, and with it every other landing of the tag's request group
        exposed now (claimed for it under the group's epoch). Later exposes of the group are pushed to the
        sender as they happen (:meth:`_on_expose`). Returns the frames: the others' grants packed in one
        GRANTS frame (if any), then the requested one's GRANT."""
        pre = self._pregrant(ident, sender, hdr.tag)
        epoch = next(self._epochs)
        g = _Grant(slot, sender, ident, epoch)
        self._granted[hdr.tag] = g
        self._kick()
        out = [pack_grants(pre, self._md_epoch)] if pre else []
        out.append(encode(self._grant_header(hdr.seq, hdr.tag, g)))
        return out

    def _pregrant(self, ident: bytes, sender: str, tag: str) -> list[tuple[str, int, int, int, int, int]]:
        """Offer ``tag``'s request group to ``sender`` (unless another sender holds it): claim every other
        landing of the group exposed now for it; their grants (:func:`_grant_entry`)."""
        group = _group(tag)
        offer = self._offers.get(group)
        if offer is None:
            self._offers[group] = (sender, ident)
            if len(self._offers) > _OFFERS:
                self._offers.popitem(last=False)
        else:
            self._offers.move_to_end(group)
        out: list[tuple[str, int, int, int, int, int]] = []
        if offer is None or offer[0] == sender:
            held = self._held
            for other_tag, other in list(self._landings._slots.items()):
                if other.state == "exposed" and other_tag != tag and other_tag not in held \
                        and _group(other_tag) == group:
                    g = self._claim_for(other_tag, other, sender, ident)
                    if g is not None:
                        out.append(_grant_entry(other_tag, g))
            if out:
                self._kick()
        return out

    def _claim_for(self, tag: str, slot: Slot, sender: str, ident: bytes) -> _Grant | None:
        """Claim ``tag``'s exposed ``slot`` for ``sender`` under a fresh epoch (busy: no other arrival lands
        there); the caller kicks the progress loop. Straight on the slot: :meth:`LandingTable.claim`'s checks
        hold by construction (the table's own slot, exposed, sized as itself) and its lock guards against a
        backend's receive thread, which nixl has none of (its notification thread hands over to the loop)."""
        landings = self._landings
        if slot.state != "exposed" or landings._closed or landings._slots.get(tag) is not slot:
            return None
        slot.state = "busy"
        g = _Grant(slot, sender, ident, next(self._epochs))
        self._granted[tag] = g
        return g

    def _on_expose(self, tag: str, sender: str | None) -> None:
        """Hand a new landing to its writer ahead of any request: to ``sender`` (the caller's hint) once that peer
        said HELLO, else to the sender its request group was granted to. Claimed for it and pushed: the pushes of
        one event-loop pass to one sender leave as one message, or every ``_PUSH_CHUNK`` grants, so the first
        writes start while later landings are still being exposed."""
        ident = self._idents.get(sender) if sender is not None else None
        if ident is None:
            if not self._offers:
                return
            offer = self._offers.get(_group(tag))
            if offer is None:
                return
            sender, ident = offer
        if tag in self._held:  # a request waits for it: its answer grants it
            return
        slot = self._landings._slots.get(tag)
        if slot is None or slot.state != "exposed":
            return
        assert sender is not None
        g = self._claim_for(tag, slot, sender, ident)
        if g is None:
            return
        self._kick()
        box = self._push.get(ident)
        if box is None:
            box = self._push[ident] = []
            asyncio.get_running_loop().call_soon(self._flush_push, ident)
        box.append(_grant_entry(tag, g))
        if len(box) >= _PUSH_CHUNK:
            self._flush_push(ident)

    def _flush_push(self, ident: bytes) -> None:
        grants = self._push.pop(ident, [])
        if grants and self._router is not None and not self._closed:
            sent = cast("asyncio.Future[Any]", self._router.send_multipart([ident, pack_grants(grants,
                                                                                               self._md_epoch)]))
            sent.add_done_callback(_drop_result)

    async def _grant_later(self, ident: bytes, sender: str, hdr: Header) -> None:
        self._held[hdr.tag] = self._held.get(hdr.tag, 0) + 1  # its expose grants it here, not by a push
        try:
            slot = await self._landings.claim_wait(hdr.tag, hdr.payload_len)
        except Rejected as exc:
            prior = self._granted.get(hdr.tag)
            if prior is not None and prior.sender == sender and prior.slot.nbytes == hdr.payload_len:
                await self._reply(ident, self._grant_header(hdr.seq, hdr.tag, prior))
                return
            self._landings.reject(sender, str(exc))
            await self._reply(ident, Header(Kind.GRANT, hdr.seq, hdr.tag, status=Status.REJECTED,
                                            extra=str(exc).encode()))
            return
        finally:
            n = self._held.pop(hdr.tag, 1) - 1
            if n > 0:
                self._held[hdr.tag] = n
        if self._router is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                await self._router.send_multipart([ident, *self._grant(ident, sender, hdr, slot)])

    # --- revocation: the fence that keeps one-sided writes out of withdrawn landings -----------------------
    def cancel(self, tag: str) -> None:
        super().cancel(tag)
        self._revoke(tag)

    async def wait(self, tag: str, timeout: float) -> None:
        try:
            await super().wait(tag, timeout)
        except PeerTimeout:
            fence = self._revoke(tag)
            if fence is not None:
                with anyio.CancelScope(shield=True):
                    await fence
            raise

    async def settle(self) -> None:
        """Until every revocation started by :meth:`cancel` is fenced: acknowledged by its sender, or, past the
        deadline, its region re-registered (call before reusing the memory of cancelled landings)."""
        for ev in list(self._fences):
            with anyio.CancelScope(shield=True):
                await ev

    def _revoke(self, tag: str, force: bool = False) -> asyncio.Future[None] | None:
        """Revoke the grant of the withdrawn landing ``tag`` (if one is outstanding): the sender stops using it,
        waits for its write of it already posted, and acknowledges; until then its notification is dropped.
        Without an acknowledgement within ``_FENCE_S`` the region is re-registered (its old remote keys
        invalid), so a silent sender can never write into memory the caller reuses."""
        g = self._granted.get(tag)
        if g is None or not (g.slot.withdrawn or force):
            return None
        del self._granted[tag]
        box = self._push.get(g.ident)
        if box:  # a grant still waiting to be pushed is never sent (the sender ignores a revoked one anyway)
            box[:] = [e for e in box if not (e[0] == tag and e[3] == g.epoch)]
        ev = asyncio.Event()
        self._revoking[(tag, g.epoch)] = (ev, g.ident)
        while len(self._revoking) > _REVOKED_KEPT:
            self._revoking.popitem(last=False)
        if self._router is not None and not self._closed:
            sent = cast("asyncio.Future[Any]", self._router.send_multipart(
                [g.ident, encode(Header(Kind.GRANT, 0, tag, status=Status.CLOSED, arg=g.epoch))]))
            sent.add_done_callback(_drop_result)
        fut = asyncio.ensure_future(self._fence(tag, g, ev))
        self._fences.add(fut)
        fut.add_done_callback(self._fences.discard)
        # keep driving progress (polling notifications) until the fence ends: the revoked sender's WRITE in flight
        # may need it to complete, and its acknowledgement waits for that (without it: the fence's full deadline)
        self._kick()
        return fut

    async def _fence(self, tag: str, g: _Grant, ev: asyncio.Event) -> None:
        with anyio.move_on_after(_FENCE_S):
            await ev.wait()
        if ev.is_set() or self._closed:
            return
        for group in [k for k, v in self._offers.items() if v[0] == g.sender]:
            del self._offers[group]  # push nothing more to a silent sender
        region = self.find_region(g.slot.view)
        log.warning("%s: %r did not acknowledge the revocation of %r within %g s; re-registering its region",
                    self.name, g.sender, tag, _FENCE_S)
        if region is not None:
            self._deregister_memory(region)
            self._register_memory(region)

    def _on_notif(self, agent_name: str, msg: bytes) -> None:
        try:
            hdr = decode(msg)
            dones = unpack_dones(hdr) if hdr.kind is Kind.DONES else None
        except WireError as exc:
            self._landings.reject(agent_name, f"bad notification: {exc}")
            return
        if dones is None:
            self._on_done(agent_name, hdr, hdr.tag, hdr.arg)
            return
        for tag, _nbytes, epoch in dones:  # one WRITE filled these landings: each completes as if alone
            self._on_done(agent_name, hdr, tag, epoch)

    def _on_done(self, agent_name: str, hdr: Header, tag: str, epoch: int) -> None:
        """The landing ``tag`` written by ``agent_name`` under grant ``epoch`` (notification ``hdr``)."""
        g = self._granted.get(tag)
        if g is None or g.sender != agent_name or g.epoch != epoch:
            revoked = self._revoking.get((tag, epoch))
            if revoked is not None:  # posted before the sender saw the revocation: dropped
                log.debug("%s: dropped a write of %r under revoked epoch %d", self.name, tag, epoch)
                if hdr.checksum is not None:  # the sender awaits a verdict
                    self._spawn(self._reply(revoked[1], Header(Kind.ACK, hdr.seq, tag, status=Status.REJECTED,
                                                               extra=b"the landing was withdrawn")))
                return
            self._landings.reject(agent_name, f"notification for unknown transfer {hdr.seq} (tag {tag!r}, "
                                  f"epoch {epoch})")
            return
        del self._granted[tag]
        slot, ident = g.slot, g.ident
        if hdr.checksum is not None:
            self._spawn(self._complete(agent_name, hdr, slot, ident))
            return
        self._landings.finish(slot)  # no checksum: the sender returns on its WRITE's completion, no ACK
        self.stats.arrivals += 1
        self.stats.bytes_received += slot.nbytes

    async def _complete(self, sender: str, hdr: Header, slot: Slot, ident: bytes) -> None:
        assert hdr.checksum is not None
        got = await anyio.to_thread.run_sync(checksum_of, slot.view, limiter=self._limiter)
        if got != hdr.checksum:
            reason = f"{self.name}: checksum mismatch for tag {hdr.tag!r}; arrival discarded"
            self._landings.reject(sender, reason)
            self._landings.finish(slot, Rejected(reason))
            await self._reply(ident, Header(Kind.ACK, hdr.seq, hdr.tag, status=Status.CORRUPT,
                                            extra=reason.encode()))
            return
        self._landings.finish(slot)
        self.stats.arrivals += 1
        self.stats.bytes_received += slot.nbytes
        await self._reply(ident, Header(Kind.ACK, hdr.seq, hdr.tag))

    # --- sending --------------------------------------------------------------------------------------------
    async def connect(self, peer: str, address: str, timeout: float = 30.0) -> None:
        self._check_open()
        if not self._started:
            raise TransportError(f"{self.name}: start() before connect()")
        what = f"connect to {peer!r} at {address}"
        old = self._peers.get(peer)
        if old is not None and old.address == address and not old.hello_failed():
            # connected, or a connect to the same address under way (an engine told of a peer twice at once):
            # its outcome is ours; returning before its hello ended would write to a peer not yet known
            await self._guarded(what, timeout, lambda: asyncio.shield(old.hello))
            return
        if not address.startswith("tcp://"):
            raise TransportError(f"{self.name}: peer {peer!r} address {address!r} is not tcp://")
        assert self._ctx is not None
        p = _Peer(self, peer, address)
        self._peers[peer] = p
        if old is not None:
            old.close("reconnected")
        try:
            await self._guarded(what, timeout, lambda: self._first_hello(p))
        except TransportError:
            newer = self._peers.get(peer)
            if newer is None or newer is p or self._closed:
                raise
            # superseded while under way by a connect to the peer's newer address (a restarted peer registered
            # again): the caller wants the peer, so that connect's outcome is ours, not "reconnected"
            await self._guarded(f"connect to {peer!r} at {newer.address}", timeout,
                                lambda: asyncio.shield(newer.hello))

    async def _first_hello(self, p: _Peer) -> None:
        """:meth:`_hello` for a new connection, its outcome also set on ``p.hello`` for concurrent connects."""
        try:
            await self._hello(p)
        except BaseException as exc:
            if not p.hello.done():
                p.hello.set_exception(exc if isinstance(exc, Exception) else
                                      TransportError(f"{self.name}: the hello to {p.name!r} was given up"))
                p.hello.exception()  # (retrieved: a connect no one else waits on logs nothing at exit)
            raise
        if not p.hello.done():
            p.hello.set_result(None)

    async def _hello(self, p: _Peer) -> None:
        """Exchange agent metadata with ``p`` (again when it registered memory since)."""
        status, hdr = await p.request(Header(Kind.HELLO, next(self._seq), self.name,
                                             extra=self._agent.get_agent_metadata()))
        if status is not Status.OK:
            raise TransportError(f"{self.name}: {p.name!r} refused our metadata: {hdr.extra.decode()}")
        p.agent_name = self._load_remote(hdr.tag, hdr.extra)
        p.epoch = hdr.arg
        if p.remote_dl is not None:
            p.remote_dl.drop()  # prepared against the metadata just replaced
        p.remote_dl = _DlistCache(self._agent, p.agent_name)

    def _load_remote(self, name: str, md: bytes) -> str:
        """Load a peer agent's metadata (a HELLO's, either way; ``name``: the agent it says it is); its name.

        NIXL refuses the metadata of an agent it already holds when its connection details changed: that agent's
        process was restarted (an engine the launcher brought back under its old name). The old incarnation is
        then forgotten first: the descriptor lists prepared against it dropped, grants it pushed discarded, its
        writes in flight failed; our sending side to it says hello again before its next write."""
        try:
            remote = self._agent.add_remote_agent(md)
        except Exception as exc:
            if not name or name not in self._remote_agents:
                raise
            log.warning("%s: agent %r came back with new metadata (%s); forgetting its old incarnation",
                        self.name, name, exc)
            self._forget_remote(name)
            remote = self._agent.add_remote_agent(md)
        who = remote.decode("utf-8", "replace") if isinstance(remote, bytes) else str(remote)
        self._remote_agents.add(who)
        log.debug("%s: loaded metadata of %r", self.name, who)
        return who

    def _forget_remote(self, name: str) -> None:
        for p in self._peers.values():
            if p.agent_name != name:
                continue
            p.fail_all(Status.CLOSED, f"{name} restarted")
            if p.remote_dl is not None:
                p.remote_dl.drop()
                p.remote_dl = None
            p.grants.clear()  # (addresses in the old process)
            p.epoch = -1  # the next grant's metadata epoch exceeds it: hello again first
        self._agent.remove_remote_agent(name)
        self._remote_agents.discard(name)

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        p = self._peers.get(peer)
        if p is not None and checksum is None and not self.checksum and not self._closed:
            r = p.grants.get(tag)
            if r is not None and type(src) is torch.Tensor and src.dtype is _U8 and src.dim() == 1 \
                    and r.nbytes == src.numel() and r.md_epoch <= p.epoch and src.is_contiguous() \
                    and timeout is not None and timeout >= 0:
                # the fast path, each layer of a granted request: no checksum (so no ACK), the grant already
                # pushed (so ``tag`` is one the receiver exposed), the source a flat byte view
                region = self._src_region
                if region is None or not region.holds(src):
                    region = self._src_region = self.find_region(src)
                if region is not None:
                    # post the one WRITE: when NIXL completes it inside ``transfer`` (a local copy, e.g. UCX's
                    # CMA) this returns without suspending (nothing can revoke the grant in between: one thread);
                    # one still in progress is polled by _progress, which enforces the deadline (no cancel scope)
                    del p.grants[tag]
                    nbytes = r.nbytes
                    dev = region.cuda_index
                    mem = _DRAM if dev is None else ("VRAM", dev)
                    if p.active or p.batch is not None:
                        # writes to this peer are in flight already: join the ones queued in this loop pass,
                        # posted as one WRITE at its end (one NIXL post and one completion for all of them)
                        await self._join_batch(p, peer, tag, src, r, mem, timeout)
                        stats = self.stats
                        stats.writes += 1
                        stats.bytes_sent += nbytes
                        return
                    handle, state, key, seq = self._post(p, peer, tag, src, nbytes, r, None, mem=mem)
                    if state == "PROC":
                        try:
                            await self._finish(p, peer, tag, handle, state, key, seq, None,
                                               asyncio.get_running_loop().time() + timeout)
                        except TransportError:
                            if self._closed:
                                raise TransportClosed(f"{self.name}: transport closed during the write of {tag!r} "
                                                      f"to {peer!r}") from None
                            raise
                    else:
                        _release(handle)
                        if state != "DONE":
                            raise TransportError(f"{self.name}: NIXL write of {tag!r} to {peer!r} failed: {state}")
                    stats = self.stats
                    stats.writes += 1
                    stats.bytes_sent += nbytes
                    return
        _, data = self._prepare_write(tag, src)
        if p is None or p.agent_name is None:
            raise TransportError(f"{self.name}: peer {peer!r} is not connected (call connect first)")
        if self.find_region(data) is None:
            raise TransportError(f"{self.name}: the source of tag {tag!r} is not inside a registered region "
                                 "(nixl writes from registered memory: call register() on its buffer once)")
        nbytes = int(data.numel())
        if timeout is None or not timeout >= 0:
            raise TransportError(f"timeout must be a number >= 0, got {timeout!r}")

        async def send() -> None:
            csum = checksum
            if csum is None and self.checksum:
                csum = await anyio.to_thread.run_sync(checksum_of, data, limiter=self._limiter)
            r = await self._grant_for(p, peer, tag, nbytes, csum)
            if r.md_epoch > p.epoch:
                await self._hello(p)
            ack = None
            if csum is not None:  # registered before the notification can be answered
                ack = p.expect(seq := next(self._seq))
            else:
                seq = 0
            try:
                handle, state, key, seq = self._post(p, peer, tag, data, nbytes, r, csum, seq)
            except BaseException:
                if ack is not None:
                    p.pending.pop(seq, None)
                raise
            await self._finish(p, peer, tag, handle, state, key, seq, ack)

        await self._guarded(f"write of {tag!r} to {peer!r}", timeout, send)
        self.stats.writes += 1
        self.stats.bytes_sent += nbytes

    async def _grant_for(self, p: _Peer, peer: str, tag: str, nbytes: int, csum: int | None) -> _Remote:
        """The grant to write ``tag``: pushed already, in the answer to the group's request in flight, or by a
        request of our own (one round trip, which also grants the rest of the tag's request group)."""
        r = p.grants.get(tag)
        if r is None:
            group = _group(tag)
            asked = p.asking.get(group)
            while r is None and asked is not None:
                # a request of this group is on its way: its answer grants the group; a grant pushed
                # meanwhile wakes us to look, then we wait on (the request stays the group's one round trip)
                await asyncio.shield(asked)
                r = p.grants.get(tag)
                asked = p.asking.get(group)
        if r is not None:
            del p.grants[tag]
            if r.nbytes == nbytes:
                return r
        self.handshakes += 1
        group = _group(tag)
        asking = p.asking.get(group)
        if asking is None:
            asking = p.asking[group] = asyncio.get_running_loop().create_future()
        try:
            status, grant = await p.request(Header(Kind.REQ, next(self._seq), tag, nbytes, csum,
                                                   extra=self.name.encode()))
        finally:
            # answered (or failed): every writer waiting on the group looks again; one with no grant then asks
            # itself (pushes may have replaced our future with a fresh one: resolve both)
            current = p.asking.pop(group, None)
            for fut in (asking, current):
                if fut is not None and not fut.done():
                    fut.set_result(None)
        if status is not Status.OK:
            raise Rejected(f"{self.name}: {peer!r} refused tag {tag!r} ({status.name}): "
                           f"{grant.extra.decode('utf-8', 'replace')}")
        r = _parse_grant(grant)
        if p.grants.get(tag) is not None and p.grants[tag].epoch == r.epoch:
            del p.grants[tag]  # the same grant, also pushed
        return r

    def _post(self, p: _Peer, peer: str, tag: str, data: torch.Tensor, nbytes: int, r: _Remote,
              csum: int | None, seq: int = 0, *, mem: tuple[str, int] | None = None
              ) -> tuple[Any, str, tuple[str, int], int]:
        """Post the one WRITE under grant ``r`` (refused if already written or revoked): its handle, the state
        ``transfer`` returned, the grant's key and the notification's seq."""
        key = self._claim(p, peer, tag, r, csum is None)
        if not seq:
            seq = next(self._seq)
        lmem, ldev = _mem(data) if mem is None else mem
        try:
            handle = self._prepped_write(p, tag, data.data_ptr(), nbytes, r, csum, seq, lmem, ldev)
        except Exception as exc:
            p.used.pop(key, None)  # nothing was written under it
            raise TransportError(f"{self.name}: NIXL could not post the write of {tag!r} to {peer!r}: {exc}") from exc
        try:
            state = self._agent.transfer(handle)
        except Exception as exc:
            p.used.pop(key, None)
            _release(handle)
            raise TransportError(f"{self.name}: NIXL could not post the write of {tag!r} to {peer!r}: {exc}") from exc
        if state not in ("PROC", "DONE"):
            p.used.pop(key, None)  # failed at once: its bytes did not (all) land
        return handle, state, key, seq

    def _claim(self, p: _Peer, peer: str, tag: str, r: _Remote, quiet: bool = True) -> tuple[str, int]:
        """Mark grant ``r`` of ``tag`` written (its key); :class:`Rejected` if it was already, or was revoked.
        ``quiet``: the write carries no checksum, so it returns on its WRITE's completion with no verdict from the
        receiver (a revocation that finds it done tells the receiver so)."""
        key = (tag, r.epoch)
        used = p.used
        if key in used:
            raise Rejected(f"{self.name}: duplicate write of tag {tag!r} to {peer!r} (one arrival per landing)")
        if key in p.revoked:
            raise Rejected(f"{self.name}: {peer!r} withdrew the landing of tag {tag!r}; nothing written")
        used[key] = quiet
        if len(used) > _REVOKED_KEPT:
            used.popitem(last=False)
        return key

    def _prepped_write(self, p: _Peer, tag: str, addr: int, nbytes: int, r: _Remote, csum: int | None, seq: int,
                       lmem: str, ldev: int) -> Any:
        """The WRITE of ``nbytes`` at ``addr`` into ``r``'s landing, from the cached prepared descriptor lists,
        its notification a :data:`Kind.DONE` (not yet transferred)."""
        assert self._local_dl is not None
        if p.remote_dl is None:  # its agent restarted after the grant came (``_forget_remote``)
            raise TransportError(f"{self.name}: {p.name!r} restarted; grant {tag!r} was its old incarnation's")
        notif = encode_fields(Kind.DONE, seq, tag.encode("utf-8"), nbytes, csum, Status.OK, r.epoch)
        return self._agent.make_prepped_xfer("WRITE", self._local_dl.get(addr, nbytes, lmem, ldev), [0],
                                             p.remote_dl.get(r.addr, nbytes, r.mem, r.dev), [0], notif)

    async def _join_batch(self, p: _Peer, peer: str, tag: str, src: torch.Tensor, r: _Remote,
                          mem: tuple[str, int], timeout: float) -> None:
        """Queue a granted fast-path write in ``p``'s batch of this loop pass and wait for its WRITE."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        deadline = loop.time() + timeout
        batch = p.batch
        if batch is not None and batch.nbytes + r.nbytes > _BATCH_BYTES:
            self._post_batch(p, peer, batch)  # full: posted now, so several WRITEs keep the pipe busy
            batch = None
        if batch is None:
            batch = p.batch = _Batch(deadline, [])
            loop.call_soon(self._post_batch, p, peer, batch)
        elif deadline < batch.deadline:
            batch.deadline = deadline
        batch.items.append((tag, src, r, mem, fut))
        batch.nbytes += r.nbytes
        state = await fut
        if state == "DONE":
            return
        if state == _EXPIRED:
            raise PeerTimeout(f"{self.name}: write of {tag!r} to {peer!r} not delivered by its deadline")
        if self._closed:
            raise TransportClosed(f"{self.name}: transport closed during the write of {tag!r} to {peer!r}")
        raise TransportError(f"{self.name}: NIXL write of {tag!r} to {peer!r} failed: {state}")

    def _post_batch(self, p: _Peer, peer: str, batch: _Batch) -> None:
        """At the end of a loop pass: post ``batch``'s writes, one WRITE per pair of memory kinds (a landing
        revoked or written meanwhile is refused, as :meth:`_post` refuses it)."""
        if p.batch is batch:
            p.batch = None
        if batch.posted:  # posted when it filled up
            return
        batch.posted = True
        groups: dict[tuple[str, int, str, int], list[tuple[str, torch.Tensor, _Remote, tuple[str, int],
                                                          asyncio.Future[str]]]] = {}
        for item in batch.items:
            tag, _src, r, mem, fut = item
            if fut.done():  # its writer was cancelled before the post: the grant is left unused
                continue
            if self._closed:
                fut.set_result("ERR transport closed")
                continue
            try:
                self._claim(p, peer, tag, r)
            except Rejected as exc:
                fut.set_exception(exc)
                continue
            groups.setdefault((*mem, r.mem, r.dev), []).append(item)
        for (lmem, ldev, rmem, rdev), items in groups.items():
            self._post_group(p, items, lmem, ldev, rmem, rdev, batch.deadline)

    def _post_group(self, p: _Peer, items: list[tuple[str, torch.Tensor, _Remote, tuple[str, int],
                                                      asyncio.Future[str]]],
                    lmem: str, ldev: int, rmem: str, rdev: int, deadline: float) -> None:
        """One NIXL WRITE of several granted landings, its notification naming each (:data:`Kind.DONES`);
        each writer's future gets the WRITE's final state."""
        agent = self._agent
        handle = None
        try:
            if len(items) == 1:
                tag, src, r, _, _ = items[0]
                handle = self._prepped_write(p, tag, src.data_ptr(), r.nbytes, r, None, next(self._seq), lmem, ldev)
            else:
                self.shared_writes += len(items)
                notif = pack_dones(next(self._seq), [(tag, r.nbytes, r.epoch) for tag, _, r, _, _ in items])
                local = agent.get_xfer_descs([(src.data_ptr(), r.nbytes, ldev) for _, src, r, _, _ in items], lmem)
                remote = agent.get_xfer_descs([(r.addr, r.nbytes, rdev) for _, _, r, _, _ in items], rmem)
                handle = agent.initialize_xfer("WRITE", local, remote, p.agent_name, notif)
            state = agent.transfer(handle)
        except Exception as exc:
            if handle is not None:
                _release(handle)
            for item in items:
                p.used.pop((item[0], item[2].epoch), None)  # nothing was written under them
                if not item[4].done():
                    item[4].set_result(f"ERR could not post: {exc}")
            return
        if state != "PROC":
            _release(handle)
            if state != "DONE":
                for item in items:
                    p.used.pop((item[0], item[2].epoch), None)
            for item in items:
                if not item[4].done():
                    item[4].set_result(state)
            return
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        keys = [(item[0], item[2].epoch) for item in items]
        active = p.active
        for key in keys:
            active[key] = done  # a revocation of any of them waits for the WRITE
        xid = next(self._xids)
        self._inflight[xid] = (handle, done, deadline)
        self._kick()

        def finished(d: asyncio.Future[str]) -> None:
            _release(handle)  # NIXL aborts a WRITE still posted (deadline, close)
            for key in keys:
                if active.get(key) is d:
                    del active[key]
            state = d.result() if not d.cancelled() else "ABANDONED"
            for item in items:
                if not item[4].done():
                    item[4].set_result(state)

        done.add_done_callback(finished)

    async def _finish(self, p: _Peer, peer: str, tag: str, handle: Any, state: str, key: tuple[str, int], seq: int,
                      ack: asyncio.Future[tuple[Status, Header]] | None, deadline: float = float("inf")) -> None:
        """Until the posted WRITE completes (polled by :meth:`_progress`, which ends it at ``deadline``:
        :class:`PeerTimeout`) and, with a checksum, its ACK; the handle is released in every case (NIXL aborts
        a transfer still posted)."""
        done: asyncio.Future[str] | None = None
        xid = None
        try:
            if state == "PROC":
                done = asyncio.get_running_loop().create_future()
                p.active[key] = done  # a revocation of this grant waits for it
                xid = next(self._xids)
                self._inflight[xid] = (handle, done, deadline)
                self._kick()
                state = await done
                xid = None
            if state == _EXPIRED:
                raise PeerTimeout(f"{self.name}: write of {tag!r} to {peer!r} not delivered by its deadline")
            if state != "DONE":
                raise TransportError(f"{self.name}: NIXL write of {tag!r} to {peer!r} failed: {state}")
            if ack is not None:
                st, hdr = await ack
                if st is not Status.OK:
                    raise TransportError(f"{self.name}: {peer!r} rejected tag {tag!r} ({st.name}): "
                                         f"{hdr.extra.decode('utf-8', 'replace')}")
        finally:
            p.pending.pop(seq, None)
            if done is not None:
                p.active.pop(key, None)
                if not done.done():
                    done.set_result("ABANDONED")
            if xid is not None:  # abandoned (deadline, close): NIXL aborts it on release
                self._inflight.pop(xid, None)
            _release(handle)


def _grant_entry(tag: str, g: _Grant) -> tuple[str, int, int, int, int, int]:
    """``g`` as one entry of a GRANTS frame (:func:`~dualpath.transports.wire.pack_grants`)."""
    view = g.slot.view
    if view.is_cuda:
        return tag, view.data_ptr(), view.numel(), g.epoch, 1, view.get_device()
    return tag, view.data_ptr(), view.numel(), g.epoch, 0, 0


def _parse_grant(hdr: Header) -> _Remote:
    mem, dev, md_epoch, epoch = hdr.extra.decode().split(":")
    return _Remote(hdr.arg, hdr.payload_len, mem, int(dev), int(md_epoch), int(epoch))


class _Peer:
    """A DEALER to one peer's side channel and the replies we wait for (by sequence number)."""

    def __init__(self, owner: NixlTransport, name: str, address: str) -> None:
        assert owner._ctx is not None
        self.owner, self.name, self.address = owner, name, address
        self.agent_name: str | None = None
        self.epoch = -1
        self.remote_dl: _DlistCache | None = None
        self.sock = owner._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.pending: dict[int, asyncio.Future[tuple[Status, Header]]] = {}
        self.outbox: list[bytes] = []
        self.grants: dict[str, _Remote] = {}  # pushed grants not used yet, by tag
        self.asking: dict[str, asyncio.Future[None]] = {}  # request groups with a REQ in flight
        self.active: dict[tuple[str, int], asyncio.Future[str]] = {}  # posted writes by (tag, epoch)
        #: grants written under (one write each) -> whether quiet (no checksum: returns with no verdict)
        self.used: OrderedDict[tuple[str, int], bool] = OrderedDict()
        self.revoked: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.batch: _Batch | None = None  # fast-path writes queued in this loop pass (posted at its end)
        #: the first hello's outcome (connects to this peer at once wait on it; its error if it failed)
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reader = owner._spawn(self._read())

    def hello_failed(self) -> bool:
        return self.hello.done() and (self.hello.cancelled() or self.hello.exception() is not None)

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()  # one or more replies (the peer batches them)
            woken: set[str] = set()
            for frame in frames:
                try:
                    hdr = decode(frame)
                except WireError as exc:
                    log.warning("%s: bad reply from %s: %s", self.owner.name, self.name, exc)
                    continue
                if hdr.kind is Kind.GRANTS:  # pushed grants, packed
                    self._on_grants(hdr, woken)
                    continue
                if hdr.kind is Kind.GRANT and hdr.seq == 0:  # pushed: a grant, or the revocation of one
                    self._on_push(hdr, woken)
                    continue
                # a GRANT answers its REQ's future, an ACK its write's (each by its own seq)
                fut = self.pending.pop(hdr.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result((hdr.status, hdr))
            for group in woken:
                asking = self.asking.get(group)
                if asking is not None and not asking.done():
                    # writers waiting on the group's request look for their grant (once per message, however
                    # many grants it pushed); the rest wait on for the request's answer
                    self.asking[group] = asyncio.get_running_loop().create_future()
                    asking.set_result(None)

    def _on_grants(self, hdr: Header, woken: set[str]) -> None:
        """Pushed grants packed in one frame (the waiting writers of their groups are woken by the caller)."""
        try:
            entries = unpack_grants(hdr)
        except WireError as exc:
            log.warning("%s: bad pushed grants from %s: %s", self.owner.name, self.name, exc)
            return
        grants, md_epoch, revoked = self.grants, hdr.arg, self.revoked
        for tag, addr, nbytes, epoch, mem, dev in entries:
            if revoked and (tag, epoch) in revoked:
                continue  # revoked before its push arrived (a cancel right after the expose): never taken
            grants[tag] = _Remote(addr, nbytes, mem, dev, md_epoch, epoch)
            woken.add(_group(tag))

    def _on_push(self, hdr: Header, woken: set[str]) -> None:
        """A pushed grant (its group's waiting writers are woken by the caller, once per message) or a
        revocation."""
        if hdr.status is Status.OK:
            try:
                pushed = _parse_grant(hdr)
            except (ValueError, TransportError) as exc:
                log.warning("%s: bad pushed grant from %s: %s", self.owner.name, self.name, exc)
            else:
                if (hdr.tag, pushed.epoch) not in self.revoked:  # (else revoked before its push arrived)
                    self.grants[hdr.tag] = pushed
            woken.add(_group(hdr.tag))
            return
        # revoked: no write of (tag, epoch) starts from now on; acknowledge once the one posted (if any) is done
        key = (hdr.tag, hdr.arg)
        r = self.grants.get(hdr.tag)
        if r is not None and r.epoch == hdr.arg:
            del self.grants[hdr.tag]
        self.revoked[key] = None
        if len(self.revoked) > _REVOKED_KEPT:
            self.revoked.popitem(last=False)
        self.owner._spawn(self._ack_revoke(hdr.tag, hdr.arg, self.active.get(key)))

    async def _ack_revoke(self, tag: str, epoch: int, write: asyncio.Future[str] | None) -> None:
        """Acknowledge the revocation of ``(tag, epoch)`` once the write posted under it (if any) is done: ``W``
        when a quiet write (no checksum) completed under it, so its writer returned as delivered and the receiver
        must count it as the landing's arrival; else ``R``."""
        ok = True  # no write in flight: one under the grant (if any) completed when it was posted
        if write is not None:
            with anyio.move_on_after(_FENCE_S):
                await asyncio.shield(write)
            if not write.done():
                return  # not known to be complete: no acknowledgement (the receiver re-registers its region)
            ok = not write.cancelled() and write.result() == "DONE"
        written = ok and self.used.get((tag, epoch)) is True
        ack = encode(Header(Kind.DONE, 0, tag, arg=epoch, extra=(b"W" if written else b"R") + self.owner.name.encode()))
        self.outbox.append(ack)
        if len(self.outbox) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def expect(self, seq: int) -> asyncio.Future[tuple[Status, Header]]:
        fut: asyncio.Future[tuple[Status, Header]] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        return fut

    async def request(self, hdr: Header) -> tuple[Status, Header]:
        """Send ``hdr`` (with any acknowledgements queued) at once and await the reply with its seq. At once:
        a request is the first thing a group's writers wait on, and the other writes of the group, which run
        before a deferred flush would, only wait for its answer."""
        fut = self.expect(hdr.seq)
        self.outbox.append(encode(hdr))
        self._flush()
        try:
            return await fut
        finally:
            self.pending.pop(hdr.seq, None)

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        if frames and not self.sock.closed:
            # the asyncio socket: sends at once unless at the HWM
            sent = cast("asyncio.Future[Any]", self.sock.send_multipart(frames))
            sent.add_done_callback(_drop_result)

    def fail_all(self, status: Status, reason: str) -> None:
        for seq, fut in self.pending.items():
            if not fut.done():
                fut.set_result((status, Header(Kind.ACK, seq, "", status=status, extra=reason.encode())))
        self.pending.clear()

    def close(self, reason: str) -> None:
        if not self.hello.done():  # (a connect waiting on it looks for the peer's newer connection)
            self.hello.set_exception(TransportError(f"{self.owner.name}: connection to {self.name!r} {reason}"))
            self.hello.exception()
        self.fail_all(Status.CLOSED, reason)
        if self.remote_dl is not None:
            self.remote_dl.drop()
        self.reader.cancel()
        self.sock.close(linger=0)

