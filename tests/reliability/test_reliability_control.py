"""The control plane refuses bad input before allocating for it and keeps running; CURVE refuses unknown peers;
sockets bind to loopback by default; bad configs and bad block files get clear errors. No processes here."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import anyio
import msgpack
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_util import free_port

from dualpath.config import load_config
from dualpath.control.channel import AuthFailed, Channel, CurveKeys, PeerGone, RemoteError
from dualpath.control.client import SchedulerLost, ServeClient
from dualpath.control.deploy import check_deployable
from dualpath.control.protocol import MAX_TOKENS, ProtocolError, bin_to_tokens, decode, encode, tokens_to_bin
from dualpath.errors import ConfigError, PeerTimeout
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage.config import PosixStorageConfig
from dualpath.storage.posix import PosixStorage
from dualpath.types import BlockKey


def _env(t: str, b: object, **kw: object) -> bytes:
    return msgpack.packb({"v": 1, "t": t, "id": 1, "re": 0, "b": b, **kw}, use_bin_type=True)


MALFORMED = [
    b"",
    b"\xc1",
    b"\x93\x01\x02\x03",
    msgpack.packb("just a string"),
    _env("ping", {}, extra=1),
    msgpack.packb({"v": 2, "t": "ping", "id": 1, "re": 0, "b": {}}),
    msgpack.packb({"v": 1, "t": 5, "id": 1, "re": 0, "b": {}}),
    _env("no_such_type", {}),
    _env("ping", [1, 2]),
    _env("submit", {"session": 1, "prompt": b"\0" * 8}),  # missing gen
    _env("submit", {"session": 1, "prompt": b"\0" * 8, "gen": 1, "evil": 1}),
    _env("submit", {"session": -5, "prompt": b"\0" * 8, "gen": 1}),
    _env("submit", {"session": 1, "prompt": b"\0" * 7, "gen": 1}),
    _env("submit", {"session": 1, "prompt": "not bytes", "gen": 1}),
    _env("submit", {"session": 1, "prompt": b"\0" * 8, "gen": True}),
    _env("submit", {"session": 1, "prompt": b"\0" * 8, "gen": 1, "deadline_s": float("nan")}),
    _env("submit", {"session": 1, "prompt": b"\0" * (MAX_TOKENS * 8 + 8), "gen": 1}),
    _env("hello", {"role": "admin", "rank": 0, "node": 0, "address": "x", "pid": 1, "fingerprint": "f",
                   "token_bytes": 1, "vocab_size": 1, "max_context": 1}),
    _env("error", {"code": "bad code\n", "message": "x"}),
    _env("result", {"session": 1, "tokens": [1, "2"], "prompt_tokens": 1, "hit_tokens": 0, "path": "pe",
                    "pe": 0, "de": 0, "ttft_s": 0.0, "tpot_s": 0.0, "total_s": 0.0, "retries": 0}),
    msgpack.packb({"v": 1, "t": "ping", "id": -1, "re": 0, "b": {}}),
    msgpack.packb({"v": 1, "t": "ping", "id": 1, "re": 0, "b": {}, 1: 2}, strict_types=False),
    b"\xdd\xff\xff\xff\xff",  # array32 header claiming 4G elements
    b"\xdf\xff\xff\xff\xff",  # map32 header claiming 4G entries
    b"\xc6\xff\xff\xff\xff",  # bin32 header claiming 4 GiB
    b"\xc7\x05\x01hello",  # an ext type
    b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",  # a pickle
    b"\x91" * 100_000 + b"\xc0",  # nesting bomb
    _env("ping", {}, inc=-1),  # the restart fence's stamps: ints in [0, 2^63)
    _env("ping", {}, to="x"),
    _env("ping", {}, to=1 << 63),
]


@pytest.mark.parametrize("frame", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_frames_are_rejected(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_oversized_frame_is_rejected_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * 2048, max_bytes=1024)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


def test_valid_messages_round_trip_and_tokens_are_checked() -> None:
    m = decode(encode("submit", {"session": 3, "prompt": tokens_to_bin([1, 2, 3]), "gen": 4}, mid=9))
    assert (m.type, m.id, m.body["gen"]) == ("submit", 9, 4)
    assert list(bin_to_tokens(m.body["prompt"])) == [1, 2, 3]
    with pytest.raises(ProtocolError):
        bin_to_tokens((-1).to_bytes(8, "little", signed=True))
    with pytest.raises(ProtocolError):  # senders validate too
        encode("submit", {"session": 1, "prompt": b"1", "gen": 1})


async def _echo(peer: bytes, msg):  # type: ignore[no-untyped-def]
    return "pong", {}


@pytest.mark.anyio
async def test_channel_answers_malformed_frames_and_keeps_serving() -> None:
    async with Channel("srv", bind="tcp://127.0.0.1:0", handler=_echo) as srv:
        assert srv.address.startswith("tcp://127.0.0.1:")
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(srv.address)
        try:
            for frame in MALFORMED[:12]:
                await raw.send(frame)
                with anyio.fail_after(5):
                    reply = msgpack.unpackb(await raw.recv(), raw=False)
                assert reply["t"] == "error" and reply["b"]["code"] == "bad_message"
        finally:
            raw.close()
            ctx.term()
        assert srv.rejected == 12
        async with Channel("cli", connect=srv.address) as cli:
            assert (await cli.request(None, "ping", {}, 5)).type == "pong"


@pytest.mark.anyio
async def test_a_server_closing_right_after_its_reply_still_delivers_it() -> None:
    """A stop is answered, then the server closes at once (the scheduler's ``ctl stop``): the reply queued before the
    close must still reach the asker. A 32 MB reply is still being written to the socket when the close comes."""
    asked = anyio.Event()
    blob = os.urandom(32 << 20)

    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        asked.set()
        return "logits", {"rid": 1, "logits": blob}  # a reply type that carries a large binary field

    srv = Channel("srv", bind="tcp://127.0.0.1:0", handler=handler)
    await srv.start()
    try:
        async with Channel("cli", connect=srv.address) as cli, anyio.create_task_group() as tg:
            got: list[bytes] = []

            async def ask() -> None:
                got.append((await cli.request(None, "shutdown", {}, 10)).body["logits"])

            tg.start_soon(ask)
            await asked.wait()
            for _ in range(3):  # the handler's task queues the reply, then the server closes
                await anyio.sleep(0)
            await srv.close()
        assert got == [blob]
    finally:
        await srv.close()


@pytest.mark.anyio
async def test_request_deadline_and_remote_errors() -> None:
    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        if msg.type == "stats":
            await anyio.sleep(30)
        raise ConfigError("nope")

    async with Channel("srv", bind="tcp://127.0.0.1:0", handler=handler) as srv, \
            Channel("cli", connect=srv.address) as cli:
        with pytest.raises(PeerTimeout):
            await cli.request(None, "stats", {}, 0.3)
        with pytest.raises(RemoteError) as ei:
            await cli.request(None, "ping", {}, 5)
        assert ei.value.code == "ConfigError"


@pytest.mark.anyio
async def test_curve_refuses_unauthenticated_peers() -> None:
    spub, ssec = (k.decode() for k in zmq.curve_keypair())
    cpub, csec = (k.decode() for k in zmq.curve_keypair())
    opub, osec = (k.decode() for k in zmq.curve_keypair())
    server = CurveKeys(spub, ssec, allowed=(cpub,))
    async with Channel("srv", bind="tcp://127.0.0.1:0", curve=server, handler=_echo) as srv:
        async with Channel("good", connect=srv.address, curve=CurveKeys(cpub, csec, server=spub)) as good:
            assert (await good.request(None, "ping", {}, 5)).type == "pong"
        # refused peers fail fast (the handshake's answer, not a 30 s request timeout) and are told what to check
        async with Channel("stranger", connect=srv.address, curve=CurveKeys(opub, osec, server=spub)) as bad:
            with anyio.fail_after(10), pytest.raises(AuthFailed, match=f"refused this CURVE key {re.escape(opub)}"):
                await bad.request(None, "ping", {}, 600.0)
            with anyio.fail_after(10), pytest.raises(AuthFailed):  # and keeps failing: no send without a deadline
                await bad.notify(None, "ping", {})
        async with Channel("plain", connect=srv.address) as plain:  # no CURVE at all
            with anyio.fail_after(10), pytest.raises(AuthFailed, match="requires CURVE.*serve.curve_public_key"):
                await plain.request(None, "ping", {}, 600.0)
        assert srv.refused >= 1
    async with Channel("plain-srv", bind="tcp://127.0.0.1:0", handler=_echo) as plain_srv, \
            Channel("curve-cli", connect=plain_srv.address, curve=CurveKeys(cpub, csec, server=spub)) as cc:
        with anyio.fail_after(10), pytest.raises(AuthFailed, match="the server does not"):
            await cc.request(None, "ping", {}, 600.0)


@pytest.mark.anyio
async def test_a_peer_that_hangs_up_is_not_blamed_on_curve() -> None:
    """Something at the address that accepts and closes (not a scheduler): the error says so first, instead of
    asserting that the server requires CURVE."""
    import socket
    import threading

    lst = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hang_up() -> None:
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
                conn.close()
            except OSError:
                pass

    th = threading.Thread(target=hang_up, daemon=True)
    th.start()
    try:
        async with Channel("c", connect=f"tcp://127.0.0.1:{lst.getsockname()[1]}") as c:
            with anyio.fail_after(10), pytest.raises(AuthFailed, match="closed the connection during the handshake"
                                                                        ".*nothing there is a dualpath scheduler"):
                await c.request(None, "ping", {}, 600.0)
    finally:
        stop.set()
        th.join()
        lst.close()


def test_bad_serve_configs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="storage.kind"):
        check_deployable(load_config(None, env={}, overrides={"transport": {"kind": "zmq"}}))
    with pytest.raises(ConfigError, match="transport.kind"):
        check_deployable(load_config(None, env={}, overrides={"storage": {"kind": "posix", "root": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="serve"):
        load_config(None, env={}, overrides={"serve": {"curve_public_key": "short", "curve_secret_key": "short"}})
    with pytest.raises(ConfigError, match="serve.*unknown key"):
        load_config(None, env={}, overrides={"serve": {"bind_everything": True}})
    with pytest.raises(ConfigError, match="serve.port"):
        load_config(None, env={}, overrides={"serve": {"port": 70000}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad, env={})


def test_engine_rank_outside_the_config_is_refused(tmp_path: Path) -> None:
    from dualpath.control.enginehost import EngineHost
    from dualpath.types import Role

    cfg = load_config(None, env={}, overrides={"storage": {"kind": "posix", "root": str(tmp_path)},
                                               "transport": {"kind": "zmq"}})
    with pytest.raises(ConfigError, match="--rank 3"):
        EngineHost(cfg, Role.DECODE, 3)


def test_block_keys_cannot_name_a_path() -> None:
    for text in ("../" * 21 + "x", "/etc/passwd".ljust(64, "0"), "zz" * 32, "0" * 63):
        with pytest.raises(ValueError):
            BlockKey.from_hex(text)


@pytest.mark.anyio
async def test_bad_block_files_are_never_served(tmp_path: Path) -> None:
    layout = KVLayout(KVSpec.mha(2, 1, 8, "bfloat16"), 16)
    ns = KeyNamespace("m", layout.spec.fingerprint(), 16)
    keys = [BlockKey(bytes([i]) * 32) for i in range(1, 6)]
    root = tmp_path / "kv"
    async with PosixStorage(PosixStorageConfig(root=root), layout, ns) as st:
        blocks = torch.randint(0, 255, (5, *layout.full_block_shape), dtype=torch.uint8)
        assert all(s.value == "ok" for s in await st.write(keys, blocks))
    paths = [root / k.hex[:2] / k.hex[2:4] / f"{k.hex}.kvb" for k in keys]
    paths[0].write_bytes(b"garbage")  # truncated
    data = bytearray(paths[1].read_bytes())
    data[60] ^= 1  # a bit flipped in the header (its key field)
    paths[1].write_bytes(bytes(data))
    paths[2].write_bytes(paths[3].read_bytes())  # another key's (valid) block under this name
    (root / "zz").mkdir()
    (root / "zz" / "notes.txt").write_text("hi")  # junk the scan must ignore
    os.symlink("/etc/passwd", root / keys[4].hex[:2] / "passwd.kvb")
    async with PosixStorage(PosixStorageConfig(root=root), layout, ns) as st:
        into = torch.zeros((5, *layout.full_block_shape), dtype=torch.uint8)
        statuses = [s.value for s in await st.read(keys, into)]
    assert statuses[:3] != ["ok"] * 3 and all(s != "ok" for s in statuses[:3])
    assert statuses[3:] == ["ok", "ok"]
    assert torch.equal(into[3:], blocks[3:])


@pytest.mark.parametrize("text", ['{"tid": 0, "turns": [[10, 2]]}\nnot json\n', '{"tid": "x"}\n', "[1, 2]\n"])
def test_bad_trace_for_run_serve_is_refused_before_connecting(tmp_path: Path, text: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dualpath.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    rc = main(["run", "--serve", "tcp://127.0.0.1:9", "--trace", str(bad)])  # nothing listens there
    assert rc == 2
    assert "bad.jsonl" in capsys.readouterr().err


async def _raw_router(ctx: zmq.asyncio.Context, addr: str, **opts: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    for k, v in opts.items():
        sock.setsockopt(getattr(zmq, k), v)
    sock.bind(addr)
    return sock


async def _rebind(addr: str, handler: Any) -> Channel:
    """A server started on the address of one that just died (its port is released by zmq's I/O thread a moment
    later: retried for up to 5 s)."""
    with anyio.fail_after(5):
        while True:
            server = Channel("srv", bind=addr, handler=handler)
            try:
                await server.start()
                return server
            except ConfigError:
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_request_waiting_for_the_connection_is_sent_once_or_never() -> None:
    """A request still waiting for its server's connection is not in flight: ``fail_all`` (the client found the
    server gone) leaves it waiting, and it is sent to the server that comes up. One whose asker gave up
    (cancelled) is never sent: sent to that server, it would run for nobody."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.asyncio.Context()
    try:
        async with Channel("cli", connect=addr, handshake_timeout=30) as cli:
            got: list[str] = []

            async def ask() -> None:
                got.append((await cli.request(None, "stats", {}, 30)).type)

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                async with anyio.create_task_group() as gone:
                    gone.start_soon(cli.request, None, "drain", {}, 30)
                    with anyio.fail_after(5):
                        while cli.pending < 2:
                            await anyio.sleep(0.01)
                    await anyio.sleep(0.2)  # both wait for a server that is not there
                    gone.cancel_scope.cancel()  # the asker of the drain gives up
                assert cli.pending == 1 and cli.fail_all(PeerGone("scheduler lost")) == 0
                server = await _raw_router(ctx, addr)
                try:
                    with anyio.fail_after(10):
                        ident, data = await server.recv_multipart()
                    msg = decode(data)
                    await server.send_multipart([ident, encode("pong", {}, mid=1, re_=msg.id, inc=5)])
                    with anyio.move_on_after(0.5):  # nothing else comes
                        _ident, extra = await server.recv_multipart()
                        pytest.fail(f"a {decode(extra).type!r} whose asker gave up was sent")
                finally:
                    server.close(linger=0)
            assert msg.type == "stats" and got == ["pong"] and cli.server_incarnation == 5
    finally:
        ctx.term()


