"""Read-side choice (paper section 7.4) and read splitting (our extension of its future work).

``Assignment.pe_blocks`` is always the number of hit blocks read on the PE side: all of them for ``PathKind.PE``,
none for ``PathKind.DE``, the first ``pe_blocks`` for ``PathKind.SPLIT`` (the rest on the DE side).

* ``queue`` (the paper): the side whose node has the shorter read queue; a tie goes to the PE side (its path has
  one hop less).
* ``split``: the hit blocks are divided so both sides finish their queues at the same time, assuming equal
  storage-NIC bandwidth on both nodes: ``pe_q + x * b == de_q + (H - x) * b`` gives
  ``x = (de_q - pe_q + H * b) / (2 * b)``, rounded to the nearest block and clamped to ``[0, H]``. When the
  result is all or nothing the assignment is reported as plain ``PE`` or ``DE``.
* ``round_robin``: PE on even ``rr_counter``, DE on odd.
* ``none`` (oracle): nothing is read; reported as ``PE`` with all hit blocks (see :mod:`.policies`).
"""

from __future__ import annotations

from dualpath.errors import SchedulerError
from dualpath.scheduler.policies import Policy
from dualpath.scheduler.state import Assignment, EngineSnapshot, RequestInfo
from dualpath.types import PathKind


def hit_blocks(hit_tokens: int, block_tokens: int) -> int:
    """Hit blocks of a request (a partial trailing block counts as one)."""
    return -(-hit_tokens // block_tokens)


def split_blocks(n_blocks: int, pe_read_q: int, de_read_q: int, block_tokens: int) -> int:
    """Blocks to read on the PE side so both sides' read queues drain at the same time."""
    x = (de_read_q - pe_read_q + n_blocks * block_tokens) / (2 * block_tokens)
    return max(0, min(n_blocks, int(x + 0.5)))


def decide_side(
    req: RequestInfo,
    pe: int,
    de: int,
    pe_read_q: int,
    de_read_q: int,
    policy: Policy,
    rr_counter: int,
    block_tokens: int = 64,
) -> Assignment:
    """The read side for ``req`` on PE ``pe`` / DE ``de`` given both nodes' read queues (tokens)."""
    n = hit_blocks(req.hit, block_tokens)
    side = policy.read_side
    if side == "round_robin":
        side = "pe" if rr_counter % 2 == 0 else "de"
    elif side == "queue":
        side = "pe" if pe_read_q <= de_read_q else "de"
    if side in ("pe", "none"):
        return Assignment(req.rid, pe, de, PathKind.PE, n)
    if side == "de":
        return Assignment(req.rid, pe, de, PathKind.DE, 0)
    if side == "split":
        x = split_blocks(n, pe_read_q, de_read_q, block_tokens)
        if x == n:
            return Assignment(req.rid, pe, de, PathKind.PE, n)
        if x == 0:
            return Assignment(req.rid, pe, de, PathKind.DE, 0)
        return Assignment(req.rid, pe, de, PathKind.SPLIT, x)
    raise SchedulerError(f"policy {policy.name!r} has unknown read_side {policy.read_side!r}")


def choose_read_side(
    req: RequestInfo,
    pe: EngineSnapshot,
    de: EngineSnapshot,
    policy: Policy,
    rr_counter: int,
    block_tokens: int = 64,
) -> Assignment:
    """The read side for ``req`` from the PE's and the DE's snapshots (their ``read_q``)."""
    return decide_side(req, pe.engine, de.engine, pe.read_q, de.read_q, policy, rr_counter, block_tokens)


def side_tokens(a: Assignment, req: RequestInfo, block_tokens: int = 64) -> tuple[int, int]:
    """Hit tokens read on the (PE, DE) side for assignment ``a``."""
    pe_tok = min(req.hit, a.pe_blocks * block_tokens)
    return pe_tok, req.hit - pe_tok
