"""In-process Full Block store: the reference backend and test double.

Each block is kept as a private copy with its xxh3-64 checksum and the namespace digest it was written under,
so that :meth:`MemoryStorage.damage` (used by the ``faults`` wrapper) is caught by the same verification a
file backend does. LRU eviction above ``capacity_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import torch
import xxhash

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.storage.base import BlockStatus, DamageKind, Storage
from dualpath.storage.config import MemoryStorageConfig
from dualpath.types import BlockKey


def _xxh(t: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(t.numpy()))  # type: ignore[arg-type]


@dataclass
class _Entry:
    data: torch.Tensor  # flat uint8 copy
    checksum: int
    namespace: bytes


class MemoryStorage(Storage):
    kind = "memory"

    def __init__(self, config: MemoryStorageConfig, layout: KVLayout, namespace: KeyNamespace) -> None:
        super().__init__(config, layout, namespace)
        self._ns = namespace.digest
        self._blocks: OrderedDict[BlockKey, _Entry] = OrderedDict()
        self._capacity_blocks: int | None = None

    async def start(self) -> None:
        cap = self.config.capacity_bytes
        if cap is not None:
            if cap < self.full_block_bytes:
                raise StorageError(
                    f"memory storage: capacity_bytes={cap} is smaller than one Full Block "
                    f"({self.full_block_bytes} bytes)"
                )
            self._capacity_blocks = cap // self.full_block_bytes
        await super().start()

    async def close(self) -> None:
        self._blocks.clear()
        await super().close()

    def contains(self, key: BlockKey) -> bool:
        return key in self._blocks

    async def read(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]:
        self._check_open()
        self._check_buffer(keys, into, "into")
        out: list[BlockStatus] = []
        nbytes = self.full_block_bytes
        for i, key in enumerate(keys):
            entry = self._blocks.get(key)
            if entry is None:
                self._stats.misses += 1
                out.append(BlockStatus.MISSING)
                continue
            slot = into[i].view(-1)
            ok = entry.namespace == self._ns and entry.data.numel() == nbytes
            if ok:
                slot.copy_(entry.data)
                ok = _xxh(slot) == entry.checksum
            if not ok:
                self._stats.corrupt += 1
                del self._blocks[key]
                out.append(BlockStatus.CORRUPT)
                continue
            self._stats.hits += 1
            self._stats.reads += 1
            self._stats.bytes_read += nbytes
            out.append(BlockStatus.OK)
        self._head_most_recent([k for k, st in zip(keys, out, strict=True) if st is BlockStatus.OK])
        await anyio.lowlevel.checkpoint()
        return out

    async def write(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]:
        self._check_open()
        self._check_buffer(keys, blocks, "blocks")
        out: list[BlockStatus] = []
        nbytes = self.full_block_bytes
        for i, key in enumerate(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                out.append(BlockStatus.OK)
                continue
            if self._capacity_blocks is not None:
                while len(self._blocks) >= self._capacity_blocks:
                    self._blocks.popitem(last=False)
                    self._stats.evictions += 1
            data = blocks[i].reshape(-1).clone()
            self._blocks[key] = _Entry(data, _xxh(data), self._ns)
            self._stats.writes += 1
            self._stats.bytes_written += nbytes
            out.append(BlockStatus.OK)
        self._head_most_recent(keys)
        await anyio.lowlevel.checkpoint()
        return out

    def _head_most_recent(self, keys: Sequence[BlockKey]) -> None:
        """A batch is a prompt's chain of blocks in order and a lookup stops at its first missing block: its
        head is made the most recently used, so the capacity evicts a chain from its tail, not its head."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    async def delete(self, keys: Sequence[BlockKey]) -> None:
        self._check_open()
        for key in keys:
            self._blocks.pop(key, None)
        await anyio.lowlevel.checkpoint()

    def damage(self, key: BlockKey, how: DamageKind = "flip") -> bool:
        entry = self._blocks.get(key)
        if entry is None:
            return False
        if how == "flip":
            pos = entry.data.numel() // 2
            entry.data[pos] ^= 0xFF
        elif how == "truncate":
            entry.data = entry.data[: entry.data.numel() // 2].clone()
        elif how == "foreign":
            entry.namespace = bytes(32)
        else:
            raise ValueError(f"unknown damage kind {how!r}")
        return True
