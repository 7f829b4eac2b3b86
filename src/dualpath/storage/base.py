"""The Storage contract: Full Blocks stored and returned by key.

Every backend (``memory``, ``posix``, ``kvikio``, the ``faults`` wrapper) implements :class:`Storage` and passes
the one contract suite in ``tests/contract/test_storage_contract.py``.

The contract
============

Construction and life cycle
    ``Storage(config, layout, namespace)`` does no I/O. ``await start()`` validates the configuration against
    the machine (root exists or can be created, is writable; ``capacity_bytes`` holds at least one Full Block)
    and raises :class:`~dualpath.errors.StorageError` with a clear message otherwise; persistent backends
    rebuild their index there (blocks survive restarts) and remove stale temporary files. ``await close()``
    releases threads and handles; ``async with storage:`` does both. Calling I/O methods before ``start`` or
    after ``close`` raises ``StorageError``.

Blocks
    A Full Block is a uint8 tensor ``[n_layers, block_tokens, bytes_per_token_layer]`` (``layout.full_block_shape``).
    Keys are :class:`~dualpath.types.BlockKey` content addresses salted with ``namespace``; a block written
    under one namespace is never returned to a storage opened with another (it reads as ``CORRUPT``).

``contains(key) -> bool``
    Cheap, from an in-memory index, no I/O, no side effect.

``lookup(keys) -> int``
    Length of the longest prefix of ``keys`` that is stored. No side effect (does not touch the LRU order,
    does not count hits or misses).

``await read(keys, into) -> list[BlockStatus]``
    ``into`` is caller-owned and preallocated: uint8 ``[len(keys), *layout.full_block_shape]``, contiguous,
    on the CPU (a CUDA device for ``kvikio``). The backend fills ``into[i]`` for every block whose status is
    ``OK``, with the exact bytes written, verified by a per-block checksum (xxh3-64) unless verification is
    switched off by config. A missing block is ``MISSING``; a block that fails verification (checksum,
    truncated, foreign namespace or key, bad header) is ``CORRUPT``, is counted, and is dropped from the
    store so ``lookup`` stops claiming it; an I/O error is ``FAILED``. A block that cannot be read at all
    (something other than a regular file in its place: a directory, FIFO, device, symbolic link) is ``FAILED``
    and leaves the index too: ``lookup`` never keeps claiming a block every read of which fails. File backends
    open only regular files (``O_NONBLOCK | O_NOFOLLOW``, then ``fstat``), so no open can block. For any status
    other than ``OK`` the content of ``into[i]`` is unspecified and must be treated as a miss. Per-block
    problems never raise; only misuse raises (``ValueError`` for a buffer of the wrong shape, dtype, device or
    layout). A read of a hit refreshes that block's LRU position. Blocking I/O never runs on the event loop.

    Deadlines: cancelling ``read`` (the caller's ``move_on_after``/``fail_after``) ends it at once. The
    backend abandons the blocks not yet done (no new I/O starts for them); a worker stuck in the kernel (a
    hung network mount) is retired and replaced, so the next read is served; ``close()`` waits for stuck
    workers only a bounded time. Every block of a cancelled read counts as ``FAILED`` (its content is
    unspecified); a system call already in the kernel may still land in its slot of ``into`` later, which
    user space cannot stop, so the caller must not rely on a cancelled read's slots. Backends hold the address
    range of ``into`` in :data:`~dualpath.storage.latewrites.LATE_WRITES` until such a call returns, and an
    allocator that reuses memory (the engines' host buffers) keeps a held range out of reuse meanwhile.

``await write(keys, blocks) -> list[BlockStatus]``
    ``blocks`` is uint8 ``[len(keys), *layout.full_block_shape]``. Each block becomes visible (to
    ``contains``/``lookup``/``read``, in this and in a restarted instance) atomically and only once it is
    complete: a crash in the middle of a write leaves the old state or nothing, never a torn block. Returns
    ``OK`` (stored, or already stored: writing an existing key is a no-op ``OK`` once the backend has seen the
    complete block still there; one the index holds but that vanished or was replaced is written again, and
    ``FAILED`` plus dropped from the index if that fails) or ``FAILED`` per block. ``OK`` always means the bytes
    are written and visible. A
    block that cannot be stored (disk full, capacity reached with nothing evictable, I/O error) is ``FAILED``
    and counted, never reported ``OK``. To make room the backend evicts least-recently-used blocks (by last
    read or write); eviction is the only way a stored block disappears apart from ``delete`` and corruption.

``await delete(keys)``
    Removes the blocks that exist; unknown keys are ignored.

``stats() -> StorageStats``
    Counters since construction: bytes and blocks read and written (successful ones), hits (``OK`` reads),
    misses (``MISSING``), corrupt, failed (reads and writes), evictions.

Test hook
    ``damage(key, how)`` corrupts the *stored* copy of a block in place ("flip" a payload byte, "truncate"
    it, or write a "foreign" namespace into its header), so the real verification path must catch it. Used by
    the ``faults`` wrapper and the contract suite; never called by production code.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Literal

import torch

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.types import BlockKey

DamageKind = Literal["flip", "truncate", "foreign"]


class BlockStatus(str, enum.Enum):
    """Outcome of one block in a read or write."""

    OK = "ok"
    MISSING = "missing"
    CORRUPT = "corrupt"
    FAILED = "failed"


@dataclass
class StorageStats:
    """Counters of one storage instance (see the contract in :mod:`dualpath.storage.base`)."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    failed: int = 0
    evictions: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def copy(self) -> StorageStats:
        return StorageStats(**asdict(self))


