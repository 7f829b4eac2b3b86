"""The on-disk format of one Full Block file, shared by the ``posix`` and ``kvikio`` backends.

A block file is a fixed 4 KiB header followed by the payload (the Full Block's bytes), so the payload starts
at a 4 KiB-aligned file offset (what O_DIRECT and GPUDirect Storage want). The header holds, little-endian::

    magic   8 B  b"DPKVBLK1"
    version u16  FORMAT_VERSION
    flags   u16  0
    hsize   u32  HEADER_SIZE
    ns      32 B namespace digest (KeyNamespace.digest)
    key     32 B block key digest
    length  u64  payload length in bytes
    sum     u64  xxh3-64 of the payload
    hsum    u64  xxh3-64 of the header bytes before it
    zeros up to HEADER_SIZE

Paths come only from hex digests: ``root/<hex[0:2]>/<hex[2:4]>/<hex>.kvb`` (no traversal possible).
Temporary files are ``.<hex>.<pid>.<n>.tmp`` in the same directory and become visible only by rename.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import xxhash

MAGIC = b"DPKVBLK1"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
BLOCK_SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
_FMT = struct.Struct("<8sHHI32s32sQQ")
_HSUM = struct.Struct("<Q")
_USED = _FMT.size + _HSUM.size  # bytes of the header that carry information


def block_path(root: Path | str, key_hex: str) -> str:
    """The path of the block file of a key (given as its 64-character hex digest)."""
    return f"{os.fspath(root)}/{key_hex[0:2]}/{key_hex[2:4]}/{key_hex}{BLOCK_SUFFIX}"


def file_size(payload_len: int) -> int:
    return HEADER_SIZE + payload_len


def payload_checksum(payload: memoryview | bytes | bytearray) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(out: bytearray | memoryview, ns: bytes, key: bytes, length: int, checksum: int) -> None:
    """Write a header into ``out`` (HEADER_SIZE bytes, zero-filled beyond the used part)."""
    _FMT.pack_into(out, 0, MAGIC, FORMAT_VERSION, 0, HEADER_SIZE, ns, key, length, checksum)
    hsum = xxhash.xxh3_64_intdigest(memoryview(out)[: _FMT.size])
    _HSUM.pack_into(out, _FMT.size, hsum)


def make_header(ns: bytes, key: bytes, length: int, checksum: int) -> bytearray:
    buf = bytearray(HEADER_SIZE)
    pack_header(buf, ns, key, length, checksum)
    return buf


def check_header(hdr: memoryview | bytes | bytearray, ns: bytes, key: bytes, length: int) -> tuple[str | None, int]:
    """Validate a header against what the reader expects.

    Returns ``(problem, checksum)``: ``problem`` is None when the header is good, else a short reason
    (bad magic, foreign namespace, ...); ``checksum`` is the payload checksum the header records.
    """
    if len(hdr) < _USED:
        return "truncated header", 0
    magic, version, _flags, hsize, h_ns, h_key, h_len, h_sum = _FMT.unpack_from(hdr, 0)
    if magic != MAGIC:
        return "bad magic", 0
    (hsum,) = _HSUM.unpack_from(hdr, _FMT.size)
    if hsum != xxhash.xxh3_64_intdigest(memoryview(hdr)[: _FMT.size]):
        return "header checksum mismatch", 0
    if version != FORMAT_VERSION or hsize != HEADER_SIZE:
        return f"unsupported format version {version} / header size {hsize}", 0
    if h_ns != ns:
        return "foreign namespace", 0
    if h_key != key:
        return "key mismatch", 0
    if h_len != length:
        return f"payload length {h_len} != {length}", 0
    return None, h_sum


class HeaderChecker:
    """Fast header check on the read path for one (namespace, payload length): three slice compares.

    The header's own checksum is not needed here: every field but the payload checksum is compared with its
    expected value, and a damaged payload checksum fails the payload verification. With verification off a
    damaged checksum field is harmless. On a mismatch :func:`check_header` gives the reason.
    """

    def __init__(self, ns: bytes, length: int) -> None:
        self.prefix = _FMT.pack(MAGIC, FORMAT_VERSION, 0, HEADER_SIZE, ns, bytes(32), length, 0)[:48]
        self.length = struct.pack("<Q", length)

    def check(self, hdr: bytearray, key: bytes) -> int | None:
        """The recorded payload checksum if the header matches, else None (no allocation but the int)."""
        if not (hdr.startswith(self.prefix) and hdr.startswith(key, 48) and hdr.startswith(self.length, 80)):
            return None
        return int.from_bytes(hdr[88:96], "little")
