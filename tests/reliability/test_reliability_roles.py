"""Roles, not just encryption; fencing by epochs (issue 13, items 3, 4 and 6). The real scheduler daemon runs in
this process on loopback; engines are played by raw control channels speaking the protocol, so each rule is
checked message by message (no engine processes: fast).

* Without CURVE a client cannot ``shutdown``/``drain`` (the operator token of ``serve.token_file`` can), cannot
  ``hello`` as an engine (the engine token can), and cannot send engine messages.
* With CURVE the authenticated key (ZAP User-Id) decides: client, engine and operator keys each send only their
  own messages.
* No takeover: a second connection presenting a registered engine's routing identity gets nothing (no
  ``ROUTER_HANDOVER``), so it never receives another session's ``begin``.
* Epochs: a heartbeat of a fenced epoch is dropped and the engine is asked once to register again; one silent
  period gives one death declaration, however many stale heartbeats follow.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq
from serve_util import tiny_config

from dualpath.config import DualPathConfig
from dualpath.control.channel import Channel, CurveKeys, RemoteError
from dualpath.control.client import ServeClient
from dualpath.control.deploy import create_tokens, load_tokens
from dualpath.control.protocol import Message
from dualpath.control.schedulerd import SchedulerDaemon
from dualpath.errors import ConfigError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


def _hello(rank: int = 0, **extra: Any) -> dict[str, Any]:
    return {"role": "prefill", "rank": rank, "node": 0, "address": "tcp://127.0.0.1:1", "pid": os.getpid(),
            "fingerprint": "f" * 8, "token_bytes": 64, "vocab_size": 1000, "max_context": 4096, **extra}


def _beat(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "seq": 0, "tok": 0, "read_q": 0, "free_kv_tokens": 1000, "inflight": 0, "rss": 1,
            "fds": 1, "tasks": 1, "regions": 0}


@contextlib.asynccontextmanager
async def _scheduler(cfg: DualPathConfig) -> AsyncIterator[SchedulerDaemon]:
    d = SchedulerDaemon(cfg, bind="tcp://127.0.0.1:0")
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        with anyio.fail_after(10):
            # (the driver is entered: its PE work predictor is set, from a thread, before its loop starts)
            while d.channel is None or not d.channel.address or d.driver is None or d.driver._tg is None:
                await anyio.sleep(0.01)
        try:
            yield d
        finally:
            d.stop()


class _Engine:
    """A raw engine connection: records every message the scheduler sends it."""

    def __init__(self, address: str, ident: bytes, curve: CurveKeys | None = None) -> None:
        self.got: list[Message] = []
        self.ch = Channel(ident.decode(), connect=address, identity=ident, curve=curve, handler=self._on)

    async def _on(self, peer: bytes, msg: Message) -> None:
        self.got.append(msg)
        return None


def _cfg(tmp_path: Path, **serve: Any) -> DualPathConfig:
    return tiny_config(tmp_path / "kv", serve={"dead_after_s": 0.5, "heartbeat_s": 0.05, **serve})


@pytest.fixture
def token_cfg(tmp_path: Path) -> tuple[DualPathConfig, dict[str, str]]:
    tokens = create_tokens(tmp_path / "control.token")
    return _cfg(tmp_path, token_file=str(tmp_path / "control.token")), tokens


async def test_without_curve_only_the_operator_token_stops_or_drains(token_cfg) -> None:
    cfg, tokens = token_cfg
    async with _scheduler(cfg) as d:
        addr = d.channel.address
        async with ServeClient(addr, heartbeat_s=None) as c:
            for call in (c.shutdown, c.drain):
                with pytest.raises(RemoteError, match="unauthorized.*operator"):
                    await call(timeout=5)  # before the fix any client stopped the deployment
                with pytest.raises(RemoteError, match="unauthorized"):
                    await call(timeout=5, token=tokens["engine"])  # another role's token is not enough
            assert not d._stop.is_set() and not d.draining
            assert (await c.stats())["refused_messages"] == 4
            await c.drain(timeout=5, token=tokens["operator"])
            assert d.draining
            await c.shutdown(timeout=5, token=tokens["operator"])
        with anyio.fail_after(5):
            await d._stop.wait()


async def test_without_curve_engines_need_the_engine_token(token_cfg) -> None:
    cfg, tokens = token_cfg
    async with _scheduler(cfg) as d:
        addr = d.channel.address
        intruder = _Engine(addr, b"pe0")  # the routing id engines used to have
        async with intruder.ch:
            with pytest.raises(RemoteError, match="unauthorized.*engine"):
                await intruder.ch.request(None, "hello", _hello(), 5)
            with pytest.raises(RemoteError, match="unauthorized.*engine"):
                await intruder.ch.request(None, "hello", _hello(token=tokens["operator"]), 5)
            assert not d.engines
            eng = _Engine(addr, b"pe0.real" + secrets.token_hex(4).encode())
            async with eng.ch:
                w = await eng.ch.request(None, "hello", _hello(token=tokens["engine"]), 5)
                assert w.type == "welcome" and w.body["epoch"] > 0
                assert d.engines["pe0"].alive and d.engines["pe0"].ident == eng.ch.identity
                # the intruder's connection is not the engine's: its heartbeats are fenced, its submits allowed
                await intruder.ch.notify(None, "heartbeat", _beat(w.body["epoch"]))
                await anyio.sleep(0.2)
                assert d.stats["stale_messages"] >= 1
                # and an engine's connection cannot submit turns
                with pytest.raises(RemoteError, match="unauthorized.*client"):
                    await eng.ch.request(None, "submit", {"session": 1, "prompt": b"\0" * 8, "gen": 1}, 5)


async def test_a_second_connection_with_an_engines_identity_gets_nothing(token_cfg) -> None:
    """Before the fix (ROUTER_HANDOVER) the newcomer took over the identity and received the engine's messages."""
    cfg, tokens = token_cfg
    async with _scheduler(cfg) as d:
        addr = d.channel.address
        ident = b"de0.secret" + secrets.token_hex(4).encode()
        eng = _Engine(addr, ident)
        thief = _Engine(addr, ident)
        async with eng.ch:
            await eng.ch.request(None, "hello", {**_hello(token=tokens["engine"]), "role": "decode"}, 5)
            async with thief.ch:
                with contextlib.suppress(Exception):  # its connection is refused: nothing it sends arrives
                    await thief.ch.notify(None, "ping", {}, timeout=0.5)
                await anyio.sleep(0.3)
                await d.notify(d.engines["de0"], "peers", {"peers": ["pe0=tcp://127.0.0.1:9"]})
                with anyio.fail_after(5):
                    while not eng.got:
                        await anyio.sleep(0.02)
                await anyio.sleep(0.2)
                assert [m.type for m in eng.got] == ["peers"]
                assert thief.got == [], "a second connection with the engine's identity received its messages"


