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
* ``bounce``: without GDS, cuFile and kvikio's compatibility mode move the bytes through host memory anyway. So
  each worker reads the whole file into its pinned host buffer with the posix reader (header checked, payload
  verified there, where the check costs no extra copy), then copies it to the caller's slot on its own CUDA
  stream. Writes hash a pinned host copy of the payload and write that copy with ``pwritev``.

``verify_checksum: false`` skips the payload hash on reads (the header is still checked: magic, namespace, key,
length; the file size is checked too); writes always checksum.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from typing import Any

import torch
import xxhash

from dualpath.errors import StorageError
from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout
from dualpath.storage import blockfile as bf
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
    """Per worker thread: a pinned host buffer (checksums; the bounce path's payload) and a CUDA stream, made on
    first use."""

    buf: torch.Tensor | None = None
    view: memoryview | None = None
    stream: Any = None


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
        """This worker's staging: a pinned host buffer of ``nbytes`` and a CUDA stream of this backend's device."""
        st = self._staging
        if st.buf is None or st.buf.numel() != nbytes:
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

    def _block_reader(self, into: torch.Tensor) -> Callable[[tuple[int, BlockKey]], int]:
        if self.io_path == "bounce":
            return self._bounce_reader(into)
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

    def _bounce_reader(self, into: torch.Tensor) -> Callable[[tuple[int, BlockKey]], int]:
        """The ``bounce`` path: the posix reader into this worker's pinned buffer (header checked, payload
        verified there), then one host-to-device copy into ``into[i]`` on the worker's stream."""
        target = into.view(into.shape[0], -1)
        nbytes = self.full_block_bytes
        read_into = self._verified_reader()
        after = self._caller_event()

        def read_one(item: tuple[int, BlockKey]) -> int:
            i, key = item
            st = self._stage(nbytes)
            assert st.buf is not None and st.view is not None
            code = read_into(key.digest, st.view)
            if code != _OK:
                return code
            try:
                st.stream.wait_event(after)
                with torch.cuda.stream(st.stream):
                    target[i].copy_(st.buf, non_blocking=True)
                st.stream.synchronize()  # the pinned buffer is reused by this worker's next block
            except RuntimeError:
                return _FAILED
            return _OK

        return read_one

    def _block_writer(self, blocks: torch.Tensor) -> Callable[[tuple[int, BlockKey, str, bool]], int]:
        source = blocks.view(blocks.shape[0], -1)
        tls = self._tls
        nbytes = self.full_block_bytes
        bounce = self.io_path == "bounce"
        after = self._caller_event()  # the caller's kernels that produced `blocks`

        def write_one(item: tuple[int, BlockKey, str, bool]) -> int:
            i, key, path, existing = item
            if existing and self._complete_on_disk(path):
                return _EXISTS
            slot = source[i]
            host = self._host_copy(slot, after)
            bf.pack_header(tls.header, self._ns, key.digest, nbytes, xxhash.xxh3_64_intdigest(host))
            if bounce:  # the bytes are in host memory already: write them from there
                return self._write_file(path, key, [tls.header_mv, host])
            return self._write_file(path, key, [tls.header_mv], gpu_payload=slot)

        return write_one

    def _write_payload(self, fd: int, tmp: str, gpu_payload: torch.Tensor) -> None:
        """Put the payload after the header with ``CuFile.raw_write`` (GPU memory to file, in this worker)."""
        with self._kvikio.CuFile(tmp, "r+") as f:
            n = f.raw_write(self._as_array(gpu_payload), gpu_payload.numel(), bf.HEADER_SIZE)
        if n != gpu_payload.numel():
            raise OSError(5, f"CuFile.raw_write wrote {n} of {gpu_payload.numel()} bytes")
