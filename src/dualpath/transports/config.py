"""Config of the transport backends (chosen by ``kind``)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from dualpath._configbase import Section


class LoopbackTransportConfig(Section):
    """In one process: ``copy_`` between registered tensors (NVLink/P2P between GPUs, memcpy on a CPU)."""

    kind: Literal["loopback"] = "loopback"


class ZmqTransportConfig(Section):
    """ZeroMQ between processes or hosts; fixed binary header, zero-copy frames, CURVE when keys are set."""

    kind: Literal["zmq"] = "zmq"
    host: str = Field(default="127.0.0.1", description="address to bind; loopback unless configured")
    scheme: Literal["tcp", "ipc"] = "tcp"
    ipc_dir: str = "/tmp"
    curve_secret_key: str | None = Field(default=None, description="z85 secret key of this endpoint")
    curve_public_key: str | None = Field(default=None, description="z85 public key of this endpoint")
    curve_allowed_clients: list[str] = Field(default_factory=list, description="z85 public keys allowed in")
    max_message_bytes: int = Field(default=1 << 30, gt=0)


class NixlTransportConfig(Section):
    """NIXL agents over UCX (RDMA where present; TCP/shared memory otherwise)."""

    kind: Literal["nixl"] = "nixl"
    backend: str = "UCX"
    ucx_tls: str | None = Field(default="tcp,self,sm", description="UCX_TLS to set if unset; None leaves it")
    host: str = "127.0.0.1"


class FaultsTransportConfig(Section):
    """Wraps another transport and drops, delays, corrupts or cuts off peers, for tests."""

    kind: Literal["faults"] = "faults"
    inner: TransportConfig = Field(default_factory=LoopbackTransportConfig)
    seed: int = 0
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    corrupt_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    delay_s: float = Field(default=0.0, ge=0.0)


TransportConfig = Annotated[
    Union[LoopbackTransportConfig, ZmqTransportConfig, NixlTransportConfig, FaultsTransportConfig],
    Field(discriminator="kind"),
]
FaultsTransportConfig.model_rebuild()
