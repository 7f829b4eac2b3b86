"""ZeroMQ transport: between processes or hosts over ``tcp://`` or ``ipc://``.

Each endpoint binds one ROUTER (loopback unless configured; port 0 picks a free port) and connects one DEALER
per peer. A write is ``[header, payload]``: the fixed binary header of :mod:`dualpath.transports.wire` (copied
into its frame) and the payload as a zero-copy frame straight from the source tensor's memory (above pyzmq's
64 KiB copy threshold). The receiver reads the header frame first, checks it and the tag (holding early
arrivals) and, when the tag names an idle host slot of exactly the header's size and no checksum travels,
receives the payload frame straight into that slot (``recv_into``: libzmq's one copy, never past the slot's
end; the frame's real size is reported, so a payload that disagrees with its own header fails the landing it
claimed). Otherwise (size mismatch, early arrival, duplicate, checksum, device slot) it receives the frame,
checks size and xxh3 checksum before a byte is written, then copies it (one memcpy, or one host-to-device
copy). Either way it acknowledges; ``write`` returns on the acknowledgement. A write given up (not acknowledged
within its timeout, or cancelled by its caller) whose zero-copy payload frame libzmq still holds a tenth of a
second later (timed out) or half a second later (cancelled) resets that peer's socket (dropping queued frames,
so no source buffer stays referenced); one whose payload was copied into its frame (below 64 KiB) or was sent and
released (tracked) within that grace leaves the socket, and the peer's other writes, alone.

All sockets live in one **I/O thread** per endpoint, driven by plain (blocking, GIL-releasing) zmq calls: it
receives, claims the landing slot (the landing table is locked against this thread), lands, acknowledges (a
poll round's acks to one sender go as one frame, :func:`~dualpath.transports.wire.pack_acks`: every socket call
is a GIL round trip), and hands completions to the event loop in batches (one ``call_soon_threadsafe`` per
poll round). The event loop
hands writes (and connects, resets, late acks) to the thread in order through a deque, waking it with one byte
on an ``inproc`` PAIR per wake-up; the payload is sent zero-copy from the source tensor. (The previous design
drove the sockets from asyncio, ``zmq.asyncio``: its wake-ups cost more than the bytes.)

**Data socket** (``data_socket: auto``, the default, over tcp without CURVE; ``tcp`` forces it, ``zmq`` turns it
off; :mod:`dualpath.transports.zmq_data`): payloads of at least
``data_socket_min_bytes`` go over one plain TCP connection per peer instead, driven by the event loop and
received by the kernel straight into the landing slot; zmq keeps small writes, the handshake (a ``HELLO`` that
hands out the receiver's data port and a random per-endpoint secret) and every write made while no data
connection is up. Not encrypted, so refused together with CURVE.

With CURVE keys configured the ROUTER is a CURVE server and a ZAP authenticator
admits only ``curve_allowed_clients``; the address then carries the server key (``tcp://h:p|curve=KEY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import anyio
import torch
import zmq

from dualpath.errors import ConfigError, PeerTimeout, TransportClosed, TransportError
from dualpath.transports.base import Transport
from dualpath.transports.config import ZmqTransportConfig
from dualpath.transports.landing import Rejected, Slot
from dualpath.transports.wire import (
    Header,
    Kind,
    Status,
    WireError,
    checksum_of,
    decode,
    encode,
    pack_acks,
    unpack_acks,
)
from dualpath.transports.zmq_data import SECRET_BYTES, DataLink, DataServer, Outgoing, ack_frame
from dualpath.transports.zmq_data import land as _land

log = logging.getLogger("dualpath.transports.zmq")
_KEY_SEP = "|curve="


def split_address(address: str) -> tuple[str, str | None]:
    """``tcp://h:p|curve=KEY`` -> (``tcp://h:p``, KEY)."""
    if _KEY_SEP in address:
        endpoint, key = address.split(_KEY_SEP, 1)
        return endpoint, key
    return address, None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 256 << 20
_heap_tuned: bool | None = None


def retain_receive_buffers() -> bool:
    """Tune glibc's malloc once per process so freed receive buffers stay in the heap; True when in effect.

    libzmq allocates every received message of more than a few KiB afresh (in its I/O thread) and frees it when
    we have landed it. With glibc's defaults the freed memory goes back to the kernel (an ``munmap``, or a heap
    trim) whenever the heap's top is free, so the next message's buffer is page-faulted in again: with a window
    of writes in flight that is most of them (measured on a 2-core box, medians of 3: receiver CPU per GiB
    -27 / -8 / -17 % at 1 / 4 / 16 MiB with this on). Setting the thresholds explicitly (which also
    turns off glibc's own dynamic mmap threshold) keeps allocations below 32 MiB in the heap and trims only
    when more than 256 MiB at its top is free. Process-wide; a no-op (False) off glibc."""
    global _heap_tuned
    if _heap_tuned is None:
        _heap_tuned = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _heap_tuned = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
                    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError):
                pass
        log.debug("malloc tuned for zmq receive buffers: %s", _heap_tuned)
    return _heap_tuned


