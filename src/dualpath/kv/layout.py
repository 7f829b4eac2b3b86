"""How KV bytes are laid out in blocks.

A *Full Block* holds all layers of ``block_tokens`` consecutive tokens: a byte tensor of shape
``[n_layers, block_tokens, bytes_per_token_layer]``; it is the unit of storage I/O. A *Layer Block* is one
layer of it, ``[1, block_tokens, bytes_per_token_layer]``; it is the unit of streaming between engines.
Concatenating the Layer Blocks of a block gives its Full Block byte for byte, so Layer Block ``l`` of a Full
Block buffer is a view (``full[l:l+1]``), never a copy.

Inside a Layer Block, each token's row is the model's per-layer cache entry:

* ``mha`` (Llama/Qwen GQA): ``[2, n_kv_heads, head_dim]`` elements of ``dtype``: K then V;
* ``mla`` (DeepSeek): one latent vector of ``kv_lora_rank + rope_dim`` values (the normalized latent, then the
  RoPE'd key part) of ``dtype``, plus optional extra bytes per token (e.g. the DSA indexer key) given by
  ``extra_bytes``;
* ``mla`` with ``latent_format="fp8"`` (:meth:`KVSpec.mla_fp8`, FlashMLA's "FP8 with scale" format): per token
  ``kv_lora_rank`` float8_e4m3fn bytes, one fp32 scale per 128 latent values, then ``rope_dim`` bfloat16 RoPE
  values: 512 + 16 + 128 = 656 bytes for DeepSeek-V3's 512 + 64 dims. Its ``dtype`` is ``uint8``.

So for ``mha`` a Layer Block reinterpreted as ``dtype`` has shape ``[block_tokens, 2, n_kv_heads, head_dim]``
and the paged KV pool can store Layer Blocks as its pages with no layout conversion.

``state_pages`` (hybrid models: Qwen3.5, Qwen3-Next; with ``mla`` rows, Kimi Linear): some layers keep a recurrent
state instead of per-token KV.
Such a layer's page holds the state after the last token written in its block (:mod:`dualpath.model.gated_delta`),
so a Full Block carries the state at its end, and a page is only meaningful whole: what moves between engines
moves whole pages (``Turn.ship_ranges``).
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


FP8_TILE = 128  # latent values per fp32 scale in the FP8 latent format


def fp8_latent_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one FP8 latent row: fp8 latent, fp32 scales (one per 128 values), bf16 RoPE part."""
    return kv_lora_rank + 4 * (kv_lora_rank // FP8_TILE) + 2 * rope_dim


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
    rope_dim: int = 0
    latent_format: str = ""  # "" (plain ``dtype`` values) or "fp8" (656-byte FlashMLA rows for 512 + 64)
    state_pages: bool = False  # some layers' pages hold a recurrent state, not rows (module docstring)

    @classmethod
    def mha(cls, n_layers: int, n_kv_heads: int, head_dim: int, dtype: str = "bfloat16",
            state_pages: bool = False) -> KVSpec:
        spec = cls(n_layers=n_layers, attention="mha", dtype=dtype, n_kv_heads=n_kv_heads, head_dim=head_dim,
                   state_pages=state_pages)
        spec.validate()
        return spec

    @classmethod
    def mla(cls, n_layers: int, latent_dim: int, dtype: str = "bfloat16", extra_bytes: int = 0,
            rope_dim: int = 0, state_pages: bool = False) -> KVSpec:
        spec = cls(n_layers=n_layers, attention="mla", dtype=dtype, latent_dim=latent_dim, extra_bytes=extra_bytes,
                   rope_dim=rope_dim, state_pages=state_pages)
        spec.validate()
        return spec

    @classmethod
    def mla_fp8(cls, n_layers: int, kv_lora_rank: int = 512, rope_dim: int = 64, extra_bytes: int = 0) -> KVSpec:
        """FlashMLA's FP8 latent rows: ``kv_lora_rank`` fp8 values, one fp32 scale per 128, ``rope_dim`` bf16."""
        spec = cls(n_layers=n_layers, attention="mla", dtype="uint8", latent_dim=kv_lora_rank + rope_dim,
                   extra_bytes=extra_bytes, rope_dim=rope_dim, latent_format="fp8")
        spec.validate()
        return spec

    @property
    def kv_lora_rank(self) -> int:
        """Width of the (non-RoPE) latent part of an ``mla`` row."""
        return self.latent_dim - self.rope_dim

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
            if not 0 <= self.rope_dim < self.latent_dim:
                raise ValueError(f"mla rope_dim {self.rope_dim} must be in [0, latent_dim={self.latent_dim})")
            if self.latent_format not in ("", "fp8"):
                raise ValueError(f"unknown mla latent_format {self.latent_format!r}; expected '' or 'fp8'")
            if self.latent_format == "fp8":
                if self.kv_lora_rank % FP8_TILE:
                    raise ValueError(f"fp8 latent KV needs kv_lora_rank divisible by {FP8_TILE}, got {self.kv_lora_rank}")
                if self.dtype != "uint8":
                    raise ValueError("fp8 latent KV rows are stored as uint8")
        else:  # pragma: no cover - guarded by Literal
            raise ValueError(f"unknown attention kind {self.attention!r}")
        if self.extra_bytes < 0:
            raise ValueError("extra_bytes must be >= 0")
        if self.attention == "mla" and self.latent_format == "" and self.extra_bytes % self.elem_bytes:
            raise ValueError(f"mla extra_bytes ({self.extra_bytes}) must be whole {self.dtype} values")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def elem_bytes(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def bytes_per_token_layer(self) -> int:
        if self.attention == "mha":
            return 2 * self.n_kv_heads * self.head_dim * self.elem_bytes + self.extra_bytes
        if self.latent_format == "fp8":
            return fp8_latent_row_bytes(self.kv_lora_rank, self.rope_dim) + self.extra_bytes
        return self.latent_dim * self.elem_bytes + self.extra_bytes

    @property
    def row_elems(self) -> int:
        """Elements of ``torch_dtype`` per token row (``[2, H, D]`` flattened for mha; an mla row's ``extra_bytes``
        included, as ``dtype`` values after the latent)."""
        if self.attention == "mha":
            return 2 * self.n_kv_heads * self.head_dim
        if self.latent_format == "fp8":
            return self.bytes_per_token_layer
        return self.latent_dim + self.extra_bytes // self.elem_bytes

    def mha_equivalent_bytes_per_token_layer(self, n_heads: int, qk_head_dim: int, v_head_dim: int,
                                             dtype: str = "bfloat16") -> int:
        """What the same attention would store per token and layer as plain multi-head K and V."""
        return n_heads * (qk_head_dim + v_head_dim) * torch.empty((), dtype=dtype_from_name(dtype)).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_layer * self.n_layers

    def fingerprint(self) -> str:
        """A stable text that changes whenever the per-token layout changes."""
        return (
            f"{self.attention}:L{self.n_layers}:H{self.n_kv_heads}:D{self.head_dim}:"
            f"Z{self.latent_dim}:X{self.extra_bytes}:{self.dtype}"
            + (f":R{self.rope_dim}:{self.latent_format}" if self.latent_format or self.rope_dim else "")
            + (":state-pages" if self.state_pages else "")
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

    @property
    def page_shape(self) -> tuple[int, ...]:
        """One page (Layer Block) of the paged pool, typed: ``[bt, 2, H, D]`` (mha), ``[bt, latent_dim]`` (mla)
        or ``[bt, row_bytes]`` uint8 (mla fp8)."""
        s = self.spec
        if s.attention == "mha":
            return (self.block_tokens, 2, s.n_kv_heads, s.head_dim)
        return (self.block_tokens, s.row_elems)

    def as_kv(self, layer_block: torch.Tensor) -> torch.Tensor:
        """Reinterpret Layer Block rows ``[..., T, bytes]`` as the model's cache entry: ``[..., T, 2, H, D]`` of
        dtype (mha), ``[..., T, latent_dim]`` of dtype (mla) or the uint8 rows themselves (mla fp8)."""
        s = self.spec
        if s.extra_bytes and s.attention == "mha":
            raise ValueError("as_kv is defined for mha layouts without extra bytes")
        if layer_block.dtype != torch.uint8 or layer_block.shape[-1] != s.bytes_per_token_layer:
            raise ValueError(f"expected uint8 rows of {s.bytes_per_token_layer} bytes")
        if s.attention == "mla" and s.latent_format == "fp8":
            return layer_block
        typed = layer_block.view(s.torch_dtype)
        if s.attention == "mla":
            return typed
        return typed.view(*typed.shape[:-1], 2, s.n_kv_heads, s.head_dim)
