"""The loopback transport's fused fast path (expose -> write -> wait without suspending) keeps every guarantee of
the transport contract: exactly once, exact size, nothing lands after cancel or timeout, close wakes a held write.
Each test checks the bytes against an independent reference (the source pattern, or zeros where nothing may
land)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import anyio
import pytest
import torch

from dualpath.errors import PeerTimeout, TransportClosed, TransportError
from dualpath.transports import Transport, create_transport
from dualpath.transports.config import LoopbackTransportConfig
from dualpath.transports.loopback import LoopbackFabric, LoopbackTransport

pytestmark = pytest.mark.anyio
PENDING = 0.3  # pending_timeout_s: how long a write to a tag that is not exposed is held


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _pair(**kw: Any) -> tuple[Transport, Transport]:
    fabric = LoopbackFabric()
    cfg = LoopbackTransportConfig(**{"pending_timeout_s": PENDING, **kw})
    a, b = create_transport(cfg, "snd", fabric=fabric), create_transport(cfg, "rcv", fabric=fabric)
    await a.start()
    await b.start()
    await a.connect("rcv", b.address)
    return a, b


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Transport, Transport]]:
    a, b = await _pair()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def pattern(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=g)  # no zero byte: "nothing landed" is visible


def run_without_suspending(coro: Coroutine[Any, Any, None]) -> None:
    """Drive ``coro`` one step; it must finish in that step (it never suspended)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("the coroutine suspended")


