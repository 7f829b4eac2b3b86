"""The zmq transport's opt-in data socket (``data_socket: tcp``, dualpath.transports.zmq_data): the handshake, torn
frames and dropped connections, streams kept in step after a refused arrival, nothing landing after cancel, and
the config rules. A raw client speaks the wire format by hand (header + payload on a TCP connection) to reach the
cases a well-behaved sender never produces."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch
import zmq
import zmq.asyncio

from dualpath.errors import ConfigError, TransportError
from dualpath.transports import create_transport
from dualpath.transports.config import ZmqTransportConfig
from dualpath.transports.wire import Header, Kind, Status, decode, encode
from dualpath.transports.zmq import ZmqTransport
from dualpath.transports.zmq_data import ACCEPTED, PREAMBLE, SECRET_BYTES

pytestmark = pytest.mark.anyio


def tcp_config(pending_timeout_s: float = 0.5) -> ZmqTransportConfig:
    """The data socket on for every payload size."""
    return ZmqTransportConfig(data_socket="tcp", data_socket_min_bytes=0, pending_timeout_s=pending_timeout_s)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def rcv() -> AsyncIterator[ZmqTransport]:
    async with ZmqTransport("rcv", tcp_config()) as b:
        yield b  # type: ignore[misc]


async def offer(address: str) -> tuple[int, bytes]:
    """Ask a receiver for its data socket the way a sender does (a HELLO over zmq): (port, secret)."""
    ctx = zmq.asyncio.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(address)
    try:
        await s.send(encode(Header(Kind.HELLO, 0, "data", extra=b"raw")))
        with anyio.fail_after(5):
            hdr = decode(await s.recv())
        assert hdr.kind is Kind.HELLO and hdr.arg > 0 and len(hdr.extra) >= SECRET_BYTES
        return hdr.arg, hdr.extra[:SECRET_BYTES]
    finally:
        s.close(0)
        ctx.term()


class RawClient:
    """A hand-driven data connection (blocking socket calls, each bounded by a timeout)."""

    def __init__(self, port: int, secret: bytes, name: bytes = b"raw") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.sock.sendall(struct.pack("<4s32sH", PREAMBLE, secret, len(name)) + name)

    def accepted(self) -> bool:
        try:
            return self.sock.recv(len(ACCEPTED)) == ACCEPTED
        except OSError:
            return False

    def frame(self, seq: int, tag: str, nbytes: int, payload: bytes) -> None:
        self.sock.sendall(encode(Header(Kind.DATA, seq, tag, nbytes)) + payload)

    def ack(self) -> Header:
        (n,) = struct.unpack("<I", self._exactly(4))
        return decode(self._exactly(n))

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


async def call(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


async def test_handshake_then_a_frame_lands_straight_in_the_slot(rcv: Any) -> None:
    dst = torch.zeros(256, dtype=torch.uint8)
    region = rcv.register(dst)
    rcv.expose("t", region, 64, 128)
    c = RawClient(*(await offer(rcv.address)))
    try:
        assert await call(c.accepted)
        await call(c.frame, 9, "t", 128, b"\x05" * 128)
        ack = await call(c.ack)
        assert (ack.kind, ack.seq, ack.status) == (Kind.ACK, 9, Status.OK)
        await rcv.wait("t", 5.0)
        assert torch.equal(dst[64:192], torch.full((128,), 5, dtype=torch.uint8))
        assert torch.count_nonzero(dst[:64]) == 0 and torch.count_nonzero(dst[192:]) == 0
        assert rcv.data_socket_stats["arrivals"] == 1
    finally:
        c.close()


async def test_a_large_payload_trickling_in_lands_and_the_receive_mark_comes_back(rcv: Any) -> None:
    """A large payload arriving in uneven pieces with pauses. While its rest is large the reader raises the
    connection's receive mark (SO_RCVLOWAT: a wake-up per min(rest, 512 KiB) buffered, not per segment), never above
    what is still to come; a pause longer than the mark's wait lowers it again, so the bytes already sent land
    while the sender waits (it could be waiting for anything of ours); the landing completes with the exact bytes,
    the mark is back to 1 for the next header, and a small frame right after lands too."""
    from dualpath.transports import zmq_data

    n = 600 << 10
    dst = torch.zeros(n + 64, dtype=torch.uint8)
    region = rcv.register(dst)
    rcv.expose("big", region, 0, n)
    rcv.expose("small", region, n, 64)
    payload = bytes(torch.randint(1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)))
    marks: list[tuple[int, int]] = []  # (mark set, payload bytes still to come then)
    real_set = zmq_data._Incoming._set_lowat

    def recording(inc: Any, value: int) -> None:
        marks.append((value, inc.left))
        real_set(inc, value)

    c = RawClient(*(await offer(rcv.address)))
    try:
        zmq_data._Incoming._set_lowat = recording  # type: ignore[method-assign]
        assert await call(c.accepted)
        await call(c.sock.sendall, encode(Header(Kind.DATA, 1, "big", n)) + payload[:300 << 10])
        with anyio.fail_after(5):  # the sender pauses: what it sent lands all the same
            while torch.count_nonzero(dst[:300 << 10]) < 300 << 10:
                await anyio.sleep(0.01)
        sent = 300 << 10
        for piece in (200 << 10, 90 << 10, 10 << 10):  # the last pieces below any mark set before them
            await call(c.sock.sendall, payload[sent:sent + piece])
            sent += piece
            await anyio.sleep(0.05)
        ack = await call(c.ack)
        assert (ack.seq, ack.status) == (1, Status.OK)
        await rcv.wait("big", 5.0)
        assert bytes(dst[:n].numpy()) == payload
        incoming = next(iter(rcv._data_server.conns))
        assert incoming.lowat == 1 and incoming.nudge is None
        assert all(mark <= max(left, 1) for mark, left in marks)  # never above what is still to come
        if zmq_data._LOWAT_MAX:  # Linux >= 5.8: raised while the rest was large
            assert any(mark > 1 for mark, _ in marks)
        await call(c.frame, 2, "small", 64, b"\x07" * 64)
        assert (await call(c.ack)).status is Status.OK
        await rcv.wait("small", 5.0)
        assert torch.equal(dst[n:], torch.full((64,), 7, dtype=torch.uint8))
    finally:
        zmq_data._Incoming._set_lowat = real_set  # type: ignore[method-assign]
        c.close()


async def test_a_wrong_secret_is_refused_and_nothing_lands(rcv: Any) -> None:
    dst = torch.zeros(64, dtype=torch.uint8)
    rcv.expose("t", rcv.register(dst), 0, 64)
    port, secret = await offer(rcv.address)
    c = RawClient(port, bytes(b ^ 1 for b in secret))
    try:
        assert not await call(c.accepted)
        with pytest.raises(OSError):
            for _ in range(50):  # the receiver closed: sends fail once the reset comes back
                await call(c.frame, 1, "t", 64, b"\x01" * 64)
                await anyio.sleep(0.01)
    finally:
        c.close()
    assert torch.count_nonzero(dst) == 0
    assert rcv.data_socket_stats["arrivals"] == 0


async def test_torn_payload_fails_only_that_landing(rcv: Any) -> None:
    """The connection drops in the middle of a payload: that landing fails with the reason (its bytes are
    unspecified, never served); a new connection lands the next arrival whole."""
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    region = rcv.register(dst)
    rcv.expose("torn", region, 0, 1 << 16)
    port, secret = await offer(rcv.address)
    c = RawClient(port, secret)
    assert await call(c.accepted)
    await call(c.frame, 1, "torn", 1 << 16, b"\x07" * 1000)  # header + 1000 of 65536 bytes
    await anyio.sleep(0.05)
    c.close()
    with pytest.raises(TransportError, match="mid-payload"):
        await rcv.wait("torn", 5.0)
    c2 = RawClient(port, secret)
    try:
        assert await call(c2.accepted)
        rcv.expose("torn", region, 0, 1 << 16)
        await call(c2.frame, 2, "torn", 1 << 16, b"\x03" * (1 << 16))
        assert (await call(c2.ack)).status is Status.OK
        await rcv.wait("torn", 5.0)
        assert torch.equal(dst, torch.full((1 << 16,), 3, dtype=torch.uint8))
    finally:
        c2.close()


async def test_refused_arrivals_are_drained_and_the_stream_stays_in_step(rcv: Any) -> None:
    """A size mismatch and a duplicate are refused with the reason and nothing written; their payloads are
    skipped, so the next frame on the same connection lands."""
    dst = torch.zeros(256, dtype=torch.uint8)
    region = rcv.register(dst)
    rcv.expose("small", region, 0, 64)
    rcv.expose("ok", region, 128, 128)
    c = RawClient(*(await offer(rcv.address)))
    try:
        assert await call(c.accepted)
        await call(c.frame, 1, "small", 100, b"\x09" * 100)
        ack = await call(c.ack)
        assert ack.status is Status.REJECTED and "size mismatch" in ack.extra.decode()
        with pytest.raises(TransportError, match="size mismatch"):
            await rcv.wait("small", 5.0)
        assert torch.count_nonzero(dst) == 0
        await call(c.frame, 2, "ok", 128, b"\x04" * 128)
        assert (await call(c.ack)).status is Status.OK
        await call(c.frame, 3, "ok", 128, b"\x06" * 128)  # a duplicate for a landed, not yet awaited slot
        ack = await call(c.ack)
        assert ack.status is Status.REJECTED and "duplicate" in ack.extra.decode()
        await rcv.wait("ok", 5.0)
        assert torch.equal(dst[128:], torch.full((128,), 4, dtype=torch.uint8))
    finally:
        c.close()


async def test_a_bad_header_resets_the_connection(rcv: Any) -> None:
    dst = torch.zeros(64, dtype=torch.uint8)
    rcv.expose("t", rcv.register(dst), 0, 64)
    port, secret = await offer(rcv.address)
    c = RawClient(port, secret)
    try:
        assert await call(c.accepted)
        await call(c.sock.sendall, b"XXXX" + encode(Header(Kind.DATA, 1, "t", 64))[4:] + b"\x01" * 64)
        assert await call(c.closed_by_peer)
    finally:
        c.close()
    assert torch.count_nonzero(dst) == 0
    c2 = RawClient(port, secret)  # the slot is still open for a valid arrival on a new connection
    try:
        assert await call(c2.accepted)
        await call(c2.frame, 2, "t", 64, b"\x01" * 64)
        assert (await call(c2.ack)).status is Status.OK
        await rcv.wait("t", 5.0)
        assert torch.equal(dst, torch.ones(64, dtype=torch.uint8))
    finally:
        c2.close()


async def test_nothing_lands_after_cancel_mid_payload(rcv: Any) -> None:
    """Half a payload is in the slot when the landing is cancelled: the rest is drained, not written, the sender
    is told, and settle() returns once the receiving thread has left the slot."""
    n = 1 << 20
    dst = torch.zeros(n, dtype=torch.uint8)
    rcv.expose("c", rcv.register(dst), 0, n)
    c = RawClient(*(await offer(rcv.address)))
    try:
        assert await call(c.accepted)
        await call(c.frame, 1, "c", n, b"\x01" * (n // 2))
        with anyio.fail_after(5):
            while torch.count_nonzero(dst[: n // 2]) < n // 2:  # the first half has landed
                await anyio.sleep(0.01)
        rcv.cancel("c")
        await call(c.sock.sendall, b"\x02" * (n // 2))
        ack = await call(c.ack)
        assert ack.status is Status.REJECTED and "withdrawn" in ack.extra.decode()
        with anyio.fail_after(5):
            await rcv.settle()
        assert torch.count_nonzero(dst[n // 2:]) == 0  # nothing after the cancel
    finally:
        c.close()


async def test_dropped_data_connection_fails_its_writes_and_reconnects(rcv: Any) -> None:
    """The receiver drops the data connection while a write waits on it: the write fails at once (not at its
    deadline), the sender's next large write reconnects, and it lands over the data socket."""
    async with ZmqTransport("snd", tcp_config(30.0)) as snd:
        assert isinstance(snd, ZmqTransport)
        await snd.connect("rcv", rcv.address)
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.01)
        dst = torch.zeros(1 << 16, dtype=torch.uint8)
        region = rcv.register(dst)
        src = torch.randint(1, 256, (1 << 16,), dtype=torch.uint8)
        rcv._landings.pending_timeout_s = 30.0  # the unexposed write is held, awaiting its tag
        t0 = anyio.current_time()
        async with anyio.create_task_group() as tg:
            async def writer() -> None:
                with pytest.raises(TransportError, match="data connection"):
                    await snd.write("rcv", "held", src, 20.0)
            tg.start_soon(writer)
            await anyio.sleep(0.2)
            for inc in list(rcv._data_server.conns):  # type: ignore[union-attr]
                inc.conn.shutdown(socket.SHUT_RDWR)
        assert anyio.current_time() - t0 < 5.0
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.05)
        before = snd.data_socket_stats["writes"]
        rcv.expose("after", region, 0, 1 << 16)
        await snd.write("rcv", "after", src, 5.0)
        await rcv.wait("after", 5.0)
        assert torch.equal(dst, src)
        assert snd.data_socket_stats["writes"] == before + 1
        src.fill_(0)  # the failed write's buffer is ours again


