"""The pipelined paths of the transports: many writes in flight to distinct tags, acknowledgements (zmq) and
grants (nixl) batched and matched to the right writes under reordering and rejection, reused NIXL descriptor
lists, cached landing views and lazily made landing events."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch

from dualpath.errors import TransportError
from dualpath.transports import Region, Transport, create_transport
from dualpath.transports.config import LoopbackTransportConfig, NixlTransportConfig, ZmqTransportConfig
from dualpath.transports.landing import Done
from dualpath.transports.loopback import LoopbackFabric

pytestmark = pytest.mark.anyio

try:
    import nixl_cu12  # noqa: F401

    HAVE_NIXL = True
except ImportError:  # pragma: no cover
    HAVE_NIXL = False


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(kind: str) -> Any:
    if kind == "loopback":
        return LoopbackTransportConfig(pending_timeout_s=5.0)
    if kind == "zmq":
        return ZmqTransportConfig(pending_timeout_s=5.0)
    return NixlTransportConfig(pending_timeout_s=5.0)


KINDS = ["loopback", "zmq", pytest.param("nixl", marks=[pytest.mark.nixl, pytest.mark.skipif(
    not HAVE_NIXL, reason="nixl extra not installed")])]


@pytest.fixture(params=KINDS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Transport, Transport]]:
    fabric = LoopbackFabric()
    cfg = _config(request.param)
    async with create_transport(cfg, "snd", fabric=fabric) as a, create_transport(cfg, "rcv", fabric=fabric) as b:
        await a.connect("rcv", b.address)
        yield a, b


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


async def test_window_of_writes_lands_every_tag_under_reordering_and_one_rejection(
        pair: tuple[Transport, Transport]) -> None:
    """48 writes in flight at once; the receiver exposes their tags in a shuffled order while they arrive, and
    one tag with the wrong size: exactly that write fails, every other returns and its bytes are in its slot."""
    a, b = pair
    n, size, bad = 48, 16 << 10, 17
    dst = torch.zeros(n * size, dtype=torch.uint8)
    region = b.register(dst)
    src = _pattern(n * size, 1)
    a.register(src)
    outcome: dict[int, BaseException | None] = {}

    async def write(i: int) -> None:
        try:
            await a.write("rcv", f"w{i}", src[i * size:(i + 1) * size], 10.0)
            outcome[i] = None
        except TransportError as exc:
            outcome[i] = exc

    order = list(range(n))
    random.Random(7).shuffle(order)
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(write, i)
        for k, i in enumerate(order):
            b.expose(f"w{i}", region, i * size, size - 1 if i == bad else size)
            if k % 8 == 0:
                await anyio.sleep(0.01)  # let a batch arrive before the next exposes
    for i in range(n):
        if i == bad:
            with pytest.raises(TransportError, match="size mismatch"):
                await b.wait(f"w{i}", 5.0)
        else:
            await b.wait(f"w{i}", 5.0)
    failed = sorted(i for i, exc in outcome.items() if exc is not None)
    assert len(outcome) == n and failed == [bad], outcome
    assert "size mismatch" in str(outcome[bad])
    for i in range(n):
        part = dst[i * size:(i + 1) * size]
        if i == bad:
            assert torch.count_nonzero(part) == 0  # nothing written
        else:
            assert torch.equal(part, src[i * size:(i + 1) * size]), i


async def test_repeated_landings_reuse_slots_and_stay_exact(pair: tuple[Transport, Transport]) -> None:
    """The same few landing slots written over and over (cached views, reused NIXL descriptor lists) always
    hold the latest write's bytes."""
    a, b = pair
    size, slots = 8 << 10, 3
    dst = torch.zeros(slots * size, dtype=torch.uint8)
    region = b.register(dst)
    src = torch.zeros(size, dtype=torch.uint8)
    a.register(src)
    for r in range(12):
        j = r % slots
        src.copy_(_pattern(size, 100 + r))
        b.expose("t", region, j * size, size)
        await a.write("rcv", "t", src, 5.0)
        await b.wait("t", 5.0)
        assert torch.equal(dst[j * size:(j + 1) * size], src), r
    if a.kind == "nixl":
        local = a._local_dl  # type: ignore[attr-defined]
        remote = a._peers["rcv"].remote_dl  # type: ignore[attr-defined]
        assert len(local.lists) == 1 and len(remote.lists) == slots  # prepared once, reused


async def test_region_view_cache_checks_bounds() -> None:
    region = Region(torch.arange(64, dtype=torch.uint8), "x")
    v = region.view(8, 16)
    assert region.view(8, 16) is v and torch.equal(v, torch.arange(8, 24, dtype=torch.uint8))
    with pytest.raises(TransportError, match="does not fit"):
        region.view(60, 16)
    with pytest.raises(TransportError, match="does not fit"):
        region.view(-1, 4)


async def test_done_flag_wakes_a_waiter_set_before_or_after() -> None:
    d = Done()
    d.set()
    with anyio.fail_after(1):
        await d.wait()
    d2 = Done()
    woke: list[bool] = []

    async def waiter() -> None:
        await d2.wait()
        woke.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        assert not woke and not d2.is_set()
        d2.set()
    assert woke == [True] and d2.is_set()
