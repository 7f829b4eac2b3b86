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


def cut_at(buf: str, marker: str, final: bool) -> tuple[str, str, bool]:
    """``(text, rest, found)``: with ``marker`` in ``buf``, the text before it and what follows it; without, the
    text that cannot be the start of it and the end that may still become it (held back; none once ``final``)."""
    i = buf.find(marker)
    if i >= 0:
        return buf[:i], buf[i + len(marker):], True
    keep = 0 if final else held_prefix(buf, (marker,))
    return buf[:len(buf) - keep], buf[len(buf) - keep:], False


def drop_partial_tag(text: str, tag: str) -> str:
    """``text`` without an end (blanks aside) that is the start of ``tag``: the answer was cut inside a closing
    marker."""
    body = text.rstrip()
    k = held_prefix(body, (tag,))
    return body[:len(body) - k] if k else text
