"""A synthetic model: real KV bytes, modelled compute time, deterministic tokens that depend on the KV read.

It implements :class:`dualpath.engine.model_api.LayerwiseModel` so engines drive it like the real model.

* **KV bytes.** Each token row of layer ``l`` at position ``p`` with token id ``t`` is filled with one 64-bit
  signature ``sig(l, p, t)`` repeated over the row (the row has the real size ``2 * n_kv_heads * head_dim *
  elem``), so storage and transports move real bytes of the right size and a persisted block can be checked.
* **Compute time.** A layer of a prefill batch sleeps ``flops / (device_tflops * 1e12)`` with ``flops =
  new * linear_flops_per_token / n_layers + attn_flops_per_key_layer * sum(keys seen by each new token)``; a
  decode step sleeps ``decode_step_s``. The CPU does O(tokens) work only, so I/O experiments can be far
  larger than a CPU could really compute. A prefill layer's time runs from the moment the layer is called, so
  the CPU pass and a late wake-up are absorbed by the modelled time (a wake-up late past it is taken off the
  next layer of the same forward): a forward costs its modelled time, not that plus the emulation's overhead
  per layer, which would otherwise penalise every extra forward (chunked prefill, small batches).
* **Tokens.** Every prefill layer sums the signatures of *all* positions it attends over, read from the
  cache (the hit part comes from storage or a peer), so a wrong or missing KV row changes the next token.
  The next token is a hash of that sum and the last token; logits are one-hot. A decode step reads the
  first and the previous position's rows of every layer from the pool.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from dualpath.engine.model_api import LayerwiseModel, PrefillSeq
from dualpath.engine.timemodel import LayerTimeModel
from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model.config import SyntheticModelConfig

_M1 = 0x5851F42D4C957F2D
_M2 = 0x14057B7EF767814F
_M3 = 0x2545F4914F6CDD1D
_M4 = 0x3C6EF372FE94F82B


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer mixer (wrapping int64 arithmetic; deterministic on every platform)."""
    x = x ^ (x >> 31)
    x = x * _M3
    x = x ^ (x >> 29)
    return x * _M4


