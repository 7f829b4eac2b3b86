"""Landing slots shared by every transport backend: exposed regions, arrivals, waiters, the early-arrival hold.

One :class:`LandingTable` per transport endpoint, used only from its event loop (no locks). A slot moves
``exposed -> busy (bytes being written) -> landed | failed``; :meth:`LandingTable.wait` pops it.
"""

from __future__ import annotations

import logging
import math
import threading

import anyio
import torch

from dualpath.errors import PeerTimeout, TransportClosed, TransportError, TransportRejected

log = logging.getLogger("dualpath.transports")

MAX_TAG_BYTES = 1024


#: an arrival was refused; the public name is :class:`dualpath.errors.TransportRejected`
Rejected = TransportRejected


def check_tag(tag: str) -> bytes:
    if not isinstance(tag, str) or not tag:
        raise TransportError(f"tag must be a non-empty str, got {tag!r}")
    raw = tag.encode("utf-8")
    if len(raw) > MAX_TAG_BYTES:
        raise TransportError(f"tag {tag[:40]!r}... is {len(raw)} bytes; at most {MAX_TAG_BYTES}")
    return raw


def validate_tag(tag: str) -> None:
    """:func:`check_tag` without building the bytes when they cannot be too long (the per-write fast path)."""
    if type(tag) is str and 0 < len(tag) <= MAX_TAG_BYTES // 4:  # UTF-8: at most 4 bytes per character
        return
    check_tag(tag)


class Done:
    """A one-shot flag with :class:`anyio.Event`'s interface whose event is made only when someone waits (most
    slots are done before their waiter looks: this keeps the per-message path light)."""

    __slots__ = ("_set", "_event")

    def __init__(self) -> None:
        self._set = False
        self._event: anyio.Event | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            if self._event is not None:
                self._event.set()

    async def wait(self) -> None:
        if self._set:
            return
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()


class Slot:
    """One exposed landing. Written by hand rather than as a dataclass: one is made per transfer, and a plain
    ``__init__`` with positional arguments costs about a third less."""

    __slots__ = ("tag", "view", "state", "error", "done", "withdrawn", "host")

    def __init__(self, tag: str, view: torch.Tensor, host: memoryview | None = None) -> None:
        self.tag = tag
        self.view = view  # 1-D uint8 view of the landing bytes
        self.state = "exposed"  # exposed | busy | landed | failed
        self.error: BaseException | None = None
        self.done = Done()
        self.withdrawn = False
        self.host = host  # ``view`` as a writable memoryview when it is in host memory

    def __repr__(self) -> str:
        return f"Slot(tag={self.tag!r}, nbytes={self.nbytes}, state={self.state!r})"

    @property
    def nbytes(self) -> int:
        return int(self.view.numel())