@pytest.mark.anyio
async def test_requests_queued_for_a_dead_server_never_run_on_its_successor() -> None:
    """Requests still queued in a client's socket when its server dies (their asker then fails them: the
    scheduler was lost) are delivered to the server restarted on that address once the client reconnects; the
    restart fence drops them there unrun. The first server stops reading, so most of 32 requests of 1 MiB wait in
    the client when it dies; it stamps its one answer with incarnation 111, as a server does."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.asyncio.Context()
    first = await _raw_router(ctx, addr, RCVHWM=1)
    blob = os.urandom(1 << 20)
    ran: list[str] = []

    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        ran.append(msg.type)
        return "pong", {}

    try:
        async with Channel("cli", connect=addr) as cli, anyio.create_task_group() as tg:
            async def answer_one() -> None:
                ident, data = await first.recv_multipart()
                await first.send_multipart([ident, encode("pong", {}, mid=1, re_=decode(data).id, inc=111)])

            tg.start_soon(answer_one)
            assert (await cli.request(None, "ping", {}, 10)).type == "pong" and cli.server_incarnation == 111
            failed: list[BaseException] = []

            async def ask(i: int) -> None:
                try:
                    await cli.request(None, "logits", {"rid": i, "logits": blob}, 60)
                except PeerGone as exc:
                    failed.append(exc)

            for i in range(32):
                tg.start_soon(ask, i)
            with anyio.fail_after(10):
                while cli.pending < 32:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            first.close(linger=0)  # the server dies with most of them still queued in the client
            assert cli.fail_all(PeerGone("scheduler lost")) == 32  # what the client does when it sees that
            second = await _rebind(addr, handler)
            try:
                with anyio.fail_after(10):
                    while second.stale == 0:
                        await anyio.sleep(0.02)
                assert (await cli.request(None, "ping", {}, 10)).type == "pong"
                assert cli.server_incarnation == second.incarnation
            finally:
                await second.close()
        assert len(failed) == 32
        assert ran == ["ping"], f"{ran.count('logits')} requests whose asker had given up ran on the new server"
    finally:
        first.close(linger=0)
        ctx.term()


@pytest.mark.anyio
async def test_a_clients_first_request_waits_for_its_server_to_answer() -> None:
    """A client that has not heard from its scheduler yet asks ``ping`` first (its hello) and sends nothing else
    until it is answered: its first request, too, is addressed to an incarnation. The scheduler dies before it
    answers: the request fails (the scheduler was lost) without being sent, so it never runs on the successor, and
    the next request goes to the successor addressed to it."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.asyncio.Context()
    first = await _raw_router(ctx, addr)  # a server that never answers
    ran: list[tuple[str, int]] = []

    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        ran.append((msg.type, msg.to))
        return "pong", {}

    client = ServeClient(addr, heartbeat_s=None)
    try:
        await client.start()
        failed: list[BaseException] = []

        async def ask() -> None:
            try:
                await client.stats(timeout=30)
            except SchedulerLost as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(10):
                _ident, data = await first.recv_multipart()
            hello = decode(data)
            assert (hello.type, hello.to) == ("ping", 0)
            with anyio.move_on_after(0.5):  # nothing else leaves before the answer
                _ident, extra = await first.recv_multipart()
                pytest.fail(f"a {decode(extra).type!r} was sent before the server answered")
            first.close(linger=0)  # the server dies before answering
        assert len(failed) == 1
        second = await _rebind(addr, handler)
        try:
            await anyio.sleep(0.3)  # the client reconnects: anything still queued in it would arrive now
            assert (await client.channel.request(None, "stats", {}, 10)).type == "pong"
            assert ran == [("ping", 0), ("stats", second.incarnation)]
        finally:
            await second.close()
    finally:
        await client.close()
        first.close(linger=0)
        ctx.term()