async def test_small_writes_and_a_receiver_without_data_socket_stay_on_zmq() -> None:
    big = torch.randint(0, 256, (1 << 18,), dtype=torch.uint8)
    cfg = ZmqTransportConfig(data_socket="tcp", data_socket_min_bytes=1 << 17)
    async with ZmqTransport("snd", cfg) as snd, ZmqTransport("rcv", cfg) as b, \
            create_transport(ZmqTransportConfig(data_socket="zmq"), "plain") as plain:
        assert isinstance(snd, ZmqTransport) and isinstance(b, ZmqTransport)
        await snd.connect("rcv", b.address)
        await snd.connect("plain", plain.address)
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.01)
        for t in (b, plain):
            dst = torch.zeros(1 << 18, dtype=torch.uint8)
            region = t.register(dst)
            t.expose("small", region, 0, 1 << 16)
            t.expose("big", region, 0, 1 << 18)
            peer = "rcv" if t is b else "plain"
            await snd.write(peer, "small", big[: 1 << 16], 5.0)
            await t.wait("small", 5.0)
            await snd.write(peer, "big", big, 5.0)
            await t.wait("big", 5.0)
            assert torch.equal(dst, big)
        assert not snd.data_socket_ready("plain")
        assert snd.data_socket_stats["writes"] == 1  # only the big write to the receiver with a data socket
        assert b.data_socket_stats["arrivals"] == 1


