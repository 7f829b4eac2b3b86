"""Fixed binary header of the socket-based transports (no pickle): struct + tag bytes + optional text.

Layout (little endian, 44 bytes): magic ``b"DPTX"``, version u8, kind u8, flags u8, status u8, tag length u16,
reserved u16, sequence u64, payload length u64, xxh3-64 checksum u64, argument u64 (kind-specific: a remote
address for the NIXL rendezvous); then the UTF-8 tag, then (acks only) a UTF-8 reason.

:data:`Kind.GRANTS` packs many NIXL grants in one frame (:func:`pack_grants`): the header (``payload_len``: how
many, ``arg``: the receiver's metadata epoch), then per grant ``<QQQBHH>`` (address, bytes, epoch, memory kind
0 DRAM / 1 VRAM, device, tag length in characters), then every tag, concatenated, as one UTF-8 string (one
decode for the batch).

:data:`Kind.DONES` is the notification of one NIXL WRITE that filled several landings (:func:`pack_dones`): the
header (``payload_len``: how many), then per landing ``<QQH>`` (bytes, grant epoch, tag length in characters),
then every tag, concatenated, as one UTF-8 string.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import torch
import xxhash

from dualpath.errors import TransportError
from dualpath.transports.landing import MAX_TAG_BYTES

MAGIC = b"DPTX"
VERSION = 1
_STRUCT = struct.Struct("<4sBBBBHHQQQQ")
HEADER_BYTES = _STRUCT.size
FLAG_CHECKSUM = 1


class Kind(enum.IntEnum):
    DATA = 1  # header + payload frame: land these bytes under tag
    ACK = 2  # status of DATA / DONE seq
    REQ = 3  # nixl: may I write payload_len bytes to tag? (arg: unused)
    GRANT = 4  # nixl: write them at address arg (status != OK: refused, reason follows)
    DONE = 5  # nixl: the WRITE for seq completed (checksum when flagged)
    HELLO = 6  # nixl: agent metadata in the extra bytes; zmq: the data socket offer (address and secret)
    ACKS = 7  # zmq: several ACKs in one frame (payload_len: how many; extra: each as u32 length + ACK frame)
    GRANTS = 8  # nixl: several pushed grants in one frame (payload_len: how many; arg: metadata epoch)
    DONES = 9  # nixl: one WRITE of several landings completed (payload_len: how many; no checksum)


class Status(enum.IntEnum):
    OK = 0
    REJECTED = 1
    CORRUPT = 2
    CLOSED = 3
    BAD = 4


_KINDS = {int(k): k for k in Kind}  # dict lookups: an Enum call per field costs more than the whole unpack
_STATUSES = {int(st): st for st in Status}
_LEN = struct.Struct("<I")


class WireError(TransportError):
    """A message whose header cannot be decoded (bad magic, version, kind or lengths)."""


@dataclass(slots=True)
class Header:  # not frozen: a frozen dataclass's __init__ costs ~3x (object.__setattr__ per field), per message
    kind: Kind
    seq: int
    tag: str
    payload_len: int = 0
    checksum: int | None = None
    status: Status = Status.OK
    arg: int = 0
    extra: bytes = b""


def encode(h: Header) -> bytes:
    return encode_fields(h.kind, h.seq, h.tag.encode("utf-8"), h.payload_len, h.checksum, h.status, h.arg, h.extra)


def encode_fields(kind: int, seq: int, tag: bytes, payload_len: int = 0, checksum: int | None = None,
                  status: int = 0, arg: int = 0, extra: bytes = b"") -> bytes:
    """:func:`encode` from the fields, the tag already UTF-8 (a per-write path builds no :class:`Header`)."""
    if len(tag) > MAX_TAG_BYTES:
        raise TransportError(f"tag is {len(tag)} bytes; at most {MAX_TAG_BYTES}")
    flags = FLAG_CHECKSUM if checksum is not None else 0
    return _STRUCT.pack(MAGIC, VERSION, kind, flags, status, len(tag), 0, seq, payload_len, checksum or 0,
                        arg) + tag + extra


def decode(buf: bytes | memoryview) -> Header:
    mv = memoryview(buf)
    if len(mv) < HEADER_BYTES:
        raise WireError(f"header is {len(mv)} bytes, shorter than {HEADER_BYTES}")
    magic, version, kind, flags, status, tag_len, _res, seq, plen, csum, arg = _STRUCT.unpack_from(mv)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise WireError(f"unsupported header version {version} (this build speaks {VERSION})")
    k = _KINDS.get(kind)
    st = _STATUSES.get(status)
    if k is None or st is None:
        raise WireError(f"unknown message kind {kind} or status {status}")
    if tag_len > MAX_TAG_BYTES or HEADER_BYTES + tag_len > len(mv):
        raise WireError(f"tag length {tag_len} does not fit a {len(mv)}-byte header frame")
    try:
        tag = bytes(mv[HEADER_BYTES : HEADER_BYTES + tag_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("tag is not valid UTF-8") from None
    extra = bytes(mv[HEADER_BYTES + tag_len :])
    return Header(k, seq, tag, plen, csum if flags & FLAG_CHECKSUM else None, st, arg, extra)


def pack_acks(acks: list[bytes]) -> bytes:
    """One frame carrying several encoded ACK frames (a receiver acknowledges a poll round's arrivals from one
    sender with one socket send); a single ACK goes as itself."""
    if len(acks) == 1:
        return acks[0]
    body = b"".join(_LEN.pack(len(a)) + a for a in acks)
    return encode(Header(Kind.ACKS, 0, "", payload_len=len(acks), extra=body))


def unpack_acks(frame: bytes | memoryview) -> list[Header]:
    """The ACK headers in a frame: a plain ACK, or the :data:`Kind.ACKS` batch :func:`pack_acks` makes."""
    hdr = decode(frame)
    if hdr.kind is not Kind.ACKS:
        return [hdr]
    body = memoryview(hdr.extra)
    out: list[Header] = []
    pos = 0
    while pos < len(body):
        if pos + _LEN.size > len(body):
            raise WireError("truncated ack batch")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if pos + n > len(body):
            raise WireError("truncated ack batch")
        ack = decode(body[pos : pos + n])
        if ack.kind is not Kind.ACK:
            raise WireError(f"a {ack.kind.name} inside an ack batch")
        out.append(ack)
        pos += n
    if len(out) != hdr.payload_len:
        raise WireError(f"ack batch says {hdr.payload_len} acks, carries {len(out)}")
    return out


_GRANT = struct.Struct("<QQQBHH")
MEM_KINDS = ("DRAM", "VRAM")  # a grant's memory kind on the wire: its index here


def pack_grants(grants: list[tuple[str, int, int, int, int, int]], md_epoch: int) -> bytes:
    """One :data:`Kind.GRANTS` frame for ``(tag, address, nbytes, epoch, memory kind index, device)`` grants
    (tags checked by the landing table that exposed them)."""
    pack = _GRANT.pack
    fixed = b"".join([pack(addr, nbytes, epoch, mem, dev, len(tag)) for tag, addr, nbytes, epoch, mem, dev in grants])
    tags = "".join([g[0] for g in grants]).encode("utf-8")
    return encode_fields(Kind.GRANTS, 0, b"", len(grants), None, Status.OK, md_epoch, fixed + tags)


def _tagged_entries(hdr: Header, entry: struct.Struct, what: str, items: str) -> tuple[str, list[tuple[int, ...]]]:
    """A batch frame's fixed-size entries and its tags (one UTF-8 string), or :class:`WireError` when the body
    is shorter than ``payload_len`` entries or the tags are not UTF-8."""
    count, body = hdr.payload_len, hdr.extra
    split = count * entry.size
    if split > len(body):
        raise WireError(f"truncated {what} batch ({len(body)} bytes for {count} {items})")
    try:
        tags = body[split:].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"the {what}s' tags are not valid UTF-8") from None
    return tags, list(entry.iter_unpack(body[:split])) if count else []


def _all_tags_named(tags: str, pos: int, what: str, items: str) -> None:
    if pos != len(tags):
        raise WireError(f"{what} batch's tags are {len(tags)} characters, its {items} name {pos}")


def unpack_grants(hdr: Header) -> list[tuple[str, int, int, int, str, int]]:
    """The ``(tag, address, nbytes, epoch, memory kind, device)`` grants of a :data:`Kind.GRANTS` header;
    :class:`WireError` on a truncated or inconsistent frame (nothing of it is used then)."""
    tags, entries = _tagged_entries(hdr, _GRANT, "grant", "grants")
    out = []
    pos = 0
    for addr, nbytes, epoch, mem, dev, n in entries:
        if n == 0 or n > MAX_TAG_BYTES or mem >= len(MEM_KINDS):
            raise WireError(f"bad grant in a batch (tag length {n}, memory kind {mem})")
        out.append((tags[pos : pos + n], addr, nbytes, epoch, MEM_KINDS[mem], dev))
        pos += n
    _all_tags_named(tags, pos, "grant", "grants")
    return out


_DONE = struct.Struct("<QQH")


def pack_dones(seq: int, dones: list[tuple[str, int, int]]) -> bytes:
    """One :data:`Kind.DONES` notification for ``(tag, nbytes, epoch)`` landings written by one WRITE."""
    pack = _DONE.pack
    fixed = b"".join([pack(nbytes, epoch, len(tag)) for tag, nbytes, epoch in dones])
    tags = "".join([d[0] for d in dones]).encode("utf-8")
    return encode_fields(Kind.DONES, seq, b"", len(dones), None, Status.OK, 0, fixed + tags)


def unpack_dones(hdr: Header) -> list[tuple[str, int, int]]:
    """The ``(tag, nbytes, epoch)`` landings of a :data:`Kind.DONES` header; :class:`WireError` on a truncated
    or inconsistent one (none of it is used then)."""
    tags, entries = _tagged_entries(hdr, _DONE, "completion", "landings")
    out = []
    pos = 0
    for nbytes, epoch, n in entries:
        if n == 0 or n > MAX_TAG_BYTES:
            raise WireError(f"bad completion in a batch (tag length {n})")
        out.append((tags[pos : pos + n], nbytes, epoch))
        pos += n
    _all_tags_named(tags, pos, "completion", "landings")
    return out


def checksum_of(data: torch.Tensor | bytes | memoryview) -> int:
    """xxh3-64 of a byte buffer or of a tensor's bytes (GPU tensors are copied to the host first)."""
    if isinstance(data, torch.Tensor):
        t = data.reshape(-1)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        if t.device.type != "cpu":
            t = t.cpu()
        return xxhash.xxh3_64_intdigest(t.numpy().data)
    return xxhash.xxh3_64_intdigest(data)
