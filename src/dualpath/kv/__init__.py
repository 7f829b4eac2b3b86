"""KV-cache layout (Full and Layer Blocks), block keys and prefix lookup. Keys and lookup need no torch; the
layout names import it on first use."""

from typing import TYPE_CHECKING

from dualpath._lazy import lazy_names
from dualpath.kv.index import longest_prefix
from dualpath.kv.keys import BlockKeyer, KeyNamespace

if TYPE_CHECKING:
    from dualpath.kv.layout import KVLayout, KVSpec

__all__ = ["BlockKeyer", "KVLayout", "KVSpec", "KeyNamespace", "longest_prefix"]
__getattr__ = lazy_names(__name__, dict.fromkeys(("KVLayout", "KVSpec"), "dualpath.kv.layout"))