def test_data_socket_is_refused_with_curve() -> None:
    pub, sec = (k.decode() for k in zmq.curve_keypair())
    with pytest.raises(ValueError, match="data_socket.*curve_secret_key"):
        ZmqTransportConfig(data_socket="tcp", curve_public_key=pub, curve_secret_key=sec)
    cfg = ZmqTransportConfig.model_construct(data_socket="tcp", curve_public_key=pub, curve_secret_key=sec)
    with pytest.raises(ConfigError, match="data_socket.*curve_secret_key.*not encrypted"):
        ZmqTransport("x", cfg)


async def test_a_timed_out_write_whose_bytes_left_keeps_the_data_connection(rcv: Any) -> None:
    """A write the receiver holds past the write's deadline fails with PeerTimeout at that deadline. Its bytes had
    all left (nothing of it stays queued, the source buffer is free), so the data connection stays, with any other
    writes on it (a reset failed them all, though they may have landed), and the next write lands over it."""
    from dualpath.errors import PeerTimeout

    rcv._landings.pending_timeout_s = 30.0  # held at the receiver longer than the write waits
    async with ZmqTransport("snd", tcp_config(30.0)) as snd:
        assert isinstance(snd, ZmqTransport)
        await snd.connect("rcv", rcv.address)
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.01)
        src = torch.randint(1, 256, (1 << 18,), dtype=torch.uint8)
        t0 = anyio.current_time()
        with pytest.raises(PeerTimeout):
            await snd.write("rcv", "never", src, 0.3)
        assert anyio.current_time() - t0 < 2.0
        link = snd._links["rcv"]
        assert snd.data_socket_ready("rcv") and not link.dead  # kept
        dst = torch.zeros(1 << 18, dtype=torch.uint8)
        rcv.expose("next", rcv.register(dst), 0, 1 << 18)
        await snd.write("rcv", "next", src, 5.0)
        await rcv.wait("next", 5.0)
        assert torch.equal(dst, src)
        assert snd.data_socket_stats["writes"] == 2 and snd._links["rcv"] is link  # over the same connection


