"""Posix backend specifics: bad roots, disk full, verification switch, shared roots, file format."""

from __future__ import annotations

import errno
import os
import time

import anyio
import pytest
import torch
from pydantic import ValidationError

from dualpath.errors import StorageError
from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import BlockStatus, create_storage
from dualpath.storage import blockfile as bf
from dualpath.storage import posix as posix_mod
from dualpath.storage.config import PosixStorageConfig

LAYOUT = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=2, head_dim=8, dtype="float16"), block_tokens=16)
NS = KeyNamespace.for_layout("unit", LAYOUT)
KEYS = BlockKeyer(NS).keys(list(range(8 * 16)))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *LAYOUT.full_block_shape), dtype=torch.uint8, generator=g)


def store(root, **kw):
    return create_storage(PosixStorageConfig(root=root, io_threads=2, **kw), LAYOUT, NS)


@pytest.mark.anyio
async def test_root_that_is_a_file_or_under_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValidationError, match="storage.root|not a directory"):  # refused with the config now
        PosixStorageConfig(root=f)
    st = store(tmp_path / "later")
    (tmp_path / "later").write_text("x")  # became a file after the config was checked: start() still says so
    with pytest.raises(StorageError, match="not a directory"):
        await st.start()
    with pytest.raises(StorageError, match="cannot create root"):
        await store(f / "sub").start()


@pytest.mark.anyio
async def test_unwritable_root_is_a_clear_error(tmp_path, monkeypatch):
    real_open = os.open

    def deny(path, flags, *a, **k):  # root ignores permission bits, so simulate EACCES
        if str(path).endswith(".tmp") and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(posix_mod.os, "open", deny)
    with pytest.raises(StorageError, match="not writable"):
        await store(tmp_path / "kv").start()


@pytest.mark.anyio
async def test_disk_full_evicts_and_retries_else_fails(tmp_path, monkeypatch):
    s = store(tmp_path / "kv", capacity_bytes=100 * bf.file_size(LAYOUT.full_block_bytes))
    async with s:
        await s.write(KEYS[:3], data(3))
        real = os.pwritev
        calls = {"n": 0}

        def full_once(fd, bufs, off):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, bufs, off)

        monkeypatch.setattr(posix_mod.os, "pwritev", full_once)
        assert await s.write(KEYS[3:4], data(1, 3)) == [BlockStatus.OK]
        # (the least recently used: the first batch's last block, its tail; its head stays)
        assert not s.contains(KEYS[2]) and s.contains(KEYS[0]) and s.contains(KEYS[3]) and s.stats().evictions == 1

        def always_full(fd, bufs, off):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(posix_mod.os, "pwritev", always_full)
        assert await s.write(KEYS[4:5], data(1, 4)) == [BlockStatus.FAILED]
        assert not s.contains(KEYS[4]) and s.stats().failed == 1
        assert not list((tmp_path / "kv").rglob("*.tmp"))
        monkeypatch.setattr(posix_mod.os, "pwritev", real)
        out = torch.empty((1, *LAYOUT.full_block_shape), dtype=torch.uint8)
        assert await s.read(KEYS[4:5], out) == [BlockStatus.MISSING]


@pytest.mark.anyio
async def test_capacity_with_nothing_evictable_fails_the_block(tmp_path):
    foot = bf.file_size(LAYOUT.full_block_bytes)
    async with store(tmp_path / "kv", capacity_bytes=foot) as s:
        # two new blocks in one write: the second cannot fit while the first is being written
        assert await s.write(KEYS[:2], data(2)) == [BlockStatus.OK, BlockStatus.FAILED]
        assert s.contains(KEYS[0]) and not s.contains(KEYS[1])


@pytest.mark.anyio
async def test_verify_off_still_checks_header_and_length(tmp_path):
    async with store(tmp_path / "kv", verify_checksum=False) as s:
        await s.write(KEYS[:3], data(3))
        s.damage(KEYS[0], "flip")
        s.damage(KEYS[1], "truncate")
        s.damage(KEYS[2], "foreign")
        out = torch.empty((3, *LAYOUT.full_block_shape), dtype=torch.uint8)
        st = await s.read(KEYS[:3], out)
        # payload flips go unseen without verification (the documented trade-off); the rest is caught
        assert st == [BlockStatus.OK, BlockStatus.CORRUPT, BlockStatus.CORRUPT]


