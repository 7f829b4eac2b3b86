"""One contract suite for every Storage backend (see the contract in dualpath/storage/base.py).

Backends: memory, posix, faults(inner=posix, all rates 0) and, when a CUDA GPU and kvikio are present, kvikio (its
io_path auto, and gds forced).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch

from dualpath.errors import StorageError
from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import BlockStatus, Storage, create_storage
from dualpath.storage import blockfile as bf
from dualpath.storage.config import (
    FaultsStorageConfig,
    KvikioStorageConfig,
    MemoryStorageConfig,
    PosixStorageConfig,
)

LAYOUT = KVLayout(KVSpec.mha(n_layers=4, n_kv_heads=2, head_dim=8, dtype="bfloat16"), block_tokens=16)
NS = KeyNamespace.for_layout("contract-model", LAYOUT)
OTHER_NS = KeyNamespace.for_layout("another-model", LAYOUT)
PERSISTENT = {"posix", "faults", "kvikio", "kvikio-gds"}


def _kvikio_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "kvikio needs a CUDA GPU (none here); run benchmarks/gpu_kvikio_check.py on a GPU machine"
    try:
        import kvikio  # noqa: F401
    except Exception as exc:  # pragma: no cover - GPU machines only
        return f"kvikio is not importable: {exc}"
    return None


BACKENDS = [
    "memory",
    "posix",
    "faults",
    pytest.param("kvikio", marks=pytest.mark.skipif(_kvikio_skip_reason() is not None, reason=str(_kvikio_skip_reason()))),
    # the CuFile path forced (io_path auto takes the bounce path on a machine without GPUDirect Storage)
    pytest.param("kvikio-gds",
                 marks=pytest.mark.skipif(_kvikio_skip_reason() is not None, reason=str(_kvikio_skip_reason()))),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_config(kind: str, root: Path, **kw):
    if kind == "memory":
        return MemoryStorageConfig(**kw)
    if kind == "posix":
        return PosixStorageConfig(root=root, io_threads=4, **kw)
    if kind == "kvikio":
        return KvikioStorageConfig(root=root, io_threads=4, **kw)
    if kind == "kvikio-gds":
        return KvikioStorageConfig(root=root, io_threads=4, io_path="gds", **kw)
    if kind == "faults":
        return FaultsStorageConfig(inner=PosixStorageConfig(root=root, io_threads=4, **kw), seed=1)
    raise AssertionError(kind)


def keys_for(n: int, ns: KeyNamespace = NS):
    return BlockKeyer(ns).keys(list(range(n * LAYOUT.block_tokens)))


def blocks_for(n: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n, *LAYOUT.full_block_shape), dtype=torch.uint8, generator=g)
    return data.to(device)


@pytest.fixture(params=BACKENDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def store_factory(kind, tmp_path):
    made: list[Storage] = []

    def factory(ns: KeyNamespace = NS, root: Path | None = None, **kw) -> Storage:
        s = create_storage(make_config(kind, root or tmp_path / "kv", **kw), LAYOUT, ns)
        made.append(s)
        return s

    yield factory


def empty(s: Storage, n: int) -> torch.Tensor:
    return torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8, device=s.device)


# --- basic semantics ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_round_trip_byte_exact_and_stats(store_factory):
    async with store_factory() as s:
        keys = keys_for(5)
        data = blocks_for(5, 1, s.device)
        assert await s.write(keys, data) == [BlockStatus.OK] * 5
        out = empty(s, 5)
        assert await s.read(keys, out) == [BlockStatus.OK] * 5
        assert torch.equal(out.cpu(), data.cpu())
        # read a subset in another order into another buffer
        out2 = empty(s, 2)
        assert await s.read([keys[3], keys[1]], out2) == [BlockStatus.OK] * 2
        assert torch.equal(out2[0].cpu(), data[3].cpu()) and torch.equal(out2[1].cpu(), data[1].cpu())
        # writing an existing key is a no-op OK
        assert await s.write(keys[:1], blocks_for(1, 99, s.device)) == [BlockStatus.OK]
        await s.read(keys[:1], out2[:1])
        assert torch.equal(out2[0].cpu(), data[0].cpu())
        st = s.stats()
        n = LAYOUT.full_block_bytes
        assert (st.writes, st.bytes_written) == (5, 5 * n)
        assert (st.reads, st.hits, st.bytes_read) == (8, 8, 8 * n)
        assert (st.misses, st.corrupt, st.failed, st.evictions) == (0, 0, 0, 0)


@pytest.mark.anyio
async def test_lookup_prefix_and_no_side_effects(store_factory):
    async with store_factory() as s:
        keys = keys_for(6)
        data = blocks_for(6, 2, s.device)
        await s.write([keys[0], keys[1], keys[3]], data[[0, 1, 3]].contiguous())
        before = s.stats()
        assert s.lookup(keys) == 2
        assert s.lookup(keys[3:]) == 1
        assert s.lookup([]) == 0
        assert s.lookup(keys[2:]) == 0
        assert [s.contains(k) for k in keys] == [True, True, False, True, False, False]
        assert s.stats() == before


@pytest.mark.anyio
async def test_missing_and_delete(store_factory):
    async with store_factory() as s:
        keys = keys_for(3)
        data = blocks_for(3, 3, s.device)
        await s.write(keys[:2], data[:2])
        out = empty(s, 3)
        assert await s.read(keys, out) == [BlockStatus.OK, BlockStatus.OK, BlockStatus.MISSING]
        await s.delete([keys[0], keys[2]])
        assert not s.contains(keys[0]) and s.contains(keys[1])
        assert await s.read(keys, out) == [BlockStatus.MISSING, BlockStatus.OK, BlockStatus.MISSING]
        assert torch.equal(out[1].cpu(), data[1].cpu())
        st = s.stats()
        assert (st.hits, st.misses) == (3, 3)


@pytest.mark.anyio
async def test_misuse_raises(store_factory):
    async with store_factory() as s:
        keys = keys_for(2)
        dev = s.device
        with pytest.raises(ValueError, match="uint8"):
            await s.read(keys, torch.zeros((3, *LAYOUT.full_block_shape), dtype=torch.uint8, device=dev))
        with pytest.raises(ValueError, match="uint8"):
            await s.read(keys, torch.zeros((2, *LAYOUT.full_block_shape), dtype=torch.float32, device=dev))
        wide = torch.zeros((2, LAYOUT.n_layers, LAYOUT.block_tokens, 2 * LAYOUT.bytes_per_token_layer), dtype=torch.uint8, device=dev)
        with pytest.raises(ValueError, match="contiguous"):
            await s.read(keys, wide[..., : LAYOUT.bytes_per_token_layer])
        with pytest.raises(ValueError):
            await s.write(keys, torch.zeros((2, 1, 2, 3), dtype=torch.uint8, device=dev))
        with pytest.raises(StorageError):
            await create_storage(s.config, LAYOUT, NS).read(keys, empty(s, 2))  # not started


@pytest.mark.anyio
async def test_capacity_smaller_than_one_block_fails_at_start(store_factory):
    s = store_factory(capacity_bytes=LAYOUT.full_block_bytes - 1)
    with pytest.raises(StorageError, match="capacity"):
        await s.start()


# --- corruption --------------------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["flip", "truncate", "foreign"])
async def test_damaged_block_is_corrupt_never_data(store_factory, how):
    async with store_factory() as s:
        keys = keys_for(3)
        data = blocks_for(3, 4, s.device)
        await s.write(keys, data)
        assert s.damage(keys[1], how)
        out = empty(s, 3)
        status = await s.read(keys, out)
        assert status == [BlockStatus.OK, BlockStatus.CORRUPT, BlockStatus.OK]
        assert torch.equal(out[0].cpu(), data[0].cpu()) and torch.equal(out[2].cpu(), data[2].cpu())
        assert s.stats().corrupt == 1
        # dropped from the store: lookup stops claiming it and a second read is a plain miss
        assert not s.contains(keys[1]) and s.lookup(keys) == 1
        assert await s.read(keys[1:2], out[:1]) == [BlockStatus.MISSING]
        # and it can be written again
        assert await s.write(keys[1:2], data[1:2]) == [BlockStatus.OK]
        assert await s.read(keys[1:2], out[:1]) == [BlockStatus.OK]
        assert torch.equal(out[0].cpu(), data[1].cpu())


def _posix_root(s: Storage) -> str:
    inner = getattr(s, "inner", s)
    return inner.root  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_foreign_namespace_file_at_key_path_is_corrupt(kind, store_factory, tmp_path):
    if kind not in PERSISTENT:
        pytest.skip("no files in the memory backend (covered by damage('foreign'))")
    from dualpath.storage.blockfile import block_path

    keys = keys_for(2)
    async with store_factory() as ours, store_factory(ns=OTHER_NS, root=tmp_path / "other") as theirs:
        data = blocks_for(2, 5, ours.device)
        await ours.write(keys, data)
        # the other namespace writes the same key digests with other bytes; its file replaces ours
        await theirs.write(keys, blocks_for(2, 6, ours.device))
        shutil.copyfile(block_path(_posix_root(theirs), keys[0].hex), block_path(_posix_root(ours), keys[0].hex))
        out = empty(ours, 2)
        assert await ours.read(keys, out) == [BlockStatus.CORRUPT, BlockStatus.OK]
        assert torch.equal(out[1].cpu(), data[1].cpu())


@pytest.mark.anyio
async def test_stray_files_in_root_are_ignored(kind, store_factory, tmp_path):
    if kind not in PERSISTENT:
        pytest.skip("persistent backends only")
    root = tmp_path / "kv"
    keys = keys_for(2)
    (root / keys[0].hex[:2] / keys[0].hex[2:4]).mkdir(parents=True)
    (root / keys[0].hex[:2] / keys[0].hex[2:4] / f"{keys[0].hex}.kvb").write_bytes(b"short garbage")
    (root / "ab").mkdir()
    (root / "ab" / "notes.txt").write_text("hello")
    (root / "README").write_text("not a block")
    async with store_factory() as s:
        assert not s.contains(keys[0])
        out = empty(s, 1)
        assert await s.read(keys[:1], out) == [BlockStatus.MISSING]
        data = blocks_for(1, 7, s.device)
        assert await s.write(keys[:1], data) == [BlockStatus.OK]
        assert await s.read(keys[:1], out) == [BlockStatus.OK]
        assert torch.equal(out.cpu(), data.cpu())


# --- concurrency, restart, capacity -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_reads_and_writes(store_factory):
    async with store_factory() as s:
        n = 24
        keys = keys_for(n)
        data = blocks_for(n, 8, s.device)
        bad: list[str] = []

        async def writer(lo: int) -> None:
            for i in range(lo, n, 3):
                assert await s.write(keys[i : i + 1], data[i : i + 1]) == [BlockStatus.OK]

        async def reader(r: int) -> None:
            out = empty(s, n)
            for _ in range(4):
                status = await s.read(keys, out)
                for i, st in enumerate(status):
                    if st is BlockStatus.OK and not torch.equal(out[i].cpu(), data[i].cpu()):
                        bad.append(f"reader {r} block {i}")
                    elif st not in (BlockStatus.OK, BlockStatus.MISSING):
                        bad.append(f"reader {r} block {i}: {st}")
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for lo in range(3):
                tg.start_soon(writer, lo)
            for r in range(3):
                tg.start_soon(reader, r)
        assert not bad
        out = empty(s, n)
        assert await s.read(keys, out) == [BlockStatus.OK] * n
        assert torch.equal(out.cpu(), data.cpu())


@pytest.mark.anyio
async def test_restart_sees_old_blocks(kind, store_factory):
    if kind not in PERSISTENT:
        pytest.skip("the memory backend is not persistent")
    keys = keys_for(4)
    s1 = store_factory()
    async with s1:
        data = blocks_for(4, 9, s1.device)
        await s1.write(keys, data)
    async with store_factory() as s2:
        assert s2.lookup(keys) == 4
        out = empty(s2, 4)
        assert await s2.read(keys, out) == [BlockStatus.OK] * 4
        assert torch.equal(out.cpu(), data.cpu())
    async with store_factory(ns=OTHER_NS) as s3:  # other namespace, same root: its keys differ
        assert s3.lookup(keys_for(4, ns=OTHER_NS)) == 0


@pytest.mark.anyio
async def test_lru_eviction_order(store_factory):
    s = store_factory()
    cap = 3 * s.block_footprint + 10
    async with store_factory(capacity_bytes=cap) as s:
        k = keys_for(6)
        data = blocks_for(6, 10, s.device)
        out = empty(s, 1)
        # a batch is a prompt's chain in order, and a lookup stops at its first missing block: the batch's head is
        # the most recently used, so a chain is evicted from its tail (in order, its head went first and took the
        # whole cached prefix with it: an outside audit saw hits drop to 0 while most of a chain was stored)
        await s.write(k[0:3], data[0:3])  # LRU: 2 1 0
        assert await s.read(k[2:3], out) == [BlockStatus.OK]  # LRU: 1 0 2
        await s.write(k[3:4], data[3:4])  # evicts 1
        assert [s.contains(x) for x in k[:4]] == [True, False, True, True]
        assert s.lookup(k[0:1]) == 1  # lookup does not touch the LRU
        await s.write(k[4:5], data[4:5])  # evicts 0 (not refreshed by lookup)
        assert [s.contains(x) for x in k[:5]] == [False, False, True, True, True]
        await s.write(k[2:3], data[2:3])  # existing key: refreshes it, evicts nothing (LRU: 3 4 2)
        await s.write(k[5:6], data[5:6])  # evicts 3
        assert [s.contains(x) for x in k] == [False, False, True, False, True, True]
        two = empty(s, 2)
        assert await s.read([k[4], k[5]], two) == [BlockStatus.OK] * 2  # a batch read: LRU 2 5 4
        await s.write(k[0:1], data[0:1])  # evicts 2
        assert [s.contains(x) for x in k] == [True, False, False, False, True, True]
        assert s.stats().evictions == 4
        for i in (0, 4, 5):
            assert await s.read(k[i : i + 1], out) == [BlockStatus.OK]
            assert torch.equal(out[0].cpu(), data[i].cpu())


@pytest.mark.anyio
async def test_capacity_enforced_at_restart(kind, store_factory):
    if kind not in PERSISTENT:
        pytest.skip("persistent backends only")
    keys = keys_for(4)
    async with store_factory() as s:
        await s.write(keys, blocks_for(4, 11, s.device))
        foot = s.block_footprint
    async with store_factory(capacity_bytes=2 * foot) as s2:
        assert sum(s2.contains(k) for k in keys) == 2


def _hold_file_checks(s: Storage) -> tuple[threading.Event, threading.Event]:
    """Make ``s``'s writes of stored keys stop at their on-disk check until the first event is set; the second is
    set once one is there."""
    gate, checking = threading.Event(), threading.Event()
    check = s._complete_on_disk  # type: ignore[attr-defined]

    def held_check(path: str) -> bool:
        checking.set()
        assert gate.wait(10)
        return check(path)

    s._complete_on_disk = held_check  # type: ignore[attr-defined]
    return gate, checking


async def _until(event: threading.Event) -> None:
    with anyio.fail_after(10):
        while not event.is_set():
            await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("meanwhile", ["evict", "delete"])
async def test_a_stored_block_written_again_while_others_write_keeps_the_capacity(kind, store_factory, meanwhile):
    """Writing a stored key checks its file on disk (and rewrites it if gone). Meanwhile, other writes fill the
    store. ``evict``: the block being checked is not the one evicted (before, it was: its file was unlinked, the
    rewrite brought it back without a reservation, 6 files under a 5-block cap; found by a model-based fuzz);
    ``delete``: it was deleted meanwhile, so the rewrite stores it anew and the store evicts another block to stay
    within ``capacity_bytes``."""
    if kind != "posix":
        pytest.skip("the file check between the two writes is the posix backend's")
    probe = store_factory()
    async with store_factory(capacity_bytes=2 * probe.block_footprint) as s:
        k = keys_for(3)
        data = blocks_for(3, 12, s.device)
        assert await s.write(k[0:2], data[0:2]) == [BlockStatus.OK] * 2  # LRU: 0 1
        gate, checking = _hold_file_checks(s)
        got: list[list[BlockStatus]] = []

        async def rewrite() -> None:
            got.append(await s.write(k[0:1], data[0:1]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(rewrite)
            await _until(checking)
            if meanwhile == "delete":
                await s.delete(k[0:1])
            assert await s.write(k[2:3], data[2:3]) == [BlockStatus.OK]
            # evict: block 0, the least recently used, is being checked, so block 1 goes
            assert s.contains(k[0]) is (meanwhile == "evict") and s.contains(k[2])
            gate.set()
        assert got == [[BlockStatus.OK]]
        files = list(Path(s.root).rglob(f"*{bf.BLOCK_SUFFIX}"))
        assert len(files) == 2, files
        assert [s.contains(x) for x in k] == [True, False, True]
        out = empty(s, 1)
        for i in (0, 2):
            assert await s.read(k[i : i + 1], out) == [BlockStatus.OK]
            assert torch.equal(out[0].cpu(), data[i].cpu())


@pytest.mark.anyio
async def test_a_write_that_finds_a_block_another_write_just_stored_leaves_it_visible(kind, store_factory):
    """Two writes of one new key at once: the second sees the first under way and checks the file on disk. When
    the first's file is complete by then, the second returns OK, and the block must be visible (``contains``,
    ``lookup``) when it does, not only once the first write returns (found by a model-based fuzz)."""
    if kind != "posix":
        pytest.skip("the file check between the two writes is the posix backend's")
    async with store_factory() as s:
        k = keys_for(1)
        data = blocks_for(1, 13, s.device)
        first_done = threading.Event()
        writer = s._block_writer  # type: ignore[attr-defined]

        def held_writer(blocks: torch.Tensor):  # the first write's result waits until the second has returned
            one = writer(blocks)

            def write_one(item):
                code = one(item)
                if not item[3]:  # the new block's write: its file is complete now
                    first_done.set()
                    assert second_returned.wait(10)
                return code
            return write_one

        second_returned = threading.Event()
        s._block_writer = held_writer  # type: ignore[attr-defined]
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.write, k, data)
            await _until(first_done)
            assert await s.write(k, data) == [BlockStatus.OK]
            assert s.contains(k[0]) and s.lookup(k) == 1
            second_returned.set()


# --- crash in the middle of writes -------------------------------------------------------------------------

_CRASH_WRITER = textwrap.dedent(
    """
    import sys, anyio, torch
    from dualpath.kv.keys import BlockKeyer, KeyNamespace
    from dualpath.kv.layout import KVLayout, KVSpec
    from dualpath.storage import create_storage
    from dualpath.storage.config import PosixStorageConfig

    layout = KVLayout(KVSpec.mha(n_layers=16, n_kv_heads=4, head_dim=64, dtype="bfloat16"), block_tokens=64)
    ns = KeyNamespace.for_layout("crash", layout)
    keys = BlockKeyer(ns).keys(list(range(64 * 200)))

    async def main():
        async with create_storage(PosixStorageConfig(root=sys.argv[1], io_threads=4), layout, ns) as s:
            blocks = torch.stack([torch.full(layout.full_block_shape, j + 1, dtype=torch.uint8) for j in range(8)])
            for i in range(0, len(keys), 8):
                await s.write(keys[i:i + 8], blocks)
                if i == 8:
                    print("started", flush=True)
    anyio.run(main)
    """
)


@pytest.mark.slow
@pytest.mark.anyio
async def test_crash_during_write_leaves_no_torn_block(tmp_path):
    layout = KVLayout(KVSpec.mha(n_layers=16, n_kv_heads=4, head_dim=64, dtype="bfloat16"), block_tokens=64)
    ns = KeyNamespace.for_layout("crash", layout)
    keys = BlockKeyer(ns).keys(list(range(64 * 200)))
    root = tmp_path / "kv"
    for rep in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _CRASH_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        time.sleep(0.01 + 0.03 * rep)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # every visible block file is complete (partial data may only live in temporary files)
        from dualpath.storage.blockfile import file_size

        sizes = {p.stat().st_size for p in root.rglob("*.kvb")}
        assert sizes == {file_size(layout.full_block_bytes)}
        async with create_storage(PosixStorageConfig(root=root), layout, ns) as s:
            assert not list(root.rglob("*.tmp")), "stale temporary files must be removed at start"
            present = [i for i, k in enumerate(keys) if s.contains(k)]
            assert len(present) >= 16
            out = layout.alloc_full_blocks(len(present))
            status = await s.read([keys[i] for i in present], out)
            assert set(status) == {BlockStatus.OK}
            for j, i in enumerate(present):
                assert bool((out[j] == i % 8 + 1).all()), f"block {i} torn"
