"""Discrete-event simulator of a DualPath cluster of any size, driven by the runtime's scheduler core.

``simulate(scenario, policies) -> SimResult``; scenarios from presets (:func:`scenario_from_preset`) or from
explicit numbers (:class:`SimScenario`, e.g. for sim-to-real with :class:`ProfiledCompute`).
"""

from __future__ import annotations

from dualpath.sim.compute import ProfiledCompute, RooflineCompute
from dualpath.sim.presets import GPUS, MODELS, NODES, SCENARIOS
from dualpath.sim.runner import SimResult, capacity, run_policy, scenario_from_preset, simulate
from dualpath.sim.scenario import SimScenario, SimTrajectory

__all__ = [
    "GPUS",
    "MODELS",
    "NODES",
    "SCENARIOS",
    "ProfiledCompute",
    "RooflineCompute",
    "SimResult",
    "SimScenario",
    "SimTrajectory",
    "capacity",
    "run_policy",
    "scenario_from_preset",
    "simulate",
]
