"""KV-cache layout (Full and Layer Blocks), block keys and prefix lookup."""

from dualpath.kv.index import longest_prefix
from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec

__all__ = ["BlockKeyer", "KVLayout", "KVSpec", "KeyNamespace", "longest_prefix"]
