"""The transport contract: RDMA-style one-sided writes with notification.

A **receiver** registers a buffer once (:meth:`Transport.register` -> :class:`Region`), then, per transfer,
exposes a landing slot (``offset``/``nbytes`` inside the region) under a **tag** (:meth:`Transport.expose`) and
awaits the arrival (:meth:`Transport.wait`). A **sender** connects to the receiver once
(:meth:`Transport.connect` with the receiver's :attr:`Transport.address`) and writes a source tensor's bytes
to a tag on that peer (:meth:`Transport.write`). Contract every backend keeps (tests/contract):

* **Registration** is once per buffer (contiguous tensor, any device the backend supports), never per transfer.
  ``src`` given to ``write`` is a contiguous tensor; its raw bytes are sent. Backends that need it (nixl)
  require ``src`` to lie inside a region registered on the sender and raise :class:`TransportError` otherwise.
* **Exactly once, exactly sized.** An exposed tag accepts one arrival of exactly ``nbytes``. A size mismatch is
  rejected with a logged reason, nothing is written and the waiter gets :class:`TransportError`. A second
  arrival for the same tag is rejected. After ``wait`` returns (or fails) the tag may be exposed again. A
  **failed** landing's bytes are unspecified (never served: its waiter gets the error): a backend may have
  written into the slot before it could tell the arrival was bad (zmq: a payload frame that disagrees with its
  own header; nixl: a one-sided write whose checksum fails).
* **Early arrivals are held**: a write whose tag is not exposed yet is held (at the receiver, bounded by
  ``max_pending_bytes``; or at the sender) until it is exposed, for at most ``pending_timeout_s``; then it is
  dropped with a logged reason and the sender's ``write`` fails. So callers need not order expose before write
  across engines.
* **Deadlines everywhere.** ``wait`` and ``write`` take a timeout (seconds) and raise :class:`PeerTimeout`
  after it. A ``wait`` that times out withdraws its landing (a late arrival is rejected, never written into a
  buffer the caller may reuse). A ``write`` to a dead or silent peer fails within its timeout and releases
  the source buffer (no queued frame keeps it pinned).
* **Delivery.** ``write`` returns once the bytes have landed in the peer's exposed region (acknowledged), and
  raises :class:`TransportError` when the receiver rejected them. ``wait`` returns once all bytes are in the
  region (on a GPU: the copy has completed, visible to the default stream).
* **Integrity** (when the backend's ``checksum`` is on): an xxh3-64 of the payload travels with it and is
  verified before the arrival counts; a mismatch fails both sides with :class:`TransportError`.
* **Close** (:meth:`Transport.close`) wakes every waiter and every pending write with
  :class:`TransportClosed`. Transports are async context managers (``async with create_transport(...)``).
* **cancel(tag)** withdraws a landing; its waiter gets :class:`TransportError`. A copy already under way into
  that slot completes (the bytes of a transfer in flight cannot be recalled), nothing starts after.
* Messages on the wire are fixed binary headers + raw bytes (no pickle); sockets bind to loopback unless
  configured.
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import anyio
import torch

from dualpath.errors import PeerTimeout, TransportClosed, TransportError
from dualpath.transports.landing import LandingTable, validate_tag

_region_ids = itertools.count(1)
_VIEW_CACHE = 4096  # landing views kept per region
T = TypeVar("T")


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's bytes (no copy)."""
    if not isinstance(t, torch.Tensor):
        raise TransportError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype is torch.uint8 and t.dim() == 1 and t.is_contiguous():
        return t  # already a flat byte view (the common case: slices of registered byte buffers)
    if not t.is_contiguous():
        raise TransportError(f"tensor of shape {tuple(t.shape)} is not contiguous; transports move contiguous bytes")
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


