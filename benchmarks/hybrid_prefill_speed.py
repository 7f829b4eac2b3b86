"""Prefill speed of a hybrid (Gated DeltaNet, or Kimi Delta Attention) model over state pages against transformers'
eager forward over the same weights, and what state pages cost in bytes.

A random Qwen3.5 (``--family qwen3_5``: ``--hidden`` wide, 8 layers: 6 linear, 2 full attention; ``--family
kimi_linear``: Kimi Linear, 6 KDA layers and 2 MLA layers, 4 experts; ``--family qwen4_exp``: Qwen4-Exp, 6 linear
layers (two with n-gram embeddings) and 2 QSA attention layers, 4 experts, 3 residual streams) saved by transformers; one prompt of
``--tokens`` tokens prefilled at each block size (the delta rule runs one closed-form segment per block, so the
block size sets how many segments run), timed best of ``--repeats``, and the same prompt through transformers
(best of ``--repeats``) in the same run; the last-token logits are compared. It also prints the page layout's
bytes per token for transformers' default Qwen3-Next config (the 80B-A3B shape), Kimi Linear's (the 48B-A3B
shape) or Qwen4-Exp's (its default config plus what it lacks, assumed: QSA fields with a 128-wide indexer head,
Qwen3.5's partial RoPE, one PLE layer), at several block sizes.

Run: ``python benchmarks/hybrid_prefill_speed.py [--family qwen3_5|kimi_linear|qwen4_exp] [--tokens 2048] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=("qwen3_5", "kimi_linear", "qwen4_exp"), default="qwen3_5")
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
    h = args.hidden
    torch.manual_seed(0)
    if args.family == "kimi_linear":
        kinds = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2
        hf = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(
            vocab_size=2048, hidden_size=h, intermediate_size=3 * h, moe_intermediate_size=h, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
            v_head_dim=64, num_experts=4, num_experts_per_token=2, linear_num_heads=8, linear_head_dim=64,
            layer_types=kinds, pad_token_id=None, model_max_length=args.tokens + 16)).eval()
    elif args.family == "qwen4_exp":
        kinds = ["linear_attention", "linear_attention", "linear_attention", "indexed_attention"] * 2
        hf = transformers.Qwen4ExpForCausalLM(transformers.Qwen4ExpTextConfig(
            vocab_size=2048, hidden_size=h, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
            head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
            linear_value_head_dim=64, moe_intermediate_size=h, shared_expert_intermediate_size=h, num_experts=4,
            num_experts_per_tok=2, hc_count=3, hc_lowrank=64, ple_layer_ids=[1, 5], ple_embed_dim=h // 2,
            heads_per_ngram=2, ngram_vocab_size_base=4096, split_ngram_parts=4, indexer_n_heads=8, indexer_kv_heads=1,
            indexer_head_dim=64, indexer_budget=512, indexer_compress_ratio=16, eos_token_id=2, layer_types=kinds,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})).eval()
    else:
        hf = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
            vocab_size=2048, hidden_size=h, intermediate_size=3 * h, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
            linear_key_head_dim=64, linear_value_head_dim=64)).eval()
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    ours = load_model(LlamaModelConfig(path=d, attention_backend="torch", dtype="float32"), with_tokenizer=False)[0]
    ids = torch.randint(0, 2048, (args.tokens,)).tolist()

    def best(fn: Any) -> tuple[float, Any]:
        t, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            t = min(t, time.perf_counter() - t0)
        return t, out

    with torch.no_grad():
        t_hf, ref = best(lambda: hf(torch.tensor([ids])).logits[0, -1])
    runs = []
    for bt in args.blocks:
        spec = paged_kv_spec(ours.spec, bt)
        pool = KVPool(spec, num_blocks=args.tokens // bt + 2, block_tokens=bt)
        table = pool.allocate(-(-args.tokens // bt))
        t, out = best(lambda: ours(SeqBatch.build([ids], [0], [table], bt), pool.layers)[0])  # noqa: B023
        row = {"block_tokens": bt, "ours_s": round(t, 4), "transformers_s": round(t_hf, 4),
               "speed_vs_transformers": round(t_hf / t, 3), "max_logit_diff": float((out - ref).abs().max()),
               "bytes_per_token_layer": spec.bytes_per_token_layer}
        runs.append(row)
        print(f"{args.tokens} tokens, {bt}-token blocks: ours {t:.3f} s, transformers {t_hf:.3f} s -> "
              f"{t_hf / t:.2f}x; logits within {row['max_logit_diff']:.1e}")

    if args.family == "kimi_linear":
        big = transformers.KimiLinearConfig().to_dict()
        big.update(architectures=["KimiLinearForCausalLM"], dtype="bfloat16")
        label = "Kimi-Linear-48B-A3B"
    elif args.family == "qwen4_exp":
        big = transformers.Qwen4ExpTextConfig(
            indexer_n_heads=32, indexer_kv_heads=1, indexer_head_dim=128, indexer_budget=2048,
            indexer_compress_ratio=64, ple_layer_ids=[1], eos_token_id=248044,
            rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}).to_dict()
        big.update(architectures=["Qwen4ExpForCausalLM"], dtype="bfloat16")
        label = "Qwen4-Exp (default config)"
    else:
        big = transformers.Qwen3NextConfig().to_dict()
        big.update(architectures=["Qwen3NextForCausalLM"], dtype="bfloat16")
        label = "Qwen3-Next-80B-A3B"
    spec80 = load_spec(big)
    attn = (2 * spec80.latent_dim if args.family == "kimi_linear"  # type: ignore[union-attr]
            else 2 * spec80.n_kv_heads * spec80.head_dim * 2)  # (bf16: an MLA latent row, or K and V)
    sizes = []
    for bt in (16, 64, 256, 512, 1024):
        kv = spec80.paged_kv_spec(bt)  # type: ignore[attr-defined]
        sizes.append({"block_tokens": bt, "bytes_per_token_layer": kv.bytes_per_token_layer,
                      "bytes_per_token": kv.bytes_per_token, "vs_attention_rows": round(kv.bytes_per_token_layer / attn, 2)})
        print(f"{label} shape, bf16, {bt}-token blocks: {kv.bytes_per_token_layer} B per token and layer "
              f"({kv.bytes_per_token_layer / attn:.1f}x an attention row of {attn} B)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"command": "python benchmarks/hybrid_prefill_speed.py " + " ".join(argv or []),
                       "family": args.family, "tokens": args.tokens, "hidden": h, "threads": args.threads,
                       "runs": runs, "shape": label,
                       "state_bytes_per_layer": spec80.state_bytes,  # type: ignore[union-attr]
                       "page_rows": sizes}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
