"""The exception family of dualpath.

Every error the library raises on purpose derives from :class:`DualPathError`, so research code can catch
one type. Subsystems raise the most specific class; messages name the field, file, line, key or peer that is
at fault.
"""

from __future__ import annotations


class DualPathError(Exception):
    """Base class of every error dualpath raises on purpose."""


class ConfigError(DualPathError, ValueError):
    """A configuration value, file or key is invalid. The message names the file and the dotted field path."""


# --- storage -------------------------------------------------------------------------------------------------


class StorageError(DualPathError):
    """A storage backend failed (I/O error, unusable root, ...)."""


class BlockMissing(StorageError, KeyError):
    """A requested Full Block is not stored."""


class CorruptBlock(StorageError):
    """A stored Full Block failed verification (checksum, size, namespace or header). Never served as data."""


class StorageFull(StorageError):
    """A write could not be made room for (capacity reached and nothing evictable, or the disk is full)."""


# --- transports ----------------------------------------------------------------------------------------------


class TransportError(DualPathError):
    """A transport failed to move bytes (bad message, unknown tag, size mismatch, peer failure)."""


class PeerTimeout(TransportError, TimeoutError):
    """A wait on a peer or a device passed its deadline."""


class TransportClosed(TransportError):
    """The transport (or the waited-on region) was closed while a caller was waiting."""


class TransportRejected(TransportError):
    """An arrival was refused (size or checksum mismatch, duplicate, not exposed in time, bad header); nothing was
    written into the landing region. Raised alike by every transport backend."""


# --- model / kernels -----------------------------------------------------------------------------------------


class ModelError(DualPathError):
    """A model config or checkpoint is unsupported or does not match, or a request does not fit the model."""


class KernelError(DualPathError, ValueError):
    """A kernel launcher was given tensors of the wrong shape, dtype, device or strides."""


# --- runtime -------------------------------------------------------------------------------------------------


class EngineError(DualPathError):
    """An engine could not serve a request (pool too small, device missing, peer failure after retries)."""


class CapacityError(EngineError):
    """A request larger than an engine can ever hold (its host buffer, one-layer scratch or KV pool): refused at
    once and never retried, since no wait or other attempt makes it fit."""


class SchedulerError(DualPathError):
    """The scheduler was given an inconsistent state or an impossible request."""


class WorkloadError(DualPathError, ValueError):
    """A trace or trajectory file is malformed. The message names the file and the line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
