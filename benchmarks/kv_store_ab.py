"""The torch reference's KV store, one ``index_copy_`` into the flat pool vs the masked two-write form it replaced,
timed end to end in greedy generation (what ``dualpath generate`` runs on CPU), alternating in one process.

Prints old / new time per generated token (median of ``--repeats``) for a few families built by
``benchmarks/model_families.py`` (random weights written by transformers). Run:
``python benchmarks/kv_store_ab.py [--families llama,gpt_neox,gptj] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import model_families as mf  # noqa: E402

from dualpath.kernels import reference as ref  # noqa: E402
from dualpath.model.config import LlamaModelConfig  # noqa: E402
from dualpath.model.loader import load_model  # noqa: E402


def masked_store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """The store before 887e19e: skipped slots masked out, then K and V written by two advanced-index writes."""
    bt = kv_layer.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blk, off = slots // bt, slots % bt
    kv_layer[blk, off, 0] = k[keep].to(kv_layer.dtype)
    kv_layer[blk, off, 1] = v[keep].to(kv_layer.dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="llama,gpt_neox,gptj")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    new = ref.store_kv
    for fam in args.families.split(","):
        hf = mf._hf_model(fam)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = load_model(LlamaModelConfig(path=d, attention_backend="torch"), with_tokenizer=False)[0]
        prompt = list(range(1, 65))
        mf._ours_generate(ours, prompt, 32)
        times: dict[str, list[float]] = {"old": [], "new": []}
        try:
            for _ in range(args.repeats):
                for name, fn in (("old", masked_store_kv), ("new", new)):
                    ref.store_kv = fn
                    t0 = time.perf_counter()
                    mf._ours_generate(ours, prompt, 32)
                    times[name].append(time.perf_counter() - t0)
        finally:
            ref.store_kv = new
        old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"{fam:10s} old / new time {old_s / new_s:.3f}  ms per token: old {old_s / 32 * 1e3:.2f}, "
              f"new {new_s / 32 * 1e3:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
