"""GPUDirect Storage through kvikio's ``CuFile``: Full Blocks read straight into, and written straight out of,
GPU memory (GPU machines only; ``kvikio`` and ``torch.cuda`` are imported lazily, at construction).

Same files, format, index, capacity and atomic-rename rules as :mod:`dualpath.storage.posix` (it subclasses
it), so a block written by one backend is read by the other.

Two I/O paths (``io_path``; ``auto`` picks ``gds`` where kvikio uses cuFile and cuFile reports GDS, else
``bounce``):

* ``gds``: per block, ``os.preadv`` of the 4 KiB header into a host buffer, then ``CuFile.raw_read`` of the
  payload (at a 4 KiB-aligned file offset) straight into the caller's CUDA slot, in the calling worker
  (``raw_read`` uses no kvikio thread pool: the workers are the parallelism; ``pread`` queued every block on
  kvikio's pool, one thread by default, and measured 3x slower than posix + H2D on an H200). Writes put the
  header with ``pwrite`` and the payload with ``CuFile.raw_write`` into a temporary file, then rename.
  xxh3-64 has no GPU implementation here, so verifying a read (and a write's checksum) copies the payload into
  a per-thread pinned host buffer and hashes it there: one device-to-host copy per block.
* ``bounce``: without GDS, cuFile and kvikio's compatibility mode move the bytes through host memory anyway. So a
  read is the posix read into a pinned host staging buffer (header checked and payload verified in the workers,
  where the check costs no extra copy), then one host-to-device copy per run of good blocks into the caller's
  buffer; a write is one device-to-host copy of the batch into staging, then the posix write (checksums there).
  Staging buffers are reused between calls, never while a cancelled call's workers may still touch them.

``verify_checksum: false`` skips the payload hash on reads (the header is still checked: magic, namespace, key,
length; the file size is checked too); writes always checksum.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import torch
import xxhash

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.storage import blockfile as bf
from dualpath.storage.base import BlockStatus
from dualpath.storage.posix import (
    _CORRUPT,
    _EXISTS,
    _FAILED,
    _MISSING,
    _OK,
    _READ_FLAGS,
    _UNREADABLE,
    PosixStorage,
)
from dualpath.types import BlockKey


def _require_kvikio() -> Any:
    if not torch.cuda.is_available():
        raise StorageError(
            "kvikio needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            "(kvikio cannot do file I/O without libcuda); use storage.kind: posix here"
        )
    try:
        import kvikio
    except Exception as exc:  # ImportError, or a missing libcufile at import
        raise StorageError(
            f"kvikio is not importable ({exc}); install the gds extra (pip install 'dualpath[gds]')"
        ) from exc
    return kvikio


class _Staging(threading.local):
    """Per worker thread: a pinned host buffer (the gds path's checksums) and a CUDA stream, made on first use."""

    buf: torch.Tensor | None = None
    view: memoryview | None = None
    stream: Any = None


class _StagingPool:
    """Pinned host buffers for the bounce path, lent one per call and reused (the smallest free one that fits)."""

    def __init__(self, keep: int = 8) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        """Back to the pool: only a buffer no worker can still write (the call that took it completed)."""
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self._keep:  # (tensors compare elementwise: by index, not remove())
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


def _ok_runs(status: Sequence[BlockStatus]) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of consecutive OK blocks."""
    runs: list[tuple[int, int]] = []
    lo = None
    for i, st in enumerate([*status, None]):
        if st is BlockStatus.OK:
            lo = i if lo is None else lo
        elif lo is not None:
            runs.append((lo, i))
            lo = None
    return runs


def gds_available(kvikio: Any) -> bool:
    """kvikio uses cuFile (not its POSIX compatibility mode) and cuFile reports GPUDirect Storage."""
    import importlib

    try:
        if importlib.import_module(f"{kvikio.__name__}.defaults").is_compat_mode_preferred():
            return False
        return bool(importlib.import_module(f"{kvikio.__name__}.cufile_driver").get("is_gds_available"))
    except Exception:  # an old kvikio, or a driver that cannot open
        return False


class KvikioStorage(PosixStorage):
    kind = "kvikio"
    device_type = "cuda"

    def __init__(self, config: Any, layout: KVLayout, namespace: KeyNamespace) -> None:
        self._kvikio = _require_kvikio()
        super().__init__(config, layout, namespace)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._staging = _Staging()
        self._stages = _StagingPool()
        path = config.io_path
        self.io_path: str = ("gds" if gds_available(self._kvikio) else "bounce") if path == "auto" else path
        try:
            import cupy

            self._as_array = cupy.asarray  # zero-copy view through __cuda_array_interface__
        except Exception:  # pragma: no cover - kvikio depends on cupy
            self._as_array = lambda t: t

    @property
    def device(self) -> torch.device:
        return self._device

    def _stage(self, nbytes: int) -> _Staging:
        """This worker's staging: a pinned host buffer of ``nbytes`` (none for 0) and a CUDA stream of this
        backend's device."""
        st = self._staging
        if nbytes and (st.buf is None or st.buf.numel() != nbytes):
            st.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            st.view = memoryview(st.buf.numpy()).cast("B")  # type: ignore[arg-type]
        if st.stream is None:
            st.stream = torch.cuda.Stream(self._device)
        return st

    def _caller_event(self) -> Any:
        """An event recorded on the caller's current stream: the workers' copies (on their own streams) and cuFile
        calls wait for it, so they come after the work the caller queued on the buffer before this call."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self._device))
        return ev

    def _host_copy(self, slot: torch.Tensor, after: Any) -> memoryview:
        """``slot`` (GPU) copied into this worker's pinned buffer once ``after`` is reached, the copy finished."""
        st = self._stage(slot.numel())
        assert st.buf is not None and st.view is not None
        st.stream.wait_event(after)
        with torch.cuda.stream(st.stream):
            st.buf.copy_(slot, non_blocking=True)
        st.stream.synchronize()
        return st.view

    # --- the bounce path: whole calls staged in pinned host memory --------------------------------------------
    async def read(self, keys: Sequence[BlockKey], into: torch.Tensor) -> list[BlockStatus]:
        if self.io_path != "bounce":
            return await super().read(keys, into)
        self._check_buffer(keys, into, "into", self.device_type)
        after = self._caller_event()
        buf = self._stages.take(into.numel())
        host = buf[: into.numel()].view(into.shape)
        out = await self._read_checked(keys, host)  # the posix reader: verified in host memory
        runs = _ok_runs(out)
        if runs:
            await anyio.to_thread.run_sync(self._copy_runs, into, host, runs, after)
        self._stages.give(buf)  # not on an exception or cancel: a worker may still be writing into it
        return out

    async def write(self, keys: Sequence[BlockKey], blocks: torch.Tensor) -> list[BlockStatus]:
        if self.io_path != "bounce":
            return await super().write(keys, blocks)
        self._check_buffer(keys, blocks, "blocks", self.device_type)
        after = self._caller_event()  # the caller's kernels that produced `blocks`
        buf = self._stages.take(blocks.numel())
        host = buf[: blocks.numel()].view(blocks.shape)
        await anyio.to_thread.run_sync(self._copy_runs, host, blocks, [(0, len(keys))], after)
        out = await self._write_checked(keys, host)  # the posix writer: checksums in host memory
        self._stages.give(buf)
        return out

    def _copy_runs(self, dst: torch.Tensor, src: torch.Tensor, runs: list[tuple[int, int]], after: Any) -> None:
        """``dst[lo:hi] = src[lo:hi]`` for each run, on this thread's stream once ``after`` is reached; returns
        when the copies are done."""
        st = self._stage(0)
        st.stream.wait_event(after)
        with torch.cuda.stream(st.stream):
            for lo, hi in runs:
                dst[lo:hi].copy_(src[lo:hi], non_blocking=True)
        st.stream.synchronize()

    def _block_reader(self, into: torch.Tensor) -> Callable[[tuple[int, BlockKey]], int]:
        if not into.is_cuda:  # the bounce path's host staging
            return super()._block_reader(into)
        target = into.view(into.shape[0], -1)
        after = self._caller_event()
        tls = self._tls
        nbytes = self.full_block_bytes
        want = bf.HEADER_SIZE + nbytes

        def read_one(item: tuple[int, BlockKey]) -> int:
            i, key = item
            path = bf.block_path(self.root, key.hex)
            try:
                fd = os.open(path, _READ_FLAGS)  # no blocking open, no link followed
            except FileNotFoundError:
                return _MISSING
            except OSError:
                return _UNREADABLE
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return _UNREADABLE
                size = st.st_size
                n = os.preadv(fd, [tls.header_mv], 0)
            except OSError:
                return _FAILED
            finally:
                os.close(fd)
            checksum = self._checker.check(tls.header, key.digest) if n == bf.HEADER_SIZE else None
            if size != want or checksum is None:
                return _CORRUPT
            slot = target[i]
            try:
                after.synchronize()  # cuFile writes outside any stream: the caller's queued work on `into` first
                with self._kvikio.CuFile(path, "r") as f:
                    got = f.raw_read(self._as_array(slot), nbytes, bf.HEADER_SIZE)
            except FileNotFoundError:
                return _MISSING
            except Exception:
                return _FAILED
            if got != nbytes:
                return _CORRUPT
            if self._verify and xxhash.xxh3_64_intdigest(self._host_copy(slot, after)) != checksum:
                return _CORRUPT
            return _OK

        return read_one

    def _block_writer(self, blocks: torch.Tensor) -> Callable[[tuple[int, BlockKey, str, bool]], int]:
        if not blocks.is_cuda:  # the bounce path's host staging
            return super()._block_writer(blocks)
        source = blocks.view(blocks.shape[0], -1)
        tls = self._tls
        nbytes = self.full_block_bytes
        after = self._caller_event()  # the caller's kernels that produced `blocks`

        def write_one(item: tuple[int, BlockKey, str, bool]) -> int:
            i, key, path, existing = item
            if existing and self._complete_on_disk(path):
                return _EXISTS
            slot = source[i]
            checksum = xxhash.xxh3_64_intdigest(self._host_copy(slot, after))
            bf.pack_header(tls.header, self._ns, key.digest, nbytes, checksum)
            return self._write_file(path, key, [tls.header_mv], gpu_payload=slot)

        return write_one

    def _write_payload(self, fd: int, tmp: str, gpu_payload: torch.Tensor) -> None:
        """Put the payload after the header with ``CuFile.raw_write`` (GPU memory to file, in this worker)."""
        with self._kvikio.CuFile(tmp, "r+") as f:
            n = f.raw_write(self._as_array(gpu_payload), gpu_payload.numel(), bf.HEADER_SIZE)
        if n != gpu_payload.numel():
            raise OSError(5, f"CuFile.raw_write wrote {n} of {gpu_payload.numel()} bytes")
