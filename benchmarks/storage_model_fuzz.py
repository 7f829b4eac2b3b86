"""Storage backends against a model of their contract, on random sequences of operations.

Each run opens one backend (``memory``, ``posix``, or ``posix-shared``: two posix storages of one process over one
root, each operation on either; with or without a capacity of a few blocks) over a small
layout and applies ``--steps`` random operations to 40 keys, each key always written with the same content (keys
are content addresses). A set of the keys stored so far is the model; with a capacity, eviction makes it an upper
bound. Operations and what must hold:

* ``write`` of 1-6 keys (repeats allowed): without a capacity every block is ``OK`` and ``contains``;
* ``read``: an ``OK`` block holds exactly the bytes written and was written (and not deleted) before; without a
  capacity a stored block is never ``MISSING``; no other status appears;
* ``delete``: the keys are gone;
* ``lookup``: never more than the model's stored prefix (equal to it without a capacity), every block it counts
  ``contains``;
* ``restart`` (posix): close and reopen over the same root: nothing deleted comes back, nothing stored is lost
  (without a capacity);
* ``concurrent``: three writes or reads at once: the same rules;
* ``damage`` of a stored block ("flip", "truncate" or "foreign"): its next read is ``CORRUPT`` and it is gone.

With a capacity, after every operation at most that many blocks are indexed and (posix) that many block files are
on disk. Exits 1 on any finding.

    python benchmarks/storage_model_fuzz.py [--seeds 20] [--start 0] [--steps 250] [--kinds ...] [--json OUT]

It found, in the 47th session, the posix backend above its capacity: a stored block that a concurrent write
evicted while a write of the same key checked its file came back without a reservation (6 files under a 5-block
cap).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch
from _fuzz_report import finish, show

from dualpath.kv.keys import BlockKeyer, KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import BlockStatus, Storage, create_storage
from dualpath.storage.blockfile import BLOCK_SUFFIX
from dualpath.storage.config import MemoryStorageConfig, PosixStorageConfig

LAYOUT = KVLayout(KVSpec.mha(n_layers=2, n_kv_heads=1, head_dim=8, dtype="bfloat16"), block_tokens=4)
NS = KeyNamespace.for_layout("storage-model-fuzz", LAYOUT)
N_KEYS = 40
KEYS = BlockKeyer(NS).keys(list(range(N_KEYS * LAYOUT.block_tokens)))
SHAPE = LAYOUT.full_block_shape
CONTENT = [torch.randint(0, 256, SHAPE, dtype=torch.uint8, generator=torch.Generator().manual_seed(7919 * i + 1))
           for i in range(N_KEYS)]


class Run:
    def __init__(self, kind: str, seed: int, cap_blocks: int, root: Path) -> None:
        self.kind, self.rng, self.cap, self.root = kind, random.Random(seed), cap_blocks, root
        self.stored: set[int] = set()  # the model: keys written and not deleted (a superset under eviction)
        self.problems: list[dict[str, Any]] = []
        self.ops: dict[str, int] = {}
        self.step = 0

    def problem(self, op: str, what: str, **detail: Any) -> None:
        self.problems.append({"step": self.step, "op": op, "what": what, **detail})

    def make(self) -> Storage:
        rng = self.rng
        if self.kind == "memory":
            foot = create_storage(MemoryStorageConfig(), LAYOUT, NS).block_footprint
            return create_storage(MemoryStorageConfig(capacity_bytes=self.cap * foot if self.cap else None), LAYOUT, NS)
        foot = create_storage(PosixStorageConfig(root=self.root), LAYOUT, NS).block_footprint
        return create_storage(PosixStorageConfig(
            root=self.root, io_threads=rng.choice([1, 2, 4]), durability=rng.choice(["none", "fsync"]),
            capacity_bytes=self.cap * foot if self.cap else None), LAYOUT, NS)

    async def write(self, st: Storage, idx: list[int], op: str) -> None:
        statuses = await st.write([KEYS[i] for i in idx], torch.stack([CONTENT[i] for i in idx]))
        for i, s in zip(idx, statuses, strict=True):
            if s is BlockStatus.OK:
                self.stored.add(i)
            elif not self.cap:
                self.problem(op, "a write failed without a capacity", key=i, status=s.value)
            if not self.cap and not st.contains(KEYS[i]):
                self.problem(op, "not contained after its write", key=i)

    async def read(self, st: Storage, idx: list[int], op: str) -> None:
        into = torch.zeros((len(idx), *SHAPE), dtype=torch.uint8)
        before = set(self.stored)  # (a concurrent write may store a key while this read runs)
        statuses = await st.read([KEYS[i] for i in idx], into)
        for j, (i, s) in enumerate(zip(idx, statuses, strict=True)):
            if s is BlockStatus.OK:
                if not torch.equal(into[j], CONTENT[i]):
                    self.problem(op, "a read returned other bytes", key=i)
                if i not in self.stored:
                    self.problem(op, "a read found a block never written or deleted", key=i)
            elif s is BlockStatus.MISSING:
                if i in before and not self.cap:
                    self.problem(op, "a stored block read as missing", key=i)
            else:
                self.problem(op, "unexpected read status", key=i, status=s.value)

    async def one(self, stores: list[Storage]) -> list[Storage]:
        rng = self.rng
        st = rng.choice(stores)
        r = rng.random()
        idx = [rng.randrange(N_KEYS) for _ in range(rng.randint(1, 6))]
        if rng.random() < 0.3:
            idx = list(dict.fromkeys(idx))
        op = ("write" if r < 0.35 else "read" if r < 0.65 else "delete" if r < 0.75 else "lookup" if r < 0.85
              else "restart" if r < 0.9 else "concurrent" if r < 0.95 else "damage")
        if op == "restart" and self.kind == "memory":
            op = "lookup"
        self.ops[op] = self.ops.get(op, 0) + 1
        if op == "write":
            await self.write(st, idx, op)
        elif op == "read":
            await self.read(st, idx, op)
        elif op == "delete":
            await st.delete([KEYS[i] for i in idx])
            for i in idx:
                self.stored.discard(i)
                if st.contains(KEYS[i]):
                    self.problem(op, "contained after its delete", key=i)
        elif op == "lookup":
            n = st.lookup([KEYS[i] for i in idx])
            model = 0
            for i in idx:
                if i not in self.stored:
                    break
                model += 1
            if n > model or (n != model and not self.cap):
                self.problem(op, "lookup disagrees with the model", got=n, model=model)
            if not all(st.contains(KEYS[i]) for i in idx[:n]):
                self.problem(op, "lookup counts a block contains denies")
        elif op == "restart":
            for old in stores:
                await old.close()
            stores = [self.make() for _ in stores]
            for new in stores:
                await new.start()
            st = stores[0]
            for i in range(N_KEYS):
                there = st.contains(KEYS[i])
                if there and i not in self.stored:
                    self.problem(op, "a deleted block came back", key=i)
                if not there and i in self.stored and not self.cap:
                    self.problem(op, "a stored block was lost", key=i)
        elif op == "concurrent":
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    some = [rng.randrange(N_KEYS) for _ in range(3)]
                    tg.start_soon(self.write if rng.random() < 0.5 else self.read, rng.choice(stores), some, op)
        else:
            present = sorted(i for i in self.stored if st.contains(KEYS[i]))
            if present:
                i = rng.choice(present)
                how = rng.choice(["flip", "truncate", "foreign"])
                if st.damage(KEYS[i], how):
                    into = torch.zeros((1, *SHAPE), dtype=torch.uint8)
                    s = (await st.read([KEYS[i]], into))[0]
                    if s is not BlockStatus.CORRUPT:
                        self.problem(op, "damage not caught", how=how, status=s.value)
                    self.stored.discard(i)
                    if st.contains(KEYS[i]):
                        self.problem(op, "a corrupt block is still contained", key=i)
        if self.cap:
            indexed = sum(st.contains(k) for k in KEYS)
            if indexed > self.cap:
                self.problem(op, "more blocks indexed than the capacity holds", blocks=indexed)
            if self.kind != "memory":
                files = sum(1 for _ in self.root.rglob(f"*{BLOCK_SUFFIX}"))
                if files > self.cap:
                    self.problem(op, "more block files on disk than the capacity holds", files=files)
        return stores


async def run(kind: str, seed: int, cap_blocks: int, steps: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dualpath-storage-fuzz-"))
    r = Run(kind, seed, cap_blocks, root)
    t0 = time.monotonic()
    stores = [r.make() for _ in range(2 if kind == "posix-shared" else 1)]
    for st in stores:
        await st.start()
    try:
        for r.step in range(steps):
            stores = await r.one(stores)
    finally:
        for st in stores:
            await st.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"kind": kind, "seed": seed, "capacity_blocks": cap_blocks, "ops": r.ops, "problems": r.problems,
            "seconds": round(time.monotonic() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--steps", type=int, default=250, help="operations per run")
    ap.add_argument("--kinds", default="memory,posix,posix-shared",
                    help="comma-separated: memory, posix, posix-shared (two posix storages of one process on one root)")
    ap.add_argument("--capacity", type=int, default=5, help="blocks of the capped runs (each seed runs uncapped too)")
    ap.add_argument("--json", help="write every run's operation counts and findings here")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in ("memory", "posix", "posix-shared")]:
        ap.error(f"--kinds: unknown backend(s) {', '.join(bad)} (expected memory, posix, posix-shared)")
    if args.seeds < 1 or args.steps < 1 or args.start < 0 or args.capacity < 1:
        ap.error("--seeds, --steps and --capacity must be >= 1, --start >= 0")
    rows = []
    for seed in range(args.start, args.start + args.seeds):
        for kind in kinds:
            for cap in (0, args.capacity):
                row = anyio.run(run, kind, seed, cap, args.steps)
                rows.append(row)
                label = f"cap {cap}" if cap else "no cap"
                show(f"{kind:7s} {label:7s} seed {seed}", row)
    return finish(rows, f"{len(rows)} runs, {sum(sum(r['ops'].values()) for r in rows)} operations", args.json)


if __name__ == "__main__":
    sys.exit(main())
