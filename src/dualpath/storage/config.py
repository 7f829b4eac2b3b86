"""Config of the storage backends (chosen by ``kind``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from dualpath._configbase import Section


class MemoryStorageConfig(Section):
    """In-process dict of Full Blocks: the reference backend and test double."""

    kind: Literal["memory"] = "memory"
    capacity_bytes: int | None = Field(default=None, gt=0, description="LRU eviction above this; None = unbounded")


#: pseudo file systems that can never hold block files
_PSEUDO_FS = ("/proc", "/sys", "/dev")


def _check_root(root: Path) -> Path:
    """A usable block root: not inside a pseudo file system, not an existing non-directory."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    real = Path(os.path.realpath(path))
    for p in (path, real):
        if str(p) == "/dev/shm" or str(p).startswith("/dev/shm/"):  # tmpfs: a real (memory) file system
            continue
        for fs in _PSEUDO_FS:
            if str(p) == fs or str(p).startswith(fs + "/"):
                raise ValueError(f"{root} is inside {fs} (a pseudo file system); use a directory on a real disk "
                                 "or a shared mount")
    if real.exists() and not real.is_dir():
        raise ValueError(f"{root} exists and is not a directory")
    return root


class BlockFileStoreConfig(Section):
    """What the block-file backends (``posix``, ``kvikio``) share: their blocks' root and its limits."""

    kind: Literal["posix", "kvikio"]  # (each backend's own default; here so that dumps name it first)
    root: Annotated[Path, AfterValidator(_check_root)] = Field(default=Path("/tmp/dualpath-kv"), description=(
        "directory of the block files (created if missing; posix and kvikio read each other's); not inside "
        "/proc, /sys or /dev (/dev/shm is fine)"
    ))
    capacity_bytes: int | None = Field(default=None, gt=0, description=(
        "the block files' total size stays under this, least recently used blocks evicted first; None: "
        "unbounded"
    ))
    durability: Literal["none", "fsync"] = Field(default="none", description=(
        "fsync: each block file and its directory are synced before the write counts; none: the page cache "
        "decides"
    ))
    io_threads: int = Field(default=8, ge=1, le=256, description="threads doing the block reads and writes")
    shared_root: bool = Field(
        default=False,
        description="other processes write this root too: an index miss falls back to one stat of the file",
    )


class PosixStorageConfig(BlockFileStoreConfig):
    """One file per Full Block under ``root`` (sharded subdirectories), checksummed, atomic on write."""

    kind: Literal["posix"] = "posix"
    verify_checksum: bool = Field(default=True, description=(
        "verify each block read against its xxh3-64 (the header is always checked: magic, namespace, key, "
        "length)"
    ))


class KvikioStorageConfig(BlockFileStoreConfig):
    """GDS through kvikio's CuFile: reads and writes straight into and out of GPU memory (GPU machines only)."""

    kind: Literal["kvikio"] = "kvikio"
    verify_checksum: bool = Field(
        default=True, description="verify xxh3-64 of each block read (on the gds path: a device-to-host copy of the "
        "payload; on the bounce path the bytes are in host memory already)"
    )
    io_path: Literal["auto", "gds", "bounce"] = Field(
        default="auto", description="gds: CuFile reads/writes straight between file and GPU memory; bounce: through "
        "a pinned host buffer per worker (posix read, verified there, one H2D copy), what cuFile and kvikio's "
        "compatibility mode do without GPUDirect Storage anyway; auto: gds where kvikio uses cuFile and cuFile "
        "reports GDS, else bounce"
    )


class FaultsStorageConfig(Section):
    """Wraps another backend and drops, corrupts, delays or fails blocks (by seeded rate), for tests."""

    kind: Literal["faults"] = "faults"
    inner: StorageConfig = Field(default_factory=MemoryStorageConfig, description=(
        "the storage config whose blocks it damages (any kind, a faults wrapper too)"
    ))
    seed: int = Field(default=0, ge=0, description="seed of the fault draws (the same seed, the same faults)")
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "share of writes silently not stored (a later read finds the block missing)"
    ))
    corrupt_rate: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "share of stored blocks with bytes flipped on disk (the inner backend's checks must catch them)"
    ))
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "share of reads and writes that fail outright (FAILED)"
    ))
    delay_s: float = Field(default=0.0, ge=0.0, description="extra seconds every read and write takes")


StorageConfig = Annotated[
    MemoryStorageConfig | PosixStorageConfig | KvikioStorageConfig | FaultsStorageConfig,
    Field(discriminator="kind"),
]
FaultsStorageConfig.model_rebuild()


def rooted(cfg: Any) -> BlockFileStoreConfig | None:
    """The backend config in ``cfg``'s chain that keeps its blocks under a ``root`` (``cfg`` itself, or the store
    a ``faults`` wrapper holds, however deep), or None for memory storage. Whoever gives a run its own root (each
    policy of ``dualpath run``, a calibration, a benchmark) sets it there, so a wrapped store is not shared."""
    while isinstance(cfg, FaultsStorageConfig):
        cfg = cfg.inner
    return cfg if isinstance(cfg, BlockFileStoreConfig) else None