class Storage(abc.ABC):
    """A store of Full Blocks by key. The full contract is in this module's docstring."""

    kind: str = "abstract"

    def __init__(self, config: Any, layout: KVLayout, namespace: KeyNamespace) -> None:
        self.config = config
        self.layout = layout
        self.namespace = namespace
        self._stats = StorageStats()
        # computed once: the layout derives them on every access (with a tensor allocation), which would run on
        # the event loop for every read and write call
        self._block_shape: tuple[int, ...] = tuple(layout.full_block_shape)
        self._block_bytes = int(layout.full_block_bytes)
        self._started = False
        self._closed = False

    # --- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Validate the configuration against the machine and build the index (see the contract)."""
        if self._closed:
            raise StorageError(f"{self.kind} storage: cannot start after close")
        self._started = True

    async def close(self) -> None:
        self._closed = True

    async def __aenter__(self) -> Storage:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the interface ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def contains(self, key: BlockKey) -> bool: ...

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        """Length of the longest stored prefix of ``keys``; no side effect."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    @abc.abstractmethod
    async def read(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]: ...

    @abc.abstractmethod
    async def write(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]: ...

    @abc.abstractmethod
    async def delete(self, keys: Sequence[BlockKey]) -> None: ...

    def stats(self) -> StorageStats:
        return self._stats.copy()

    def damage(self, key: BlockKey, how: DamageKind = "flip") -> bool:
        """Test hook: corrupt the stored copy of ``key`` in place. Returns False if the key is not stored."""
        raise NotImplementedError(f"{self.kind} storage does not support damage()")

    # --- helpers for backends ---------------------------------------------------------------------------
    @property
    def full_block_bytes(self) -> int:
        return self._block_bytes

    @property
    def block_footprint(self) -> int:
        """Bytes one stored block counts against ``capacity_bytes`` (payload plus any per-block header)."""
        return self._block_bytes

    @property
    def device(self) -> torch.device:
        """Where ``read``'s ``into`` and ``write``'s ``blocks`` must live."""
        return torch.device("cpu")

    def _check_open(self) -> None:
        if not self._started:
            raise StorageError(f"{self.kind} storage used before start()")
        if self._closed:
            raise StorageError(f"{self.kind} storage used after close()")

    def _check_buffer(
        self, keys: Sequence[BlockKey], buf: torch.Tensor, what: str, device_type: str | None = "cpu"
    ) -> None:
        """Raise ValueError unless ``buf`` is a contiguous uint8 ``[len(keys), *full_block_shape]`` tensor."""
        expected = (len(keys), *self._block_shape)
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.dtype != torch.uint8 or tuple(buf.shape) != expected:
            raise ValueError(f"{what} must be uint8 {list(expected)}, got {buf.dtype} {list(buf.shape)}")
        if not buf.is_contiguous():
            raise ValueError(f"{what} must be contiguous")
        if device_type is not None and buf.device.type != device_type:
            raise ValueError(f"{what} must be on a {device_type} device for {self.kind} storage, got {buf.device}")
        for key in keys:
            if not isinstance(key, BlockKey):
                raise ValueError(f"keys must be BlockKey, got {type(key).__name__}")
