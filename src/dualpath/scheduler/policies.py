"""Scheduling policies: which read side, which assignment logic, layer-wise prefill, oracle.

The ablation ladder follows the paper's section 9.5 (Basic, + layer-wise, + dual path, + DualPath scheduler) and
adds our ``split`` extension. Choices the paper leaves open, and what we chose:

* Basic's assignment logic is not described. ``smart_assign=False`` means *least-loaded*: the PE with the fewest
  unfinished tokens, the DE with the fewest tokens among those whose free KV memory holds the request; no
  read-queue classes (alpha), no DE groups or Z threshold. The beta cap (never give work to an engine with more
  than beta unfinished tokens) is kept for every policy: it is admission control that any engine has, and it
  keeps the "an overloaded engine is never given work" invariant universal.
* The path used by "+ dual path" without the new scheduler is not in the paper; we use round-robin over the two
  sides (``round_robin``), as the paper's load-balance figure compares against round-robin.
* ``oracle`` schedules like ``dualpath`` but the caller skips every KV read, H2D/D2H and inter-PD KV transfer
  (``Policy.oracle``). Its assignments report ``PathKind.PE`` with all hit blocks on the PE side so accounting code
  needs no special case; the bytes moved are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dualpath.errors import SchedulerError

ReadSide = Literal["pe", "de", "round_robin", "queue", "split", "none"]


@dataclass(frozen=True)
class Policy:
    """One scheduling policy.

    ``layerwise``: prefill streams hit KV layer by layer (off = the whole hit KV lands in PE HBM before compute).
    ``read_side``: where hit KV is read (``queue`` = shorter node read queue; ``split`` = both sides).
    ``oracle``: skip all KV I/O (a performance bound). ``smart_assign``: Algorithm 1 for PEs and the two-level
    scheme for DEs; off = least-loaded assignment (see the module docstring).
    """

    name: str
    layerwise: bool
    read_side: ReadSide
    oracle: bool
    smart_assign: bool

    def __post_init__(self) -> None:  # (a policy of your own is checked when it is made, not at its first turn)
        if self.read_side not in get_args(ReadSide):
            raise SchedulerError(f"Policy {self.name!r}: read_side {self.read_side!r} is not one of "
                                 f"{', '.join(get_args(ReadSide))}")
        for field in ("layerwise", "oracle", "smart_assign"):
            if not isinstance(getattr(self, field), bool):
                raise SchedulerError(f"Policy {self.name!r}: {field} must be True or False, "
                                     f"got {getattr(self, field)!r}")


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("basic", layerwise=False, read_side="pe", oracle=False, smart_assign=False),
        Policy("layerwise", layerwise=True, read_side="pe", oracle=False, smart_assign=False),
        Policy("round_robin", layerwise=True, read_side="round_robin", oracle=False, smart_assign=False),
        Policy("dualpath", layerwise=True, read_side="queue", oracle=False, smart_assign=True),
        Policy("split", layerwise=True, read_side="split", oracle=False, smart_assign=True),
        Policy("pe_only", layerwise=True, read_side="pe", oracle=False, smart_assign=True),
        Policy("de_only", layerwise=True, read_side="de", oracle=False, smart_assign=True),
        Policy("oracle", layerwise=True, read_side="none", oracle=True, smart_assign=True),
    )
}

#: Report order of the ablation (paper 9.5 plus our split); ``oracle`` follows as the bound.
ABLATION_LADDER: list[str] = ["basic", "layerwise", "round_robin", "dualpath", "split"]


def get_policy(name: str, *, layerwise: bool | None = None) -> Policy:
    """The policy called ``name``; ``layerwise`` overrides its layer-wise toggle when given."""
    try:
        policy = POLICIES[name]
    except KeyError:
        raise SchedulerError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    if layerwise is not None and layerwise != policy.layerwise:
        policy = Policy(policy.name, layerwise, policy.read_side, policy.oracle, policy.smart_assign)
    return policy
