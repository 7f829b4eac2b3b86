"""``dualpath bench transport``: its raw references land each message, whole, in the landing slot the rotation
names (a reference is only meaningful if it really delivers the bytes); its options are checked."""

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


def test_nixl_config_option_is_checked_and_names_the_field() -> None:
    from dualpath.commands.bench_transport import _nixl_config_arg
    from dualpath.errors import ConfigError

    assert _nixl_config_arg(None) == {}
    assert _nixl_config_arg('{"notif_thread": true}') == {"notif_thread": True}
    with pytest.raises(ConfigError, match="--nixl-config: notif_thred"):
        _nixl_config_arg('{"notif_thred": true}')
    with pytest.raises(ConfigError, match="--nixl-config: notif_poll_s"):
        _nixl_config_arg('{"notif_poll_s": 5}')
    with pytest.raises(ConfigError, match="not JSON"):
        _nixl_config_arg("{notif_thread: true}")
    with pytest.raises(ConfigError, match="JSON object"):
        _nixl_config_arg("[1]")


def test_gpu_passes_are_capped_in_messages_not_bytes() -> None:
    from dualpath.commands.bench_transport import MiB, _counts

    assert _counts(MiB, 256) == 256
    assert _counts(64 * 1024, 4096, 4096) == 4096  # 256 MiB of small messages, not 4 GiB
    assert _counts(16 * MiB, 4096, 4096) == 256
    assert _counts(16 * MiB, 64, 4096) == 8  # never fewer than 8


def test_device_cuda_is_refused_without_a_gpu_or_with_other_backends() -> None:
    import argparse

    import torch

    from dualpath.commands import bench_transport as bt
    from dualpath.errors import ConfigError

    args = argparse.Namespace(quick=True, repeats=None, mib_per_point=None, backends="nixl,zmq", no_links=True,
                              json_out=None, device="cuda", nixl_config=None)
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="drop \\['zmq'\\]"):
            bt.run(args)
    else:
        with pytest.raises(ConfigError, match="--device cuda: this machine has no CUDA GPU"):
            bt.run(args)
