"""The block keys that assigned requests are computing now: what :attr:`GlobalScheduler.hold` callers look up.

A key two requests compute stays until both have released it. Keys are whatever the caller names blocks with
(the simulator's content keys, storage block keys, hashes of token blocks); only equality matters.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence


class InflightKeys:
    """A multiset of block keys being computed."""

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count: dict[Hashable, int] = {}

    def __bool__(self) -> bool:
        return bool(self._count)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._count

    def add(self, keys: Iterable[Hashable]) -> None:
        """A request computes these blocks."""
        count = self._count
        for key in keys:
            count[key] = count.get(key, 0) + 1

    def remove(self, keys: Iterable[Hashable]) -> None:
        """A request's blocks are stored, or it ended: release what :meth:`add` registered."""
        count = self._count
        for key in keys:
            c = count.get(key, 0) - 1
            if c > 0:
                count[key] = c
            else:
                count.pop(key, None)

    def run(self, keys: Sequence[Hashable], start: int, stop: int) -> int:
        """How many of ``keys[start:stop]``, from the first, are being computed (``keys`` may be shorter than
        ``stop``: a trace may list fewer hash ids than its prompt has blocks)."""
        count = self._count
        n = start
        stop = min(stop, len(keys))
        while n < stop and keys[n] in count:
            n += 1
        return n - start
