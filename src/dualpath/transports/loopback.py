"""In-process transport: ``copy_`` from the sender's tensor into the receiver's exposed slot.

Endpoints meet in a :class:`LoopbackFabric` (a name -> endpoint table; one default per process). Between two
GPUs the copy is a device-to-device ``copy_`` (NVLink/P2P); on a CPU box it is a memcpy. Early writes are held
at the sender (no extra memory) until the receiver exposes the tag or ``pending_timeout_s`` passes.

The common cycle (the tag is exposed before the write arrives, the copy is small) is fused: ``write`` finds the
exposed slot, copies and marks it landed in one synchronous step, without suspending, allocating an event or
taking the landing table's lock; ``wait`` then pops the landed slot without suspending. The lock is skipped on
purpose: it guards a landing table against a backend's receive thread (zmq), and a loopback endpoint has none;
every loopback endpoint of a fabric is used from one event loop, and nothing can run between the claim, the
copy and the completion of a fused write (no ``await`` in it), so a ``cancel``, a timeout or ``close`` sees the
slot either still exposed (and withdraws it: the write is then held, never copied) or already landed.

The fused copy between two host buffers of up to 1 MiB is one ``memmove`` of the two contiguous byte ranges
(checked equal in size first) when torch runs one intra-op thread: torch's ``copy_`` costs a few microseconds of
dispatch on top. With several intra-op threads torch forks a copy above its grain size (32,768 elements) over
them, and that parallel copy beats one ``memmove`` from there up (measured on 2 cores: loopback ÷ ``copy_``
0.71 / 0.82 / 0.87 at 64 / 128 / 256 KiB with the limit at the grain size, 0.61 / 0.57 / 0.82 with it at
128 KiB), so the limit is then the grain size, below which torch copies serially anyway. Larger copies, and any
copy that involves a GPU, stay with torch. A ``uint8`` source (of any shape) inside one of the sender's registered
host regions, copied into a host landing of its size, is cheaper still: one memoryview slice assignment between
the two regions' cached memoryviews (CPython's memmove, without ctypes' ~0.5 us call or a flat view made first),
up to 1 MiB, or 64 KiB with several intra-op threads (from cold memory it ties torch's parallel copy at 64 KiB and
loses above). With that path and a hand-written ``Slot`` an expose-write-wait cycle costs 2.9 us of Python
instead of 3.3 (warm, 64 B). In ``dualpath bench transport --backends loopback`` (64 KiB from cold memory, about
8 us a copy) the difference is within this 2-core machine's run-to-run spread (A/B in
``benchmarks/results/bench_transport_cpu2.json``, ``loopback_memoryview_ab_session25``).

A host-to-host copy above ``inline_copy_bytes`` runs on the event loop in steps of that size (at least 8 MiB,
about 1 ms of the loop), yielding between steps so the loop stays responsive: handing it to a worker thread and
back costs two cross-thread wake-ups, 140-300 us on a 2-core VM, a quarter of a 16 MiB copy (loopback ÷ ``copy_``
at 16 MiB measured 0.59-0.81 that way, 0.84-0.88 in 8 MiB steps). Steps are large because each one forks torch's
parallel copy once, and waking its threads is not free either (4 MiB steps: 0.77-0.78). Before each step the
copy checks that its landing is still exposed: after ``cancel`` (or a timed-out ``wait``, or ``close``) returns,
no further byte is written, and the write fails (what the earlier steps wrote is unspecified, never served). A copy above ``inline_copy_bytes`` that involves a GPU runs in a worker thread. Its
landing is claimed first; if it is withdrawn before the thread starts the copy, the copy is skipped (the write
fails, nothing written); a copy already under way completes, and :meth:`LoopbackTransport.settle` waits for it,
so after ``cancel`` + ``settle`` nothing lands in the cancelled memory.
"""

from __future__ import annotations

import ctypes

import anyio
import torch

from dualpath.errors import TransportClosed, TransportError
from dualpath.transports.base import Region, Transport, byte_view
from dualpath.transports.landing import MAX_TAG_BYTES, Rejected, Slot, validate_tag
from dualpath.transports.wire import checksum_of

