"""Dequantize the MXFP4 expert weights of OpenAI's gpt-oss checkpoints (``GptOssForCausalLM``) at load time.

Format (OCP Microscaling Formats (MX) v1.0, as used by the published gpt-oss checkpoints and by transformers 5
``transformers/integrations/mxfp4.py``): each MoE layer stores ``mlp.experts.gate_up_proj`` and
``mlp.experts.down_proj`` as two uint8 tensors,

- ``*_blocks [E, rows, G, 16]``: ``G`` blocks of 32 FP4 (E2M1) values per row, two values per byte, the low
  nibble first (value ``2j`` is ``byte[j] & 0xF``, value ``2j+1`` is ``byte[j] >> 4``). A nibble is
  ``sign | 2-bit exponent | 1-bit mantissa``, i.e. one of ``+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (:data:`FP4_VALUES`);
- ``*_scales [E, rows, G]``: one E8M0 scale per block of 32, a bare exponent with bias 127, so a block's values are
  multiplied by ``2 ** (scale - 127)``. Like transformers, 0xFF (NaN in the MX spec) is not special-cased.

The dense values in the checkpoint's orientation are ``[E, rows, G * 32]`` (``gate_up``: ``rows = 2 * I``,
``G * 32 = H``; ``down``: ``rows = H``, ``G * 32 = I``). transformers' dense ``GptOssExperts`` keeps
``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``: with ``Mxfp4Config(dequantize=True)`` its loader maps
the pair onto the parameter (``Mxfp4HfQuantizer.serialized_names``, ``quantizers/quantizer_mxfp4.py:220``, turned
into a ``WeightConverter`` by ``HfQuantizer.get_weight_conversions``, ``quantizers/base.py:333``; there is no
gpt_oss entry in ``conversion_mapping.py``), and ``Mxfp4Dequantize.convert`` (``integrations/mxfp4.py:97``) calls
``convert_moe_packed_tensors``, which dequantizes and ends with ``out.transpose(1, 2).contiguous()``
(``integrations/mxfp4.py:285``): the last two axes swapped, nothing else (gate and up stay interleaved column by
column, as stored). :func:`gpt_oss_dense_experts` applies that same swap.

The biases (``gate_up_proj_bias``, ``down_proj_bias``) are stored dense and pass through unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from dualpath.errors import ModelError

__all__ = ["FP4_VALUES", "dequantize_mxfp4", "gpt_oss_dense_experts", "is_mxfp4"]

#: The 16 FP4 E2M1 values, indexed by the 4-bit code (bit 3 is the sign).
FP4_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_VALUES_PER_BLOCK = 32
_BYTES_PER_BLOCK = _VALUES_PER_BLOCK // 2
_SCALE_BIAS = 127
_EXPERTS_RE = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.experts\.(?:gate_up_proj|down_proj))_(?P<kind>blocks|scales)$")


def _check_pair(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    if blocks.dtype != torch.uint8:
        raise ModelError(f"{name}_blocks: MXFP4 blocks must be uint8, got {blocks.dtype}")
    if scales.dtype != torch.uint8:
        raise ModelError(f"{name}_scales: MXFP4 scales must be uint8 (E8M0), got {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != _BYTES_PER_BLOCK:
        raise ModelError(f"{name}_blocks: MXFP4 blocks must be [..., G, {_BYTES_PER_BLOCK}], "
                         f"got {tuple(blocks.shape)}")
    if scales.shape != blocks.shape[:-1]:
        raise ModelError(f"{name}_scales: shape {tuple(scales.shape)} does not match {name}_blocks "
                         f"{tuple(blocks.shape)} (expected {tuple(blocks.shape[:-1])})")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, *,
                     chunk_rows: int = 1 << 16, name: str = "mxfp4") -> torch.Tensor:
    """The dense values of MXFP4 ``blocks [..., G, 16]`` (uint8) with ``scales [..., G]`` (uint8 E8M0), as
    ``[..., G * 32]`` in ``dtype``, in the checkpoint's own orientation (no transpose).

    Works ``chunk_rows`` blocks at a time, so besides the output the temporaries stay at a few times
    ``chunk_rows * 32`` elements whatever the tensor's size. ``name`` prefixes error messages."""
    _check_pair(blocks, scales, name)
    if not dtype.is_floating_point:
        raise ModelError(f"{name}: MXFP4 dequantizes to a floating dtype, got {dtype}")
    *prefix, groups, nbytes = blocks.shape
    rows = math.prod(prefix) * groups
    flat_blocks = blocks.reshape(rows, nbytes)
    flat_exp = scales.reshape(rows, 1)
    out = torch.empty(rows, 2 * nbytes, dtype=dtype, device=blocks.device)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    byte = torch.arange(256, device=blocks.device)
    pair_lut = torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1)   # byte -> (low value, high value)
    step = max(1, chunk_rows)
    for r0 in range(0, rows, step):
        blk = flat_blocks[r0:r0 + step]
        values = pair_lut[blk.long()].reshape(blk.shape[0], 2 * nbytes)
        exp = flat_exp[r0:r0 + step].to(torch.int32) - _SCALE_BIAS
        # value * 2**exp is exact in any float dtype wide enough for it; rounded once otherwise.
        torch.ldexp(values, exp, out=out[r0:r0 + step])
    return out.reshape(*prefix, groups * 2 * nbytes)


