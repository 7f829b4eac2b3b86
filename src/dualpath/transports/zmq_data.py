"""The zmq transport's data socket (``ZmqTransportConfig.data_socket``: ``auto``, the default, uses it for tcp
endpoints without CURVE; ``tcp`` forces it): payloads of at least
``data_socket_min_bytes`` travel over one plain TCP connection per sender -> receiver pair and are received by
the kernel straight into the claimed landing slot (``recv_into`` on a memoryview of the slot, bounded by it), with
no library buffer in between. zmq keeps everything else: small writes, the handshake, and every write made while
no data connection is up (a write never waits for one).

**No extra threads.** Both ends of a data connection are driven by the endpoint's event loop with non-blocking
sockets: the sender ``sendmsg``s the header and the payload (from the caller's buffer) as soon as ``write``
queues them, the rest when the socket is writable; the receiver reads when the socket is readable (a bounded
amount per callback). Measured on a 2-core box, the thread-per-connection version of this design (blocking
receives, one GIL hand-off per message and direction) cost more CPU than zmq itself; this one costs less than
zmq per byte (``dualpath bench transport --backends zmq,zmq-tcp``: ``cpu_s_per_gib``), and everything the
contract needs (claims, cancels, acknowledgements) happens on one thread.

**Handshake.** A receiver with the data socket on listens on ``host`` (the zmq ``host``: loopback by default,
port chosen by the kernel) and draws a random 32-byte secret per endpoint. A sender's ``connect`` sends a
``HELLO`` over zmq; the receiver answers with a ``HELLO`` carrying its data port and secret (``arg`` = port,
``extra`` = secret + host). The sender then opens a TCP connection and sends a preamble (``DPDS``, the secret,
its endpoint name); the receiver compares the secret in constant time and answers ``DPOK`` or closes. Only then
does the sender route large writes over it. The data socket is not encrypted, and the secret travels over the
CURVE-less zmq channel, so the data connection is exactly as trusted as that zmq endpoint (anyone who can send
to it can ask for the secret); the secret keeps out connections that did not go through the endpoint (stray
processes, scanners), so nothing but framed writes from a handshaken sender ever reaches a landing slot. The
data socket is refused together with CURVE (``ConfigError`` naming both fields).

**Framing.** Each write is the fixed binary header of :mod:`dualpath.transports.wire` (``DATA``, no extra
bytes: the preamble named the sender) and then exactly ``payload_len`` bytes. The receiver reads the 44-byte
header, the tag, then the payload: straight into the slot when the tag names an idle host slot of exactly that
size and no checksum travels; otherwise into a buffer of its own, checked (size, duplicate, checksum) before a
byte is written into a slot, or held as an early arrival like zmq's. An arrival that cannot land (size
mismatch, duplicate, missing checksum, hold area full) is drained from the stream (the framing says how many
bytes to skip) and refused: the connection stays in step. A header that cannot be decoded, or a payload longer
than ``max_message_bytes``, ends the connection (a stream cannot resynchronise past a bad header); the sender's
writes on it fail at once and its next large write reconnects. A connection lost mid-payload fails the landing
it was filling (``TransportError``; a failed landing's bytes are unspecified, never served).

**Acknowledgements** travel back on the same connection (a u32 length, then an encoded ``ACK`` header; those of
one read callback in one send), before the waiter is woken; ``write`` returns on its acknowledgement, as over zmq.

**Cancel and deadlines.** Before every receive into a slot the receiver checks whether the slot was withdrawn
(``cancel``, a timed-out ``wait``, ``close``): cancels run on the same event loop, so after ``cancel`` returns
not one more byte is received into that slot; the rest of the payload is drained and the sender is told. A
write that fails for any reason (its deadline, cancellation, a reset, close) leaves the send queue if none of it
was sent, and resets the connection if part of it was (the stream would be torn), so no source buffer is read
after ``write`` returns. The TCP connect and both sides of the handshake are bounded by
``data_socket_connect_timeout_s``; unread acknowledgements beyond 8 MiB reset the connection; a silent sender
costs no one a deadline (each waiter and writer has its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import socket
import struct
import sys
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import numpy as np
import torch

from dualpath.errors import TransportError
from dualpath.transports.landing import MAX_TAG_BYTES, Rejected, Slot
from dualpath.transports.loopback import device_copy
from dualpath.transports.wire import (
    HEADER_BYTES,
    Header,
    Kind,
    Status,
    WireError,
    checksum_of,
    decode,
    encode,
)

log = logging.getLogger("dualpath.transports.zmq")

PREAMBLE = b"DPDS"
ACCEPTED = b"DPOK"
SECRET_BYTES = 32
MAX_NAME_BYTES = 1024
_LEN = struct.Struct("<I")
_PRE = struct.Struct("<4s32sH")  # magic, secret, name length; then the sender's name
_DRAIN_CHUNK = 1 << 20
_BUDGET = 16 << 20  # payload bytes one readiness callback reads before it yields the event loop


def _kernel_at_least(major: int, minor: int) -> bool:
    if sys.platform != "linux":
        return False
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


# While at least _LOWAT_MIN bytes of a payload are still to come, the connection's SO_RCVLOWAT asks the kernel to
# report it readable once min(rest, _LOWAT_MAX) bytes are buffered, not on every segment: fewer wake-ups and larger
# reads (interleaved A/B on a 2-core box, default config, against no mark: 1 MiB payloads +7-25 %, 4 MiB +15-20 %,
# 16 MiB +20-45 % with a fixed 256 KiB mark; this rest-sized mark up to 512 KiB then gave 1 MiB another +11-19 % and
# left 4 and 16 MiB unchanged; an A/A run of the same harness moved those sizes by <= 3 %). Linux >= 5.8 only: there the kernel grows the receive
# buffer to fit the mark and reports a socket under memory pressure readable anyway, so a mark never stalls a sender
# whose bytes do not fit (elsewhere _LOWAT_MAX is 0: the mark stays 1, a wake-up per segment). A raised mark that no read
# follows within _LOWAT_WAIT_S goes back to 1 (setting it wakes the reader if bytes are buffered), so a sender that
# pauses mid-payload, waiting for anything of ours, cannot stall the reader either.
_LOWAT_MAX = 512 << 10 if _kernel_at_least(5, 8) else 0
_LOWAT_MIN = 64 << 10
_LOWAT_WAIT_S = 0.002
_INLINE_BYTES = 4 << 20  # checked landings up to this size copy on the event loop; larger in a thread


def land(view: torch.Tensor, buf: memoryview, verify: int | None) -> None:
    """Verify (optional) then copy a received payload into a landing view (host memcpy or host-to-device)."""
    if verify is not None and checksum_of(buf) != verify:
        raise Rejected("checksum mismatch; arrival discarded")
    arr = np.frombuffer(buf, dtype=np.uint8)
    if view.device.type == "cpu":
        np.copyto(view.numpy(), arr)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        src = torch.from_numpy(arr)
    device_copy(view, src)


def ack_frame(seq: int, tag: str, status: Status, reason: str = "") -> bytes:
    return encode(Header(Kind.ACK, seq, tag, status=status, extra=reason.encode()[:4000]))


class Owner(Protocol):
    """What the data socket needs from its zmq transport (:class:`dualpath.transports.zmq.ZmqTransport`)."""

    name: str
    checksum: bool
    _closed: bool

    @property
    def _landings(self) -> Any: ...

    def _landed(self, slot: Slot, nbytes: int) -> None: ...

    def _spawn(self, coro: Any) -> Any: ...

    def _spawn_hold(self, reply: Callable[[int, str, Status, str], None], sender: str, hdr: Header,
                    buf: memoryview) -> None: ...

    def _completion(self, seq: int, status: Status | None, reason: str) -> Callable[[], None]: ...


class _Torn(ConnectionError):
    """The peer closed the connection in the middle of a frame."""


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    mv, got = memoryview(buf), 0
    while got < n:
        k = await loop.sock_recv_into(sock, mv[got:])
        if k == 0:
            raise _Torn(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


class _Writer:
    """Non-blocking sends of small frames (acknowledgements) on the event loop: what the kernel does not take at
    once waits in a buffer, sent when the socket is writable; more than ``limit`` waiting resets the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_error: Callable[[str], None],
                 limit: int = 8 << 20) -> None:
        self.loop, self.sock, self.on_error, self.limit = loop, sock, on_error, limit
        self.out = bytearray()
        self.armed = False

    def send(self, data: bytes) -> None:
        if not self.out:
            try:
                k = self.sock.send(data)
            except BlockingIOError:
                k = 0
            except OSError as exc:
                self.on_error(f"send failed: {exc!r}")
                return
            if k == len(data):
                return
            data = data[k:]
        self.out += data
        if len(self.out) > self.limit:
            self.on_error(f"more than {self.limit} bytes of acknowledgements unread")
            return
        if not self.armed:
            self.armed = True
            self.loop.add_writer(self.sock, self._flush)

    def _flush(self) -> None:
        try:
            k = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.on_error(f"send failed: {exc!r}")
            return
        del self.out[:k]
        if not self.out:
            self.armed = False
            self.loop.remove_writer(self.sock)

    def stop(self) -> None:
        if self.armed:
            self.armed = False
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock)