#: a fused host-to-host copy of at most this many bytes is a plain memmove (see the module docstring) ...
_MEMMOVE_MAX = 1 << 20
#: ... but only up to torch's grain size when it has several intra-op threads: above it torch's parallel copy
#: beats one memmove (see the module docstring; benchmarks/loopback_memmove_ab.py)
_MEMMOVE_MAX_THREADED = 32 << 10
#: a fused host-to-host copy of at most this many bytes whose source lies in a registered host region is one
#: memoryview slice assignment (a C memmove without ctypes' call overhead, about 0.5 us less per write) ...
_COPY_VIEW_MAX = 1 << 20
#: ... up to here when torch has several intra-op threads (measured: equal to torch's parallel copy at 64 KiB
#: from cold memory, slower above it)
_COPY_VIEW_MAX_THREADED = 64 << 10
_memmove = ctypes.memmove


class LoopbackFabric:
    """Where loopback endpoints of one process find each other by name."""

    def __init__(self) -> None:
        self.endpoints: dict[str, LoopbackTransport] = {}

    def add(self, ep: LoopbackTransport) -> None:
        old = self.endpoints.get(ep.name)
        if old is not None and old is not ep and not old._closed:
            raise TransportError(f"loopback endpoint name {ep.name!r} is already in use on this fabric")
        self.endpoints[ep.name] = ep

    def remove(self, ep: LoopbackTransport) -> None:
        if self.endpoints.get(ep.name) is ep:
            del self.endpoints[ep.name]


DEFAULT_FABRIC = LoopbackFabric()
_U8 = torch.uint8
_FAST_TAG_CHARS = MAX_TAG_BYTES // 4  # a str this short cannot exceed MAX_TAG_BYTES in UTF-8
_STEP_MIN = 8 << 20  # a large host copy on the loop moves at least this much per step (module docstring)
_SETTLE_S = 10.0  # settle() waits at most this long for a worker thread's copy into a withdrawn landing
_copy_limiter: anyio.CapacityLimiter | None = None


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()


