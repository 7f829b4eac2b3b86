"""Paged-KV kernels with backend dispatch.

Every op exists twice with one signature: a Triton kernel (:mod:`.paged_attention`, :mod:`.kv_copy`) and a
pure-torch reference (:mod:`.reference`). ``backend``: ``"triton"``, ``"torch"`` or ``"auto"`` (default:
Triton when the tensors are on CUDA, the torch reference otherwise; the torch backend's decode attention is
:mod:`.batched`, the reference's semantics for a whole batch at once). The environment variable
``DUALPATH_KERNELS=triton|torch`` overrides ``auto`` (e.g. ``DUALPATH_KERNELS=triton TRITON_INTERPRET=1``
runs the Triton kernels on CPU through the interpreter: slow, tests only). Triton modules are imported
lazily, so the torch path never imports triton. The paged attention ops take ``softcap`` (Gemma 2's logit
soft-capping), ``window`` (a sliding window) and ``sinks`` (gpt-oss's per-head attention sink logits, ``[Hq]``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from dualpath.errors import KernelError
from dualpath.kernels import batched, reference
from dualpath.kernels._checks import check_sinks, check_window

BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "BACKENDS",
    "dequantize_latent_fp8",
    "gather_layer_blocks",
    "mla_decode_attention",
    "mla_prefill_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "quantize_latent_fp8",
    "resolve_backend",
    "scatter_layer_blocks",
    "store_kv",
    "store_latent",
]


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for a requested backend and the tensors' device."""
    b = backend or "auto"
    if b == "auto":
        b = os.environ.get("DUALPATH_KERNELS", "auto") or "auto"
    if b not in BACKENDS:
        raise KernelError(f"unknown kernel backend {b!r}; expected one of {BACKENDS}")
    if b == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if b == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return b


_MODULES = {
    "mla_decode_attention": "mla_attention",
    "mla_prefill_attention": "mla_attention",
    "store_latent": "fp8_latent",
    "quantize_latent_fp8": "fp8_latent",
    "dequantize_latent_fp8": "fp8_latent",
}


def _impl(name: str, backend: str | None, device: torch.device) -> Any:
    if resolve_backend(backend, device) == "torch":
        if name == "paged_decode_attention":
            return batched.paged_decode_attention
        return getattr(reference, name)
    kind = _MODULES.get(name) or ("paged_attention" if name.startswith("paged_") else "kv_copy")
    return getattr(importlib.import_module(f"dualpath.kernels.{kind}"), name)


def _alibi_kw(alibi: torch.Tensor | None, alibi_bf16: bool, q: torch.Tensor) -> dict[str, Any]:
    """The implementations' ALiBi keywords (none without slopes; ``alibi_bf16`` only when set)."""
    if alibi is None:
        if alibi_bf16:
            raise KernelError("alibi_bf16 needs alibi slopes")
        return {}
    kw: dict[str, Any] = {"alibi": check_sinks(alibi, q.shape[1], q.device, "alibi")}
    if alibi_bf16:
        kw["alibi_bf16"] = True
    return kw


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, *, backend: str | None = None,
                           softcap: float | None = None, window: int | None = None,
                           sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
                           alibi_bf16: bool = False, chunk: int | None = None) -> torch.Tensor:
    """``q [B, Hq, D]`` over each sequence's ``seq_lens[b]`` paged tokens -> ``[B, Hq, D]``. ``chunk`` (Llama 4's
    chunked attention): a query at position ``p`` sees only the keys of its own chunk of ``chunk`` positions,
    ``p // chunk * chunk .. p`` (None: no chunks; it combines with ``window``). ``softcap``: scores
    ``softcap * tanh(scores / softcap)`` (Gemma 2's attention-logit soft-capping). ``window``: a sliding
    attention window, the last ``window`` tokens only (None: all). ``sinks``: gpt-oss's attention sinks, a float
    ``[Hq]`` tensor on ``q``'s device: query head ``h``'s softmax gets an extra logit ``sinks[h]`` (unscaled,
    uncapped) that weights no value (None: no sinks). ``alibi``: ALiBi slopes ``[Hq]`` (Bloom): head ``h``'s score
    of the key at position ``k`` from the query at ``p`` gets ``alibi[h] * (k - p)`` added (None: none).
    ``alibi_bf16`` (Falcon's ALiBi, as transformers builds it): instead, ``bf16(alibi[h] * k)`` is added to the
    scores before their ``scale`` (a per-query constant apart, the same bias, rounded as Falcon rounds it)."""
    fn = _impl("paged_decode_attention", backend, q.device)
    kw = _alibi_kw(alibi, alibi_bf16, q)
    if chunk is not None:
        kw["chunk"] = check_window(chunk, "chunk")
    return fn(q, kv_layer, block_tables, seq_lens, scale, softcap=softcap, window=check_window(window),
              sinks=check_sinks(sinks, q.shape[1], q.device), **kw)


