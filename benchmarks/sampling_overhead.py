"""What the decode engine's extra sampling work costs per token with the embedded real model (SmolLM2-135M, the
in-process cluster): token log-probabilities (top 5), penalties with a logit bias, and a JSON-schema grammar
(llguidance token masks), each against plain greedy decoding of the same prompt, alternated ``--reps`` times;
and the sampler alone per pick (``sampler_us_per_pick``), which is what matters where a decode step is short.

The grammar run and its baseline decode the same number of tokens: the baseline is forced to the grammar run's
length (``ignore_eos``, ``max_tokens`` = its token count), so the ratio compares time per decoded token. Prints
one JSON line: ``ms_per_token`` (medians) and ``ratio`` of each variant ÷ plain.

    python benchmarks/sampling_overhead.py [--gen 48] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

import anyio

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"},
                                           "notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "city", "notes"]}


async def _run(backend: Any, ids: list[int], gen: int, sampling: Any) -> tuple[int, float]:
    from dualpath.http.backend import GenRequest

    job = backend.submit(GenRequest(ids, gen, sampling))
    n, t_first = 0, 0.0
    while True:
        kind, _ = await job.queue.get()
        if kind != "token":
            break
        n += 1
        if n == 1:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    return n, (t_end - t_first) / max(1, n - 1) * 1000.0  # decode time per token after the first


async def main_async(gen: int, reps: int) -> dict[str, Any]:
    from dualpath.config import load_config
    from dualpath.engine.grammar import json_schema_grammar
    from dualpath.engine.sampling import SamplingParams
    from dualpath.http.backend import InProcessBackend, inprocess_overrides

    backend = InProcessBackend(load_config(None, overrides=inprocess_overrides()))
    await backend.start()
    try:
        tok = backend.tokenizer
        base = SamplingParams(stop_ids=())
        variants = {
            "plain": base,
            "logprobs_top5": replace(base, logprobs=5),
            "penalties_bias": replace(base, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2,
                                      logit_bias=((13, -5.0), (42, 2.0))),
            "json_grammar": replace(base, grammar=json_schema_grammar(SCHEMA)),
        }
        out: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(reps):
            ids = tok.encode(f"Record {rep}: describe a person as JSON with name, city and notes.")
            for name, sp in variants.items():
                n, ms = await _run(backend, ids, gen, sp)
                if name == "json_grammar" and n < gen:  # the grammar ended it: compare the same length
                    _, ms_plain = await _run(backend, ids, n, base)
                    out.setdefault("plain_same_length", []).append(ms_plain)
                out[name].append(ms)
        from dualpath.engine.grammar import tokenizer_source

        micro = sampler_us(variants, tokenizer_source(backend.config), int(backend.vocab_size))
        med = {k: statistics.median(v) for k, v in out.items() if v}
        ref_grammar = med.get("plain_same_length", med["plain"])
        ratios = {k: med[k] / (ref_grammar if k == "json_grammar" else med["plain"])
                  for k in variants if k != "plain"}
        return {"gen": gen, "reps": reps, "ms_per_token": med, "ratio": ratios, "sampler_us_per_pick": micro}
    finally:
        await backend.close()


def sampler_us(variants: dict[str, Any], tokenizer_source: str | None, vocab: int, steps: int = 200) -> dict[str, float]:
    """Microseconds per pick of the sampler alone (random logits of the model's vocabulary), per variant: what the
    work costs where a decode step is short (a GPU's ~10 ms) rather than this CPU's ~100 ms."""
    import torch

    from dualpath.engine.grammar import Constraint
    from dualpath.engine.sampling import Sampler

    out = {}
    for name, sp in variants.items():
        g = torch.Generator().manual_seed(0)
        rows = [torch.randn(vocab, generator=g) for _ in range(steps)]
        constraint = Constraint(sp.grammar, tokenizer_source) if sp.grammar else None
        sampler = Sampler(sp, constraint, prompt=list(range(64)))
        t0 = time.perf_counter()
        n = 0
        for row in rows:
            sampler(row, n)
            sampler.take()
            n += 1
            if sampler.done:
                break
        out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gen", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(anyio.run(main_async, a.gen, a.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