async def test_exposed_cycle_completes_without_suspending(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    n = 64 << 10
    dst = torch.zeros(4 * n, dtype=torch.uint8)
    region = b.register(dst)
    src = pattern(4 * n, 1)
    for i in range(8):  # the same tag again and again, rotating over 4 slots, as the bench and an engine do
        j = i % 4
        b.expose("t", region, j * n, n)
        run_without_suspending(a.write("rcv", "t", src[j * n:(j + 1) * n], 5.0))
        run_without_suspending(b.wait("t", 5.0))
    assert torch.equal(dst, src)
    assert b.stats.arrivals == 8 and b.stats.bytes_received == 8 * n
    assert a.stats.writes == 8 and a.stats.bytes_sent == 8 * n
    # a non-byte source takes the same path: its raw bytes land
    f = torch.linspace(-1, 1, n // 4, dtype=torch.float32)
    b.expose("f", region, 0, n)
    run_without_suspending(a.write("rcv", "f", f, 5.0))
    await b.wait("f", 5.0)
    assert torch.equal(dst[:n].view(torch.float32), f)


@pytest.mark.parametrize("n", [1, 4095, 1 << 20, (1 << 20) + 64])
async def test_fused_copies_either_side_of_the_memmove_limit_land_exactly(n: int) -> None:
    """Small host copies are one memmove, larger ones torch's copy_: either way exactly the slot's bytes change,
    from a slice at an odd offset of a larger source (its own address, not its base's)."""
    a, b = await _pair(inline_copy_bytes=4 << 20)
    try:
        dst = torch.zeros(n + 200, dtype=torch.uint8)
        region = b.register(dst)
        src = pattern(n + 7, 3)
        b.expose("m", region, 100, n)
        run_without_suspending(a.write("rcv", "m", src[7:], 5.0))
        await b.wait("m", 5.0)
        assert torch.equal(dst[100 : 100 + n], src[7:])
        assert not dst[:100].any() and not dst[100 + n :].any()  # not a byte outside the slot
    finally:
        await a.close()
        await b.close()


async def test_a_source_in_a_registered_region_is_copied_by_memoryview(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small source inside one of the sender's registered host regions (a flat slice at an odd offset, or an
    engine's multi-dimensional byte view) is copied by one memoryview assignment, without ctypes' memmove; a
    source only partly inside a region, inside a region registered by another endpoint, or inside one since
    deregistered takes the memmove path. Every case lands exactly the source's bytes, and nothing else."""
    from dualpath.transports import loopback

    a, b = await _pair()
    try:
        n = 4096 + 3
        dst = torch.zeros(n + 200, dtype=torch.uint8)
        region = b.register(dst)
        big = pattern(4 * n, 11)
        src_region = a.register(big[: 2 * n])  # the sender's registered buffer is the first half of ``big``
        used: list[int] = []
        real_memmove = loopback._memmove

        def counting_memmove(d: int, s: int, k: int) -> int:
            used.append(k)
            return real_memmove(d, s, k)

        monkeypatch.setattr(loopback, "_memmove", counting_memmove)

        def land(src: torch.Tensor, tag: str) -> None:
            dst.zero_()
            b.expose(tag, region, 100, n)
            run_without_suspending(a.write("rcv", tag, src, 5.0))
            run_without_suspending(b.wait(tag, 5.0))
            assert torch.equal(dst[100 : 100 + n], src.reshape(-1))
            assert not dst[:100].any() and not dst[100 + n :].any()

        land(big[5 : 5 + n], "flat")  # inside the registered half, at an odd offset
        land(big[n - 1 : 2 * n - 1].view(n, 1), "2d")  # a 2-D byte view, ending at the region's last byte
        assert used == []  # both by memoryview
        land(big[2 * n - 10 : 3 * n - 10], "straddle")  # runs 10 bytes into the registered half only
        land(big[3 * n :], "outside")  # ``big`` past the registered half
        own = b.register(torch.zeros(n, dtype=torch.uint8))  # registered by the receiver, not the sender
        land(own.bytes.copy_(pattern(n, 12)), "theirs")
        assert used == [n, n, n]
        a.deregister(src_region)
        land(big[5 : 5 + n], "deregistered")
        assert used == [n, n, n, n]
    finally:
        await a.close()
        await b.close()


async def test_two_writes_to_one_tag_land_once(pair: tuple[Transport, Transport],
                                               caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    n = 4096
    dst = torch.zeros(n, dtype=torch.uint8)
    region = b.register(dst)
    first, second = pattern(n, 2), pattern(n, 3)
    b.expose("x", region, 0, n)
    await a.write("rcv", "x", first, 5.0)
    # landed but not yet waited: the second arrival is a duplicate, rejected before a byte is written
    with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match="duplicate"):
        await a.write("rcv", "x", second, 5.0)
    assert "duplicate" in caplog.text
    await b.wait("x", 5.0)  # the first arrival, intact
    assert torch.equal(dst, first)
    assert b.stats.arrivals == 1 and b.stats.rejected == 1
    # after the wait the tag is free: a write to it is held, then dropped when it is not exposed again
    with pytest.raises(TransportError, match="not exposed"):
        await a.write("rcv", "x", second, 5.0)
    assert torch.equal(dst, first)
    # two concurrent writes to one exposed tag: exactly one lands, the other is rejected
    b.expose("y", region, 0, n)
    results: list[BaseException | None] = []

    async def writer(src: torch.Tensor) -> None:
        try:
            await a.write("rcv", "y", src, 5.0)
            results.append(None)
        except TransportError as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer, second)
        tg.start_soon(writer, first)
    await b.wait("y", 5.0)
    assert results[0] is None and isinstance(results[1], TransportError)  # the first to run won
    assert torch.equal(dst, second)


async def test_size_mismatch_on_the_fast_path_fails_the_landing(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    dst = torch.zeros(1024, dtype=torch.uint8)
    region = b.register(dst)
    b.expose("m", region, 0, 1000)
    with pytest.raises(TransportError, match="size mismatch"):
        run_without_suspending(a.write("rcv", "m", pattern(1024, 4), 5.0))
    with pytest.raises(TransportError, match="size mismatch"):
        await b.wait("m", 5.0)
    assert torch.count_nonzero(dst) == 0


async def test_cancel_racing_a_held_write_writes_nothing(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    n = 4096
    dst = torch.zeros(n, dtype=torch.uint8)
    region = b.register(dst)
    src = pattern(n, 5)
    outcome: list[BaseException | None] = []

    async def writer() -> None:
        try:
            await a.write("rcv", "r", src, 5.0)
            outcome.append(None)
        except TransportError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        with anyio.fail_after(5):
            while not b._landings._exposed_events:  # the write is held, waiting for "r" to be exposed
                await anyio.sleep(0.001)
        b.expose("r", region, 0, n)  # wakes the held write...
        b.cancel("r")  # ...but the landing is withdrawn before it can run
    assert len(outcome) == 1 and isinstance(outcome[0], TransportError)  # dropped at the hold deadline
    assert torch.count_nonzero(dst) == 0
    # a cancelled landing's wait fails; a write after the cancel never lands either
    b.expose("s", region, 0, n)
    b.cancel("s")
    with pytest.raises(TransportError):
        await a.write("rcv", "s", src, 5.0)
    assert torch.count_nonzero(dst) == 0


async def test_cancel_of_a_claimed_threaded_copy_settles_and_spares_the_next_exposure() -> None:
    """A write above ``inline_copy_bytes`` claims its landing, then copies in a worker thread. A cancel between
    the two: the copy either never starts (the write fails) or, if already under way, completes; ``settle()``
    returns only once nothing more can land in the cancelled memory, and the tag exposed again gets nothing."""
    a, b = await _pair(inline_copy_bytes=0)  # every copy goes to a worker thread (as one involving a GPU does)
    a._host_copy_in_steps = False  # type: ignore[attr-defined]
    try:
        n = 8 << 20
        dst = torch.zeros(2 * n, dtype=torch.uint8)
        region = b.register(dst)
        src = pattern(n, 6)
        b.expose("big", region, 0, n)
        old_slot = b._landings._slots["big"]
        waiter_err: list[BaseException] = []
        write_err: list[BaseException | None] = []

        async def waiter() -> None:
            try:
                await b.wait("big", 5.0)
            except TransportError as exc:
                waiter_err.append(exc)

        async def writer() -> None:
            try:
                await a.write("rcv", "big", src, 5.0)
                write_err.append(None)
            except TransportError as exc:
                write_err.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(writer)
            with anyio.fail_after(5):
                while old_slot.state == "exposed":
                    await anyio.sleep(0)
            # claimed; the copy's completion runs on this loop, so it cannot come between this check and the cancel
            assert old_slot.state == "busy"
            b.cancel("big")
            b.expose("big", region, n, n)  # the same tag, another slot
            with anyio.fail_after(5):
                await b.settle()
            settled = dst[:n].clone()
            await anyio.sleep(0.05)
            assert torch.equal(dst[:n], settled)  # nothing lands in the cancelled memory after settle()
        assert torch.equal(dst[:n], settled)
        assert len(waiter_err) == 1 and "cancelled" in str(waiter_err[0])
        assert len(write_err) == 1
        if write_err[0] is None:  # the copy was under way: it completed
            assert torch.equal(settled, src)
        else:  # it had not started: nothing written
            assert "withdrawn" in str(write_err[0]) and torch.count_nonzero(settled) == 0
        # the tag exposed again got nothing from the cancelled write
        assert torch.count_nonzero(dst[n:]) == 0
        with pytest.raises(PeerTimeout):
            await b.wait("big", 0.05)
        assert torch.count_nonzero(dst[n:]) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_large_host_copy_runs_on_the_loop_in_steps_and_a_cancel_stops_it() -> None:
    """A host write above ``inline_copy_bytes`` is copied on the event loop a step at a time: it lands exactly,
    with no worker thread. Other tasks run between steps, so a cancel can come between two: it stops the copy,
    the write fails, not one byte lands after ``cancel`` returns (``settle()`` has nothing to wait for), and the
    tag exposed again gets nothing."""
    from dualpath.transports import loopback

    step = loopback._STEP_MIN
    n = 2 * step + (1 << 20)  # three steps
    a, b = await _pair(inline_copy_bytes=0)
    try:
        dst = torch.zeros(2 * n, dtype=torch.uint8)
        region = b.register(dst)
        src = pattern(n, 8)
        b.expose("big", region, 0, n)
        await a.write("rcv", "big", src, 5.0)
        await b.wait("big", 5.0)
        assert torch.equal(dst[:n], src)
        assert not a._copying and not b._copying  # type: ignore[attr-defined]  # no worker thread took it

        dst.zero_()
        b.expose("big", region, 0, n)
        slot = b._landings._slots["big"]  # type: ignore[attr-defined]
        errors: list[BaseException] = []

        async def writer() -> None:
            try:
                await a.write("rcv", "big", src, 5.0)
            except TransportError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            with anyio.fail_after(5):
                while slot.state == "exposed":  # claimed; its first step is copied in the same loop pass
                    await anyio.sleep(0)
            b.cancel("big")
            after_cancel = dst[:n].clone()
            b.expose("big", region, n, n)  # the same tag, the other half
            with anyio.fail_after(1):
                await b.settle()
        assert len(errors) == 1 and "withdrawn" in str(errors[0])
        assert torch.equal(dst[:n], after_cancel)  # nothing landed after the cancel
        assert torch.equal(after_cancel[:step], src[:step]) and torch.count_nonzero(after_cancel[step:]) == 0
        assert torch.count_nonzero(dst[n:]) == 0  # the new landing got nothing from the cancelled write
    finally:
        await a.close()
        await b.close()


async def test_wait_timeout_withdraws_the_landing_before_a_fast_write(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    dst = torch.zeros(256, dtype=torch.uint8)
    region = b.register(dst)
    b.expose("late", region, 0, 256)
    with pytest.raises(PeerTimeout):
        await b.wait("late", 0.01)
    with pytest.raises(TransportError, match="not exposed"):
        await a.write("rcv", "late", pattern(256, 7), 5.0)
    assert torch.count_nonzero(dst) == 0


async def test_close_wakes_held_writes_and_refuses_new_ones() -> None:
    a, b = await _pair(pending_timeout_s=30.0)
    try:
        region = b.register(torch.zeros(64, dtype=torch.uint8))
        src = pattern(64, 8)
        errors: list[BaseException] = []

        async def writer(t: Transport, tag: str) -> None:
            try:
                await t.write("rcv", tag, src, 30.0)
            except TransportError as exc:
                errors.append(exc)

        with anyio.fail_after(5):  # closing either side wakes a write held for a tag never exposed
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, a, "never")
                await anyio.sleep(0.02)
                await a.close()
            assert len(errors) == 1 and isinstance(errors[0], TransportClosed)
            with pytest.raises(TransportClosed):
                await a.write("rcv", "x", src, 1.0)
            assert isinstance(b, LoopbackTransport)
            a2 = create_transport(LoopbackTransportConfig(pending_timeout_s=30.0), "snd2", fabric=b.fabric)
            await a2.start()
            await a2.connect("rcv", b.address)
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, a2, "never")
                await anyio.sleep(0.02)
                await b.close()
            assert len(errors) == 2 and "closed" in str(errors[1])
            await a2.close()
        with pytest.raises(TransportClosed):
            b.expose("y", region, 0, 64)
    finally:
        await a.close()
        await b.close()