def paged_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, start_pos: torch.Tensor,
                            scale: float, *, backend: str | None = None,
                            softcap: float | None = None, window: int | None = None,
                            sinks: torch.Tensor | None = None, alibi: torch.Tensor | None = None,
                            alibi_bf16: bool = False, chunk: int | None = None) -> torch.Tensor:
    """New tokens ``q [Ntok, Hq, D]``: full attention over the cached prefix, causal over the new tokens.
    ``softcap``, ``sinks``, ``alibi``, ``alibi_bf16`` and ``chunk`` as for :func:`paged_decode_attention`; ``window``: a query at position
    ``p`` sees the keys at positions ``p - window + 1 .. p`` only (transformers' sliding-window mask)."""
    fn = _impl("paged_prefill_attention", backend, q.device)
    kw = _alibi_kw(alibi, alibi_bf16, q)
    if chunk is not None:
        kw["chunk"] = check_window(chunk, "chunk")
    return fn(q, kv_layer, block_tables, cu_seqlens_q, seq_lens, start_pos, scale, softcap=softcap,
              window=check_window(window), sinks=check_sinks(sinks, q.shape[1], q.device), **kw)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, *,
             backend: str | None = None) -> None:
    """Write ``k, v [N, Hkv, D]`` into the pool at ``slot_mapping [N]`` (int64; negative = skip)."""
    _impl("store_kv", backend, k.device)(k, v, kv_layer, slot_mapping)


def gather_layer_blocks(kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None, *,
                        backend: str | None = None) -> torch.Tensor:
    """Layer Blocks ``kv_layer[block_ids]`` -> staging ``[n, bt, 2, H, D]`` (or into ``out``, which may be a
    uint8 view such as a Full Block buffer's layer slice ``[n, 1, bt, bytes]``)."""
    return _impl("gather_layer_blocks", backend, kv_layer.device)(kv_layer, block_ids, out)


def scatter_layer_blocks(staging: torch.Tensor, kv_layer: torch.Tensor, block_ids: torch.Tensor, *,
                         backend: str | None = None) -> None:
    """``kv_layer[block_ids[i]] = staging[i]`` for a staging buffer as accepted by :func:`gather_layer_blocks`."""
    _impl("scatter_layer_blocks", backend, kv_layer.device)(staging, kv_layer, block_ids)


# --- MLA (DeepSeek) paged latent KV ------------------------------------------------------------------------------


def mla_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, kv_lora_rank: int, *, backend: str | None = None) -> torch.Tensor:
    """Absorbed MLA decode: ``q [B, H, R + P]`` over paged latent rows (``[NB, bt, R + P]`` float or FP8 uint8
    rows) -> ``[B, H, R]``."""
    return _impl("mla_decode_attention", backend, q.device)(q, kv_layer, block_tables, seq_lens, scale, kv_lora_rank)


def mla_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, start_pos: torch.Tensor, scale: float,
                          kv_lora_rank: int, *, backend: str | None = None) -> torch.Tensor:
    """Absorbed MLA prefill: new tokens' ``q [Ntok, H, R + P]``, full over the cached latent prefix, causal over
    the new rows -> ``[Ntok, H, R]``."""
    fn = _impl("mla_prefill_attention", backend, q.device)
    return fn(q, kv_layer, block_tables, cu_seqlens_q, seq_lens, start_pos, scale, kv_lora_rank)


def store_latent(latent: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor, kv_lora_rank: int, *,
                 backend: str | None = None) -> None:
    """Write latent rows ``[N, R + P]`` at ``slot_mapping [N]`` (quantized when ``kv_layer`` holds FP8 rows)."""
    _impl("store_latent", backend, latent.device)(latent, kv_layer, slot_mapping, kv_lora_rank)


def quantize_latent_fp8(latent: torch.Tensor, kv_lora_rank: int, *, backend: str | None = None) -> torch.Tensor:
    """``[N, R + P]`` -> FP8 latent rows ``uint8 [N, R + R / 32 + 2 P]`` (656 bytes for 512 + 64)."""
    return _impl("quantize_latent_fp8", backend, latent.device)(latent, kv_lora_rank)


def dequantize_latent_fp8(rows: torch.Tensor, kv_lora_rank: int, dtype: torch.dtype = torch.float32, *,
                          backend: str | None = None) -> torch.Tensor:
    """FP8 latent rows -> ``[N, R + P]`` of ``dtype``."""
    return _impl("dequantize_latent_fp8", backend, rows.device)(rows, kv_lora_rank, dtype)
