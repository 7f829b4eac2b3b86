"""Storage of Full Blocks: the :class:`Storage` contract and its backends, chosen by ``config.kind``.

Backends are imported lazily by :func:`create_storage`, so ``import dualpath.storage`` never loads kvikio; the
contract's names (:class:`Storage`, ...) are imported on first use, so ``dualpath.storage.config`` (read by every
config, and by command-line tools that never touch a block) does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dualpath._lazy import lazy_names
from dualpath.errors import StorageError

if TYPE_CHECKING:
    from dualpath.kv.keys import KeyNamespace
    from dualpath.kv.layout import KVLayout
    from dualpath.storage.base import BlockStatus, Storage, StorageStats

__all__ = ["BlockStatus", "Storage", "StorageStats", "create_storage"]
__getattr__ = lazy_names(__name__, dict.fromkeys(("BlockStatus", "Storage", "StorageStats"), "dualpath.storage.base"))


def create_storage(config: Any, layout: KVLayout, namespace: KeyNamespace) -> Storage:
    """Build (not start) the backend named by ``config.kind``: memory, posix, kvikio or faults (``config``: a config
    object, or a mapping as a config file's ``storage`` section holds it, e.g. ``{"kind": "posix", "root": ...}``)."""
    if isinstance(config, Mapping):
        from dualpath.config import validate_section
        from dualpath.storage.config import StorageConfig

        config = validate_section(StorageConfig, config, "storage")
    kind = getattr(config, "kind", None)
    if kind == "memory":
        from dualpath.storage.memory import MemoryStorage

        return MemoryStorage(config, layout, namespace)
    if kind == "posix":
        from dualpath.storage.posix import PosixStorage

        return PosixStorage(config, layout, namespace)
    if kind == "kvikio":
        from dualpath.storage.kvikio import KvikioStorage

        return KvikioStorage(config, layout, namespace)
    if kind == "faults":
        from dualpath.storage.faults import FaultyStorage

        return FaultyStorage(config, layout, namespace)
    raise StorageError(f"storage.kind: unknown storage backend {kind!r} (expected memory, posix, kvikio or faults)")
