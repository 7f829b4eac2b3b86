"""The two loading paths, measured as ratios within one run (these machines are noisy: medians of repeats).

(a) Layer-wise streaming overhead: the prefill time (PE forward start -> last layer done) of a request whose hit
    KV is already local (PE path: H2D from the PE buffer) versus the same request with the hit KV streamed layer
    by layer from the decode engine over an unlimited loopback link (DE path). Target: DE/PE <= 1.10.
    Measured with a real (random-init) Llama on CPU and with the synthetic model.
(b) I/O-bound paths: storage NICs at ``--snic-gbps`` (default 0.1 GB/s = 100 MB/s), synthetic model. One
    request alone on the DE path vs on the PE path (target: equal within 10%); then one PE-path and one
    DE-path request at once (different nodes' SNICs: aggregate read bandwidth ~ 2 links) vs two PE-path
    requests at once (one SNIC).

    python benchmarks/bench_paths.py [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import anyio
import torch

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.engine.model_api import LlamaAdapter
from dualpath.model.config import SyntheticModelConfig


def _cfg(**cluster: Any) -> DualPathConfig:
    cfg = DualPathConfig()
    c = cfg.cluster
    c.devices = "auto"
    c.snic_gbps = None
    c.cnic_gbps = None
    c.block_tokens = 64
    c.host_buffer_bytes = 1 << 30
    c.kv_pool_tokens = 65536
    c.prefill_max_batch_tokens = 32768
    c.deadline_s = 60.0
    for k, v in cluster.items():
        setattr(c, k, v)
    return cfg


LLAMA_SIZES = {
    # CPU-sized (default) and a GPU-sized one (~250M parameters, bf16)
    "small": {"vocab_size": 1000, "hidden_size": 256, "intermediate_size": 768, "n_layers": 6, "n_heads": 8, "n_kv_heads": 4,
                  "head_dim": 32, "dtype": "float32"},
    "medium": {"vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 2816, "n_layers": 16, "n_heads": 16,
                   "n_kv_heads": 8, "head_dim": 64, "dtype": "bfloat16"},
}


def _llama(size: str, backend: str) -> Any:
    import torch

    from dualpath.model.loader import build_model
    from dualpath.model.spec import ModelSpec

    if not torch.cuda.is_available():
        torch.set_num_threads(2)
    spec = ModelSpec(architecture="llama", max_position=32768, **LLAMA_SIZES[size])  # type: ignore[arg-type]
    return build_model(spec, None, seed=0, backend=backend)


async def streaming_overhead(model_kind: str, repeats: int, prompt: int, hit_frac: float, size: str = "small",
                             backend: str = "auto") -> dict[str, Any]:
    cfg = _cfg()
    if model_kind == "synthetic":
        cfg.model = SyntheticModelConfig(n_layers=16, device_tflops=5.0, linear_flops_per_token=4e9,
                                         decode_step_s=0.0, max_context=65536)
        source: Any = None
    else:
        llama = _llama(size, backend)

        def source(device: Any) -> LlamaAdapter:
            return LlamaAdapter(llama.to(device), cfg.cluster.block_tokens)

    bt = cfg.cluster.block_tokens
    context = [1 + (i * 7919) % 997 for i in range(int(prompt * hit_frac))]
    ids = context + [7] * (prompt - len(context))
    # on a GPU also the PE path without its layer-ahead pinned staging (the engine's H2D before it), as a baseline
    paths = ("pe", "de", "pe_direct") if torch.cuda.is_available() and model_kind != "synthetic" else ("pe", "de")
    out: dict[str, list[float]] = {p: [] for p in paths}
    tokens: dict[str, set[tuple[int, ...]]] = {p: set() for p in paths}
    async with Cluster(cfg, model=source) as c:
        await c.run_turn("warm", context, 1, path="recompute")  # store the hit blocks
        c.config.cluster.persist = False  # keep the hit the same in every repeat
        hit = c.lookup(ids)
        for path in ("pe", "de"):  # warm-up (first-touch page faults, allocator)
            await c.run_turn("s", ids, 1, path=path)
        for i in range(repeats):
            for path in (paths if i % 2 == 0 else paths[::-1]):
                c.pes[0].stage_h2d = False if path == "pe_direct" else None
                r = await c.run_turn("s", ids, 1, path="pe" if path == "pe_direct" else path)
                assert r.hit_tokens == hit
                out[path].append(r.timings.t_prefill_done - r.timings.t_prefill_start)
                tokens[path].add(tuple(r.token_ids))
        c.pes[0].stage_h2d = None
    pe, de = statistics.median(out["pe"]), statistics.median(out["de"])
    extra: dict[str, Any] = {}
    if "pe_direct" in out:  # the local path's staging: the PE prefill without it / with it
        extra = {"prefill_s_local_unstaged": statistics.median(out["pe_direct"]),
                 "staging_speedup": statistics.median(out["pe_direct"]) / pe}
    return {"name": f"streaming_overhead_{model_kind}", "device": str(c.devices[0]), "prompt_tokens": prompt, "hit_tokens": hit,
            "block_tokens": bt, "prefill_s_local": pe, "prefill_s_streamed": de, "ratio": de / pe,
            "target": "<= 1.10", "same_tokens": len(set().union(*tokens.values())) == 1, **extra, "samples": out}


async def io_bound(repeats: int, snic_gbps: float, hit_tokens: int) -> dict[str, Any]:
    cfg = _cfg(snic_gbps=snic_gbps)
    cfg.model = SyntheticModelConfig(n_layers=8, device_tflops=1e4, decode_step_s=0.0, max_context=65536)
    bt = cfg.cluster.block_tokens
    ctx_a = list(range(1, hit_tokens + 1))
    ctx_b = [1 + (i * 7919) % 31991 for i in range(hit_tokens)]
    tail = [5] * (bt // 2)
    times: dict[str, list[float]] = {"pe": [], "de": [], "pe+de": [], "pe+pe": []}
    read_bw: dict[str, list[float]] = {"pe+de": [], "pe+pe": []}
    async with Cluster(cfg) as c:
        for ctx in (ctx_a, ctx_b):
            await c.run_turn("warm", ctx, 1, path="recompute")
        c.config.cluster.persist = False  # keep the hit the same in every repeat
        read_bytes = c.lookup(ctx_a + tail) // bt * c.layout.full_block_bytes

        async def one(ctx: list[int], path: str, out: list[Any] | None = None) -> float:
            r = await c.run_turn("s", ctx + tail, 1, path=path)
            if out is not None:
                out.append(r)
            return r.timings.t_done - r.timings.t_submit

        async def pair(pa: str, pb: str) -> tuple[float, float]:
            """(wall time of both turns, aggregate read bandwidth over the read phase in bytes/s)."""
            res: list[Any] = []
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, ctx_a, pa, res)
                tg.start_soon(one, ctx_b, pb, res)
            wall = time.perf_counter() - t0
            span = max(r.timings.t_read_done for r in res) - min(r.timings.t_submit for r in res)
            return wall, 2 * read_bytes / span

        await one(ctx_a, "pe")  # warm-up
        await one(ctx_a, "de")
        for _ in range(repeats):
            times["pe"].append(await one(ctx_a, "pe"))
            times["de"].append(await one(ctx_a, "de"))
            for key, (pa, pb) in (("pe+de", ("pe", "de")), ("pe+pe", ("pe", "pe"))):
                wall, bw = await pair(pa, pb)
                times[key].append(wall)
                read_bw[key].append(bw)
    med = {k: statistics.median(v) for k, v in times.items()}
    link_bps = snic_gbps * 1e9
    return {
        "name": "io_bound_paths", "snic_gbps": snic_gbps, "hit_tokens": hit_tokens, "read_bytes_per_request": read_bytes,
        "seconds": med, "link_time_s": read_bytes / link_bps,
        "ratio_de_over_pe": med["de"] / med["pe"],
        "aggregate_read_gbps_pe+de": statistics.median(read_bw["pe+de"]) / 1e9,
        "aggregate_over_one_link_pe+de": statistics.median(read_bw["pe+de"]) / link_bps,
        "aggregate_over_one_link_pe+pe": statistics.median(read_bw["pe+pe"]) / link_bps,
        "ratio_parallel_over_single": med["pe+de"] / med["pe"],
        "target": "de/pe within 10%; pe+de aggregate ~2 links", "samples": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--snic-gbps", type=float, default=0.1)
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens of the streaming-overhead request")
    ap.add_argument("--io-hit", type=int, default=16384, help="hit tokens of each I/O-bound request")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true", help="no synthetic-model streaming case")
    ap.add_argument("--skip-io", action="store_true", help="no I/O-bound case (b)")
    ap.add_argument("--llama-size", choices=sorted(LLAMA_SIZES), default="small")
    ap.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto", help="attention kernels")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)

    async def run_all() -> list[dict[str, Any]]:
        runs = []
        kinds = ([] if args.skip_synthetic else ["synthetic"]) + ([] if args.skip_llama else ["llama"])
        for kind in kinds:
            r = await streaming_overhead(kind, args.repeats, args.prompt, 0.75, args.llama_size, args.backend)
            runs.append(r)
            print(f"(a) layer-wise streaming overhead [{kind}, {r['device']}]: prompt {r['prompt_tokens']}, hit {r['hit_tokens']}: "
                  f"prefill local {r['prefill_s_local'] * 1e3:.1f} ms, streamed {r['prefill_s_streamed'] * 1e3:.1f} ms"
                  f" -> ratio {r['ratio']:.3f} (target <= 1.10); same tokens on every path: {r['same_tokens']}"
                  + (f"; local without its pinned staging {r['prefill_s_local_unstaged'] * 1e3:.1f} ms "
                     f"({r['staging_speedup']:.2f}x)" if "staging_speedup" in r else ""))
        if args.skip_io:
            return runs
        r = await io_bound(args.repeats, args.snic_gbps, args.io_hit)
        runs.append(r)
        s = r["seconds"]
        print(f"(b) I/O-bound, SNIC {args.snic_gbps} GB/s, {r['read_bytes_per_request'] / 1e6:.1f} MB read per request "
              f"(link time {r['link_time_s']:.3f} s): PE path {s['pe']:.3f} s, DE path {s['de']:.3f} s -> "
              f"DE/PE {r['ratio_de_over_pe']:.3f} (target 0.90-1.10)")
        print(f"    PE+DE at once: {s['pe+de']:.3f} s end to end = {r['ratio_parallel_over_single']:.2f} x one alone; "
              f"aggregate read {r['aggregate_read_gbps_pe+de']:.3f} GB/s = {r['aggregate_over_one_link_pe+de']:.2f} x "
              f"one link (target ~2); PE+PE at once: {s['pe+pe']:.3f} s, read "
              f"{r['aggregate_over_one_link_pe+pe']:.2f} x one link")
        return runs

    runs = anyio.run(run_all)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
