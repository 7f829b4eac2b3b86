"""Integer weight-only checkpoints as the hub publishes them, dequantized at load: GPTQ (AutoGPTQ and GPTQModel,
``quant_method: gptq``), AWQ (AutoAWQ's GEMM layout, ``quant_method: awq``) and compressed-tensors'
``pack-quantized`` weights of 1 to 8 bits, symmetric or with zero points (llm-compressor's W4A16, W4A16_ASYM, W8A16
and Kimi K2's INT4 experts). Activations run unquantized, as vLLM runs these weights without an integer kernel.

Every layout below is a little-endian bit stream of ``bits``-wide unsigned values packed into int32 words (value
``i`` at bits ``i * bits`` of the stream; 3-bit values straddle words), read by :func:`unpack_bits`:

- **GPTQ**: ``<m>.qweight`` ``[in * bits / 32, out]``, each column's inputs one stream; ``<m>.qzeros``
  ``[groups, out * bits / 32]``, each group's zero points one stream over the outputs; ``<m>.scales``
  ``[groups, out]``; ``<m>.g_idx`` ``[in]``, each input's group (act-order checkpoints permute it; without it input
  ``i`` is in group ``i // group_size``). The weight is ``scales[g] * (q - z[g])``, where the original format
  (``checkpoint_format: gptq``, "v1") stores ``z - 1`` and GPTQModel's ``gptq_v2`` stores ``z``. GPTQModel's
  per-module ``dynamic`` overrides (other widths or groups per module) are read from each module's ``g_idx``.
- **AWQ** (GEMM): ``qweight`` ``[in, out / 8]``, 8 outputs per word in the order 0, 2, 4, 6, 1, 3, 5, 7;
  ``qzeros`` ``[groups, out / 8]`` likewise; ``scales`` ``[groups, out]``; the weight is ``scales * (q - z)``, or
  ``scales * (q - 8)`` without zero points (``zero_point: false``).
- **compressed-tensors** ``pack-quantized``: ``<w>_packed`` ``[out, ceil(in * bits / 32)]``, each row one stream of
  values offset by ``2^(bits-1)``; ``<w>_scale`` one per tensor, row or group (``[out, groups]``); ``<w>_shape``;
  an asymmetric weight's ``<w>_zero_point`` ``[ceil(out * bits / 32), groups]``, each group's column one stream
  over the outputs; ``<w>_g_idx`` (activation order), each input's group. The weight is ``scale * (q - zero)``.

A module is dequantized to the layout its unquantized checkpoint holds: ``[out, in]`` for ``nn.Linear`` and
``[in, out]`` for GPT-2's ``Conv1D`` (``conv1d=True``). Shapes that do not fit each other are refused, naming the
tensor; formats not read here (GPTQ's Marlin or BitBLAS repacks, AWQ's GEMV layouts) are refused by key."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dualpath.errors import ModelError

#: GPTQ checkpoint formats read here: the original one (zeros stored minus one) and GPTQModel's v2
GPTQ_FORMATS = ("gptq", "gptq_v2")
#: AWQ versions whose checkpoints hold AutoAWQ's GEMM layout (``exllama`` and ``ipex`` are kernels run on it)
AWQ_VERSIONS = ("gemm", "exllama", "ipex")
#: the column order within an AWQ word: output ``8w + m`` is value ``_AWQ_SLOT[m]`` of word ``w``
_AWQ_SLOT = (0, 4, 1, 5, 2, 6, 3, 7)
_CT_PARTS = ("_packed", "_scale", "_shape", "_zero_point", "_g_idx")


@dataclass(frozen=True)
class IntQuant:
    """A checkpoint's integer weight format, read from its ``quantization_config``."""

    method: str                 # "gptq", "awq" or "compressed-tensors"
    bits: tuple[int, ...]       # the widths its config names (GPTQModel's ``dynamic`` may add others per module)
    group_size: int = -1        # -1: one group per output (per channel)
    v1_zeros: bool = True       # GPTQ: zeros stored minus one
    zero_point: bool = True     # AWQ: zero points stored


