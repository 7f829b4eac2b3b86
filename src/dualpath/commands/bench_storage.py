"""``dualpath bench storage``: the posix backend against raw ``os.preadv`` over the same files, in one run.

For each case (a small model's and a DeepSeek-like model's Full Block), N blocks are written through the
posix backend (write GiB/s, against raw ``pwritev`` of the same bytes to plain files), then read into one
preallocated host buffer, batch by batch:

* ``posix`` with checksum verification, ``posix`` without, and the raw baseline (a thread pool of the same
  size doing ``open`` + ``os.preadv([header scratch, slot])`` + ``close`` over the same files), interleaved and
  repeated, medians reported; page cache warm;
* cold (page cache dropped before each pass: ``/proc/sys/vm/drop_caches`` when writable, else
  ``posix_fadvise(DONTNEED)`` per file; the method used is in the JSON).

JSON: ``runs`` (one object per case x operation x method, with ``gib_s``), ``ratio`` = min over cases of
posix-verified warm read / raw warm read, ``checksum_overhead`` = max over cases of the share of the verified
read time that verification adds, ``(t_verify - t_noverify) / t_verify``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    spec_args: dict[str, Any]


CASES = [
    Case("smollm2-135m", "SmolLM2-135M: 30 layers x 3 KV heads x 64 dims bf16, 64-token blocks",
         {"attention": "mha", "n_layers": 30, "n_kv_heads": 3, "head_dim": 64, "dtype": "bfloat16"}),
    Case("deepseek-v32-mla-fp8", "DeepSeek-V3.2 MLA FP8: 61 layers x 656 B/token, 64-token blocks",
         {"attention": "mla", "n_layers": 61, "latent_dim": 512, "dtype": "float8_e4m3fn", "extra_bytes": 144}),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="small and fast (a few seconds)")
    parser.add_argument("--blocks", type=int, default=None, help="Full Blocks per case (default 256, quick 48)")
    parser.add_argument("--batch", type=int, default=32, help="blocks per read/write call (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="warm passes per method (default 5, quick 3)")
    parser.add_argument("--io-threads", type=int, default=8, help="thread pool size, both sides (default 8)")
    parser.add_argument("--root", default=None, help="directory for the block files (default: a temp dir)")
    parser.add_argument("--cold", choices=["auto", "drop_caches", "fadvise", "none"], default=None,
                        help="how to make the cache cold (default auto; quick: none)")


def run(args: argparse.Namespace) -> int:
    from dualpath.errors import ConfigError

    quick = bool(getattr(args, "quick", False))
    n_blocks = getattr(args, "blocks", None) or (48 if quick else 256)
    batch = max(1, min(getattr(args, "batch", 32) or 32, n_blocks))
    repeats = getattr(args, "repeats", None) or (3 if quick else 5)
    threads = getattr(args, "io_threads", 8) or 8
    cold = getattr(args, "cold", None) or ("none" if quick else "auto")
    if n_blocks <= 0 or repeats <= 0 or threads <= 0:
        raise ConfigError("bench storage: --blocks, --repeats and --io-threads must be positive")
    root_arg = getattr(args, "root", None)
    with tempfile.TemporaryDirectory(prefix="dualpath-bench-", dir=root_arg) as root:
        result = _bench(root, n_blocks, batch, repeats, threads, cold, quick)
    _print_table(result)
    out = getattr(args, "json_out", None)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return 0


# --- raw baselines ------------------------------------------------------------------------------------------


def _raw_read(pool: ThreadPoolExecutor, threads: int, paths: list[str], target: Any, header: int) -> None:
    """``os.preadv`` of [header scratch, slot] per file, the batch split over the pool's threads."""
    import threading

    local = threading.local()
    n_chunks = min(threads, len(paths))

    def chunk(c: int) -> None:
        hdr = getattr(local, "hdr", None)
        if hdr is None:
            hdr = local.hdr = memoryview(bytearray(header))
        for i in range(c, len(paths), n_chunks):
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                os.preadv(fd, [hdr, memoryview(target[i])], 0)
            finally:
                os.close(fd)

    list(pool.map(chunk, range(n_chunks)))


def _raw_write(pool: ThreadPoolExecutor, threads: int, paths: list[str], source: Any, header: bytes) -> None:
    n_chunks = min(threads, len(paths))
    hdr = memoryview(header)

    def chunk(c: int) -> None:
        for i in range(c, len(paths), n_chunks):
            fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.pwritev(fd, [hdr, memoryview(source[i])], 0)
            finally:
                os.close(fd)

    list(pool.map(chunk, range(n_chunks)))


# --- cold cache ---------------------------------------------------------------------------------------------


