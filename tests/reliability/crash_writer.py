"""Run as a script: fork writers into a posix storage root and SIGKILL them at random instants, many times;
then check every block that reads back. Prints one JSON line of counts.

    python crash_writer.py ROOT KILLS SEED

Block ``i``'s key is SHA-256 of ``i``; its content is a pattern derived from the key, so a block that reads
back can be checked against what was written. Checks, independently of the storage code's own verification:
every ``.kvb`` file has the full size, a valid header naming its own key, and a payload equal to the pattern.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import torch

from dualpath.kv.keys import KeyNamespace
from dualpath.kv.layout import KVLayout, KVSpec
from dualpath.storage import blockfile as bf
from dualpath.storage.config import PosixStorageConfig
from dualpath.storage.posix import PosixStorage
from dualpath.types import BlockKey

LAYOUT = KVLayout(KVSpec.mha(4, 2, 64, "bfloat16"), 64)  # 64 KiB Full Blocks: writes take a while
NS = KeyNamespace("crash-test", LAYOUT.spec.fingerprint(), LAYOUT.block_tokens)
N_KEYS = 4000


def key(i: int) -> BlockKey:
    return BlockKey(hashlib.sha256(str(i).encode()).digest())


def pattern(k: BlockKey) -> np.ndarray:
    seed = int.from_bytes(k.digest[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.full_block_bytes, dtype=np.uint8)


def writer(root: str, start: int) -> None:
    async def main() -> None:
        st = PosixStorage(PosixStorageConfig(root=Path(root), io_threads=4), LAYOUT, NS)
        await st.start()
        i = start
        while True:
            ks = [key((i + j) % N_KEYS) for j in range(8)]
            blocks = torch.from_numpy(np.stack([pattern(k) for k in ks])).view(8, *LAYOUT.full_block_shape)
            await st.write(ks, blocks)
            i += 8

    anyio.run(main)


def verify(root: str) -> dict[str, int]:
    out = {"files": 0, "torn_or_wrong_files": 0, "tmp_files": 0, "read_ok": 0, "read_wrong": 0, "read_bad": 0}
    checker = bf.HeaderChecker(NS.digest, LAYOUT.full_block_bytes)
    want = bf.file_size(LAYOUT.full_block_bytes)
    for f in Path(root).rglob("*"):
        if f.name.endswith(bf.TMP_SUFFIX):
            out["tmp_files"] += 1
        if not f.name.endswith(bf.BLOCK_SUFFIX):
            continue
        out["files"] += 1
        data = f.read_bytes()
        k = BlockKey.from_hex(f.name[:64])
        ok = (len(data) == want and checker.check(bytearray(data[: bf.HEADER_SIZE]), k.digest) is not None
              and np.array_equal(np.frombuffer(data[bf.HEADER_SIZE :], dtype=np.uint8), pattern(k)))
        out["torn_or_wrong_files"] += int(not ok)

    async def read_back() -> None:
        st = PosixStorage(PosixStorageConfig(root=Path(root)), LAYOUT, NS)
        async with st:
            present = [key(i) for i in range(N_KEYS) if st.contains(key(i))]
            buf = torch.empty((1, *LAYOUT.full_block_shape), dtype=torch.uint8)
            for k in present:
                (status,) = await st.read([k], buf)
                if status.value != "ok":
                    out["read_bad"] += 1
                elif np.array_equal(buf.view(-1).numpy(), pattern(k)):
                    out["read_ok"] += 1
                else:
                    out["read_wrong"] += 1

    anyio.run(read_back)
    return out


def main() -> None:
    root, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    done = 0
    for n in range(kills):
        pid = os.fork()
        if pid == 0:
            try:
                writer(root, rng.randrange(N_KEYS) if n else 0)
            finally:
                os._exit(0)
        if n == 0:  # the first writer lands a block first: on a loaded runner a writer may not finish its first
            # batch (interpreter, storage threads, 8 patterns) within 0.3 s, and then no block is ever checked
            end = time.monotonic() + 60
            while not any(f.name.endswith(bf.BLOCK_SUFFIX) for f in Path(root).rglob("*")) \
                    and time.monotonic() < end:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done += 1
    print(json.dumps({"kills": done, **verify(root)}))


if __name__ == "__main__":
    main()