def gpt_oss_dense_experts(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``tensors`` (a checkpoint's name -> tensor) with every ``*.mlp.experts.gate_up_proj_blocks`` /
    ``_scales`` pair replaced by ``*.mlp.experts.gate_up_proj [E, H, 2I]`` and every ``down_proj`` pair by
    ``*.mlp.experts.down_proj [E, I, H]`` in ``dtype``, oriented as transformers' dense ``GptOssExperts``
    parameters (the checkpoint's ``[E, rows, cols]`` with the last two axes swapped). Other tensors pass
    through unchanged, in their order. Dequantizes one expert at a time.

    Raises :class:`~dualpath.errors.ModelError` naming the tensor for a ``_blocks`` without its ``_scales`` (or
    the reverse), non-uint8 dtypes, disagreeing shapes, or a dense tensor of the same name also present."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _EXPERTS_RE.match(key)
        if m:
            pairs.setdefault(m["prefix"], {})[m["kind"]] = t
    for prefix, pair in pairs.items():
        for kind, other in (("blocks", "scales"), ("scales", "blocks")):
            if kind in pair and other not in pair:
                raise ModelError(f"{prefix}_{kind} has no matching {prefix}_{other} in the checkpoint")
        _check_pair(pair["blocks"], pair["scales"], prefix)
        if pair["blocks"].dim() != 4:
            raise ModelError(f"{prefix}_blocks: expert blocks must be [E, rows, G, {_BYTES_PER_BLOCK}], "
                             f"got {tuple(pair['blocks'].shape)}")
        if prefix in tensors:
            raise ModelError(f"{prefix}: checkpoint holds both the dense tensor and its MXFP4 _blocks/_scales")

    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _EXPERTS_RE.match(key)
        if m is None:
            out[key] = t
        elif m["kind"] == "blocks":
            prefix = m["prefix"]
            out[prefix] = _dense_experts(pairs[prefix]["blocks"], pairs[prefix]["scales"], dtype, prefix)
    return out


def _dense_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``[E, rows, G, 16]`` blocks -> ``[E, G * 32, rows]`` dense, one expert's temporaries at a time."""
    n_experts, rows, groups, _ = blocks.shape
    dense = torch.empty(n_experts, groups * _VALUES_PER_BLOCK, rows, dtype=dtype, device=blocks.device)
    for e in range(n_experts):
        dense[e].copy_(dequantize_mxfp4(blocks[e], scales[e], dtype, name=name).transpose(0, 1))
    return dense


def is_mxfp4(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``config.json`` (as a dict) declares ``quantization_config.quant_method`` mxfp4."""
    q = config.get("quantization_config")
    return isinstance(q, Mapping) and str(q.get("quant_method", "")).lower() == "mxfp4"
