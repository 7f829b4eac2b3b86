"""GPUDirect Storage through kvikio's ``CuFile``: Full Blocks read straight into, and written straight out of,
GPU memory (GPU machines only; ``kvikio`` and ``torch.cuda`` are imported lazily, at construction).

Same files, format, index, capacity and atomic-rename rules as :mod:`dualpath.storage.posix` (it subclasses
it), so a block written by one backend is read by the other. Per block: ``os.preadv`` of the 4 KiB header into
a host buffer, then ``CuFile.pread`` of the payload (at a 4 KiB-aligned file offset) into the caller's CUDA slot.
Writes put the header with ``pwrite`` and the payload with ``CuFile.pwrite`` from the GPU into a temporary file,
then rename.

Checksums: xxh3-64 has no GPU implementation here, so verifying a read (and computing a write's checksum)
copies the payload into a per-thread pinned host buffer (preallocated once per worker thread) and hashes it
there. That costs one device-to-host copy per block; ``verify_checksum: false`` skips it on reads (the header
is still checked: magic, namespace, key, length; the file size is checked too), writes always checksum.
Without kvikio, KVIKIO_COMPAT_MODE makes kvikio fall back to POSIX I/O through bounce buffers.
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
    """Per worker thread: a pinned host buffer for checksums, allocated on first use."""

    buf: torch.Tensor | None = None


class KvikioStorage(PosixStorage):
    kind = "kvikio"
    device_type = "cuda"

    def __init__(self, config: Any, layout: KVLayout, namespace: KeyNamespace) -> None:
        self._kvikio = _require_kvikio()
        super().__init__(config, layout, namespace)
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._staging = _Staging()
        try:
            import cupy

            self._as_array = cupy.asarray  # zero-copy view through __cuda_array_interface__
        except Exception:  # pragma: no cover - kvikio depends on cupy
            self._as_array = lambda t: t

    @property
    def device(self) -> torch.device:
        return self._device

    def _host_copy(self, slot: torch.Tensor) -> memoryview:
        buf = self._staging.buf
        if buf is None or buf.numel() != slot.numel():
            buf = self._staging.buf = torch.empty(slot.numel(), dtype=torch.uint8, pin_memory=True)
        with torch.cuda.device(slot.device):
            buf.copy_(slot)  # synchronous: a pinned destination on the current stream, then synchronized
            torch.cuda.current_stream(slot.device).synchronize()
        return memoryview(buf.numpy())  # type: ignore[arg-type]

    def _block_reader(self, into: torch.Tensor) -> Callable[[tuple[int, BlockKey]], int]:
        target = into.view(into.shape[0], -1)
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
                with self._kvikio.CuFile(path, "r") as f:
                    got = f.pread(self._as_array(slot), nbytes, bf.HEADER_SIZE).get()
            except FileNotFoundError:
                return _MISSING
            except Exception:
                return _FAILED
            if got != nbytes:
                return _CORRUPT
            if self._verify and xxhash.xxh3_64_intdigest(self._host_copy(slot)) != checksum:
                return _CORRUPT
            return _OK

        return read_one

    def _block_writer(self, blocks: torch.Tensor) -> Callable[[tuple[int, BlockKey, str, bool]], int]:
        source = blocks.view(blocks.shape[0], -1)
        tls = self._tls
        nbytes = self.full_block_bytes

        def write_one(item: tuple[int, BlockKey, str, bool]) -> int:
            i, key, path, existing = item
            if existing and self._complete_on_disk(path):
                return _EXISTS
            slot = source[i]
            checksum = xxhash.xxh3_64_intdigest(self._host_copy(slot))
            bf.pack_header(tls.header, self._ns, key.digest, nbytes, checksum)
            return self._write_file(path, key, [tls.header_mv], gpu_payload=slot)

        return write_one

    def _write_payload(self, fd: int, tmp: str, gpu_payload: torch.Tensor) -> None:
        """Put the payload after the header with ``CuFile.pwrite`` (GPU memory to file)."""
        with self._kvikio.CuFile(tmp, "r+") as f:
            n = f.pwrite(self._as_array(gpu_payload), gpu_payload.numel(), bf.HEADER_SIZE).get()
        if n != gpu_payload.numel():
            raise OSError(5, f"CuFile.pwrite wrote {n} of {gpu_payload.numel()} bytes")