def test_file_format_and_paths(tmp_path):
    key = KEYS[0]
    p = bf.block_path(tmp_path, key.hex)
    assert p == os.path.join(tmp_path, key.hex[:2], key.hex[2:4], key.hex + ".kvb")
    hdr = bf.make_header(NS.digest, key.digest, 1234, 99)
    assert len(hdr) == bf.HEADER_SIZE
    assert bf.check_header(hdr, NS.digest, key.digest, 1234) == (None, 99)
    assert bf.check_header(hdr, bytes(32), key.digest, 1234)[0] == "foreign namespace"
    assert bf.check_header(hdr, NS.digest, KEYS[1].digest, 1234)[0] == "key mismatch"
    assert "length" in str(bf.check_header(hdr, NS.digest, key.digest, 1000)[0])
    bad = bytearray(hdr)
    bad[60] ^= 1
    assert bf.check_header(bad, NS.digest, key.digest, 1234)[0] == "header checksum mismatch"
    assert bf.check_header(bytes(bf.HEADER_SIZE), NS.digest, key.digest, 1234)[0] == "bad magic"


@pytest.mark.anyio
async def test_instances_over_one_root_share_the_index(tmp_path):
    async with store(tmp_path / "kv") as a, store(tmp_path / "kv") as b:
        await a.write(KEYS[:2], data(2))
        assert b.lookup(KEYS) == 2
        out = torch.empty((2, *LAYOUT.full_block_shape), dtype=torch.uint8)
        assert await b.read(KEYS[:2], out) == [BlockStatus.OK] * 2
        assert torch.equal(out, data(2))


@pytest.mark.anyio
async def test_shared_root_sees_other_process_writes(tmp_path):
    root = tmp_path / "kv"
    async with store(root, shared_root=True) as s:
        assert not s.contains(KEYS[0])

        async def other_process() -> None:  # a second index over the same root, as another process has
            with posix_mod._INDEXES_LOCK:
                saved = posix_mod._INDEXES.pop(s.root)
            try:
                async with store(root) as o:
                    await o.write(KEYS[:1], data(1))
            finally:
                with posix_mod._INDEXES_LOCK:
                    posix_mod._INDEXES[s.root] = saved

        await other_process()
        assert s.contains(KEYS[0])
        out = torch.empty((1, *LAYOUT.full_block_shape), dtype=torch.uint8)
        assert await s.read(KEYS[:1], out) == [BlockStatus.OK]
        assert torch.equal(out, data(1))


def test_read_never_blocks_the_event_loop(tmp_path):
    """A read of many blocks runs in worker threads: a concurrent ticker keeps ticking."""

    async def main() -> tuple[int, list[BlockStatus]]:
        ticks = 0
        async with store(tmp_path / "kv") as s:
            await s.write(KEYS, data(8))
            out = torch.empty((8, *LAYOUT.full_block_shape), dtype=torch.uint8)
            done = anyio.Event()
            result: list[BlockStatus] = []

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await anyio.sleep(0)

            async def reader() -> None:
                for _ in range(20):
                    result[:] = await s.read(KEYS, out)
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                tg.start_soon(reader)
        return ticks, result

    ticks, result = anyio.run(main)
    assert set(result) == {BlockStatus.OK} and ticks > 20


