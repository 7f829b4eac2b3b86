"""Config of the transport backends (chosen by ``kind``)."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, model_validator

from dualpath._configbase import Section


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class _Common(Section):
    """Fields every backend shares: integrity check and the hold area for early arrivals."""

    checksum: bool = Field(
        default=False,
        description="carry an xxh3-64 of every payload and verify it before the arrival counts (end to end)",
    )
    max_pending_bytes: int = Field(
        default=256 << 20, ge=0, description="bytes of arrivals held while their tag is not exposed yet"
    )
    pending_timeout_s: float = Field(
        default=10.0, gt=0, description="an arrival whose tag is not exposed within this is dropped"
    )


class LoopbackTransportConfig(_Common):
    """In one process: ``copy_`` between registered tensors (NVLink/P2P between GPUs, memcpy on a CPU)."""

    kind: Literal["loopback"] = "loopback"
    inline_copy_bytes: int = Field(
        default=4 << 20, ge=0, description="copies up to this size run on the event loop in one step; larger host "
        "copies in steps of this size (at least 8 MiB), yielding between; larger copies involving a GPU in a thread"
    )


class ZmqTransportConfig(_Common):
    """ZeroMQ between processes or hosts; fixed binary header, zero-copy frames, CURVE when keys are set."""

    kind: Literal["zmq"] = "zmq"
    host: str = Field(default="127.0.0.1", description="address to bind; loopback unless configured")
    port: int = Field(default=0, ge=0, le=65535, description="tcp port to bind; 0 picks a free one")
    scheme: Literal["tcp", "ipc"] = Field(default="tcp", description=(
        "tcp, or ipc (unix sockets under ipc_dir: one machine only, payloads as zmq frames)"
    ))
    ipc_dir: str = Field(default="/tmp", description="directory of the ipc sockets (scheme: ipc)")
    curve_secret_key: str | None = Field(default=None, description="z85 secret key of this endpoint")
    curve_public_key: str | None = Field(default=None, description="z85 public key of this endpoint")
    curve_allowed_clients: list[str] = Field(default_factory=list, description="z85 public keys allowed in")
    max_message_bytes: int = Field(default=1 << 30, gt=0, description=(
        "largest message a peer may send (libzmq refuses larger ones before buffering them)"
    ))
    inline_copy_bytes: int = Field(
        default=4 << 20, ge=0, description="landing copies up to this size run on the event loop; larger in a thread"
    )
    retain_receive_buffers: bool = Field(
        default=True,
        description="keep freed receive buffers in the process heap (glibc mallopt: mmap threshold 32 MiB, trim "
        "threshold 256 MiB; process-wide, once) instead of returning them to the kernel after each message, so "
        "libzmq's buffer for the next message is not page-faulted in again",
    )
    data_socket: Literal["auto", "zmq", "tcp"] = Field(
        default="auto",
        description="tcp: payloads of at least data_socket_min_bytes travel over one plain TCP connection per sender "
        "and receiver (bound to host), received straight into the landing slot; zmq keeps small writes and the "
        "handshake, which hands out a random per-endpoint secret each data connection must present. Not encrypted: "
        "refused together with CURVE. zmq: every payload travels over zmq. auto (default): tcp when scheme is tcp and "
        "no CURVE key is set, else zmq (faster and lighter on CPU per byte: dualpath bench transport, issue 16)",
    )
    data_socket_min_bytes: int = Field(
        default=64 << 10, ge=0, description="with data_socket: tcp, payloads of at least this many bytes use it"
    )
    data_socket_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="deadline of a data connection's TCP connect and handshake (both sides)"
    )

    @property
    def uses_data_socket(self) -> bool:
        """Whether large payloads take the data socket: ``tcp``, or ``auto`` over tcp without CURVE."""
        if self.data_socket == "auto":
            return self.scheme == "tcp" and self.curve_secret_key is None and self.curve_public_key is None
        return self.data_socket == "tcp"

    @model_validator(mode="after")
    def _data_socket_not_with_curve(self) -> ZmqTransportConfig:
        if self.data_socket == "tcp" and (self.curve_secret_key is not None or self.curve_public_key is not None):
            raise ValueError("data_socket='tcp' cannot be combined with CURVE (curve_secret_key / curve_public_key): "
                             "the data socket is not encrypted; use data_socket='zmq' with CURVE")
        return self


class NixlTransportConfig(_Common):
    """NIXL agents over UCX (RDMA where present; TCP/shared memory otherwise).

    A small ZeroMQ side channel (``host``/``port``) carries agent metadata and the write rendezvous (tag, size
    -> landing address); the bytes themselves move by NIXL WRITE with a notification carrying the tag.
    """

    kind: Literal["nixl"] = "nixl"
    backend: str = Field(default="UCX", description=(
        "the NIXL backend plugin that moves the bytes (UCX: RDMA where present, TCP/shared memory otherwise)"
    ))
    ucx_tls: str | None = Field(
        default="tcp,self,sm", description="UCX_TLS to set if unset (with cuda_copy,cuda_ipc added on a CUDA machine "
        "unless it names a cuda transport); None leaves it"
    )
    host: str = Field(default="127.0.0.1", description="address the side channel binds; loopback unless configured")
    port: int = Field(default=0, ge=0, le=65535, description="side-channel tcp port; 0 picks a free one")
    poll_interval_s: float = Field(
        default=0.0002, gt=0, description="poll period of stalled posted writes (and of notifications without "
        "notif_thread)"
    )
    notif_thread: bool | Literal["auto"] = Field(
        default="auto",
        description="poll notifications on a receiver thread (every notif_poll_s while grants are outstanding, "
        "parked otherwise) instead of on the event loop, whose timed sleeps round up to ~1 ms; the agent then "
        "uses NIXL's agent-wide lock. auto: on with at least 8 usable CPUs. Measured (bench transport, issue "
        "16): on 2 shared cores faster only at 16 MiB and costlier in CPU than the loop's polls; on a 16-core "
        "H200 host, VRAM to VRAM, 1.7-2.9x the loop's throughput at 64 KiB-16 MiB",
    )
    notif_poll_s: float = Field(
        default=0.0001, gt=0, le=0.1, description="the notification thread's nap between polls while notifications come"
    )
    notif_idle_poll_s: float = Field(
        default=0.001, gt=0, le=1.0, description="its nap once 20 ms passed without one (grants still outstanding)"
    )
    @property
    def uses_notif_thread(self) -> bool:
        """``notif_thread`` resolved: ``auto`` is on where this process may use at least 8 CPUs."""
        if self.notif_thread == "auto":
            return usable_cpus() >= 8
        return bool(self.notif_thread)

    progress_thread: bool = Field(
        default=False,
        description="NIXL's own UCX progress thread, created with progress_thread_delay_us (it waits for UCX events "
        "instead of spinning); off: the transport's polls of transfer states and notifications drive progress",
    )
    progress_thread_delay_us: int = Field(
        default=100, ge=1, le=1_000_000,
        description="the NIXL progress thread's delay (NIXL's pthrDelay); 0, the Python wrapper's own choice, "
        "spins a core even when idle, so it is not allowed",
    )


class FaultsTransportConfig(Section):
    """Wraps another transport and drops, delays, corrupts or cuts off peers, for tests (seeded)."""

    kind: Literal["faults"] = "faults"
    inner: TransportConfig = Field(default_factory=LoopbackTransportConfig, description=(
        "the transport config whose writes it damages (any kind)"
    ))
    seed: int = Field(default=0, ge=0, description="seed of the fault draws (the same seed, the same faults)")
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "share of writes lost on the way (their waits end at the deadline)"
    ))
    corrupt_rate: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "share of writes whose bytes are flipped in flight (caught with checksum: true)"
    ))
    delay_s: float = Field(default=0.0, ge=0.0, description="extra seconds every write takes")
    cut_peers: list[str] = Field(default_factory=list, description="peers every write to which never arrives")


TransportConfig = Annotated[
    LoopbackTransportConfig | ZmqTransportConfig | NixlTransportConfig | FaultsTransportConfig,
    Field(discriminator="kind"),
]
FaultsTransportConfig.model_rebuild()
