"""CPU figure: one decode step of a small DeepSeek-V3 (MLA + MoE) in this project (absorbed MLA over the paged
latent pool, torch kernels) against transformers' eager decode (``attn_implementation="eager"``, DynamicCache
of the latent) on the same weights, same prompt, same greedy tokens. One run, one torch thread.

    python3 benchmarks/cpu_mla_decode.py [--steps 32] [--prompt 256] [--json OUT]

Prints ``ours ms/step``, ``transformers ms/step`` and the ratio (transformers / ours: > 1 means ours is faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    cfg = transformers.DeepseekV3Config(
        vocab_size=2048, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        first_k_dense_replace=1, max_position_embeddings=4096, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 1024, "mscale": 1.0, "mscale_all_dim": 1.0},
    )
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                attn_implementation="eager").eval()
        ours, _ = load_model(LlamaModelConfig(path=d, attention_backend="torch"), with_tokenizer=False)
    prompt = torch.randint(0, cfg.vocab_size, (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    total = a.prompt + a.steps + 1
    bt = 64
    pool = KVPool(ours.kv_spec, num_blocks=-(-total // bt), block_tokens=bt)
    table = pool.allocate(pool.num_blocks)
    tables = torch.tensor([table], dtype=torch.int32)

    # ours: prefill, then timed decode steps
    logits = ours(SeqBatch.build([prompt], [0], [table], bt), pool.layers)
    ids = [int(logits.argmax(-1)[0])]
    t0 = time.perf_counter()
    for i in range(a.steps):
        lg = ours.decode_step(torch.tensor([ids[-1]]), torch.tensor([a.prompt + i]), tables, pool.layers)
        ids.append(int(lg.argmax(-1)[0]))
    ours_s = (time.perf_counter() - t0) / a.steps

    # transformers eager: prefill, then timed decode steps over its cache
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), cache=cache, use_cache=True)
        ref = [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(a.steps):
            out = hf(torch.tensor([[ref[-1]]]), cache=cache, use_cache=True)
            ref.append(int(out.logits[0, -1].argmax()))
        hf_s = (time.perf_counter() - t0) / a.steps
    res = {
        "prompt_tokens": a.prompt, "decode_steps": a.steps, "threads": a.threads,
        "ours_ms_per_step": ours_s * 1e3, "transformers_eager_ms_per_step": hf_s * 1e3,
        "ratio_transformers_over_ours": hf_s / ours_s, "greedy_ids_equal": ids == ref,
    }
    print(f"decode step, prompt {a.prompt}, {a.steps} steps, {a.threads} thread(s): ours {ours_s * 1e3:.2f} ms, "
          f"transformers eager {hf_s * 1e3:.2f} ms, ratio transformers/ours {hf_s / ours_s:.2f}x, "
          f"greedy ids equal: {ids == ref}")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
