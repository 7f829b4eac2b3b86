"""Full Blocks as files under a root directory (see :mod:`dualpath.storage.blockfile` for the format).

* Opens: regular files only (``O_NONBLOCK | O_NOFOLLOW``, then ``fstat`` must say ``S_ISREG``); anything
  else where a block should be is FAILED and leaves the index. A read cancelled by its caller's deadline is
  abandoned (:class:`~dualpath.storage.iopool.IOPool` retires and replaces a worker stuck in the kernel).
* Reads: ``os.preadv`` of [a per-thread 4 KiB header buffer, the caller's slot] in one system call, so the
  payload lands straight in the caller's preallocated tensor (no allocation per read); header and xxh3-64
  checksum verified; run in ``io_threads`` worker threads (:class:`~dualpath.storage.iopool.IOPool`) that claim blocks one by
  one from each batch, never on the event loop; many read calls may be in flight at once.
* Writes: a uniquely named temporary file in the block's directory (``O_EXCL``), ``pwritev`` of header and
  payload, optional ``fsync`` (``durability: fsync``, which also syncs the directory), then ``os.replace``:
  the block is visible only once complete. Stale temporary files are removed at start.
* Index: an in-memory LRU (by last read or write) of stored keys and file sizes, rebuilt at start by scanning
  the root (ordered by file mtime), shared by every instance of this process over the same root. With
  ``shared_root`` (other processes write the same root) an index miss falls back to one ``stat``.
* Capacity: the sum of block file sizes stays under ``capacity_bytes`` by evicting least-recently-used blocks;
  a full disk (ENOSPC) evicts one block's worth and retries once, else the block is FAILED.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
import xxhash

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.storage import blockfile as bf
from dualpath.storage.base import BlockStatus, DamageKind, Storage
from dualpath.storage.iopool import IOPool
from dualpath.types import BlockKey

_STALE_TMP_S = 600.0  # with shared_root, only temp files older than this are someone's crashed write
_tmp_counter = itertools.count()

# worker result codes (_UNREADABLE: not a regular file, or open() failed: FAILED, and the block leaves the index)
_OK, _MISSING, _CORRUPT, _FAILED, _NOSPACE, _UNREADABLE, _EXISTS = range(7)
_STATUS = {
    _OK: BlockStatus.OK,
    _MISSING: BlockStatus.MISSING,
    _CORRUPT: BlockStatus.CORRUPT,
    _FAILED: BlockStatus.FAILED,
    _NOSPACE: BlockStatus.FAILED,
    _UNREADABLE: BlockStatus.FAILED,
    _EXISTS: BlockStatus.OK,
}
#: a block file is opened without blocking (a FIFO or device in its place cannot hang open()) and without
#: following a symbolic link; fstat then must say it is a regular file
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class _RootIndex:
    """The LRU index of one root directory (process-wide; guarded by a lock)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.entries: OrderedDict[BlockKey, int] = OrderedDict()  # key -> file size, LRU first
        self.used = 0
        self.reserved = 0
        self.refs = 0
        #: blocks being written that the index does not hold yet (their size reserved), by any storage on this root
        self.writing: set[BlockKey] = set()
        #: blocks the index holds that a write is checking on disk (and rewriting if gone): not evicted meanwhile
        self.rewriting: dict[BlockKey, int] = {}

    def add(self, key: BlockKey, size: int) -> bool:
        """Index ``key`` (or refresh its LRU position); whether it was not indexed before."""
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return False
            self.entries[key] = size
            self.used += size
            return True

    def remove(self, key: BlockKey) -> bool:
        with self.lock:
            size = self.entries.pop(key, None)
            if size is None:
                return False
            self.used -= size
            return True

    def touch(self, key: BlockKey) -> None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)

    def touch_many(self, keys: Sequence[BlockKey]) -> None:
        """Refresh ``keys``' LRU positions, the first most recent: a batch is a prompt's chain of blocks in order,
        and a lookup stops at the first missing block, so the chain's tail is evicted before its head (touched in
        order, its head went first and took the whole cached prefix with it)."""
        with self.lock:
            entries = self.entries
            for key in reversed(keys):
                if key in entries:
                    entries.move_to_end(key)

    def pop_lru(self) -> BlockKey | None:
        """Remove and return the least recently used block no write is busy with (None if there is none)."""
        with self.lock:
            writing, rewriting = self.writing, self.rewriting
            for key in self.entries:
                if key not in writing and key not in rewriting:
                    self.used -= self.entries.pop(key)
                    return key
            return None


