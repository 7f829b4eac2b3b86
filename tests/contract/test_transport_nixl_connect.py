"""Connects to one nixl peer that overlap (an engine told of a peer twice at once, or of a restarted peer while
still connecting to its old incarnation): each ends connected to the peer's latest address, not with a
"refused our metadata: reconnected" that failed the engine's start (seen in the deployment test of an engine
killed and restarted over nixl, when the decode engine was re-registering at the same moment)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

from dualpath.transports import create_transport
from dualpath.transports.config import NixlTransportConfig

try:
    import nixl_cu12  # noqa: F401

    HAVE_NIXL = True
except ImportError:  # pragma: no cover
    HAVE_NIXL = False

pytestmark = [pytest.mark.anyio, pytest.mark.nixl, pytest.mark.skipif(not HAVE_NIXL, reason="nixl extra")]

SIZE = 4096


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _delivers(snd: Any, rcv: Any, tag: str) -> None:
    """A write from ``snd`` lands in ``rcv`` with its bytes."""
    dst = torch.zeros(SIZE, dtype=torch.uint8)
    src = torch.randint(1, 256, (SIZE,), dtype=torch.uint8)
    snd.register(src)  # (nixl writes from registered memory)
    rcv.expose(tag, rcv.register(dst), 0, SIZE)
    await snd.write("rcv", tag, src, 10.0)
    await rcv.wait(tag, 10.0)
    assert torch.equal(dst, src)


async def test_two_connects_to_the_same_address_both_wait_for_the_hello() -> None:
    cfg = NixlTransportConfig()
    async with create_transport(cfg, "snd") as a, create_transport(cfg, "rcv") as b:
        done: list[bool] = []

        async def connect() -> None:
            await a.connect("rcv", b.address)
            done.append(a._peers["rcv"].agent_name is not None)  # (returned only once the hello answered)

        async with anyio.create_task_group() as tg:
            tg.start_soon(connect)
            tg.start_soon(connect)
        assert done == [True, True]
        await _delivers(a, b, "x")


async def test_a_connect_superseded_by_the_peers_new_address_ends_connected_to_it() -> None:
    cfg = NixlTransportConfig()
    # (the same peer name at a new address: a restart)
    async with create_transport(cfg, "snd") as a, create_transport(cfg, "rcv") as old, \
            create_transport(cfg, "rcv") as new:
        errors: list[BaseException] = []

        async def connect(address: str) -> None:
            try:
                await a.connect("rcv", address, timeout=20.0)
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(connect, old.address)
            await anyio.sleep(0)  # (its hello is under way)
            tg.start_soon(connect, new.address)
        assert errors == []
        assert a._peers["rcv"].address == new.address
        await _delivers(a, new, "y")
