"""Storage reads end by their deadline and the index tells the truth (issue 13, items 1-2). No processes here.

* Only regular files are ever read: a FIFO, a directory or a symbolic link where a block file should be is a
  FAILED block at once (before the fix a FIFO hung ``read()`` forever and no deadline could fire).
* A read stuck inside the kernel (a hung network mount; injected by making ``os.preadv`` block) is abandoned at
  the caller's deadline: the caller gets control back, the stuck worker is replaced, ``close()`` is bounded.
* A block that cannot be read leaves the index (``lookup`` stops claiming it), and a write reports OK only when
  a complete block file is really on disk.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch

from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import blockfile as bf
from dualpath.storage.base import BlockStatus
from dualpath.storage.config import PosixStorageConfig
from dualpath.storage.posix import PosixStorage
from dualpath.types import BlockKey

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LAYOUT = KVLayout(KVSpec.mha(2, 1, 8, "bfloat16"), 16)
NS = KeyNamespace("m", LAYOUT.spec.fingerprint(), 16)
KEYS = [BlockKey(bytes([i]) * 32) for i in range(1, 5)]


def _path(root: Path, key: BlockKey) -> Path:
    return Path(bf.block_path(root, key.hex))


async def _stored(root: Path) -> torch.Tensor:
    blocks = torch.randint(0, 255, (len(KEYS), *LAYOUT.full_block_shape), dtype=torch.uint8)
    async with PosixStorage(PosixStorageConfig(root=root), LAYOUT, NS) as st:
        assert await st.write(KEYS, blocks) == [BlockStatus.OK] * len(KEYS)
    return blocks


def _into(n: int) -> torch.Tensor:
    return torch.zeros((n, *LAYOUT.full_block_shape), dtype=torch.uint8)


@pytest.mark.parametrize("what", ["fifo", "directory", "symlink"])
async def test_only_regular_files_are_read_and_unreadable_blocks_leave_the_index(tmp_path: Path, what: str) -> None:
    root = tmp_path / "kv"
    blocks = await _stored(root)
    async with PosixStorage(PosixStorageConfig(root=root), LAYOUT, NS) as st:
        victim = _path(root, KEYS[1])  # replaced while the storage is open: the index still holds the key
        good_copy = tmp_path / "elsewhere.kvb"
        good_copy.write_bytes(victim.read_bytes())  # a valid block file for this key: only the link is wrong
        victim.unlink()
        if what == "fifo":
            os.mkfifo(victim)
        elif what == "directory":
            victim.mkdir()
        else:
            victim.symlink_to(good_copy)
        into = _into(len(KEYS))
        with anyio.fail_after(20):  # before the fix a FIFO blocked here forever (the pool ignored cancellation)
            statuses = await st.read(KEYS, into)
        assert statuses[1] is BlockStatus.FAILED
        assert [statuses[i] for i in (0, 2, 3)] == [BlockStatus.OK] * 3
        assert torch.equal(into[[0, 2, 3]], blocks[[0, 2, 3]])
        assert st.lookup(KEYS) == 1, "an unreadable block is still claimed by lookup"
        assert not st.contains(KEYS[1])
    async with PosixStorage(PosixStorageConfig(root=root), LAYOUT, NS) as st:  # the start scan skips it too
        assert st.lookup(KEYS) == 1


async def test_a_block_replaced_by_a_directory_is_not_rewritten_as_ok(tmp_path: Path) -> None:
    """Before the fix ``write`` of a key the index still held returned OK without writing anything."""
    root = tmp_path / "kv"
    blocks = await _stored(root)
    async with PosixStorage(PosixStorageConfig(root=root), LAYOUT, NS) as st:
        victim = _path(root, KEYS[2])
        victim.unlink()  # replaced while the storage is open: the index still holds the key
        victim.mkdir()
        (victim / "x").write_text("not a block")  # not empty: os.replace cannot take its place
        assert st.contains(KEYS[2])
        status = await st.write([KEYS[2]], blocks[2:3])
        assert status == [BlockStatus.FAILED], "a write reported OK for bytes that are not on disk"
        assert not st.contains(KEYS[2])
        assert st.stats().failed == 1


async def test_write_of_an_indexed_key_whose_file_vanished_writes_it_again(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    blocks = await _stored(root)
    async with PosixStorage(PosixStorageConfig(root=root), LAYOUT, NS) as st:
        _path(root, KEYS[0]).unlink()  # gone behind the index's back (an operator, another host)
        assert st.contains(KEYS[0])
        assert await st.write(KEYS, blocks) == [BlockStatus.OK] * len(KEYS)
        raw = _path(root, KEYS[0]).read_bytes()  # raw I/O: the bytes are really there
        assert raw[bf.HEADER_SIZE :] == blocks[0].numpy().tobytes()
        into = _into(len(KEYS))
        assert await st.read(KEYS, into) == [BlockStatus.OK] * len(KEYS)
        assert torch.equal(into, blocks)


async def test_a_read_stuck_in_the_kernel_ends_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.preadv`` blocks for one block file (what a hung NFS/Lustre mount does): the caller's deadline fires,
    the stuck worker is replaced, later reads work, and ``close()`` returns although the worker is still stuck."""
    root = tmp_path / "kv"
    blocks = await _stored(root)
    real_preadv = os.preadv
    hung = threading.Event()
    release = threading.Event()

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.fstat(fd).st_ino == stuck_ino:
            hung.set()
            release.wait(30)
        return real_preadv(fd, buffers, offset)

    stuck_ino = _path(root, KEYS[3]).stat().st_ino
    monkeypatch.setattr(os, "preadv", preadv)
    st = PosixStorage(PosixStorageConfig(root=root, io_threads=2), LAYOUT, NS)
    await st.start()
    try:
        into = _into(len(KEYS))
        t0 = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await st.read(KEYS, into)
        assert scope.cancelled_caught and hung.is_set()
        assert time.monotonic() - t0 < 10  # returned at the deadline, not when the read came back
        pool = st._io()
        assert pool.retired_workers == 1 and len(pool.threads) == 2
        into2 = _into(3)
        assert await st.read(KEYS[:3], into2) == [BlockStatus.OK] * 3  # the replaced pool still serves
        assert torch.equal(into2, blocks[:3])
    finally:
        t1 = time.monotonic()
        await st.close()
        closed_in = time.monotonic() - t1
        release.set()
    assert closed_in < 10, "close() waited for a worker stuck in the kernel"


