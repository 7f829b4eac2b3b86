"""The binary header codec of the socket transports and the landing table's bookkeeping."""

from __future__ import annotations

import struct

import pytest
import torch

from dualpath.errors import TransportError
from dualpath.transports.base import Region, byte_view
from dualpath.transports.landing import LandingTable, Rejected
from dualpath.transports.wire import (
    HEADER_BYTES,
    Header,
    Kind,
    Status,
    WireError,
    checksum_of,
    decode,
    encode,
)


def test_roundtrip_every_field() -> None:
    h = Header(Kind.DATA, 2**40 + 3, "layer/3/blk/é", 16 << 20, 0xDEADBEEF12345678, Status.OK, 77, b"pe0")
    raw = encode(h)
    assert raw[:4] == b"DPTX" and len(raw) == HEADER_BYTES + len("layer/3/blk/é".encode()) + 3
    assert decode(raw) == h
    assert decode(encode(Header(Kind.ACK, 1, "t", status=Status.CORRUPT, extra=b"why"))).checksum is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"NOPE" + b[4:], "bad magic"),
        (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
        (lambda b: b[:5] + bytes([99]) + b[6:], "unknown message kind"),
        (lambda b: b[:12], "shorter"),
        (lambda b: b[:8] + struct.pack("<H", 5000) + b[10:], "tag length"),
        (lambda b: b[:HEADER_BYTES] + b"\xff\xfe", "UTF-8"),
    ],
)
def test_bad_headers_name_the_problem(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    raw = encode(Header(Kind.DATA, 1, "ab", 10))
    with pytest.raises(WireError, match=reason):
        decode(mutate(raw))


def test_tag_too_long_and_checksum_matches_bytes() -> None:
    with pytest.raises(TransportError, match="at most"):
        encode(Header(Kind.DATA, 1, "x" * 2000))
    t = torch.arange(100, dtype=torch.float32)
    assert checksum_of(t) == checksum_of(t.numpy().tobytes())
    assert checksum_of(t) != checksum_of((t + 1).numpy().tobytes())


def test_region_views_and_byte_view() -> None:
    t = torch.zeros(4, 8, dtype=torch.bfloat16)
    r = Region(t, "x")
    assert r.nbytes == 64 and r.view(8, 16).numel() == 16
    assert r.contains(t[1]) and not r.contains(torch.zeros(4))
    with pytest.raises(TransportError, match="does not fit"):
        r.view(60, 8)
    with pytest.raises(TransportError, match="not contiguous"):
        byte_view(t.t())


def test_landing_table_claim_rules() -> None:
    lt = LandingTable("me", max_pending_bytes=100, pending_timeout_s=1.0)
    view = torch.zeros(10, dtype=torch.uint8)
    assert lt.claim("t", 10) is None  # not exposed
    lt.expose("t", view)
    with pytest.raises(Rejected, match="size mismatch"):
        lt.claim("t", 11)
    lt.expose("u", view)
    slot = lt.claim("u", 10)
    assert slot is not None and slot.state == "busy"
    with pytest.raises(Rejected, match="duplicate"):
        lt.claim("u", 10)
    assert lt.reserve_pending(60) and not lt.reserve_pending(60)
    lt.release_pending(60)
    assert lt.reserve_pending(100)
