"""The fault-injecting wrapper: seeded rates reproducible, targeted faults, delay, realistic corruption."""

from __future__ import annotations

import time

import pytest
import torch

from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import BlockStatus, create_storage
from dualpath.storage.config import FaultsStorageConfig, MemoryStorageConfig, PosixStorageConfig

LAYOUT = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=1, head_dim=8, dtype="float16"), block_tokens=8)
NS = KeyNamespace.for_layout("faults", LAYOUT)
N = 40
KEYS = BlockKeyer(NS).keys(list(range(N * 8)))
DATA = torch.randint(0, 256, (N, *LAYOUT.full_block_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def inner_cfg(kind, tmp_path):
    return MemoryStorageConfig() if kind == "memory" else PosixStorageConfig(root=tmp_path / "kv", io_threads=2)


async def run_rates(inner, seed):
    cfg = FaultsStorageConfig(inner=inner, seed=seed, drop_rate=0.2, corrupt_rate=0.2, fail_rate=0.2)
    async with create_storage(cfg, LAYOUT, NS) as s:
        await s.write(KEYS, DATA)
        out = torch.empty_like(DATA)
        status = await s.read(KEYS, out)
        for i, st in enumerate(status):
            if st is BlockStatus.OK:
                assert torch.equal(out[i], DATA[i])
        return status, s.stats(), dict(s.injected)


@pytest.mark.anyio
@pytest.mark.parametrize("inner", ["memory", "posix"])
async def test_seeded_rates_are_reproducible_and_detected(inner, tmp_path):
    a = await run_rates(inner_cfg(inner, tmp_path / "a"), seed=7)
    b = await run_rates(inner_cfg(inner, tmp_path / "b"), seed=7)
    c = await run_rates(inner_cfg(inner, tmp_path / "c"), seed=8)
    assert a[0] == b[0] and a[0] != c[0]
    status, stats, injected = a
    counts = {st: status.count(st) for st in BlockStatus}
    # the wrapper's write fail draws come first; reads see drop -> MISSING, corrupt -> CORRUPT, fail -> FAILED
    assert counts[BlockStatus.CORRUPT] == injected["corrupt"] == stats.corrupt > 0
    assert counts[BlockStatus.MISSING] >= injected["drop"] > 0
    assert counts[BlockStatus.FAILED] > 0 and stats.failed == injected["fail"]
    assert counts[BlockStatus.OK] > 0


@pytest.mark.anyio
@pytest.mark.parametrize("inner", ["memory", "posix"])
async def test_targeted_faults(inner, tmp_path):
    cfg = FaultsStorageConfig(inner=inner_cfg(inner, tmp_path))
    async with create_storage(cfg, LAYOUT, NS) as s:
        s.fail_key(KEYS[4])
        assert await s.write(KEYS[:5], DATA[:5]) == [BlockStatus.OK] * 4 + [BlockStatus.FAILED]
        assert not s.contains(KEYS[4])
        s.clear_faults()
        s.drop_key(KEYS[0])
        s.corrupt_key(KEYS[1])
        s.fail_key(KEYS[2])
        out = torch.empty((4, *LAYOUT.full_block_shape), dtype=torch.uint8)
        st = await s.read(KEYS[:4], out)
        assert st == [BlockStatus.MISSING, BlockStatus.CORRUPT, BlockStatus.FAILED, BlockStatus.OK]
        assert not torch.equal(out[1], DATA[1]) or st[1] is not BlockStatus.OK
        assert torch.equal(out[3], DATA[3])
        assert s.lookup(KEYS[:4]) == 0 and s.contains(KEYS[2]) and s.contains(KEYS[3])
        s.clear_faults()
        st = await s.read(KEYS[2:4], out[:2])
        assert st == [BlockStatus.OK] * 2 and torch.equal(out[:2], DATA[2:4])


@pytest.mark.anyio
async def test_delay_is_honoured():
    cfg = FaultsStorageConfig(inner=MemoryStorageConfig(), delay_s=0.05)
    async with create_storage(cfg, LAYOUT, NS) as s:
        t0 = time.monotonic()
        await s.write(KEYS[:1], DATA[:1])
        await s.read(KEYS[:1], torch.empty_like(DATA[:1]))
        assert time.monotonic() - t0 >= 0.1


@pytest.mark.anyio
async def test_zero_rates_are_transparent():
    async with create_storage(FaultsStorageConfig(inner=MemoryStorageConfig()), LAYOUT, NS) as s:
        assert await s.write(KEYS, DATA) == [BlockStatus.OK] * N
        out = torch.empty_like(DATA)
        assert await s.read(KEYS, out) == [BlockStatus.OK] * N
        assert torch.equal(out, DATA) and s.injected == {"drop": 0, "corrupt": 0, "fail": 0}
