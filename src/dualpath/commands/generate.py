"""``dualpath generate``: greedy generation with this project's model and kernels, to check a checkpoint.

The prompt is prefilled in one chunk into a paged KV pool, then decoded one token per step through the paged
decode kernel (Llama/Mistral/Qwen2/Qwen3 and their MoE kin: K/V pages; DeepSeek-V2/V3: latent pages and absorbed MLA). ``--json OUT`` writes
``{"runs": [{"generated_ids": [...], "kv_bytes_per_token_layer": ..., ...}]}``; for an MLA model it also
prints the latent KV bytes per token and layer against the same attention's MHA-equivalent K/V bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="safetensors directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="kernels: auto = triton on CUDA, torch on CPU; triton on CPU uses the interpreter")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute/KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-format", choices=("auto", "fp8"), default="auto",
                        help="KV storage: auto = the compute dtype; fp8 = FlashMLA's FP8 latent rows (DeepSeek-V2/V3)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--pool-tokens", type=int, default=None,
                        help="KV pool capacity in tokens (default: the model's context limit)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="the longest context served (default: max_position_embeddings; a LongRoPE model, "
                             "Phi-3.5 / Phi-4-mini, uses its long RoPE factors only above "
                             "original_max_position_embeddings, its default cap)")
    parser.add_argument("--random-init", action="store_true", help="seeded random weights from the config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", help="write the run as JSON here")


def parse_ids(text: str) -> list[int]:
    from dualpath.errors import ModelError

    ids = []
    for i, item in enumerate(text.replace(" ", "").split(",")):
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise ModelError(f"--prompt-ids: item {i} ({item!r}) is not an integer") from None
    if not ids:
        raise ModelError("--prompt-ids is empty")
    return ids


def run(args: argparse.Namespace) -> int:
    import torch

    from dualpath.errors import ModelError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "triton" and not device.startswith("cuda"):
        os.environ["TRITON_INTERPRET"] = "1"  # before any triton kernel module is imported
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.kv_pool import KVPool
    from dualpath.model.llama import SeqBatch
    from dualpath.model.loader import load_model
    from dualpath.model.spec_common import context_note

    if args.max_new_tokens < 1:
        raise ModelError("--max-new-tokens must be >= 1")
    dtype: Any = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.max_context is not None and args.max_context < 1:
        raise ModelError("--max-context must be >= 1")
    cfg = LlamaModelConfig(path=args.model, dtype=dtype, random_init=args.random_init, seed=args.seed,
                           attention_backend=args.backend, kv_format=args.kv_format, max_context=args.max_context)
    t0 = time.perf_counter()
    model, tok = load_model(cfg, device=device, with_tokenizer=args.prompt is not None or not args.random_init)
    load_s = time.perf_counter() - t0
    spec = model.spec
    if args.prompt is not None:
        if tok is None:
            raise ModelError(f"model {args.model or 'embedded'} has no tokenizer: use --prompt-ids")
        if args.chat:
            from dualpath.model.chat_format import template_messages

            ids = tok.apply_chat_template(template_messages(tok, [{"role": "user", "content": args.prompt}]),
                                          add_generation_prompt=True, tokenize=True)
            if not isinstance(ids, list):
                ids = ids["input_ids"]
        else:
            ids = tok(args.prompt)["input_ids"]
        ids = [int(i) for i in ids]
    else:
        ids = parse_ids(args.prompt_ids)
    bad = [i for i in ids if not 0 <= i < spec.vocab_size]
    if bad:
        raise ModelError(f"prompt token id {bad[0]} is outside the vocabulary [0, {spec.vocab_size})")

    bt = args.block_tokens
    pool_tokens = args.pool_tokens or spec.context_limit
    total = len(ids) + args.max_new_tokens
    if spec.context_limit < spec.max_position and total > spec.context_limit:  # a cap below the checkpoint's own
        raise ModelError(
            f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens = {total} tokens exceeds the model's "
            f"context of {spec.context_limit} tokens ({context_note(spec)})"
        )
    if total > pool_tokens:
        raise ModelError(
            f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens = {total} tokens exceeds the KV pool of "
            f"{pool_tokens} tokens (--pool-tokens, default the model's context, {spec.context_limit})"
        )
    from dualpath.engine.model_api import paged_kv_spec

    kv_spec = paged_kv_spec(spec, bt)
    pool = KVPool(kv_spec, num_blocks=-(-total // bt), block_tokens=bt, device=device)
    table = pool.allocate(pool.blocks_for_tokens(total))
    # the end-of-sequence ids the HTTP front stops at too: config.json's, generation_config.json's (chat models'
    # end-of-turn tokens), the tokenizer's
    from dualpath.model.embedded import checkpoint_path
    from dualpath.model.generation_config import read_generation_defaults, stop_ids_of

    eos = spec.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not args.random_init:
        eos_ids |= set(stop_ids_of(tok, read_generation_defaults(checkpoint_path(args.model)).eos_ids))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    logits = model(SeqBatch.build([ids], [0], [table], bt, device=device), pool.layers)
    out = [int(logits.argmax(-1)[0])]
    sync()
    prefill_s = time.perf_counter() - t0
    tables = torch.tensor([table], dtype=torch.int32, device=device)
    t0 = time.perf_counter()
    pos = len(ids)
    while len(out) < args.max_new_tokens and (args.ignore_eos or out[-1] not in eos_ids):
        logits = model.decode_step(torch.tensor([out[-1]], device=device), torch.tensor([pos], device=device),
                                   tables, pool.layers)
        out.append(int(logits.argmax(-1)[0]))
        pos += 1
    sync()
    decode_s = time.perf_counter() - t0
    text = tok.decode(out) if tok is not None else None
    if text is not None:
        print(text)
    print(f"generated ids: {','.join(map(str, out))}")
    steps = max(len(out) - 1, 0)
    print(f"prompt {len(ids)} tokens, prefill {prefill_s * 1e3:.1f} ms, {steps} decode steps "
          f"({steps / decode_s if decode_s > 0 and steps else 0.0:.1f} tok/s), device {device}, "
          f"backend {args.backend}, dtype {dtype}", file=sys.stderr)
    kv_bytes = kv_spec.bytes_per_token_layer
    mha_bytes = (spec.mha_equivalent_bytes_per_token_layer() if hasattr(spec, "mha_equivalent_bytes_per_token_layer")
                 else kv_bytes)
    if kv_spec.attention == "mla":
        print(f"KV per token per layer: {kv_bytes} B latent ({kv_spec.latent_format or kv_spec.dtype}) vs "
              f"{mha_bytes} B MHA-equivalent K/V in {dtype} ({mha_bytes / kv_bytes:.1f}x smaller)", file=sys.stderr)
    if args.json_out:
        result: dict[str, Any] = {"runs": [{
            "model": args.model or "embedded:SmolLM2-135M-Instruct",
            "fingerprint": spec.fingerprint(),
            "device": device, "backend": args.backend, "dtype": dtype,
            "prompt_ids": ids, "generated_ids": out, "text": text,
            "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens_per_s": steps / decode_s if decode_s > 0 and steps else None,
            "architecture": spec.architecture, "kv_attention": kv_spec.attention,
            "kv_format": kv_spec.latent_format or kv_spec.dtype,
            "kv_bytes_per_token_layer": kv_bytes, "mha_equivalent_bytes_per_token_layer": mha_bytes,
            "kv_bytes_ratio_vs_mha": kv_bytes / mha_bytes,
        }]}
        with open(args.json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