_INDEXES: dict[str, _RootIndex] = {}
_INDEXES_LOCK = threading.Lock()


class _ThreadBuffers(threading.local):
    def __init__(self) -> None:
        self.header = bytearray(bf.HEADER_SIZE)
        self.header_mv = memoryview(self.header)


class PosixStorage(Storage):
    kind = "posix"
    device_type = "cpu"

    def __init__(self, config: Any, layout: KVLayout, namespace: KeyNamespace) -> None:
        super().__init__(config, layout, namespace)
        self.root = os.path.abspath(os.fspath(Path(config.root).expanduser()))
        self._ns = namespace.digest
        self._file_size = bf.file_size(self.full_block_bytes)
        self._checker = bf.HeaderChecker(self._ns, self.full_block_bytes)
        self._tls = _ThreadBuffers()
        self._index: _RootIndex | None = None
        self._pool: IOPool | None = None
        self._made_dirs: set[str] = set()
        self._fsync = config.durability == "fsync"
        self._verify = bool(config.verify_checksum)
        self._shared = bool(getattr(config, "shared_root", False))
        self.ignored_files = 0  # block files of another size (another layout) seen at start

    # --- life cycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        cap = self.config.capacity_bytes
        if cap is not None and cap < self._file_size:
            raise StorageError(
                f"{self.kind} storage: capacity_bytes={cap} holds no Full Block (one block file is "
                f"{self._file_size} bytes: {self.full_block_bytes} payload + {bf.HEADER_SIZE} header)"
            )
        await anyio.to_thread.run_sync(self._check_root)
        with _INDEXES_LOCK:
            index = _INDEXES.get(self.root)
            fresh = index is None
            if index is None:
                index = _INDEXES[self.root] = _RootIndex(self.root)
            index.refs += 1
        self._index = index
        if fresh:
            try:
                entries = await anyio.to_thread.run_sync(self._scan)
            except BaseException:
                self._release_index()
                raise
            for _mtime, key, size in sorted(entries, key=lambda e: e[0]):
                index.add(key, size)
            if cap is not None:
                victims = self._evict_for(0)
                await anyio.to_thread.run_sync(self._unlink_keys, victims)
        self._pool = IOPool(self.config.io_threads, name=f"dualpath-{self.kind}")
        await super().start()

    async def close(self) -> None:
        if self._started and not self._closed:
            self._release_index()
        if self._pool is not None:
            self._pool.shutdown(timeout=2.0)  # bounded: a worker stuck in the kernel is left behind (daemon)
            self._pool = None
        await super().close()

    def _release_index(self) -> None:
        with _INDEXES_LOCK:
            if self._index is not None:
                self._index.refs -= 1
                if self._index.refs <= 0 and _INDEXES.get(self.root) is self._index:
                    del _INDEXES[self.root]
            self._index = None

    def _check_root(self) -> None:
        root = self.root
        if os.path.exists(root) and not os.path.isdir(root):
            raise StorageError(f"{self.kind} storage: root {root} exists and is not a directory")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.kind} storage: cannot create root {root}: {exc.strerror or exc}") from exc
        probe = os.path.join(root, f".probe.{os.getpid()}.{next(_tmp_counter)}{bf.TMP_SUFFIX}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageError(f"{self.kind} storage: root {root} is not writable: {exc.strerror or exc}") from exc

    def _scan(self) -> list[tuple[float, BlockKey, int]]:
        """List stored blocks (mtime, key, size); remove stale temporary files."""
        out: list[tuple[float, BlockKey, int]] = []
        now = time.time()
        for top in _subdirs(self.root):
            for sub in _subdirs(top.path):
                with os.scandir(sub.path) as it:
                    for entry in it:
                        name = entry.name
                        if name.endswith(bf.TMP_SUFFIX):
                            try:
                                if not self._shared or now - entry.stat().st_mtime > _STALE_TMP_S:
                                    os.unlink(entry.path)
                            except OSError:
                                pass
                            continue
                        if not name.endswith(bf.BLOCK_SUFFIX) or len(name) != 64 + len(bf.BLOCK_SUFFIX):
                            continue
                        try:
                            key = BlockKey.from_hex(name[:64])
                            st = entry.stat(follow_symlinks=False)
                        except (ValueError, OSError):
                            continue
                        if not stat.S_ISREG(st.st_mode):  # a link, directory, FIFO, device: never a block
                            continue
                        if key.hex[0:2] != top.name or key.hex[2:4] != sub.name:
                            continue
                        if st.st_size != self._file_size:
                            self.ignored_files += 1
                            continue
                        out.append((st.st_mtime, key, st.st_size))
        return out

    @property
    def block_footprint(self) -> int:
        return self._file_size

    # --- index ------------------------------------------------------------------------------------------
    def _idx(self) -> _RootIndex:
        self._check_open()
        assert self._index is not None
        return self._index

    def contains(self, key: BlockKey) -> bool:
        index = self._index
        if index is None:
            return False
        if key in index.entries:
            return True
        if self._shared:
            try:
                st = os.lstat(bf.block_path(self.root, key.hex))
            except OSError:
                return False
            if st.st_size == self._file_size and stat.S_ISREG(st.st_mode):
                index.add(key, st.st_size)
                return True
        return False

    def _evict_for(self, size: int) -> list[BlockKey]:
        """Pick LRU victims (removed from the index) so that ``size`` more bytes fit under the capacity.

        Raises nothing; returns the victims (the caller unlinks them). If not enough can be evicted, the
        caller sees ``used + reserved + size > capacity`` still holds.
        """
        cap = self.config.capacity_bytes
        index = self._index
        assert index is not None
        victims: list[BlockKey] = []
        if cap is None:
            return victims
        while index.used + index.reserved + size > cap:
            victim = index.pop_lru()
            if victim is None:
                break
            victims.append(victim)
            self._stats.evictions += 1
        return victims

    def _unlink_keys(self, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            with contextlib.suppress(OSError):
                os.unlink(bf.block_path(self.root, key.hex))

    # --- read -------------------------------------------------------------------------------------------
    async def read(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]:
        self._check_buffer(keys, into, "into", self.device_type)
        return await self._read_checked(keys, into)

    async def _read_checked(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]:
        """:meth:`read` once ``into`` passed its checks (``_block_reader`` fills it)."""
        index = self._idx()
        out = [BlockStatus.MISSING] * len(keys)
        # The GIL serializes every Python step, so the per-block work here and in the workers is kept
        # minimal: at tens of GiB/s from the page cache a block's whole budget is a few tens of microseconds.
        entries = index.entries
        contains = self.contains if self._shared else entries.__contains__
        items = [(i, key) for i, key in enumerate(keys) if contains(key)]
        stats = self._stats
        stats.misses += len(keys) - len(items)
        if not items:
            return out
        codes = await self._io().run(self._block_reader(into), items, (into.data_ptr(), into.nbytes))
        n_ok = codes.count(_OK)
        stats.hits += n_ok
        stats.reads += n_ok
        stats.bytes_read += n_ok * self.full_block_bytes
        if n_ok == len(items):
            index.touch_many([key for _i, key in items])
            for i, _key in items:
                out[i] = BlockStatus.OK
            return out
        index.touch_many([key for (_i, key), code in zip(items, codes, strict=True) if code == _OK])
        corrupt: list[BlockKey] = []
        for (i, key), code in zip(items, codes, strict=True):
            out[i] = _STATUS[code]
            if code == _MISSING:
                index.remove(key)
                stats.misses += 1
            elif code == _CORRUPT:
                if index.remove(key):
                    corrupt.append(key)
                stats.corrupt += 1
            elif code == _UNREADABLE:  # lookup must stop claiming it; what is there is not ours to delete
                index.remove(key)
                stats.failed += 1
            elif code != _OK:
                stats.failed += 1
        if corrupt:
            await anyio.to_thread.run_sync(self._unlink_keys, corrupt)
        return out

    def _io(self) -> IOPool:
        pool = self._pool
        if pool is None:
            raise StorageError(f"{self.kind} storage used after close()")
        return pool

    def _block_reader(self, into: torch.Tensor) -> Callable[[tuple[int, BlockKey]], int]:
        """A function run in the workers: read one block ``(i, key)`` into ``into[i]``; returns a result code."""
        flat = into.numpy().data.cast("B")  # zero-copy view of the caller's contiguous buffer
        nbytes = self.full_block_bytes
        read_into = self._verified_reader()

        def read_one(item: tuple[int, BlockKey]) -> int:
            i, key = item
            return read_into(key.digest, flat[i * nbytes : (i + 1) * nbytes])

        return read_one

    def _verified_reader(self) -> Callable[[bytes, memoryview], int]:
        """A function run in the workers: read the block file of a key digest, its payload into a host buffer of
        ``full_block_bytes``; returns a result code.

        One ``preadv`` of [header scratch, payload buffer]; the header is checked, then (verification on) xxh3-64
        of the payload, in the same worker while the block is recent.
        """
        tls = self._tls
        hsize = bf.HEADER_SIZE
        want = hsize + self.full_block_bytes
        check, verify, root = self._checker.check, self._verify, self.root
        xxh3 = xxhash.xxh3_64_intdigest
        open_, preadv, close, fstat, isreg = os.open, os.preadv, os.close, os.fstat, stat.S_ISREG
        flags = _READ_FLAGS

        def read_into(digest: bytes, payload: memoryview) -> int:
            h = digest.hex()
            try:  # never blocks in open (a FIFO, a device), never follows a link
                fd = open_(f"{root}/{h[0:2]}/{h[2:4]}/{h}.kvb", flags)
            except FileNotFoundError:
                return _MISSING
            except OSError:
                return _UNREADABLE
            try:
                if not isreg(fstat(fd).st_mode):  # a directory, FIFO, socket or device where a block should be
                    return _UNREADABLE
                if preadv(fd, [tls.header_mv, payload], 0) != want:
                    return _CORRUPT
            except OSError:
                return _FAILED
            finally:
                close(fd)
            checksum = check(tls.header, digest)
            if checksum is None or (verify and xxh3(payload) != checksum):
                return _CORRUPT
            return _OK

        return read_into

    # --- write ------------------------------------------------------------------------------------------
    async def write(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]:
        self._check_buffer(keys, blocks, "blocks", self.device_type)
        return await self._write_checked(keys, blocks)

    async def _write_checked(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]:
        """:meth:`write` once ``blocks`` passed its checks (``_block_writer`` reads it)."""
        index = self._idx()
        out = [BlockStatus.OK] * len(keys)
        size = self._file_size
        cap = self.config.capacity_bytes
        todo: list[tuple[int, BlockKey, str, bool]] = []
        victims: list[BlockKey] = []
        writing, rewriting = index.writing, index.rewriting
        for i, key in enumerate(keys):
            if key in writing or self.contains(key):
                # stored already (or being stored): OK only once the worker sees the complete file on disk;
                # a file that vanished or was replaced by something else is written again (or FAILED); not
                # evicted meanwhile (an eviction's unlink could otherwise remove the file this write vouches for)
                rewriting[key] = rewriting.get(key, 0) + 1
                todo.append((i, key, bf.block_path(self.root, key.hex), True))
                continue
            victims += self._evict_for(size)
            if cap is not None and index.used + index.reserved + size > cap:
                out[i] = BlockStatus.FAILED
                self._stats.failed += 1
                continue
            index.reserved += size
            writing.add(key)
            todo.append((i, key, bf.block_path(self.root, key.hex), False))
        if victims:
            await anyio.to_thread.run_sync(self._unlink_keys, victims)
        if not todo:
            return out
        writer = self._block_writer(blocks)
        codes: dict[int, int] = {}
        try:
            pool = self._io()
            codes.update((item[0], c) for item, c in zip(todo, await pool.run(writer, todo), strict=True))
            retry = [item for item in todo if codes[item[0]] == _NOSPACE]
            if retry:  # disk full: evict one least-recently-used block per failed one, then try once more
                more: list[BlockKey] = []
                for _ in retry:
                    victim = index.pop_lru()
                    if victim is not None:
                        more.append(victim)
                        self._stats.evictions += 1
                await anyio.to_thread.run_sync(self._unlink_keys, more)
                if more:
                    codes.update((item[0], c) for item, c in zip(retry, await pool.run(writer, retry), strict=True))
        finally:
            for _i, key, _path, existing in todo:
                if existing:
                    left = rewriting.pop(key, 1) - 1
                    if left > 0:
                        rewriting[key] = left
                else:
                    index.reserved -= size
                    writing.discard(key)
        nbytes = self.full_block_bytes
        regrown = False
        for i, key, _path, existing in todo:
            code = codes.get(i)
            if code in (_OK, _EXISTS):
                # visible now: indexed (a no-op for a key already indexed, but refreshes its LRU position). A block
                # another write is storing counts once that write is done; found complete on disk here first, it is
                # indexed now (the other write's reservation still counts it until then). A key the index held when
                # this write began but that a delete or a failed read dropped meanwhile comes back without a
                # reservation: the capacity is checked below.
                regrown |= index.add(key, size) and existing and key not in writing
                if code == _OK:
                    self._stats.writes += 1
                    self._stats.bytes_written += nbytes
            else:
                if existing and key not in writing:
                    index.remove(key)  # what the index claimed is not on disk and could not be written
                out[i] = BlockStatus.FAILED
                self._stats.failed += 1
        # the batch's head most recent (see _RootIndex.touch_many): its tail goes first under the capacity
        index.touch_many([key for i, key, _path, _existing in todo if codes.get(i) in (_OK, _EXISTS)])
        if regrown and cap is not None:  # back under the capacity: evict least-recently-used others
            over = self._evict_for(0)
            if over:
                await anyio.to_thread.run_sync(self._unlink_keys, over)
        return out

    def _block_writer(self, blocks: torch.Tensor) -> Callable[[tuple[int, BlockKey, str, bool]], int]:
        """A function run in the workers: write block ``(i, key, path, existing)`` from ``blocks[i]``; a result
        code. ``existing``: the index says it is stored; ``_EXISTS`` if a complete regular file is there, else
        it is written."""
        flat = blocks.numpy().data.cast("B")
        tls, ns, nbytes = self._tls, self._ns, self.full_block_bytes

        def write_one(item: tuple[int, BlockKey, str, bool]) -> int:
            i, key, path, existing = item
            if existing and self._complete_on_disk(path):
                return _EXISTS
            payload = flat[i * nbytes : (i + 1) * nbytes]
            bf.pack_header(tls.header, ns, key.digest, nbytes, bf.payload_checksum(payload))
            return self._write_file(path, key, [tls.header_mv, payload])

        return write_one

    def _complete_on_disk(self, path: str) -> bool:
        """A regular file of the full block size is at ``path`` (run in a worker: one ``lstat``)."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self._file_size

    def _write_payload(self, fd: int, tmp: str, gpu_payload: Any) -> None:
        raise NotImplementedError  # the kvikio backend writes payloads from GPU memory

    def _write_file(self, path: str, key: BlockKey, parts: list[memoryview], gpu_payload: Any = None) -> int:
        """Write ``parts`` (then ``gpu_payload``, if any) to a temporary file and rename it to ``path``.

        Returns a result code.
        """
        d = os.path.dirname(path)
        tmp = os.path.join(d, f".{key.hex}.{os.getpid()}.{next(_tmp_counter)}{bf.TMP_SUFFIX}")
        fd = -1
        try:
            if d not in self._made_dirs:
                os.makedirs(d, exist_ok=True)
                self._made_dirs.add(d)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _pwritev_all(fd, parts)
            if gpu_payload is not None:
                self._write_payload(fd, tmp, gpu_payload)
            if self._fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
            if self._fsync:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            return _OK
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno == errno.ENOENT:
                self._made_dirs.discard(d)
            return _NOSPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else _FAILED

    # --- delete / damage --------------------------------------------------------------------------------
    async def delete(self, keys: Sequence[BlockKey]) -> None:
        index = self._idx()
        gone = [key for key in keys if index.remove(key) or self._shared]
        if gone:
            await anyio.to_thread.run_sync(self._unlink_keys, gone)

    def damage(self, key: BlockKey, how: DamageKind = "flip") -> bool:
        path = bf.block_path(self.root, key.hex)
        if not os.path.exists(path):
            return False
        if how == "flip":
            with open(path, "r+b") as f:
                f.seek(bf.HEADER_SIZE + self.full_block_bytes // 2)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0xFF]))
        elif how == "truncate":
            os.truncate(path, bf.HEADER_SIZE + self.full_block_bytes // 2)
        elif how == "foreign":
            with open(path, "r+b") as f:
                hdr = bytearray(f.read(bf.HEADER_SIZE))
                _m, _v, _f, _h, _ns, hkey, length, checksum = bf._FMT.unpack_from(hdr, 0)
                bf.pack_header(hdr, bytes(32), hkey, length, checksum)
                f.seek(0)
                f.write(hdr)
        else:
            raise ValueError(f"unknown damage kind {how!r}")
        return True


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _pwritev_all(fd: int, parts: list[memoryview]) -> None:
    total = sum(p.nbytes for p in parts)
    done = os.pwritev(fd, parts, 0)
    while done < total:  # short write: continue from where it stopped
        rest: list[memoryview] = []
        skip = done
        for p in parts:
            if skip >= p.nbytes:
                skip -= p.nbytes
                continue
            rest.append(p[skip:] if skip else p)
            skip = 0
        n = os.pwritev(fd, rest, done)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n
