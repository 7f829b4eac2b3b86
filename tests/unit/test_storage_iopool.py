"""The storage I/O worker pool: every item exactly once, results in order, batches in flight together,
errors re-raised, and a cancelled caller still waits for the workers (they write into its buffers)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from dualpath.storage.iopool import IOPool


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
async def test_cancelled_caller_waits_for_the_workers(pool):
    release = threading.Event()
    done: list[int] = []

    def fn(x: int) -> int:
        release.wait(10)
        done.append(x)
        return x

    async def let_go() -> None:
        await anyio.sleep(0.05)
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(let_go)
        with anyio.move_on_after(0.01) as scope:
            await pool.run(fn, list(range(8)))
    assert scope.cancelled_caught or scope.cancel_called
    assert sorted(done) == list(range(8))  # nothing still writing after run() gave control back


def test_shutdown_joins_and_refuses_new_work():
    p = IOPool(2)
    threads = list(p._threads)
    p.shutdown()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="shut down"):
        p.submit(lambda x: x, [1], lambda: None)
    with pytest.raises(ValueError):
        IOPool(0)