async def test_with_curve_the_key_decides_the_role(tmp_path: Path) -> None:
    keys = {r: [k.decode() for k in zmq.curve_keypair()] for r in ("server", "client", "engine", "operator")}
    cfg = _cfg(tmp_path, curve_public_key=keys["server"][0], curve_secret_key=keys["server"][1],
               curve_client_public_key=keys["client"][0], curve_client_secret_key=keys["client"][1],
               curve_engine_public_key=keys["engine"][0], curve_engine_secret_key=keys["engine"][1],
               curve_operator_public_key=keys["operator"][0])

    def pair(role: str) -> CurveKeys:
        return CurveKeys(keys[role][0], keys[role][1], server=keys["server"][0])

    async with _scheduler(cfg) as d:
        addr = d.channel.address
        async with ServeClient(addr, curve=pair("client"), heartbeat_s=None) as c:
            assert (await c.stats())["engines_alive"] == 0
            with pytest.raises(RemoteError, match="unauthorized.*operator"):
                await c.shutdown(timeout=5)
            fake = Channel("fake-engine", connect=addr, curve=pair("client"))
            async with fake:
                with pytest.raises(RemoteError, match="unauthorized.*engine"):
                    await fake.request(None, "hello", _hello(), 5)
        eng = _Engine(addr, b"pe0.x" + secrets.token_hex(4).encode(), curve=pair("engine"))
        async with eng.ch:
            assert (await eng.ch.request(None, "hello", _hello(), 5)).type == "welcome"
            with pytest.raises(RemoteError, match="unauthorized.*client"):
                await eng.ch.request(None, "submit", {"session": 1, "prompt": b"\0" * 8, "gen": 1}, 5)
        async with ServeClient(addr, curve=pair("operator"), heartbeat_s=None) as op:
            await op.shutdown(timeout=5)
        with anyio.fail_after(5):
            await d._stop.wait()