@pytest.mark.slow
async def test_bench_zmq_backend_measures_the_default_config_with_its_data_socket() -> None:
    """``dualpath bench transport --backends zmq`` measures the default config, whose large writes go over the
    data socket, against raw PUSH/PULL in the same run."""
    from dualpath.commands.bench_transport import MiB, bench_socket_backend

    runs = await bench_socket_backend("zmq", [1 * MiB], 1, 8)
    assert len(runs) == 1 and runs[0]["backend"] == "zmq"
    assert runs[0]["data_socket_writes"] >= 8 and runs[0]["ratio"] > 0 and runs[0]["raw_gib_s"] > 0


def test_the_data_socket_is_the_default_over_plain_tcp_only() -> None:
    """``data_socket: auto`` (the default) takes the data socket over tcp; ipc endpoints and CURVE ones (the data
    socket is not encrypted) keep every payload in zmq frames; an explicit choice is kept."""
    pub, sec = zmq.curve_keypair()
    assert ZmqTransportConfig().data_socket == "auto" and ZmqTransportConfig().uses_data_socket
    assert not ZmqTransportConfig(scheme="ipc").uses_data_socket
    assert not ZmqTransportConfig(curve_public_key=pub.decode(), curve_secret_key=sec.decode()).uses_data_socket
    assert not ZmqTransportConfig(data_socket="zmq").uses_data_socket
    assert ZmqTransportConfig(data_socket="tcp", scheme="ipc").uses_data_socket
    with pytest.raises(ValueError, match="CURVE"):
        ZmqTransportConfig(data_socket="tcp", curve_public_key=pub.decode(), curve_secret_key=sec.decode())


