"""The cluster on one machine: engines mapped to devices, emulated links, storage and transports by kind, and
the async runner :class:`Cluster` (``async with Cluster(config) as c: await c.run_turn(...)``).

Heavy modules are imported on first attribute access, so ``import dualpath.cluster`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Cluster": "dualpath.cluster.runner",
    "build_model": "dualpath.cluster.runner",
    "resolve_devices": "dualpath.cluster.devices",
    "check_device": "dualpath.cluster.devices",
    "TurnResult": "dualpath.engine.request",
    "TurnTimings": "dualpath.engine.request",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dualpath.cluster' has no attribute {name!r}")