@dataclass(eq=False)
class Region:
    """A registered buffer: the tensor, its byte view and an id unique in the process."""

    tensor: torch.Tensor
    owner: str
    id: int = field(default_factory=lambda: next(_region_ids))
    handle: Any = None  # backend data (e.g. NIXL registration descriptors)

    def __post_init__(self) -> None:
        self.bytes = byte_view(self.tensor)
        # landing views by (offset, nbytes), with their memoryview in host memory (None on a GPU): slots recur
        self._views: dict[tuple[int, int], tuple[torch.Tensor, memoryview | None]] = {}
        self._host: memoryview | None = None  # the bytes as a writable memoryview (host regions), made on demand
        self._start = int(self.bytes.data_ptr())
        self._end = self._start + int(self.bytes.numel())
        #: the CUDA device index of the buffer, None in host memory
        self.cuda_index: int | None = self.bytes.get_device() if self.bytes.is_cuda else None

    @property
    def nbytes(self) -> int:
        return int(self.bytes.numel())

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def addr(self) -> int:
        return int(self.bytes.data_ptr())

    def landing(self, offset: int, nbytes: int) -> tuple[torch.Tensor, memoryview | None]:
        """The bytes ``[offset, offset + nbytes)`` as a flat ``uint8`` view and, in host memory, as a writable
        memoryview (what socket receives and loopback's small copies write into; None on a GPU). Checked
        against the region's bounds, and cached: landing slots recur."""
        pair = self._views.get((offset, nbytes))
        if pair is not None:
            return pair
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.nbytes:
            raise TransportError(
                f"slot [offset={offset}, nbytes={nbytes}] does not fit region {self.id} of {self.nbytes} bytes"
            )
        host = self.host_memory()
        pair = (self.bytes[offset : offset + nbytes], None if host is None else host[offset : offset + nbytes])
        if len(self._views) >= _VIEW_CACHE:
            self._views.clear()
        self._views[(offset, nbytes)] = pair
        return pair

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.landing(offset, nbytes)[0]

    def host_view(self, offset: int, nbytes: int) -> memoryview | None:
        """``view(offset, nbytes)`` as a writable memoryview; None for a region in device memory."""
        return self.landing(offset, nbytes)[1]

    def host_memory(self) -> memoryview | None:
        """The whole region as a writable byte memoryview (made once); None for a region in device memory."""
        if self.cuda_index is not None or self.bytes.device.type != "cpu":
            return None
        if self._host is None:
            self._host = self.bytes.detach().numpy().data
        return self._host

    def holds(self, t: torch.Tensor) -> bool:
        """:meth:`contains` for a flat ``uint8`` tensor, by address range and device (cheap: per write)."""
        start = t.data_ptr()
        if not (self._start <= start and start + t.numel() <= self._end):
            return False
        dev = self.cuda_index
        return not t.is_cuda if dev is None else t.is_cuda and t.get_device() == dev

    def contains(self, t: torch.Tensor) -> bool:
        if t.device != self.device:
            return False
        start = t.data_ptr()
        return self.addr <= start and start + t.numel() * t.element_size() <= self.addr + self.nbytes


@dataclass
class TransportStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    writes: int = 0
    arrivals: int = 0
    rejected: int = 0