def device_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Blocking copy of bytes between any two devices; returns when the bytes are in ``dst``."""
    if not (dst.is_cuda or src.is_cuda):  # host to host: a memcpy
        dst.copy_(src)
        return
    dst.copy_(src, non_blocking=dst.is_cuda and src.is_cuda)
    _sync(dst)
    if src.device != dst.device:
        _sync(src)


def _flat_bytes(src: torch.Tensor) -> torch.Tensor:
    """``src`` itself when it is already a flat contiguous byte tensor (slices of registered byte buffers), else
    :func:`byte_view` of it (which refuses a non-contiguous one)."""
    if type(src) is torch.Tensor and src.dtype is _U8 and src.dim() == 1 and src.is_contiguous():
        return src
    return byte_view(src)


def _copy_unless_withdrawn(slot: Slot, src: torch.Tensor) -> bool:
    """In a worker thread: :func:`device_copy` into ``slot`` unless its landing was withdrawn (cancel, a timed-out
    wait, close) before the copy could start; False then (nothing written)."""
    if slot.withdrawn:
        return False
    device_copy(slot.view, src)
    return True


async def _copy_in_steps(slot: Slot, src: torch.Tensor, step: int, owner: str, tag: str) -> None:
    """On the event loop: copy ``src`` (host) into ``slot`` ``step`` bytes at a time, yielding between steps; a
    landing withdrawn meanwhile gets no further byte (:class:`Rejected`)."""
    view, n = slot.view, src.numel()
    for lo in range(0, n, step):
        if slot.withdrawn:
            raise Rejected(f"{owner}: landing {tag!r} was withdrawn during its copy; the rest was not written")
        hi = min(n, lo + step)
        view[lo:hi].copy_(src[lo:hi])
        if hi < n:
            await anyio.sleep(0)


def _limiter() -> anyio.CapacityLimiter:
    global _copy_limiter
    if _copy_limiter is None:
        _copy_limiter = anyio.CapacityLimiter(4)
    return _copy_limiter


class LoopbackTransport(Transport):
    kind = "loopback"

    def __init__(self, name: str, *, fabric: LoopbackFabric | None = None, inline_copy_bytes: int = 4 << 20,
                 **common: object) -> None:
        super().__init__(name, **common)  # type: ignore[arg-type]
        self.fabric = DEFAULT_FABRIC if fabric is None else fabric
        self.inline_copy_bytes = inline_copy_bytes
        self._peers: dict[str, str] = {}
        self._peer_eps: dict[str, LoopbackTransport] = {}  # peer -> its running endpoint, found on a first write
        self._copying: set[Slot] = set()  # landings of this endpoint a worker thread is copying into
        self._copy_finished: anyio.Event | None = None  # set when one of those copies ends (settle waits on it)
        self._memmove_max = _MEMMOVE_MAX  # set at start (from torch's thread count then)
        self._copy_view_max = _COPY_VIEW_MAX  # likewise
        # (start, end, memoryview) of each registered host region: a source inside one is copied by memoryview
        self._host_spans: list[tuple[int, int, memoryview, int]] = []
        self._host_copy_in_steps = True  # large host copies on the loop, in steps (tests turn it off: the thread path)

    @property
    def address(self) -> str:
        return self.name

    async def start(self) -> None:
        self._check_open()
        threaded = torch.get_num_threads() > 1
        self._memmove_max = min(_MEMMOVE_MAX, _MEMMOVE_MAX_THREADED) if threaded else _MEMMOVE_MAX
        self._copy_view_max = min(_COPY_VIEW_MAX, _COPY_VIEW_MAX_THREADED) if threaded else _COPY_VIEW_MAX
        self.fabric.add(self)
        await super().start()

    async def close(self) -> None:
        self.fabric.remove(self)
        await super().close()

    async def settle(self) -> None:
        """Until no copy runs into a withdrawn landing: a copy in a worker thread (above ``inline_copy_bytes``)
        that had started when its landing was cancelled completes first (one that had not started never does).
        Bounded: :class:`TransportError` after ``_SETTLE_S``."""
        deadline = anyio.current_time() + _SETTLE_S
        while any(slot.withdrawn for slot in self._copying):
            if self._copy_finished is None:
                self._copy_finished = anyio.Event()
            with anyio.move_on_after(deadline - anyio.current_time()):
                await self._copy_finished.wait()
            if anyio.current_time() >= deadline and any(slot.withdrawn for slot in self._copying):
                raise TransportError(f"{self.name}: a copy into a cancelled landing did not finish within "
                                     f"{_SETTLE_S:g} s")

    def _copy_ended(self, slot: Slot) -> None:
        self._copying.discard(slot)
        ev, self._copy_finished = self._copy_finished, None
        if ev is not None:
            ev.set()

    def _register_memory(self, region: Region) -> None:
        host = region.host_memory()
        if host is not None:
            self._host_spans.append((region._start, region._end, host, region.id))

    def _deregister_memory(self, region: Region) -> None:
        self._host_spans = [span for span in self._host_spans if span[3] != region.id]

    async def connect(self, peer: str, address: str) -> None:
        self._check_open()
        self._peers[peer] = address
        self._peer_eps.pop(peer, None)

    def expose(self, tag: str, region: Region, offset: int, nbytes: int, *, sender: str | None = None) -> None:
        """As :meth:`Transport.expose`, without the slot's host memoryview (loopback copies with torch; ``sender``
        is not needed: a write finds the landing in the same process)."""
        if self._closed:
            self._check_open()
        if self._regions.get(region.id) is not region:
            raise TransportError(f"{self.name}: region {region.id} is not registered with this transport")
        landings = self._landings
        if type(tag) is str and 0 < len(tag) <= _FAST_TAG_CHARS and tag not in landings._slots \
                and not landings._exposed_events:
            # the common case, inline (no write is held for any tag; no lock: see the module docstring)
            pair = region._views.get((offset, nbytes))  # Region.landing's cache, without the call when it hits
            view, host = region.landing(offset, nbytes) if pair is None else pair
            landings._slots[tag] = Slot(tag, view, host)
            return
        landings.expose(tag, *region.landing(offset, nbytes))  # its checks and errors; wakes a held write

    async def wait(self, tag: str, timeout: float) -> None:
        slot = self._landings._slots.get(tag)
        if slot is not None and slot.done._set and timeout is not None and timeout >= 0:
            # landed already (a fused write): pop it without suspending (no lock: see the module docstring)
            del self._landings._slots[tag]
            if slot.error is not None:
                raise slot.error
            return
        await self._landings.wait(tag, timeout)

    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        if self._closed:
            raise TransportClosed(f"{self.name}: transport is closed")
        if type(tag) is not str or not 0 < len(tag) <= _FAST_TAG_CHARS:
            validate_tag(tag)
        ep = self._peer_eps.get(peer)
        if ep is None or ep._closed:  # first write to this peer, or it closed (a new one may run under its name)
            ep = self._running_peer(peer)
        data: torch.Tensor | None = None
        slot = None if ep is None or checksum is not None else ep._landings._slots.get(tag)
        if ep is not None and slot is not None and slot.state == "exposed":
            # fused: claim, copy and complete in one synchronous step (see the module docstring)
            nbytes = -1
            host = slot.host
            if host is not None and type(src) is torch.Tensor and src.dtype is _U8 and src.is_cpu \
                    and src.is_contiguous():
                # the shortest copy: a small source in one of this endpoint's registered host regions is one
                # memoryview slice assignment (a C memmove, without ctypes' or torch's call overhead)
                n = src.numel()
                if n == len(host) and n <= self._copy_view_max:
                    p = src.data_ptr()
                    for start, end, mem, _ in self._host_spans:
                        if start <= p and p + n <= end:
                            host[:] = mem[p - start : p - start + n]
                            nbytes = n
                            break
            if nbytes < 0:
                data = _flat_bytes(src)
                n = data.numel()
                if n <= self.inline_copy_bytes and slot.view.numel() == n:
                    slot.state = "busy"
                    view = slot.view
                    try:
                        if n <= self._memmove_max and view.is_cpu and data.is_cpu:  # contiguous, same size
                            _memmove(view.data_ptr(), data.data_ptr(), n)
                        elif view.is_cuda or data.is_cuda:
                            device_copy(view, data)
                        else:
                            view.copy_(data)
                    except Exception as exc:
                        ep._landings.finish(slot, TransportError(f"{ep.name}: copy failed: {exc!r}"))
                        raise TransportError(f"{self.name}: copy into {peer!r} failed: {exc!r}") from exc
                    nbytes = n
            if nbytes >= 0:
                slot.state = "landed"
                done = slot.done
                if done._event is None:  # no waiter parked (the common case): no event to set
                    done._set = True
                else:
                    done.set()
                stats = ep.stats
                stats.arrivals += 1
                stats.bytes_received += nbytes
                stats = self.stats
                stats.writes += 1
                stats.bytes_sent += nbytes
                return
            # larger than inline_copy_bytes, or another size: the general path below (claim() rejects a size
            # mismatch with its reason)
        # not exposed yet, busy or landed: the general path (an early write is held; a duplicate is rejected)
        if data is None:
            data = _flat_bytes(src)
        await self._write_slow(peer, self._peers[peer], tag, data, timeout, checksum)

    def _running_peer(self, peer: str) -> LoopbackTransport | None:
        """``peer``'s endpoint if it runs (remembered for the next write), else None; raises if not connected."""
        address = self._peers.get(peer)
        if address is None:
            raise TransportError(f"{self.name}: peer {peer!r} is not connected (call connect first)")
        self._peer_eps.pop(peer, None)
        ep = self.fabric.endpoints.get(address)
        if ep is None or ep._closed:
            return None
        self._peer_eps[peer] = ep
        return ep

    async def _write_slow(self, peer: str, address: str, tag: str, data: torch.Tensor, timeout: float,
                          checksum: int | None) -> None:
        async def deliver() -> None:
            ep = self.fabric.endpoints.get(address)
            if ep is None or ep._closed:
                raise TransportError(f"{self.name}: peer {peer!r} at {address!r} is not running")
            landings = ep._landings
            try:
                slot = await landings.claim_wait(tag, data.numel())
            except Rejected as exc:
                landings.reject(self.name, str(exc))
                ep.stats.rejected += 1
                raise
            try:
                if ep.checksum:
                    expect = checksum if checksum is not None else None
                    if expect is not None and checksum_of(data) != expect:
                        raise Rejected(f"{ep.name}: checksum mismatch for tag {tag!r}; arrival discarded")
                if data.numel() <= self.inline_copy_bytes:
                    device_copy(slot.view, data)  # on the loop: nothing can withdraw the slot meanwhile
                elif self._host_copy_in_steps and not (slot.view.is_cuda or data.is_cuda):
                    await _copy_in_steps(slot, data, max(self.inline_copy_bytes, _STEP_MIN), ep.name, tag)
                else:  # in a worker thread; skipped if the landing is withdrawn before it starts
                    ep._copying.add(slot)
                    try:
                        copied = await anyio.to_thread.run_sync(_copy_unless_withdrawn, slot, data,
                                                                limiter=_limiter())
                    finally:
                        ep._copy_ended(slot)
                    if not copied:
                        raise Rejected(f"{ep.name}: landing {tag!r} was withdrawn before its copy started; "
                                       "nothing written")
            except BaseException as exc:
                err = exc if isinstance(exc, TransportError) else TransportError(f"{ep.name}: copy failed: {exc!r}")
                if isinstance(exc, Rejected):
                    landings.reject(self.name, str(exc))
                landings.finish(slot, err)
                raise
            landings.finish(slot)
            ep.stats.arrivals += 1
            ep.stats.bytes_received += data.numel()

        await self._guarded(f"write of {tag!r} to {peer!r}", timeout, deliver)
        self.stats.writes += 1
        self.stats.bytes_sent += data.numel()