@pytest.mark.anyio
async def test_first_requests_share_one_hello_and_keep_their_own_deadlines() -> None:
    """Requests waiting together for a server not heard from yet share one hello; an asker whose deadline ends
    first fails alone, and one with time left asks again once the server is up: one hello answered, each request
    run once, addressed to the server's incarnation."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    ran: list[tuple[str, int]] = []

    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        ran.append((msg.type, msg.to))
        return "pong", {}

    async with Channel("cli", connect=addr, hello="ping") as cli:
        out: dict[str, object] = {}

        async def ask(name: str, timeout: float) -> None:
            try:
                out[name] = (await cli.request(None, "stats", {}, timeout)).type
            except PeerTimeout as exc:
                out[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "a", 0.3)  # its hello's deadline is 0.3 s: no server yet
            await anyio.sleep(0.05)
            tg.start_soon(ask, "b", 20.0)
            tg.start_soon(ask, "c", 20.0)
            await anyio.sleep(0.6)
            async with Channel("srv", bind=addr, handler=handler) as srv:
                with anyio.fail_after(10):
                    while len(out) < 3:
                        await anyio.sleep(0.02)
        assert isinstance(out["a"], PeerTimeout) and out["b"] == out["c"] == "pong", out
        assert ran == [("ping", 0), ("stats", srv.incarnation), ("stats", srv.incarnation)], ran


@pytest.mark.anyio
async def test_a_request_to_a_restarted_server_is_fenced_once_then_runs_once() -> None:
    """A client that last heard from a server's previous incarnation stamps its next request with it: the new
    server refuses it unrun (``stale_incarnation``, counted) and the client sends it again, transparently, within
    its deadline: one refusal, one run."""
    addr = f"tcp://127.0.0.1:{free_port()}"
    calls: list[int] = []

    async def handler(peer: bytes, msg):  # type: ignore[no-untyped-def]
        calls.append(1)
        return "pong", {}

    async with Channel("cli", connect=addr) as cli:
        async with Channel("srv", bind=addr, handler=handler) as a:
            assert (await cli.request(None, "ping", {}, 10)).type == "pong"
            assert cli.server_incarnation == a.incarnation and a.stale == 0
        async with Channel("srv", bind=addr, handler=handler) as b:
            assert b.incarnation != a.incarnation
            assert (await cli.request(None, "stats", {}, 10)).type == "pong"
            assert b.stale == 1 and calls == [1, 1] and cli.server_incarnation == b.incarnation
            # a raw request addressed to another incarnation is refused by name and not run
            ctx = zmq.asyncio.Context()
            raw = ctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(addr)
            try:
                await raw.send(encode("ping", {}, mid=7, to=a.incarnation))
                with anyio.fail_after(5):
                    reply = decode(await raw.recv())
                assert reply.type == "error" and reply.re == 7 and reply.body["code"] == "stale_incarnation"
                assert reply.inc == b.incarnation and calls == [1, 1] and b.stale == 2
            finally:
                raw.close()
                ctx.term()
