"""What an engine needs from a model: a layer-wise prefill and a batched decode step over paged KV.

Both the real Llama-family model (through :class:`LlamaAdapter`) and the synthetic model
(:mod:`dualpath.model.synthetic`) implement :class:`LayerwiseModel`, so engines never special-case them.

KV caches are *per layer* and paged: ``[num_blocks, block_tokens, 2, n_kv_heads, head_dim]`` of the KV dtype
(the Layer Block layout of :mod:`dualpath.kv.layout` reinterpreted as that dtype, ``KVLayout.as_kv``); for a
DeepSeek-V3 model (MLA) ``[num_blocks, block_tokens, kv_lora_rank + rope_dim]`` latent rows, or uint8 FP8 latent
rows. :class:`LlamaAdapter` drives either model class (both share the layer-wise forward). A prefill forward runs one
layer at a time over a *one-layer scratch cache* holding the batch's blocks for that layer only; a decode step
runs over the decode engine's whole pool (one tensor per layer).

The contract
    ``prefill_begin(seqs)`` embeds the new tokens of each :class:`PrefillSeq`. Then ``prefill_layer(state, l,
    kv_l)`` is called for ``l = 0 .. n_layers-1`` in order: positions ``0 .. cached-1`` of every sequence are
    already in ``kv_l`` (at ``block_table[p // bt], p % bt``); the call writes the new tokens' KV of layer
    ``l`` at their positions and attends over all ``cached + new`` positions. ``prefill_end(state)`` returns
    fp32 logits ``[len(seqs), vocab]`` of each sequence's last token. ``decode_step(tokens, seq_lens,
    block_tables, kv_layers)`` feeds one token per sequence at position ``seq_lens[i] - 1``, writes its KV
    into every layer and returns fp32 logits ``[n, vocab]``. Every method is async: real compute runs in a
    worker thread, synthetic compute sleeps for its modelled time.
"""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from dualpath.engine.timemodel import LayerTimeModel
from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec

log = logging.getLogger("dualpath.engine")


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence of a prefill batch: ``new`` token ids on top of ``cached`` positions with KV."""

    token_ids: torch.Tensor  # int64 [new]
    cached: int
    block_table: torch.Tensor  # int32 [ceil((cached + new) / block_tokens)] blocks of the scratch cache

    @property
    def new(self) -> int:
        return int(self.token_ids.numel())


class LayerwiseModel(abc.ABC):
    """The layer-wise model interface engines drive (contract in the module docstring)."""

    kv_spec: KVSpec
    fingerprint: str
    max_context: int
    vocab_size: int
    device: torch.device

    @property
    def n_layers(self) -> int:
        return self.kv_spec.n_layers

    @abc.abstractmethod
    async def prefill_begin(self, seqs: Sequence[PrefillSeq]) -> Any: ...

    @abc.abstractmethod
    async def prefill_layer(self, state: Any, layer: int, kv_layer: torch.Tensor) -> None: ...

    @abc.abstractmethod
    async def prefill_end(self, state: Any) -> torch.Tensor: ...

    @abc.abstractmethod
    async def decode_step(
        self,
        token_ids: torch.Tensor,
        seq_lens: Sequence[int],
        block_tables: torch.Tensor,
        kv_layers: Sequence[torch.Tensor],
    ) -> torch.Tensor: ...

    async def logits_at(self, state: Any, index: int, start: int, stop: int) -> torch.Tensor:
        """After :meth:`prefill_end`: fp32 logits ``[stop - start, vocab]`` at new tokens ``start .. stop - 1`` of
        sequence ``index`` of the batch (prompt log-probabilities). Models that cannot raise :class:`ModelError`."""
        raise ModelError(f"{type(self).__name__} does not compute prompt log-probabilities (a real model does)")

    def with_device(self, device: torch.device) -> LayerwiseModel:
        """A model instance bound to ``device`` (may share weights with ``self`` when the device matches)."""
        return self

    def predict_prefill_s(self, cached: int, new: int) -> float | None:
        """Predicted seconds of prefilling ``new`` tokens over ``cached`` ones (all layers), or None if unknown.
        Used by the PE's compute quota."""
        return None

    def layer_time_model(self) -> LayerTimeModel | None:
        """The per-layer forward-time model behind :meth:`predict_prefill_s` (what a PE's predicted work,
        :class:`~dualpath.engine.work.PrefillWork`, is built from), or None if unknown. May block (calibration)."""
        return None

    def efficient_prefill_tokens(self, cap: int) -> int:
        """New tokens per forward below which prefill throughput falls off (the forward's fixed cost dominates),
        at most ``cap``; 0 when unknown. The PE's compute quota does not cut a batch below it (never lose)."""
        return 0

    def prefill_tokens_per_s(self, new: int = 1024) -> float | None:
        """Predicted prefill throughput of a batch of ``new`` fresh tokens (Algorithm 1's beta), or None."""
        t = self.predict_prefill_s(0, new)
        return new / t if t else None


def paged_kv_spec(spec: Any, block_tokens: int) -> KVSpec:
    """A model spec's KV layout for pages of ``block_tokens`` tokens: a hybrid model's state page must hold its
    recurrent state, so its row width depends on the page's length (``spec.paged_kv_spec``); others' does not."""
    paged = getattr(spec, "paged_kv_spec", None)
    return paged(block_tokens) if paged is not None else spec.kv_spec()