def _discard_rest(sock: zmq.Socket[bytes]) -> int:
    """Receive and drop the rest of the message being read (its frames are all there); how many there were."""
    n = 0
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv_into(_NOTHING)
        n += 1
    return n


_RELINK_S = 0.5  # at most one new data connection per peer this often
#: how long a cancelled write waits for its payload to finish leaving before it resets the peer's connection
#: (which fails every other write queued there): on a loaded machine libzmq's release of a frame, or the kernel's
#: room for the rest of a half-sent payload, can trail the send by a tenth of a second
_LET_GO_GRACE_S = 0.5
#: the same for a write that timed out (its payload had the whole deadline to leave: a peer not taking bytes is
#: the likelier cause, and the caller's deadline has passed already)
_LET_GO_GRACE_TIMED_OUT_S = 0.1
DATA_SOCKET_WITH_CURVE = ("transport.data_socket='tcp' cannot be combined with CURVE (transport.curve_secret_key / "
                          "transport.curve_public_key): the data socket is not encrypted; use data_socket='zmq'")
_NOTHING = bytearray()  # recv_into an empty buffer discards a frame without copying it
_DRAIN = 256  # messages handled per poll round of the I/O thread before its completions go to the event loop
_WRITE, _CONNECT, _RESET, _ACK, _EXIT = b"W", b"C", b"R", b"A", b"X"  # commands, event loop -> I/O thread
_HELLO = b"H"  # ask the peer (again) for its data socket

AckResult = tuple[Status | None, str]


_ack_frame = ack_frame
Reply = Callable[[int, str, Status, str], None]  # acknowledge (seq, tag, status, reason) to an arrival's sender