# --- the receiving side ------------------------------------------------------------------------------------------


class _Incoming:
    """One authenticated sender's data connection, read on the event loop by a small state machine: the fixed
    header, the tag, then the payload into its target (the claimed slot, a buffer of ours, or nowhere: drained)."""

    def __init__(self, server: DataServer, conn: socket.socket, peer: str) -> None:
        self.server, self.conn, self.peer = server, conn, peer
        self.owner = server.owner
        self.loop = server.loop
        self.writer = _Writer(self.loop, conn, self.reset)
        self.head = bytearray(HEADER_BYTES + MAX_TAG_BYTES)
        self.hv = memoryview(self.head)
        self.need = HEADER_BYTES  # header bytes wanted (44, then 44 + tag length)
        self.got = 0
        self.hdr: Header | None = None
        self.slot: Slot | None = None  # the slot being written (straight into it)
        self.dest: memoryview | None = None  # where payload bytes go (slot memory or our buffer); None: drained
        self.buf: bytearray | None = None
        self.left = 0  # payload bytes still to come
        self.on_done: Callable[[], None] | None = None  # when the payload is all read
        self.on_abort: Callable[[], None] | None = None  # when the connection ends before that
        self.scratch = memoryview(bytearray(_DRAIN_CHUNK))
        self.closed = False
        self.batch: list[bytes] | None = None  # acknowledgements of one readiness callback, sent together
        self.lowat = 1  # the connection's SO_RCVLOWAT (raised while a large payload is read: fewer wake-ups)
        self.nudge: asyncio.TimerHandle | None = None  # lowers a raised mark no read followed within _LOWAT_WAIT_S

    def start(self) -> None:
        self.loop.add_reader(self.conn, self.readable)

    def ack(self, seq: int, tag: str, status: Status, reason: str = "") -> None:
        if self.closed or self.owner._closed:
            return
        frame = ack_frame(seq, tag, status, reason)
        if self.batch is not None:
            self.batch.append(_LEN.pack(len(frame)) + frame)
        else:
            self.writer.send(_LEN.pack(len(frame)) + frame)

    def reset(self, reason: str, *, torn: bool = False) -> None:
        """End the connection (the sender's writes on it fail there); a slot being filled fails with ``reason``."""
        if self.closed:
            return
        self.closed = True
        if self.nudge is not None:
            self.nudge.cancel()
            self.nudge = None
        self.writer.stop()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.conn)
        with contextlib.suppress(OSError):
            self.conn.close()
        self.server.conns.discard(self)
        slot, self.slot = self.slot, None
        if slot is not None:
            self.owner._landings.finish(slot, Rejected(
                f"{self.owner.name}: tag {slot.tag!r}: data connection lost mid-payload ({reason}); landing failed"))
        on_abort, self.on_abort = self.on_abort, None
        if on_abort is not None:
            on_abort()
        if not self.server.closed and not self.owner._closed and (torn or reason):
            self.owner._landings.reject(self.peer, f"data connection from {self.peer!r} reset: {reason}")

    def readable(self) -> None:
        """Read what the kernel has (bounded per call, so the loop stays responsive); the acknowledgements of
        what landed go back in one send (each send on loopback costs about as much as a wake-up)."""
        if self.nudge is not None:
            self.nudge.cancel()
            self.nudge = None
        self.batch = []
        try:
            self._read()
        finally:
            if self.lowat != 1 and not self.closed:  # whatever ended this read, bytes below the mark land in ~2 ms
                self.nudge = self.loop.call_later(_LOWAT_WAIT_S, self._lower_mark)
            batch, self.batch = self.batch, None
            if batch and not self.closed:
                self.writer.send(b"".join(batch))

    def _read(self) -> None:
        budget = _BUDGET
        conn = self.conn
        try:
            while budget > 0 and not self.closed:
                if self.hdr is None:  # reading a header
                    k = conn.recv_into(self.hv[self.got:self.need], self.need - self.got)
                    if k == 0:
                        if self.got:
                            self.reset(f"connection closed inside a header ({self.got} bytes)", torn=True)
                        else:
                            self.reset("")
                        return
                    self.got += k
                    if self.got < self.need:
                        return  # short read: the kernel has nothing more now (the reader fires again when it has)
                    if self.need == HEADER_BYTES:
                        tag_len = int.from_bytes(self.head[8:10], "little")
                        if tag_len > MAX_TAG_BYTES:
                            raise WireError(f"tag length {tag_len} exceeds {MAX_TAG_BYTES}")
                        if tag_len:
                            self.need = HEADER_BYTES + tag_len
                            continue
                    hdr = decode(self.hv[:self.need])
                    self.got, self.need = 0, HEADER_BYTES
                    if hdr.kind is not Kind.DATA:
                        raise WireError(f"unexpected {hdr.kind.name} frame on the data socket")
                    if hdr.payload_len > self.server.max_message_bytes:
                        raise WireError(f"payload of {hdr.payload_len} bytes exceeds max_message_bytes="
                                        f"{self.server.max_message_bytes}")
                    self.hdr = hdr
                    self.left = hdr.payload_len
                    self._arrival(hdr)
                    if self.left == 0:
                        self._complete()
                    continue
                # reading a payload
                slot = self.slot
                if slot is not None and slot.withdrawn:  # cancelled / timed out: nothing more lands in it
                    self.slot, self.dest = None, None
                    self.on_done = functools.partial(self._refuse_late, self.hdr)
                dest = self.dest
                want = min(self.left, len(self.scratch)) if dest is None else self.left
                if dest is None:
                    k = conn.recv_into(self.scratch, want)
                else:
                    k = conn.recv_into(dest[len(dest) - self.left:], want)
                if k == 0:
                    self.reset(f"connection closed with {self.left} payload bytes still to come", torn=True)
                    return
                self.left -= k
                budget -= k
                if self.left == 0:
                    self._complete()
                    if self.lowat != 1:
                        self._set_lowat(1)
                elif k < want:
                    # short read: drained for now (level-triggered, so the reader fires again); a large rest
                    # wakes us once min(rest, _LOWAT_MAX) is buffered, not on every segment
                    low = min(self.left, _LOWAT_MAX) if _LOWAT_MAX and self.left >= _LOWAT_MIN else 1
                    if low != self.lowat:
                        self._set_lowat(low)
                    return
        except BlockingIOError:
            return
        except (WireError, OSError) as exc:
            self.reset(str(exc), torn=True)
        except Exception as exc:  # a bug: say so and drop the connection (its writes fail there), never spin
            log.error("%s: data connection from %r failed: %r", self.owner.name, self.peer, exc)
            self.reset(repr(exc), torn=True)

    def _lower_mark(self) -> None:
        """No read since the mark went up: back to 1 (the kernel then reports the socket readable if anything is
        buffered), so bytes already here land even if the rest of the payload is slow to come."""
        self.nudge = None
        if not self.closed and self.lowat != 1:
            self._set_lowat(1)

    def _set_lowat(self, n: int) -> None:
        with contextlib.suppress(OSError):
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self.lowat = n

    def _refuse_late(self, hdr: Header | None) -> None:
        if hdr is None:
            return
        reason = f"tag {hdr.tag!r} was withdrawn (cancelled or timed out) while arriving; the rest was dropped"
        self.owner._landings.reject(self.peer, reason)
        self.ack(hdr.seq, hdr.tag, Status.REJECTED, reason)

    def _complete(self) -> None:
        done = self.on_done
        self.hdr, self.slot, self.dest, self.buf, self.on_done, self.on_abort = None, None, None, None, None, None
        if done is not None:
            done()

    def _refuse(self, hdr: Header, status: Status, reason: str) -> None:
        """Refuse an arrival before a byte of it is read: drain its payload, acknowledge with the reason."""
        self.owner._landings.reject(self.peer, reason)
        self.ack(hdr.seq, hdr.tag, status, reason)
        self.dest = None

    def _arrival(self, hdr: Header) -> None:
        """Decide where the payload of ``hdr`` goes (it has not been read yet)."""
        owner, landings, n = self.owner, self.owner._landings, hdr.payload_len
        if owner.checksum and hdr.checksum is None:
            self._refuse(hdr, Status.REJECTED, f"tag {hdr.tag!r} arrived without a checksum and this endpoint "
                                               "requires one; nothing written")
            return
        fast = landings.claim_exact(hdr.tag, n) if hdr.checksum is None else None
        if fast is not None and fast.host is not None:  # the common case: the kernel writes into the slot
            self.slot, self.dest = fast, fast.host

            def landed() -> None:
                self.server.arrivals += 1
                self.ack(hdr.seq, hdr.tag, Status.OK)  # before the waiter can see it (and perhaps close)
                owner._landed(fast, n)

            self.on_done = landed
            return
        try:
            slot = landings.claim(hdr.tag, n)
        except Rejected as exc:
            self._refuse(hdr, Status.REJECTED, str(exc))
            return
        if slot is None:  # early (or withdrawn): hold it until the tag is exposed, like zmq's early arrivals
            if not landings.reserve_pending(n):
                self._refuse(hdr, Status.REJECTED, f"tag {hdr.tag!r} is not exposed and the hold area is full "
                                                   f"({landings.pending_bytes}/{landings.max_pending_bytes} bytes); "
                                                   "dropped")
                return
            buf = self.buf = bytearray(n)
            self.dest = memoryview(buf)
            self.on_abort = lambda: landings.release_pending(n)
            self.on_done = lambda: owner._spawn_hold(self.ack, self.peer, hdr, memoryview(buf))
            return
        # a checksum or a device slot: receive into our own buffer, check, then copy into the slot
        buf = self.buf = bytearray(n)
        self.dest = memoryview(buf)
        self.on_abort = lambda: landings.finish(slot, Rejected(
            f"{owner.name}: tag {hdr.tag!r}: data connection lost mid-payload; landing failed"))
        self.on_done = lambda: owner._spawn(self._land_checked(hdr, slot, buf))

    async def _land_checked(self, hdr: Header, slot: Slot, buf: bytearray) -> None:
        owner, landings = self.owner, self.owner._landings
        if slot.withdrawn:  # cancelled or timed out while its payload arrived: not a byte of it lands
            self._refuse_late(hdr)
            return
        try:
            if len(buf) <= _INLINE_BYTES and hdr.checksum is None:
                land(slot.view, memoryview(buf), None)
            else:
                await anyio.to_thread.run_sync(land, slot.view, memoryview(buf), hdr.checksum,
                                               limiter=self.server.limiter)
        except Exception as exc:
            reason = f"{owner.name}: tag {hdr.tag!r}: {exc}"
            error = Rejected(reason) if isinstance(exc, Rejected) else TransportError(reason)
            landings.reject(self.peer, reason)
            self.ack(hdr.seq, hdr.tag, Status.CORRUPT if isinstance(exc, Rejected) else Status.BAD, reason)
            landings.finish(slot, error)
            return
        self.server.arrivals += 1
        self.ack(hdr.seq, hdr.tag, Status.OK)
        owner._landed(slot, len(buf))


