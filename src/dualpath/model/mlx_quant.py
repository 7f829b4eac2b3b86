"""MLX-quantized checkpoints as mlx-lm writes them (the ``mlx-community`` releases: ``config.json`` holds
``quantization: {"group_size": G, "bits": B}``, with per-module overrides keyed by module path, ``false`` for a module
left unquantized), dequantized to the model's dtype at load. Only MLX's ``affine`` mode is read (its ``mxfp4`` /
``nvfp4`` / ``mxfp8`` modes are refused by name).

A quantized module ``<m>`` (linear layers, and the embedding table) stores ``<m>.weight`` as uint32 words
``[out, in * bits / 32]``, each row one little-endian bit stream of ``bits``-wide values (value ``i`` at bits
``i * bits``; 3-, 5- and 6-bit values straddle words), beside ``<m>.scales`` and ``<m>.biases`` ``[out, in / G]``.
The weight is ``scales * q + biases`` per group of ``G`` inputs. Checked against MLX's own ``quantize`` /
``dequantize`` (``tests/data/mlx``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.model.int_quant import replaced, unpack_bits

_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class MlxQuant:
    """An mlx-lm ``quantization`` config: the default width and group, and per-module overrides (None: left
    unquantized)."""

    bits: int
    group_size: int
    overrides: dict[str, tuple[int, int] | None] = field(default_factory=dict)

    def of(self, module: str) -> tuple[int, int] | None:
        """The (bits, group size) of ``module`` (a checkpoint module path)."""
        return self.overrides.get(module, (self.bits, self.group_size))


def _width(v: Any, key: str, where: str, allowed: tuple[int, ...] | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or (allowed is not None and v not in allowed):
        want = f"one of {', '.join(map(str, allowed))}" if allowed is not None else "a positive integer"
        raise ModelError(f"{where}: {key} must be {want}, got {v!r}")
    return v


def mlx_quant(hf_config: Mapping[str, Any], where: str) -> MlxQuant | None:
    """The mlx-lm ``quantization`` of a checkpoint config (None when it has none); a mode or field not read here is
    refused, naming the key."""
    q = hf_config.get("quantization")
    if not isinstance(q, Mapping) or not ("bits" in q or "group_size" in q):
        return None  # (not mlx-lm's: it always writes both)
    mode = q.get("mode", "affine")
    if mode != "affine":
        raise ModelError(f"{where}: quantization.mode {mode!r} is not read (MLX's affine mode is)")
    bits = _width(q.get("bits", 4), "quantization.bits", where, _BITS)
    group = _width(q.get("group_size", 64), "quantization.group_size", where)
    overrides: dict[str, tuple[int, int] | None] = {}
    for key, v in q.items():
        if key in ("bits", "group_size", "mode"):
            continue
        if v is False:
            overrides[key] = None
        elif isinstance(v, Mapping):
            if v.get("mode", mode) != "affine":
                raise ModelError(f"{where}: quantization.{key}.mode {v.get('mode')!r} is not read (affine is)")
            overrides[key] = (_width(v.get("bits", bits), f"quantization.{key}.bits", where, _BITS),
                              _width(v.get("group_size", group), f"quantization.{key}.group_size", where))
        elif v is not True:
            raise ModelError(f"{where}: quantization.{key} must be an object, true or false, got {v!r}")
    return MlxQuant(bits, group, overrides)


def is_mlx_quantized(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(name.endswith(".biases") and name[: -len("biases")] + "scales" in tensors for name in tensors)


def mlx_dequantized(tensors: Mapping[str, torch.Tensor], q: MlxQuant | None, source: str = "checkpoint",
                    dtype: torch.dtype = torch.float32) -> Mapping[str, torch.Tensor]:
    """``tensors`` with every MLX-quantized weight (``<m>.weight`` words beside ``<m>.scales`` / ``<m>.biases``)
    dequantized (in fp32, kept in ``dtype``) and its scales and biases dropped (``tensors`` itself when none is)."""
    if not is_mlx_quantized(tensors):
        return tensors
    if q is None:
        name = next(n for n in tensors if n.endswith(".biases"))
        raise ModelError(f"{source}: {name!r} is an MLX quantization bias, but config.json has no quantization "
                         "(mlx-lm's group_size / bits)")
    out: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    for name in tensors:
        if not (name.endswith(".scales") and name[: -len("scales")] + "biases" in tensors):
            continue
        m = name[: -len(".scales")]
        words, scales, biases = tensors.get(m + ".weight"), tensors[name], tensors[m + ".biases"]
        of = q.of(m)
        if of is None:
            raise ModelError(f"{source}: module {m!r} has MLX scales but quantization.{m} is false")
        bits, group = of
        if words is None or words.dtype not in (torch.uint32, torch.int32) or words.dim() != 2:
            raise ModelError(f"{source}: MLX-quantized module {m!r} needs {m}.weight as uint32 words [out, "
                             f"in * bits / 32], got {None if words is None else (tuple(words.shape), words.dtype)}")
        rows, n_words = words.shape
        n_in = n_words * 32 // bits
        if (n_words * 32) % bits or n_in % group or tuple(scales.shape) != (rows, n_in // group) \
                or tuple(biases.shape) != tuple(scales.shape):
            raise ModelError(f"{source}: MLX-quantized module {m!r}: weight {tuple(words.shape)}, scales "
                             f"{tuple(scales.shape)} and biases {tuple(biases.shape)} do not fit {bits}-bit values in "
                             f"groups of {group} (quantization.bits / group_size)")
        values = unpack_bits(words.view(torch.int32), bits, n_in).float().reshape(rows, n_in // group, group)
        w = values * scales.float().unsqueeze(-1) + biases.float().unsqueeze(-1)
        out[m + ".weight"] = w.reshape(rows, n_in).to(dtype)
        drop.update((name, m + ".biases", m + ".weight"))
    return replaced(tensors, out, drop)
