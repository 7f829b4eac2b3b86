"""A fault-injecting wrapper around another backend, for tests.

Faults act on the *inner* store, so the real detection path is what gets exercised:

* **drop**: just before a read, the block is deleted from the inner store (lost, as if evicted by someone
  else): the read reports ``MISSING`` and ``lookup`` stops claiming it.
* **corrupt**: just before a read, a payload byte of the stored copy is flipped (``inner.damage``): the inner
  backend's checksum catches it and reports ``CORRUPT``.
* **fail**: the block's read or write is not performed and reports ``FAILED`` (an I/O error).
* **delay**: every read and write first sleeps ``delay_s`` (``anyio.sleep``).

Faults hit blocks by seeded rate (one draw per block per read, from ``random.Random(seed)``, so a given
sequence of calls gives the same faults) or by key (:meth:`drop_key`, :meth:`corrupt_key`: once;
:meth:`fail_key`: until :meth:`clear_faults`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import anyio
import torch

from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.storage.base import BlockStatus, DamageKind, Storage, StorageStats
from dualpath.types import BlockKey


class FaultyStorage(Storage):
    kind = "faults"

    def __init__(self, config: Any, layout: KVLayout, namespace: KeyNamespace) -> None:
        from dualpath.storage import create_storage

        super().__init__(config, layout, namespace)
        self.inner = create_storage(config.inner, layout, namespace)
        self._rng = random.Random(config.seed)
        self._drop: set[BlockKey] = set()
        self._corrupt: set[BlockKey] = set()
        self._fail: set[BlockKey] = set()
        self._injected_failed = 0
        self.injected: dict[str, int] = {"drop": 0, "corrupt": 0, "fail": 0}

    # --- targeting ----------------------------------------------------------------------------------------
    def drop_key(self, key: BlockKey) -> None:
        self._drop.add(key)

    def corrupt_key(self, key: BlockKey) -> None:
        self._corrupt.add(key)

    def fail_key(self, key: BlockKey) -> None:
        self._fail.add(key)

    def clear_faults(self) -> None:
        self._drop.clear()
        self._corrupt.clear()
        self._fail.clear()

    # --- life cycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.inner.start()
        await super().start()

    async def close(self) -> None:
        await self.inner.close()
        await super().close()

    @property
    def block_footprint(self) -> int:
        return self.inner.block_footprint

    @property
    def device(self) -> torch.device:
        return self.inner.device

    # --- interface ----------------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        return self.inner.contains(key)

    def lookup(self, keys: Sequence[BlockKey]) -> int:
        return self.inner.lookup(keys)

    def _draw(self) -> str | None:
        cfg = self.config
        r = self._rng.random()
        if r < cfg.drop_rate:
            return "drop"
        r -= cfg.drop_rate
        if r < cfg.corrupt_rate:
            return "corrupt"
        r -= cfg.corrupt_rate
        if r < cfg.fail_rate:
            return "fail"
        return None

    async def read(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]:
        self._check_open()
        self._check_buffer(keys, into, "into", self.inner.device.type)
        if self.config.delay_s > 0:
            await anyio.sleep(self.config.delay_s)
        failed = [False] * len(keys)
        to_drop: list[BlockKey] = []
        for i, key in enumerate(keys):
            fault = self._draw()
            if key in self._fail:
                fault = "fail"
            elif key in self._drop:
                self._drop.discard(key)
                fault = "drop"
            elif key in self._corrupt:
                self._corrupt.discard(key)
                fault = "corrupt"
            if fault == "fail":
                failed[i] = True
            elif fault == "drop" and self.inner.contains(key):
                to_drop.append(key)
            elif fault == "corrupt" and self.inner.contains(key):
                self.inner.damage(key, "flip")
            else:
                continue
            self.injected[fault] += 1
        if to_drop:
            await self.inner.delete(to_drop)
        return await self._runs(keys, into, failed, self.inner.read)

    async def write(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]:
        self._check_open()
        self._check_buffer(keys, blocks, "blocks", self.inner.device.type)
        if self.config.delay_s > 0:
            await anyio.sleep(self.config.delay_s)
        failed = [key in self._fail or self._rng.random() < self.config.fail_rate for key in keys]
        self.injected["fail"] += sum(failed)
        return await self._runs(keys, blocks, failed, self.inner.write)

    async def _runs(self, keys: Sequence[BlockKey], buf: torch.Tensor, failed: list[bool], op: Any) -> list[BlockStatus]:
        """Call ``op`` on each run of consecutive non-failed blocks (slices of ``buf`` stay contiguous)."""
        out = [BlockStatus.FAILED] * len(keys)
        i = 0
        while i < len(keys):
            if failed[i]:
                self._injected_failed += 1
                i += 1
                continue
            j = i
            while j < len(keys) and not failed[j]:
                j += 1
            out[i:j] = await op(list(keys[i:j]), buf[i:j])
            i = j
        return out

    async def delete(self, keys: Sequence[BlockKey]) -> None:
        await self.inner.delete(keys)

    def stats(self) -> StorageStats:
        s = self.inner.stats()
        s.failed += self._injected_failed
        return s

    def damage(self, key: BlockKey, how: DamageKind = "flip") -> bool:
        return self.inner.damage(key, how)
