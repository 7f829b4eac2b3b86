"""Bytes charged per link for one request match the paper's data-path tables (sections 3.2/3.3), exactly."""

from __future__ import annotations

import pytest
from engine_helpers import BT, synthetic_config

from dualpath.cluster import Cluster
from dualpath.engine.decode import kv_target

L, B = 4, 2 * 2 * 64 * 2  # layers, bytes per token-layer of the synthetic config (2 KV heads, dim 64, bf16)
LB, FB = L * B, L * BT * B


def expected(path: str, p: int, h: int, hp: int, g: int) -> dict[str, int]:
    """The table in dualpath.engine.links for prompt p, hit h (hp of it read on the PE side), g generated."""
    hd = h - hp
    w = p // BT - h // BT
    gb = kv_target(p, g, BT) // BT - p // BT
    out = {
        "pnode0.snic.read": hp * LB,
        "pe0.cnic.in": h * LB,
        "pe0.cnic.out": (p - hd) * LB,
        "de0.cnic.in": (p - hd) * LB + p * LB,
        "de0.cnic.out": hd * LB + gb * FB,
        "dnode0.snic.read": hd * LB,
        "dnode0.snic.write": (w + gb) * FB,
    }
    return {k: v for k, v in out.items() if v}


@pytest.mark.anyio
@pytest.mark.parametrize("path,pe_blocks", [("pe", None), ("de", None), ("split", 2), ("recompute", None)])
async def test_exact_bytes_per_link(path, pe_blocks):
    first = list(range(3, 3 + 90))
    async with Cluster(synthetic_config(n_layers=L, snic_gbps=50.0, cnic_gbps=50.0)) as c:
        r1 = await c.run_turn("s", first, 7, path="recompute")
        prompt = first + r1.token_ids + list(range(500, 540))
        before = c.linkset.bytes_by_link()
        r2 = await c.run_turn("s", prompt, 20, path=path, pe_blocks=pe_blocks)
        after = c.linkset.bytes_by_link()
    p, g = len(prompt), 20
    h = 0 if path == "recompute" else (90 + 7) // BT * BT  # every full block of the earlier context
    hp = {"pe": h, "de": 0, "split": 2 * BT, "recompute": 0}[path]
    want = expected(path, p, h, hp, g)
    assert r2.hit_tokens == h
    assert r2.link_bytes == want
    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert moved == want  # the links themselves carried exactly that


@pytest.mark.anyio
async def test_miss_return_is_small_on_the_de_path():
    """DE path: the fabric carries the hit DE->PE and only the miss back; PE path: the whole prompt PE->DE."""
    first = list(range(1, 1 + 200))
    async with Cluster(synthetic_config(n_layers=L)) as c:
        r1 = await c.run_turn("s", first, 1, path="recompute")
        prompt = first + r1.token_ids + [9, 9, 9]
        de = await c.run_turn("s", prompt, 1, path="de")
        pe = await c.run_turn("s", prompt, 1, path="pe")
    miss = len(prompt) - de.hit_tokens
    assert de.link_bytes["pe0.cnic.out"] == miss * LB
    assert pe.link_bytes["pe0.cnic.out"] == len(prompt) * LB
    assert de.link_bytes["de0.cnic.out"] == de.hit_tokens * LB
