"""The raw TCP reference of ``dualpath bench transport``: its receiver lands each message, whole, in the landing
slot the rotation names (the reference is only meaningful if it really delivers the bytes)."""

from __future__ import annotations

import hashlib
import socket

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