def _int_field(q: Mapping[str, Any], key: str, where: str, default: int, allowed: tuple[int, ...] | None = None) -> int:
    v = q.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or (allowed is not None and v not in allowed):
        want = f"one of {', '.join(map(str, allowed))}" if allowed is not None else "an integer"
        raise ModelError(f"{where}: quantization_config.{key} must be {want}, got {v!r}")
    return v


def int_quant(hf_config: Mapping[str, Any], where: str) -> IntQuant | None:
    """The integer weight format of a checkpoint config (None when it has none), or a :class:`ModelError` naming
    the ``quantization_config`` key whose value is not read here."""
    q = hf_config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise ModelError(f"{where}: quantization_config.checkpoint_format {fmt!r} is not supported for GPTQ "
                             f"(its {', '.join(GPTQ_FORMATS)} layouts are; a Marlin or BitBLAS repack is not)")
        bits = _int_field(q, "bits", where, 4, (2, 3, 4, 8))
        group = _int_field(q, "group_size", where, 128)
        if group == 0 or group < -1:
            raise ModelError(f"{where}: quantization_config.group_size must be positive or -1, got {group}")
        return IntQuant("gptq", (bits,), group, v1_zeros=fmt == "gptq")
    if method == "awq":
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version not in AWQ_VERSIONS:
            raise ModelError(f"{where}: quantization_config.version {version!r} is not supported for AWQ (the GEMM "
                             f"layout is, as {', '.join(AWQ_VERSIONS)} checkpoints hold it)")
        backend = str(q.get("backend") or "autoawq").lower()
        if backend != "autoawq":
            raise ModelError(f"{where}: quantization_config.backend {backend!r} is not supported for AWQ (AutoAWQ's "
                             "layout is)")
        bits = _int_field(q, "bits", where, _int_field(q, "w_bit", where, 4), (4,))
        group = _int_field(q, "group_size", where, _int_field(q, "q_group_size", where, 128))
        if group == 0 or group < -1:
            raise ModelError(f"{where}: quantization_config.group_size must be positive or -1, got {group}")
        zp = q.get("zero_point", True)
        if not isinstance(zp, bool):
            raise ModelError(f"{where}: quantization_config.zero_point must be true or false, got {zp!r}")
        return IntQuant("awq", (bits,), group, zero_point=zp)
    if method == "compressed-tensors":
        widths: set[int] = set()
        groups = q.get("config_groups")
        for name, group_cfg in (groups.items() if isinstance(groups, Mapping) else ()):
            if not isinstance(group_cfg, Mapping):
                continue
            w = group_cfg.get("weights")
            group_fmt = group_cfg.get("format") or q.get("format")
            if group_fmt == "pack-quantized" and isinstance(w, Mapping):
                b = w.get("num_bits", 4)
                if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
                    raise ModelError(f"{where}: quantization_config.config_groups.{name}.weights.num_bits must be "
                                     f"1 to 8 for pack-quantized weights, got {b!r}")
                widths.add(b)
        return IntQuant("compressed-tensors", tuple(sorted(widths)) or (4,))
    return None


