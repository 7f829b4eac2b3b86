"""Quantized checkpoints: which formats are read (:data:`DEQUANTIZED`; any other is refused by name), and their
dequantization to fp32 at load: block-scaled FP8 (DeepSeek-V3's ``weight_scale_inv`` tiles, also MiniMax-M2's and
other ``fp8`` checkpoints') and compressed-tensors' ``float-quantized`` FP8 / ``int-quantized`` and
``naive-quantized`` INT8 weights, symmetric or with zero points (the W8A8 and W8A16 checkpoints vLLM serves:
RedHatAI's ``-FP8-dynamic``, ``-quantized.w8a8``, ...). Packed integer weights (GPTQ, AWQ, compressed-tensors'
``pack-quantized``) are :mod:`dualpath.model.int_quant`. Activations run unquantized, as vLLM
runs those weights on a GPU without FP8 (W8A16). OpenAI's MXFP4 experts are :mod:`dualpath.model.mxfp4`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dualpath.errors import ModelError


def dequantize_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = 128) -> torch.Tensor:
    """A block-scaled FP8 weight ``[out, in]`` (one fp32 ``scale_inv`` per ``block`` tile: an int for square
    tiles or ``(rows, cols)`` as ``quantization_config.weight_block_size``) -> fp32."""
    bo, bi = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
    out_f, in_f = w.shape
    want = (-(-out_f // bo), -(-in_f // bi))
    if tuple(scale_inv.shape) != want:
        raise ModelError(f"FP8 weight {tuple(w.shape)} with {bo}x{bi} blocks needs a scale_inv of shape {want}, "
                         f"got {tuple(scale_inv.shape)} (quantization_config.weight_block_size)")
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_f].repeat_interleave(bi, 1)[:, :in_f]
    return w.float() * s


#: the ``quantization_config.quant_method`` values whose weights are dequantized at load: block-scaled FP8
#: (DeepSeek-V3, MiniMax-M2, other ``fp8`` checkpoints), MXFP4 experts (gpt-oss), compressed-tensors' INT4 / FP8 /
#: INT8 (Kimi K2 / K2.5, vLLM's W8A8 and W8A16 checkpoints), FBGEMM's per-row FP8 (Meta's Llama 3.1 405B FP8),
#: NVIDIA ModelOpt's FP8 (a scale per tensor), both read as compressed-tensors' FP8 weights, GPTQ's and AWQ's
#: packed integers (:mod:`dualpath.model.int_quant`) and bitsandbytes' NF4 / FP4 / LLM.int8 weights
#: (:mod:`dualpath.model.bnb_quant`)
DEQUANTIZED = ("fp8", "mxfp4", "compressed-tensors", "fbgemm_fp8", "modelopt", "gptq", "awq", "bitsandbytes")
#: compressed-tensors' formats read here: 1- to 8-bit integers packed in int32 words, FP8 (e4m3) and INT8 weights
#: with their scales
CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized", "nvfp4-pack-quantized",
              "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
#: a compressed-tensors checkpoint's activation and KV-cache scales (unused: activations and KV run unquantized)
_CT_RUNTIME_SCALES = (".input_scale", ".input_zero_point", ".output_scale", ".k_scale", ".v_scale",
                      ".input_scale_ub")


def ct_block_size(hf_config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The ``block_structure`` of a compressed-tensors config's weights (its ``block`` strategy), or None."""
    q = hf_config.get("quantization_config")
    groups = q.get("config_groups") if isinstance(q, Mapping) else None
    for group in (groups.values() if isinstance(groups, Mapping) else ()):
        w = group.get("weights") if isinstance(group, Mapping) else None
        bs = w.get("block_structure") if isinstance(w, Mapping) else None
        if bs is not None:
            if (not isinstance(bs, list) or len(bs) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in bs)):
                raise ModelError(f"quantization_config weights.block_structure must be two positive integers, got "
                                 f"{bs!r}")
            return (bs[0], bs[1])
    return None


