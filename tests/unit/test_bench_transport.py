"""The raw TCP reference of ``dualpath bench transport``: its receiver lands each message, whole, in the landing
slot the rotation names (the reference is only meaningful if it really delivers the bytes)."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch

from dualpath.commands.bench_transport import SLOTS, Child, _raw_tcp_pass


def test_raw_tcp_reference_lands_every_message_in_its_slot() -> None:
    child = Child(["-m", "dualpath.commands.bench_transport", "raw-tcp"], first_timeout=30.0)
    try:
        sock = socket.create_connection(("127.0.0.1", child.first["port"]), timeout=30.0)
        try:
            size = 100_000
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
            assert _raw_tcp_pass(sock, child, src, size, SLOTS + 1) > 0
            want = hashlib.sha256(src.numpy().tobytes()).hexdigest()
            for j in range(SLOTS):  # messages 0..SLOTS landed in slots 0..SLOTS-1 (slot 0 twice)
                child.send(op="digest", slot=j, nbytes=size)
                assert child.read(30.0)["sha256"] == want, j
        finally:
            sock.close()
    finally:
        child.close()


@pytest.mark.slow
@pytest.mark.nixl
def test_raw_batched_nixl_reference_lands_every_message_in_its_slot() -> None:
    """The batched NIXL reference (``ratio_vs_raw_batched``) really writes each message of its multi-descriptor
    WRITEs into the slot the rotation names, and counts one notification per WRITE."""
    pytest.importorskip("nixl_cu12")
    from dualpath.commands.bench_transport import _nixl_agent, _raw_nixl_batched_pass, _window

    size = 64 << 10
    child = Child(["-m", "dualpath.commands.bench_transport", "raw-nixl", str(SLOTS * size)], first_timeout=30.0)
    try:
        agent = _nixl_agent("rawbatchtest")
        src = torch.randint(1, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        agent.register_memory(src)
        remote = agent.add_remote_agent(bytes.fromhex(child.first["md"]))
        count = _window(size) + 3  # whole WRITEs and a short last one
        assert _raw_nixl_batched_pass(agent, remote, child, src, size, count) > 0
        want = hashlib.sha256(src.numpy().tobytes()).hexdigest()
        for j in range(SLOTS):
            child.send(op="digest", slot=j, nbytes=size)
            assert child.read(30.0)["sha256"] == want, j
    finally:
        child.close()
