"""Whether this CPU computes a half-precision dtype natively, and a one-time warning when a model is loaded in one
it does not.

On an x86 CPU without AVX512-BF16 / AMX-BF16 (AVX512-FP16 / AMX-FP16 for float16) torch widens every half-precision
matmul in software: measured on an AVX2 EPYC, one thread, a ``[300, 576] x [576, 1536]`` linear takes 54 ms in
bfloat16 and 63 ms in float16 against 5.7 ms in float32 (9-11x), a 4-row one 2.2x. ``model.dtype`` defaults to
float32, so only a user who picks a half dtype for a model on such a CPU pays this; :func:`warn_if_emulated` tells
them once per process and dtype (logged, so a server's log has it too). Flags are read from ``/proc/cpuinfo``; on
other systems, and on CPUs that are not x86, nothing is said.
"""

from __future__ import annotations

import functools
import logging
import platform

log = logging.getLogger("dualpath.model")

#: the CPU flags (any one suffices) with which each half dtype runs natively on x86
NATIVE_FLAGS = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}
_warned: set[str] = set()


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first CPU's feature flags, or None where they cannot be read (not Linux, no such file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def emulated(dtype: str, flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True when ``dtype`` (``bfloat16`` / ``float16``) has no native matmul on this x86 CPU; False for other
    dtypes, non-x86 machines and unreadable flags."""
    native = NATIVE_FLAGS.get(dtype)
    if native is None:
        return False
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is not None and not any(f in flags for f in native)


def warn_if_emulated(dtype: str, device: str) -> bool:
    """Log (once per process and dtype) that a model in ``dtype`` on the CPU will run its matmuls emulated; True
    when it did."""
    if device != "cpu" or dtype in _warned or not emulated(dtype):
        return False
    _warned.add(dtype)
    need = " or ".join(f.upper().replace("_", "-") for f in NATIVE_FLAGS[dtype])
    log.warning("model.dtype %s on a CPU without %s: torch emulates its matmuls, about 9-11x slower than float32 "
                "at prefill sizes (measured on an AVX2 CPU); model.dtype: float32 runs faster here", dtype, need)
    return True
