"""Which every-byte check a verified block read should use: xxh3 (the posix backend's) or hardware CRC32C.

Issue 16 asks for a faster check "where the CPU has one (e.g. hardware CRC32C through a maintained package)",
decided by measurement. This measures, on this machine:

* each check's speed on bytes already in cache (one 1.4 MB block hashed over and over);
* each check right after a warm-cache ``os.preadv`` of the block in the reading thread, over many block files on a
  thread pool, as ``posix`` verifies (the raw read with no check is the baseline of the same run).

Checks: ``xxh3_64`` and ``xxh3_128`` (``xxhash``), and CRC32C (SSE4.2) of Google's ``crc32c`` library as the
``google-crc32c`` package ships it: through its Python API (``google_crc32c.value``, which only takes ``bytes``, so
each block is copied first) and through the library's own ``crc32c_extend`` called by ``ctypes`` on the block in
place (ctypes releases the GIL for the call). Run: ``python benchmarks/verify_checks.py [--json OUT]``; the package
is optional (``pip install google-crc32c``): without it only xxh3 is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash


def _crc32c_checks() -> dict[str, Callable[[bytearray, int], int]]:
    """CRC32C through google-crc32c's Python API and through its bundled library in place ({} without it)."""
    try:
        import google_crc32c
    except ImportError:
        return {}
    libs = glob.glob(str(Path(google_crc32c.__file__).parent.parent / "google_crc32c.libs" / "libcrc32c*.so*"))
    checks: dict[str, Callable[[bytearray, int], int]] = {
        "crc32c_api": lambda buf, _addr: int(google_crc32c.value(bytes(buf)))}
    if libs:
        lib = ctypes.CDLL(libs[0])
        lib.crc32c_extend.restype = ctypes.c_uint32
        lib.crc32c_extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        checks["crc32c_inplace"] = lambda buf, addr: int(lib.crc32c_extend(0, addr, len(buf)))
        probe = bytearray(os.urandom(4096))
        addr = ctypes.addressof((ctypes.c_char * len(probe)).from_buffer(probe))
        assert checks["crc32c_inplace"](probe, addr) == google_crc32c.value(bytes(probe))  # (the same CRC)
    return checks


def measure(blocks: int, block_bytes: int, threads: list[int], repeats: int) -> dict[str, Any]:
    checks: dict[str, Callable[[bytearray, int], int]] = {
        "xxh3_64": lambda buf, _addr: xxhash.xxh3_64_intdigest(buf),
        "xxh3_128": lambda buf, _addr: xxhash.xxh3_128_intdigest(buf),
        **_crc32c_checks()}
    out: dict[str, Any] = {"blocks": blocks, "block_bytes": block_bytes, "repeats": repeats,
                           "checks": list(checks), "hot_gib_s": {}, "after_read": []}
    hot = bytearray(os.urandom(1474560))
    hot_addr = ctypes.addressof((ctypes.c_char * len(hot)).from_buffer(hot))
    for name, check in checks.items():
        speeds = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(100):
                check(hot, hot_addr)
            speeds.append(100 * len(hot) / (time.perf_counter() - t) / 2**30)
        out["hot_gib_s"][name] = round(statistics.median(speeds), 2)
    with tempfile.TemporaryDirectory(prefix="dualpath-verify-") as root:
        fds: list[int] = []
        bufs = [bytearray(block_bytes) for _ in range(blocks)]
        addrs = [ctypes.addressof((ctypes.c_char * block_bytes).from_buffer(b)) for b in bufs]
        try:  # (every descriptor opened is closed, even when writing a later file fails)
            for i in range(blocks):
                path = os.path.join(root, f"{i}.blk")
                with open(path, "wb") as fh:
                    fh.write(os.urandom(block_bytes))
                fds.append(os.open(path, os.O_RDONLY))

            def reader(check: Callable[[bytearray, int], int] | None) -> Callable[[int], None]:
                def one(i: int) -> None:
                    if os.preadv(fds[i], [bufs[i]], 0) != block_bytes:
                        raise OSError(f"short read of block {i}")
                    if check is not None:
                        check(bufs[i], addrs[i])
                return one

            arms = {"raw": reader(None), **{name: reader(check) for name, check in checks.items()}}
            for n in threads:
                gib: dict[str, list[float]] = {name: [] for name in arms}
                with ThreadPoolExecutor(n) as pool:
                    list(pool.map(arms["raw"], range(blocks)))  # (warm the page cache)
                    for _ in range(repeats):  # (arms interleaved within each repeat)
                        for name, fn in arms.items():
                            t = time.perf_counter()
                            list(pool.map(fn, range(blocks)))
                            gib[name].append(blocks * block_bytes / (time.perf_counter() - t) / 2**30)
                med = {name: statistics.median(v) for name, v in gib.items()}
                out["after_read"].append({
                    "threads": n, "gib_s": {k: round(v, 2) for k, v in med.items()},
                    "ratio_vs_raw": {k: round(v / med["raw"], 3) for k, v in med.items() if k != "raw"}})
        finally:
            for fd in fds:
                os.close(fd)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=150)
    ap.add_argument("--block-bytes", type=int, default=2_560_000, help="default: a DeepSeek-case Full Block")
    ap.add_argument("--threads", default="8,2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    out = measure(args.blocks, args.block_bytes, [int(t) for t in args.threads.split(",")], args.repeats)
    out["command"] = "python benchmarks/verify_checks.py --json OUT"
    print("in cache, GiB/s:", out["hot_gib_s"])
    for row in out["after_read"]:
        print(f"{row['threads']} threads, warm preadv then the check, / raw preadv:", row["ratio_vs_raw"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