# --- bit streams -----------------------------------------------------------------------------------------------


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` unsigned ``bits``-wide values (int32) of the little-endian bit stream each row of the int32
    ``words`` (``[..., W]``) holds: value ``i`` at bits ``i * bits .. i * bits + bits - 1``."""
    if words.dtype != torch.int32:
        raise ModelError(f"packed weights must be int32 words, got {words.dtype}")
    if not 1 <= bits <= 8 or n * bits > words.shape[-1] * 32:
        raise ModelError(f"{words.shape[-1]} int32 word(s) cannot hold {n} {bits}-bit values")
    mask = (1 << bits) - 1
    if bits in (1, 2, 4, 8) and sys.byteorder == "little":  # (no value straddles a byte)
        b = words.contiguous().view(torch.uint8)                                          # [..., 4W]
        if bits == 8:
            return b[..., :n].to(torch.int32)
        vals = (b.unsqueeze(-1) >> torch.arange(0, 8, bits, dtype=torch.uint8)) & mask  # [..., 4W, 8 / bits]
        return vals.reshape(*words.shape[:-1], -1)[..., :n].to(torch.int32)
    w = words.to(torch.int64) & 0xFFFFFFFF
    pair = w | (torch.cat((w[..., 1:], torch.zeros_like(w[..., :1])), dim=-1) << 32)   # word k and k + 1
    pos = torch.arange(n, dtype=torch.int64) * bits
    return ((pair[..., pos // 32] >> (pos % 32)) & mask).to(torch.int32)


def _groups_of(g_idx: torch.Tensor | None, n_in: int, n_groups: int, group_size: int, name: str,
               source: str) -> torch.Tensor:
    """Each input's group: ``g_idx`` as stored, else consecutive runs of ``group_size`` (one run: -1)."""
    if g_idx is not None:
        g = g_idx.to(torch.int64).reshape(-1)
        if g.numel() != n_in or (n_in and (int(g.min()) < 0 or int(g.max()) >= n_groups)):
            raise ModelError(f"{source}: {name}: g_idx of {g.numel()} input(s) with groups "
                             f"{[int(g.min()), int(g.max())] if g.numel() else []} does not fit {n_in} inputs in "
                             f"{n_groups} group(s)")
        return g
    size = n_in if group_size == -1 else group_size
    if -(-n_in // size) != n_groups:
        raise ModelError(f"{source}: {name}: {n_groups} group(s) of scales do not fit {n_in} inputs in groups of "
                         f"{size} (quantization_config.group_size)")
    return torch.arange(n_in, dtype=torch.int64) // size


def _grouped(values: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``(values - zeros[:, g]) * scales[:, g]`` in fp32: ``values`` ``[out, in]``, ``zeros`` / ``scales``
    ``[out, groups]``, ``g`` each input's group (broadcast over equal runs without gathering when ``g`` is them)."""
    rows, cols = values.shape
    n_groups = scales.shape[1]
    if cols % n_groups == 0 and torch.equal(g, torch.arange(cols, dtype=torch.int64) // (cols // n_groups)):
        v = values.reshape(rows, n_groups, cols // n_groups).float()
        if zeros is not None:
            v = v - zeros.float().unsqueeze(-1)
        return (v * scales.float().unsqueeze(-1)).reshape(rows, cols)
    v = values if zeros is None else values - zeros[:, g]
    return v.float() * scales.float()[:, g]


# --- GPTQ --------------------------------------------------------------------------------------------------------


def _gptq_weight(m: str, tensors: Mapping[str, torch.Tensor], q: IntQuant, source: str) -> torch.Tensor:
    qweight, qzeros, scales = tensors[m + ".qweight"], tensors.get(m + ".qzeros"), tensors.get(m + ".scales")
    g_idx = tensors.get(m + ".g_idx")
    if qzeros is None or scales is None:
        raise ModelError(f"{source}: GPTQ tensor {m}.qweight needs {m}.qzeros and {m}.scales")
    if qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2 or scales.shape[1] != qweight.shape[1]:
        raise ModelError(f"{source}: GPTQ module {m!r}: qweight {tuple(qweight.shape)}, qzeros "
                         f"{tuple(qzeros.shape)} and scales {tuple(scales.shape)} do not fit each other")
    rows, n_out = qweight.shape
    if g_idx is not None and g_idx.numel() > 0 and (rows * 32) % g_idx.numel() == 0:
        bits = rows * 32 // g_idx.numel()  # (GPTQModel's per-module widths: the inputs are g_idx's length)
    else:
        bits = q.bits[0]
    if bits not in (2, 3, 4, 8) or (rows * 32) % bits:
        raise ModelError(f"{source}: GPTQ module {m!r}: qweight {tuple(qweight.shape)} holds no whole number of "
                         f"{bits}-bit inputs (quantization_config.bits)")
    n_in, n_groups = rows * 32 // bits, scales.shape[0]
    if qzeros.shape != (n_groups, -(-n_out * bits // 32)):
        raise ModelError(f"{source}: GPTQ module {m!r}: qzeros {tuple(qzeros.shape)} does not fit {n_groups} "
                         f"group(s) of {n_out} {bits}-bit zero points")
    values = unpack_bits(qweight.t(), bits, n_in)                          # [out, in]
    zeros = unpack_bits(qzeros, bits, n_out)                                # [groups, out]
    if q.v1_zeros:
        zeros = zeros + 1
    g = _groups_of(g_idx, n_in, n_groups, q.group_size, m, source)
    return _grouped(values, zeros.t(), scales.t(), g)                      # [out, in]


# --- AWQ -----------------------------------------------------------------------------------------------------------


def _awq_weight(m: str, tensors: Mapping[str, torch.Tensor], q: IntQuant, source: str) -> torch.Tensor:
    qweight, qzeros, scales = tensors[m + ".qweight"], tensors.get(m + ".qzeros"), tensors.get(m + ".scales")
    if scales is None or (q.zero_point and qzeros is None):
        need = f"{m}.qzeros and {m}.scales" if q.zero_point else f"{m}.scales"
        raise ModelError(f"{source}: AWQ tensor {m}.qweight needs {need}")
    n_in, words = qweight.shape if qweight.dim() == 2 else (0, 0)
    n_out = words * 8
    if qweight.dim() != 2 or scales.dim() != 2 or scales.shape[1] != n_out or \
            (qzeros is not None and tuple(qzeros.shape) != (scales.shape[0], words)):
        raise ModelError(f"{source}: AWQ module {m!r}: qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)} and qzeros {None if qzeros is None else tuple(qzeros.shape)} do not "
                         "fit the GEMM layout ([in, out / 8], [groups, out], [groups, out / 8])")
    order = (torch.arange(words).unsqueeze(1) * 8 + torch.tensor(_AWQ_SLOT)).reshape(-1)
    values = unpack_bits(qweight, 4, n_out)[:, order]                      # [in, out]
    zeros = unpack_bits(qzeros, 4, n_out)[:, order] if qzeros is not None and q.zero_point else \
        torch.full((scales.shape[0], n_out), 8, dtype=torch.int32)
    g = _groups_of(None, n_in, scales.shape[0], q.group_size, m, source)
    return _grouped(values.t(), zeros.t(), scales.t(), g)                  # [out, in]


# --- compressed-tensors pack-quantized ----------------------------------------------------------------------------


def _packed_bits(name: str, cols: int, words: int, widths: tuple[int, ...], source: str) -> int:
    fits = [b for b in widths if -(-cols * b // 32) == words]
    if len(fits) != 1:
        raise ModelError(f"{source}: packed tensor {name!r} has {words} word(s) per row for {cols} inputs, which "
                         f"{'no' if not fits else 'more than one'} width of {list(widths)} bits fits "
                         "(quantization_config.config_groups.*.weights.num_bits)")
    return fits[0]


def _ct_weight(base: str, tensors: Mapping[str, torch.Tensor], widths: tuple[int, ...],
               source: str) -> torch.Tensor:
    packed, scale, shape = tensors[base + "_packed"], tensors.get(base + "_scale"), tensors.get(base + "_shape")
    zp, g_idx = tensors.get(base + "_zero_point"), tensors.get(base + "_g_idx")
    if scale is None or shape is None:
        raise ModelError(f"{source}: packed tensor {base}_packed needs {base}_scale and {base}_shape")
    dims = [int(x) for x in shape.reshape(-1).tolist()]
    if packed.dtype != torch.int32 or packed.dim() != len(dims) or len(dims) not in (2, 3) \
            or tuple(packed.shape[:-1]) != tuple(dims[:-1]):
        raise ModelError(f"{source}: packed tensor {base + '_packed'!r} {tuple(packed.shape)} {packed.dtype} does not "
                         f"fit {base}_shape {dims}")
    if len(dims) == 3:  # (MoE experts stacked: each a 2D weight)
        sub = {"_packed": packed, "_scale": scale, "_shape": torch.tensor(dims[1:]), "_zero_point": zp,
               "_g_idx": g_idx}
        return torch.stack([_ct_weight(base, {base + k: (v if k == "_shape" or v is None else v[e])
                                              for k, v in sub.items() if v is not None}, widths, source)
                            for e in range(dims[0])])
    rows, cols = dims
    bits = _packed_bits(base + "_packed", cols, packed.shape[1], widths, source)
    offset = 1 << (bits - 1)
    values = unpack_bits(packed, bits, cols) - offset                      # [out, in], signed
    s = scale.float()
    if s.numel() == 1:
        s = s.reshape(1, 1).expand(rows, 1)
    if s.dim() != 2 or s.shape[0] != rows or not 0 < s.shape[1] <= cols:
        raise ModelError(f"{source}: {base}_scale {tuple(scale.shape)} fits neither a tensor, a row nor groups of "
                         f"{base}_shape {dims}")
    n_groups = s.shape[1]
    if g_idx is not None:
        g = _groups_of(g_idx, cols, n_groups, -1, base + "_g_idx", source)
    else:
        g = torch.arange(cols, dtype=torch.int64) // -(-cols // n_groups)
    z: torch.Tensor | None = None
    if zp is not None:
        if zp.dtype == torch.int32 and zp.dim() == 2 and zp.shape[0] == -(-rows * bits // 32) \
                and zp.shape[1] == n_groups:
            z = unpack_bits(zp.t().contiguous(), bits, rows).t() - offset  # [out, groups]
        elif zp.numel() == rows * n_groups and zp.dtype in (torch.int8, torch.int32):
            z = zp.reshape(rows, n_groups).to(torch.int32)
        elif zp.numel() == 1:
            z = zp.reshape(1, 1).to(torch.int32).expand(rows, n_groups)
        else:
            raise ModelError(f"{source}: {base}_zero_point {tuple(zp.shape)} {zp.dtype} does not fit {rows} rows in "
                             f"{n_groups} group(s) of {bits}-bit zero points")
    return _grouped(values, z, s, g)


# --- the entry point -----------------------------------------------------------------------------------------------


def dequantized(tensors: Mapping[str, torch.Tensor], q: IntQuant | None, source: str = "checkpoint",
                conv1d: bool = False, dtype: torch.dtype = torch.float32) -> Mapping[str, torch.Tensor]:
    """``tensors`` with every GPTQ, AWQ or compressed-tensors packed weight replaced by its dequantization (computed
    in fp32, kept in ``dtype``: the model's, so that the host holds one weight in fp32 at a time) under the
    module's plain ``.weight`` name (``tensors`` itself when it holds none). Without a config (``q`` None) packed
    compressed-tensors weights are read as 4-bit, Kimi K2's width. ``conv1d``: the modules are GPT-2's ``Conv1D``
    (weights stored ``[in, out]``)."""
    has_q = any(name.endswith(".qweight") for name in tensors)
    has_ct = any(name.endswith(".weight_packed") and t.dtype == torch.int32 for name, t in tensors.items())
    if not has_q and not has_ct:
        return tensors
    if sys.byteorder != "little":  # pragma: no cover - no big-endian host here
        raise ModelError(f"{source}: packed integer weights are read on little-endian hosts only")
    if has_q and (q is None or q.method not in ("gptq", "awq")):
        name = next(n for n in tensors if n.endswith(".qweight"))
        raise ModelError(f"{source}: tensor {name!r} is a GPTQ / AWQ packed weight, but the config's "
                         "quantization_config.quant_method is neither gptq nor awq")
    out: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    for name in tensors:
        if name.endswith(".qweight"):
            m = name[: -len(".qweight")]
            assert q is not None
            w = _gptq_weight(m, tensors, q, source) if q.method == "gptq" else _awq_weight(m, tensors, q, source)
            out[m + ".weight"] = (w.t().contiguous() if conv1d else w).to(dtype)
            drop.update(m + s for s in (".qweight", ".qzeros", ".scales", ".g_idx"))
        elif name.endswith(".weight_packed") and tensors[name].dtype == torch.int32:
            base = name[: -len("_packed")]
            widths = q.bits if q is not None and q.method == "compressed-tensors" else (4,)
            out[base] = _ct_weight(base, tensors, widths, source).to(dtype)
            drop.update(base + p for p in _CT_PARTS)
    return replaced(tensors, out, drop)


def replaced(tensors: Mapping[str, torch.Tensor], new: dict[str, torch.Tensor], drop: set[str],
             also_drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``new`` plus every tensor of ``tensors`` it does not replace, but those named in ``drop`` or ending with one
    of ``also_drop`` (a dequantizer's result: the weights it made, the checkpoint's others as they are)."""
    for name, t in tensors.items():
        if name not in drop and name not in new and not (also_drop and name.endswith(also_drop)):
            new[name] = t
    return new
