"""bitsandbytes checkpoints as transformers saves them (``quant_method: bitsandbytes``: the ``-bnb-4bit`` releases
fine-tuners publish, and LLM.int8 ones), dequantized to fp32 at load. Activations run unquantized (LLM.int8's
outlier decomposition of its inputs is not reproduced: the weights are).

- **4-bit** (NF4 or FP4): ``<w>`` holds two 4-bit codes per byte, the first in the high nibble, over the weight
  flattened row-major (any ``bnb_4bit_quant_storage`` dtype, read as its bytes); ``<w>.quant_map`` the 16 code
  values; ``<w>.absmax`` one scale per ``blocksize`` values; ``<w>.quant_state.bitsandbytes__nf4`` (or ``__fp4``) a
  JSON object in bytes: ``quant_type``, ``blocksize``, ``shape``, and with double quantization ``nested_blocksize``
  and ``nested_offset``, where ``absmax`` is itself 8-bit codes into ``<w>.nested_quant_map`` scaled by
  ``<w>.nested_absmax`` per ``nested_blocksize`` scales, plus the offset. The weight is
  ``quant_map[code] * absmax[block]``.
- **8-bit** (LLM.int8, serialized): ``<w>`` int8 ``[out, in]`` beside ``<m>.SCB``, each row's absolute maximum; the
  weight is ``w * SCB / 127``. ``<m>.weight_format`` is dropped.

Both are checked against bitsandbytes' own quantization and dequantization (``tests/data/bnb``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.model.int_quant import replaced

_STATE = ".quant_state.bitsandbytes__"
_4BIT_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def _json_state(name: str, t: torch.Tensor, source: str) -> dict[str, Any]:
    try:
        state = json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{source}: {name!r} is not a bitsandbytes quant state (JSON bytes): {exc}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{source}: {name!r} is not a bitsandbytes quant state (a JSON object)")
    return state


def _int(state: Mapping[str, Any], key: str, name: str, source: str) -> int:
    v = state.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"{source}: {name}: quant state {key!r} must be a positive integer, got {v!r}")
    return v


def _weight_4bit(w: str, state_name: str, tensors: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    state = _json_state(state_name, tensors[state_name], source)
    shape = state.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(x, int) and x > 0 for x in shape):
        raise ModelError(f"{source}: {state_name}: quant state 'shape' must be positive integers, got {shape!r}")
    block = _int(state, "blocksize", state_name, source)
    packed, absmax, qmap = tensors.get(w), tensors.get(w + ".absmax"), tensors.get(w + ".quant_map")
    if packed is None or absmax is None or qmap is None:
        raise ModelError(f"{source}: bitsandbytes 4-bit weight {w!r} needs {w}, {w}.absmax and {w}.quant_map")
    n = 1
    for x in shape:
        n *= x
    codes_bytes = packed.contiguous().view(torch.uint8).reshape(-1)
    n_blocks = -(-n // block)
    if codes_bytes.numel() != -(-n // 2) or qmap.numel() != 16 or absmax.numel() != n_blocks:
        raise ModelError(f"{source}: bitsandbytes 4-bit weight {w!r}: {codes_bytes.numel()} byte(s), "
                         f"{absmax.numel()} absmax and {qmap.numel()} code value(s) do not fit shape {shape} in "
                         f"blocks of {block}")
    codes = torch.stack((codes_bytes >> 4, codes_bytes & 0xF), dim=-1).reshape(-1)[:n].long()
    if "nested_blocksize" in state:
        nested_block = _int(state, "nested_blocksize", state_name, source)
        nmap, nabs = tensors.get(w + ".nested_quant_map"), tensors.get(w + ".nested_absmax")
        offset = state.get("nested_offset", 0.0)
        if nmap is None or nabs is None or isinstance(offset, bool) or not isinstance(offset, (int, float)):
            raise ModelError(f"{source}: bitsandbytes 4-bit weight {w!r} with double quantization needs "
                             f"{w}.nested_quant_map, {w}.nested_absmax and a numeric nested_offset")
        if nmap.numel() != 256 or nabs.numel() != -(-n_blocks // nested_block) or absmax.dtype != torch.uint8:
            raise ModelError(f"{source}: bitsandbytes 4-bit weight {w!r}: nested absmax {nabs.numel()}, nested "
                             f"code values {nmap.numel()} and absmax {absmax.dtype} do not fit {n_blocks} block(s) "
                             f"in nested blocks of {nested_block}")
        scales = nmap.float()[absmax.reshape(-1).long()] \
            * nabs.float().reshape(-1).repeat_interleave(nested_block)[:n_blocks] + float(offset)
    else:
        scales = absmax.float().reshape(-1)
    values = qmap.float().reshape(-1)[codes]
    if n % block == 0:
        out = (values.reshape(n_blocks, block) * scales.unsqueeze(1)).reshape(-1)
    else:
        out = values * scales.repeat_interleave(block)[:n]
    return out.reshape(shape)


def is_bnb(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``tensors`` hold any bitsandbytes-quantized weight."""
    return any(_STATE in name or name.endswith(".SCB") for name in tensors)


def bnb_dequantized(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint",
                    dtype: torch.dtype = torch.float32) -> Mapping[str, torch.Tensor]:
    """``tensors`` with every bitsandbytes 4-bit or 8-bit weight dequantized (in fp32, kept in ``dtype``) under its
    own name and its statistics dropped (``tensors`` itself when it holds none)."""
    if not is_bnb(tensors):
        return tensors
    out: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    for name in tensors:
        if _STATE in name:
            w = name.split(_STATE)[0]
            out[w] = _weight_4bit(w, name, tensors, source).to(dtype)
            drop.update([name, *(w + p for p in _4BIT_PARTS)])
        elif name.endswith(".SCB"):
            m = name[: -len(".SCB")]
            w8 = tensors.get(m + ".weight")
            scb = tensors[name].float().reshape(-1)
            if w8 is None or w8.dtype != torch.int8 or w8.dim() != 2 or w8.shape[0] != scb.numel():
                raise ModelError(f"{source}: bitsandbytes 8-bit {name!r} ({scb.numel()} rows) needs the int8 weight "
                                 f"{m}.weight [rows, in], got {None if w8 is None else (tuple(w8.shape), w8.dtype)}")
            out[m + ".weight"] = (w8.float() * (scb / 127.0).unsqueeze(1)).to(dtype)
            drop.update([name, m + ".weight_format"])
    return replaced(tensors, out, drop)


def check_bnb_config(q: Mapping[str, Any], where: str) -> None:
    """Refuse, by key, a bitsandbytes config whose weights are not read here."""
    four, eight = bool(q.get("load_in_4bit") or q.get("_load_in_4bit")), \
        bool(q.get("load_in_8bit") or q.get("_load_in_8bit"))
    if not four and not eight:
        raise ModelError(f"{where}: quantization_config (bitsandbytes) sets neither load_in_4bit nor load_in_8bit")
    kind = q.get("bnb_4bit_quant_type", "fp4")
    if four and kind not in ("nf4", "fp4"):
        raise ModelError(f"{where}: quantization_config.bnb_4bit_quant_type {kind!r} is not read (nf4 and fp4 are)")
