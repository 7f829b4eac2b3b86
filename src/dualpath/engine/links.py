"""The links of an emulated cluster as the engines see them, and the byte accounting of one request.

Every byte that storage or a transport moves is charged to the links it crosses (the paper's CNIC-centric
rule, section 5): a node's storage NIC (``<role><node>.snic.read`` / ``.write``), an engine's compute NIC per
direction (``pe0.cnic.in`` / ``pe0.cnic.out``). Host-to-device copies are ``cnic.in`` of the engine, device-to-
host copies ``cnic.out``; a PE -> DE transfer is ``out`` of the sender and ``in`` of the receiver.

Exact bytes charged for one request (``L`` layers, ``b`` bytes per token and layer, ``P`` prompt tokens, ``H``
hit tokens, of which ``Hp`` read on the PE side and ``Hd = H - Hp`` on the DE side, ``F = L * b * block_tokens``
one Full Block, ``W`` the prompt's new full blocks ``P // bt - H / bt`` and ``G`` the blocks filled during
decode)::

    link                 PE path (Hd=0)     DE path (Hp=0)      split / recompute (general)
    pe-node snic.read    H*L*b              0                   Hp*L*b
    pe cnic.in           H*L*b (H2D)        H*L*b (from DE)     H*L*b
    pe cnic.out          P*L*b (all KV)     (P-H)*L*b (miss)    (P-Hd)*L*b
    de cnic.in           P*L*b + P*L*b      (P-H)*L*b + P*L*b   (P-Hd)*L*b + P*L*b (receive + H2D to pool)
    de cnic.out          G*F                H*L*b + G*F         Hd*L*b + G*F (stream to PE + D2H of decoded blocks)
    de-node snic.read    0                  H*L*b               Hd*L*b
    de-node snic.write   (W+G)*F            (W+G)*F             (W+G)*F

The prompt's new blocks are persisted straight from the DE buffer (they are already in DRAM: no D2H); blocks
filled during decode are copied D2H (``de cnic.out``) and then written (``snic.write``). The small first-token
return is control plane (a few bytes) and is not charged.

:class:`LinkSet` holds the cluster's :class:`~dualpath.traffic.Link` objects and one
:class:`~dualpath.traffic.TrafficManager` per engine, and records what each turn charged
(:attr:`dualpath.engine.request.Turn.link_bytes`) so one request's bytes per link can be asserted exactly.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio

from dualpath.engine.request import Turn
from dualpath.traffic import Link, TrafficManager

T = TypeVar("T")


class EpochClock:
    """The event loop's clock counted from the cluster's start, so link models work with small times (large
    absolute monotonic times leave sub-ulp residues in the fluid model at high bandwidths)."""

    def __init__(self) -> None:
        self.t0: float | None = None

    def now(self) -> float:
        if self.t0 is None:
            self.t0 = anyio.current_time()
        return anyio.current_time() - self.t0

    async def wait_until(self, event: anyio.Event, deadline: float | None) -> None:
        if deadline is None:
            await event.wait()
            return
        with anyio.move_on_at(deadline + (self.t0 or 0.0)):
            await event.wait()


class LinkSet:
    """All links of one emulated cluster and the engines' traffic managers (see the module docstring)."""

    def __init__(self, kv_share: float = 0.01) -> None:
        self.kv_share = kv_share
        self.clock = EpochClock()
        self.links: dict[str, Link] = {}
        self.managers: dict[str, TrafficManager] = {}

    def add_link(self, name: str, gbps: float | None) -> Link:
        link = Link(name, None if gbps is None else gbps * 1e9, self.kv_share, clock=self.clock)
        self.links[name] = link
        return link

    def add_engine(self, engine: str, snic: str, cnic: str) -> TrafficManager:
        """``snic``: the node's storage NIC prefix (links ``<snic>.read``/``.write`` must exist); the engine's
        compute NIC links ``<cnic>.in``/``.out`` must exist."""
        tm = TrafficManager(
            engine, self.links[f"{snic}.read"], self.links[f"{cnic}.in"], self.links[f"{cnic}.out"],
            snic_out=self.links[f"{snic}.write"],
        )
        self.managers[engine] = tm
        return tm

    # --- charged operations (each also recorded on the turn) ---------------------------------------------
    async def storage_read(self, engine: str, turn: Turn | None, nbytes: int, tokens: int,
                           io: Awaitable[T] | None = None) -> T | None:
        tm = self.managers[engine]
        _record(turn, tm.snic.name, nbytes)
        return await tm.storage_read(nbytes, tokens, io)

    async def storage_write(self, engine: str, turn: Turn | None, nbytes: int,
                            io: Awaitable[T] | None = None) -> T | None:
        tm = self.managers[engine]
        _record(turn, tm.snic_out.name, nbytes)
        return await tm.storage_write(nbytes, io)

    async def h2d(self, engine: str, turn: Turn | None, nbytes: int, io: Awaitable[T] | None = None) -> T | None:
        tm = self.managers[engine]
        _record(turn, tm.cnic_in.name, nbytes)
        return await tm.h2d(nbytes, io)

    async def d2h(self, engine: str, turn: Turn | None, nbytes: int, io: Awaitable[T] | None = None) -> T | None:
        tm = self.managers[engine]
        _record(turn, tm.cnic_out.name, nbytes)
        return await tm.d2h(nbytes, io)

    async def send(self, src: str, dst: str, turn: Turn | None, nbytes: int,
                   io: Awaitable[T] | None = None) -> T | None:
        a, b = self.managers[src], self.managers[dst]
        _record(turn, a.cnic_out.name, nbytes)
        _record(turn, b.cnic_in.name, nbytes)
        return await a.send(b, nbytes, io=io)

    async def collective(self, engine: str, nbytes: int, io: Awaitable[T] | None = None, *,
                         isolated: bool = True) -> T | None:
        """A forward's all-to-all (HIGH when ``isolated``) on the engine's CNIC, concurrent with ``io``."""
        return await self.managers[engine].collective(nbytes, io, isolated=isolated)

    # --- observation -------------------------------------------------------------------------------------
    def read_q_tokens(self, engine: str) -> int:
        return self.managers[engine].read_queue()[1]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {name: {"bandwidth": link.bandwidth, **link.stats.as_dict()} for name, link in self.links.items()}

    def bytes_by_link(self) -> dict[str, int]:
        return {name: sum(link.stats.bytes.values()) for name, link in self.links.items()}


def _record(turn: Turn | None, link: str, nbytes: int) -> None:
    if turn is not None:
        turn.charge(link, nbytes)
