"""DeepSeek-V4 over paged rows against transformers' eager forward on the same weights: prefill and decode speed,
and what the rows cost in bytes.

A random DeepSeek-V4 (``--hidden`` wide, 8 layers: HCA, HCA, then CSA and HCA taking turns and a sliding layer;
CSA entries every 4 tokens, HCA every 128, a 128-token window, the indexer keeping 64 entries, 4 hyper-connection
streams, 8 experts) saved by transformers; one prompt of ``--tokens`` tokens prefilled in 64-token blocks, then
``--steps`` decode steps, each timed best of ``--repeats``; the same prompt and steps through transformers (its own
cache) in the same run; the logits of the last step are compared. It also prints the page row's bytes per token and
layer for transformers' default config (DeepSeek-V4-Flash's shape) in bf16 beside DeepSeek-V3's latent row.

Run: ``python benchmarks/deepseek_v4_speed.py [--tokens 1024] [--steps 16] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model
    from dualpath.model.spec import load_spec

    torch.set_num_threads(args.threads)
    csa, hca, sliding = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
    h = args.hidden
    torch.manual_seed(0)
    cfg = transformers.DeepseekV4Config(
        vocab_size=2048, hidden_size=h, moe_intermediate_size=h // 2, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=1, head_dim=64, q_lora_rank=h // 2, n_routed_experts=8, num_experts_per_tok=2,
        layer_types=[hca, hca, csa, hca, csa, hca, csa, sliding], compress_rates={csa: 4, hca: 128},
        sliding_window=128, o_groups=4, o_lora_rank=64, index_n_heads=8, index_head_dim=32, index_topk=64,
        partial_rotary_factor=0.25, max_position_embeddings=8192, pad_token_id=None, bos_token_id=None,
        eos_token_id=None)
    hf = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("sinks", "position_bias", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g))
        for n, b in hf.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(b.shape[0])]))
    seq = torch.randint(0, 2048, (args.tokens + args.steps,), generator=g).tolist()
    prompt, steps = seq[:args.tokens], seq[args.tokens:]
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(LlamaModelConfig(path=d, attention_backend="torch", time_model="off"),
                          with_tokenizer=False)[0]

    def run_theirs() -> tuple[float, float, torch.Tensor]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(torch.tensor([prompt]), use_cache=True)
            t1 = time.perf_counter()
            cache = out.cache
            for tok in steps:
                out = hf(torch.tensor([[tok]]), cache=cache, use_cache=True)
                cache = out.cache
            return t1 - t0, time.perf_counter() - t1, out.logits[0, -1].float()

    bt = 64
    def run_ours() -> tuple[float, float, torch.Tensor]:
        n = args.tokens + args.steps
        pool = KVPool(paged_kv_spec(ours.spec, bt), num_blocks=n // bt + 2, block_tokens=bt)
        table = pool.allocate(n // bt + 1)
        tables = torch.tensor([table], dtype=torch.int32)
        t0 = time.perf_counter()
        ours(SeqBatch.build([prompt], [0], [table], bt), pool.layers)
        t1 = time.perf_counter()
        logits = None
        for i, tok in enumerate(steps):
            logits = ours.decode_step(torch.tensor([tok]), torch.tensor([args.tokens + i]), tables, pool.layers)
        assert logits is not None
        return t1 - t0, time.perf_counter() - t1, logits[0]

    theirs = [run_theirs() for _ in range(args.repeats)]
    mine = [run_ours() for _ in range(args.repeats)]
    diff = float((mine[-1][2] - theirs[-1][2]).abs().max())
    tp, td = min(t[0] for t in theirs), min(t[1] for t in theirs)
    op, od = min(t[0] for t in mine), min(t[1] for t in mine)
    flash = load_spec({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "dtype": "bfloat16"})
    result: dict[str, Any] = {
        "tokens": args.tokens, "steps": args.steps, "threads": args.threads, "block_tokens": bt,
        "prefill_s": {"ours": op, "transformers": tp, "speed_ratio": tp / op},
        "decode_s": {"ours": od, "transformers": td, "speed_ratio": td / od},
        "last_logits_max_abs_diff": diff,
        "flash_row_bytes_per_token_layer_bf16": flash.kv_spec().bytes_per_token_layer,
        "deepseek_v3_latent_row_bytes_bf16": (512 + 64) * 2,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
