"""RWKV-4 (``RwkvForCausalLM``, model_type ``rwkv``), as transformers runs it, over state pages
(:mod:`dualpath.model.state_pages`).

Embeddings, a LayerNorm (``pre_ln``, in the first block), then blocks of two residual halves, each behind its own
LayerNorm:

* **time mixing**: each of key, value and receptance reads ``x * mix + x_prev * (1 - mix)`` (``x_prev``: the
  previous token's normed input, the *token shift*); then the WKV recurrence, per channel, in fp32, with the decay
  ``w = -exp(time_decay)`` and the bonus ``u = time_first`` of the current token::

      out_t = (e^{p - q} a + e^{u + k_t - q} v_t) / (e^{p - q} b + e^{u + k_t - q}),  q = max(p, u + k_t)
      a, b, p <- e^{p + w - q'} a + e^{k_t - q'} v_t,  e^{p + w - q'} b + e^{k_t - q'},  q' = max(p + w, k_t)

  and ``output(sigmoid(receptance) * out)``;
* **channel mixing**: the same token shift, ``value(relu(key(.))^2)`` times ``sigmoid(receptance(.))``.

A final LayerNorm (``ln_out``, at LayerNorm's default epsilon) and the head. At inference transformers divides each
block's ``attention.output`` and ``feed_forward.value`` weights by ``2 ** (block // rescale_every)`` and halves the
hidden state after every ``rescale_every`` blocks; powers of two scale exactly, and this does the same.

A layer's state is the two token shifts and ``a``, ``b``, ``p``, kept in fp32 in its pages: the page of block ``b``
holds the state after the last token written in block ``b`` (a prefill writes a snapshot at every block end it
crosses), so a Full Block carries the state at its end through storage and both read paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone, HybridDecoder, StatePagesSpec
from dualpath.model.llama import ForwardState
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "rwkv"
#: RwkvConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50277, "context_length": 1024, "hidden_size": 4096, "num_hidden_layers": 32,
    "layer_norm_epsilon": 1e-5, "bos_token_id": 0, "eos_token_id": 0, "rescale_every": 6,
    "tie_word_embeddings": False,
}
#: transformers' initial maximum of the WKV recurrence (no key yet)
_NO_KEY = -1e30


@dataclass(frozen=True)
class RwkvSpec(StatePagesSpec, ModelSpec):
    """A :class:`ModelSpec` (``hidden_size``, ``intermediate_size``, the vocabulary; its attention fields unused)
    plus RWKV's."""

    attention_size: int = 0
    rescale_every: int = 6
    layer_types: tuple[str, ...] = ()
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rescale_every < 0:
            raise ModelError(f"model config: rescale_every must be >= 0, got {self.rescale_every}")
        if self.attention_size != self.hidden_size:
            raise ModelError(f"model config: attention_hidden_size ({self.attention_size}) must equal hidden_size "
                             f"({self.hidden_size}): transformers' recurrent state is hidden_size wide, so it cannot "
                             f"run another width either")

    @property
    def state_bytes(self) -> int:
        """fp32: the two token shifts ``[hidden]`` and the recurrence's ``a, b, p`` ``[attention_hidden_size]``."""
        return 4 * (2 * self.hidden_size + 3 * self.attention_size)

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["RwkvForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "context_length": self.max_position, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers, "attention_hidden_size": self.attention_size,
            "intermediate_size": self.intermediate_size, "layer_norm_epsilon": self.rms_eps,
            "rescale_every": self.rescale_every, "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> RwkvSpec:
    """The spec of an RWKV-4 config (its keys over RwkvConfig's defaults). ``context_length`` is the training
    context; the recurrence itself has no limit, but transformers' kernel refuses longer forwards, so it caps what is
    served."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    hidden, n = cfg_int(cfg, "hidden_size", where), cfg_int(cfg, "num_hidden_layers", where)
    return RwkvSpec(
        architecture=ARCH, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int({"intermediate_size": cfg.get("intermediate_size") or 4 * hidden},
                                  "intermediate_size", where),
        n_layers=n, n_heads=1, n_kv_heads=1, head_dim=64, rms_eps=cfg_num(cfg, "layer_norm_epsilon", where),
        max_position=cfg_int(cfg, "context_length", where), tie_embeddings=bool(cfg["tie_word_embeddings"]),
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=("linear_attention",) * n,
        attention_size=cfg_int({"attention_hidden_size": cfg.get("attention_hidden_size") or hidden},
                               "attention_hidden_size", where),
        rescale_every=cfg_int(cfg, "rescale_every", where, 0),
    )


# --- modules (the checkpoints' names inside a block) --------------------------------------------------------------


class TimeMix(nn.Module):
    def __init__(self, spec: RwkvSpec) -> None:
        super().__init__()
        h, a = spec.hidden_size, spec.attention_size
        self.time_decay = nn.Parameter(torch.zeros(a))
        self.time_first = nn.Parameter(torch.zeros(a))
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_value = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, h))
        self.key = nn.Linear(h, a, bias=False)
        self.value = nn.Linear(h, a, bias=False)
        self.receptance = nn.Linear(h, a, bias=False)
        self.output = nn.Linear(a, h, bias=False)


class ChannelMix(nn.Module):
    def __init__(self, spec: RwkvSpec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.time_mix_key = nn.Parameter(torch.zeros(1, 1, h))
        self.time_mix_receptance = nn.Parameter(torch.zeros(1, 1, h))
        self.key = nn.Linear(h, spec.intermediate_size, bias=False)
        self.receptance = nn.Linear(h, h, bias=False)
        self.value = nn.Linear(spec.intermediate_size, h, bias=False)


class Block(nn.Module):
    def __init__(self, spec: RwkvSpec, layer: int) -> None:
        super().__init__()
        h = spec.hidden_size
        if layer == 0:
            self.pre_ln = nn.LayerNorm(h, eps=spec.rms_eps)
        self.ln1 = nn.LayerNorm(h, eps=spec.rms_eps)
        self.ln2 = nn.LayerNorm(h, eps=spec.rms_eps)
        self.attention = TimeMix(spec)
        self.feed_forward = ChannelMix(spec)


def _mix(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    return x * mix[0, 0] + prev * (1 - mix[0, 0])


class RwkvModel(HybridDecoder):
    """RWKV-4 (module docstring) over state pages."""

    def __init__(self, spec: RwkvSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._setup(spec, Backbone(spec, lambda i: Block(spec, i), nn.LayerNorm(spec.hidden_size)), device, backend)
        self.spec: RwkvSpec = spec

    def _state(self, kv_layer: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each page's fp32 state: ``(time shift, channel shift [nb, H], a, b, p [nb, A])`` (views)."""
        nb, h, a = kv_layer.shape[0], self.spec.hidden_size, self.spec.attention_size
        try:
            raw = kv_layer.view(nb, -1).view(torch.uint8)
        except RuntimeError as exc:
            raise ModelError(f"a state page must be one contiguous page per block: {exc}") from None
        f32 = raw[:, :self.spec.state_bytes].view(torch.float32)
        return tuple(f32[:, s:e] for s, e in ((0, h), (h, 2 * h), (2 * h, 2 * h + a), (2 * h + a, 2 * h + 2 * a),
                                               (2 * h + 2 * a, 2 * h + 3 * a)))

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st, mod = self.begin_layer(layer, state, kv_layer)
        blk = cast(Block, mod)
        spec, b = self.spec, state.batch
        x = blk.pre_ln(st.hidden) if layer == 0 else st.hidden
        shift_t, shift_c, pa, pb, pp = self._state(kv_layer)
        bt, dt = b.block_tokens, x.dtype
        tables = b.block_tables.tolist()
        cu, starts = b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        scale = 2.0 ** -(layer // spec.rescale_every) if spec.rescale_every else 1.0
        att, ffn = blk.attention, blk.feed_forward
        # time mixing: each sequence's token shift from its page, then the recurrence token by token
        h1 = blk.ln1(x)
        prev = torch.empty_like(h1)
        snaps: list[tuple[int, int, int]] = []  # (sequence, row, page): a snapshot after that row
        init: list[tuple[torch.Tensor, ...]] = []
        for i, start in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                init.append(())
                continue
            page = tables[i][(start - 1) // bt] if start else None
            if page is None:
                zeros = torch.zeros(spec.attention_size, device=x.device)
                init.append((torch.zeros(spec.hidden_size, device=x.device), zeros, zeros.clone(),
                             torch.full_like(zeros, _NO_KEY)))
            else:
                init.append((shift_c[page].clone(), pa[page].clone(), pb[page].clone(), pp[page].clone()))
            prev[r0] = (shift_t[page] if page is not None else x.new_zeros(spec.hidden_size)).to(dt)
            prev[r0 + 1:r1] = h1[r0:r1 - 1]
            for t in range(r1 - r0):
                pos = start + t
                if (pos + 1) % bt == 0 or t == r1 - r0 - 1:
                    snaps.append((i, r0 + t, tables[i][pos // bt]))
        k = att.key(_mix(h1, prev, att.time_mix_key))
        v = att.value(_mix(h1, prev, att.time_mix_value))
        r = torch.sigmoid(att.receptance(_mix(h1, prev, att.time_mix_receptance)))
        wkv = torch.empty_like(k)
        decay = -torch.exp(att.time_decay)
        first = att.time_first
        abp: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        want = {row for _, row, _ in snaps}
        for i in range(len(starts)):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            _, a, bb, p = init[i]
            for row in range(r0, r1):
                kt, vt = k[row].float(), v[row]
                q = torch.maximum(p, kt + first)
                e1, e2 = torch.exp(p - q), torch.exp(kt + first - q)
                wkv[row] = ((e1 * a + e2 * vt) / (e1 * bb + e2)).to(wkv.dtype)
                q2 = torch.maximum(p + decay, kt)
                e1, e2 = torch.exp(p + decay - q2), torch.exp(kt - q2)
                a, bb, p = e1 * a + e2 * vt, e1 * bb + e2, q2
                if row in want:
                    abp[row] = (a, bb, p)
        h = x + att.output(r * wkv) * scale
        # channel mixing
        h2 = blk.ln2(h)
        prev2 = torch.empty_like(h2)
        for i in range(len(starts)):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            prev2[r0] = init[i][0].to(dt)
            prev2[r0 + 1:r1] = h2[r0:r1 - 1]
        kk = torch.square(torch.relu(ffn.key(_mix(h2, prev2, ffn.time_mix_key))))
        rr = torch.sigmoid(ffn.receptance(_mix(h2, prev2, ffn.time_mix_receptance)))
        h = h + rr * ffn.value(kk) * scale
        for _, row, page in snaps:  # (the state after each block's last token, and after the chunk)
            a, bb, p = abp[row]
            shift_t[page], shift_c[page] = h1[row].float(), h2[row].float()
            pa[page], pb[page], pp[page] = a, bb, p
        if spec.rescale_every and (layer + 1) % spec.rescale_every == 0:
            h = h / 2
        st.hidden = h
        state.next_layer += 1


_NAMES = (("rwkv.embeddings.", "model.embed_tokens."), ("rwkv.blocks.", "model.layers."), ("rwkv.ln_out.", "model.norm."),
          ("head.", "lm_head."))


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's ``rwkv.embeddings`` / ``rwkv.blocks`` / ``rwkv.ln_out`` / ``head`` as ours."""
    out = {}
    for k, v in tensors.items():
        for theirs, ours in _NAMES:
            if k.startswith(theirs):
                k = ours + k[len(theirs):]
                break
        out[k] = v
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under the checkpoint's names."""
    out = {}
    for k, v in tensors.items():
        for theirs, ours in _NAMES:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        out[k] = v
    return out
