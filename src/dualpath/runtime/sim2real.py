"""Sim-to-real: predict each policy's JCT with the simulator on the same configuration (placeholder)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dualpath.config import DualPathConfig


def sim_to_real(cfg: DualPathConfig, policies: Sequence[str], measured: Mapping[str, Mapping[str, Any]],
                stream: Any = None) -> dict[str, Any]:
    return {}
