"""DeepSeek-V3.2's sparse attention on the torch path: a whole model forward per decode step with the lightning
indexer's selection (``index_topk`` below the context) against the same model attending densely (``index_topk``
above it), same weights, same KV, arms alternating in one run.

    python benchmarks/dsa_attention.py [--contexts 1024,4096] [--topk 512] [--repeats 5]

Prints, per context, the median step time of each arm and their ratio (sparse / dense). A small random V3.2
(4 layers, 8 heads, kv_lora_rank 128, 16 indexer heads of 64) in float32 on the CPU: the ratio is what the
selection (its scoring over every key, the sort, the masked attention) costs over dense MLA on this path, not
what DeepSeek's FP8 indexer kernels cost on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import build_model
from dualpath.model.spec import DeepseekV3Spec

CONFIG = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 1024,
          "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 8, "q_lora_rank": 96, "kv_lora_rank": 128, "qk_nope_head_dim": 32,
          "qk_rope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1,
          "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
          "index_n_heads": 16, "index_head_dim": 64, "max_position_embeddings": 65536}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    spec = DeepseekV3Spec.from_hf_config({**CONFIG, "index_topk": a.topk}, dtype="float32")
    model = build_model(spec, None, seed=0, backend="torch")
    bt = 64
    for ctx in (int(c) for c in a.contexts.split(",")):
        pool = KVPool(spec.kv_spec(), num_blocks=ctx // bt + 2, block_tokens=bt)
        table = pool.allocate(ctx // bt + 1)
        ids = torch.randint(0, CONFIG["vocab_size"], (ctx,)).tolist()
        for lo in range(0, ctx, 1024):  # the context, prefilled in chunks
            model(SeqBatch.build([ids[lo:lo + 1024]], [lo], [table], bt), pool.layers)
        tables = torch.tensor([table], dtype=torch.int32)
        times: dict[str, list[float]] = {"sparse": [], "dense": []}
        for _ in range(a.repeats):
            for arm, topk in (("sparse", a.topk), ("dense", 1 << 30)):
                object.__setattr__(model.spec, "index_topk", topk)
                t0 = time.perf_counter()
                model.decode_step(torch.tensor([7]), torch.tensor([ctx]), tables, pool.layers)
                times[arm].append(time.perf_counter() - t0)
        object.__setattr__(model.spec, "index_topk", a.topk)
        s, d = statistics.median(times["sparse"]), statistics.median(times["dense"])
        print(f"context {ctx:6d}  index_topk {a.topk}  decode step: sparse {1e3 * s:7.2f} ms  dense {1e3 * d:7.2f} ms"
              f"  sparse/dense {s / d:5.2f}", flush=True)


if __name__ == "__main__":
    main()
