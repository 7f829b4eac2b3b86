"""Transports: RDMA-style one-sided writes with notification between engines' registered buffers.

Backends by ``kind`` (imported lazily by :func:`create_transport`): ``loopback`` (in process, ``copy_``),
``zmq`` (tcp/ipc, zero-copy frames, CURVE), ``nixl`` (UCX: RDMA, TCP, shared memory), ``faults`` (a
fault-injecting wrapper for tests). The contract is the docstring of :mod:`dualpath.transports.base`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dualpath._lazy import lazy_names
from dualpath.errors import ConfigError
from dualpath.transports.config import (
    FaultsTransportConfig,
    LoopbackTransportConfig,
    NixlTransportConfig,
    TransportConfig,
    ZmqTransportConfig,
)

if TYPE_CHECKING:
    from dualpath.transports.base import Region, Transport, TransportStats, byte_view
    from dualpath.transports.loopback import LoopbackFabric

__all__ = ["Region", "Transport", "TransportStats", "byte_view", "create_transport"]
#: the contract's names, imported on first use (``dualpath.transports.config`` is read by every config and must
#: not import torch)
__getattr__ = lazy_names(__name__, dict.fromkeys(("Region", "Transport", "TransportStats", "byte_view"),
                                                 "dualpath.transports.base"))


def _common(config: LoopbackTransportConfig | ZmqTransportConfig | NixlTransportConfig) -> dict[str, object]:
    return {
        "checksum": config.checksum,
        "max_pending_bytes": config.max_pending_bytes,
        "pending_timeout_s": config.pending_timeout_s,
    }


def create_transport(config: TransportConfig | Mapping[str, Any], name: str, *,
                     fabric: LoopbackFabric | None = None) -> Transport:
    """A (not yet started) transport endpoint called ``name`` for ``config`` (a config object, or a mapping as a
    config file's ``transport`` section holds it, e.g. ``{"kind": "zmq"}``); ``fabric`` is where loopback
    endpoints meet (default: one per process). Use it as ``async with create_transport(...) as t``."""
    if isinstance(config, Mapping):
        from dualpath.config import validate_section

        config = validate_section(TransportConfig, config, "transport")
    if isinstance(config, LoopbackTransportConfig):
        from dualpath.transports.loopback import LoopbackTransport

        return LoopbackTransport(name, fabric=fabric, inline_copy_bytes=config.inline_copy_bytes, **_common(config))
    if isinstance(config, ZmqTransportConfig):
        from dualpath.transports.zmq import ZmqTransport

        return ZmqTransport(name, config)
    if isinstance(config, NixlTransportConfig):
        from dualpath.transports.nixl import NixlTransport

        return NixlTransport(name, config)
    if isinstance(config, FaultsTransportConfig):
        from dualpath.transports.faults import FaultyTransport

        return FaultyTransport(create_transport(config.inner, name, fabric=fabric), config)
    raise ConfigError(f"transport: expected a transport config or a mapping with a 'kind' (loopback, zmq, nixl or "
                      f"faults), got {type(config).__name__}")
