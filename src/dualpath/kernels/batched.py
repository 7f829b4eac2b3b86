"""Batched pure-torch paged decode attention: what the ``torch`` backend runs (the CPU default).

:mod:`.reference` loops over sequences and is the tests' oracle; this computes the same thing for a whole decode
batch at once: one ``index_select`` of the batch's Layer Blocks from the pool, one copy that converts them to
float32 in ``[B, Hkv, N, D]`` order, two batched matmuls and one masked softmax. With 16-token blocks scattered over
a large pool, attention alone runs 1.1-2.5x as fast as the loop and a SmolLM2-135M decode step 1.3-2.0x at batch 4
to 16 (``benchmarks/cpu_decode_attention.py``).

Sequences are padded to the longest one's span of blocks; a key past a sequence's length, before its window or
outside its chunk is masked (``-inf``), so it weights nothing. Each sequence's span starts at the block of its first
visible key (a sliding window or a chunk gathers only its own blocks). The batch is split into groups of similar
length (longest first) so that the float32 keys and values of a group stay under :data:`GROUP_BYTES` (about the
L2 cache: one group per 64 MiB ran 2-3x slower than 4 MiB groups at 64 x 512 or 8 x 8,192 tokens). Block-table
entries past a sequence's span are never read as block ids (they are clamped to a valid block and masked), so a
table padded with anything (``-1``, stale ids) is fine, and so is a slot never written (NaN bits): a masked key's
value is zeroed before it meets its zero weight. Semantics (``softcap``, ``window``, ``sinks``, ``alibi``,
``alibi_bf16``, ``chunk``) are :func:`dualpath.kernels.reference.paged_decode_attention`'s. (MLA's decode stays on
the reference: its one latent row per token, shared by every head, leaves the per-sequence loop nothing to batch
away; a batched version measured 0.75-0.95x of it.)
"""

from __future__ import annotations

import torch

from dualpath.errors import KernelError
from dualpath.kernels.reference import first_visible

#: float32 K and V bytes of one group of sequences (the batch is split above this)
GROUP_BYTES = 4 << 20


def _check_lens(lens: list[int], bt: int, width: int) -> None:
    if min(lens) < 1 or -(-max(lens) // bt) > width:
        raise KernelError(f"seq_lens must be >= 1 and fit block_tables' {width} blocks of {bt} tokens, got "
                          f"{min(lens)}..{max(lens)}")


def _block_ids(tables: torch.Tensor, b0: torch.Tensor, nb: int, nbk: int) -> torch.Tensor:
    """``[B * nb]`` pool blocks: each sequence's ``nb`` blocks from its table column ``b0``; a column past the table
    reads its last one, and an entry outside the pool is clamped into it (what those blocks hold is masked)."""
    cols = (b0[:, None] + torch.arange(nb, device=tables.device)[None, :]).clamp_(max=tables.shape[1] - 1)
    return tables.long().gather(1, cols).clamp_(0, nbk - 1).reshape(-1)


def _groups(lens: list[int], first: list[int], bt: int, per_token: int) -> list[list[int]]:
    """Sequence indices in groups: longest span first, each group's padded K/V under ``GROUP_BYTES`` (a single
    sequence above it is a group of its own)."""
    span = [-(-n // bt) - f // bt for n, f in zip(lens, first, strict=True)]
    order = sorted(range(len(lens)), key=lambda b: -span[b])
    groups: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for b in order:
        w = width or span[b]  # the group's padded width is its first (longest) member's
        if cur and (len(cur) + 1) * w * bt * per_token > GROUP_BYTES:
            groups.append(cur)
            cur, width = [], 0
            w = span[b]
        cur.append(b)
        width = w
    if cur:
        groups.append(cur)
    return groups


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    alibi_bf16: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged KV, the whole batch at once (see the module docstring).

    ``q [B, Hq, D]``, ``kv_layer [NB, bt, 2, Hkv, D]``, ``block_tables [B, max_blocks]``, ``seq_lens [B]`` (each
    >= 1) -> ``[B, Hq, D]`` in ``q``'s dtype."""
    bsz, hq, d = q.shape
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    nbk, bt, _, hkv, _ = kv_layer.shape
    lens = [int(n) for n in seq_lens.tolist()]
    _check_lens(lens, bt, block_tables.shape[1])
    first = [first_visible(n, window, chunk) for n in lens]
    for group in _groups(lens, first, bt, 2 * hkv * d * 4):
        idx = torch.tensor(group, dtype=torch.int64, device=q.device)
        out.index_copy_(0, idx, _attend_group(q.index_select(0, idx), kv_layer, block_tables.index_select(0, idx),
                                              [lens[b] for b in group], [first[b] for b in group], nbk, bt, scale,
                                              softcap, sinks, alibi, alibi_bf16))
    return out


def _attend_group(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: list[int], first: list[int],
                  nbk: int, bt: int, scale: float, softcap: float | None, sinks: torch.Tensor | None,
                  alibi: torch.Tensor | None, alibi_bf16: bool) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = kv_layer.shape[3]
    g = hq // hkv
    dev = q.device
    b0 = torch.tensor([f // bt for f in first], dtype=torch.int64, device=dev)  # each sequence's first block
    nb = max(-(-n // bt) - f // bt for n, f in zip(lens, first, strict=True))  # the widest span, in blocks
    n = nb * bt
    rows = kv_layer.index_select(0, _block_ids(tables, b0, nb, nbk)).view(b, n, 2, hkv, d)
    k = torch.empty((b, hkv, n, d), dtype=torch.float32, device=dev)
    k.copy_(rows[:, :, 0].permute(0, 2, 1, 3))
    v = torch.empty((b, hkv, n, d), dtype=torch.float32, device=dev)
    v.copy_(rows[:, :, 1].permute(0, 2, 1, 3))
    s = torch.matmul(q.float().reshape(b, hkv, g, d), k.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, N]
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    kpos = b0[:, None] * bt + torch.arange(n, device=dev)[None, :]  # [B, N]: each column's key position
    qpos = torch.tensor(lens, dtype=torch.int64, device=dev)[:, None] - 1
    if alibi is not None:
        slopes = alibi.float().reshape(1, hkv, g, 1)
        if alibi_bf16:  # Falcon: bf16(slope * bf16(k)) before the scale, as the reference rounds it
            s = s + (slopes * kpos.bfloat16().float()[:, None, None, :]).bfloat16().float() * scale
        else:
            s = s + slopes * (kpos - qpos).float()[:, None, None, :]
    masked = ~((kpos <= qpos) & (kpos >= torch.tensor(first, dtype=torch.int64, device=dev)[:, None]))
    s = s.masked_fill(masked[:, None, None, :], float("-inf"))
    v.masked_fill_(masked[:, None, :, None], 0.0)  # a slot never written may hold NaN: 0 * NaN would reach the output
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:  # one extra logit per query head in the denominator; its column is dropped (it weights no value)
        sink = sinks.float().reshape(1, hkv, g, 1).expand(b, -1, -1, 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(p, v).reshape(b, hq, d).to(q.dtype)

