"""CPU figure: one decode step of a small Mixtral / Qwen2-MoE / Qwen3-MoE in this project (paged KV, torch kernels,
the shared expert loop) against transformers' eager decode (``attn_implementation="eager"``, DynamicCache) on the
same weights and tokens. One torch thread; the two sides alternate step by step and the medians are compared.

    python3 benchmarks/cpu_moe_decode.py [--families mixtral,qwen2_moe,qwen3_moe] [--steps 50] [--prompt 64]

Prints, per family, ``ours ms/step``, ``transformers ms/step`` and ours / transformers (< 1: ours is faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

BASE = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096, "num_experts_per_tok": 2}
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 16, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 256}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 16, "moe_intermediate_size": 64, "norm_topk_prob": True}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    for fam in a.families.split(","):
        cfg_cls, model_cls, kw = FAMILIES[fam]
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**BASE, **kw)).eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
            ours, _ = load_model(LlamaModelConfig(path=d, attention_backend="torch"), with_tokenizer=False)
        ctx = torch.randint(0, BASE["vocab_size"], (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        bt = 16
        pool = KVPool(ours.spec.kv_spec(), num_blocks=(a.prompt + a.steps) // bt + 2, block_tokens=bt)
        table = pool.allocate(pool.num_blocks)
        ours(SeqBatch.build([ctx], [0], [table], bt), pool.layers)
        cache = transformers.DynamicCache(config=hf.config)
        with torch.no_grad():
            hf(torch.tensor([ctx]), cache=cache, use_cache=True)
        tables = torch.tensor([table], dtype=torch.int32)
        mine, theirs = [], []
        for i in range(a.steps + 5):
            tok, pos = ctx[i % len(ctx)], a.prompt + i
            t0 = time.perf_counter()
            ours.decode_step(torch.tensor([tok]), torch.tensor([pos]), tables, pool.layers)
            t1 = time.perf_counter()
            with torch.no_grad():
                hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
            t2 = time.perf_counter()
            if i >= 5:  # warm-up
                mine.append(t1 - t0)
                theirs.append(t2 - t1)
        m, t = statistics.median(mine), statistics.median(theirs)
        print(f"{fam}: ours {m * 1e3:.2f} ms/step, transformers {t * 1e3:.2f} ms/step, ours/transformers {m / t:.2f}")


if __name__ == "__main__":
    main()
