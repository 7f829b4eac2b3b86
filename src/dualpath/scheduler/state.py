"""Snapshots the scheduler core decides over. Plain frozen data: no I/O, no clock.

Both the runtime driver (from real engines) and the simulator (from simulated ones) build these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualpath.types import PathKind


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What one engine reports on a fetch (paper section 7.1).

    ``seq``: assigned but unfinished requests; ``tok``: their total tokens; ``read_q``: the disk-read queue of
    the engine's *node*, in tokens; ``free_kv_tokens``: free KV memory (decode engines; HBM), in tokens;
    ``work``: a prefill engine's queued work in ``tok``'s unit, what Algorithm 1 ranks engines of a class by, -1 for
    ``tok`` itself (the paper's ranking; see :attr:`~dualpath.scheduler.core.GlobalScheduler.pe_work`).
    """

    engine: int
    node: int
    seq: int
    tok: int
    read_q: int
    free_kv_tokens: int = 0
    work: int = -1


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as the scheduler sees it.

    ``context``: tokens already in the session (hit candidates); ``append``: new prompt tokens;
    ``hit``: tokens whose KV is stored (a multiple of the block size, <= context + append); ``gen``: tokens to
    generate. ``tokens`` (what ``tok`` counts) is the whole prompt, context + append.
    """

    rid: int
    context: int
    append: int
    hit: int
    gen: int

    @property
    def prompt(self) -> int:
        return self.context + self.append

    @property
    def miss(self) -> int:
        return self.prompt - self.hit

    @property
    def tokens(self) -> int:
        return self.prompt


@dataclass(frozen=True, slots=True)
class Assignment:
    """The scheduler's decision for one request: its PE, its DE, and where its hit KV is read.

    For ``PathKind.SPLIT``, ``pe_blocks`` hit blocks are read on the PE side (the first ones) and the rest on the
    DE side. ``pe_blocks`` is set for every path: all hit blocks for ``PE``, 0 for ``DE``.
    """

    rid: int
    pe: int
    de: int
    path: PathKind
    pe_blocks: int = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One request's share of a PE forward batch: compute ``new`` tokens on top of ``cached`` tokens."""

    rid: int
    cached: int
    new: int


@dataclass(slots=True)
class ForwardBatch:
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(c.new for c in self.chunks)


@dataclass(slots=True)
class EngineLoad:
    """The scheduler's private, mutable copy of one engine's snapshot during one scheduling round.

    The core never mutates the caller's snapshots; it updates these copies as it assigns (``seq``, ``tok``,
    ``work``, ``free_kv_tokens``), so later decisions in the same round see earlier ones. Node read queues live in a
    separate per-node mapping because every engine of a node shares one.
    """

    engine: int
    node: int
    seq: int
    tok: int
    free_kv_tokens: int
    work: int = 0

    @classmethod
    def of(cls, snap: EngineSnapshot) -> EngineLoad:
        return cls(snap.engine, snap.node, snap.seq, snap.tok, snap.free_kv_tokens,
                   snap.work if snap.work >= 0 else snap.tok)