class DataServer:
    """A receiver's data listener, on its event loop: accepts, authenticates, and reads each sender's frames."""

    def __init__(self, owner: Owner, host: str, *, max_message_bytes: int, handshake_timeout_s: float) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.secret = os.urandom(SECRET_BYTES)
        self.max_message_bytes = max_message_bytes
        self.handshake_timeout_s = handshake_timeout_s
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.arrivals = 0  # payloads landed through the data socket (tests, stats)
        self.closed = False
        self.conns: set[_Incoming] = set()
        self.limiter = anyio.CapacityLimiter(2)
        self.loop.add_reader(self.listener, self._accept)

    def offer(self) -> Header:
        """The ``HELLO`` a receiver answers a sender's ``HELLO`` with: where to connect and the secret."""
        return Header(Kind.HELLO, 0, "data", arg=self.port, extra=self.secret + self.host.encode())

    def _accept(self) -> None:
        for _ in range(16):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("%s: data socket listener failed: %r", self.owner.name, exc)
                return
            conn.setblocking(False)
            self.owner._spawn(self._handshake(conn, addr))

    async def _handshake(self, conn: socket.socket, addr: Any) -> None:
        try:
            with anyio.fail_after(self.handshake_timeout_s):
                magic, secret, name_len = _PRE.unpack(await _read_exactly(self.loop, conn, _PRE.size))
                if magic != PREAMBLE or not hmac.compare_digest(secret, self.secret) or name_len > MAX_NAME_BYTES:
                    raise ConnectionError("bad preamble or secret")
                name = (await _read_exactly(self.loop, conn, name_len)).decode("utf-8", "replace") if name_len else ""
                await self.loop.sock_sendall(conn, ACCEPTED)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                conn.close()
            if isinstance(exc, Exception | TimeoutError):
                log.warning("%s: refused a data connection from %s: %r", self.owner.name, addr, exc)
                return
            raise
        if self.closed:
            conn.close()
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inc = _Incoming(self, conn, name or "?")
        self.conns.add(inc)
        inc.start()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.listener)
        with contextlib.suppress(OSError):
            self.listener.close()
        for inc in list(self.conns):
            inc.reset("transport closed")


