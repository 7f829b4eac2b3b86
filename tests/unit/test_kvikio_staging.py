"""The kvikio backend's bounce path, its parts that need no GPU: which blocks are copied to the device, and the
reuse of pinned staging buffers (the backend itself runs in the storage contract suite on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from dualpath.storage import kvikio as kv
from dualpath.storage.base import BlockStatus

OK, MISSING, CORRUPT = BlockStatus.OK, BlockStatus.MISSING, BlockStatus.CORRUPT


def test_only_runs_of_good_blocks_are_copied() -> None:
    assert kv._ok_runs([]) == []
    assert kv._ok_runs([OK, OK, OK]) == [(0, 3)]
    assert kv._ok_runs([MISSING, CORRUPT]) == []
    assert kv._ok_runs([OK, CORRUPT, OK, OK, MISSING, OK]) == [(0, 1), (2, 4), (5, 6)]
    assert kv._ok_runs([CORRUPT, OK]) == [(1, 2)]


def test_staging_buffers_are_reused_smallest_fit_first(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []

    def empty(n: int, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        assert pin_memory and dtype == torch.uint8
        made.append(n)
        return torch.zeros(n, dtype=dtype)

    monkeypatch.setattr(kv.torch, "empty", empty)
    pool = kv._StagingPool(keep=2)
    a, b = pool.take(100), pool.take(300)
    assert made == [100, 300]
    pool.give(b)
    pool.give(a)
    assert pool.take(50) is a  # the smallest that fits
    assert pool.take(200) is b
    assert pool.take(400).numel() == 400 and made == [100, 300, 400]  # none fits: a new one
    # a buffer never given back (its call was cancelled, workers may still write it) is never lent again
    c = pool.take(10)
    assert c is not a and c is not b
    for buf in (a, b, c):
        pool.give(buf)
    assert len(pool._free) == 2 and all(f is not c for f in pool._free)  # only `keep` kept, the smallest dropped
