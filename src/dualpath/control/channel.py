"""Request/reply and notices over ZeroMQ for the control plane (msgpack messages of :mod:`.protocol`).

:class:`Channel` wraps one socket: ``ROUTER`` (binds; the scheduler) or ``DEALER`` (connects; engines and
clients). Either side can :meth:`Channel.request` (await the reply, with a deadline: :class:`PeerTimeout`
after it), :meth:`Channel.notify` (fire and forget) and serve incoming requests with a handler. Every handler
runs in its own task (bounded by ``max_tasks``), so a long request (a whole turn) never blocks the socket.

Safety: a ROUTER binds to loopback unless an address is configured (``tcp://127.0.0.1:0`` by default); with
CURVE keys configured it is a CURVE server and a ZAP handler admits only the allowed client keys, so an
unauthenticated peer never gets a message through. Sends to a ROUTER peer that is gone fail at once
(``ROUTER_MANDATORY``); ZMTP heartbeats drop a silent TCP peer. A malformed frame is logged and counted
(:attr:`Channel.rejected`); the sender gets an ``error`` reply when it can be identified; the loop keeps
running. Messages larger than ``max_message_bytes`` are refused by libzmq before they are buffered.

Restarts: a client's messages still queued in its socket when its server dies are delivered, once it reconnects, to
the server restarted on that address; a request there would run for nobody (its asker was told the server was
lost), and a reply could match a new request of the same number. So a server stamps what it sends with its
incarnation (random at each start), a client stamps its requests and replies with the last incarnation it heard
from, and a server drops what was addressed to another one (:attr:`Channel.stale`); a dropped request is answered
``stale_incarnation``, which teaches its asker the new incarnation: :meth:`Channel.request` sends it again (it was
not run). :meth:`Channel.fail_all` (the server found gone) fails the requests in flight only; one still waiting
for the connection waits on for the server's successor; one whose asker gave up (cancelled) is never sent. A
client that has not heard from its server yet would address its first requests to no incarnation; with ``hello``
set (``ServeClient``: ``ping``) it asks that first, and sends nothing else until it is answered.

Closing: a ROUTER's replies and notices already queued still leave (up to ``_CLOSE_FLUSH_MS``, the wait in a
worker thread), so the answer to the ``shutdown`` that stops a scheduler reaches its asker; a DEALER drops its
queued requests at once (its server may be gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from dualpath.control.protocol import MAX_FRAME_BYTES, Message, ProtocolError, decode, encode
from dualpath.errors import ConfigError, DualPathError, PeerTimeout, TransportClosed

log = logging.getLogger("dualpath.control")

#: inside a ROUTER's handler: the authenticated CURVE public key (z85, the ZAP User-Id) of the sender, else None
PEER_USER: contextvars.ContextVar[str | None] = contextvars.ContextVar("dualpath_peer_user", default=None)

#: handler(peer identity, message) -> (reply type, reply body) or None (no reply)
Handler = Callable[[bytes, Message], Awaitable[tuple[str, dict[str, Any]] | None]]


class AuthFailed(DualPathError):
    """The control-plane handshake was refused: wrong or unknown CURVE key, or a security mismatch (one side
    uses CURVE, the other does not). The message says which setting to check."""


class RemoteError(DualPathError):
    """The peer answered a request with an ``error`` message (its ``code`` and ``message``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


@dataclass(frozen=True)
class CurveKeys:
    """CURVE setup of one socket. Server: ``secret``/``public`` + ``allowed`` client keys. Client: its own
    ``secret``/``public`` + the ``server`` public key. Keys are z85 text (``zmq.curve_keypair()``)."""

    public: str
    secret: str
    server: str | None = None
    allowed: tuple[str, ...] = ()


class _Auth:
    """Admit only allowed CURVE client keys (ZAP, in a thread owned by the channel)."""

    def __init__(self, ctx: zmq.asyncio.Context, allowed: tuple[str, ...], owner: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        allowed_set = set(allowed)
        self.refused = 0
        outer = self

        class _Keys:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key.decode() in allowed_set
                if not ok:
                    outer.refused += 1
                    log.warning("%s: refused a peer: CURVE key %s is not allowed", owner, key.decode())
                return ok

        self.auth = ThreadAuthenticator(zmq.Context.shadow(ctx.underlying), log=logging.getLogger("dualpath.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=_Keys())

    def stop(self) -> None:
        self.auth.stop()


class Channel:
    """One control socket (see the module docstring). ``async with Channel(...) as ch``."""

    def __init__(
        self,
        name: str,
        *,
        bind: str | None = None,
        connect: str | None = None,
        identity: bytes | None = None,
        curve: CurveKeys | None = None,
        handler: Handler | None = None,
        max_message_bytes: int = MAX_FRAME_BYTES,
        max_tasks: int = 4096,
        heartbeat_ms: int = 1000,
        handshake_timeout: float = 5.0,
        hello: str | None = None,
    ) -> None:
        if (bind is None) == (connect is None):
            raise ConfigError(f"{name}: a channel either binds or connects")
        self.name = name
        self.bind_addr = bind
        self.connect_addr = connect
        self.identity = identity
        self.curve = curve
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.max_tasks = max_tasks
        self.heartbeat_ms = heartbeat_ms
        self.rejected = 0  # malformed messages received
        self.address = ""
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._auth: _Auth | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[bytes, asyncio.Future[Message]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._send_lock = asyncio.Lock()
        self.handshake_timeout = handshake_timeout
        self.auth_error: AuthFailed | None = None  # a DEALER's last handshake refusal (cleared by a success)
        self._handshake_ok: asyncio.Event | None = None
        self._auth_failed = asyncio.Event()
        self.on_disconnect: Callable[[], None] | None = None  # DEALER: called when the connection drops
        # the restart fence: a server's incarnation (random, new at each start; 0 for a client) and, on a client,
        # the last one heard from; ``stale`` counts what a server dropped as addressed to another incarnation
        self.incarnation = (secrets.randbits(63) or 1) if bind is not None else 0
        self.server_incarnation = 0
        self.stale = 0
        self._unsent: set[int] = set()  # a client's requests not yet handed to zmq (waiting for the connection)
        # a client's ``hello`` (a request type its server answers, e.g. ``ping``): asked before the first request to
        # a server not heard from yet, so that request too is addressed to an incarnation (see the module docstring)
        self.hello = hello if bind is None else None
        self._hello: asyncio.Future[Message] | None = None
        self._greeted = False  # a hello was answered (by a server that may not stamp its incarnation)
        self._hello_end = 0.0  # the deadline of the hello asked

    @property
    def is_router(self) -> bool:
        return self.bind_addr is not None

    @property
    def refused(self) -> int:
        """Connections refused by CURVE authentication."""
        return self._auth.refused if self._auth is not None else 0

    @property
    def pending(self) -> int:
        """Requests waiting for a reply."""
        return len(self._pending)

    @property
    def tasks(self) -> int:
        return len(self._tasks)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def __aenter__(self) -> Channel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        ctx = zmq.asyncio.Context()
        self._ctx = ctx
        sock = ctx.socket(zmq.ROUTER if self.is_router else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + 1024)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        if self.heartbeat_ms > 0:
            sock.setsockopt(zmq.HEARTBEAT_IVL, self.heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.heartbeat_ms * 3)
            sock.setsockopt(zmq.HEARTBEAT_TTL, self.heartbeat_ms * 3)
        try:
            if self.is_router:
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
                sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a second peer with a taken identity is refused
                if self.curve is not None:
                    self._auth = _Auth(ctx, self.curve.allowed, self.name)
                    sock.curve_server = True
                    sock.curve_secretkey = self.curve.secret.encode()
                    sock.curve_publickey = self.curve.public.encode()
                assert self.bind_addr is not None
                sock.bind(self.bind_addr)
                self.address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
            else:
                if self.identity is not None:
                    sock.setsockopt(zmq.ROUTING_ID, self.identity)
                if self.curve is not None:
                    if not self.curve.server:
                        raise ConfigError(f"{self.name}: CURVE client needs the server's public key")
                    sock.curve_serverkey = self.curve.server.encode()
                    sock.curve_secretkey = self.curve.secret.encode()
                    sock.curve_publickey = self.curve.public.encode()
                assert self.connect_addr is not None
                self._handshake_ok = asyncio.Event()
                monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
                sock.connect(self.connect_addr)
                self.address = self.connect_addr
        except (zmq.ZMQError, ValueError) as exc:
            sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            ctx.destroy(linger=0)
            where = self.bind_addr or self.connect_addr
            raise ConfigError(f"{self.name}: cannot use control address {where!r}: {exc}") from exc
        self._sock = sock
        self._spawn(self._recv_loop())
        if not self.is_router:
            self._spawn(self._monitor_loop(monitor))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportClosed(f"{self.name}: channel closed"))
        self._pending.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        if self._sock is not None:
            # a server's replies already queued still leave (a client's requests to a gone server do not wait)
            self._sock.close(linger=_CLOSE_FLUSH_MS if self.is_router else 0)
        if self._auth is not None:
            self._auth.stop()
        flushed: asyncio.Future[None] | None = None
        if self._ctx is not None:
            if self.is_router:  # the context's end waits for that flush: in a thread, off the event loop
                flushed = asyncio.get_running_loop().run_in_executor(None, self._ctx.destroy, 0)
            else:
                self._ctx.destroy(linger=0)
        if self.bind_addr and self.bind_addr.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.bind_addr[len("ipc://") :])
        if flushed is not None:
            await flushed

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: control task failed: %r", self.name, task.exception())

    # --- sending -----------------------------------------------------------------------------------------
    async def _send(self, peer: bytes | None, data: bytes, timeout: float = 10.0, mid: int = 0) -> None:
        """Send one message; a DEALER first waits (within ``timeout``) for a completed handshake, so a send
        never blocks without a deadline and an authentication refusal surfaces as :class:`AuthFailed`. ``mid``:
        the request this message is, marked sent (in flight) as soon as zmq holds it."""
        if self._closed or self._sock is None:
            raise TransportClosed(f"{self.name}: channel closed")
        frames = [peer, data] if self.is_router else [data]
        if self.is_router and peer is None:
            raise DualPathError(f"{self.name}: a ROUTER send needs a peer identity")
        if not self.is_router:
            await self.wait_handshake(timeout)
        try:
            async with self._send_lock:
                if self.is_router:
                    await self._sock.send_multipart(frames)  # type: ignore[arg-type]
                else:
                    try:
                        await asyncio.wait_for(self._sock.send_multipart(frames), timeout)  # type: ignore[arg-type]
                        self._unsent.discard(mid)
                    except asyncio.TimeoutError:
                        raise PeerTimeout(f"{self.name}: could not send to {self.connect_addr} within "
                                          f"{timeout:g} s") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                who = peer.decode("utf-8", "replace") if peer else "?"
                raise PeerGone(f"{self.name}: peer {who!r} is not connected") from None
            raise

    async def wait_handshake(self, timeout: float) -> None:
        """DEALER: until the connection to the server has completed its (CURVE) handshake. Raises
        :class:`AuthFailed` at once when the server refused us, :class:`PeerTimeout` after
        ``min(timeout, handshake_timeout)`` when nothing answered."""
        ev = self._handshake_ok
        if ev is None or ev.is_set():
            return
        if self.auth_error is not None:
            raise self.auth_error
        limit = min(timeout, self.handshake_timeout)
        waiter = asyncio.ensure_future(ev.wait())
        failed = asyncio.ensure_future(self._auth_failed.wait())
        try:
            await asyncio.wait({waiter, failed}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            failed.cancel()
        if ev.is_set():
            return
        if self.auth_error is not None:
            raise self.auth_error
        raise PeerTimeout(f"{self.name}: no handshake with {self.connect_addr} within {limit:g} s "
                          "(is the scheduler running there? serve.handshake_timeout_s)")

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        """Follow the DEALER's connection: handshake done, refused (auth), or lost."""
        from zmq.utils.monitor import parse_monitor_message

        no_detail = 0
        try:
            while True:
                ev = parse_monitor_message(await monitor.recv_multipart())  # type: ignore[arg-type]
                kind, value = ev["event"], int(ev["value"])
                assert self._handshake_ok is not None
                if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # also a peer dying mid-handshake: twice with no
                    no_detail += 1  # handshake done between (the disconnect that follows each one does not count:
                    if no_detail < 2:  # a refusal seen as EPIPE alternates with it)
                        continue
                elif kind not in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_DELAYED,
                                  zmq.EVENT_CONNECT_RETRIED):
                    no_detail = 0
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.auth_error = None
                    self._auth_failed = asyncio.Event()
                    self._handshake_ok.set()
                elif kind == zmq.EVENT_DISCONNECTED:
                    self._handshake_ok.clear()
                    if self.on_disconnect is not None:
                        self.on_disconnect()
                elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                    self._handshake_ok.clear()
                    self.auth_error = AuthFailed(self._why_refused(kind, value))
                    self._auth_failed.set()
                    for _peer, fut in list(self._pending.values()):
                        if not fut.done():
                            fut.set_exception(self.auth_error)
        finally:
            monitor.close(linger=0)

    def _why_refused(self, kind: int, value: int) -> str:
        where = f"{self.name}: authentication with {self.connect_addr} failed"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            key = self.curve.public if self.curve is not None else "(none)"
            return (f"{where}: the server refused this CURVE key {key} (status {value}); check that it is one of "
                    "the scheduler's allowed keys (serve.curve_client_public_key, serve.curve_allowed_clients, "
                    "serve.curve_engine_public_key, serve.curve_operator_public_key)")
        if value == _MECHANISM_MISMATCH:
            if self.curve is None:
                return (f"{where}: the server requires CURVE and this side has no keys; set "
                        "serve.curve_public_key and serve.curve_client_public_key/secret_key as on the scheduler")
            return (f"{where}: this side uses CURVE but the server does not; remove the serve.curve_* keys here "
                    "or set them on the scheduler")
        if self.curve is None and kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # (a peer that just hung up)
            return (f"{where}: the peer closed the connection during the handshake (errno {value}): either nothing "
                    "there is a dualpath scheduler (check the address), or the server requires CURVE and this side "
                    "has no keys (set serve.curve_public_key and serve.curve_client_public_key/secret_key as on the "
                    "scheduler)")
        if self.curve is None:
            return (f"{where}: the server requires CURVE and this side has no keys (handshake error {value:#x}); "
                    "set serve.curve_public_key and serve.curve_client_public_key/secret_key as on the scheduler")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return (f"{where}: the server dropped the CURVE handshake (errno {value}): either the server does not "
                    "use CURVE (remove the serve.curve_* keys here or set them on the scheduler) or "
                    "serve.curve_public_key is not the scheduler's public key")
        return (f"{where}: handshake error {value:#x}; check serve.curve_public_key (the scheduler's public key) "
                "and this side's serve.curve_* key pair")

    def _encode(self, mtype: str, body: dict[str, Any] | None, *, mid: int, re_: int = 0,
                fenced: bool = True) -> bytes:
        """One message, stamped: a server's with its incarnation; a client's request or reply (``fenced``) with the
        server incarnation it last heard from (see the module docstring)."""
        return encode(mtype, body, mid=mid, re_=re_, max_bytes=self.max_message_bytes, inc=self.incarnation,
                      to=self.server_incarnation if fenced else 0)

    async def notify(self, peer: bytes | None, mtype: str, body: dict[str, Any] | None = None,
                     timeout: float = 10.0) -> None:
        await self._send(peer, self._encode(mtype, body, mid=next(self._ids), fenced=False), timeout)

    async def request(self, peer: bytes | None, mtype: str, body: dict[str, Any] | None, timeout: float) -> Message:
        """Send a request and await its reply; :class:`PeerTimeout` after ``timeout`` s, :class:`RemoteError`
        on an ``error`` reply, :class:`PeerGone` when the peer is not connected (or :meth:`fail_peer` was
        called for it). A client's request refused as addressed to the server's previous incarnation (it was
        not run) goes again, within the same deadline."""
        loop = asyncio.get_running_loop()
        t_end = loop.time() + timeout
        if self.hello is not None and mtype != self.hello:
            await self._greet(timeout, t_end)
        for attempt in range(_STALE_RETRIES + 1):
            reply = await self._request_once(peer, mtype, body, timeout, t_end)
            if reply.type != "error":
                return reply
            if reply.body["code"] != STALE or self.is_router or attempt == _STALE_RETRIES:
                break
            log.info("%s: %r reached a restarted server (%s); sending it again", self.name, mtype, self.address)
        raise RemoteError(reply.body["code"], reply.body["message"])

    async def _greet(self, timeout: float, t_end: float) -> None:
        """A client with a ``hello``: until its server has answered one, ask it (one hello shared by every request
        waiting here), so no request leaves unaddressed. A failed hello fails the request, unsent (the server was
        lost before it answered: the request would otherwise run on its successor for nobody)."""
        assert self.hello is not None
        loop = asyncio.get_running_loop()
        while not (self.server_incarnation or self._greeted):
            hello = self._hello
            if hello is None or hello.done():  # ours, with our deadline: its failure is ours
                hello = self._hello = asyncio.ensure_future(self._request_once(None, self.hello, {}, timeout, t_end))
                hello.add_done_callback(self._greeting_done)
                self._hello_end = t_end
                await asyncio.shield(hello)
                continue
            hello_end = self._hello_end  # an earlier asker's
            try:
                await asyncio.wait_for(asyncio.shield(hello), max(0.0, t_end - loop.time()))
            except PeerTimeout:  # (a TimeoutError too: first)
                if not hello_end < t_end or loop.time() < hello_end:  # not just its asker's shorter deadline
                    raise
            except asyncio.TimeoutError:  # our own deadline
                ev = self._handshake_ok
                why = "" if ev is None or ev.is_set() else " (no handshake: is the scheduler running there?)"
                raise PeerTimeout(f"{self.name}: no answer to {self.hello!r} from {self.connect_addr} within "
                                  f"{timeout:g} s{why}") from None

    def _greeting_done(self, hello: asyncio.Future[Message]) -> None:
        if not hello.cancelled() and hello.exception() is None:
            self._greeted = True

    async def _request_once(self, peer: bytes | None, mtype: str, body: dict[str, Any] | None, timeout: float,
                            t_end: float) -> Message:
        mid = next(self._ids)
        data = self._encode(mtype, body, mid=mid)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[mid] = (peer or b"", fut)
        try:
            # within the deadline too (a DEALER may wait for its connection); a request failed meanwhile (the
            # channel closed, authentication refused) or abandoned by its asker is never sent
            if not self.is_router:
                self._unsent.add(mid)
            sending = asyncio.ensure_future(self._send(peer, data, max(0.0, t_end - loop.time()), mid))
            try:
                racing: set[asyncio.Future[Any]] = {sending, fut}
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not sending.done():
                    sending.cancel()
                    await asyncio.wait({sending})
            if sending.cancelled():
                fut.result()  # the failure that stopped the send
            else:
                sending.result()  # a send that failed
            try:
                return await asyncio.wait_for(asyncio.shield(fut), max(0.0, t_end - loop.time()))
            except asyncio.TimeoutError:
                who = _who(peer) if peer else self.connect_addr
                raise PeerTimeout(f"{self.name}: no reply to {mtype!r} from {who} within {timeout:g} s") from None
        finally:
            self._pending.pop(mid, None)
            self._unsent.discard(mid)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved (an auth refusal may have failed it while we were still sending)

    def fail_all(self, exc: BaseException) -> int:
        """Fail every request in flight (sent, waiting for its reply: the server is known to be gone); returns
        how many. A client's request still waiting for the connection is not in flight: it goes on waiting for the
        server to come back (within its deadline) and is sent to it then."""
        n = 0
        for mid, (_p, fut) in list(self._pending.items()):
            if mid not in self._unsent and not fut.done():
                fut.set_exception(exc)
                n += 1
        return n

    def fail_peer(self, peer: bytes, exc: BaseException) -> int:
        """Fail every request waiting on ``peer`` (it was declared dead); returns how many."""
        n = 0
        for _mid, (p, fut) in list(self._pending.items()):
            if p == peer and not fut.done():
                fut.set_exception(exc)
                n += 1
        return n

    # --- receiving ---------------------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        assert self._sock is not None
        track_users = self.is_router and self.curve is not None
        while True:
            if track_users:  # the authenticated key (ZAP User-Id) of the peer, from the message's metadata
                raw = await self._sock.recv_multipart(copy=False)
                user: str | None = None
                with contextlib.suppress(zmq.ZMQError):
                    got = raw[-1].get("User-Id")
                    user = got if isinstance(got, str) else None
                PEER_USER.set(user)  # handler tasks spawned from here see it (they copy this context)
                frames: list[bytes] = [bytes(f.bytes) for f in raw]
            else:
                frames = await self._sock.recv_multipart(copy=True)  # type: ignore[assignment]
            try:
                self._on_frames(frames)
            except Exception as exc:  # never let one message stop the loop
                log.error("%s: error handling a message: %r", self.name, exc)

    def _on_frames(self, frames: list[bytes]) -> None:
        if self.is_router:
            if len(frames) != 2:
                self.rejected += 1
                log.warning("%s: rejected a message of %d frames (expected 1)", self.name, len(frames) - 1)
                if frames:
                    self._spawn(self._error(frames[0], 0, "bad_message", "expected exactly one frame"))
                return
            peer: bytes | None = frames[0]
            data = frames[1]
        else:
            if len(frames) != 1:
                self.rejected += 1
                log.warning("%s: rejected a message of %d frames", self.name, len(frames))
                return
            peer, data = None, frames[0]
        try:
            msg = decode(data, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            self.rejected += 1
            who = peer.hex()[:16] if peer else "server"
            log.warning("%s: rejected a malformed message from %s: %s", self.name, who, exc)
            if self.is_router:
                self._spawn(self._error(peer, 0, "bad_message", str(exc)))
            return
        if self.is_router:
            if msg.to and msg.to != self.incarnation:  # sent to this server's previous incarnation: not for us
                self.stale += 1
                log.info("%s: dropped a %r addressed to a previous incarnation of this server", self.name, msg.type)
                if not msg.re:  # a request: its asker (if it still waits) learns our incarnation and asks again
                    self._spawn(self._error(peer, msg.id, STALE, f"{self.name}: addressed to a previous incarnation "
                                            "of this server (it restarted); not run"))
                return
        elif msg.inc:
            self.server_incarnation = msg.inc
        if msg.re:
            entry = self._pending.get(msg.re)
            if entry is not None and entry[0] == (peer or b"") and not entry[1].done():
                entry[1].set_result(msg)
            return
        if self.handler is None:
            return
        if len(self._tasks) >= self.max_tasks:
            self._spawn(self._error(peer, msg.id, "busy", f"{self.name}: too many requests in flight"))
            return
        self._spawn(self._handle(peer or b"", msg))

    async def _error(self, peer: bytes | None, re_: int, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            await self._send(peer, self._encode("error", {"code": code, "message": message[:4000]},
                                                mid=next(self._ids), re_=re_))

    async def _handle(self, peer: bytes, msg: Message) -> None:
        assert self.handler is not None
        try:
            out = await self.handler(peer, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code = "rejected" if isinstance(exc, ProtocolError) else type(exc).__name__
            text = str(exc) or code
            if isinstance(exc, RemoteError):  # a peer's error passed on (an engine's, by the scheduler): its own code
                code, text = exc.code, exc.remote_message
            if not isinstance(exc, DualPathError):
                log.exception("%s: handler of %r failed", self.name, msg.type)
            await self._error(peer if self.is_router else None, msg.id, code, text)
            return
        if out is not None and msg.id:
            mtype, body = out
            with contextlib.suppress(PeerGone, TransportClosed, PeerTimeout, AuthFailed):  # the asker is gone
                await self._send(peer if self.is_router else None,
                                 self._encode(mtype, body, mid=next(self._ids), re_=msg.id))


#: the error code of a request refused as addressed to a previous incarnation of its server (never run)
STALE = "stale_incarnation"
#: a client's request refused as stale goes again at most this many times (a server restarted in between)
_STALE_RETRIES = 2

#: a server (ROUTER) closing gives the replies it queued this long to leave (the answer to a ``shutdown`` is sent
#: just before the scheduler closes); closing waits at most this long, and only while some are still queued
_CLOSE_FLUSH_MS = 500

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_DISCONNECTED)
_MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


def _who(peer: bytes) -> str:
    return peer.decode("utf-8", "replace")


class PeerGone(TransportClosed):
    """The peer is not connected (ROUTER_MANDATORY refused the send) or was declared dead."""