def _make_cold(method: str, paths: list[str]) -> None:
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for p in paths:  # fadvise
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cold_method(requested: str, paths: list[str]) -> str:
    if requested == "none":
        return "none"
    if requested in ("auto", "drop_caches"):
        try:
            _make_cold("drop_caches", paths)
            return "drop_caches"
        except OSError:
            if requested == "drop_caches":
                return "none (drop_caches not permitted)"
    if hasattr(os, "posix_fadvise"):
        return "fadvise"
    return "none (no posix_fadvise)"


# --- the benchmark ------------------------------------------------------------------------------------------


def _layout_for(case: Case) -> Any:
    from dualpath.kv.layout import KVLayout, KVSpec

    args = dict(case.spec_args)
    attention = args.pop("attention")
    spec = KVSpec.mha(**args) if attention == "mha" else KVSpec.mla(**args)
    return KVLayout(spec, block_tokens=64)


class _CaseBench:
    """One case: the block files, the preallocated buffer, and the timed passes."""

    def __init__(self, case: Case, root: str, n_blocks: int, batch: int, threads: int, pool: ThreadPoolExecutor):
        import torch

        from dualpath.kv.keys import BlockKeyer, KeyNamespace
        from dualpath.storage import blockfile as bf

        self.case, self.threads, self.pool = case, threads, pool
        self.layout = _layout_for(case)
        self.ns = KeyNamespace.for_layout(f"bench-{case.name}", self.layout)
        self.keys = BlockKeyer(self.ns).keys(list(range(64 * n_blocks)))
        self.root = os.path.join(root, case.name)
        self.raw_root = os.path.join(root, case.name + "-raw")
        os.makedirs(self.raw_root)
        gen = torch.Generator().manual_seed(0)
        self.src = torch.randint(0, 256, (batch, *self.layout.full_block_shape), dtype=torch.uint8, generator=gen)
        self.into = self.layout.alloc_full_blocks(batch)
        self.into.fill_(0)  # fault the pages in before timing
        self.batches = [(lo, min(lo + batch, n_blocks)) for lo in range(0, n_blocks, batch)]
        self.paths = [bf.block_path(self.root, k.hex) for k in self.keys]
        self.raw_paths = [os.path.join(self.raw_root, f"{i}.raw") for i in range(n_blocks)]
        self.header = bf.HEADER_SIZE

    def storage(self, verify: bool = True) -> Any:
        from dualpath.storage import create_storage
        from dualpath.storage.config import PosixStorageConfig

        cfg = PosixStorageConfig(root=Path(self.root), io_threads=self.threads, verify_checksum=verify)
        return create_storage(cfg, self.layout, self.ns)

    async def posix_pass(self, s: Any, write: bool = False) -> float:
        from dualpath.storage import BlockStatus

        t0 = time.perf_counter()
        for lo, hi in self.batches:
            if write:
                st = await s.write(self.keys[lo:hi], self.src[: hi - lo])
            else:
                st = await s.read(self.keys[lo:hi], self.into[: hi - lo])
            if st.count(BlockStatus.OK) != hi - lo:
                raise RuntimeError(f"bench storage: only {st.count(BlockStatus.OK)}/{hi - lo} blocks OK")
        return time.perf_counter() - t0

    def raw_read_pass(self) -> float:
        target = self.into.view(self.into.shape[0], -1).numpy()
        t0 = time.perf_counter()
        for lo, hi in self.batches:
            _raw_read(self.pool, self.threads, self.paths[lo:hi], target, self.header)
        return time.perf_counter() - t0

    def raw_write_pass(self) -> float:
        source = self.src.view(self.src.shape[0], -1).numpy()
        hdr = bytes(self.header)
        t0 = time.perf_counter()
        for lo, hi in self.batches:
            _raw_write(self.pool, self.threads, self.raw_paths[lo:hi], source, hdr)
        return time.perf_counter() - t0

    async def warm(self, repeats: int) -> dict[str, list[float]]:
        async with self.storage(True) as sv, self.storage(False) as snv:
            times: dict[str, list[float]] = {"write_posix": [await self.posix_pass(sv, write=True)]}
            times["write_raw"] = [self.raw_write_pass()]
            await self.posix_pass(sv)  # warm the page cache and the worker threads
            self.raw_read_pass()
            for m in ("posix_verify", "raw_preadv", "posix_noverify"):
                times[m] = []
            for _ in range(repeats):  # interleaved, so drift hits every method alike
                times["posix_verify"].append(await self.posix_pass(sv))
                times["raw_preadv"].append(self.raw_read_pass())
                times["posix_noverify"].append(await self.posix_pass(snv))
            return times

    async def cold_posix(self, method: str) -> float:
        async with self.storage(True) as s:
            _make_cold(method, self.paths)
            return await self.posix_pass(s)

    def checksum_alone(self) -> float:
        import xxhash

        flat = self.into.view(self.into.shape[0], -1).numpy()
        t0 = time.perf_counter()
        for lo, hi in self.batches:
            for i in range(hi - lo):
                xxhash.xxh3_64_intdigest(memoryview(flat[i]))
        return time.perf_counter() - t0