async def test_one_stall_gives_one_declaration_and_old_epochs_are_dropped(token_cfg) -> None:
    """An engine silent past ``dead_after_s`` whose queued heartbeats then all arrive at once (a SIGSTOP and
    SIGCONT): before epochs it was declared dead again at every re-hello (13 times in the report)."""
    cfg, tokens = token_cfg
    async with _scheduler(cfg) as d:
        eng = _Engine(d.channel.address, b"pe0.s" + secrets.token_hex(4).encode())
        async with eng.ch:
            w = await eng.ch.request(None, "hello", _hello(token=tokens["engine"]), 5)
            epoch = w.body["epoch"]
            await eng.ch.notify(None, "heartbeat", _beat(epoch))
            with anyio.fail_after(5):  # silent: declared dead once
                while d.engines["pe0"].alive:
                    await anyio.sleep(0.02)
            assert d.stats["engine_deaths"] == 1
            for _ in range(20):  # the stalled process wakes up: its queued heartbeats arrive together
                await eng.ch.notify(None, "heartbeat", _beat(epoch))
            with anyio.fail_after(5):
                while not any(m.type == "reregister" for m in eng.got):
                    await anyio.sleep(0.02)
            rereg = [m for m in eng.got if m.type == "reregister"]
            assert len(rereg) == 1 and rereg[0].body["epoch"] == epoch  # asked once, naming the fenced epoch
            w2 = await eng.ch.request(None, "hello", _hello(token=tokens["engine"], epoch=epoch), 5)
            assert w2.body["epoch"] > epoch
            # a late re-hello of the same live incarnation is idempotent: no second declaration
            w3 = await eng.ch.request(None, "hello", _hello(token=tokens["engine"], epoch=epoch), 5)
            assert w3.body["epoch"] == w2.body["epoch"]
            stale_before = d.stats["stale_messages"]
            await eng.ch.notify(None, "heartbeat", _beat(epoch))  # an old-epoch message: dropped
            await eng.ch.notify(None, "heartbeat", _beat(w2.body["epoch"]))
            await anyio.sleep(0.1)
            assert d.stats["stale_messages"] == stale_before + 1
            assert d.engines["pe0"].alive and d.stats["engine_deaths"] == 1


def test_token_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "control.token"
    create_tokens(f)
    assert (f.stat().st_mode & 0o777) == 0o600
    assert set(load_tokens(f)) == {"engine", "operator"}
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="serve.token_file.*readable by others"):
        load_tokens(f)
    with pytest.raises(ConfigError, match="serve.token_file"):
        load_tokens(tmp_path / "missing.token")


async def test_a_client_cancels_its_own_turn_only(token_cfg) -> None:
    """Clients may ``cancel``: the turn ends at once with an explicit error; another connection's cancel of the
    same session number does nothing to it (no engines here: the turn would otherwise wait for its deadline)."""
    cfg, _tokens = token_cfg
    async with _scheduler(cfg) as d:
        addr = d.channel.address
        async with ServeClient(addr, heartbeat_s=None) as owner, ServeClient(addr, heartbeat_s=None) as other:
            out: dict[str, BaseException] = {}

            async def turn() -> None:
                try:
                    await owner.run_turn(7, [1, 2, 3], 4, deadline_s=60.0)
                except BaseException as exc:  # reported below
                    out["err"] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(turn)
                with anyio.fail_after(10):
                    while d._inflight < 1:
                        await anyio.sleep(0.02)
                await other.cancel(7)  # not its turn
                await anyio.sleep(0.3)
                assert "err" not in out and d._inflight == 1
                with anyio.fail_after(10):
                    await owner.cancel(7)
            assert isinstance(out.get("err"), RemoteError) and "cancelled" in str(out["err"])
            assert d._inflight == 0 and d.stats["cancelled"] == 1


