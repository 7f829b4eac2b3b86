"""State pages: where a recurrent layer (Gated DeltaNet, Mamba-2) keeps its state in the paged KV pool.

A recurrent layer keeps, per sequence, a state (``S [H, Dk, Dv]``: the delta rule's matrix, or Mamba-2's
``[heads, head_dim, d_state]``) and the last ``K - 1`` inputs of its causal depthwise convolution (``conv [C, K - 1]``),
instead of per-token keys and values. The paged KV pool holds them in the layer's pages (:attr:`KVSpec.state_pages`):
the page of block ``b`` holds, in fp32, ``conv`` then ``S`` *after the last token written in block b*. A forward over
positions ``[s, e)`` reads the state after ``s - 1`` from the page of block ``(s - 1) // bt`` (zeros when ``s = 0``)
and writes one snapshot at every block boundary it crosses and at ``e - 1``. So a Full Block's page holds the state at
its end (what storage keeps and the next turn's hit starts from), the partial last block's page holds the current
state (what decoding continues from), and a page moves between engines whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec, dtype_from_name

__all__ = ["SEGMENT", "causal_conv", "decode_states", "scan_sequences", "state_bytes", "state_views",
           "widened_kv_spec"]


def state_bytes(conv_dim: int, kernel: int, heads_v: int, dk: int, dv: int) -> int:
    """Bytes of one layer's state in a page: fp32 ``conv [C, K - 1]`` then fp32 ``S [Hv, Dk, Dv]``."""
    return 4 * (conv_dim * (kernel - 1) + heads_v * dk * dv)


def state_views(kv_layer: torch.Tensor, conv_dim: int, kernel: int, heads_v: int, dk: int,
                dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv [nb, C, K - 1], S [nb, Hv, Dk, Dv])`` fp32 views of each page of a layer's ``[nb, *page]`` tensor
    (no copy; a :class:`ModelError` when the pages are not contiguous or too small for the state)."""
    nb = kv_layer.shape[0]
    try:
        raw = kv_layer.view(nb, -1).view(torch.uint8)
    except RuntimeError as exc:
        raise ModelError(f"a state page must be one contiguous page per block: {exc}") from None
    need = state_bytes(conv_dim, kernel, heads_v, dk, dv)
    if raw.shape[1] < need:
        raise ModelError(f"a page of {raw.shape[1]} bytes cannot hold a linear-attention state of {need} bytes; "
                         f"use larger blocks (cluster.block_tokens) or the model's paged_kv_spec")
    f32 = raw[:, :need].view(torch.float32)
    nc = conv_dim * (kernel - 1)
    return f32[:, :nc].view(nb, conv_dim, kernel - 1), f32[:, nc:].view(nb, heads_v, dk, dv)


def split_page(kv_layer: torch.Tensor, heads: int, head_dim: int, conv_dim: int, kernel: int, heads_v: int,
               dk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer with both attention and a recurrent state (Falcon-H1): ``(kv [nb, bt, 2, heads, head_dim], conv,
    S)``: the page's first ``bt x 2 x heads x head_dim`` values are the block's KV rows (a view with the page's
    stride), the rest holds the state (:func:`state_views`)."""
    nb, bt = kv_layer.shape[0], kv_layer.shape[1]
    try:
        flat = kv_layer.view(nb, -1)
    except RuntimeError as exc:
        raise ModelError(f"a state page must be one contiguous page per block: {exc}") from None
    n = bt * 2 * heads * head_dim
    conv, rec = state_views(flat[:, n:], conv_dim, kernel, heads_v, dk, dv)
    return flat[:, :n].view(nb, bt, 2, heads, head_dim), conv, rec


#: a convolution's activation: True SiLU, False none, or the function a config's activation names
ConvAct = bool | Callable[[torch.Tensor], torch.Tensor]


def _activated(out: torch.Tensor, act: ConvAct) -> torch.Tensor:
    if act is True:
        return F.silu(out)
    return act(out) if callable(act) else out


def causal_conv(x_ext: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                act: ConvAct = True) -> torch.Tensor:
    """Depthwise causal convolution (plus ``bias``) then SiLU (``act``: or none, or another activation):
    ``x_ext [C, K - 1 + L]`` (the state's ``K - 1`` inputs first), ``weight [C, K]`` -> ``[C, L]``."""
    out = F.conv1d(x_ext[None], weight[:, None, :], bias, groups=weight.shape[0])[0]
    return _activated(out, act)


#: the longest segment a recurrent layer runs in one closed form (its cost grows with the square of its length)
SEGMENT = 64


