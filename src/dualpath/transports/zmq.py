"""ZeroMQ transport: between processes or hosts over ``tcp://`` or ``ipc://``.

Each endpoint binds one ROUTER (loopback unless configured; port 0 picks a free port) and connects one DEALER
per peer. A write is ``[header, payload]``: the fixed binary header of :mod:`dualpath.transports.wire` and the
payload as a zero-copy frame straight from the source tensor's memory. The receiver checks the header, the tag
(holding early arrivals), the size and the optional xxh3 checksum, copies the frame into the exposed region
(one memcpy, or one host-to-device copy) and acknowledges; ``write`` returns on the acknowledgement. A write
that is not acknowledged within its timeout resets that peer's socket (dropping queued frames, so no source
buffer stays referenced). With CURVE keys configured the ROUTER is a CURVE server and a ZAP authenticator
admits only ``curve_allowed_clients``; the address then carries the server key (``tcp://h:p|curve=KEY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import uuid
import warnings
from typing import cast

import anyio
import numpy as np
import torch
import zmq
import zmq.asyncio

from dualpath.errors import ConfigError, PeerTimeout, TransportClosed, TransportError
from dualpath.transports.base import Transport
from dualpath.transports.config import ZmqTransportConfig
from dualpath.transports.landing import Rejected, Slot
from dualpath.transports.loopback import device_copy
from dualpath.transports.wire import Header, Kind, Status, WireError, checksum_of, decode, encode

log = logging.getLogger("dualpath.transports.zmq")
_KEY_SEP = "|curve="


def split_address(address: str) -> tuple[str, str | None]:
    """``tcp://h:p|curve=KEY`` -> (``tcp://h:p``, KEY)."""
    if _KEY_SEP in address:
        endpoint, key = address.split(_KEY_SEP, 1)
        return endpoint, key
    return address, None


def _land(view: torch.Tensor, buf: memoryview, verify: int | None) -> None:
    """Verify (optional) then copy a received frame into a landing view (runs in a thread for big frames)."""
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


_DRAIN = 256  # messages handled per wake-up of the receive loop before yielding to the event loop


def _ack_frame(seq: int, tag: str, status: Status, reason: str = "") -> bytes:
    return encode(Header(Kind.ACK, seq, tag, status=status, extra=reason.encode()[:4000]))


