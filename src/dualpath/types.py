"""Small frozen value types shared by the subsystems."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(str, enum.Enum):
    """The role of an engine (and of the node that hosts it)."""

    PREFILL = "prefill"
    DECODE = "decode"


class PathKind(str, enum.Enum):
    """Where a request's hit KV is read from storage.

    ``PE``: the prefill engine's node reads it (the classic path). ``DE``: the decode engine's node reads it and
    forwards it layer by layer to the PE (DualPath's new path). ``SPLIT``: the hit blocks are divided between both
    sides (our extension). ``RECOMPUTE``: nothing is read; every token is recomputed.
    """

    PE = "pe"
    DE = "de"
    SPLIT = "split"
    RECOMPUTE = "recompute"

    def __str__(self) -> str:
        return str(self.value)

    def __hash__(self) -> int:  # equal to its value ("pe"), so it must hash like it: one dict key, not two
        return hash(self.value)

    @classmethod
    def _missing_(cls, value: object) -> PathKind:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{value!r} is not a valid path; expected one of {valid}")


class TrafficClass(str, enum.Enum):
    """Traffic classes on an emulated link: model execution (high priority) and KV (low priority)."""

    HIGH = "high"
    KV = "kv"


@dataclass(frozen=True, slots=True)
class EngineId:
    """An engine: ``role`` + global rank; ``node`` is the index of its node within that role."""

    role: Role
    rank: int
    node: int

    def __str__(self) -> str:
        return f"{'pe' if self.role is Role.PREFILL else 'de'}{self.rank}"


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Content address of one Full Block: a 32-byte SHA-256 digest (see :mod:`dualpath.kv.keys`)."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise ValueError("BlockKey.digest must be 32 bytes")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> BlockKey:
        if len(text) != 64:
            raise ValueError(f"block key hex must be 64 characters, got {len(text)}")
        return cls(bytes.fromhex(text))

    def __str__(self) -> str:
        return self.hex[:16]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability under the model and the ``k`` most likely tokens' at its position
    (``(id, logprob)``, most likely first): see :mod:`dualpath.engine.sampling`."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1 + the tokens more likely than ``token`` (prompt tokens: the PE counts; else None)
