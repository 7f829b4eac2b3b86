"""dualpath: dual-path KV-cache loading for agentic LLM inference (arXiv 2602.21548), single-node first.

The public API is what :data:`__all__` lists; ``docs/library.md`` shows it in use. Importing ``dualpath`` imports
neither torch, CUDA, kvikio, NIXL, ZeroMQ, transformers nor Triton: the cluster, the backends, the scheduler and the
simulator are imported on first use of their names.

* configuration: :func:`load_config` (a file, a mapping, a config object, keyword sections; ``preset="demo"``
  is ``dualpath run``'s default), :class:`DualPathConfig`;
* running: :class:`Session` (sync) / :class:`AsyncSession`, :func:`create_cluster` / :class:`Cluster`,
  :func:`create_scheduler` / :class:`GlobalScheduler` / :class:`SchedulerDriver`; every turn API returns a
  :class:`TurnResult`; :func:`run_workload` is the whole ``dualpath run`` job; :func:`run_sync`;
* storage and transports on their own: :func:`create_storage`, :func:`create_transport`, :class:`KVLayout`,
  :class:`KVSpec`, :class:`KeyNamespace`, :class:`BlockKeyer`, :class:`BlockKey`;
* models: :func:`load_model`, :func:`load_tokenizer`; the simulator: :func:`simulate`,
  :func:`scenario_from_preset`, :class:`SimScenario`;
* errors: :class:`DualPathError` and its family.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from dualpath.api import (
    AsyncSession,
    Session,
    create_cluster,
    create_scheduler,
    load_tokenizer,
    run_sync,
    run_workload,
)
from dualpath.config import DualPathConfig, load_config
from dualpath.errors import (
    BlockMissing,
    CapacityError,
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
    TransportRejected,
    WorkloadError,
)
from dualpath.types import BlockKey, EngineId, PathKind, Role, TrafficClass

if TYPE_CHECKING:  # the lazy names below, for type checkers and IDEs
    from dualpath.cluster.runner import Cluster
    from dualpath.engine.request import TurnResult, TurnTimings
    from dualpath.kv.keys import BlockKeyer, KeyNamespace
    from dualpath.kv.layout import KVLayout, KVSpec
    from dualpath.model.loader import load_model
    from dualpath.runtime.app import RunOutcome, RunRequest, execute
    from dualpath.scheduler.core import GlobalScheduler
    from dualpath.scheduler.driver import SchedulerDriver
    from dualpath.scheduler.params import SchedulerParams
    from dualpath.scheduler.policies import POLICIES, Policy, get_policy
    from dualpath.sim import SimScenario, scenario_from_preset, simulate
    from dualpath.storage import Storage, create_storage
    from dualpath.transports import Transport, create_transport

__version__ = "0.1.0"

#: public names imported on first access (they pull torch-heavy or optional modules)
_LAZY = {
    "BlockKeyer": "dualpath.kv.keys",
    "KeyNamespace": "dualpath.kv.keys",
    "KVLayout": "dualpath.kv.layout",
    "KVSpec": "dualpath.kv.layout",
    "Cluster": "dualpath.cluster.runner",
    "TurnResult": "dualpath.engine.request",
    "TurnTimings": "dualpath.engine.request",
    "SchedulerDriver": "dualpath.scheduler.driver",
    "GlobalScheduler": "dualpath.scheduler.core",
    "SchedulerParams": "dualpath.scheduler.params",
    "Policy": "dualpath.scheduler.policies",
    "POLICIES": "dualpath.scheduler.policies",
    "get_policy": "dualpath.scheduler.policies",
    "Storage": "dualpath.storage",
    "create_storage": "dualpath.storage",
    "Transport": "dualpath.transports",
    "create_transport": "dualpath.transports",
    "load_model": "dualpath.model.loader",
    "simulate": "dualpath.sim",
    "scenario_from_preset": "dualpath.sim",
    "SimScenario": "dualpath.sim",
    "RunRequest": "dualpath.runtime.app",
    "RunOutcome": "dualpath.runtime.app",
    "execute": "dualpath.runtime.app",
}

#: old names still importable from ``dualpath`` with a DeprecationWarning: name -> (module, attribute, use instead)
_DEPRECATED: dict[str, tuple[str, str, str]] = {
    "TurnOutcome": ("dualpath.runtime.clients", "TurnOutcome", "dualpath.TurnResult"),
}

__all__ = [
    "POLICIES",
    "AsyncSession",
    "BlockKey",
    "BlockKeyer",
    "BlockMissing",
    "Cluster",
    "ConfigError",
    "CorruptBlock",
    "DualPathConfig",
    "DualPathError",
    "EngineError",
    "CapacityError",
    "EngineId",
    "GlobalScheduler",
    "KVLayout",
    "KVSpec",
    "KernelError",
    "KeyNamespace",
    "ModelError",
    "PathKind",
    "PeerTimeout",
    "Policy",
    "Role",
    "RunOutcome",
    "RunRequest",
    "SchedulerDriver",
    "SchedulerError",
    "SchedulerParams",
    "Session",
    "SimScenario",
    "Storage",
    "StorageError",
    "StorageFull",
    "TrafficClass",
    "Transport",
    "TransportClosed",
    "TransportError",
    "TransportRejected",
    "TurnResult",
    "TurnTimings",
    "WorkloadError",
    "__version__",
    "create_cluster",
    "create_scheduler",
    "create_storage",
    "create_transport",
    "execute",
    "get_policy",
    "load_config",
    "load_model",
    "load_tokenizer",
    "run_sync",
    "run_workload",
    "scenario_from_preset",
    "simulate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        module, attr, instead = _DEPRECATED[name]
        warnings.warn(f"dualpath.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dualpath' has no attribute {name!r}")


def __dir__() -> list[str]:  # the public names and the module's own dunders (not its imports: Any, warnings, ...)
    return sorted(set(__all__) | {n for n in globals() if n.startswith("__") and n.endswith("__")})