def signatures(layer: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``sig(layer, p, t)`` for each (position, token): int64 ``[n]``."""
    pos = positions.to(torch.int64)
    tok = token_ids.to(torch.int64)
    lay = torch.tensor(layer + 1, dtype=torch.int64, device=pos.device)
    return _mix(tok * _M1 + pos * _M2 + lay * _M3)


@dataclass
class _SynthState:
    seqs: list[PrefillSeq]
    acc: torch.Tensor  # int64 [n_seqs]
    late: float = 0.0  # how far the previous layer ended past its modelled end (s)


class SyntheticModel(LayerwiseModel):
    """See the module docstring."""

    def __init__(self, config: SyntheticModelConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.kv_spec = KVSpec.mha(config.n_layers, config.n_kv_heads, config.head_dim, config.kv_dtype)
        if self.kv_spec.bytes_per_token_layer % 8:
            raise ModelError(
                f"synthetic model: bytes per token-layer ({self.kv_spec.bytes_per_token_layer}) must be a "
                "multiple of 8"
            )
        self.words = self.kv_spec.bytes_per_token_layer // 8
        self.max_context = config.max_context
        self.vocab_size = config.vocab_size
        self.device = torch.device(device)
        text = "synthetic|" + config.model_dump_json()
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()[:32]
        self._rate = config.device_tflops * 1e12

    def with_device(self, device: torch.device) -> SyntheticModel:
        return SyntheticModel(self.config, device)

    # --- helpers -----------------------------------------------------------------------------------------
    def _rows(self, kv_layer: torch.Tensor) -> torch.Tensor:
        """The layer cache as int64 words ``[num_blocks * block_tokens, words]``."""
        nb, bt = kv_layer.shape[0], kv_layer.shape[1]
        return kv_layer.view(torch.uint8).reshape(nb * bt, -1).view(torch.int64)

    def _flat_index(self, block_table: torch.Tensor, positions: torch.Tensor, bt: int) -> torch.Tensor:
        bt_dev = block_table.to(self.device, torch.int64)
        return bt_dev[positions // bt] * bt + positions % bt

    def prefill_flops(self, cached: int, new: int) -> float:
        """FLOPs of one layer for one sequence computing ``new`` tokens on top of ``cached``."""
        c = self.config
        keys = new * cached + new * (new + 1) / 2
        return new * c.linear_flops_per_token / c.n_layers + c.attn_flops_per_key_layer * keys

    # --- LayerwiseModel ----------------------------------------------------------------------------------
    def predict_prefill_s(self, cached: int, new: int) -> float | None:
        """Exactly the time the layer sleeps add up to for this request (all layers)."""
        return self.prefill_flops(cached, new) * self.config.n_layers / self._rate

    def layer_time_model(self) -> LayerTimeModel:
        """:meth:`prefill_flops` over the rate, as a per-layer time model (exact: ``b*n + e*n*c + d*n^2``)."""
        c, r = self.config, self._rate
        return LayerTimeModel(a=0.0, b=(c.linear_flops_per_token / c.n_layers + c.attn_flops_per_key_layer / 2) / r,
                              e=c.attn_flops_per_key_layer / r, d=c.attn_flops_per_key_layer / 2 / r,
                              n_layers=c.n_layers, device=str(self.device), key="synthetic")

    async def prefill_begin(self, seqs: Sequence[PrefillSeq]) -> Any:
        for s in seqs:
            if s.cached + s.new > self.max_context:
                raise ModelError(f"sequence of {s.cached + s.new} tokens exceeds max_context={self.max_context}")
        return _SynthState(list(seqs), torch.zeros(len(seqs), dtype=torch.int64))

    async def prefill_layer(self, state: Any, layer: int, kv_layer: torch.Tensor) -> None:
        st: _SynthState = state
        t0 = time.perf_counter()
        bt = kv_layer.shape[1]
        rows = self._rows(kv_layer)
        flops = 0.0
        for i, s in enumerate(st.seqs):
            total = s.cached + s.new
            pos_new = torch.arange(s.cached, total, device=self.device)
            sig = signatures(layer, pos_new, s.token_ids.to(self.device))
            idx_new = self._flat_index(s.block_table, pos_new, bt)
            rows[idx_new] = sig[:, None].expand(-1, self.words)
            idx_all = self._flat_index(s.block_table, torch.arange(total, device=self.device), bt)
            # "attention": every position's first word and last word, as stored in the cache
            seen = rows[idx_all, 0].sum() + rows[idx_all, self.words - 1].sum()
            st.acc[i] = _mix(st.acc[i : i + 1] + seen.cpu())[0]
            flops += self.prefill_flops(s.cached, s.new)
        due = t0 + max(0.0, flops / self._rate - st.late)
        await anyio.sleep(max(0.0, due - time.perf_counter()))
        st.late = max(0.0, time.perf_counter() - due)

    def _logits(self, acc: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        nxt = (_mix(acc ^ (last.to(torch.int64) * _M2)) & 0x7FFFFFFF) % self.vocab_size
        out = torch.zeros(acc.numel(), self.vocab_size, dtype=torch.float32)
        out[torch.arange(acc.numel()), nxt] = 1.0
        return out

    async def prefill_end(self, state: Any) -> torch.Tensor:
        st: _SynthState = state
        last = torch.stack([s.token_ids[-1].cpu() for s in st.seqs])
        return self._logits(st.acc, last)

    async def logits_at(self, state: Any, index: int, start: int, stop: int) -> torch.Tensor:
        """One-hot logits at rows ``start .. stop - 1`` of sequence ``index``: the hash of the sequence's KV sum
        and each row's token (the last row's are :meth:`prefill_end`'s), so prompt log-probabilities are
        deterministic and depend on the KV read."""
        st: _SynthState = state
        toks = st.seqs[index].token_ids[start:stop].cpu()
        return self._logits(st.acc[index: index + 1].repeat(toks.numel()), toks)

    async def decode_step(
        self,
        token_ids: torch.Tensor,
        seq_lens: Sequence[int],
        block_tables: torch.Tensor,
        kv_layers: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        n = len(seq_lens)
        lens = torch.tensor(list(seq_lens), dtype=torch.int64)
        pos = (lens - 1).to(self.device)
        toks = token_ids.to(self.device, torch.int64)
        acc = torch.zeros(n, dtype=torch.int64)
        bt = kv_layers[0].shape[1]
        tables = block_tables.to(self.device, torch.int64)
        ar = torch.arange(n, device=self.device)
        idx_new = tables[ar, pos // bt] * bt + pos % bt
        prev = (pos - 1).clamp(min=0)
        idx_prev = tables[ar, prev // bt] * bt + prev % bt
        idx_first = tables[ar, 0] * bt
        for layer, kv in enumerate(kv_layers):
            rows = self._rows(kv)
            rows[idx_new] = signatures(layer, pos, toks)[:, None].expand(-1, self.words)
            acc = _mix(acc + rows[idx_first, 0].cpu() + rows[idx_prev, self.words - 1].cpu())
        await anyio.sleep(self.config.decode_step_s)
        return self._logits(acc, token_ids.cpu())