async def test_a_region_a_stuck_read_may_still_write_is_not_handed_out_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late write of a read abandoned at its deadline must not land in another request's memory.

    A host buffer holds exactly one request's region. A read into it is abandoned at its deadline while
    ``os.preadv`` is stuck for one block; the region is freed. Before the fix the next request got the same
    region at once, and when the stuck call returned its bytes (0xAA here) overwrote that request's KV. Now the
    region is quarantined: a new allocation waits until the stuck call has returned, then gets it, and what it
    reads is exactly what was stored."""
    from dualpath.engine.host_buffer import HostBuffer
    from dualpath.errors import PeerTimeout

    root = tmp_path / "kv"
    blocks = await _stored(root)
    real_preadv = os.preadv
    hung = threading.Event()
    release = threading.Event()
    stuck_ino = _path(root, KEYS[3]).stat().st_ino

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if os.fstat(fd).st_ino == stuck_ino and not hung.is_set():
            hung.set()
            release.wait(30)
            n = 0
            for b in buffers:  # what the kernel wrote when the hung call finally came back: late bytes
                b[:] = b"\xaa" * len(b)
                n += len(b)
            return n
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    nbytes = len(KEYS) * LAYOUT.full_block_bytes
    host = HostBuffer(nbytes, "pe0 host buffer")
    async with PosixStorage(PosixStorageConfig(root=root, io_threads=2), LAYOUT, NS) as st:
        a = await host.alloc(nbytes, 1.0)
        with anyio.move_on_after(0.5) as scope:
            await st.read(KEYS, a.data.view(len(KEYS), *LAYOUT.full_block_shape))
        assert scope.cancelled_caught and hung.is_set()
        host.free(a)
        assert host.quarantined_bytes == a.nbytes, "a region a stuck read may still write was put back"
        with pytest.raises(PeerTimeout):
            await host.alloc(nbytes, 0.3)  # the only room is the quarantined region

        got: list[object] = []

        async def next_request() -> None:
            got.append(await host.alloc(nbytes, 10.0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(next_request)
            await anyio.sleep(0.2)
            assert not got, "the quarantined region was handed out while the stuck read was pending"
            release.set()  # the stuck call returns and writes its late bytes into the quarantined region
        c = got[0]
        assert isinstance(c.offset, int) and c.offset == a.offset and host.quarantined_bytes == 0
        into = c.data.view(len(KEYS), *LAYOUT.full_block_shape)
        assert await st.read(KEYS, into) == [BlockStatus.OK] * len(KEYS)
        await anyio.sleep(0.1)
        assert torch.equal(into, blocks), "late bytes of an abandoned read landed in the next request's region"