class LandingTable:
    """Exposed landing slots of one endpoint, and the bookkeeping of arrivals into them."""

    def __init__(self, owner: str, *, max_pending_bytes: int, pending_timeout_s: float) -> None:
        self.owner = owner
        self.max_pending_bytes = max_pending_bytes
        self.pending_timeout_s = pending_timeout_s
        self.pending_bytes = 0
        self._slots: dict[str, Slot] = {}
        self._exposed_events: dict[str, anyio.Event] = {}
        self._closed = False
        self.rejected = 0
        # guards the slot table and slot states against a backend's receive thread (zmq claims arrivals from its
        # I/O thread); everything else, and every wake-up of a waiter, stays on the event loop
        self.lock = threading.Lock()

    # --- receiver side --------------------------------------------------------------------------------------
    def expose(self, tag: str, view: torch.Tensor, host: memoryview | None = None) -> None:
        if tag in self._slots:
            raise TransportError(f"{self.owner}: tag {tag!r} is already exposed (wait or cancel it first)")
        validate_tag(tag)
        if self._closed:
            raise TransportClosed(f"{self.owner}: transport is closed")
        with self.lock:
            self._slots[tag] = Slot(tag, view, host)
        if self._exposed_events:
            ev = self._exposed_events.pop(tag, None)
            if ev is not None:
                ev.set()

    async def wait(self, tag: str, timeout: float) -> None:
        slot = self._slots.get(tag)
        if slot is not None and slot.done._set and timeout is not None and timeout >= 0:  # landed already
            with self.lock:
                del self._slots[tag]
            if slot.error is not None:
                raise slot.error
            return
        if slot is None:
            if self._closed:
                raise TransportClosed(f"{self.owner}: transport is closed")
            raise TransportError(f"{self.owner}: wait on tag {tag!r} that is not exposed")
        if not slot.done.is_set():
            with anyio.move_on_after(_finite(timeout)):
                await slot.done.wait()
        if not slot.done.is_set():
            self._withdraw(slot)
            raise PeerTimeout(f"{self.owner}: tag {tag!r} did not arrive within {timeout:g} s")
        with self.lock:
            if self._slots.get(tag) is slot:
                del self._slots[tag]
        if slot.error is not None:
            raise slot.error

    def cancel(self, tag: str) -> None:
        slot = self._slots.get(tag)
        if slot is not None:
            self._withdraw(slot, TransportError(f"{self.owner}: landing {tag!r} was cancelled"))

    def _withdraw(self, slot: Slot, error: BaseException | None = None) -> None:
        with self.lock:
            slot.withdrawn = True
            if self._slots.get(slot.tag) is slot:
                del self._slots[slot.tag]
            if slot.done.is_set():
                return
            slot.state = "failed"
            slot.error = error
        slot.done.set()

    def is_exposed(self, tag: str) -> bool:
        return tag in self._slots

    def close(self) -> None:
        err = TransportClosed(f"{self.owner}: transport closed while waiting")
        with self.lock:
            self._closed = True
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            if not slot.done.is_set():
                slot.state, slot.error = "failed", err
                slot.done.set()
        for ev in self._exposed_events.values():
            ev.set()
        self._exposed_events.clear()

    # --- arrival side (backends) ----------------------------------------------------------------------------
    def claim(self, tag: str, nbytes: int, *, on_loop: bool = True) -> Slot | None:
        """The slot an arrival of ``nbytes`` under ``tag`` may write into now (marked busy), or None when the
        tag is not exposed. Raises :class:`Rejected` (nothing to be written) on a size mismatch or a duplicate;
        a size mismatch also fails the slot, so its waiter gets the error. From a thread other than the event
        loop pass ``on_loop=False``: the failed slot is then left to the caller (``exc.failed_slot``) to wake
        on the loop (:meth:`finish`)."""
        failed: Slot | None = None
        with self.lock:
            if self._closed:
                raise Rejected(f"{self.owner}: transport is closed")
            slot = self._slots.get(tag)
            if slot is None:
                return None
            if slot.state != "exposed":
                raise Rejected(f"{self.owner}: duplicate arrival for tag {tag!r} (slot is {slot.state})")
            if nbytes == slot.nbytes:
                slot.state = "busy"
                return slot
            err = Rejected(
                f"{self.owner}: size mismatch for tag {tag!r}: arrival has {nbytes} bytes, "
                f"the exposed region has {slot.nbytes}; nothing written"
            )
            slot.state, slot.error = "failed", err
            failed = slot
        if on_loop:
            failed.done.set()
        else:
            err.failed_slot = failed  # type: ignore[attr-defined]
        raise err

    def claim_exact(self, tag: str, nbytes: int) -> Slot | None:
        """The host-memory slot exposed under ``tag`` with exactly ``nbytes``, marked busy; None (and nothing
        changed) when there is none, it is not idle, it has another size or it has no ``host`` view (device). A receiver
        that writes an arrival into its slot before it can see the arrival's real size (zmq's ``recv_into``)
        claims with this and falls back to :meth:`claim` otherwise, so every refusal :meth:`claim` makes is
        still made before any byte is written."""
        with self.lock:
            slot = self._slots.get(tag)
            if slot is None or slot.host is None or slot.state != "exposed" or len(slot.host) != nbytes \
                    or self._closed:
                return None
            slot.state = "busy"
            return slot

    async def claim_wait(self, tag: str, nbytes: int, timeout: float | None = None) -> Slot:
        """:meth:`claim`, holding the arrival until the tag is exposed (at most ``timeout``, default
        ``pending_timeout_s``); raises :class:`Rejected` when it is not exposed in time."""
        timeout = self.pending_timeout_s if timeout is None else min(timeout, self.pending_timeout_s)
        deadline = anyio.current_time() + timeout
        while True:
            slot = self.claim(tag, nbytes)
            if slot is not None:
                return slot
            left = deadline - anyio.current_time()
            if left <= 0:
                raise Rejected(f"{self.owner}: tag {tag!r} was not exposed within {timeout:g} s; dropped")
            ev = self._exposed_events.get(tag)
            if ev is None:
                ev = self._exposed_events[tag] = anyio.Event()
            with anyio.move_on_after(left):
                await ev.wait()
            if self._exposed_events.get(tag) is ev and not ev.is_set():
                # timed out: drop the event if no one else uses it (cheap, harmless if someone does)
                self._exposed_events.pop(tag, None)

    def reserve_pending(self, nbytes: int) -> bool:
        """Account ``nbytes`` of held early arrivals; False when the hold area is full."""
        with self.lock:
            if self.pending_bytes + nbytes > self.max_pending_bytes:
                return False
            self.pending_bytes += nbytes
            return True

    def release_pending(self, nbytes: int) -> None:
        with self.lock:
            self.pending_bytes -= nbytes

    def finish(self, slot: Slot, error: BaseException | None = None) -> None:
        with self.lock:
            if slot.done.is_set():  # withdrawn (cancel/timeout/close) meanwhile
                return
            slot.state = "failed" if error is not None else "landed"
            slot.error = error
        slot.done.set()

    def reject(self, peer: str, reason: str) -> None:
        """Count and log a rejected arrival."""
        with self.lock:
            self.rejected += 1
        log.warning("%s: rejected arrival from %s: %s", self.owner, peer, reason)


def _finite(timeout: float) -> float:
    if timeout is None or math.isnan(timeout) or timeout < 0:
        raise TransportError(f"timeout must be a number >= 0, got {timeout!r}")
    return timeout