def scaled_dequantized(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       block: tuple[int, int] | None = None) -> Mapping[str, torch.Tensor]:
    """A checkpoint's tensors with every compressed-tensors FP8 or INT8 weight (``<w>`` in e4m3 or int8 beside
    ``<w>_scale``) dequantized to fp32 as value x scale, the scale one per tensor, per output row, per group of
    inputs (``[out, groups]``) or per ``block`` tile (the ``block`` strategy); activation and KV-cache scales are
    dropped (``tensors`` itself when it holds no such weight). An asymmetric INT8 weight's ``<w>_zero_point`` (one
    per scale) is subtracted first: value ``(q - zero) x scale``."""
    if not any(name.endswith(".weight_scale") and name[: -len("_scale")] in tensors
               and tensors[name[: -len("_scale")]].dtype in (torch.float8_e4m3fn, torch.int8) for name in tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_CT_RUNTIME_SCALES):
            continue
        scale = tensors.get(name + "_scale")
        weight = tensors.get(name[: -len("_scale")]) if name.endswith(".weight_scale") else None
        if weight is not None and weight.dtype in (torch.float8_e4m3fn, torch.int8):
            continue  # (read with its weight)
        if scale is None or t.dtype not in (torch.float8_e4m3fn, torch.int8):
            out[name] = t
            continue
        zp = tensors.get(name + "_zero_point")
        if zp is not None and bool(torch.any(zp != 0)):
            t = _minus_zero_point(name, t, zp, scale, source)
        out[name] = _scaled(name, t, scale, block, source)
        out.pop(name + "_zero_point", None)
    return {k: v for k, v in out.items() if not k.endswith(".weight_zero_point")}


