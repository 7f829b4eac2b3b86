"""The emulated link, exactly, on a virtual clock (no wall-clock timing in tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from dualpath.traffic import FluidLink, Link, TrafficManager, VirtualClock
from dualpath.types import TrafficClass

pytestmark = pytest.mark.anyio
HI, KV = TrafficClass.HIGH, TrafficClass.KV
MB = 1_000_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def run_virtual(clock: VirtualClock, body: Callable[[], Awaitable[Any]]) -> Any:
    out: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        out.append(await body())
        tg.cancel_scope.cancel()
    return out[0]


async def finish_times(link: Link, clock: VirtualClock, flows: list[tuple[str, int, TrafficClass, float]]) -> dict[str, float]:
    """Start each (name, nbytes, class, start time) flow; return its completion time."""
    done: dict[str, float] = {}

    async def one(name: str, n: int, cls: TrafficClass, at: float) -> None:
        if at > clock.now():
            await clock.sleep(at - clock.now())
        await link.transfer(n, cls)
        done[name] = clock.now()

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            for f in flows:
                tg.start_soon(one, *f)

    await run_virtual(clock, body)
    return done


async def test_processor_sharing_completion_times() -> None:
    clock = VirtualClock()
    link = Link("l", 100 * MB, clock=clock)
    done = await finish_times(link, clock, [(f"f{i}", 10 * MB * (i + 1), KV, 0.0) for i in range(4)])
    # 4 flows share 100 MB/s: the 10 MB one ends at 0.4 s, then 3 share: +0.3, then 2: +0.2, then +0.1
    assert done == pytest.approx({"f0": 0.4, "f1": 0.7, "f2": 0.9, "f3": 1.0})
    assert link.stats.bytes["kv"] == 100 * MB
    assert link.busy_time == pytest.approx(1.0)


async def test_fairness_equal_flows_finish_together_and_late_joiner() -> None:
    clock = VirtualClock()
    link = Link("l", 100 * MB, clock=clock)
    done = await finish_times(link, clock, [("a", 50 * MB, KV, 0.0), ("b", 50 * MB, KV, 0.0), ("c", 10 * MB, KV, 0.5)])
    # a, b at 50 MB/s until 0.5 s (25 MB left each), then 3 flows at 33.3: c ends at 0.8 (a, b 15 MB left),
    # then a and b at 50 MB/s: 0.3 s more
    assert done["c"] == pytest.approx(0.8)
    assert done["a"] == pytest.approx(1.1) and done["b"] == pytest.approx(1.1)


async def test_high_class_is_not_slowed_by_saturating_kv_load() -> None:
    clock = VirtualClock()
    link = Link("l", 100 * MB, kv_share=0.01, clock=clock)
    idle = await finish_times(link, clock, [("hi", 10 * MB, HI, 0.0)])
    clock2 = VirtualClock()
    link2 = Link("l", 100 * MB, kv_share=0.01, clock=clock2)
    flows = [(f"kv{i}", 200 * MB, KV, 0.0) for i in range(8)] + [("hi", 10 * MB, HI, 0.5)]
    busy = await finish_times(link2, clock2, flows)
    lat_idle, lat_busy = idle["hi"], busy["hi"] - 0.5
    assert lat_busy == pytest.approx(lat_idle / 0.99)  # within 1.02x: the 1% KV guarantee
    assert lat_busy <= lat_idle * 1.10
    # KV got exactly its 1% while high was active, and everything otherwise: all bytes delivered
    total = 8 * 200 * MB + 10 * MB
    assert max(busy.values()) == pytest.approx(total / (100 * MB))


async def test_kv_alone_uses_the_whole_link_and_high_alone_too() -> None:
    for cls in (HI, KV):
        clock = VirtualClock()
        link = Link("l", 100 * MB, clock=clock)
        done = await finish_times(link, clock, [("x", 30 * MB, cls, 0.0)])
        assert done["x"] == pytest.approx(0.3)


async def test_hundred_concurrent_flows_and_many_small_transfers_are_exact() -> None:
    clock = VirtualClock()
    link = Link("l", 200 * MB, clock=clock)
    done = await finish_times(link, clock, [(f"f{i}", MB, KV, 0.0) for i in range(100)])
    assert max(done.values()) == pytest.approx(0.5)
    assert min(done.values()) == pytest.approx(0.5)

    async def small() -> float:
        t0 = clock.now()
        for _ in range(500):
            await link.transfer(10_000, KV)
        return clock.now() - t0

    elapsed = await run_virtual(clock, small)
    assert elapsed == pytest.approx(500 * 10_000 / (200 * MB))


async def test_unlimited_link_returns_at_once_and_counts() -> None:
    clock = VirtualClock()
    link = Link("l", None, clock=clock)

    async def body() -> None:
        await link.transfer(5 * MB, HI)
        await link.transfer(7 * MB, KV, tokens=3)

    await run_virtual(clock, body)
    assert clock.now() == 0.0
    assert link.stats.bytes == {"high": 5 * MB, "kv": 7 * MB}
    assert link.stats.transfers == {"high": 1, "kv": 1}
    assert sum(h + k for _, h, k in link.timeline()) == 12 * MB


async def test_queue_counters_timeline_and_cancellation() -> None:
    clock = VirtualClock()
    link = Link("l", 100 * MB, clock=clock, bucket_s=0.1)
    seen: list[tuple[int, int]] = []

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: link.transfer(50 * MB, KV, tokens=640))
            async with anyio.create_task_group() as inner:
                inner.start_soon(lambda: link.transfer(100 * MB, KV, tokens=1280))
                await clock.sleep(0.2)
                seen.append((link.queued_bytes, link.queued_tokens))
                inner.cancel_scope.cancel()  # the 100 MB transfer is aborted after 10 MB
        seen.append((link.queued_bytes, link.queued_tokens))

    await run_virtual(clock, body)
    assert seen == [(150 * MB, 1920), (0, 0)]
    # 0.2 s with both (50 MB/s each), then the 50 MB flow alone: 40 MB left at 100 MB/s -> ends at 0.6 s
    assert clock.now() == pytest.approx(0.6)
    tl = link.timeline()
    assert sum(k for _, _, k in tl) == pytest.approx(60 * MB)  # carried bytes, the aborted flow's 10 MB included
    assert all(k <= 100 * MB * 0.1 * (1 + 1e-9) for _, _, k in tl)
    assert link.stats.bytes["kv"] == 50 * MB  # completed transfers
    assert link.utilisation() == pytest.approx(1.0)


def test_fluid_model_is_usable_without_async() -> None:
    m = FluidLink(100.0, 0.01)
    m.add(1, 99, HI, 0.0)
    m.add(2, 100, KV, 0.0)
    assert m.next_completion() == pytest.approx(1.0)
    assert m.advance(1.0) == [1]
    # KV got 1 byte during that second, 99 left at full rate
    assert m.next_completion() == pytest.approx(1.99)
    assert m.advance(5.0) == [2]
    with pytest.raises(ValueError, match="bandwidth"):
        FluidLink(0.0)


async def test_traffic_manager_charges_the_right_links() -> None:
    clock = VirtualClock()
    snic = Link("node0.snic", 100 * MB, clock=clock)
    a = TrafficManager("pe0", snic, Link("pe0.in", 200 * MB, clock=clock), Link("pe0.out", 200 * MB, clock=clock))
    b = TrafficManager("pe1", snic, Link("pe1.in", 50 * MB, clock=clock), Link("pe1.out", None, clock=clock))
    probes: list[Any] = []

    async def body() -> None:
        async def real_io() -> str:
            await clock.sleep(0.1)
            return "data"

        async def probe() -> None:
            await clock.sleep(0.05)
            probes.append((a.read_queue(), b.read_queue()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            # the emulated transfer (0.5 s) outlasts the real I/O (0.1 s): done at 0.5, result of the I/O
            assert await a.storage_read(50 * MB, 1024, real_io()) == "data"
        probes.append(clock.now())
        t0 = clock.now()
        await a.send(b, 10 * MB)  # pe0 out at 200, pe1 in at 50: the slower one sets the time
        probes.append(clock.now() - t0)
        t0 = clock.now()
        await a.h2d(20 * MB)
        await a.d2h(20 * MB, cls=HI)
        probes.append(clock.now() - t0)

        async def failing_io() -> None:
            await clock.sleep(0.01)
            raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            await b.storage_read(MB, 16, failing_io())
        probes.append(b.read_queue())

    await run_virtual(clock, body)
    assert probes[0] == ((50 * MB, 1024), (50 * MB, 1024))  # the node's queue, seen by both engines
    assert probes[1] == pytest.approx(0.5)
    assert probes[2] == pytest.approx(0.2)
    assert probes[3] == pytest.approx(0.2)
    assert probes[4] == (0, 0)
    c = a.counters()
    assert c["snic_in"]["bytes"]["kv"] == 50 * MB
    assert c["cnic_out"]["bytes"] == {"high": 20 * MB, "kv": 10 * MB}
    assert c["cnic_in"]["bytes"]["kv"] == 20 * MB
    assert b.counters()["cnic_in"]["bytes"]["kv"] == 10 * MB


def test_fluid_link_drains_at_large_clock_values():
    # Regression: at t ~ 1e3-1e6 s a remaining step below one float ulp of t never advanced t, and the link
    # looped forever. Every flow must complete within a bounded number of completion steps.
    from dualpath.traffic.link import FluidLink

    for t0 in (1700.0, 1e6):
        m = FluidLink(50e9, t0=t0)
        for fid, size in enumerate((1 << 20, (1 << 20) + 3, 3 << 20, 7)):
            m.add(fid, size, TrafficClass.KV, t0)
        finished: list[int] = []
        for _ in range(50):
            nxt = m.next_completion()
            if nxt is None:
                break
            finished += m.advance(nxt)
        assert sorted(finished) == [0, 1, 2, 3]
        assert m.active() == 0
