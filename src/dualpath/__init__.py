"""dualpath: dual-path KV-cache loading for agentic LLM inference (arXiv 2602.21548), single-node first.

The public API is re-exported here; importing ``dualpath`` imports neither CUDA, kvikio, NIXL nor Triton.
"""

from dualpath.config import DualPathConfig, load_config
from dualpath.errors import (
    BlockMissing,
    ConfigError,
    CorruptBlock,
    DualPathError,
    EngineError,
    KernelError,
    ModelError,
    PeerTimeout,
    SchedulerError,
    StorageError,
    StorageFull,
    TransportClosed,
    TransportError,
    WorkloadError,
)
from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.types import BlockKey, EngineId, PathKind, Role, TrafficClass

__version__ = "0.1.0"

__all__ = [
    "BlockKey",
    "BlockKeyer",
    "BlockMissing",
    "ConfigError",
    "CorruptBlock",
    "DualPathConfig",
    "DualPathError",
    "EngineError",
    "EngineId",
    "KVLayout",
    "KVSpec",
    "KernelError",
    "KeyNamespace",
    "ModelError",
    "PathKind",
    "PeerTimeout",
    "Role",
    "SchedulerError",
    "StorageError",
    "StorageFull",
    "TrafficClass",
    "TransportClosed",
    "TransportError",
    "WorkloadError",
    "__version__",
    "load_config",
]
