"""The table of prefixes being prefilled (dualpath.http.prefix_share): who waits, for whom, for how long."""

from __future__ import annotations

import anyio
import pytest

from dualpath.http.prefix_share import GRANULE, InflightPrefixes, prefix_keys

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _ids(n: int, salt: int = 0) -> list[int]:
    return [salt * 100_000 + i for i in range(n)]


def test_prefix_keys_stand_for_whole_granules() -> None:
    a, b = _ids(300), _ids(256) + [7] * 44
    ka, kb = prefix_keys(a), prefix_keys(b)
    assert len(ka) == 300 // GRANULE == 4 and len(prefix_keys(_ids(63))) == 0
    assert ka[:4] == kb[:4]  # the first 256 tokens are equal
    assert prefix_keys(_ids(256, salt=1))[0] != ka[0]
    c = _ids(200) + [9] + _ids(300)[201:]  # one token differs in the fourth granule: its key and those after
    kc = prefix_keys(c)
    assert kc[:3] == ka[:3] and kc[3] != ka[3]


async def _timed_admit(table: InflightPrefixes, ids: list[int], out: dict[str, float]) -> None:
    t0 = anyio.current_time()
    await table.admit(ids)
    out["waited"] = anyio.current_time() - t0


async def test_a_request_sharing_a_long_prefix_waits_until_the_first_is_done() -> None:
    waits: list[int] = []
    table = InflightPrefixes(min_tokens=256, max_wait_s=30.0, on_wait=lambda: waits.append(1))
    lead = table.lead(await table.admit(_ids(400)))  # nothing in flight: no wait
    assert lead is not None and waits == []
    out: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_timed_admit, table, _ids(320) + [5] * 40, out)  # shares 320 tokens (>= 256)
        await anyio.sleep(0.2)
        assert "waited" not in out  # still held back
        table.done(lead)
    assert out["waited"] >= 0.15 and waits == [1]  # held back until done() (less the waiter's start-up jitter)
    table.done(lead)  # idempotent
    assert await table.admit(_ids(400)) and waits == [1]  # its keys are gone: nothing to wait for


async def test_who_does_not_wait() -> None:
    waits: list[int] = []
    table = InflightPrefixes(min_tokens=256, max_wait_s=30.0, on_wait=lambda: waits.append(1))
    table.lead(await table.admit(_ids(400)))
    with anyio.fail_after(5):
        assert await table.admit(_ids(192) + [3] * 300)  # shares 192 tokens: below min_tokens
        assert await table.admit(_ids(400, salt=2))  # shares nothing
        assert await table.admit(_ids(200)) == []  # shorter than min_tokens: nothing to share or register
    assert waits == []
    off = InflightPrefixes(min_tokens=256, max_wait_s=0.0)
    off.lead(prefix_keys(_ids(400)))
    with anyio.fail_after(5):
        assert await off.admit(_ids(400)) == []  # disabled


async def test_requests_of_another_cache_salt_never_wait() -> None:
    """A request's cache salt starts its keys: it waits only on a request of the same salt."""
    assert prefix_keys(_ids(300), "a")[0] not in prefix_keys(_ids(300)) + prefix_keys(_ids(300), "b")
    waits: list[int] = []
    table = InflightPrefixes(min_tokens=256, max_wait_s=30.0, on_wait=lambda: waits.append(1))
    table.lead(await table.admit(_ids(400), "a"))
    with anyio.fail_after(5):
        assert await table.admit(_ids(400))
        assert await table.admit(_ids(400), "b")
    assert waits == []
    with anyio.move_on_after(0.1):  # the same salt waits (held until the lead is done)
        await table.admit(_ids(400), "a")
    assert waits == [1]


async def test_a_slow_leader_is_waited_for_at_most_max_wait_s() -> None:
    table = InflightPrefixes(min_tokens=0, max_wait_s=0.3)  # min_tokens below a granule: one granule
    assert table.min_tokens == GRANULE
    table.lead(await table.admit(_ids(128)))
    t0 = anyio.current_time()
    with anyio.fail_after(5):
        await table.admit(_ids(64) + [1] * 64)
    assert 0.3 <= anyio.current_time() - t0 < 2.0


async def test_a_later_leader_keeps_the_keys_it_adds_and_the_first_keeps_its_own() -> None:
    table = InflightPrefixes(min_tokens=128, max_wait_s=0.05)
    first = table.lead(await table.admit(_ids(256)))
    second = table.lead(await table.admit(_ids(512)))  # waited 0.05 s for `first`, then leads its longer prefix
    assert first is not None and second is not None
    assert len(first.keys) == 4 and len(second.keys) == 4  # the 4 keys beyond the first's 256 tokens
    table.done(first)
    out: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_timed_admit, table, _ids(512), out)  # its longest shared prefix is the second's
        await anyio.sleep(0.02)
        table.done(second)
    assert out["waited"] < 0.05 * 4
    assert await table.admit(_ids(512))  # both done: the table is empty
    assert not table._by_key
