"""Prefix lookup over chained block keys.

Because every key is chained to its parent, the set of stored keys *is* a trie of Full Blocks (one node per
block): a request's hit is the longest run of its keys, from the first, that are all present.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dualpath.types import BlockKey


def longest_prefix(keys: Sequence[BlockKey], contains: Callable[[BlockKey], bool]) -> int:
    """Number of leading ``keys`` for which ``contains`` is true (stops at the first miss)."""
    n = 0
    for key in keys:
        if not contains(key):
            break
        n += 1
    return n