class LlamaAdapter(LayerwiseModel):
    """Adapts :class:`dualpath.model.llama.LlamaModel` to :class:`LayerwiseModel`; compute runs in a thread.

    One :class:`anyio.CapacityLimiter` per adapter serialises the engine's compute (one stream per device).

    Time prediction (:meth:`predict_prefill_s`) comes from a :class:`~dualpath.engine.timemodel.LayerTimeModel`:
    ``time_model="auto"`` calibrates it from measured forwards on first use (at most ``time_budget_s``; cached
    per model fingerprint and device, see :mod:`dualpath.engine.timemodel`), ``"off"`` predicts nothing, or pass
    a fitted model.
    """

    def __init__(self, model: Any, block_tokens: int, max_context: int | None = None, *,
                 time_model: str | LayerTimeModel = "auto", time_budget_s: float = 2.0) -> None:
        self.model = model
        self.block_tokens = int(block_tokens)
        spec = model.spec
        self.kv_spec = paged_kv_spec(spec, self.block_tokens)
        self.fingerprint = spec.fingerprint()
        self.max_context = int(max_context or spec.context_limit)
        self.vocab_size = int(spec.vocab_size)
        self.device = torch.device(getattr(model, "device", "cpu"))
        self._limiter = anyio.CapacityLimiter(1)
        if isinstance(time_model, str) and time_model not in ("auto", "off"):
            raise ValueError(f"time_model must be 'auto', 'off' or a LayerTimeModel, got {time_model!r}")
        self._time_mode = time_model if isinstance(time_model, str) else "given"
        self._time: LayerTimeModel | None = time_model if isinstance(time_model, LayerTimeModel) else None
        self._time_budget_s = float(time_budget_s)
        self._time_lock = threading.Lock()

    def time_model(self) -> LayerTimeModel | None:
        """The forward-time model (calibrated once on first call when ``time_model="auto"``), or None when off
        or when calibration failed. Blocking: call it from a thread, or before the engine serves."""
        if self._time_mode != "auto":
            return self._time
        with self._time_lock:
            if self._time_mode == "auto":
                from dualpath.engine.timemodel import time_model_for

                try:
                    self._time = time_model_for(
                        self.model, self.kv_spec, self.fingerprint, self.block_tokens, self.device,
                        max_context=self.max_context, vocab_size=self.vocab_size, budget_s=self._time_budget_s,
                    )
                except Exception:  # a failed calibration costs the quota, never the engine
                    log.exception("time model calibration failed; the model predicts no time")
                    self._time = None
                self._time_mode = "done"
        return self._time

    def layer_time_model(self) -> LayerTimeModel | None:
        return self.time_model()

    def predict_prefill_s(self, cached: int, new: int) -> float | None:
        tm = self.time_model()
        return None if tm is None else tm.prefill_s(cached, new)

    def efficient_prefill_tokens(self, cap: int) -> int:
        tm = self.time_model()
        return 0 if tm is None else tm.efficient_batch_tokens(cap)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def prefill_begin(self, seqs: Sequence[PrefillSeq]) -> Any:
        return await self._run(_llama_prefill_begin, self.model, list(seqs), self.block_tokens, self.device)

    async def prefill_layer(self, state: Any, layer: int, kv_layer: torch.Tensor) -> None:
        await self._run(_llama_prefill_layer, self.model, state, layer, kv_layer)

    async def prefill_end(self, state: Any) -> torch.Tensor:
        out = await self._run(self.model.prefill_end, state)
        return out.float()

    async def logits_at(self, state: Any, index: int, start: int, stop: int) -> torch.Tensor:
        last = state.batch.last_index
        first = 0 if index == 0 else int(last[index - 1]) + 1  # the sequence's first row in the batch
        if not 0 <= start <= stop <= int(last[index]) + 1 - first:
            raise ModelError(f"logits_at: rows {start}..{stop} outside sequence {index} of the batch")
        rows = torch.arange(first + start, first + stop, dtype=torch.int64)
        return await self._run(self.model.logits_at, state, rows)

    async def decode_step(
        self,
        token_ids: torch.Tensor,
        seq_lens: Sequence[int],
        block_tables: torch.Tensor,
        kv_layers: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        out = await self._run(_llama_decode, self.model, token_ids, list(seq_lens), block_tables, list(kv_layers),
                              self.device)
        return out.float()


def _llama_prefill_begin(model: Any, seqs: list[PrefillSeq], bt: int, device: torch.device) -> Any:
    from dualpath.model.llama import SeqBatch

    batch = SeqBatch.build(
        [s.token_ids.tolist() for s in seqs],
        [s.cached for s in seqs],
        [s.block_table.tolist() for s in seqs],
        bt,
        device,
    )
    with torch.inference_mode():
        return model.prefill_begin(batch)


def _llama_prefill_layer(model: Any, state: Any, layer: int, kv_layer: torch.Tensor) -> None:
    with torch.inference_mode():
        model.prefill_layer(layer, state, kv_layer)
    if kv_layer.device.type == "cuda":  # the layer's KV is complete before anyone ships it
        torch.cuda.current_stream(kv_layer.device).synchronize()


def _llama_decode(
    model: Any,
    token_ids: torch.Tensor,
    seq_lens: list[int],
    block_tables: torch.Tensor,
    kv_layers: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    with torch.inference_mode():
        pos = torch.tensor(seq_lens, dtype=torch.int64, device=device) - 1
        return model.decode_step(token_ids.to(device), pos, block_tables.to(device), kv_layers)
