"""The PE path's layer-ahead staging (``pe_read.LayerPrefetch``, on by default on a GPU): each layer's PE-read hit
gathered by a worker thread into a contiguous tensor ahead of its layer, then copied to the device. Turned on for a
CPU engine here, a real checkpoint's session gives exactly the direct copy's tokens, logits and link bytes, layer-
wise and in the 'basic' (every layer first) mode; and the staging really ran (one gather per layer per hit turn)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from engine_helpers import SESSION, llama_config, run_session

from dualpath.cluster import Cluster
from dualpath.paths.pe_read import LayerPrefetch, pe_host_blocks

pytest.importorskip("transformers")

L = 3  # layers of engine_helpers' tiny Llama


async def _session(model_dir: Any, staged: bool, layerwise: bool) -> tuple[list[Any], int]:
    cfg = llama_config(model_dir, keep_logits=True, layerwise=layerwise)
    async with Cluster(cfg) as c:
        c.pes[0].stage_h2d = staged
        with anyio.fail_after(120):
            results = await run_session(c, "pe")
        return results, c.pes[0].h2d_staged


@pytest.mark.anyio
@pytest.mark.parametrize("layerwise", [True, False])
async def test_staged_h2d_equals_the_direct_copy(model_dir: Any, layerwise: bool) -> None:
    want, direct = await _session(model_dir, False, layerwise)
    got, staged = await _session(model_dir, True, layerwise)
    assert direct == 0
    hit_turns = sum(r.hit_tokens > 0 for r in got)
    assert hit_turns == len(SESSION) - 1  # every turn after the first reads its context's blocks on the PE
    assert staged == L * hit_turns
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.token_ids == b.token_ids, i
        assert a.hit_tokens == b.hit_tokens > 0 or i == 0, i
        assert a.link_bytes == b.link_bytes, i
        for x, y in zip(a.logits, b.logits, strict=True):
            assert torch.equal(x, y), i  # the same bytes reached the same kernels


class _FakeTurn:
    """Just what LayerPrefetch reads of a Turn: its layout, PE hit and host region."""

    def __init__(self, data: torch.Tensor, layout: Any, hit: int) -> None:
        self.layout, self.pe_hit_blocks, self.pe_blocks = layout, hit, data.shape[0]
        self.pe_host = type("R", (), {"data": data.reshape(-1)})()


class _Layout:
    n_layers, block_tokens, bytes_per_token_layer = 4, 2, 8

    @property
    def full_block_shape(self) -> tuple[int, int, int]:
        return (self.n_layers, self.block_tokens, self.bytes_per_token_layer)


@pytest.mark.anyio
async def test_prefetch_stages_each_layer_one_ahead_and_reports_a_failed_gather(monkeypatch: Any) -> None:
    layout = _Layout()
    data = torch.randint(0, 256, (5, *layout.full_block_shape), dtype=torch.uint8)
    turn: Any = _FakeTurn(data, layout, hit=3)
    assert torch.equal(pe_host_blocks(turn), data)
    async with anyio.create_task_group() as tg:
        pf = LayerPrefetch(tg, pin=False)
        for layer in range(layout.n_layers):
            got = await pf.take(turn, layer)
            assert got.is_contiguous() and torch.equal(got, data[:3, layer])
            # the next layer's gather has begun (none past the last layer)
            assert set(pf._jobs) == ({(id(turn), layer + 1)} if layer + 1 < layout.n_layers else set())
        assert pf.gathered == layout.n_layers

    def boom(src: torch.Tensor, pin: bool) -> torch.Tensor:
        raise RuntimeError("pinning failed")

    monkeypatch.setattr("dualpath.paths.pe_read._gather_pinned", boom)
    async with anyio.create_task_group() as tg:
        pf = LayerPrefetch(tg, pin=False)
        with pytest.raises(RuntimeError, match="pinning failed"):
            await pf.take(turn, 0)
