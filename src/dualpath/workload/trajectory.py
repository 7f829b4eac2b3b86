"""Trajectories: one agent's session as turns of (appended tokens, generation length).

Replay rule (paper appendix A.3): the prompt of turn ``i`` is ``A_1, G_1, ..., A_{i-1}, G_{i-1}, A_i`` where
``A`` are appended tokens and ``G`` generated ones; turn ``i`` generates exactly ``gen`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard

from dualpath.errors import WorkloadError


def is_id_list(x: object) -> TypeGuard[list[int]]:
    """Whether ``x`` is a list of plain integers (no booleans, no floats): a trace's ``hash_ids``. Checked by the
    types present, in C: a trace of 200,000 rows carries tens of millions of ids."""
    return isinstance(x, list) and set(map(type, x)) <= {int}

def interned(ids: list[int], table: dict[int, int]) -> list[int]:
    """``ids`` with each id the one int object ``table`` holds for its value (added when new). A content-hashed
    trace repeats its prefixes' ids row after row, and the JSON parser makes a new object for each: sharing one
    per distinct id keeps a long trace's ids at a list slot each (8 bytes) instead of 36."""
    return list(map(table.setdefault, ids, ids))


@dataclass(slots=True)
class Turn:
    """``append`` new prompt tokens, then ``gen`` generated tokens. ``append_ids``: the real token ids, if known.

    From a trace: ``at`` is the request's time in the trace (seconds from the trace's first request; online
    replay does not send the turn earlier), ``hash_ids`` the content keys of the whole prompt's blocks of
    ``hash_block`` tokens (Mooncake: equal ids = equal 512-token blocks, across all requests; the prompt's tokens
    are then derived from them, :func:`dualpath.workload.traces.hash_prompt_tokens`), ``think`` the seconds after
    the session's previous turn ended (or after the session started, for its first turn) before online replay
    sends this one (a trace's ``delay``).
    """

    append: int
    gen: int
    append_ids: list[int] | None = None
    at: float | None = None
    hash_ids: list[int] | None = None
    hash_block: int = 512
    line: int | None = field(default=None, compare=False)  # the trace file's line of this turn (error messages)
    think: float | None = None

    def __post_init__(self) -> None:
        if self.at is not None and not self.at >= 0:
            raise WorkloadError(f"turn time must be >= 0 s, got {self.at}")
        if self.think is not None and not self.think >= 0:
            raise WorkloadError(f"turn think time must be >= 0 s, got {self.think}")
        if self.append < 0 or self.gen < 0:
            raise WorkloadError(f"turn needs append >= 0 and gen >= 0, got {self.append}, {self.gen}")
        if self.append_ids is not None and len(self.append_ids) != self.append:
            raise WorkloadError(f"turn has append={self.append} but {len(self.append_ids)} ids")


@dataclass(slots=True)
class Trajectory:
    """One agent: ``tid``, its turns, and its arrival time in seconds (0 in offline mode). ``origin``: where in its
    file the session came from, for messages (a conversation dataset: ``item #17 (id 'abc')``)."""

    tid: int
    turns: list[Turn] = field(default_factory=list)
    arrival: float = 0.0
    origin: str | None = field(default=None, compare=False)

    def context_before(self, i: int) -> int:
        """Tokens in the session before turn ``i``'s append: sum of appends and generations of turns < i."""
        return sum(t.append + t.gen for t in self.turns[:i])

    def prompt_len(self, i: int) -> int:
        """Prompt length of turn ``i``: context before it plus its append."""
        return self.context_before(i) + self.turns[i].append

    @property
    def total_tokens(self) -> int:
        """Length of the whole session: every append and every generation."""
        return sum(t.append + t.gen for t in self.turns)

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    def truncated(self, max_len: int | None = None, max_turns: int | None = None) -> Trajectory:
        """A copy keeping the leading turns whose whole session (prompt + generation) fits ``max_len`` tokens."""
        kept: list[Turn] = []
        total = 0
        for t in self.turns:
            if max_turns is not None and len(kept) >= max_turns:
                break
            if max_len is not None and total + t.append + t.gen > max_len:
                break
            kept.append(t)
            total += t.append + t.gen
        return Trajectory(self.tid, kept, self.arrival, self.origin)
