"""The binary header codec of the socket transports and the landing table's bookkeeping."""

from __future__ import annotations

import platform
import struct
import sys

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
    pack_acks,
    pack_dones,
    pack_grants,
    unpack_acks,
    unpack_dones,
    unpack_grants,
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


def test_claim_exact_claims_only_an_idle_host_slot_of_that_size() -> None:
    """zmq writes an arrival into the slot ``claim_exact`` gives before it sees the arrival's real size, so it
    must give nothing (and change nothing) unless the slot is idle, in host memory and exactly that size."""
    t = torch.zeros(64, dtype=torch.uint8)
    r = Region(t, "x")
    host = r.host_view(16, 8)
    assert host is not None and len(host) == 8
    host[0] = 7
    assert int(t[16]) == 7  # the memoryview writes the region's own bytes
    lt = LandingTable("me", max_pending_bytes=100, pending_timeout_s=1.0)
    assert lt.claim_exact("t", 8) is None  # not exposed
    lt.expose("t", r.view(16, 8), host)
    assert lt.claim_exact("t", 9) is None and lt.claim_exact("t", 7) is None  # another size: left to claim()
    lt.expose("dev", r.view(0, 8))  # no host view (as for a device region)
    assert lt.claim_exact("dev", 8) is None
    assert lt.claim("dev", 8) is not None
    slot = lt.claim_exact("t", 8)
    assert slot is not None and slot.state == "busy" and slot.host is host
    assert lt.claim_exact("t", 8) is None  # busy now
    with pytest.raises(Rejected, match="duplicate"):
        lt.claim("t", 8)
    lt.cancel("t")
    lt.expose("t", r.view(16, 8), host)
    lt.close()
    assert lt.claim_exact("t", 8) is None


def test_ack_batches_round_trip_and_reject_damage() -> None:
    acks = [encode(Header(Kind.ACK, 10 + i, f"tag{i}", status=st, extra=reason.encode()))
            for i, (st, reason) in enumerate([(Status.OK, ""), (Status.REJECTED, "size mismatch"), (Status.OK, "")])]
    assert pack_acks(acks[:1]) == acks[0]  # one ack travels as itself (what a plain DEALER test peer reads)
    assert [(h.seq, h.tag, h.status) for h in unpack_acks(acks[0])] == [(10, "tag0", Status.OK)]
    batch = pack_acks(acks)
    got = unpack_acks(batch)
    assert [(h.seq, h.tag, h.status, h.extra) for h in got] == [
        (10, "tag0", Status.OK, b""), (11, "tag1", Status.REJECTED, b"size mismatch"), (12, "tag2", Status.OK, b"")]
    with pytest.raises(WireError, match="truncated"):
        unpack_acks(batch[:-3])
    data = encode(Header(Kind.DATA, 1, "t", 4))
    body = len(data).to_bytes(4, "little") + data
    with pytest.raises(WireError, match="inside an ack batch"):
        unpack_acks(encode(Header(Kind.ACKS, 0, "", payload_len=1, extra=body)))
    with pytest.raises(WireError, match="says 2 acks"):
        unpack_acks(encode(Header(Kind.ACKS, 0, "", payload_len=2, extra=len(acks[0]).to_bytes(4, "little") + acks[0])))


def test_grant_batches_round_trip_and_reject_damage() -> None:
    """nixl pushes a request group's grants as one GRANTS frame: every field survives, and a damaged frame is
    refused whole (a sender never writes under half a grant)."""
    grants = [("r7/kv/l0/p0", 0x7F00_0000_1000, 1 << 20, 11, 0, 0), ("r7/kv/é/p1", 2**63 + 5, 4096, 2**40, 1, 3)]
    frame = pack_grants(grants, md_epoch=9)
    hdr = decode(frame)
    assert hdr.kind is Kind.GRANTS and hdr.seq == 0 and hdr.arg == 9 and hdr.payload_len == 2
    assert unpack_grants(hdr) == [("r7/kv/l0/p0", 0x7F00_0000_1000, 1 << 20, 11, "DRAM", 0),
                                  ("r7/kv/é/p1", 2**63 + 5, 4096, 2**40, "VRAM", 3)]
    assert unpack_grants(decode(pack_grants([], 1))) == []
    with pytest.raises(WireError, match="tags are 18 characters, its grants name 21"):
        unpack_grants(decode(frame[:-3]))  # the last tag cut short
    with pytest.raises(WireError, match="truncated"):
        unpack_grants(Header(Kind.GRANTS, 0, "", 4, arg=9, extra=hdr.extra))  # says 4 grants, carries 2
    entry = struct.pack("<QQQBHH", 1, 2, 3, 7, 0, 1) + b"t"  # memory kind 7: neither DRAM nor VRAM
    with pytest.raises(WireError, match="memory kind 7"):
        unpack_grants(Header(Kind.GRANTS, 0, "", 1, extra=entry))
    with pytest.raises(WireError, match="UTF-8"):
        unpack_grants(Header(Kind.GRANTS, 0, "", 1, extra=struct.pack("<QQQBHH", 1, 2, 3, 0, 0, 1) + b"\xff"))


def test_completion_batches_round_trip_and_reject_damage() -> None:
    """One nixl WRITE that filled several landings is announced by one DONES notification naming each: every
    field survives, and a damaged one is refused whole (no landing of it completes)."""
    dones = [("r7/kv/l0/p0", 1 << 20, 11), ("r7/kv/é/p1", 4096, 2**40)]
    hdr = decode(pack_dones(5, dones))
    assert hdr.kind is Kind.DONES and hdr.seq == 5 and hdr.payload_len == 2 and hdr.checksum is None
    assert unpack_dones(hdr) == dones
    assert unpack_dones(decode(pack_dones(1, []))) == []
    with pytest.raises(WireError, match="tags are 18 characters, its landings name 21"):
        unpack_dones(decode(pack_dones(5, dones)[:-3]))  # the last tag cut short
    with pytest.raises(WireError, match="truncated"):
        unpack_dones(Header(Kind.DONES, 0, "", 4, extra=hdr.extra))  # says 4 landings, carries 2
    with pytest.raises(WireError, match="tag length 0"):
        unpack_dones(Header(Kind.DONES, 0, "", 1, extra=struct.pack("<QQH", 1, 2, 0)))
    with pytest.raises(WireError, match="UTF-8"):
        unpack_dones(Header(Kind.DONES, 0, "", 1, extra=struct.pack("<QQH", 1, 2, 1) + b"\xff"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_zmq_receive_buffer_tuning_takes_effect_once() -> None:
    from dualpath.transports import zmq as zt

    assert zt.retain_receive_buffers() is True  # mallopt accepted both thresholds
    assert zt.retain_receive_buffers() is True  # and it is done once per process
    assert zt.MMAP_THRESHOLD <= 32 << 20  # glibc refuses more than HEAP_MAX_SIZE / 2
