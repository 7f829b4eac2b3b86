"""Argument checks shared by the Triton launchers: every failure is a :class:`KernelError` naming the argument."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dualpath.errors import KernelError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int32, torch.int64)


def check_window(window: object, name: str = "window") -> int | None:
    """A sliding attention window (or, ``name`` ``chunk``, an attention chunk): a positive int, or None."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise KernelError(f"{name} must be a positive int or None, got {window!r}")
    return window


def check_sinks(sinks: object, n_heads: int, device: torch.device, name: str = "sinks") -> torch.Tensor | None:
    """Attention sinks (or ALiBi slopes, ``name`` ``alibi``): a float tensor ``[n_heads]`` (one per query head) on
    ``device``, or None."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor or None, got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != n_heads:
        raise KernelError(f"{name} has shape {tuple(sinks.shape)}, expected [{n_heads}] (one per query head)")
    if not sinks.is_floating_point():
        raise KernelError(f"{name} has dtype {sinks.dtype}, expected a float dtype")
    if sinks.device != device:
        raise KernelError(f"{name} is on {sinks.device}, expected {device} (all tensors on one device)")
    return sinks


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(name: str, t: object, *, dim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, last_contiguous: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise KernelError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise KernelError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise KernelError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if device is None and t.device.type != "cuda" and not interpreting():
        raise KernelError(f"{name} is on {t.device}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if last_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelError(f"{name} must be contiguous in its last dimension (strides {t.stride()})")
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape, strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise KernelError(f"{name} has shape {tuple(t.shape)}, expected [{want}]")


def check_kv_layer(kv_layer: object) -> torch.Tensor:
    t = check_tensor("kv_layer", kv_layer, dim=5, dtypes=FLOAT_DTYPES, last_contiguous=True)
    if t.shape[2] != 2:
        raise KernelError(f"kv_layer must be [num_blocks, block_tokens, 2, n_kv_heads, head_dim], got {tuple(t.shape)}")
    return t


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