class ZmqTransport(Transport):
    kind = "zmq"

    def __init__(self, name: str, config: ZmqTransportConfig | None = None) -> None:
        cfg = config or ZmqTransportConfig()
        super().__init__(name, checksum=cfg.checksum, max_pending_bytes=cfg.max_pending_bytes,
                         pending_timeout_s=cfg.pending_timeout_s)
        self.config = cfg
        self._curve = cfg.curve_secret_key is not None or cfg.curve_public_key is not None
        if self._curve and not (cfg.curve_secret_key and cfg.curve_public_key):
            raise ConfigError("transport.curve_secret_key and transport.curve_public_key must be set together")
        self._data_tcp = cfg.uses_data_socket
        if self._data_tcp and self._curve:
            raise ConfigError(DATA_SOCKET_WITH_CURVE)
        self._data_server: DataServer | None = None  # receiving side of the data socket (data_socket: tcp)
        self._links: dict[str, DataLink] = {}  # peer -> our data connection to it
        self._offers: dict[str, tuple[str, int, bytes]] = {}  # peer -> (host, port, secret) it offered
        self._link_tried: dict[str, float] = {}  # peer -> when we last opened a data connection to it
        self._data_writes = 0
        self._ctx: zmq.Context[Any] | None = None
        self._auth: object | None = None
        self._endpoint = ""
        self._peers: dict[str, str] = {}  # peer -> address (event loop's view)
        self._pending: dict[int, asyncio.Future[AckResult]] = {}  # seq -> the write awaiting its ack
        self._seq_peer: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)
        self._limiter = anyio.CapacityLimiter(2)
        self._ipc_path: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cmd: zmq.Socket[bytes] | None = None  # event loop's end of the inproc wake-up pipe
        self._outbox: deque[tuple[bytes, str, object, object]] = deque()  # commands for the I/O thread, in order
        self._armed = False  # a wake-up is on its way to the I/O thread
        self._inbox: deque[Callable[[], None]] = deque()  # completions for the event loop, in order
        self._loop_armed = False  # a drain of _inbox is scheduled on the event loop
        self._thread: threading.Thread | None = None
        self._router: zmq.Socket[bytes] | None = None  # owned by the I/O thread after start()

    # --- lifecycle ------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        if not self._endpoint:
            raise TransportError(f"{self.name}: address is known after start()")
        if self._curve:
            return f"{self._endpoint}{_KEY_SEP}{self.config.curve_public_key}"
        return self._endpoint

    async def start(self) -> None:
        self._check_open()
        if self._started:
            return
        cfg = self.config
        if cfg.retain_receive_buffers:
            retain_receive_buffers()
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        if self._curve:
            self._start_auth()
            router.curve_server = True
            router.curve_secretkey = cfg.curve_secret_key.encode()  # type: ignore[union-attr]
            router.curve_publickey = cfg.curve_public_key.encode()  # type: ignore[union-attr]
        if cfg.scheme == "tcp":
            router.bind(f"tcp://{cfg.host}:{cfg.port or '*'}")
        else:
            self._ipc_path = os.path.join(cfg.ipc_dir, f"dualpath-{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
            router.bind(f"ipc://{self._ipc_path}")
        self._endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
        self._router = router
        if self._data_tcp:
            self._data_server = DataServer(self, cfg.host, max_message_bytes=cfg.max_message_bytes,
                                           handshake_timeout_s=cfg.data_socket_connect_timeout_s)
        inproc = f"inproc://dualpath-cmd-{id(self)}"
        cmd = self._ctx.socket(zmq.PAIR)
        cmd.setsockopt(zmq.LINGER, 0)
        cmd.setsockopt(zmq.SNDHWM, 0)  # wake-up bytes only (commands sit in the deque)
        cmd.bind(inproc)
        io_end = self._ctx.socket(zmq.PAIR)
        io_end.setsockopt(zmq.LINGER, 0)
        io_end.setsockopt(zmq.RCVHWM, 0)
        io_end.connect(inproc)
        self._cmd = cmd
        self._thread = threading.Thread(target=self._io_main, args=(router, io_end), name=f"zmq-io-{self.name}",
                                        daemon=True)
        self._thread.start()
        await super().start()

    def _start_auth(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        allowed = set(self.config.curve_allowed_clients)
        owner = self.name

        class _Keys:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key.decode() in allowed
                if not ok:
                    log.warning("%s: rejected connection: CURVE client key %s is not allowed", owner, key.decode())
                return ok

        assert self._ctx is not None
        auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("dualpath.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
        self._auth = auth

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        for task in list(self._tasks):
            task.cancel()
        self._fail_pending(None, Status.CLOSED, f"{self.name}: transport closed")
        if self._cmd is not None:
            self._armed = False
            self._command(_EXIT, "")
        if self._thread is not None:
            thread = self._thread
            await anyio.to_thread.run_sync(thread.join, 10.0)
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self._data_server is not None:
            self._data_server.close()
        if self._cmd is not None:
            self._cmd.close(linger=0)
        if self._auth is not None:
            self._auth.stop()  # type: ignore[attr-defined]
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self._ipc_path:
            with contextlib.suppress(OSError):
                os.unlink(self._ipc_path)
        await asyncio.sleep(0)

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed: %r", self.name, task.exception())

    # --- the I/O thread -------------------------------------------------------------------------------------
    def _io_main(self, router: zmq.Socket[bytes], cmd: zmq.Socket[bytes]) -> None:
        """Own every socket: poll the ROUTER (arrivals), the command pipe (writes, connects, resets, acks from
        the loop) and the DEALERs (acknowledgements); hand what the event loop must see over in batches."""
        dealers: dict[str, zmq.Socket[bytes]] = {}
        owners: dict[zmq.Socket[bytes], str] = {}
        self._backlog: dict[zmq.Socket[bytes], deque[tuple[int, list[Any]]]] = {}
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(cmd, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                todo: list[Callable[[], None]] = []
                if router in events:
                    self._io_arrivals(router, todo)
                for sock, ev in events.items():
                    peer = owners.get(sock)  # type: ignore[call-overload]
                    if peer is None:
                        continue
                    if ev & zmq.POLLIN:
                        self._io_acks(sock, peer, todo)  # type: ignore[arg-type]
                    if ev & zmq.POLLOUT:
                        self._io_flush(sock, poller, todo)  # type: ignore[arg-type]
                if cmd in events and not self._io_commands(cmd, router, dealers, owners, poller, todo):
                    return
                if todo:
                    self._to_loop(todo)
        except Exception as exc:  # a bug or a closed context: say so, and fail what waits
            if not self._closed:
                log.error("%s: zmq I/O thread failed: %r", self.name, exc)
                why = f"{self.name}: zmq I/O thread failed: {exc!r}"
                self._to_loop([lambda: self._fail_pending(None, Status.CLOSED, why)])
        finally:
            for sock in dealers.values():
                sock.close(linger=0)
            router.close(linger=0)
            cmd.close(linger=0)

    def _to_loop(self, todo: list[Callable[[], None]]) -> None:
        """Hand completions to the event loop: queued in order, one ``call_soon_threadsafe`` (a self-pipe write)
        only when the loop is not already due to drain the queue."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._inbox.extend(todo)
        if not self._loop_armed:
            self._loop_armed = True
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._loop_armed = False  # before draining: completions queued after this schedule another drain
        inbox = self._inbox
        while inbox:
            fn = inbox.popleft()
            try:
                fn()
            except Exception as exc:
                log.error("%s: completion failed: %r", self.name, exc)

    def _io_commands(self, cmd: zmq.Socket[bytes], router: zmq.Socket[bytes], dealers: dict[str, zmq.Socket[bytes]],
                     owners: dict[zmq.Socket[bytes], str], poller: zmq.Poller,
                     todo: list[Callable[[], None]]) -> bool:
        """Run the event loop's commands, in order: they sit in ``_outbox``; the pipe only wakes this thread."""
        with contextlib.suppress(zmq.Again):
            for _ in range(_DRAIN):
                cmd.recv(zmq.NOBLOCK)
        self._armed = False  # before draining: a command queued after this wakes us again
        outbox = self._outbox
        while outbox:
            op, peer, a, b = outbox.popleft()
            if op == _WRITE:
                sock = dealers.get(peer)
                seq = cast(int, a)
                if sock is None:
                    todo.append(self._completion(seq, Status.CLOSED, f"peer {peer!r} has no socket"))
                    continue
                backlog = self._backlog.get(sock)
                if backlog:  # keep the order behind frames that could not be queued yet
                    backlog.append((seq, cast(list[Any], b)))
                    continue
                self._io_send(sock, seq, cast(list[Any], b), poller, todo)
            elif op == _ACK:
                with contextlib.suppress(zmq.ZMQError):
                    router.send_multipart([cast(bytes, a), cast(bytes, b)], zmq.NOBLOCK)
            elif op in (_CONNECT, _RESET):
                old = dealers.pop(peer, None)
                if old is not None:
                    poller.unregister(old)
                    owners.pop(old, None)
                    self._backlog.pop(old, None)
                    old.close(linger=0)  # drops queued frames: no source buffer stays referenced
                address = cast(str, a)
                if address:
                    try:
                        sock = self._open(peer, address)
                    except Exception as exc:
                        log.error("%s: cannot connect to %r at %s: %r", self.name, peer, address, exc)
                        continue
                    dealers[peer] = sock
                    owners[sock] = peer
                    poller.register(sock, zmq.POLLIN)
                    if op == _CONNECT and self._data_tcp:  # ask for the peer's data socket (answered by a HELLO)
                        hello = encode(Header(Kind.HELLO, 0, "data", extra=self.name.encode()))
                        self._io_send(sock, 0, [hello], poller, todo)
            elif op == _HELLO:
                sock = dealers.get(peer)
                if sock is not None:
                    self._io_send(sock, 0, [encode(Header(Kind.HELLO, 0, "data", extra=self.name.encode()))],
                                  poller, todo)
            elif op == _EXIT:
                return False
        return True

    def _io_send(self, sock: zmq.Socket[bytes], seq: int, frames: list[Any], poller: zmq.Poller,
                 todo: list[Callable[[], None]]) -> bool:
        """Queue one write on a DEALER; when it would block (no connection yet, e.g. a CURVE handshake that
        fails), keep it in the peer's backlog until the socket is writable (the write's deadline bounds it)."""
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self._backlog.setdefault(sock, deque()).append((seq, frames))
            poller.modify(sock, zmq.POLLIN | zmq.POLLOUT)
        except zmq.ZMQError as exc:
            todo.append(self._completion(seq, Status.BAD, f"send failed: {exc}"))
        return False

    def _io_flush(self, sock: zmq.Socket[bytes], poller: zmq.Poller, todo: list[Callable[[], None]]) -> None:
        backlog = self._backlog.get(sock)
        while backlog:
            seq, frames = backlog.popleft()
            if seq not in self._pending:  # timed out or cancelled meanwhile
                continue
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                backlog.appendleft((seq, frames))
                return
            except zmq.ZMQError as exc:
                todo.append(self._completion(seq, Status.BAD, f"send failed: {exc}"))
        self._backlog.pop(sock, None)
        poller.modify(sock, zmq.POLLIN)

    def _open(self, peer: str, address: str) -> zmq.Socket[bytes]:
        assert self._ctx is not None
        endpoint, server_key = split_address(address)
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # zero-copy frames: queued writes cost no memory; timeouts bound them
        if server_key is not None:
            sock.curve_serverkey = server_key.encode()
            sock.curve_secretkey = self.config.curve_secret_key.encode()  # type: ignore[union-attr]
            sock.curve_publickey = self.config.curve_public_key.encode()  # type: ignore[union-attr]
        sock.connect(endpoint)
        return sock

    def _io_acks(self, sock: zmq.Socket[bytes], peer: str, todo: list[Callable[[], None]]) -> None:
        for _ in range(_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for frame in frames:  # an ack, or a batch of them (the receiver batches a poll round's acks)
                try:
                    hdrs = unpack_acks(frame)
                except WireError as exc:
                    log.warning("%s: bad ack from %s: %s", self.name, peer, exc)
                    continue
                for hdr in hdrs:
                    if hdr.kind is Kind.HELLO:  # the peer's answer to our HELLO: its data socket, if any
                        todo.append(lambda hdr=hdr: self._on_offer(peer, hdr))  # type: ignore[misc]
                        continue
                    todo.append(self._completion(hdr.seq, hdr.status, hdr.extra.decode("utf-8", "replace")))

    def _completion(self, seq: int, status: Status | None, reason: str) -> Callable[[], None]:
        def done() -> None:
            fut = self._pending.pop(seq, None)
            self._seq_peer.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result((status, reason))
        return done

    def _io_arrivals(self, router: zmq.Socket[bytes], todo: list[Callable[[], None]]) -> None:
        acks: dict[bytes, list[bytes]] = {}
        for _ in range(_DRAIN):
            try:
                ident = router.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._on_message(router, ident, acks, todo)
            except Exception as exc:  # never let one message kill the thread
                log.error("%s: error handling a message: %r", self.name, exc)
            finally:
                _discard_rest(router)  # a message's frames arrive together: none of them blocks
        for dest, ack_frames in acks.items():  # one frame per sender and round: each socket call costs a GIL trip
            with contextlib.suppress(zmq.ZMQError):
                router.send_multipart([dest, pack_acks(ack_frames)], zmq.NOBLOCK)

    def _on_message(self, router: zmq.Socket[bytes], ident: bytes, acks: dict[bytes, list[bytes]],
                    todo: list[Callable[[], None]]) -> None:
        """Handle one message (I/O thread) whose routing frame was just received: read its header frame, check
        it, claim its slot, land the payload frame, acknowledge.

        The fast path receives the payload frame straight into the claimed slot (``recv_into``: libzmq copies
        its message into our memory, no Python frame in between). It is taken only when every check that can
        be made before the payload is read has passed: a DATA header without a checksum whose tag names an
        idle host slot of exactly the header's size. ``recv_into`` never writes past the slot and reports the
        frame's real size, so a payload that disagrees with its own header (a broken or hostile sender) fails
        the landing it claimed: the waiter gets :class:`TransportError` and the slot's bytes are unspecified,
        like any failed landing's. Everything else (early arrivals, size mismatches, duplicates, checksums,
        device slots) receives the frame first and is checked before a byte is written."""

        def ack(seq: int, tag: str, status: Status, reason: str = "") -> None:
            if not self._closed:
                acks.setdefault(ident, []).append(_ack_frame(seq, tag, status, reason))

        landings = self._landings
        if not router.getsockopt(zmq.RCVMORE):
            landings.reject("?", "message without a header frame")
            return
        try:
            hdr = decode(router.recv())
        except WireError as exc:
            landings.reject("?", f"bad header: {exc}; nothing written")
            ack(0, "", Status.BAD, str(exc))
            return
        sender = hdr.extra.decode("utf-8", "replace") or "?"
        if hdr.kind is Kind.HELLO and not router.getsockopt(zmq.RCVMORE):  # a sender asks for our data socket
            server = self._data_server
            offer = server.offer() if server is not None else Header(Kind.HELLO, 0, "data")
            with contextlib.suppress(zmq.ZMQError):
                router.send_multipart([ident, encode(offer)], zmq.NOBLOCK)
            return
        if hdr.kind is not Kind.DATA or not router.getsockopt(zmq.RCVMORE):
            reason = f"unexpected {hdr.kind.name} message with {2 + _discard_rest(router)} frames; nothing written"
            landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        if self.checksum and hdr.checksum is None:
            reason = f"tag {hdr.tag!r} arrived without a checksum and this endpoint requires one; nothing written"
            landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.REJECTED, reason)
            return
        fast = landings.claim_exact(hdr.tag, hdr.payload_len) if hdr.checksum is None else None
        if fast is not None and fast.host is not None:  # the common case: libzmq's one copy lands it in the slot
            try:
                got = router.recv_into(fast.host, nbytes=hdr.payload_len)
                extra = _discard_rest(router)
                problem = (f"payload is {got} bytes, header says {hdr.payload_len}" if got != hdr.payload_len
                           else f"unexpected DATA message with {2 + extra} frames" if extra else "")
            except Exception as exc:  # the slot is claimed: it must end, or its waiter would wait out its deadline
                got, problem = 0, f"receive failed: {exc!r}"
            if problem:
                reason = f"{self.name}: tag {hdr.tag!r}: {problem}; landing failed"
                landings.reject(sender, reason)
                err = TransportError(reason)
                todo.append(lambda: landings.finish(fast, err))
                ack(hdr.seq, hdr.tag, Status.BAD, reason)
                return
            todo.append(lambda: self._landed(fast, got))
            ack(hdr.seq, hdr.tag, Status.OK)
            return
        payload = router.recv(copy=False)
        extra = _discard_rest(router)
        if extra:
            reason = f"unexpected DATA message with {2 + extra} frames; nothing written"
            landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        buf = payload.buffer
        nbytes = len(buf)
        if nbytes != hdr.payload_len:
            reason = f"payload is {nbytes} bytes, header says {hdr.payload_len}; nothing written"
            landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        try:
            slot = landings.claim(hdr.tag, nbytes, on_loop=False)
        except Rejected as exc:
            landings.reject(sender, str(exc))
            failed: Slot | None = getattr(exc, "failed_slot", None)
            if failed is not None:
                todo.append(lambda failed=failed, exc=exc: landings.finish(failed, exc))  # type: ignore[misc]
            ack(hdr.seq, hdr.tag, Status.REJECTED, str(exc))
            return
        if slot is None:  # early: hold it on the event loop until the tag is exposed (or the hold deadline)
            if not landings.reserve_pending(nbytes):
                reason = (f"tag {hdr.tag!r} is not exposed and the hold area is full "
                          f"({landings.pending_bytes}/{landings.max_pending_bytes} bytes); dropped")
                landings.reject(sender, reason)
                ack(hdr.seq, hdr.tag, Status.REJECTED, reason)
                return
            def reply(seq: int, tag: str, status: Status, reason: str = "") -> None:
                self._send_ack(ident, seq, tag, status, reason)

            todo.append(lambda: self._spawn_hold(reply, sender, hdr, payload.buffer))
            return
        # verify (when a checksum came), then one copy into the exposed region (host or device)
        landing = slot
        try:
            _land(landing.view, buf, hdr.checksum)
        except Exception as exc:
            reason = f"{self.name}: tag {hdr.tag!r}: {exc}"
            landings.reject(sender, reason)
            error: TransportError = Rejected(reason) if isinstance(exc, Rejected) else TransportError(reason)
            todo.append(lambda: landings.finish(landing, error))
            ack(hdr.seq, hdr.tag, Status.CORRUPT if isinstance(exc, Rejected) else Status.BAD, reason)
            return
        todo.append(lambda: self._landed(landing, nbytes))
        ack(hdr.seq, hdr.tag, Status.OK)

    def _landed(self, slot: Slot, nbytes: int) -> None:
        self._landings.finish(slot)
        self.stats.arrivals += 1
        self.stats.bytes_received += nbytes

    def _spawn_hold(self, reply: Reply, sender: str, hdr: Header, buf: memoryview) -> None:
        if self._closed:
            self._landings.release_pending(hdr.payload_len)
            return
        self._spawn(self._hold(reply, sender, hdr, buf))

    def _send_ack(self, ident: bytes, seq: int, tag: str, status: Status, reason: str = "") -> None:
        if self._cmd is None or self._closed:
            return
        self._command(_ACK, "", ident, _ack_frame(seq, tag, status, reason))

    async def _hold(self, reply: Reply, sender: str, hdr: Header, buf: memoryview) -> None:
        """An early arrival (``buf``: its payload, received by zmq or the data socket) waits for its tag."""
        try:
            slot = await self._landings.claim_wait(hdr.tag, hdr.payload_len)
        except Rejected as exc:
            self._landings.reject(sender, str(exc))
            reply(hdr.seq, hdr.tag, Status.REJECTED, str(exc))
            return
        finally:
            self._landings.release_pending(hdr.payload_len)
        try:
            if len(buf) <= self.config.inline_copy_bytes and hdr.checksum is None:
                _land(slot.view, buf, None)
            else:
                await anyio.to_thread.run_sync(_land, slot.view, buf, hdr.checksum, limiter=self._limiter)
        except Exception as exc:
            reason = f"{self.name}: tag {hdr.tag!r}: {exc}"
            self._landings.reject(sender, reason)
            err = Rejected(reason) if isinstance(exc, Rejected) else TransportError(reason)
            self._landings.finish(slot, err)
            reply(hdr.seq, hdr.tag, Status.CORRUPT if isinstance(exc, Rejected) else Status.BAD, reason)
            return
        self._landed(slot, len(buf))
        reply(hdr.seq, hdr.tag, Status.OK, "")

    # --- sending --------------------------------------------------------------------------------------------
    async def connect(self, peer: str, address: str) -> None:
        self._check_open()
        if not self._started:
            raise TransportError(f"{self.name}: start() before connect()")
        if self._peers.get(peer) == address:
            return
        endpoint, server_key = split_address(address)
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise TransportError(f"{self.name}: peer {peer!r} address {address!r} is not tcp:// or ipc://")
        if server_key is not None and not self._curve:
            raise ConfigError(f"transport: peer {peer!r} requires CURVE; set curve_secret_key/curve_public_key")
        if peer in self._peers:
            self._fail_pending(peer, Status.CLOSED, f"{self.name}: peer {peer!r} reconnected to {address}")
        self._offers.pop(peer, None)
        link = self._links.pop(peer, None)
        if link is not None:
            link.abort(f"peer {peer!r} reconnected to {address}")
        self._peers[peer] = address
        self._command(_CONNECT, peer, address)

    # --- the data socket (data_socket: tcp; see dualpath.transports.zmq_data) --------------------------------
    def _on_offer(self, peer: str, hdr: Header) -> None:
        """A peer answered our HELLO (event loop): remember its data socket and open a connection to it."""
        address = self._peers.get(peer)
        if self._closed or address is None or not hdr.arg or len(hdr.extra) < SECRET_BYTES:
            return  # it has no data socket (or we moved on): its writes stay on zmq
        endpoint, _ = split_address(address)
        host = hdr.extra[SECRET_BYTES:].decode("utf-8", "replace")
        if endpoint.startswith("tcp://"):  # connect to the host we reach its zmq endpoint at
            host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        self._offers[peer] = (host, int(hdr.arg), bytes(hdr.extra[:SECRET_BYTES]))
        self._link_tried.pop(peer, None)
        self._data_link(peer)

    def _data_link(self, peer: str) -> DataLink | None:
        """The ready data connection to ``peer``, or None (then the write goes over zmq). Opens one (in its own
        thread, at most every ``_RELINK_S``) when there is an offer but no live connection."""
        link = self._links.get(peer)
        if link is not None and not link.dead:
            return link if link.ready else None
        if link is not None and link.never_opened and self._offers.get(peer) == (link.host, link.port, link.secret):
            # refused or unreachable with this offer (the peer restarted at the same address, or is down): ask
            # for a fresh one, once; large writes stay on zmq until it comes
            self._offers.pop(peer, None)
            if not self._closed and peer in self._peers:
                self._command(_HELLO, peer)
            return None
        offer = self._offers.get(peer)
        if offer is None or self._closed:
            return None
        now = time.monotonic()
        if now - self._link_tried.get(peer, -_RELINK_S) < _RELINK_S:
            return None
        self._link_tried[peer] = now
        host, port, secret = offer
        self._links[peer] = DataLink(self, peer, host, port, secret,
                                     connect_timeout_s=self.config.data_socket_connect_timeout_s)
        return None

    def data_socket_ready(self, peer: str) -> bool:
        """Whether writes of at least ``data_socket_min_bytes`` to ``peer`` now travel over the data socket."""
        link = self._links.get(peer)
        if link is None or link.dead:
            self._data_link(peer)
            return False
        return link.ready

    @property
    def data_socket_stats(self) -> dict[str, int]:
        """Writes sent and arrivals landed through the data socket (zero unless ``data_socket: tcp``)."""
        server = self._data_server
        return {"writes": self._data_writes, "arrivals": server.arrivals if server is not None else 0}


    def _command(self, op: bytes, peer: str, a: object = None, b: object = None) -> None:
        """Queue a command for the I/O thread (a Python deque: no frame per item) and wake it if it is not
        already due to look (one byte on the inproc pipe per wake-up, not per command)."""
        assert self._cmd is not None
        self._outbox.append((op, peer, a, b))
        if not self._armed:
            self._armed = True
            with contextlib.suppress(zmq.ZMQError):
                self._cmd.send(b"", zmq.NOBLOCK)

    def _fail_pending(self, peer: str | None, status: Status, reason: str) -> None:
        """Fail the writes awaiting acks (to ``peer``, or all)."""
        for seq in [s for s, p in self._seq_peer.items() if peer is None or p == peer]:
            self._seq_peer.pop(seq, None)
            fut = self._pending.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result((status, reason))

    def _reset(self, peer: str, reason: str) -> None:
        """Drop the peer's socket and every frame queued on it (releases source buffers), then reopen."""
        self._fail_pending(peer, Status.CLOSED, reason)
        if not self._closed and peer in self._peers:
            self._command(_RESET, peer, self._peers[peer])

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        _, data = self._prepare_write(tag, src)
        if timeout is None or not timeout >= 0:
            raise TransportError(f"timeout must be a number >= 0, got {timeout!r}")
        if peer not in self._peers:
            raise TransportError(f"{self.name}: peer {peer!r} is not connected (call connect first)")
        nbytes = int(data.numel())
        if nbytes > self.config.max_message_bytes:
            raise TransportError(f"{self.name}: {nbytes} bytes exceed max_message_bytes={self.config.max_message_bytes}")
        hint = " (CURVE on: is our public key allowed by the peer?)" if self._curve else ""
        what = f"write of {tag!r} to {peer!r}{hint}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        host = data
        csum = checksum
        if data.device.type != "cpu" or (csum is None and self.checksum):
            async def prepare() -> None:
                nonlocal host, csum
                if data.device.type != "cpu":
                    host = await anyio.to_thread.run_sync(data.cpu, limiter=self._limiter)
                if csum is None and self.checksum:
                    csum = await anyio.to_thread.run_sync(checksum_of, host, limiter=self._limiter)
            await self._guarded(what, timeout, prepare)
        self._check_open()
        seq = next(self._seq)
        fut: asyncio.Future[AckResult] = loop.create_future()
        hdr = encode(Header(Kind.DATA, seq, tag, nbytes, csum, extra=self.name.encode()))
        self._pending[seq] = fut
        self._seq_peer[seq] = peer
        timer = loop.call_at(deadline, _expire, fut)
        link: DataLink | None = None
        item: Outgoing | None = None
        if self._data_tcp and nbytes >= self.config.data_socket_min_bytes:
            link = self._data_link(peer)
            if link is not None:
                item = Outgoing(seq, encode(Header(Kind.DATA, seq, tag, nbytes, csum)), host.numpy().data)
                if link.submit(item):
                    self._data_writes += 1
                else:
                    item = None
        tracker: zmq.MessageTracker | None = None
        try:
            if item is None:
                # the header is copied into its frame; the payload is zero-copy from ``src`` above pyzmq's copy
                # threshold (64 KiB; each zero-copy frame costs a release message to pyzmq's collector thread),
                # tracked (and not kept here: the tracker completes once libzmq and pyzmq both let go of the frame)
                # so that a write given up can tell whether ``src`` is still held
                big = nbytes >= zmq.COPY_THRESHOLD
                payload = zmq.Frame(host.numpy(), copy=None, track=big)
                tracker = payload.tracker if big else _SMALL
                self._command(_WRITE, peer, seq, [zmq.Frame(hdr), payload])
                del payload
            status, reason = await fut
        except BaseException:
            self._pending.pop(seq, None)
            self._seq_peer.pop(seq, None)
            if link is not None and item is not None:  # the data link must let go of ``src`` before we return
                sending = item
                if sending.started and not self._closed:
                    await _within_grace(lambda: sending.sent or link.dead)  # type: ignore[union-attr]
                link.release(item, f"{what} was cancelled")
            elif not self._closed and not await _within_grace(lambda: _let_go(tracker), tracker is not None):
                self._reset(peer, f"{self.name}: {what} was cancelled")
            raise
        finally:
            timer.cancel()
        if link is not None and item is not None:
            if status is Status.OK:
                link.forget(seq)
            else:
                link.release(item, f"{what} failed: {_name(status)}")
        if status is Status.OK:
            self.stats.writes += 1
            self.stats.bytes_sent += nbytes
            return
        if self._closed:
            raise TransportClosed(f"{self.name}: transport closed during {what}")
        if status is None:
            self._pending.pop(seq, None)
            self._seq_peer.pop(seq, None)
            # Not acknowledged in time. Bytes that left entirely (the receiver may hold them while their tag is not
            # exposed) need nothing more: its other writes to that peer go on. Bytes still queued mean the peer
            # does not take them: its connection is dropped (with every write queued on it), releasing ``src``.
            if link is not None and item is not None:
                sending = item
                if sending.started and not self._closed:
                    await _within_grace(lambda: sending.sent or link.dead,  # type: ignore[union-attr]
                                        grace=_LET_GO_GRACE_TIMED_OUT_S)
                if item.sent:
                    link.forget(seq)
                else:
                    link.abort(f"{what} timed out")
            elif not await _within_grace(lambda: _let_go(tracker), tracker is not None,
                                         grace=_LET_GO_GRACE_TIMED_OUT_S):
                self._reset(peer, f"{self.name}: {what} timed out")
            raise PeerTimeout(f"{self.name}: {what} not delivered within {timeout:g} s")
        raise Rejected(f"{self.name}: {peer!r} refused tag {tag!r} ({_name(status)}): {reason}")


#: the tracker of a payload copied into its frame (below pyzmq's copy threshold): ``src`` is never held
_SMALL: Any = zmq.MessageTracker()


def _let_go(tracker: zmq.MessageTracker | None) -> bool:
    """Whether nothing holds the source buffer of a write's payload frame any more: a copy (below pyzmq's copy
    threshold), or a zero-copy frame libzmq has sent and released. A write given up (cancelled, timed out) then
    leaves its peer's socket alone: resetting it would fail every other write queued to that peer, and they may
    have landed already. None (no frame made): not known, so no."""
    return tracker is not None and (tracker is _SMALL or tracker.done)


async def _within_grace(done: Callable[[], bool], worth_waiting: bool = True, *,
                        grace: float = _LET_GO_GRACE_S) -> bool:
    """Whether ``done()`` holds, now or within ``grace`` seconds (shielded: a cancelled write still waits for its
    payload to leave rather than reset a connection other writes share)."""
    if done() or not worth_waiting:
        return done()
    end = time.monotonic() + grace
    with anyio.CancelScope(shield=True):
        while not done():
            if time.monotonic() >= end:
                return False
            await anyio.sleep(0.002)
    return True


def _expire(fut: asyncio.Future[tuple[Status | None, str]]) -> None:
    if not fut.done():
        fut.set_result((None, "no acknowledgement before the deadline"))


def _name(status: Status | None) -> str:
    return "TIMEOUT" if status is None else status.name
