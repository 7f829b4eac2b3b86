"""Batched pure-torch paged decode attention: what the ``torch`` backend runs (the CPU default).

:mod:`.reference` loops over sequences and is the tests' oracle; this computes the same thing for a whole decode
batch at once: one ``index_select`` of the batch's Layer Blocks from the pool, one copy that converts them to
float32 in ``[B, Hkv, N, D]`` order, two batched matmuls and one masked softmax. With 16-token blocks scattered over
a large pool that is 3-7x faster than the loop (``benchmarks/cpu_decode_attention.py``), and the loop's cost is most
of a CPU decode step's attention.

Sequences are padded to the longest one's span of blocks; a key past a sequence's length, before its window or
outside its chunk is masked (``-inf``), so it weights nothing. Each sequence's span starts at the block of its first
visible key (a sliding window or a chunk gathers only its own blocks). The batch is split into groups of similar
length (longest first) so that the float32 keys and values of a group stay under :data:`GROUP_BYTES`. Block-table
entries past a sequence's span are never read as block ids (they are clamped to a valid block and masked), so a
table padded with anything (``-1``, stale ids) is fine. Semantics (``softcap``, ``window``, ``sinks``, ``alibi``,
``alibi_bf16``, ``chunk``) are :func:`dualpath.kernels.reference.paged_decode_attention`'s.
"""

from __future__ import annotations

import torch

from dualpath.errors import KernelError

#: float32 K and V bytes of one group of sequences (the batch is split above this)
GROUP_BYTES = 64 << 20


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
    if min(lens) < 1 or -(-max(lens) // bt) > block_tables.shape[1]:
        raise KernelError(f"seq_lens must be >= 1 and fit block_tables' {block_tables.shape[1]} blocks of {bt} "
                          f"tokens, got {min(lens)}..{max(lens)}")
    first = []
    for n in lens:
        f = max(0, n - window) if window is not None else 0
        if chunk is not None:  # the query (position n - 1) sees its own chunk only
            f = max(f, (n - 1) // chunk * chunk)
        first.append(f)
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
    cols = b0[:, None] + torch.arange(nb, device=dev)[None, :]  # [B, nb]: table columns read
    cols = cols.clamp_(max=tables.shape[1] - 1)
    ids = tables.long().gather(1, cols).clamp_(0, nbk - 1)  # past a span: any valid block (masked below)
    n = nb * bt
    rows = kv_layer.index_select(0, ids.reshape(-1)).view(b, n, 2, hkv, d)
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
    valid = (kpos <= qpos) & (kpos >= torch.tensor(first, dtype=torch.int64, device=dev)[:, None])
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    if sinks is None:
        p = torch.softmax(s, dim=-1)
    else:  # one extra logit per query head in the denominator; its column is dropped (it weights no value)
        sink = sinks.float().reshape(1, hkv, g, 1).expand(b, -1, -1, 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(p, v).reshape(b, hq, d).to(q.dtype)
