"""Emulated links and the per-engine traffic manager (SNIC for storage I/O, CNIC for device traffic)."""

from __future__ import annotations

from dualpath.traffic.clock import Clock, RealClock, VirtualClock
from dualpath.traffic.link import FluidLink, Link, LinkStats
from dualpath.traffic.manager import TrafficManager

__all__ = ["Clock", "FluidLink", "Link", "LinkStats", "RealClock", "TrafficManager", "VirtualClock"]