def _bench(root: str, n_blocks: int, batch: int, repeats: int, threads: int, cold: str, quick: bool) -> dict[str, Any]:
    import anyio

    runs: list[dict[str, Any]] = []
    cases: dict[str, Any] = {}
    cold_used = "none"
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="raw-io")
    for case in CASES:
        cb = _CaseBench(case, root, n_blocks, batch, threads, pool)
        nbytes = cb.layout.full_block_bytes
        gib = n_blocks * nbytes / 2**30

        def record(op: str, method: str, seconds: float, _gib: float = gib, _case: str = case.name,
                   _nbytes: int = nbytes, **extra: Any) -> float:
            runs.append({"case": _case, "op": op, "method": method, "gib_s": round(_gib / seconds, 3),
                         "seconds": round(seconds, 4), "blocks": n_blocks, "block_bytes": _nbytes, **extra})
            return _gib / seconds

        times = anyio.run(cb.warm, repeats)
        write_posix = record("write", "posix", times["write_posix"][0])
        write_raw = record("write", "raw_pwritev", times["write_raw"][0])
        warm = {m: record("read_warm", m, statistics.median(times[m]), repeats=repeats)
                for m in ("posix_verify", "posix_noverify", "raw_preadv")}
        xxh = record("checksum", "xxh3_64_1thread", cb.checksum_alone())
        cold_gib: dict[str, float] = {}
        if cold != "none":
            cold_used = _cold_method(cold, cb.paths)
            if not cold_used.startswith("none"):
                tp, tr = [], []
                for _ in range(1 if quick else 2):
                    tp.append(anyio.run(cb.cold_posix, cold_used))
                    _make_cold(cold_used, cb.paths)
                    tr.append(cb.raw_read_pass())
                cold_gib["posix_verify"] = record("read_cold", "posix_verify", statistics.median(tp),
                                                  cold_method=cold_used)
                cold_gib["raw_preadv"] = record("read_cold", "raw_preadv", statistics.median(tr),
                                                cold_method=cold_used)
        t_v = gib / warm["posix_verify"]
        t_nv = gib / warm["posix_noverify"]
        cases[case.name] = {
            "description": case.description,
            "block_bytes": nbytes,
            "read_ratio_warm": round(warm["posix_verify"] / warm["raw_preadv"], 3),
            "read_ratio_warm_noverify": round(warm["posix_noverify"] / warm["raw_preadv"], 3),
            "checksum_overhead": round(max(0.0, (t_v - t_nv) / t_v), 3),
            "checksum_alone_share": round((gib / xxh) / t_v, 3),
            "write_ratio": round(write_posix / write_raw, 3),
        }
        if cold_gib:
            cases[case.name]["read_ratio_cold"] = round(cold_gib["posix_verify"] / cold_gib["raw_preadv"], 3)
        _rmtree(cb.root)
        _rmtree(cb.raw_root)
    pool.shutdown()
    return {
        "bench": "storage",
        "runs": runs,
        "ratio": min(c["read_ratio_warm"] for c in cases.values()),
        "ratio_definition": "min over cases of posix read (checksum verified) / raw os.preadv read, warm page cache",
        "checksum_overhead": max(c["checksum_overhead"] for c in cases.values()),
        "checksum_overhead_definition": "max over cases of (t_verify - t_noverify) / t_verify, warm reads",
        "cold_method": cold_used,
        "settings": {"blocks": n_blocks, "batch": batch, "repeats": repeats, "io_threads": threads,
                     "cpus": os.cpu_count(), "quick": quick},
        "cases": cases,
    }


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _print_table(result: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"{'case':<22} {'op':<10} {'method':<16} {'GiB/s':>8}\n")
    for r in result["runs"]:
        w(f"{r['case']:<22} {r['op']:<10} {r['method']:<16} {r['gib_s']:>8.2f}\n")
    for name, c in result["cases"].items():
        cold = f", cold {c['read_ratio_cold']:.2f}" if "read_ratio_cold" in c else ""
        w(f"{name}: read posix/raw warm {c['read_ratio_warm']:.2f} (no verify {c['read_ratio_warm_noverify']:.2f}"
          f"{cold}), checksum overhead {c['checksum_overhead']:.1%}, write posix/raw {c['write_ratio']:.2f}\n")
    w(f"ratio (min warm, verified) = {result['ratio']:.3f}; checksum overhead (max) = "
      f"{result['checksum_overhead']:.1%}; cold method: {result['cold_method']}\n")
