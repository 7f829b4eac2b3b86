"""``dualpath bench kernels``: the Triton paged-attention and KV-copy kernels against raw baselines measured in
the same run (GPU).

* paged decode (default batch 64, 8K context, bf16, Hq 32 / Hkv 8, head_dim 128, 64-token blocks): GB/s of KV
  read, % of the GPU's peak memory bandwidth, and the ratio to torch SDPA over the same K/V stored contiguously;
  a device-to-device ``copy_`` of the same bytes gives the achievable bandwidth on this card;
* paged prefill with a cached prefix: TFLOP/s and the ratio to SDPA (flash backend, bottom-right causal mask)
  over the same K/V stored contiguously (KV heads expanded for SDPA, untimed);
* Layer Block gather/scatter: GB/s against torch indexing.

On a machine without CUDA it says so and runs a tiny smoke case with the torch reference (exit 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

# Peak HBM bandwidth (bytes/s) by device-name fragment (vendor datasheets).
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
           ("A100 80GB", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--prefill-cached", type=int, default=4096)
    parser.add_argument("--prefill-new", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)


def _peak_bw(torch: Any) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name()
    for frag, bw in PEAK_BW:
        if frag in name:
            return bw, f"table:{frag}"
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "memory_clock_rate", None)
    width = getattr(props, "memory_bus_width", None)
    if clock and width:
        return 2.0 * clock * 1e3 * width / 8, "device properties"
    return None, "unknown"


def _time(torch: Any, fn: Any, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` timed runs (CUDA events), after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _pool_and_tables(torch: Any, b: int, ctx: int, bt: int, hkv: int, d: int, dtype: Any, dev: str) -> Any:
    nblk = -(-ctx // bt)
    nb = b * nblk
    kv = torch.randn((nb, bt, 2, hkv, d), dtype=dtype, device=dev)
    perm = torch.randperm(nb, device=dev).to(torch.int32)
    tables = perm.view(b, nblk).contiguous()
    return kv, tables


def _contiguous_kv(kv: Any, tables: Any, ctx: int) -> tuple[Any, Any]:
    """K, V as ``[B, Hkv, ctx, D]`` contiguous (the same values the paged kernel reads)."""
    pages = kv[tables.long()]                          # [B, nblk, bt, 2, H, D]
    rows = pages.flatten(1, 2)[:, :ctx]                # [B, ctx, 2, H, D]
    return rows[:, :, 0].transpose(1, 2).contiguous(), rows[:, :, 1].transpose(1, 2).contiguous()


def bench_decode(torch: Any, a: argparse.Namespace, dev: str) -> dict[str, Any]:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from dualpath.kernels import paged_attention as pa

    b, ctx, hq, hkv, d, bt = a.batch, a.context, a.q_heads, a.kv_heads, a.head_dim, a.block_tokens
    dtype = torch.bfloat16
    kv, tables = _pool_and_tables(torch, b, ctx, bt, hkv, d, dtype, dev)
    q = torch.randn((b, hq, d), dtype=dtype, device=dev)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    kv_bytes = b * ctx * 2 * hkv * d * kv.element_size()
    t_ours = _time(torch, lambda: pa.paged_decode_attention(q, kv, tables, lens, scale), a.iters)
    out = pa.paged_decode_attention(q, kv, tables, lens, scale)
    k, v = _contiguous_kv(kv, tables, ctx)
    q4 = q[:, :, None, :]
    gqa: dict[str, Any] = {"enable_gqa": True} if hq != hkv else {}
    try:
        ref = sdpa(q4, k, v, scale=scale, **gqa)
        t_sdpa = _time(torch, lambda: sdpa(q4, k, v, scale=scale, **gqa), a.iters)
        sdpa_note = "enable_gqa"
    except (TypeError, RuntimeError):
        ke, ve = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        ref = sdpa(q4, ke, ve, scale=scale)
        t_sdpa = _time(torch, lambda: sdpa(q4, ke, ve, scale=scale), a.iters)
        sdpa_note = "expanded kv heads"
    err = float((out.float() - ref[:, :, 0].float()).abs().max())
    flat = kv.view(-1)[: kv_bytes // kv.element_size()]
    dst = torch.empty_like(flat)
    t_copy = _time(torch, lambda: dst.copy_(flat), a.iters)
    peak, peak_src = _peak_bw(torch)
    bw = kv_bytes / t_ours
    return {
        "name": "paged_decode", "backend": "triton", "dtype": "bfloat16",
        "shape": {"batch": b, "context": ctx, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "block_tokens": bt},
        "kv_bytes": kv_bytes, "time_s": t_ours, "gbps": bw / 1e9,
        "peak_gbps": peak / 1e9 if peak else None, "peak_source": peak_src,
        "pct_of_peak": 100 * bw / peak if peak else None,
        "copy_gbps": 2 * kv_bytes / t_copy / 1e9, "pct_of_copy": 100 * bw / (2 * kv_bytes / t_copy),
        "sdpa_time_s": t_sdpa, "sdpa_gbps": kv_bytes / t_sdpa / 1e9, "sdpa_note": sdpa_note,
        "speedup": t_sdpa / t_ours, "max_abs_err_vs_sdpa": err,
    }


def bench_prefill(torch: Any, a: argparse.Namespace, dev: str) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from dualpath.kernels import paged_attention as pa

    b, hq, hkv, d, bt = a.prefill_batch, a.q_heads, a.kv_heads, a.head_dim, a.block_tokens
    cached, new = a.prefill_cached, a.prefill_new
    ctx = cached + new
    dtype = torch.bfloat16
    kv, tables = _pool_and_tables(torch, b, ctx, bt, hkv, d, dtype, dev)
    q = torch.randn((b * new, hq, d), dtype=dtype, device=dev)
    cu = torch.arange(0, b + 1, dtype=torch.int32, device=dev) * new
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    starts = torch.full((b,), cached, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    t_ours = _time(torch, lambda: pa.paged_prefill_attention(q, kv, tables, cu, lens, starts, scale), a.iters)
    out = pa.paged_prefill_attention(q, kv, tables, cu, lens, starts, scale)
    k, v = _contiguous_kv(kv, tables, ctx)
    k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    q4 = q.view(b, new, hq, d).transpose(1, 2).contiguous()
    mask = causal_lower_right(new, ctx)
    backend = "flash"
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = sdpa(q4, k, v, attn_mask=mask, scale=scale)

            def run_sdpa() -> Any:
                return sdpa(q4, k, v, attn_mask=mask, scale=scale)

            t_sdpa = _time(torch, run_sdpa, a.iters)
    except RuntimeError:
        backend = "default"
        ref = sdpa(q4, k, v, attn_mask=mask, scale=scale)
        t_sdpa = _time(torch, lambda: sdpa(q4, k, v, attn_mask=mask, scale=scale), a.iters)
    err = float((out.view(b, new, hq, d).transpose(1, 2).float() - ref.float()).abs().max())
    flops = 4.0 * b * hq * d * (new * cached + new * (new + 1) / 2)
    packed: dict[str, Any] = {}  # a KV head's query heads in one program (1 is the GPU default above)
    for pack in sorted({p for p in (2, hq // hkv) if p > 1 and (hq // hkv) % p == 0}):
        def run_packed(p: int = pack) -> Any:
            return pa.paged_prefill_attention(q, kv, tables, cu, lens, starts, scale, heads_per_program=p)

        t_p = _time(torch, run_packed, a.iters)
        packed[str(pack)] = {"time_s": t_p, "tflops": flops / t_p / 1e12, "vs_one_head": t_ours / t_p,
                             "max_abs_diff_vs_one_head": float((run_packed().float() - out.float()).abs().max())}
    return {
        "name": "paged_prefill_with_prefix", "backend": "triton", "dtype": "bfloat16",
        "shape": {"batch": b, "cached": cached, "new": new, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                  "block_tokens": bt},
        "time_s": t_ours, "tflops": flops / t_ours / 1e12,
        "sdpa_backend": backend, "sdpa_time_s": t_sdpa, "sdpa_tflops": flops / t_sdpa / 1e12,
        "ratio": t_sdpa / t_ours, "max_abs_err_vs_sdpa": err, "heads_per_program": packed,
    }


def bench_copy(torch: Any, a: argparse.Namespace, dev: str) -> dict[str, Any]:
    from dualpath.kernels import kv_copy

    bt, hkv, d = a.block_tokens, a.kv_heads, a.head_dim
    nb, n = 8192, 2048
    kv = torch.randn((nb, bt, 2, hkv, d), dtype=torch.bfloat16, device=dev)
    ids = torch.randperm(nb, device=dev)[:n]
    staging = torch.empty((n, bt, 2, hkv, d), dtype=torch.bfloat16, device=dev)
    nbytes = 2 * staging.numel() * staging.element_size()  # read + write
    t_g = _time(torch, lambda: kv_copy.gather_layer_blocks(kv, ids, staging), a.iters)
    t_s = _time(torch, lambda: kv_copy.scatter_layer_blocks(staging, kv, ids), a.iters)
    t_ref = _time(torch, lambda: torch.index_select(kv, 0, ids, out=staging), a.iters)
    assert torch.equal(kv_copy.gather_layer_blocks(kv, ids), kv[ids])
    return {"name": "layer_block_gather_scatter", "backend": "triton", "blocks": n, "block_bytes": staging[0].numel() * 2,
            "gather_gbps": nbytes / t_g / 1e9, "scatter_gbps": nbytes / t_s / 1e9,
            "torch_index_select_gbps": nbytes / t_ref / 1e9, "ratio": t_ref / t_g}


def run(args: argparse.Namespace) -> int:
    import torch

    runs: list[dict[str, Any]] = []
    if not torch.cuda.is_available():
        print("bench kernels: needs a CUDA GPU for the Triton kernels; running a CPU smoke case with the torch "
              "reference only (no figures).", file=sys.stderr)
        from dualpath.kernels import reference as ref

        kv = torch.randn((8, 16, 2, 2, 32))
        tables = torch.arange(8, dtype=torch.int32).view(2, 4)
        out = ref.paged_decode_attention(torch.randn((2, 4, 32)), kv, tables, torch.tensor([40, 64], dtype=torch.int32),
                                         32 ** -0.5)
        runs.append({"name": "smoke_paged_decode", "backend": "torch", "device": "cpu", "ok": bool(out.isfinite().all())})
    else:
        dev = "cuda"
        device = torch.cuda.get_device_name()
        for fn in (bench_decode, bench_prefill, bench_copy):
            r = fn(torch, args, dev)
            r["device"] = device
            runs.append(r)
            torch.cuda.empty_cache()
        d, p, c = runs
        print(f"device: {device}")
        print(f"paged decode  B={args.batch} ctx={args.context} bf16 D={args.head_dim}: {d['gbps']:.0f} GB/s = "
              f"{d['pct_of_peak'] or float('nan'):.1f}% of peak ({d['peak_source']}), {d['pct_of_copy']:.1f}% of copy_; "
              f"SDPA {d['sdpa_gbps']:.0f} GB/s; speedup vs SDPA {d['speedup']:.2f}x; max err {d['max_abs_err_vs_sdpa']:.2e}")
        print(f"paged prefill B={args.prefill_batch} cached={args.prefill_cached} new={args.prefill_new}: "
              f"{p['tflops']:.1f} TFLOP/s vs SDPA({p['sdpa_backend']}) {p['sdpa_tflops']:.1f}: ratio {p['ratio']:.2f}x; "
              f"max err {p['max_abs_err_vs_sdpa']:.2e}")
        for pack, r in p["heads_per_program"].items():
            print(f"  heads_per_program={pack}: {r['tflops']:.1f} TFLOP/s, {r['vs_one_head']:.2f}x one head per program")
        print(f"layer blocks: gather {c['gather_gbps']:.0f} GB/s, scatter {c['scatter_gbps']:.0f} GB/s, "
              f"torch index_select {c['torch_index_select_gbps']:.0f} GB/s")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"runs": runs}, fh, indent=2)
    return 0
