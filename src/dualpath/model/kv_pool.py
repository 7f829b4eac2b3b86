"""A paged KV pool: one tensor per layer, ``[num_blocks, block_tokens, 2, n_kv_heads, head_dim]`` (MHA),
``[num_blocks, block_tokens, kv_lora_rank + rope_dim]`` (MLA latent) or ``[num_blocks, block_tokens, 656]`` uint8
(MLA FP8 latent rows), and a free-list allocator of physical blocks.

``pool.layer(l)[b]`` is the Layer Block of block ``b`` at layer ``l``: its bytes
(``.view(torch.uint8).reshape(block_tokens, -1)``) are exactly a :class:`~dualpath.kv.layout.KVLayout` Layer
Block, so pages move to and from Full Block buffers with no conversion (:meth:`KVPool.read_blocks`,
:meth:`KVPool.write_blocks`). All layers live in one tensor ``data[n_layers, num_blocks, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from dualpath.errors import ModelError
from dualpath.kv.layout import KVLayout, KVSpec


def zeros_untouched(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """``torch.zeros(shape)``, but on the CPU without writing a byte: the memory comes from ``calloc`` (numpy's
    zeros), whose large blocks are fresh zero pages the OS maps in on first touch. A pool sized for the worst case
    then costs no start-up time and no resident memory until its pages are used (``torch.zeros`` of the in-process
    server's 3 GB pool took 9.4 s on a 2-core box, most of the server's start)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=dev)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(max(nbytes, 1), dtype=np.uint8))[:nbytes].view(dtype).view(shape)


class KVPool:
    """Per-layer paged KV tensors plus a free-list block allocator (not thread-safe)."""

    def __init__(self, spec: KVSpec, num_blocks: int, block_tokens: int = 64,
                 device: str | torch.device = "cpu", *, backend: str | None = None) -> None:
        if spec.extra_bytes and spec.attention == "mha":
            raise ModelError("KVPool holds mha KV without extra bytes (an mla row may carry them: DeepSeek-V3.2's "
                             "indexer key)")
        if num_blocks <= 0 or block_tokens <= 0:
            raise ModelError(f"KVPool needs positive num_blocks and block_tokens, got {num_blocks}, {block_tokens}")
        self.spec = spec
        self.layout = KVLayout(spec, block_tokens)
        self.block_tokens = block_tokens
        self.num_blocks = num_blocks
        self.backend = backend
        self.data = zeros_untouched((spec.n_layers, num_blocks, *self.layout.page_shape), spec.torch_dtype, device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    # --- pages -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    def layer(self, layer: int) -> torch.Tensor:
        """The pages of one layer, ``[num_blocks, *page_shape]`` (a view)."""
        return self.data[layer]

    @property
    def layers(self) -> list[torch.Tensor]:
        return [self.data[i] for i in range(self.spec.n_layers)]

    def read_blocks(self, layer: int, block_ids: Sequence[int] | torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather one layer's Layer Blocks into ``out`` (typed ``[n, bt, 2, H, D]`` or uint8 ``[n, (1,) bt, bytes]``,
        e.g. ``full_blocks[:, l:l+1]``) or into a new contiguous tensor."""
        from dualpath.kernels import gather_layer_blocks

        return gather_layer_blocks(self.data[layer], self._ids(block_ids), out, backend=self.backend)

    def write_blocks(self, layer: int, block_ids: Sequence[int] | torch.Tensor, staging: torch.Tensor) -> None:
        """Scatter staged Layer Blocks (same forms as :meth:`read_blocks`) into one layer's pages."""
        from dualpath.kernels import scatter_layer_blocks

        scatter_layer_blocks(staging, self.data[layer], self._ids(block_ids), backend=self.backend)

    def read_full_blocks(self, block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """Fill a uint8 Full Block buffer ``[n, n_layers, bt, bytes]`` from the pool, layer by layer."""
        self.layout.check_full_block(out)
        for layer in range(self.n_layers):
            self.read_blocks(layer, block_ids, out[:, layer : layer + 1])
        return out

    def write_full_blocks(self, block_ids: Sequence[int], full: torch.Tensor) -> None:
        """Copy a uint8 Full Block buffer ``[n, n_layers, bt, bytes]`` into the pool's pages."""
        self.layout.check_full_block(full)
        for layer in range(self.n_layers):
            self.write_blocks(layer, block_ids, full[:, layer : layer + 1])

    def _ids(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = block_ids if isinstance(block_ids, torch.Tensor) else torch.tensor(list(block_ids), dtype=torch.int64)
        return ids.to(device=self.device, dtype=torch.int64)

    # --- allocation --------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_tokens)

    def allocate(self, n: int) -> list[int]:
        """``n`` free block ids; raises :class:`ModelError` naming the shortfall when the pool is too small."""
        if n < 0:
            raise ModelError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise ModelError(
                f"KV pool exhausted: need {n} blocks ({n * self.block_tokens} tokens) but only {len(self._free)} "
                f"of {self.num_blocks} blocks of {self.block_tokens} tokens are free"
            )
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ModelError(f"block {i} is not allocated")
            self._used.remove(i)
            self._free.append(i)