@pytest.mark.anyio
async def test_verification_catches_one_flipped_byte_anywhere_and_one_missing_byte(tmp_path):
    """A flipped bit in the first, a middle or the last payload byte, and a file one byte short, are CORRUPT;
    their neighbours in the same call still read exactly."""
    n = 6
    async with store(tmp_path / "kv") as s:
        await s.write(KEYS[:n], data(n, 7))
        out = torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8)
        assert await s.read(KEYS[:n], out) == [BlockStatus.OK] * n
        assert torch.equal(out, data(n, 7))
        nbytes = LAYOUT.full_block_bytes
        for key, offset in [(KEYS[0], 0), (KEYS[1], nbytes // 2 + 3), (KEYS[2], nbytes - 1)]:
            with open(bf.block_path(s.root, key.hex), "r+b") as f:
                f.seek(bf.HEADER_SIZE + offset)
                b = f.read(1)
                f.seek(bf.HEADER_SIZE + offset)
                f.write(bytes([b[0] ^ 0x01]))
        s.damage(KEYS[3], "truncate")
        os.truncate(bf.block_path(s.root, KEYS[4].hex), bf.HEADER_SIZE + nbytes - 1)
        out.zero_()
        st = await s.read(KEYS[:n], out)
        assert st == [BlockStatus.CORRUPT] * 5 + [BlockStatus.OK]
        assert torch.equal(out[5], data(n, 7)[5])
        assert s.stats().corrupt == 5 and s.lookup(KEYS[:n]) == 0 and s.contains(KEYS[5])


@pytest.mark.anyio
async def test_many_reads_in_flight_into_separate_buffers(tmp_path):
    """Engines issue reads concurrently: every call gets its own blocks, counters add up."""
    n, calls, rounds = 8, 6, 5
    src = data(n, 11)
    async with store(tmp_path / "kv") as s:
        await s.write(KEYS[:n], src)
        bad: list[int] = []

        async def reader(c: int) -> None:
            buf = torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8)
            keys = KEYS[c % n : n] + KEYS[: c % n]  # a rotation: each call its own order
            for _ in range(rounds):
                buf.zero_()
                st = await s.read(keys, buf)
                expect = torch.cat([src[c % n :], src[: c % n]])
                if st != [BlockStatus.OK] * n or not torch.equal(buf, expect):
                    bad.append(c)

        async with anyio.create_task_group() as tg:
            for c in range(calls):
                tg.start_soon(reader, c)
        assert not bad
        stats = s.stats()
        assert stats.hits == stats.reads == calls * rounds * n
        assert stats.bytes_read == calls * rounds * n * LAYOUT.full_block_bytes


@pytest.mark.anyio
async def test_one_batch_with_bad_blocks_in_the_middle_fails_only_those(tmp_path):
    """One read call of 16 blocks over 3 workers: a flipped byte, a FIFO where a block should be, a file deleted
    behind the index's back and a foreign header, all in the middle of the batch, fail only their own block;
    every neighbour lands byte-exact in its own slot."""
    n = 16
    keys = BlockKeyer(NS).keys(list(range(n * 16)))
    src = data(n, 21)
    s = create_storage(PosixStorageConfig(root=tmp_path / "kv", io_threads=3), LAYOUT, NS)
    assert isinstance(s, posix_mod.PosixStorage)
    async with s:
        assert await s.write(keys, src) == [BlockStatus.OK] * n
        assert s.damage(keys[3], "flip")
        fifo = bf.block_path(s.root, keys[7].hex)
        os.unlink(fifo)
        os.mkfifo(fifo)
        os.unlink(bf.block_path(s.root, keys[10].hex))
        assert s.damage(keys[13], "foreign")
        out = torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8)
        st = await s.read(keys, out)
        bad = {3: BlockStatus.CORRUPT, 7: BlockStatus.FAILED, 10: BlockStatus.MISSING, 13: BlockStatus.CORRUPT}
        assert st == [bad.get(i, BlockStatus.OK) for i in range(n)]
        for i in range(n):
            if i not in bad:
                assert torch.equal(out[i], src[i]), i
        stats = s.stats()
        assert (stats.hits, stats.corrupt, stats.failed, stats.misses) == (n - 4, 2, 1, 1)
        assert [s.contains(k) for k in keys] == [i not in bad for i in range(n)]
        assert os.path.exists(fifo)  # not ours to delete; the corrupt files are gone
        assert not os.path.exists(bf.block_path(s.root, keys[3].hex))
        assert not os.path.exists(bf.block_path(s.root, keys[13].hex))


@pytest.mark.anyio
async def test_deadline_in_the_middle_of_a_batch_abandons_the_rest(tmp_path):
    """A read whose deadline fires while its batch is being read returns at once with the cancellation: the
    blocks not yet started are never read (their slots stay as they were), nothing leaves the index, and the
    next read of the same blocks is served exactly."""
    n = 1024
    keys = BlockKeyer(NS).keys(list(range(n * 16)))
    src = data(n, 22)
    s = create_storage(PosixStorageConfig(root=tmp_path / "kv", io_threads=1), LAYOUT, NS)
    assert isinstance(s, posix_mod.PosixStorage)
    async with s:
        assert await s.write(keys, src) == [BlockStatus.OK] * n
        out = torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8)
        pool = s._pool
        assert pool is not None
        t0 = time.monotonic()
        with anyio.move_on_after(0) as scope:  # fires at the read's first wait: the batch has just started
            await s.read(keys, out)
        assert scope.cancelled_caught and time.monotonic() - t0 < 2.0
        assert pool.abandoned_jobs == 1
        await anyio.sleep(0.2)  # nothing of the abandoned batch starts later
        landed = sum(bool(torch.equal(out[i], src[i])) for i in range(n))
        assert landed < n and not out[-1].any()
        assert s.lookup(keys) == n and s.stats().hits == 0
        out.zero_()
        assert await s.read(keys, out) == [BlockStatus.OK] * n
        assert torch.equal(out, src)
