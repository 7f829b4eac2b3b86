"""The nixl transport's threads (issue 16): the receiver's notification pump (started on start, parked while no
grant is outstanding, polling while one is, stopped and joined on close, never left behind) and NIXL's own
progress thread created with a non-zero delay (it waits for UCX events instead of spinning a core)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch
from pydantic import ValidationError

from dualpath.transports import create_transport
from dualpath.transports.config import NixlTransportConfig

try:
    import nixl_cu12

    HAVE_NIXL = True
except ImportError:  # pragma: no cover
    HAVE_NIXL = False

pytestmark = [pytest.mark.anyio, pytest.mark.nixl, pytest.mark.skipif(not HAVE_NIXL, reason="nixl extra")]

SIZE = 64 << 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _pumps() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nixl-notifs-")]


def _thread_cpu(t: threading.Thread) -> float:
    assert t.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Any, Any]]:
    cfg = NixlTransportConfig(notif_thread=True)
    async with create_transport(cfg, "snd") as a, create_transport(cfg, "rcv") as b:
        await a.connect("rcv", b.address)
        yield a, b


async def _until(cond: Any, deadline: float = 5.0) -> None:
    with anyio.fail_after(deadline):
        while not cond():
            await anyio.sleep(0.005)


async def test_pump_parked_while_idle_polls_while_granted_and_parks_again(pair: tuple[Any, Any]) -> None:
    a, b = pair
    pump = b._pump
    assert pump is not None and pump.thread.is_alive() and pump.thread.daemon
    # idle: parked on its event, no NIXL call and (almost) no CPU
    polls, cpu = pump.polls, _thread_cpu(pump.thread)
    await anyio.sleep(0.5)
    assert pump.polls == polls
    assert _thread_cpu(pump.thread) - cpu < 0.05
    dst = torch.zeros(2 * SIZE, dtype=torch.uint8)
    region = b.register(dst)
    src = torch.randint(1, 256, (2 * SIZE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    a.register(src)
    b.expose("r1/kv/l0", region, 0, SIZE)
    b.expose("r1/kv/l1", region, SIZE, SIZE)
    await a.write("rcv", "r1/kv/l0", src[:SIZE], 5.0)  # grants the whole group: l1 stays granted, unwritten
    await b.wait("r1/kv/l0", 5.0)
    assert b._granted  # l1: a grant outstanding, so the pump polls
    polls = pump.polls
    await _until(lambda: pump.polls > polls + 10)
    await a.write("rcv", "r1/kv/l1", src[SIZE:], 5.0)
    await b.wait("r1/kv/l1", 5.0)  # delivered by the pump (the event loop polls no notification)
    assert torch.equal(dst, src)
    assert not b._granted
    await _until(lambda: not pump._active.is_set())  # nothing outstanding: parked again
    await anyio.sleep(0.01)
    polls = pump.polls
    await anyio.sleep(0.2)
    assert pump.polls == polls


async def test_pump_stops_on_close_and_leaves_no_thread() -> None:
    before = set(_pumps())
    t = create_transport(NixlTransportConfig(notif_thread=True), "solo")
    await t.start()
    pump = t._pump  # type: ignore[attr-defined]
    assert pump is not None and pump.thread.is_alive()
    assert set(_pumps()) - before == {pump.thread}
    t0 = time.monotonic()
    await t.close()
    assert time.monotonic() - t0 < 2.5  # bounded: joined with a deadline
    assert not pump.thread.is_alive()
    assert set(_pumps()) == before


async def test_without_the_pump_the_event_loop_delivers() -> None:
    cfg = NixlTransportConfig()  # the default: notifications polled on the event loop
    async with create_transport(cfg, "snd2") as a, create_transport(cfg, "rcv2") as b:
        assert getattr(b, "_pump") is None  # noqa: B009
        assert not [t for t in _pumps() if t.name.endswith(("snd2", "rcv2"))]
        await a.connect("rcv2", b.address)
        dst = torch.zeros(SIZE, dtype=torch.uint8)
        region = b.register(dst)
        src = torch.randint(1, 256, (SIZE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
        a.register(src)
        b.expose("r2/kv/l0", region, 0, SIZE)
        await a.write("rcv2", "r2/kv/l0", src, 5.0)
        await b.wait("r2/kv/l0", 5.0)
        assert torch.equal(dst, src)


async def test_nixl_progress_thread_waits_instead_of_spinning() -> None:
    """With ``progress_thread`` the agent's UCX progress thread gets ``progress_thread_delay_us``: idle, the process
    uses a small fraction of a core (with the wrapper's delay 0 it spins one: ~0.5 s of CPU per 0.5 s); the
    wrapper's constructor is left as it was; a write still lands."""
    from nixl_cu12 import _api

    make = _api.nixlBind.nixlAgent
    cfg = NixlTransportConfig(progress_thread=True, notif_thread=True)
    async with create_transport(cfg, "psnd") as a, create_transport(cfg, "prcv") as b:
        assert _api.nixlBind.nixlAgent is make
        await a.connect("prcv", b.address)
        dst = torch.zeros(SIZE, dtype=torch.uint8)
        region = b.register(dst)
        src = torch.randint(1, 256, (SIZE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
        a.register(src)
        b.expose("r3/kv/l0", region, 0, SIZE)
        await a.write("prcv", "r3/kv/l0", src, 5.0)
        await b.wait("r3/kv/l0", 5.0)
        assert torch.equal(dst, src)
        await anyio.sleep(0.1)
        cpu = time.process_time()
        await anyio.sleep(0.5)
        assert time.process_time() - cpu < 0.25  # two agents' progress threads, idle


def test_progress_thread_delay_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="progress_thread_delay_us"):
        NixlTransportConfig(progress_thread=True, progress_thread_delay_us=0)
    with pytest.raises(ValidationError, match="notif_poll_s"):
        NixlTransportConfig(notif_poll_s=0)
    assert nixl_cu12 is not None
