"""A pool of I/O worker threads that share each batch of blocks dynamically, and never hold a caller past its
deadline.

Why not ``anyio.to_thread`` or ``ThreadPoolExecutor``: at page-cache speed a Full Block takes tens of
microseconds, so a thread hop per block (or a static split of a batch into per-thread chunks, whose slowest
chunk decides) costs a large share of a read. Here a batch is one :class:`Job`: it is offered to up to
``n_threads`` idle workers, each of which claims the next unclaimed block (an atomic counter) until none is
left, so the workers finish together; the worker that completes the last block wakes the waiting task once
(one ``call_soon_threadsafe`` under asyncio). Many batches may be in flight at once: they share the workers
in FIFO order.

Deadlines. A caller that is cancelled (its deadline fired: ``anyio.move_on_after``/``fail_after`` around the
call) **abandons** its job: no further item of it starts, items already inside a system call get a short
grace (``grace_s``, by default 50 ms: page-cache I/O lands in microseconds) and then the caller gets control
back, with the cancellation. A worker still inside an item after the grace (a hung network mount, a device
that never answers) is **retired**: a fresh worker replaces it at once, so the pool keeps ``n_threads``
usable workers, and the retired thread exits when (if ever) its system call returns. Its result is dropped
(counted in :attr:`IOPool.late_items`). :meth:`IOPool.shutdown` waits for the workers at most ``timeout``
seconds; the threads are daemons, so a stuck one never holds the process.

The caller's buffers stay referenced by the job (so a retired worker never writes into freed memory). What a
retired worker's system call may still write into the caller's buffer after the caller moved on is the one
thing no user-space code can stop; callers treat every block of an abandoned read as FAILED (unspecified
content), and the storage contract says so (:mod:`dualpath.storage.base`). A caller that reads into a region of
reusable memory (a host buffer carved into regions) passes its address range as ``dest``: while a retired
worker is still inside an item, that range is held in :data:`~dualpath.storage.latewrites.LATE_WRITES`, and the
allocator keeps it out of reuse until the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import anyio

from dualpath.storage.latewrites import LATE_WRITES

T = TypeVar("T")
log = logging.getLogger("dualpath.storage")

#: how long an abandoned job's items already inside a system call may still finish before the caller moves on
GRACE_S = 0.05


class Job(Generic[T]):
    """``fn`` applied to every item, by whichever workers take the job; results in item order."""

    __slots__ = ("fn", "items", "results", "n", "_claim", "_lock", "_done", "error", "_notify", "abandoned",
                 "running")

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
        self.abandoned = False
        self.running: dict[threading.Thread, int] = {}  # worker -> the item it is inside of

    def work(self) -> None:
        """Claim and run items until none is left (or the job is abandoned); the call that completes the
        last item notifies."""
        fn, items, results, n, claim = self.fn, self.items, self.results, self.n, self._claim
        me = threading.current_thread()
        did = 0
        error: BaseException | None = None
        running = self.running
        while True:
            running[me] = -1  # announced before the abandoned check: abandon() sees us or we see it (GIL)
            if self.abandoned:
                break
            j = claim()
            if j >= n:
                break
            running[me] = j
            try:
                results[j] = fn(items[j])
            except BaseException as exc:  # keep going, so the job completes; the caller re-raises
                error = exc
            did += 1
        running.pop(me, None)
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
    """``n_threads`` daemon worker threads fed by one queue of jobs (see the module docstring)."""

    def __init__(self, n_threads: int, name: str = "dualpath-io", grace_s: float = GRACE_S) -> None:
        if n_threads < 1:
            raise ValueError(f"IOPool needs at least one thread, got {n_threads}")
        self.n_threads = n_threads
        self.name = name
        self.grace_s = grace_s
        self._queue: queue.SimpleQueue[Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._serial = itertools.count()
        self._threads: list[threading.Thread] = []
        self._retired: set[threading.Thread] = set()
        self.retired_workers = 0  # workers replaced because they were stuck in an abandoned item
        self.late_items = 0  # items of abandoned jobs that returned after the caller moved on
        self.abandoned_jobs = 0
        self._closed = False
        for _ in range(n_threads):
            self._add_worker()

    def _add_worker(self) -> None:
        t = threading.Thread(target=self._worker, name=f"{self.name}-{next(self._serial)}", daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def threads(self) -> list[threading.Thread]:
        """The serving (not retired) workers."""
        return list(self._threads)

    def _worker(self) -> None:
        get = self._queue.get
        me = threading.current_thread()
        while True:
            job = get()
            if job is None:
                return
            job.work()
            if me in self._retired:  # replaced while stuck in an abandoned job: its item came back late
                with self._lock:
                    self._retired.discard(me)
                    self.late_items += 1
                log.warning("%s: a storage I/O call returned after its caller's deadline; its worker exits",
                            me.name)
                return

    def submit(self, fn: Callable[[T], int], items: Sequence[T], notify: Callable[[], None]) -> Job[T]:
        """Start ``fn`` over ``items`` (non-empty); ``notify`` is called from a worker once all are done."""
        if self._closed:
            raise RuntimeError("IOPool is shut down")
        job = Job(fn, items, notify)
        put = self._queue.put
        for _ in range(min(job.n, self.n_threads)):
            put(job)
        return job

    async def abandon(self, job: Job[Any], dest: tuple[int, int] | None = None) -> None:
        """Give up on ``job`` (its caller's deadline fired): no more of its items start; the ones running get
        ``grace_s`` to land; workers still inside one after that are retired and replaced, and ``dest``
        (address, bytes: the memory the items write into) is held in ``LATE_WRITES`` until they return."""
        job.abandoned = True
        self.abandoned_jobs += 1
        t_end = time.monotonic() + self.grace_s
        with anyio.CancelScope(shield=True):
            while job.running and time.monotonic() < t_end:
                await anyio.sleep(0.002)
        stuck = list(job.running)
        if not stuck:
            return
        if dest is not None:
            running = job.running
            LATE_WRITES.hold(dest[0], dest[1], lambda: bool(running))
        with self._lock:
            for t in stuck:
                if t in self._threads:
                    self._threads.remove(t)
                    self._retired.add(t)
                    self.retired_workers += 1
                    if not self._closed:
                        self._add_worker()
        log.warning("%s: %d worker(s) stuck in I/O past the caller's deadline; replaced", self.name, len(stuck))

    async def run(self, fn: Callable[[T], int], items: Sequence[T], dest: tuple[int, int] | None = None) -> list[int]:
        """Run ``fn`` over ``items`` in the workers and return the results in order.

        Cancellation (the caller's deadline) abandons the job (see the module docstring) and re-raises at once
        (after at most ``grace_s``). An exception raised by ``fn`` is re-raised here (after all items).
        ``dest``: ``(address, nbytes)`` of the memory ``fn`` writes into, held from reuse while a retired worker
        may still write there.
        """
        if not items:
            return []
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait for a threading.Event in one abandonable thread hop
            loop = None
        if loop is not None:
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                loop.call_soon_threadsafe(_resolve, fut)

            job = self.submit(fn, items, wake)
            try:
                await asyncio.shield(fut)  # (a cancelled wait must not cancel ``fut``: it tells if the job ended)
            except BaseException:
                if not fut.done():
                    await self.abandon(job, dest)
                raise
        else:
            event = threading.Event()
            job = self.submit(fn, items, event.set)
            try:
                await anyio.to_thread.run_sync(event.wait, abandon_on_cancel=True)
            except BaseException:
                if not event.is_set():
                    await self.abandon(job, dest)
                raise
        if job.error is not None:
            raise job.error
        return job.results

    def shutdown(self, timeout: float = 5.0) -> None:
        """Finish the queued jobs, then stop the workers; waits at most ``timeout`` s in all (a worker stuck
        in a system call is left behind: it is a daemon thread)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        t_end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, t_end - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:
            log.warning("%s: %d worker(s) still inside a system call at shutdown: %s", self.name, len(left), left)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
