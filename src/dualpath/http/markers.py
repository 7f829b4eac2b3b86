"""Streaming text that may end inside a marker (a tool-call or reasoning tag): how much of it to hold back."""

from __future__ import annotations


def held_prefix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of one of ``tags`` (it may still become that
    tag once more text arrives, so it is not passed on yet)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if tag.startswith(text[-k:]):
                best = k
                break
    return best