class _Conn:
    def __init__(self, peer: str, address: str) -> None:
        self.peer = peer
        self.address = address
        self.sock: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task[None] | None = None
        self.pending: dict[int, asyncio.Future[tuple[Status | None, str]]] = {}


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
        self._ctx: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._auth: object | None = None
        self._endpoint = ""
        self._conns: dict[str, _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)
        self._limiter = anyio.CapacityLimiter(2)
        self._ipc_path: str | None = None

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
        self._ctx = zmq.asyncio.Context()
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
        self._spawn(self._recv_loop())
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
        auth = ThreadAuthenticator(zmq.Context.shadow(self._ctx.underlying), log=logging.getLogger("dualpath.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_Keys())
        self._auth = auth

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        for task in list(self._tasks):
            task.cancel()
        for conn in self._conns.values():
            self._fail_pending(conn, Status.CLOSED, f"{self.name}: transport closed")
            if conn.reader is not None:
                conn.reader.cancel()
            if conn.sock is not None:
                conn.sock.close(linger=0)
        self._conns.clear()
        if self._router is not None:
            self._router.close(linger=0)
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

    # --- receiving ------------------------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        """Await one message, then drain every message already queued without suspending (sync shadow socket,
        one Python pass per frame) and send the acknowledgements of the batch as one message per sender."""
        router = self._router
        assert router is not None
        sync: zmq.Socket[bytes] = zmq.Socket.shadow(router.underlying)
        while True:
            ident = await router.recv()
            acks: dict[bytes, list[bytes]] = {}
            for _ in range(_DRAIN):
                try:
                    self._on_message(sync, ident, acks)
                except Exception as exc:  # never let one message kill the loop
                    log.error("%s: error handling a message: %r", self.name, exc)
                try:
                    ident = sync.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            # sent through the asyncio socket: it re-arms its edge-triggered wake-up (a sync send would not)
            for dest, frames in acks.items():
                with contextlib.suppress(zmq.ZMQError):
                    await router.send_multipart([dest, *frames])

    async def _ack(self, ident: bytes, seq: int, tag: str, status: Status, reason: str = "") -> None:
        if self._router is None or self._closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            await self._router.send_multipart([ident, _ack_frame(seq, tag, status, reason)])

    def _on_message(self, sync: zmq.Socket, ident: bytes, acks: dict[bytes, list[bytes]]) -> None:
        """Handle the rest of one message whose identity frame was read (all its frames are queued)."""
        frames: list[zmq.Frame] = []
        while sync.rcvmore:
            frames.append(sync.recv(zmq.NOBLOCK, copy=False))

        def ack(seq: int, tag: str, status: Status, reason: str = "") -> None:
            if not self._closed:
                acks.setdefault(ident, []).append(_ack_frame(seq, tag, status, reason))

        if not frames:
            self._landings.reject("?", "message without a header frame")
            return
        try:
            hdr = decode(frames[0].buffer)
        except WireError as exc:
            self._landings.reject("?", f"bad header: {exc}; nothing written")
            ack(0, "", Status.BAD, str(exc))
            return
        sender = hdr.extra.decode("utf-8", "replace") or "?"
        if hdr.kind is not Kind.DATA or len(frames) != 2:
            reason = f"unexpected {hdr.kind.name} message with {len(frames)} frames; nothing written"
            self._landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        payload = frames[1]
        buf = payload.buffer
        nbytes = len(buf)
        if nbytes != hdr.payload_len:
            reason = f"payload is {nbytes} bytes, header says {hdr.payload_len}; nothing written"
            self._landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        if self.checksum and hdr.checksum is None:
            reason = f"tag {hdr.tag!r} arrived without a checksum and this endpoint requires one; nothing written"
            self._landings.reject(sender, reason)
            ack(hdr.seq, hdr.tag, Status.REJECTED, reason)
            return
        try:
            slot = self._landings.claim(hdr.tag, nbytes)
        except Rejected as exc:
            self._landings.reject(sender, str(exc))
            ack(hdr.seq, hdr.tag, Status.REJECTED, str(exc))
            return
        if slot is None:
            if not self._landings.reserve_pending(nbytes):
                reason = (f"tag {hdr.tag!r} is not exposed and the hold area is full "
                          f"({self._landings.pending_bytes}/{self._landings.max_pending_bytes} bytes); dropped")
                self._landings.reject(sender, reason)
                ack(hdr.seq, hdr.tag, Status.REJECTED, reason)
                return
            self._spawn(self._hold(ident, sender, hdr, payload))
            return
        if nbytes > self.config.inline_copy_bytes or hdr.checksum is not None:
            self._spawn(self._deliver(ident, sender, hdr, payload, slot))
            return
        # the common case, inline: one copy into the exposed region, the ack joins the batch
        try:
            _land(slot.view, buf, None)
        except Exception as exc:
            reason = f"{self.name}: tag {hdr.tag!r}: {exc}"
            self._landings.reject(sender, reason)
            self._landings.finish(slot, TransportError(reason))
            ack(hdr.seq, hdr.tag, Status.BAD, reason)
            return
        self._landings.finish(slot)
        self.stats.arrivals += 1
        self.stats.bytes_received += nbytes
        ack(hdr.seq, hdr.tag, Status.OK)

    async def _hold(self, ident: bytes, sender: str, hdr: Header, payload: zmq.Frame) -> None:
        try:
            slot = await self._landings.claim_wait(hdr.tag, hdr.payload_len)
        except Rejected as exc:
            self._landings.reject(sender, str(exc))
            await self._ack(ident, hdr.seq, hdr.tag, Status.REJECTED, str(exc))
            return
        finally:
            self._landings.release_pending(hdr.payload_len)
        await self._deliver(ident, sender, hdr, payload, slot)

    async def _deliver(self, ident: bytes, sender: str, hdr: Header, payload: zmq.Frame, slot: Slot) -> None:
        buf = payload.buffer
        try:
            if len(buf) <= self.config.inline_copy_bytes and hdr.checksum is None:
                _land(slot.view, buf, None)
            else:
                await anyio.to_thread.run_sync(_land, slot.view, buf, hdr.checksum, limiter=self._limiter)
        except Exception as exc:
            reason = f"{self.name}: tag {hdr.tag!r}: {exc}"
            self._landings.reject(sender, reason)
            err = exc if isinstance(exc, TransportError) else TransportError(reason)
            if isinstance(exc, Rejected):
                err = Rejected(reason)
            self._landings.finish(slot, err)
            await self._ack(ident, hdr.seq, hdr.tag, Status.CORRUPT if isinstance(exc, Rejected) else Status.BAD, reason)
            return
        self._landings.finish(slot)
        self.stats.arrivals += 1
        self.stats.bytes_received += len(buf)
        await self._ack(ident, hdr.seq, hdr.tag, Status.OK)

    # --- sending --------------------------------------------------------------------------------------------
    async def connect(self, peer: str, address: str) -> None:
        self._check_open()
        if not self._started:
            raise TransportError(f"{self.name}: start() before connect()")
        old = self._conns.get(peer)
        if old is not None:
            if old.address == address:
                return
            self._reset(old, f"{self.name}: peer {peer!r} reconnected to {address}")
        conn = _Conn(peer, address)
        self._open(conn)
        self._conns[peer] = conn

    def _open(self, conn: _Conn) -> None:
        assert self._ctx is not None
        endpoint, server_key = split_address(conn.address)
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise TransportError(f"{self.name}: peer {conn.peer!r} address {conn.address!r} is not tcp:// or ipc://")
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if server_key is not None:
            if not self._curve:
                sock.close(linger=0)
                raise ConfigError(
                    f"transport: peer {conn.peer!r} requires CURVE; set curve_secret_key/curve_public_key"
                )
            sock.curve_serverkey = server_key.encode()
            sock.curve_secretkey = self.config.curve_secret_key.encode()  # type: ignore[union-attr]
            sock.curve_publickey = self.config.curve_public_key.encode()  # type: ignore[union-attr]
        sock.connect(endpoint)
        conn.sock = sock
        conn.reader = self._spawn(self._read_acks(conn, sock))

    def _fail_pending(self, conn: _Conn, status: Status, reason: str) -> None:
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_result((status, reason))
        conn.pending.clear()

    def _reset(self, conn: _Conn, reason: str) -> None:
        """Drop the peer's socket and every frame queued on it (releases source buffers), then reopen."""
        self._fail_pending(conn, Status.CLOSED, reason)
        if conn.reader is not None:
            conn.reader.cancel()
        if conn.sock is not None:
            conn.sock.close(linger=0)
        conn.sock = conn.reader = None
        if not self._closed:
            self._open(conn)

    async def _read_acks(self, conn: _Conn, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()  # one or more acks (the receiver batches them)
            for frame in frames:
                try:
                    hdr = decode(frame)
                except WireError as exc:
                    log.warning("%s: bad ack from %s: %s", self.name, conn.peer, exc)
                    continue
                fut = conn.pending.pop(hdr.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result((hdr.status, hdr.extra.decode("utf-8", "replace")))

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        _, data = self._prepare_write(tag, src)
        conn = self._conns.get(peer)
        if conn is None:
            raise TransportError(f"{self.name}: peer {peer!r} is not connected (call connect first)")
        nbytes = int(data.numel())
        if nbytes > self.config.max_message_bytes:
            raise TransportError(f"{self.name}: {nbytes} bytes exceed max_message_bytes={self.config.max_message_bytes}")
        hint = " (CURVE on: is our public key allowed by the peer?)" if self._curve else ""
        what = f"write of {tag!r} to {peer!r}{hint}"
        if data.is_cpu and (checksum is not None or not self.checksum) and await self._write_fast(
                conn, tag, data, nbytes, checksum, timeout, what):
            self.stats.writes += 1
            self.stats.bytes_sent += nbytes
            return

        async def send() -> None:
            host = data
            if data.device.type != "cpu":
                host = await anyio.to_thread.run_sync(data.cpu, limiter=self._limiter)
            csum = checksum
            if csum is None and self.checksum:
                csum = await anyio.to_thread.run_sync(checksum_of, host, limiter=self._limiter)
            seq = next(self._seq)
            fut: asyncio.Future[tuple[Status | None, str]] = asyncio.get_running_loop().create_future()
            conn.pending[seq] = fut
            hdr = encode(Header(Kind.DATA, seq, tag, nbytes, csum, extra=self.name.encode()))
            try:
                assert conn.sock is not None
                await conn.sock.send_multipart([hdr, host.numpy()], copy=False)
                status, reason = await fut
            except BaseException:
                conn.pending.pop(seq, None)
                if not self._closed and conn.sock is not None:
                    self._reset(conn, f"{self.name}: write of {tag!r} to {peer!r} timed out or was cancelled")
                raise
            if status is not Status.OK:
                raise TransportError(f"{self.name}: {peer!r} refused tag {tag!r} ({_name(status)}): {reason}")

        await self._guarded(what, timeout, send)
        self.stats.writes += 1
        self.stats.bytes_sent += nbytes

    async def _write_fast(self, conn: _Conn, tag: str, data: torch.Tensor, nbytes: int, csum: int | None,
                          timeout: float, what: str) -> bool:
        """The common write (host bytes, nothing to compute first) without a cancel scope: the frames are queued
        without blocking and the acknowledgement is awaited with a timer. False when the socket would block
        (high-water mark): the caller then takes the guarded path."""
        if timeout is None or not timeout >= 0:
            raise TransportError(f"timeout must be a number >= 0, got {timeout!r}")
        self._check_open()
        sock = conn.sock
        assert sock is not None
        seq = next(self._seq)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[Status | None, str]] = loop.create_future()
        hdr = encode(Header(Kind.DATA, seq, tag, nbytes, csum, extra=self.name.encode()))
        sent = cast("asyncio.Future[object]", sock.send_multipart([hdr, data.numpy()], copy=False, flags=zmq.NOBLOCK))
        if not sent.done():  # queued behind a blocked send: let it go, take the guarded path
            sent.cancel()
            return False
        if sent.exception() is not None:
            if isinstance(sent.exception(), zmq.Again):
                return False
            raise TransportError(f"{self.name}: {what} failed: {sent.exception()!r}")
        conn.pending[seq] = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            status, reason = await fut
        except BaseException:
            conn.pending.pop(seq, None)
            if not self._closed and conn.sock is not None:
                self._reset(conn, f"{self.name}: {what} was cancelled")
            raise
        finally:
            timer.cancel()
        if status is Status.OK:
            return True
        if self._closed:
            raise TransportClosed(f"{self.name}: transport closed during {what}")
        if status is None:
            conn.pending.pop(seq, None)
            if conn.sock is not None:
                self._reset(conn, f"{self.name}: {what} timed out")
            raise PeerTimeout(f"{self.name}: {what} not delivered within {timeout:g} s")
        raise TransportError(f"{self.name}: {conn.peer!r} refused tag {tag!r} ({status.name}): {reason}")


def _expire(fut: asyncio.Future[tuple[Status | None, str]]) -> None:
    if not fut.done():
        fut.set_result((None, "no acknowledgement before the deadline"))


def _name(status: Status | None) -> str:
    return "TIMEOUT" if status is None else status.name
