"""The CPU decode path: batched paged decode attention vs the per-sequence reference, and a real model's decode step
against transformers' in the same run.

    python benchmarks/cpu_decode_attention.py [--json OUT]

1. Attention alone, one layer of SmolLM2-135M's shape (3 KV heads, 9 query heads, head_dim 64, bf16 pool of 4,096
   16-token blocks, each sequence's blocks scattered over the pool as a running engine leaves them): the reference
   loop (``dualpath.kernels.reference``) vs ``dualpath.kernels.batched`` (what the torch backend runs), per batch
   size and context.
2. The embedded SmolLM2-135M-Instruct's decode step (``LlamaModel.decode_step``, 30 layers, the same pool) with the
   reference and with the batched attention, and transformers' own step (``LlamaForCausalLM`` with its KV cache)
   at the same batch and context: medians of 15 steps after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dualpath.kernels import batched
from dualpath.kernels import reference as ref

FAST = batched.paged_decode_attention


def _paired_us(fns: dict[str, Callable[[], Any]], n: int = 30, warm: int = 3) -> dict[str, float]:
    """Median microseconds of each function, called in turn (A, B, C, A, B, C...) so that load from other
    processes on a shared machine falls on every arm alike."""
    for _ in range(warm):
        for fn in fns.values():
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in ts.items()}


def _tables(b: int, n: int, bt: int, pool: int, seed: int) -> torch.Tensor:
    need = -(-n // bt)
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(pool - 1, generator=g)[: b * need] + 1).to(torch.int32).reshape(b, need)


def attention_rows(pool: int = 4096, bt: int = 16) -> list[dict[str, Any]]:
    kv = torch.randn((pool, bt, 2, 3, 64)).bfloat16()
    rows = []
    for b, n in ((1, 512), (4, 512), (16, 512), (4, 4096), (32, 1024)):
        tables = _tables(b, n, bt, pool, b * n)
        lens = torch.full((b,), n, dtype=torch.int32)
        q = torch.randn((b, 9, 64))
        args = (q, kv, tables, lens, 0.125)
        t = _paired_us({"r": lambda a=args: ref.paged_decode_attention(*a),
                        "f": lambda a=args: batched.paged_decode_attention(*a)}, n=60)
        r, f = t["r"], t["f"]
        err = (ref.paged_decode_attention(q, kv, tables, lens, 0.125)
               - batched.paged_decode_attention(q, kv, tables, lens, 0.125)).abs().max().item()
        rows.append({"batch": b, "context": n, "reference_us": round(r), "batched_us": round(f),
                     "speedup": round(r / f, 2), "max_abs_diff": err})
        print(f"attention B={b:3d} N={n:5d}: reference {r:8.0f} us  batched {f:7.0f} us  x{r / f:5.2f}  "
              f"(max |diff| {err:.1e})", flush=True)
    return rows


def model_rows(context: int = 512, pool: int = 4096) -> list[dict[str, Any]]:
    import transformers

    from dualpath.kernels import reference
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_model

    path = embedded_model_path()
    model, _tok = load_model(LlamaModelConfig(path=str(path)), "cpu")
    spec = model.spec
    bt = 16
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows = []
    for b in (1, 4, 16):
        kv = [torch.randn((pool, bt, 2, spec.n_kv_heads, spec.head_dim)).bfloat16() for _ in range(spec.n_layers)]
        tables = _tables(b, context + 1, bt, pool, b)
        ids = torch.randint(0, 1000, (b,))
        pos = torch.full((b,), context, dtype=torch.int64)
        def step(impl: Callable[..., torch.Tensor], ids: torch.Tensor = ids, pos: torch.Tensor = pos,
                 tables: torch.Tensor = tables, kv: list[torch.Tensor] = kv) -> None:
            batched.paged_decode_attention = impl  # what the torch backend dispatches to
            try:
                model.decode_step(ids, pos, tables, kv)
            finally:
                batched.paged_decode_attention = FAST

        with torch.inference_mode():
            out = hf(torch.randint(0, 1000, (b, context)), use_cache=True)
            cache = out.past_key_values
            x = torch.randint(0, 1000, (b, 1))

            def hf_step(cache: Any = cache, x: torch.Tensor = x) -> None:
                hf(x, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # the same context every step

            us = _paired_us({"reference": lambda: step(reference.paged_decode_attention),
                             "batched": lambda: step(FAST), "transformers": hf_step}, n=15)
        times = {k: v / 1e3 for k, v in us.items()}
        rows.append({"batch": b, "context": context, **{f"{k}_ms": round(v, 1) for k, v in times.items()},
                     "batched_vs_reference": round(times["reference"] / times["batched"], 2),
                     "batched_vs_transformers": round(times["transformers"] / times["batched"], 2)})
        print(f"decode step B={b:3d} ctx={context}: reference {times['reference']:6.1f} ms  batched "
              f"{times['batched']:6.1f} ms  transformers {times['transformers']:6.1f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--skip-model", action="store_true", help="attention only")
    args = ap.parse_args()
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "attention": attention_rows()}
    if not args.skip_model:
        out["decode_step"] = model_rows()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
