"""GPU figures of the MLA latent kernels (issue 14). Run on a CUDA machine from the repository root:

    PYTHONPATH=src python3 benchmarks/gpu_mla_bench.py [--json OUT] [--heads 128]

1. Paged absorbed MLA decode, batch 64, 8K context, latent 512 + 64, 64-token pages, bf16 and FP8 rows: GB/s of
   latent bytes read, % of the card's peak HBM bandwidth (table / device properties, as ``dualpath bench
   kernels``) and the ratio to a device-to-device ``copy_`` of the same bytes measured in the same run.
2. Paged MLA prefill with a cached prefix (batch 4, 4K cached + 512 new) against torch SDPA (flash, causal
   lower-right) over K/V decompressed from the same latents (``kv_b_proj``), with and without the decompression.
Every timed kernel is first checked against the torch reference on a slice.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=128, help="query heads (128 = DeepSeek-V3, one GPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU through the Triton interpreter: checks the script, measures nothing")
    a = ap.parse_args()
    if a.smoke:
        import os
        import time

        os.environ["TRITON_INTERPRET"] = "1"
        a.batch, a.context, a.heads, a.iters = 2, 256, 4, 1
    elif not torch.cuda.is_available():
        print("gpu_mla_bench: no CUDA device (use --smoke to check the script on CPU)", file=sys.stderr)
        return 2
    from dualpath.kernels import mla_attention as k
    from dualpath.kernels import reference as ref

    if a.smoke:
        dev = "cpu"
        peak, peak_src = None, "smoke"

        def _time(torch_: object, fn: object, iters: int) -> float:
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            return time.perf_counter() - t0
    else:
        from dualpath.commands.bench_kernels import _peak_bw, _time  # type: ignore[assignment]

        dev = "cuda"
        peak, peak_src = _peak_bw(torch)
    r, p, bt, h = 512, 64, 64, a.heads
    g = torch.Generator(device=dev).manual_seed(0)
    res: dict[str, object] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)",
                              "peak_bw": peak, "peak_src": peak_src}

    # --- decode --------------------------------------------------------------------------------------------
    b, ctx = a.batch, a.context
    nb = b * ctx // bt
    lat = torch.randn(nb * bt, r + p, device=dev, generator=g, dtype=torch.bfloat16)
    tables = torch.randperm(nb, device=dev, generator=g).to(torch.int32).view(b, ctx // bt)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, h, r + p, device=dev, generator=g) * 0.05
    scale = 192 ** -0.5
    for fmt in ("bfloat16", "fp8"):
        if fmt == "fp8":
            pages = ref.quantize_latent_fp8(lat, r).view(nb, bt, -1)
        else:
            pages = lat.view(nb, bt, r + p)
        got = k.mla_decode_attention(q[:2], pages, tables[:2], lens[:2] // 8, scale, r).float()
        want = ref.mla_decode_attention(q[:2], pages, tables[:2], lens[:2] // 8, scale, r).float()
        err = float((got - want).abs().max())
        t = _time(torch, lambda pg=pages: k.mla_decode_attention(q, pg, tables, lens, scale, r), a.iters)
        nbytes = b * ctx * pages.shape[-1] * pages.element_size()
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_copy = _time(torch, lambda s=src, d=dst: d.copy_(s), a.iters)
        gbps = nbytes / t / 1e9
        row = {"ms": t * 1e3, "gbps": gbps, "pct_peak": 100 * nbytes / t / peak if peak else None,
               "copy_gbps": 2 * nbytes / t_copy / 1e9, "ratio_vs_copy_read_bw": (nbytes / t) / (2 * nbytes / t_copy),
               "max_err_vs_reference": err}
        res[f"decode_{fmt}"] = row
        print(f"MLA decode {fmt:8s} B={b} ctx={ctx} H={h}: {t * 1e3:.3f} ms, {gbps:.0f} GB/s"
              + (f" = {row['pct_peak']:.0f}% of peak" if peak else "")
              + f", {row['ratio_vs_copy_read_bw']:.2f}x of copy_'s read+write GB/s; max err {err:.2e}")
        del src, dst

    # --- prefill with prefix vs SDPA over decompressed K/V -------------------------------------------------
    pb, cached, new = (1, 48, 16) if a.smoke else (4, 4096, 512)  # cached + new: whole 64-token pages
    n = cached + new
    nb = pb * n // bt
    lat = torch.randn(nb * bt, r + p, device=dev, generator=g, dtype=torch.bfloat16)
    pages = lat.view(nb, bt, r + p)
    tables = torch.arange(nb, device=dev, dtype=torch.int32).view(pb, n // bt)
    cu = torch.arange(0, (pb + 1) * new, new, device=dev, dtype=torch.int32)
    lens = torch.full((pb,), n, dtype=torch.int32, device=dev)
    start = torch.full((pb,), cached, dtype=torch.int32, device=dev)
    nope, vd = 128, 128
    w_kv_b = torch.randn(h * (nope + vd), r, device=dev, generator=g, dtype=torch.bfloat16) * r ** -0.5
    qn = torch.randn(pb * new, h, nope + p, device=dev, generator=g, dtype=torch.bfloat16)
    w = w_kv_b.view(h, nope + vd, r)
    q_abs = torch.cat((torch.einsum("nhd,hdr->nhr", qn[..., :nope].float(), w[:, :nope].float()),
                       qn[..., nope:].float()), -1).contiguous()
    sc = (nope + p) ** -0.5

    def ours() -> torch.Tensor:
        o = k.mla_prefill_attention(q_abs, pages, tables, cu, lens, start, sc, r)
        return torch.einsum("nhr,hvr->nhv", o, w[:, nope:].float())

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    lat_seq = lat.view(pb, n, r + p)

    def decompress() -> tuple[torch.Tensor, torch.Tensor]:
        kv = (lat_seq[..., :r] @ w_kv_b.T).view(pb, n, h, nope + vd)
        kk = torch.cat((kv[..., :nope], lat_seq[..., None, r:].expand(pb, n, h, p)), -1).transpose(1, 2)
        return kk.contiguous(), kv[..., nope:].transpose(1, 2).contiguous()

    kk, vv = decompress()
    qq = qn.view(pb, new, h, nope + p).transpose(1, 2)
    mask = causal_lower_right(new, n)

    def sdpa() -> torch.Tensor:
        backends = [SDPBackend.MATH] if a.smoke else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=sc)

    def sdpa_with_decompress() -> torch.Tensor:
        nonlocal kk, vv
        kk, vv = decompress()
        return sdpa()

    got = ours().view(pb, new, h, vd).transpose(1, 2).float()
    want = sdpa().float()
    err = float((got - want).abs().max() / want.abs().max())
    t_ours = _time(torch, ours, a.iters)
    t_sdpa = _time(torch, sdpa, a.iters)
    t_sdpa_d = _time(torch, sdpa_with_decompress, a.iters)
    res["prefill"] = {"batch": pb, "cached": cached, "new": new, "heads": h, "ours_ms": t_ours * 1e3,
                      "sdpa_ms": t_sdpa * 1e3, "sdpa_with_decompress_ms": t_sdpa_d * 1e3,
                      "ratio_sdpa_over_ours": t_sdpa / t_ours,
                      "ratio_sdpa_with_decompress_over_ours": t_sdpa_d / t_ours, "rel_err_vs_sdpa": err}
    print(f"MLA prefill B={pb} cached={cached} new={new} H={h}: ours {t_ours * 1e3:.2f} ms, SDPA on decompressed "
          f"K/V {t_sdpa * 1e3:.2f} ms ({t_sdpa / t_ours:.2f}x), with decompression {t_sdpa_d * 1e3:.2f} ms "
          f"({t_sdpa_d / t_ours:.2f}x); rel err {err:.2e}")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
