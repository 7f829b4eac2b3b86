"""The control plane of a multi-process deployment (``dualpath serve``).

:mod:`.protocol` (validated msgpack messages), :mod:`.channel` (ZeroMQ request/reply with deadlines, CURVE),
:mod:`.enginehost` (one engine per process), :mod:`.schedulerd` (the scheduler process), :mod:`.client`
(submit trajectories to a running deployment), :mod:`.launcher` (spawn and supervise the processes).
Heavy modules are imported by whoever needs them; ``import dualpath.control`` stays light.
"""

from __future__ import annotations

from dualpath.control.config import ServeConfig

__all__ = ["ServeConfig"]