# --- the sending side --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Outgoing:
    """One write routed over a data connection: the header, then the payload (sent from the caller's buffer)."""

    seq: int
    header: bytes
    payload: memoryview
    bufs: list[memoryview] = field(default_factory=list)  # what is still to send (set when queued)
    started: bool = False  # some of it is in the kernel already: dropping it now would tear the stream

    @property
    def sent(self) -> bool:
        return self.started and not self.bufs


class DataLink:
    """A sender's data connection to one peer, on the event loop: connects and authenticates (a task, bounded by
    ``connect_timeout_s``), then sends queued writes in order with non-blocking ``sendmsg`` (the rest when the
    socket is writable) and reads acknowledgements when it is readable. Single use: once broken it stays broken,
    and the transport opens a new one for a later write."""

    def __init__(self, owner: Owner, peer: str, host: str, port: int, secret: bytes, *,
                 connect_timeout_s: float) -> None:
        self.owner = owner
        self.peer = peer
        self.host, self.port, self.secret = host, port, secret
        self.connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self.ready = False
        self.dead = False
        self.never_opened = False
        self.writes = 0
        self._sock: socket.socket | None = None
        self._queue: deque[Outgoing] = deque()
        self._inflight: dict[int, Outgoing] = {}  # seq -> queued or sent, not yet acknowledged
        self._writing = False
        self._acks = bytearray()
        self._chunk = memoryview(bytearray(64 << 10))
        self._task = owner._spawn(self._open())

    async def _open(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with anyio.fail_after(self.connect_timeout_s):
                await self.loop.sock_connect(sock, (self.host, self.port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                name = self.owner.name.encode()[:MAX_NAME_BYTES]
                await self.loop.sock_sendall(sock, _PRE.pack(PREAMBLE, self.secret, len(name)) + name)
                if await _read_exactly(self.loop, sock, len(ACCEPTED)) != ACCEPTED:
                    raise ConnectionError("the receiver refused the data connection")
        except BaseException as exc:
            sock.close()
            self.dead = True
            self.never_opened = True  # refused or unreachable: the transport asks the peer for a fresh offer
            if isinstance(exc, Exception):
                log.warning("%s: no data connection to %r at %s:%d (%r); writes stay on zmq", self.owner.name,
                            self.peer, self.host, self.port, exc)
                return
            raise
        if self.dead:  # aborted (closed) while connecting
            sock.close()
            return
        self._sock = sock
        self.ready = True
        self.loop.add_reader(sock, self._on_acks)

    def submit(self, item: Outgoing) -> bool:
        """Queue a write and send what the kernel takes now; False when the link is not usable (the caller sends
        it over zmq)."""
        if self.dead or not self.ready:
            return False
        item.bufs = [memoryview(item.header), item.payload]
        self._inflight[item.seq] = item
        self._queue.append(item)
        self.writes += 1
        if not self._writing:
            self._pump()
        return True

    def _pump(self) -> None:
        sock, q = self._sock, self._queue
        if sock is None or self.dead:
            return
        try:
            while q:
                item = q[0]
                item.started = True
                bufs = item.bufs
                sent = sock.sendmsg(bufs)
                while sent and bufs:
                    if sent >= len(bufs[0]):
                        sent -= len(bufs[0])
                        bufs.pop(0)
                    else:
                        bufs[0] = bufs[0][sent:]
                        sent = 0
                if bufs:  # the kernel took part of it: its buffer is full, wait until it is writable
                    raise BlockingIOError
                q.popleft()
        except BlockingIOError:
            if not self._writing:
                self._writing = True
                self.loop.add_writer(sock, self._pump)
            return
        except OSError as exc:
            self.abort(f"send failed: {exc!r}")
            return
        if self._writing:
            self._writing = False
            self.loop.remove_writer(sock)

    def _on_acks(self) -> None:
        sock = self._sock
        if sock is None or self.dead:
            return
        try:
            k = sock.recv_into(self._chunk)
        except BlockingIOError:
            return
        except OSError as exc:
            self.abort(f"acknowledgements failed: {exc!r}")
            return
        if k == 0:
            self.abort("the receiver closed the data connection")
            return
        buf = self._acks
        buf += self._chunk[:k]
        pos = 0
        try:
            while len(buf) - pos >= _LEN.size:
                (n,) = _LEN.unpack_from(buf, pos)
                if len(buf) - pos - _LEN.size < n:
                    break
                ack = decode(memoryview(buf)[pos + _LEN.size:pos + _LEN.size + n])
                pos += _LEN.size + n
                if ack.kind is not Kind.ACK:
                    raise WireError(f"a {ack.kind.name} frame among the acknowledgements")
                self._inflight.pop(ack.seq, None)
                self.owner._completion(ack.seq, ack.status, ack.extra.decode("utf-8", "replace"))()
        except WireError as exc:
            self.abort(f"bad acknowledgement: {exc}")
            return
        del buf[:pos]

    def release(self, item: Outgoing, reason: str) -> None:
        """After ``item``'s write failed or was cancelled: make sure its source buffer is not read any more. Not
        started: it leaves the queue; fully in the kernel: nothing to do; half sent: the stream is torn, so the
        connection is reset (the receiver fails that landing)."""
        self._inflight.pop(item.seq, None)
        if item.sent or self.dead:
            return
        if not item.started:
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            return
        self.abort(reason)

    def forget(self, seq: int) -> None:
        self._inflight.pop(seq, None)

    def abort(self, reason: str) -> None:
        """Break the link: close the connection, drop the queue, fail every write in flight on it."""
        if self.dead:
            return
        self.dead = True
        self.ready = False
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock)
            if self._writing:
                with contextlib.suppress(Exception):
                    self.loop.remove_writer(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._writing = False
        self._queue.clear()
        failed, self._inflight = list(self._inflight), {}
        why = f"{self.owner.name}: data connection to {self.peer!r} lost: {reason}"
        for seq in failed:
            self.owner._completion(seq, Status.CLOSED, why)()
        log.debug("%s: data link to %r aborted: %s", self.owner.name, self.peer, reason)

    def close(self) -> None:
        self.abort("transport closed")
        if not self._task.done():
            self._task.cancel()
