"""Requests that arrive together and share a long prompt prefix compute it once.

The KV of a prompt reaches storage only after its prefill: the decode engine writes the prompt's Full Blocks
after its first token, while the request decodes, and then says so (``Job.stored``). Requests that arrive while another request with the same
long prefix is being prefilled (an agent framework fanning out sub-tasks over one context, an evaluation
harness sending the choices of a multiple-choice question at once, ``n`` separate clients with one system
prompt) would each compute that prefix again. :class:`InflightPrefixes` holds them back instead, in the manner
of SGLang's in-batch prefix-caching check:

* a request being served registers its prompt's prefixes (chain hashes of its :data:`GRANULE`-token pieces)
  until its prefix is stored (or its job ends);
* a new request first looks up the longest prefix it shares with a registered one. If that is at least
  ``min_tokens`` long it waits for that (at most ``max_wait_s``) and then loads the prefix
  from storage like any later request;
* a request that asks for its prompt's log-probabilities is never held back: its prefill recomputes the prompt.

Only when it is sent changes; its tokens are those it would get anyway (the KV it loads is the KV it would have
computed). Nothing is held back when ``max_wait_s`` is 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio

#: prefixes are compared in pieces of this many tokens: the shared length found undercounts by less than one piece
GRANULE = 64


def prefix_keys(ids: Sequence[int], salt: str | None = None) -> list[int]:
    """Chain hashes of ``ids``' whole :data:`GRANULE`-token pieces: key ``k`` stands for the first ``(k + 1) *
    GRANULE`` tokens (equal keys, equal prefixes, barring a 64-bit hash collision, which only costs a wait); a
    request's cache ``salt`` starts the chain, so requests of different salts never wait on each other."""
    keys: list[int] = []
    h = 0 if salt is None else hash(("salt", salt))
    for k in range(len(ids) // GRANULE):
        h = hash((h, tuple(ids[k * GRANULE:(k + 1) * GRANULE])))
        keys.append(h)
    return keys


@dataclass(eq=False)
class _Lead:
    """A request being prefilled, and the prefix keys it holds in the table."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    keys: list[int] = field(default_factory=list)


class InflightPrefixes:
    """The prefixes of the requests being prefilled now (see the module docstring)."""

    def __init__(self, min_tokens: int, max_wait_s: float, on_wait: Callable[[], object] = lambda: None) -> None:
        self.min_tokens = max(min_tokens, GRANULE)
        self.max_wait_s = max_wait_s
        self.on_wait = on_wait  # called for each request held back (a metric)
        self._by_key: dict[int, _Lead] = {}

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def _longest(self, keys: list[int]) -> tuple[int, _Lead | None]:
        """Tokens of the longest registered prefix of a prompt with ``keys``, and its request."""
        for k in range(len(keys) - 1, -1, -1):  # longest first (a prompt has few keys: a scan is cheap)
            lead = self._by_key.get(keys[k])
            if lead is not None:
                return (k + 1) * GRANULE, lead
        return 0, None

    async def admit(self, ids: Sequence[int], salt: str | None = None) -> list[int]:
        """Wait (at most ``max_wait_s``) while a request being prefilled shares at least ``min_tokens`` of ``ids``'
        prefix; the prompt's keys for :meth:`lead` (none when disabled or the prompt is short)."""
        if not self.enabled or len(ids) < self.min_tokens:
            return []
        keys = prefix_keys(ids, salt)
        shared, lead = self._longest(keys)
        if lead is not None and shared >= self.min_tokens:
            self.on_wait()
            with anyio.move_on_after(self.max_wait_s):  # a slow prefill: compute the prefix here, not wait on
                await lead.ready.wait()
        return keys

    def lead(self, keys: list[int]) -> _Lead | None:
        """Register a request that is starting with prefix ``keys`` (from :meth:`admit`); None when there is
        nothing to register. Call :meth:`done` with the result once its prefix is stored, or at its end."""
        if not keys:
            return None
        lead = _Lead()
        for key in keys:
            if key not in self._by_key:  # an earlier request holding a key keeps it (it is further along)
                self._by_key[key] = lead
                lead.keys.append(key)
        return lead

    def done(self, lead: _Lead | None) -> None:
        """``lead``'s prefix is stored (or it ended): release the requests waiting on it (idempotent)."""
        if lead is None or lead.ready.is_set():
            return
        lead.ready.set()
        for key in lead.keys:
            if self._by_key.get(key) is lead:
                del self._by_key[key]
        lead.keys.clear()