async def test_an_engine_key_registers_only_as_its_own_engine(tmp_path: Path) -> None:
    """Per-engine keys (``serve.curve_engine_keys``): pe0's key cannot say hello as pe1 (nor as de0), and pe1,
    which has its own key, cannot be registered with the shared engine key; the legacy shared key still registers
    an engine that has no key of its own (before the fix any engine key registered as any engine)."""
    keys = {r: [k.decode() for k in zmq.curve_keypair()] for r in ("server", "client", "shared", "pe0", "pe1")}
    cfg = _cfg(tmp_path, curve_public_key=keys["server"][0], curve_secret_key=keys["server"][1],
               curve_client_public_key=keys["client"][0], curve_client_secret_key=keys["client"][1],
               curve_engine_public_key=keys["shared"][0], curve_engine_secret_key=keys["shared"][1],
               curve_engine_keys={"pe0": keys["pe0"][0], "pe1": keys["pe1"][0]})
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"prefill_nodes": 2})})
    with pytest.raises(ValueError, match="curve_engine_keys"):  # two engines may not share a key
        type(cfg.serve).model_validate({**cfg.serve.model_dump(), "curve_engine_keys": {"pe0": keys["pe0"][0],
                                                                                          "pe1": keys["pe0"][0]}})

    def pair(who: str) -> CurveKeys:
        return CurveKeys(keys[who][0], keys[who][1], server=keys["server"][0])

    async with _scheduler(cfg) as d:
        addr = d.channel.address
        a = _Engine(addr, b"pe0.k" + secrets.token_hex(4).encode(), curve=pair("pe0"))
        async with a.ch:
            for claim in (_hello(rank=1), {**_hello(rank=0), "role": "decode"}):
                with pytest.raises(RemoteError, match=r"unauthorized: 'hello' as (pe1|de0).*pe0's"):
                    await a.ch.request(None, "hello", claim, 5)
            assert not d.engines
            with pytest.raises(RemoteError, match=r"node 1, but pe0 is on node 0"):  # its own name, another node
                await a.ch.request(None, "hello", {**_hello(rank=0), "node": 1}, 5)
            assert (await a.ch.request(None, "hello", _hello(rank=0), 5)).type == "welcome"
            assert d.engines["pe0"].alive and d.engines["pe0"].ident == a.ch.identity
        shared = _Engine(addr, b"pe1.s" + secrets.token_hex(4).encode(), curve=pair("shared"))
        async with shared.ch:
            with pytest.raises(RemoteError, match=r"unauthorized.*pe1 has its own key"):
                await shared.ch.request(None, "hello", _hello(rank=1), 5)
            assert "pe1" not in d.engines
            # the shared (legacy) pair still registers an engine with no key of its own
            assert (await shared.ch.request(None, "hello", {**_hello(rank=0), "role": "decode"}, 5)).type == "welcome"
        b = _Engine(addr, b"pe1.k" + secrets.token_hex(4).encode(), curve=pair("pe1"))
        async with b.ch:
            assert (await b.ch.request(None, "hello", {**_hello(rank=1), "node": 1}, 5)).type == "welcome"
        assert d.stats["refused_messages"] == 3


def test_the_launcher_generates_the_engine_keys_itself(tmp_path: Path) -> None:
    """`dualpath serve` (one machine) makes a pair per engine; engine public keys given to it are refused
    clearly (it could not give those engines their secret keys), before any process starts."""
    from dualpath.control.launcher import Deployment

    keys = {r: [k.decode() for k in zmq.curve_keypair()] for r in ("server", "client", "pe0")}
    cfg = _cfg(tmp_path, curve_public_key=keys["server"][0], curve_secret_key=keys["server"][1],
               curve_client_public_key=keys["client"][0], curve_client_secret_key=keys["client"][1],
               curve_engine_keys={"pe0": keys["pe0"][0]})
    with pytest.raises(ConfigError, match="serve.curve_engine_keys"):
        Deployment(cfg, workdir=tmp_path / "work")


async def test_the_operators_stop_reaches_every_client_and_its_own_answer_comes_back(token_cfg) -> None:
    """On the operator's ``shutdown`` the scheduler tells every client it has heard from (an HTTP front exits on
    it) before its engines; the operator's own request, whose connection is such a client too, still gets its
    answer (the notice may overtake the reply: it must not fail the request in flight)."""
    cfg, tokens = token_cfg
    async with _scheduler(cfg) as d:
        addr = d.channel.address
        async with ServeClient(addr, heartbeat_s=None) as front, ServeClient(addr, heartbeat_s=None) as op:
            await front.stats()
            await op.stats()  # both known to the scheduler now
            assert not front.stopped
            await op.shutdown(timeout=5, token=tokens["operator"])
            with anyio.fail_after(5):
                while not (front.stopped and op.stopped):
                    await anyio.sleep(0.01)
