"""The in-process cluster against a recompute of every turn, on random agents under pressure.

Each run builds a cluster over a tiny random Llama that ``transformers`` wrote (fp32, CPU), with a random shape:
1-2 prefill and 1-2 decode engines, a forward-batch token limit of 64-1,024, layer-wise or not, a small or large
decode KV pool, 1-4 layers streamed ahead, memory or posix storage, with or without a capacity of 40 blocks (so
blocks get evicted). 2-10 agents run at once, some sharing a long prefix, each 1-6 turns of 1-8 generated tokens,
through the scheduler's choice or a named path (``pe``, ``de``, ``split`` with 0-3 blocks on the PE side); 15 %
of turns are cancelled by their caller after 0-200 ms. Contexts grow past ``prefill_max_batch_tokens`` (the prefill
engines' scratch then grows); only a prompt beyond the model's context may be refused. Every turn that completes
is run again with ``path="recompute"`` (no stored KV) and must give the same greedy tokens: a loaded block with the wrong bytes, a
page shared by two requests, a layer streamed into the wrong slot would change them. No turn may fail. At the end
no request may be left decoding, every decode pool page and every host buffer byte must be free. Exits 1 on any
finding.

    python benchmarks/cluster_model_fuzz.py [--seeds 16] [--start 0] [--json OUT]

It found, in the 47th session, a turn cancelled while the decode engine stepped it: the cleanup took it out of the
batch under the step, and when that step was the turn's last the engine failed every request it was decoding.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from _fuzz_report import finish, seed_args, show  # noqa: E402
from engine_helpers import HF_BASE, hf_llama, llama_config  # noqa: E402 (the tests' tiny Llama and its config)

from dualpath.cluster import Cluster  # noqa: E402
from dualpath.storage.blockfile import file_size  # noqa: E402
from dualpath.storage.config import MemoryStorageConfig, PosixStorageConfig  # noqa: E402

VOCAB = HF_BASE["vocab_size"]


async def run(model_dir: Path, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    shape = {"prefill_nodes": rng.choice([1, 2]), "decode_nodes": rng.choice([1, 2]),
             "prefill_max_batch_tokens": rng.choice([64, 256, 1024]), "layerwise": rng.random() < 0.7,
             "kv_pool_tokens": rng.choice([512, 2048]), "layers_ahead": rng.choice([1, 2, 4])}
    cfg = llama_config(model_dir, **shape)
    storage_kind = rng.choice(["memory", "posix"])
    root = tempfile.mkdtemp(prefix="dualpath-cluster-fuzz-")
    cap_blocks = rng.choice([None, 40])
    problems: list[dict[str, Any]] = []
    counts = {"turns": 0, "with_hits": 0, "cancelled": 0, "refused": 0}
    t0 = time.monotonic()
    async with Cluster(cfg) as probe:  # (the block footprint of this layout, for the capacity)
        block = probe.layout.full_block_bytes
    foot = file_size(block) if storage_kind == "posix" else block
    cap = None if cap_blocks is None else cap_blocks * foot
    cfg.storage = (MemoryStorageConfig(capacity_bytes=cap) if storage_kind == "memory"
                   else PosixStorageConfig(root=root, capacity_bytes=cap))
    async with Cluster(cfg) as c:
        base = [rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 200))]

        async def agent(i: int) -> None:
            ctx = (base[: rng.randint(0, len(base))] if rng.random() < 0.7 else []) + \
                [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 80))]
            for turn in range(rng.randint(1, 6)):
                if len(ctx) > 400:
                    return
                gen = rng.randint(1, 8)
                path = rng.choice([None, None, "pe", "de", "split"])
                kw: dict[str, Any] = {} if path is None else {"path": path, "pe": 0, "de": 0}
                if path == "split":
                    kw["pe_blocks"] = rng.randint(0, 3)
                name = f"a{i}t{turn}"
                try:
                    if rng.random() < 0.15:
                        counts["cancelled"] += 1
                        with anyio.move_on_after(rng.uniform(0.0, 0.2)):
                            await c.run_turn(name, list(ctx), gen, **kw)
                        continue
                    r = await c.run_turn(name, list(ctx), gen, **kw)
                    ref = await c.run_turn(name + "/ref", list(ctx), gen, path="recompute", pe=0, de=0)
                except Exception as exc:
                    limit = (c.pes[0].max_slot_blocks - 1) * c.layout.block_tokens
                    if "one-layer scratch" in str(exc) and len(ctx) > limit:
                        counts["refused"] += 1  # longer than the model's context: refused, as documented
                        return
                    problems.append({"agent": i, "turn": turn, "path": path, "what": "the turn failed",
                                     "error": repr(exc)[:300]})
                    return
                counts["turns"] += 1
                counts["with_hits"] += r.hit_tokens > 0
                if list(r.token_ids) != list(ref.token_ids):
                    problems.append({"agent": i, "turn": turn, "path": str(r.path), "hit_tokens": r.hit_tokens,
                                     "what": "tokens differ from a recompute", "got": list(r.token_ids),
                                     "recompute": list(ref.token_ids)})
                ctx += list(r.token_ids) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]

        with anyio.fail_after(300):
            async with anyio.create_task_group() as tg:
                for i in range(rng.randint(2, 10)):
                    tg.start_soon(agent, i)
        for de in c.des:
            with anyio.fail_after(30):  # background writes of the last turns
                while de.pool.num_free < de.pool.num_blocks or de.host.used_bytes:
                    await anyio.sleep(0.01)
            if de.running:
                problems.append({"what": "requests left decoding", "engine": de.name, "n": len(de.running)})
        for pe in c.pes:
            if pe.host.used_bytes:
                problems.append({"what": "host buffer bytes left in use", "engine": pe.name,
                                 "bytes": pe.host.used_bytes})
    return {"seed": seed, "shape": shape, "storage": storage_kind, "capacity_blocks": cap_blocks, **counts,
            "problems": problems, "seconds": round(time.monotonic() - t0, 2)}


def main() -> int:
    args = seed_args(__doc__, 16)
    model_dir = Path(tempfile.mkdtemp(prefix="dualpath-cluster-fuzz-model-"))
    hf_llama(model_dir)
    rows = []
    for seed in range(args.start, args.start + args.seeds):
        row = anyio.run(run, model_dir, seed)
        rows.append(row)
        show(f"seed {seed}: {row['turns']} turns ({row['with_hits']} with hits, {row['cancelled']} cancelled, "
             f"{row['refused']} refused), {row['storage']} cap {row['capacity_blocks']}", row)
    return finish(rows, f"{len(rows)} runs, {sum(r['turns'] for r in rows)} turns compared with a recompute", args.json)


if __name__ == "__main__":
    sys.exit(main())
