"""compressed-tensors' 4-, 6- and 8-bit float weights (``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``,
``mxfp6-pack-quantized``, ``mxfp8-quantized``: llm-compressor's NVFP4A16 / MXFP4A16 / MXFP6A16 / MXFP8A16 schemes,
the NVFP4 checkpoints RedHatAI publishes), dequantized at load. Activations run unquantized (a checkpoint that
quantizes its inputs to 4 bits is refused by :mod:`dualpath.model.act_quant`).

- **FP4** (E2M1): ``<w>_packed`` uint8 ``[out, in / 2]``, two codes per byte, the first in the low nibble; a code's
  bit 3 is its sign and bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6.
- **FP6** (E2M3): ``<w>_packed`` uint8 ``[out, 3 in / 4]``, four 6-bit codes in three bytes, little-endian; bit 5
  is the sign, codes 0-7 are ``m / 8`` and 8-31 ``(1 + m / 8) 2^e`` (``e = code / 8 - 1``, ``m = code % 8``).
- **FP8** (E4M3): ``<w>`` as it is.
- Scales: MX formats one E8M0 exponent (uint8, ``2^(s - 127)``) per 32 inputs in ``<w>_scale``; NVFP4 one E4M3
  scale per 16 inputs, divided by the tensor's ``<w>_global_scale``.

NVIDIA ModelOpt's NVFP4 checkpoints (``quant_method: modelopt``, ``quant_algo: NVFP4``) hold the same values under
other names: the FP4 bytes as ``<w>`` (uint8), the E4M3 scales as ``<w>_scale`` and the global scale's inverse as
``<w>_scale_2`` (``weight = fp4 x scale x scale_2``); their input and KV-cache scales are dropped (inputs run
unquantized, as vLLM runs these weights on a GPU without FP4 arithmetic).

Checked against the library's own compression and decompression of checkpoints it wrote
(``tests/model/test_compressed_tensors_hf.py``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dualpath.errors import ModelError
from dualpath.model.int_quant import replaced

#: compressed-tensors formats read here
MX_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M3 = torch.tensor([m / 8 for m in range(8)] + [(1 + m / 8) * 2 ** e for e in range(3) for m in range(8)])
_MX_GROUP = 32
#: activation and KV-cache scales beside such weights (inputs and KV run unquantized)
_RUNTIME_SCALES = (".input_scale", ".input_global_scale", ".k_scale", ".v_scale")


def _fp4_pairs() -> torch.Tensor:
    """The two FP4 values of every byte, ``[256, 2]``: the low nibble's first."""
    codes = torch.stack((torch.arange(256) & 0x0F, torch.arange(256) >> 4), dim=-1)
    values = _E2M1[codes & 0x7]
    return torch.where(codes & 0x8 != 0, -values, values)


_FP4_PAIRS = _fp4_pairs()


def _fp4(packed: torch.Tensor) -> torch.Tensor:
    return _FP4_PAIRS[packed.long()].reshape(packed.shape[0], -1)


def _fp6(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    b = packed.reshape(rows, -1, 3).to(torch.int32)
    word = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16
    codes = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1).reshape(rows, -1).long()
    values = _E2M3[codes & 0x1F]
    return torch.where(codes & 0x20 != 0, -values, values)


def _grouped(values: torch.Tensor, scale: torch.Tensor, name: str, source: str) -> torch.Tensor:
    rows, cols = values.shape
    if scale.dim() != 2 or scale.shape[0] != rows or scale.shape[1] == 0 or cols % scale.shape[1]:
        raise ModelError(f"{source}: {name}_scale {tuple(scale.shape)} does not fit the weight's {rows} rows of "
                         f"{cols} inputs in groups")
    g = cols // scale.shape[1]
    return (values.reshape(rows, scale.shape[1], g) * scale.unsqueeze(-1)).reshape(rows, cols)


def _mx_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.exp2(scale.to(torch.int32).float() - 127.0)  # (E8M0)


def is_mx(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(".weight_scale") and t.dtype == torch.uint8 for name, t in tensors.items()) or any(
        name.endswith((".weight_global_scale", ".weight_scale_2")) for name in tensors)


def mx_dequantized(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint",
                   dtype: torch.dtype = torch.float32) -> Mapping[str, torch.Tensor]:
    """``tensors`` with every NVFP4 / MXFP4 / MXFP6 / MXFP8 weight dequantized (in fp32, kept in ``dtype``) under
    its plain name, its scales dropped (``tensors`` itself when it holds none)."""
    if not is_mx(tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    for name, scale in tensors.items():
        if not name.endswith(".weight_scale"):
            continue
        base = name[: -len("_scale")]
        packed, plain, gscale = tensors.get(base + "_packed"), tensors.get(base), tensors.get(base + "_global_scale")
        scale_2 = tensors.get(base + "_scale_2")
        if scale_2 is not None:  # ModelOpt's NVFP4: FP4 bytes under the weight's own name
            if plain is None or plain.dtype != torch.uint8 or plain.dim() != 2 or scale_2.numel() != 1:
                raise ModelError(f"{source}: ModelOpt NVFP4 weight {base!r} needs {base} as uint8 [out, in / 2] and "
                                 f"one {base}_scale_2")
            w = _grouped(_fp4(plain), scale.float() * scale_2.float().reshape(()), base, source)
            drop.update((base, name, base + "_scale_2", base[: -len("weight")] + "input_scale"))
        elif gscale is not None:  # NVFP4: FP4 values, E4M3 scales per 16 inputs over a global scale
            if packed is None or packed.dtype != torch.uint8 or packed.dim() != 2 or gscale.numel() != 1:
                raise ModelError(f"{source}: NVFP4 weight {base!r} needs {base}_packed (uint8 [out, in / 2]) and "
                                 f"one {base}_global_scale")
            w = _grouped(_fp4(packed), scale.float() / gscale.float().reshape(()), base, source)
            drop.update((base + "_packed", name, base + "_global_scale"))
        elif scale.dtype == torch.uint8 and packed is not None:  # MXFP4 / MXFP6
            if packed.dtype != torch.uint8 or packed.dim() != 2 or scale.dim() != 2:
                raise ModelError(f"{source}: MX weight {base!r}: {base}_packed {tuple(packed.shape)} {packed.dtype} "
                                 "must be uint8 [out, packed inputs]")
            per_group = packed.shape[1] / max(scale.shape[1], 1)
            if per_group == _MX_GROUP // 2:
                values = _fp4(packed)
            elif per_group == _MX_GROUP * 3 // 4:
                values = _fp6(packed)
            else:
                raise ModelError(f"{source}: MX weight {base!r}: {packed.shape[1]} packed byte(s) per row for "
                                 f"{scale.shape[1]} scale(s) fit neither FP4 nor FP6 in groups of {_MX_GROUP}")
            w = _grouped(values, _mx_scale(scale), base, source)
            drop.update((base + "_packed", name))
        elif scale.dtype == torch.uint8 and plain is not None and plain.dtype == torch.float8_e4m3fn:  # MXFP8
            w = _grouped(plain.float(), _mx_scale(scale), base, source)
            drop.update((base, name))
        else:
            continue
        out[base] = w.to(dtype)
    if not out:
        return tensors
    return replaced(tensors, out, drop, _RUNTIME_SCALES)
