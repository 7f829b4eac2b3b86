"""Content addresses for Full Blocks: chained SHA-256 over token ids, salted with a namespace.

``key_0 = H(ns || tokens_0)``, ``key_i = H(ns || key_{i-1} || tokens_i)`` where tokens are encoded as
little-endian int64 and ``ns`` is the SHA-256 of a canonical text naming the model fingerprint, the KV dtype,
the per-token layout and the block size. A request's ``salt`` (vLLM's ``cache_salt``: one tenant's requests
share their KV with each other and with nobody else) starts the chain from ``H("dualpath-salt" || salt)``
instead, so no key of a salted prompt equals a key of the same tokens with another salt, or with none. Nothing depends on Python's ``hash()`` or a per-process seed, so
every process (and every host) computes the same keys for the same tokens; a different model, dtype or block
size gives disjoint keys, so foreign blocks can never be served.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dualpath.types import BlockKey

if TYPE_CHECKING:
    from dualpath.kv.layout import KVLayout

_KEY_VERSION = "dualpath-kv-v1"


@dataclass(frozen=True, slots=True)
class KeyNamespace:
    """The salt of every key: which model produced the KV, and in what layout."""

    model_fingerprint: str
    layout_fingerprint: str
    block_tokens: int

    @classmethod
    def for_layout(cls, model_fingerprint: str, layout: KVLayout) -> KeyNamespace:
        return cls(model_fingerprint, layout.spec.fingerprint(), layout.block_tokens)

    @property
    def digest(self) -> bytes:
        text = f"{_KEY_VERSION}|model={self.model_fingerprint}|layout={self.layout_fingerprint}|bt={self.block_tokens}"
        return hashlib.sha256(text.encode("utf-8")).digest()


class BlockKeyer:
    """Computes the chained keys of a token sequence's Full Blocks."""

    def __init__(self, namespace: KeyNamespace) -> None:
        self.namespace = namespace
        self.block_tokens = namespace.block_tokens
        self._ns = namespace.digest

    def keys(self, tokens: Sequence[int] | np.ndarray, parent: BlockKey | None = None, *,
             salt: str | None = None) -> list[BlockKey]:
        """Keys of every *full* block of ``tokens`` (the partial tail is not keyed).

        ``parent`` continues a chain: the keys of ``tokens`` that follow the block whose key is ``parent``.
        ``salt`` (a chain's start only: not with ``parent``) keys the blocks apart from every other salt's.
        """
        if salt is not None and parent is not None:
            raise ValueError("a salt starts a chain; a chain continued from its parent already carries it")
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError("tokens must be one-dimensional")
        if arr.size and (arr.min() < 0):
            raise ValueError("token ids must be non-negative")
        le = arr.astype("<i8", copy=False)
        bt = self.block_tokens
        out: list[BlockKey] = []
        prev = parent.digest if parent is not None else b""
        flag = 1 if prev else 0
        if salt is not None:  # (flag 2: a salted start never equals a chained block's input)
            prev, flag = hashlib.sha256(b"dualpath-salt\0" + salt.encode("utf-8")).digest(), 2
        for i in range(arr.size // bt):
            h = hashlib.sha256(self._ns)
            h.update(struct.pack("<B", flag))
            flag = 1
            h.update(prev)
            h.update(le[i * bt : (i + 1) * bt].tobytes())
            prev = h.digest()
            out.append(BlockKey(prev))
        return out
