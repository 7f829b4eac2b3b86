"""One node, one set of links: the emulated storage NIC of a node shared by its engines across processes.

In one process the engines of a node share the node's :class:`~dualpath.traffic.Link` objects (``<node>.snic.read``
/ ``.write``) and so its bandwidth and its read queue. In a deployment each engine is a process; without this
module each would build its own copy of its node's links, and two engines of a node would each get the whole NIC.

The **link service** lives in the node's first engine (local index 0): it holds the node's real ``Link`` objects
and serves the other engines of the node over a ZeroMQ ``ipc://`` socket (:class:`NodeLinkServer`). They use
:class:`RemoteLink`, which stands in for a ``Link`` in the engine's :class:`~dualpath.traffic.TrafficManager`:

* ``transfer(nbytes, cls, tokens, track)`` becomes a request; the service runs the transfer on the shared fluid
  model and answers when it completed (so concurrent transfers of all the node's engines share the bandwidth
  as in one process). Cancelling the caller cancels the transfer at the service (the model drops the flow).
* ``track(nbytes, tokens)`` (a storage read in flight) adds to and later subtracts from the node's queue at the
  service; every change of the node's queue is pushed to every engine of the node, so ``queued_bytes`` /
  ``queued_tokens`` (what the scheduler's read-queue balancing sees) are the node's, not the engine's.

Messages are fixed little-endian structs (no pickle). Every request has a deadline: a transfer that the service
does not complete within ``timeout_s`` plus four times its ideal duration raises :class:`PeerTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import zmq
import zmq.asyncio

from dualpath.errors import PeerTimeout, TransportError
from dualpath.traffic.link import Link, LinkStats
from dualpath.types import TrafficClass

log = logging.getLogger("dualpath.nodelink")

# request: op u8, link index u8, class u8, track u8, id u64, nbytes i64, tokens i64
_REQ = struct.Struct("<BBBBQqq")
# reply / push: kind u8, status u8, link index u8, pad u8, id u64, queued bytes i64, queued tokens i64
_REP = struct.Struct("<BBBBQqq")
OP_TRANSFER, OP_CANCEL, OP_QUEUE, OP_HELLO = 1, 2, 3, 4
REP_DONE, REP_QUEUE = 1, 2
ST_OK, ST_FAILED = 0, 1
_CLASSES = list(TrafficClass)  # wire code of a class: its index here


def service_address(scheduler: str, node_prefix: str) -> str:
    """The ``ipc://`` address of a node's link service, unique per deployment (scheduler address) and node."""
    h = hashlib.sha256(f"{scheduler}|{node_prefix}".encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/dualpath-links-{h}.sock"


class NodeLinkServer:
    """Serves a node's links (by index in ``links``) to the node's other engine processes."""

    def __init__(self, links: list[Link], address: str) -> None:
        self.links = links
        self.address = address
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._flows: dict[tuple[bytes, int], anyio.CancelScope] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._clients: set[bytes] = set()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        path = self.address.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous incarnation of this engine (restarted) left it
        sock.bind(self.address)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        for scope in list(self._flows.values()):
            scope.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        with contextlib.suppress(OSError):
            os.unlink(self.address.removeprefix("ipc://"))

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 2 or len(frames[1]) != _REQ.size:
                log.warning("link service %s: malformed request (%d frames) ignored", self.address, len(frames))
                continue
            ident, body = frames
            op, li, cls, track, rid, nbytes, tokens = _REQ.unpack(body)
            if op == OP_HELLO:
                self._clients.add(ident)
                for i in range(len(self.links)):
                    self._push_queue(i, only=ident)
                continue
            if not 0 <= li < len(self.links):
                log.warning("link service %s: unknown link index %d", self.address, li)
                continue
            if op == OP_TRANSFER:
                try:
                    tc = _CLASSES[cls]
                except IndexError:
                    log.warning("link service %s: unknown traffic class %d", self.address, cls)
                    continue
                task = asyncio.get_running_loop().create_task(self._transfer(ident, rid, li, tc, nbytes, tokens,
                                                                             bool(track)))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif op == OP_CANCEL:
                scope = self._flows.get((ident, rid))
                if scope is not None:
                    scope.cancel()
            elif op == OP_QUEUE:
                self._clients.add(ident)
                link = self.links[li]
                link.stats.queued_bytes += nbytes
                link.stats.queued_tokens += tokens
                self._push_queue(li)

    async def _transfer(self, ident: bytes, rid: int, li: int, cls: TrafficClass, nbytes: int, tokens: int,
                        track: bool) -> None:
        link = self.links[li]
        status = ST_FAILED
        with anyio.CancelScope() as scope:
            self._flows[(ident, rid)] = scope
            try:
                if track:
                    self._push_queue_soon(li)
                await link.transfer(max(0, nbytes), cls, tokens=max(0, tokens), track=track)
                status = ST_OK
            except Exception as exc:
                log.warning("link service %s: transfer failed: %r", self.address, exc)
            finally:
                self._flows.pop((ident, rid), None)
        if scope.cancel_called:
            return  # the client gave up; it expects no answer
        self._reply(ident, REP_DONE, status, li, rid)
        if track:
            self._push_queue(li)

    def _push_queue_soon(self, li: int) -> None:
        asyncio.get_running_loop().call_soon(self._push_queue, li)

    def _push_queue(self, li: int, only: bytes | None = None) -> None:
        for ident in ([only] if only is not None else list(self._clients)):
            self._reply(ident, REP_QUEUE, ST_OK, li, 0)

    def _reply(self, ident: bytes, kind: int, status: int, li: int, rid: int) -> None:
        if self._sock is None or self._sock.closed:
            return
        link = self.links[li]
        body = _REP.pack(kind, status, li, 0, rid, link.stats.queued_bytes, link.stats.queued_tokens)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_multipart([ident, body], flags=zmq.NOBLOCK)

    def local_change(self, li: int) -> None:
        """The host engine changed a link's queue itself: tell the other engines."""
        self._push_queue(li)


class _HostLink(Link):
    """The host engine's own view of a served link: a plain :class:`Link` whose queue changes are pushed to
    the node's other engines."""

    server: NodeLinkServer | None = None
    index: int = 0

    @contextmanager
    def track(self, nbytes: int, tokens: int = 0) -> Iterator[None]:
        try:
            with super().track(nbytes, tokens):
                self._changed()
                yield
        finally:
            self._changed()

    def _changed(self) -> None:
        if self.server is not None:
            self.server.local_change(self.index)


class NodeLinkClient:
    """The connection of one engine process to its node's link service; makes the :class:`RemoteLink` s."""

    def __init__(self, address: str, *, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self.links: list[RemoteLink] = []

    def link(self, name: str, bandwidth: float | None) -> RemoteLink:
        rl = RemoteLink(self, len(self.links), name, bandwidth)
        self.links.append(rl)
        return rl

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._read())
        self._send(OP_HELLO, 0, 0, 0, 0, 0, 0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(TransportError(f"link service client {self.address} closed"))
        self._waiting.clear()
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def _send(self, op: int, li: int, cls: int, track: int, rid: int, nbytes: int, tokens: int) -> None:
        if self._sock is None:
            raise TransportError(f"link service client {self.address}: start() first")
        with contextlib.suppress(zmq.Again):  # HWM: a queue update may be dropped; transfers time out
            self._sock.send(_REQ.pack(op, li, cls, track, rid, nbytes, tokens), flags=zmq.NOBLOCK)

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            body = await self._sock.recv()
            if len(body) != _REP.size:
                log.warning("link service client %s: malformed reply ignored", self.address)
                continue
            kind, status, li, _pad, rid, qb, qt = _REP.unpack(body)
            if 0 <= li < len(self.links):
                self.links[li].node_queue = (qb, qt)
            if kind == REP_DONE:
                fut = self._waiting.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(status)

    async def transfer(self, li: int, nbytes: int, cls: TrafficClass, tokens: int, track: bool,
                       ideal_s: float) -> None:
        rid = next(self._ids)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        done = False
        try:
            self._send(OP_TRANSFER, li, _CLASSES.index(cls), int(track), rid, nbytes, tokens)
            with anyio.fail_after(self.timeout_s + 4 * ideal_s):
                status = await fut
            done = True
        except TimeoutError:
            raise PeerTimeout(f"the node's link service at {self.address} did not complete a {nbytes}-byte "
                              f"transfer within {self.timeout_s + 4 * ideal_s:.1f} s") from None
        finally:
            self._waiting.pop(rid, None)
            if not done:
                self._send(OP_CANCEL, li, 0, 0, rid, 0, 0)
        if status != ST_OK:
            raise TransportError(f"the node's link service at {self.address} failed a {nbytes}-byte transfer")

    def queue(self, li: int, nbytes: int, tokens: int) -> None:
        self._send(OP_QUEUE, li, 0, 0, 0, nbytes, tokens)


class RemoteLink:
    """A node's link served by another process of the node (duck-types :class:`Link` for a TrafficManager)."""

    def __init__(self, client: NodeLinkClient, index: int, name: str, bandwidth: float | None) -> None:
        self.client = client
        self.index = index
        self.name = name
        self.bandwidth = bandwidth
        self.stats = LinkStats()  # this engine's share (bytes, transfers); the queue fields are the node's
        self.node_queue = (0, 0)  # (bytes, tokens) of the node's reads in flight, as last pushed by the service

    @property
    def queued_bytes(self) -> int:
        return self.node_queue[0]

    @property
    def queued_tokens(self) -> int:
        return self.node_queue[1]

    @contextmanager
    def track(self, nbytes: int, tokens: int = 0) -> Iterator[None]:
        self.client.queue(self.index, nbytes, tokens)
        try:
            yield
        finally:
            self.client.queue(self.index, -nbytes, -tokens)

    async def transfer(self, nbytes: int, cls: TrafficClass = TrafficClass.KV, *, tokens: int = 0,
                       track: bool = True) -> None:
        if nbytes < 0:
            raise ValueError(f"link {self.name}: nbytes must be >= 0, got {nbytes}")
        cls = TrafficClass(cls)
        self.stats.transfers[cls.value] += 1
        if self.bandwidth is None or nbytes == 0:
            self.stats.bytes[cls.value] += nbytes
            await anyio.lowlevel.checkpoint()
            return
        await self.client.transfer(self.index, nbytes, cls, tokens, track, nbytes / self.bandwidth)
        self.stats.bytes[cls.value] += nbytes

    def carried(self, cls: TrafficClass) -> float:
        return float(self.stats.bytes[TrafficClass(cls).value])

    @property
    def busy_time(self) -> float:
        return 0.0  # the node's busy time is the serving engine's (its Link)


async def share_node_links(links: Any, node_prefix: str, local_index: int, scheduler: str,
                           engines_per_node: int) -> NodeLinkServer | NodeLinkClient | None:
    """Make ``links`` (a :class:`~dualpath.engine.links.LinkSet`) use the node's shared SNIC links: the node's
    first engine serves them, the others use :class:`RemoteLink` s. Call before the engines' traffic managers
    are made. Returns what to close at shutdown (None: nothing to share, one engine per node or unlimited)."""
    names = [f"{node_prefix}.snic.read", f"{node_prefix}.snic.write"]
    if engines_per_node <= 1 or all(links.links[n].bandwidth is None for n in names):
        return None
    address = service_address(scheduler, node_prefix)
    if local_index == 0:
        hosts: list[_HostLink] = []
        for n in names:
            old = links.links[n]
            hosts.append(_HostLink(n, old.bandwidth, old.kv_share, clock=old.clock))
            links.links[n] = hosts[-1]
        server = NodeLinkServer(list(hosts), address)
        for i, hl in enumerate(hosts):
            hl.server, hl.index = server, i
        await server.start()
        return server
    client = NodeLinkClient(address)
    for n in names:
        links.links[n] = client.link(n, links.links[n].bandwidth)
    await client.start()
    return client
