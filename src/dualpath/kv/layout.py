"""How KV bytes are laid out in blocks.

A *Full Block* holds all layers of ``block_tokens`` consecutive tokens: a byte tensor of shape
``[n_layers, block_tokens, bytes_per_token_layer]``; it is the unit of storage I/O. A *Layer Block* is one
layer of it, ``[1, block_tokens, bytes_per_token_layer]``; it is the unit of streaming between engines.
Concatenating the Layer Blocks of a block gives its Full Block byte for byte, so Layer Block ``l`` of a Full
Block buffer is a view (``full[l:l+1]``), never a copy.

Inside a Layer Block, each token's row is the model's per-layer cache entry:

* ``mha`` (Llama/Qwen GQA): ``[2, n_kv_heads, head_dim]`` elements of ``dtype``: K then V;
* ``mla`` (DeepSeek): one latent vector of ``kv_lora_rank + rope_dim`` values, plus optional extra bytes per
  token (e.g. FP8 scales or the DSA indexer key) given by ``extra_bytes``; ``bytes_per_elem`` can be set
  explicitly for packed formats.

So for ``mha`` a Layer Block reinterpreted as ``dtype`` has shape ``[block_tokens, 2, n_kv_heads, head_dim]``
and the paged KV pool can store Layer Blocks as its pages with no layout conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "uint8": torch.uint8,
}


def dtype_from_name(name: str) -> torch.dtype:
    """Return the torch dtype for a config name (``float32``, ``bfloat16``, ...)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


@dataclass(frozen=True, slots=True)
class KVSpec:
    """What a model stores per token per layer. Build it with :meth:`mha` or :meth:`mla`."""

    n_layers: int
    attention: Literal["mha", "mla"]
    dtype: str
    n_kv_heads: int = 0
    head_dim: int = 0
    latent_dim: int = 0
    extra_bytes: int = 0

    @classmethod
    def mha(cls, n_layers: int, n_kv_heads: int, head_dim: int, dtype: str = "bfloat16") -> KVSpec:
        spec = cls(n_layers=n_layers, attention="mha", dtype=dtype, n_kv_heads=n_kv_heads, head_dim=head_dim)
        spec.validate()
        return spec

    @classmethod
    def mla(cls, n_layers: int, latent_dim: int, dtype: str = "bfloat16", extra_bytes: int = 0) -> KVSpec:
        spec = cls(n_layers=n_layers, attention="mla", dtype=dtype, latent_dim=latent_dim, extra_bytes=extra_bytes)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.n_layers <= 0:
            raise ValueError(f"n_layers must be positive, got {self.n_layers}")
        dtype_from_name(self.dtype)
        if self.attention == "mha":
            if self.n_kv_heads <= 0 or self.head_dim <= 0:
                raise ValueError("mha KV needs positive n_kv_heads and head_dim")
        elif self.attention == "mla":
            if self.latent_dim <= 0:
                raise ValueError("mla KV needs a positive latent_dim")
        else:  # pragma: no cover - guarded by Literal
            raise ValueError(f"unknown attention kind {self.attention!r}")
        if self.extra_bytes < 0:
            raise ValueError("extra_bytes must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_token_layer(self) -> int:
        if self.attention == "mha":
            return 2 * self.n_kv_heads * self.head_dim * self.elem_bytes + self.extra_bytes
        return self.latent_dim * self.elem_bytes + self.extra_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_layer * self.n_layers

    def fingerprint(self) -> str:
        """A stable text that changes whenever the per-token layout changes."""
        return (
            f"{self.attention}:L{self.n_layers}:H{self.n_kv_heads}:D{self.head_dim}:"
            f"Z{self.latent_dim}:X{self.extra_bytes}:{self.dtype}"
        )


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Full/Layer Block shapes for a :class:`KVSpec` and a block size, and zero-copy views over buffers."""

    spec: KVSpec
    block_tokens: int = 64

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    @property
    def bytes_per_token_layer(self) -> int:
        return self.spec.bytes_per_token_layer

    @property
    def full_block_shape(self) -> tuple[int, int, int]:
        return (self.spec.n_layers, self.block_tokens, self.spec.bytes_per_token_layer)

    @property
    def layer_block_shape(self) -> tuple[int, int, int]:
        return (1, self.block_tokens, self.spec.bytes_per_token_layer)

    @property
    def layer_block_bytes(self) -> int:
        return self.block_tokens * self.spec.bytes_per_token_layer

    @property
    def full_block_bytes(self) -> int:
        return self.spec.n_layers * self.layer_block_bytes

    def blocks_for(self, n_tokens: int) -> int:
        """Number of *full* blocks in ``n_tokens`` tokens (a partial tail block is not a Full Block)."""
        return n_tokens // self.block_tokens

    def alloc_full_blocks(self, n_blocks: int, device: str | torch.device = "cpu", pin: bool = False) -> torch.Tensor:
        """A uint8 buffer ``[n_blocks, n_layers, block_tokens, bytes]`` to receive Full Blocks."""
        buf = torch.empty((n_blocks, *self.full_block_shape), dtype=torch.uint8, device=device)
        return buf.pin_memory() if pin and buf.device.type == "cpu" and torch.cuda.is_available() else buf

    def check_full_block(self, buf: torch.Tensor) -> None:
        if buf.dtype != torch.uint8 or tuple(buf.shape[-3:]) != self.full_block_shape:
            raise ValueError(
                f"expected a uint8 Full Block buffer [..., {', '.join(map(str, self.full_block_shape))}], "
                f"got {tuple(buf.shape)} {buf.dtype}"
            )

    def layer_view(self, full_block: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer Block ``layer`` of one Full Block buffer ``[n_layers, T, bytes]``: a view, never a copy."""
        self.check_full_block(full_block)
        if not 0 <= layer < self.spec.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.spec.n_layers})")
        return full_block[..., layer : layer + 1, :, :]

    def as_kv(self, layer_block: torch.Tensor) -> torch.Tensor:
        """Reinterpret an ``mha`` Layer Block (or any ``[..., T, bytes]`` rows) as ``[..., T, 2, H, D]`` of dtype."""
        if self.spec.attention != "mha" or self.spec.extra_bytes:
            raise ValueError("as_kv is defined for mha layouts without extra bytes")
        if layer_block.dtype != torch.uint8 or layer_block.shape[-1] != self.spec.bytes_per_token_layer:
            raise ValueError(f"expected uint8 rows of {self.spec.bytes_per_token_layer} bytes")
        typed = layer_block.view(self.spec.torch_dtype)
        return typed.view(*typed.shape[:-1], 2, self.spec.n_kv_heads, self.spec.head_dim)