def widened_kv_spec(n_layers: int, n_kv_heads: int, head_dim: int, dtype: str, state_bytes: int,
                    block_tokens: int, both: bool = False) -> KVSpec:
    """The page layout of a hybrid model for blocks of ``block_tokens`` tokens: rows of ``[2, H, head_dim]`` with
    ``H`` the attention layers' KV heads, or more where a page of them would not hold a recurrent layer's
    ``state_bytes`` (one layout for every layer: attention layers use the front of each row). ``both`` (Falcon-H1:
    attention and a recurrent state in every layer): a page holds the KV rows and, after them, the state
    (:func:`split_page`)."""
    if block_tokens <= 0:
        raise ModelError(f"block_tokens must be positive, got {block_tokens}")
    elem = torch.empty((), dtype=dtype_from_name(dtype)).element_size()
    per_head = 2 * head_dim * elem * block_tokens  # bytes of one KV head's K and V over a page
    heads = n_kv_heads + -(-state_bytes // per_head) if both else max(n_kv_heads, -(-state_bytes // per_head))
    return KVSpec.mha(n_layers, heads, head_dim, dtype, state_pages=True)


def scan_sequences(batch: Any, conv_pages: torch.Tensor | None, rec_pages: torch.Tensor, mixed: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, run: Callable[..., Any],
                   act: ConvAct = True) -> None:
    """A prefill batch through a recurrent layer over its state pages (module docstring). For each sequence: its
    state after the cached positions, the convolution over ``mixed [N, C]`` (that state's inputs first), then
    segments that end at a block boundary, the chunk's end or after :data:`SEGMENT` tokens:
    ``s = run(conv_rows [L, C], row0, row1, s)`` (``row0:row1`` the segment's rows in the batch; ``run`` stores its
    own output), each followed by a snapshot into the page of the segment's last token. Without a convolution
    (``weight`` and ``conv_pages`` None: MiniMax's lightning attention) ``mixed`` goes to ``run`` as it is."""
    bt, k = batch.block_tokens, (weight.shape[1] if weight is not None else 1)
    cu, starts, tables = batch.cu_seqlens_q.tolist(), batch.start_pos.tolist(), batch.block_tables.tolist()
    for i, start in enumerate(starts):
        r0, r1, table = cu[i], cu[i + 1], tables[i]
        if start == 0:
            conv0 = torch.zeros(mixed.shape[1], k - 1, device=mixed.device)
            s = torch.zeros(rec_pages.shape[1:], device=mixed.device)
        else:
            page = table[(start - 1) // bt]
            conv0 = (conv_pages[page].clone() if conv_pages is not None
                     else torch.zeros(mixed.shape[1], 0, device=mixed.device))
            s = rec_pages[page].clone()
        ext = torch.cat((conv0.to(mixed.dtype), mixed[r0:r1].t()), dim=1)  # [C, K - 1 + L]
        conv = causal_conv(ext, weight, bias, act).t() if weight is not None else mixed[r0:r1]
        t0, n = 0, r1 - r0
        while t0 < n:
            t1 = min(n, t0 + bt - (start + t0) % bt, t0 + SEGMENT)
            s = run(conv[t0:t1], r0 + t0, r0 + t1, s)
            page = table[(start + t1 - 1) // bt]
            rec_pages[page] = s
            if conv_pages is not None:
                conv_pages[page] = ext[:, t1:t1 + k - 1].float()
            t0 = t1


def decode_states(batch: Any, conv_pages: torch.Tensor | None, rec_pages: torch.Tensor, mixed: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, act: ConvAct = True
                  ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None]]:
    """One token per sequence: ``(conv [B, C], state before [B, ...], commit)``; ``commit(new_state)`` writes the
    state and the convolution's inputs into the page of each token's block. Without a convolution (``weight`` and
    ``conv_pages`` None) ``mixed`` comes back as it is."""
    bt, pos = batch.block_tokens, batch.positions
    tables = batch.block_tables.to(torch.int64)
    prev = tables.gather(1, ((pos - 1).clamp(min=0) // bt)[:, None])[:, 0]
    s0 = torch.where((pos == 0).view(-1, *([1] * (rec_pages.dim() - 1))), 0.0, rec_pages[prev])
    cur = tables.gather(1, (pos // bt)[:, None])[:, 0]
    if conv_pages is None or weight is None:
        def commit_state(s1: torch.Tensor) -> None:
            rec_pages[cur] = s1

        return mixed, s0, commit_state
    fresh = (pos == 0).view(-1, *([1] * (conv_pages.dim() - 1)))
    conv0 = torch.where(fresh, 0.0, conv_pages[prev])
    ext = torch.cat((conv0.to(mixed.dtype), mixed[:, :, None]), dim=2)  # [B, C, K]
    out = (ext.float() * weight.float()[None]).sum(dim=-1)
    if bias is not None:
        out = out + bias.float()

    def commit(s1: torch.Tensor) -> None:
        rec_pages[cur] = s1
        conv_pages[cur] = ext[:, :, 1:].float()

    out = out.to(mixed.dtype)
    return _activated(out, act), s0, commit
