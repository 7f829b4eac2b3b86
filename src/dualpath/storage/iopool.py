"""A fixed pool of I/O worker threads that share each batch of blocks dynamically.

Why not ``anyio.to_thread`` or ``ThreadPoolExecutor``: at page-cache speed a Full Block takes tens of
microseconds, so a thread hop per block (or a static split of a batch into per-thread chunks, whose slowest
chunk decides) costs a large share of a read. Here a batch is one :class:`Job`: it is offered to up to
``n_threads`` idle workers, each of which claims the next unclaimed block (an atomic counter) until none is
left, so the workers finish together; the worker that completes the last block wakes the waiting task once
(one ``call_soon_threadsafe`` under asyncio). Many batches may be in flight at once: they share the workers
in FIFO order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")


class Job(Generic[T]):
    """``fn`` applied to every item, by whichever workers take the job; results in item order."""

    __slots__ = ("fn", "items", "results", "n", "_claim", "_lock", "_done", "error", "_notify")

    def __init__(self, fn: Callable[[T], int], items: Sequence[T], notify: Callable[[], None]) -> None:
        self.fn = fn
        self.items = items
        self.n = len(items)
        self.results: list[int] = [0] * self.n
        self._claim = itertools.count().__next__  # atomic under the GIL
        self._lock = threading.Lock()
        self._done = 0
        self.error: BaseException | None = None
        self._notify = notify

    def work(self) -> None:
        """Claim and run items until none is left; the call that completes the last item notifies."""
        fn, items, results, n, claim = self.fn, self.items, self.results, self.n, self._claim
        did = 0
        error: BaseException | None = None
        while True:
            j = claim()
            if j >= n:
                break
            try:
                results[j] = fn(items[j])
            except BaseException as exc:  # keep going, so the job completes; the caller re-raises
                error = exc
            did += 1
        if not did:
            return
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._done += did
            last = self._done == n
        if last:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone, nobody waits
                self._notify()


class IOPool:
    """``n_threads`` daemon worker threads fed by one queue of jobs."""

    def __init__(self, n_threads: int, name: str = "dualpath-io") -> None:
        if n_threads < 1:
            raise ValueError(f"IOPool needs at least one thread, got {n_threads}")
        self.n_threads = n_threads
        self._queue: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True) for i in range(n_threads)
        ]
        for t in self._threads:
            t.start()
        self._closed = False

    def _worker(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is None:
                return
            job.work()

    def submit(self, fn: Callable[[T], int], items: Sequence[T], notify: Callable[[], None]) -> Job[T]:
        """Start ``fn`` over ``items`` (non-empty); ``notify`` is called from a worker once all are done."""
        if self._closed:
            raise RuntimeError("IOPool is shut down")
        job = Job(fn, items, notify)
        put = self._queue.put
        for _ in range(min(job.n, self.n_threads)):
            put(job)
        return job

    async def run(self, fn: Callable[[T], int], items: Sequence[T]) -> list[int]:
        """Run ``fn`` over ``items`` in the workers and return the results in order.

        The wait is shielded from cancellation: workers may write into caller-owned buffers, so this never
        returns before every item is done. An exception raised by ``fn`` is re-raised here (after all items).
        """
        if not items:
            return []
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait for a threading.Event in one thread hop
            loop = None
        if loop is not None:
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                loop.call_soon_threadsafe(_resolve, fut)

            job = self.submit(fn, items, wake)
            cancelled = False
            with anyio.CancelScope(shield=True):
                while not fut.done():
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:  # a native task.cancel(): finish waiting, then re-raise
                        cancelled = True
            if cancelled:
                raise asyncio.CancelledError
        else:
            event = threading.Event()
            job = self.submit(fn, items, event.set)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(event.wait)
        if job.error is not None:
            raise job.error
        return job.results

    def shutdown(self) -> None:
        """Finish the queued jobs, then stop and join the workers."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
