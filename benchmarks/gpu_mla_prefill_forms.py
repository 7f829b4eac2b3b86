"""MLA prefill, model level: the absorbed form (the latent kernels, as decode) vs the decompressed form (keys and
values expanded by ``kv_b_proj``, then SDPA) vs ``auto``, on a DeepSeek-V3-shaped attention (128 heads, latent
512 + 64, nope 128, v 128, q-LoRA 1536) with small dense MLPs, so attention dominates as in the real model's
prefill. Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 benchmarks/gpu_mla_prefill_forms.py [--json OUT] [--layers 2]

Cases (bf16 latent and FP8 latent rows, 64-token pages): a whole 8K prompt; 4 prompts of 4K; one 1K append over a
32K cached prefix (an agent's turn); 8 appends of 512 over 8K. Each time is the median of ``--iters`` forwards
(CUDA-synchronized), and each form's logits are compared with a float32 reference (the same weights and cached rows,
absorbed form): ``*_rel_err`` = max |diff| / max |logit| (the weights are widened so attention moves the logits).
``--smoke``: tiny shapes on CPU, checks the script, measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_mla_prefill_forms: no CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    from dualpath.model.kv_pool import KVPool
    from dualpath.model.llama import SeqBatch
    from dualpath.model.loader import build_model
    from dualpath.model.spec import DeepseekV3Spec

    dev = "cpu" if a.smoke else "cuda"
    scale = 16 if a.smoke else 1
    bt = 64 // (4 if a.smoke else 1)
    cases = [("prompt 8K", [(8192, 0)]), ("4 x prompt 4K", [(4096, 0)] * 4), ("append 1K over 32K", [(1024, 32768)]),
             ("8 x append 512 over 8K", [(512, 8192)] * 8)]
    if a.smoke:
        cases = [(name, [(max(2, m // 256), s // 256) for m, s in seqs]) for name, seqs in cases]
    out: dict[str, object] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)",
                              "heads": a.heads // scale, "layers": a.layers, "cases": []}
    for fmt in ("auto", "fp8"):
        spec = DeepseekV3Spec(vocab_size=4096, hidden_size=4096 // scale, intermediate_size=2048 // scale,
                              moe_intermediate_size=256, n_layers=a.layers, n_heads=a.heads // scale,
                              kv_lora_rank=128 if a.smoke else 512, qk_nope_head_dim=128 // scale,
                              qk_rope_head_dim=64 // scale, v_head_dim=128 // scale,
                              q_lora_rank=1536 // scale, first_k_dense_replace=a.layers, max_position=65536,
                              dtype="bfloat16" if dev == "cuda" else "float32", kv_format=fmt)
        model = build_model(spec, None, seed=0, device=dev)
        with torch.no_grad():  # widened (std 0.02 -> 0.08) so attention moves the logits and the forms' diff means something
            for pname, param in model.named_parameters():
                if param.dim() == 2 and "embed" not in pname:
                    param.mul_(4.0)
        # the reference: the same weights in float32 (latent rows in float32; FP8 rows stay FP8), absorbed form
        ref_spec = dataclasses.replace(spec, dtype="float32")
        ref_model = build_model(ref_spec, {k: v.float().cpu() for k, v in model.state_dict().items()}, device=dev)
        ref_model.prefill_form = "absorbed"
        for name, seqs in cases:
            blocks = sum(-(-(m + s) // bt) for m, s in seqs)
            pool = KVPool(model.kv_spec, num_blocks=blocks + 1, block_tokens=bt, device=dev)
            tables, first = [], 0
            for m, s in seqs:
                nb = -(-(m + s) // bt)
                tables.append(list(range(first, first + nb)))
                first += nb
            g = torch.Generator().manual_seed(1)
            # the cached prefixes: written once by a decompressed-form prefill of random tokens
            model.prefill_form = "decompressed"
            for (_m, s), table in zip(seqs, tables, strict=True):
                if s:
                    model(SeqBatch.build([torch.randint(0, 4096, (s,), generator=g).tolist()], [0], [table], bt,
                                         device=dev), pool.layers)
            new = [torch.randint(0, 4096, (m,), generator=g).tolist() for m, _ in seqs]
            batch = SeqBatch.build(new, [s for _, s in seqs], tables, bt, device=dev)
            # the float32 reference over the same cached prefix (its rows re-read from the bf16 pool in float32)
            ref_pool = KVPool(ref_model.kv_spec, num_blocks=blocks + 1, block_tokens=bt, device=dev)
            for dst, src in zip(ref_pool.layers, pool.layers, strict=True):
                dst.copy_(src if src.dtype == torch.uint8 else src.float())
            ref_logits = ref_model(batch, ref_pool.layers).float()
            del ref_pool
            row: dict[str, object] = {"case": name, "kv_format": fmt, "new_tokens": sum(m for m, _ in seqs),
                                      "cached_tokens": sum(s for _, s in seqs)}
            logits = {}
            for form in ("absorbed", "decompressed", "auto"):
                model.prefill_form = form
                times = []
                for i in range(a.iters + 1):
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    lo = model(batch, pool.layers)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times.append(time.perf_counter() - t0)
                logits[form] = lo.float()
                row[f"{form}_ms"] = round(1e3 * statistics.median(times), 3)
            top = float(ref_logits.abs().max())
            for form in ("absorbed", "decompressed", "auto"):  # each form's error against the float32 reference
                row[f"{form}_rel_err"] = float(f"{float((logits[form] - ref_logits).abs().max()) / top:.3g}")
            row["speedup_decompressed"] = round(row["absorbed_ms"] / row["decompressed_ms"], 3)  # type: ignore[operator]
            row["speedup_auto"] = round(row["absorbed_ms"] / row["auto_ms"], 3)  # type: ignore[operator]
            print(json.dumps(row), flush=True)
            out["cases"].append(row)  # type: ignore[attr-defined]
            del pool
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
