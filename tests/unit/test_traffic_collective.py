"""The runtime's model-execution traffic (a forward's all-to-all) on the emulated compute NIC: HIGH ahead of KV
with the traffic manager, fair-shared without it (virtual clock, exact times)."""

from __future__ import annotations

import anyio
import pytest

from dualpath.traffic import Link, TrafficManager, VirtualClock

pytestmark = pytest.mark.anyio
MB = 1_000_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _collective_done(isolated: bool) -> tuple[float, float]:
    """A 90 MB KV send is in flight on a 100 MB/s CNIC when a 10 MB all-to-all starts (t=0 both)."""
    clock = VirtualClock()
    snic = Link("snic", None, clock=clock)
    a_in, a_out = Link("a.in", 100 * MB, clock=clock), Link("a.out", 100 * MB, clock=clock)
    b_in, b_out = Link("b.in", 100 * MB, clock=clock), Link("b.out", 100 * MB, clock=clock)
    a = TrafficManager("a", snic, a_in, a_out)
    b = TrafficManager("b", snic, b_in, b_out)
    done: dict[str, float] = {}

    async def kv() -> None:
        await a.send(b, 90 * MB)
        done["kv"] = clock.now()

    async def coll() -> None:
        await a.collective(10 * MB, isolated=isolated)
        done["coll"] = clock.now()

    async with anyio.create_task_group() as tg:
        tg.start_soon(clock.autojump)
        async with anyio.create_task_group() as work:
            work.start_soon(kv)
            work.start_soon(coll)
        tg.cancel_scope.cancel()
    return done["coll"], done["kv"]


async def test_isolated_collective_goes_first() -> None:
    coll, kv = await _collective_done(True)
    # HIGH gets 99 MB/s: 10 MB in 10/99 s; KV moved 1 % meanwhile, then the rest alone: total 1.0 s of link time
    assert coll == pytest.approx(10 / 99)
    assert kv == pytest.approx(1.0)


async def test_without_isolation_collective_shares_fairly() -> None:
    coll, kv = await _collective_done(False)
    # one class: 50/50 until the 10 MB collective ends at 0.2 s; the KV send still ends at 1.0 s
    assert coll == pytest.approx(0.2)
    assert kv == pytest.approx(1.0)