async def test_a_default_endpoint_pair_moves_large_writes_over_the_data_socket() -> None:
    """Two endpoints with the default config: a write of at least ``data_socket_min_bytes`` travels over the data
    socket once it is up, a small one over zmq, and both land intact."""
    cfg = ZmqTransportConfig(pending_timeout_s=5.0)
    async with ZmqTransport("snd", cfg) as snd, ZmqTransport("rcv", cfg) as rcv:
        assert isinstance(snd, ZmqTransport) and isinstance(rcv, ZmqTransport)
        big, small = cfg.data_socket_min_bytes, 64
        dst = torch.zeros(big + small, dtype=torch.uint8)
        region = rcv.register(dst)
        src = torch.randint(0, 256, (big + small,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        snd.register(src)
        await snd.connect("rcv", rcv.address)
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.01)
        rcv.expose("big", region, 0, big)
        rcv.expose("small", region, big, small)
        await snd.write("rcv", "big", src[:big], 5.0)
        await snd.write("rcv", "small", src[big:], 5.0)
        await rcv.wait("big", 5.0)
        await rcv.wait("small", 5.0)
        assert torch.equal(dst, src)
        assert snd.data_socket_stats["writes"] == 1


async def test_a_refused_data_connection_asks_for_a_fresh_offer(rcv: Any) -> None:
    """The receiver's secret changes (a restart at the same address): the sender's reconnect is refused, it asks
    for a new offer over zmq, and its large writes travel over the data socket again."""
    async with ZmqTransport("snd", tcp_config()) as snd:
        assert isinstance(snd, ZmqTransport)
        await snd.connect("rcv", rcv.address)
        with anyio.fail_after(10):
            while not snd.data_socket_ready("rcv"):
                await anyio.sleep(0.01)
        server = rcv._data_server
        assert server is not None
        server.secret = bytes(b ^ 0xFF for b in server.secret)
        for inc in list(server.conns):
            inc.conn.shutdown(socket.SHUT_RDWR)
        with anyio.fail_after(10):
            while snd._links["rcv"].ready:  # the sender sees the connection go
                await anyio.sleep(0.01)
            while not snd.data_socket_ready("rcv"):  # refused with the old secret, then a fresh offer
                await anyio.sleep(0.05)
        dst = torch.zeros(1 << 17, dtype=torch.uint8)
        src = torch.randint(1, 256, (1 << 17,), dtype=torch.uint8)
        rcv.expose("x", rcv.register(dst), 0, 1 << 17)
        await snd.write("rcv", "x", src, 5.0)
        await rcv.wait("x", 5.0)
        assert torch.equal(dst, src) and snd.data_socket_stats["writes"] == 1
