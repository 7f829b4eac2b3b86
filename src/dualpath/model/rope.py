"""Rotary embedding frequencies for every RoPE variant the specs read (``default``, ``linear``, ``dynamic``,
``llama3``, ``yarn``, ``longrope``, ``ntk_alpha``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dualpath.model.spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[rotary_dim // 2]`` (fp32) and the cos/sin scale for ``spec``'s RoPE variant."""
    return rope_frequencies(spec.rotary_dim, spec.rope_theta, spec.rope_scaling, spec.max_position,
                            long=bool(spec.rope_long))


def rope_frequencies(dim: int, base: float, rope_scaling: dict[str, Any] | None,
                     max_position: int, long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim // 2]`` (fp32) and the cos/sin scale of a RoPE of ``dim`` rotary dims
    (``long``: a longrope RoPE's long factor set, else its short one)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = rope_scaling or {}
    kind = str(rs.get("rope_type", rs.get("type", "default")))
    scale = 1.0
    if kind == "longrope":  # LongRoPE: per-pair divisors, and a cos/sin scale from the context extension
        orig = float(rs["original_max_position_embeddings"])
        factors = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float64)
        inv_freq = inv_freq / factors
        attn = rs.get("attention_factor")
        if attn is None and rs.get("short_mscale") is not None:  # PhiMoE: the chosen set's own scale
            attn = rs["long_mscale" if long else "short_mscale"]
        if attn is None:
            factor = float(rs.get("factor") or max_position / orig)
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        scale = float(attn)
    elif kind == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif kind == "ntk_alpha":  # Hunyuan: a fixed NTK base, rope_theta * alpha ** (d / (d - 2))
        big = base * float(rs["alpha"]) ** (dim / (dim - 2))
        inv_freq = 1.0 / (big ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    # dynamic NTK: transformers rescales the base only for a forward whose longest sequence passes
    # max_position_embeddings (base * (factor * len / max_position - factor + 1) ** (dim / (dim - 2))); below it the
    # frequencies are the default's. A spec never serves past max_position (ModelSpec.context_limit), so the default
    # frequencies are transformers' for every sequence served, and a stored prefix's KV never depends on the
    # forward that computed it
    elif kind == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wl, high_wl = old_ctx / low, old_ctx / high
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "yarn":
        factor = float(rs["factor"])
        orig = float(rs.get("original_max_position_embeddings", max_position))
        beta_fast = float(rs.get("beta_fast") or 32)
        beta_slow = float(rs.get("beta_slow") or 1)

        def corr(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr(beta_fast), corr(beta_slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrap) + inv_freq * extrap
        attn = rs.get("attention_factor")
        if attn is None:
            ms, ms_all = rs.get("mscale"), rs.get("mscale_all_dim")

            def mscale(s: float, m: float = 1.0) -> float:
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
        scale = float(attn)
    return inv_freq.to(torch.float32), scale


def rope_long_for(rope_scaling: dict[str, Any] | None, max_context: int | None) -> bool | None:
    """Which of a LongRoPE model's factor sets turns every position (None when the RoPE is not longrope).

    transformers picks per forward (the long set once the forward's longest sequence passes
    ``original_max_position_embeddings``), so a prefix's keys would depend on which forward computed them, and a
    stored Full Block could not be reused by a longer context. Here the set is fixed per deployment, as vLLM fixes
    it: the short set (transformers' numbers exactly, the context capped at ``original_max_position_embeddings``)
    unless ``max_context`` asks for more, then the long set for every position (transformers' numbers for any
    sequence longer than ``original_max_position_embeddings``)."""
    if (rope_scaling or {}).get("rope_type") != "longrope":
        return None
    orig = int((rope_scaling or {})["original_max_position_embeddings"])
    return max_context is not None and int(max_context) > orig