class Transport(abc.ABC):
    """One endpoint of a transport; see the module docstring for the contract."""

    kind: str = "?"
    #: whether a landing slot carries its host memoryview (``Slot.host``): what a backend that receives the bytes
    #: itself writes into (zmq); a one-sided backend (nixl) never does
    receives_into_host_views: bool = True

    def __init__(self, name: str, *, checksum: bool = False, max_pending_bytes: int = 256 << 20,
                 pending_timeout_s: float = 10.0) -> None:
        if not name:
            raise TransportError("a transport endpoint needs a non-empty name")
        self.name = name
        self.checksum = checksum
        self._landings = LandingTable(name, max_pending_bytes=max_pending_bytes, pending_timeout_s=pending_timeout_s)
        self._regions: dict[int, Region] = {}
        self._started = False
        self._closed = False
        self._write_scopes: set[anyio.CancelScope] = set()
        self.stats = TransportStats()

    # --- lifecycle ------------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def address(self) -> str:
        """What a peer passes to :meth:`connect` (valid after :meth:`start`)."""

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        """Idempotent; wakes every waiter with :class:`TransportClosed`."""
        self._closed = True
        self._landings.close()
        for scope in list(self._write_scopes):
            scope.cancel()

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.name}: transport is closed")

    # --- registration ---------------------------------------------------------------------------------------
    @property
    def registered_regions(self) -> int:
        """How many buffers are registered (leak checks: it must stay flat under load)."""
        return len(self._regions)

    def register(self, buf: torch.Tensor) -> Region:
        """Register a contiguous buffer once; returns its :class:`Region`."""
        self._check_open()
        region = Region(buf, self.name)
        if region.nbytes == 0:
            raise TransportError(f"{self.name}: cannot register an empty buffer")
        self._register_memory(region)
        self._regions[region.id] = region
        return region

    def deregister(self, region: Region) -> None:
        if self._regions.pop(region.id, None) is not None:
            self._deregister_memory(region)

    def _register_memory(self, region: Region) -> None:  # noqa: B027 - optional hook
        """Backend hook (nixl registers memory with its agent)."""

    def _deregister_memory(self, region: Region) -> None:  # noqa: B027 - optional hook
        pass

    def find_region(self, t: torch.Tensor) -> Region | None:
        for region in self._regions.values():
            if region.contains(t):
                return region
        return None

    # --- receiving ------------------------------------------------------------------------------------------
    def expose(self, tag: str, region: Region, offset: int, nbytes: int, *, sender: str | None = None) -> None:
        """Expose ``region[offset:offset+nbytes]`` (bytes) as the landing slot of one arrival under ``tag``.

        ``sender``: the peer expected to write it, where the caller knows (an engine does: the DE forwarding a
        request's layers, the PE shipping its KV back), by the name that peer's endpoint has. A one-sided
        transport (nixl) then hands that peer the landing at once, so its write needs no request round trip; the
        others ignore it. A hint only: any connected peer may still write the landing (nixl first takes it back
        from the named one, fenced), and exactly-once holds either way."""
        if self._closed:
            self._check_open()
        if self._regions.get(region.id) is not region:
            raise TransportError(f"{self.name}: region {region.id} is not registered with this transport")
        view, host = region.landing(offset, nbytes)
        self._landings.expose(tag, view, host if self.receives_into_host_views else None)
        self._on_expose(tag, sender)

    def _on_expose(self, tag: str, sender: str | None) -> None:  # noqa: B027 - optional hook
        pass

    async def wait(self, tag: str, timeout: float) -> None:
        """Until ``tag``'s bytes landed. :class:`PeerTimeout` after ``timeout`` s (the landing is withdrawn),
        :class:`TransportClosed` on close, :class:`TransportError` if the arrival was rejected or corrupt."""
        await self._landings.wait(tag, timeout)

    def cancel(self, tag: str) -> None:
        """Withdraw the landing exposed under ``tag`` (no-op when there is none)."""
        self._landings.cancel(tag)

    async def settle(self) -> None:
        """Return once every :meth:`cancel` issued so far has taken full effect: after it, nothing lands in the
        memory of a cancelled landing, so the caller may reuse it. A transport whose receiver copies each arrival
        itself (loopback, zmq) waits, bounded, for a copy into a cancelled landing already under way in one of its
        threads; a one-sided one (nixl) waits, bounded, for its senders to acknowledge the revocation."""
        return None

    # --- sending --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def connect(self, peer: str, address: str) -> None:
        """Make ``peer`` (its endpoint name) reachable at ``address``; idempotent for the same address. Connects
        to one peer that overlap (an engine told of a restarted peer while still connecting to its old address)
        each return once the peer is reachable at the latest address given, or raise that connection's error."""

    @abc.abstractmethod
    async def write(self, peer: str, tag: str, src: torch.Tensor, timeout: float, *,
                    checksum: int | None = None) -> None:
        """Write ``src``'s bytes into the slot ``peer`` exposed under ``tag``; returns once delivered.

        ``checksum``: the xxh3-64 the receiver must verify (computed from ``src`` when None and checksums are
        on); the faults wrapper passes the original's to prove corruption is caught."""

    # helpers for backends
    def _prepare_write(self, tag: str, src: torch.Tensor) -> tuple[None, torch.Tensor]:
        self._check_open()
        validate_tag(tag)
        return None, byte_view(src)

    async def _guarded(self, what: str, timeout: float, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one write: :class:`PeerTimeout` after ``timeout``, :class:`TransportClosed` if we close."""
        if timeout is None or not timeout >= 0:
            raise TransportError(f"timeout must be a number >= 0, got {timeout!r}")
        scope = anyio.CancelScope(deadline=anyio.current_time() + timeout)
        self._write_scopes.add(scope)
        try:
            with scope:
                return await fn()
            if self._closed:
                raise TransportClosed(f"{self.name}: transport closed during {what}")
            raise PeerTimeout(f"{self.name}: {what} not delivered within {timeout:g} s")
        finally:
            self._write_scopes.discard(scope)
