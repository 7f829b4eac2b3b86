"""Bandwidth units nobody can misread.

Every bandwidth in dualpath's configs and commands is in **GB/s** (10^9 bytes per second) per direction, the
paper's unit (B = 50 GB/s is a 400 Gb/s NIC). A bare number is GB/s; a string may say its unit, so a user with a
400 Gb/s NIC writes ``400Gbps`` (= 50 GB/s) and never has to convert:

==============================  ======================
written                         GB/s
==============================  ======================
``50``, ``50GB/s``, ``50 GBps``  50
``400Gbps``, ``400 Gb/s``        50 (bits: / 8)
``800MB/s``, ``6400Mbps``        0.8
``1.6Tbps``, ``0.2TB/s``         200
``46.566GiB/s``                  50.000 (binary: x 2^30 / 10^9)
==============================  ======================

``B`` (upper case) is bytes, ``b`` (lower case) is bits; ``ps`` and ``/s`` are the same.
"""

from __future__ import annotations

import re
import warnings

from dualpath.errors import ConfigError

_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKMGT]i?)?([Bb]|bit|byte)?(?:/s|ps)?\s*$")
_SCALE = {None: 1e9, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def parse_gbs(value: object, name: str = "bandwidth") -> float:
    """GB/s (10^9 bytes/s) from a number (already GB/s) or a string with a unit (see the module docstring).

    A string must name a rate: a number alone, or a prefix and ``B``/``b`` (``50G`` alone is refused as
    ambiguous). Errors name ``name``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a bandwidth (e.g. 50GB/s or 400Gbps), got {value!r}")
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        m = _UNIT.match(value)
        if m is None or (m.group(2) is not None and m.group(3) is None):
            raise ConfigError(f"{name}: cannot read {value!r} as a bandwidth; write e.g. 50GB/s, 400Gbps or 50 "
                              f"(a bare number is GB/s)")
        num, prefix, unit = float(m.group(1)), m.group(2), m.group(3)
        bits = unit in ("b", "bit")
        if unit is None:  # a bare number: GB/s
            v = num
        else:
            v = num * _SCALE[prefix] / 1e9 / (8.0 if bits else 1.0)
    else:
        raise ConfigError(f"{name}: expected a bandwidth (e.g. 50GB/s or 400Gbps), got {value!r}")
    if not v > 0 or v != v or v == float("inf"):
        raise ConfigError(f"{name}: a bandwidth must be a finite number > 0 GB/s, got {value!r}")
    return v


def fmt_gbs(gbs: float | None) -> str:
    """``gbs`` GB/s as text with its unit: ``50 GB/s``, ``10 MB/s``, ``unlimited``."""
    if gbs is None:
        return "unlimited"
    if gbs >= 1:
        return f"{gbs:g} GB/s"
    return f"{gbs * 1e3:g} MB/s"


def deprecated_name(old: str, new: str, value: object) -> None:
    """Warn (DeprecationWarning, shown once per call site) that ``old`` is an old name of ``new``."""
    warnings.warn(
        f"{old} is deprecated (its number is GB/s, not Gb/s): write {new}: "
        f"{value if isinstance(value, str) else f'{value}GB/s'} (units accepted: 50GB/s, 400Gbps)",
        DeprecationWarning,
        stacklevel=3,
    )
