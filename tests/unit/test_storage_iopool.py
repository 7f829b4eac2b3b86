"""The storage I/O worker pool: every item exactly once, results in order, batches in flight together,
errors re-raised, and a cancelled caller abandons its job (stuck workers are replaced, shutdown is bounded)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from dualpath.storage.iopool import IOPool
from dualpath.storage.latewrites import LATE_WRITES


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def pool():
    p = IOPool(4, name="test-io")
    yield p
    p.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("n", [1, 3, 4, 50])
async def test_every_item_once_results_in_order(pool, n):
    seen: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            seen.append(x)
        return x * x

    assert await pool.run(fn, list(range(n))) == [x * x for x in range(n)]
    assert sorted(seen) == list(range(n))
    assert await pool.run(fn, []) == []


@pytest.mark.anyio
async def test_items_are_shared_among_workers(pool):
    """A batch is claimed by several threads at once (not run by one thread per call)."""
    names: set[str] = set()
    barrier = threading.Barrier(4, timeout=10)

    def fn(x: int) -> int:
        names.add(threading.current_thread().name)
        if x < 4:
            barrier.wait()  # only passes if four workers hold the first four items together
        return x

    assert await pool.run(fn, list(range(16))) == list(range(16))
    assert len(names) == 4


@pytest.mark.anyio
async def test_many_calls_in_flight_share_the_workers(pool):
    results: dict[int, list[int]] = {}

    async def call(c: int) -> None:
        results[c] = await pool.run(lambda x: x + 1000 * c, list(range(c, c + 20)))

    async with anyio.create_task_group() as tg:
        for c in range(12):
            tg.start_soon(call, c)
    assert results == {c: [x + 1000 * c for x in range(c, c + 20)] for c in range(12)}


@pytest.mark.anyio
async def test_error_is_raised_after_every_item_ran(pool):
    done: list[int] = []

    def fn(x: int) -> int:
        if x == 3:
            raise OSError("boom")
        time.sleep(0.001)
        done.append(x)
        return x

    with pytest.raises(OSError, match="boom"):
        await pool.run(fn, list(range(10)))
    assert sorted(done) == [x for x in range(10) if x != 3]


@pytest.mark.anyio
async def test_cancelled_caller_abandons_the_job_and_returns(pool):
    """The caller's deadline ends the call: items not yet started never start, items in flight that land within
    the grace are waited for, and no item starts after run() gave control back."""
    release = threading.Event()
    started: list[int] = []

    def fn(x: int) -> int:
        started.append(x)
        release.wait(10)
        return x

    with anyio.move_on_after(0.05) as scope:
        await pool.run(fn, list(range(40)))
    assert scope.cancelled_caught
    n_started = len(started)
    assert n_started <= 4  # one item per worker was in flight; the other 36 never started
    release.set()
    await anyio.sleep(0.1)
    assert len(started) == n_started
    assert await pool.run(lambda x: x + 1, list(range(8))) == list(range(1, 9))  # the pool still serves


@pytest.mark.anyio
async def test_stuck_workers_are_retired_and_replaced():
    """A worker stuck in an abandoned item is replaced at once; shutdown() does not wait for it forever."""
    p = IOPool(2, name="stuck-io", grace_s=0.01)
    hang = threading.Event()
    try:
        with anyio.move_on_after(0.05):
            await p.run(lambda x: int(hang.wait(30)), [0, 1])  # both workers stuck
        assert p.retired_workers == 2
        serving = p.threads
        assert len(serving) == 2 and all(t.is_alive() for t in serving)
        assert await p.run(lambda x: x * 2, list(range(6))) == [0, 2, 4, 6, 8, 10]
    finally:
        p.shutdown(timeout=1.0)  # returns although the two retired workers still wait
        hang.set()
    assert not any(t.is_alive() for t in serving)


@pytest.mark.anyio
async def test_the_destination_of_a_stuck_item_is_held_until_it_returns():
    """While a retired worker may still write, the job's destination range is held in ``LATE_WRITES`` (what the
    host buffers consult before reusing memory); a range nobody writes late is never held."""
    p = IOPool(2, name="late-io", grace_s=0.01)
    hang = threading.Event()
    done = threading.Event()

    def stuck(x: int) -> int:
        hang.wait(30)
        done.set()
        return x

    try:
        with anyio.move_on_after(0.05):
            await p.run(lambda x: x, [0, 1], dest=(1 << 40, 4096))  # finishes: nothing held
        assert not LATE_WRITES.busy(1 << 40, 4096)
        with anyio.move_on_after(0.05):
            await p.run(stuck, [0], dest=(1 << 41, 4096))
        assert p.retired_workers == 1
        assert LATE_WRITES.busy((1 << 41) + 4095, 1) and not LATE_WRITES.busy((1 << 41) + 4096, 100)
        hang.set()
        assert done.wait(5)
        with anyio.fail_after(5):
            while LATE_WRITES.busy(1 << 41, 4096):
                await anyio.sleep(0.01)
    finally:
        hang.set()
        p.shutdown(timeout=1.0)


def test_shutdown_joins_and_refuses_new_work():
    p = IOPool(2)
    threads = p.threads
    p.shutdown()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="shut down"):
        p.submit(lambda x: x, [1], lambda: None)
    with pytest.raises(ValueError):
        IOPool(0)
