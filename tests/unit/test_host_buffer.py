"""The engines' host buffer (dualpath.engine.host_buffer): regions never overlap, frees are checked, waits end."""

from __future__ import annotations

import random

import anyio
import pytest
import torch

from dualpath.engine.host_buffer import HostBuffer
from dualpath.errors import CapacityError, EngineError, PeerTimeout

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("capacity", [100, 1000, 3207])
async def test_a_request_of_the_whole_capacity_fits_whatever_the_alignment(capacity: int) -> None:
    """Regions are rounded up to 64 bytes; a capacity that is not a multiple of 64 used to leave a request of
    nearly all of it (e.g. 988 of 1,000 bytes: 1,024 rounded) waiting for its whole deadline in an empty buffer."""
    hb = HostBuffer(capacity)
    for n in (capacity, capacity - 1, capacity - 12):
        with anyio.fail_after(1):
            region = await hb.alloc(n, 0.5)
        assert region.data.numel() == n
        hb.free(region)
    assert hb.used_bytes == 0
    with pytest.raises(CapacityError, match="buffer holds"):
        await hb.alloc(hb.capacity + 1, 0.5)  # can never fit: at once, not at the deadline (and never retried)


async def test_a_region_freed_twice_or_from_elsewhere_is_refused() -> None:
    hb = HostBuffer(4096)
    a = await hb.alloc(1000, 1.0)
    other = await HostBuffer(4096).alloc(1000, 1.0)
    hb.free(a)
    with pytest.raises(EngineError, match="freed already"):
        hb.free(a)  # taken back twice, the next two allocations would share these bytes
    b = await hb.alloc(1000, 1.0)
    c = await hb.alloc(1000, 1.0)
    assert b.offset + b.nbytes <= c.offset or c.offset + c.nbytes <= b.offset
    shifted = type(other)(other.offset + 64, other.nbytes, other.data)
    with pytest.raises(EngineError, match="not one this buffer handed out"):
        hb.free(shifted)
    assert hb.used_bytes == b.nbytes + c.nbytes


@pytest.mark.parametrize("seed", range(3))
async def test_random_allocations_never_overlap_and_are_counted(seed: int) -> None:
    """A model check: live regions are disjoint, inside the arena, hold what was written into them, and the used
    bytes are their sum; a request that fits the free space never waits."""
    rng = random.Random(seed)
    hb = HostBuffer(rng.choice([1000, 4096, 64 * 50 + 7]))
    live: dict[int, tuple[object, int]] = {}
    for step in range(300):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            region, fill = live.pop(key)
            assert bool((region.data == fill).all()), (seed, step)  # nobody else wrote into it
            hb.free(region)
        else:
            n = rng.randint(1, hb.capacity // 3)
            fits = any(size >= -(-n // 64) * 64 for _, size in hb._free)
            try:
                region = await hb.alloc(n, 0.01)
            except PeerTimeout:
                assert not fits, (seed, step)
                continue
            assert region.offset >= 0 and region.offset + region.nbytes <= hb.capacity
            for other, _ in live.values():
                assert region.offset + region.nbytes <= other.offset or other.offset + other.nbytes <= region.offset
            fill = step % 251
            region.data.fill_(fill)
            live[step] = (region, fill)
        assert hb.used_bytes == sum(r.nbytes for r, _ in live.values())
    for region, _ in live.values():
        hb.free(region)
    assert hb.used_bytes == 0 and hb._free == [(0, hb.capacity)]


async def test_a_waiting_allocation_gets_the_space_a_free_makes_and_times_out_otherwise() -> None:
    hb = HostBuffer(1024)
    a = await hb.alloc(1024, 1.0)
    with pytest.raises(PeerTimeout):
        await hb.alloc(512, 0.05)
    got = []

    async def waiter() -> None:
        got.append(await hb.alloc(512, 5.0))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.02)
        assert not got
        hb.free(a)
    assert got and got[0].data.numel() == 512
    assert torch.equal(got[0].data, hb.data[got[0].offset : got[0].offset + 512])