def _minus_zero_point(name: str, w: torch.Tensor, zp: torch.Tensor, scale: torch.Tensor,
                      source: str) -> torch.Tensor:
    """An INT8 weight ``[out, in]`` minus its zero points (one per tensor, row or group, as its scale), in int32."""
    if w.dtype != torch.int8 or w.dim() != 2 or zp.numel() not in (1, scale.numel()) \
            or (zp.numel() > 1 and w.shape[1] % (zp.numel() // w.shape[0] or 1)):
        raise ModelError(f"{source}: {name}_zero_point {tuple(zp.shape)} does not fit {name}_scale "
                         f"{tuple(scale.shape)} of the {w.dtype} weight {tuple(w.shape)} (zero points are read for "
                         "INT8 weights, one per scale)")
    if zp.numel() == 1:
        return w.to(torch.int32) - int(zp.reshape(()))
    z = zp.to(torch.int32).reshape(w.shape[0], -1)
    return w.to(torch.int32) - z.repeat_interleave(w.shape[1] // z.shape[1], dim=1)


def _scaled(name: str, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
            source: str) -> torch.Tensor:
    if w.dim() != 2:
        raise ModelError(f"{source}: quantized tensor {name!r} has shape {tuple(w.shape)}, expected [out, in]")
    rows, cols = w.shape
    s = scale.float()
    if s.numel() == 1:  # per tensor
        return w.float() * s.reshape(())
    if s.dim() == 2 and s.shape[0] == rows and cols % s.shape[1] == 0:  # per output row (1 column) or per group
        return w.float() * s.repeat_interleave(cols // s.shape[1], dim=1)
    if block is not None and s.dim() == 2:
        try:
            return dequantize_block_fp8(w, s, block)
        except ModelError as exc:
            raise ModelError(f"{source}: tensor {name!r}: {exc}") from None
    raise ModelError(f"{source}: {name}_scale {tuple(scale.shape)} fits neither a tensor, a row, a group nor a "
                     f"block scale of the weight {tuple(w.shape)} (quantization_config weights.block_structure)")


def check_quantization(hf_config: Mapping[str, Any], where: str) -> None:
    """Refuse, naming the method, a checkpoint quantized in a format this project does not dequantize (GPTQ, AWQ,
    bitsandbytes, ...): its packed tensors would otherwise surface as unexpected names far from the cause."""
    q = hf_config.get("quantization_config")
    if hf_config.get("quantization") is not None and (not isinstance(q, Mapping) or q.get("quant_method") is None):
        from dualpath.model.mlx_quant import mlx_quant  # (mlx-lm writes its config under both keys)

        mlx_quant(hf_config, where)
        return
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, Mapping) else None
    if not isinstance(method, str) or method.lower() not in DEQUANTIZED:
        raise ModelError(f"{where}: quantization_config.quant_method {method!r} is not supported: weights are read "
                         f"as they are, or dequantized at load from {', '.join(DEQUANTIZED)}; use the checkpoint's "
                         "unquantized (or one of those) release")
    algo = q.get("quant_algo")
    if method.lower() == "modelopt" and algo not in ("FP8", "NVFP4", None):
        raise ModelError(f"{where}: quantization_config.quant_algo {algo!r} is not supported for modelopt (its FP8 "
                         "and NVFP4 weights are)")
    from dualpath.model.int_quant import int_quant

    int_quant(hf_config, where)  # (GPTQ's and AWQ's layout fields)
    if method.lower() == "bitsandbytes":
        from dualpath.model.bnb_quant import check_bnb_config

        check_bnb_config(q, where)
    fmt = q.get("format")
    if method.lower() == "compressed-tensors" and fmt == "mixed-precision":  # (a format per config group)
        groups = q.get("config_groups")
        for name, group in (groups.items() if isinstance(groups, Mapping) else ()):
            gfmt = group.get("format") if isinstance(group, Mapping) else None
            if gfmt not in CT_FORMATS:
                raise ModelError(f"{where}: quantization_config.config_groups.{name}.format {gfmt!r} is not "
                                 f"supported for compressed-tensors (its {', '.join(CT_FORMATS)} weights are)")
    elif method.lower() == "compressed-tensors" and fmt is not None and fmt not in CT_FORMATS:
        raise ModelError(f"{where}: quantization_config.format {fmt!r} is not supported for compressed-tensors "
                         f"(its {', '.join(CT_FORMATS)} weights are, and mixed-precision groups of them)")


def fp8_block_size(hf_config: Mapping[str, Any]) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of a checkpoint config (DeepSeek-V3 publishes [128, 128])."""
    q = hf_config.get("quantization_config")
    wbs = q.get("weight_block_size") if isinstance(q, dict) else None
    if wbs is None:
        return (128, 128)
    if (not isinstance(wbs, list) or len(wbs) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in wbs)):
        raise ModelError(f"quantization_config.weight_block_size must be two positive integers, got {wbs!r}")
    return (wbs[0], wbs[1])


def _dequantized(name: str, t: torch.Tensor, tensors: Mapping[str, torch.Tensor], source: str,
                 fp8_block: tuple[int, int]) -> torch.Tensor:
    """``t`` itself, or, a block-scaled FP8 weight (DeepSeek's format, also MiniMax-M2's and other ``fp8``
    ``quantization_config`` checkpoints': ``name`` in e4m3 with ``name + "_scale_inv"``), dequantized to fp32."""
    if t.dtype != torch.float8_e4m3fn:
        return t
    scale = tensors.get(name + "_scale_inv")
    if scale is None:
        raise ModelError(f"{source}: FP8 tensor {name!r} has no {name}_scale_inv")
    try:
        return dequantize_block_fp8(t, scale, fp8_block)
    except ModelError as exc:
        raise ModelError(f"{source}: tensor {name!r}: {exc}") from None


def fp8_dequantized(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint",
                    fp8_block: tuple[int, int] = (128, 128)) -> Mapping[str, torch.Tensor]:
    """A checkpoint's tensors with every block-scaled FP8 weight dequantized and its ``weight_scale_inv`` dropped
    (``tensors`` itself when it holds none)."""
    if not any(t.dtype == torch.float8_e4m3fn for t in tensors.values()):
        return tensors
    return {name: _dequantized(name, t, tensors, source, fp8_block) for name, t in tensors.items()
            if not name.endswith("weight_scale_inv")}
