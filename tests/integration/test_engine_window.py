"""The DE-path streaming window and the layer-wise switch: the PE holds a bounded ring of one-layer scratch
caches, the DE stays at most ``layers_ahead`` layers ahead, and every setting gives the same tokens."""

from __future__ import annotations

import pytest
from engine_helpers import run_session, synthetic_config

from dualpath.cluster import Cluster


@pytest.mark.anyio
async def test_window_and_layerwise_switch_give_the_same_tokens():
    async with Cluster(synthetic_config()) as c:
        want = [r.token_ids for r in await run_session(c, "recompute", vocab=1000)]
    for kw, ring in (({"layers_ahead": 1}, 2), ({"layers_ahead": 16}, 4), ({"layerwise": False}, 4)):
        async with Cluster(synthetic_config(n_layers=4, **kw)) as c:
            assert c.pes[0].scratch.shape[0] == ring  # layers of KV the PE device holds at once
            lead: list[int] = []
            orig = c.pes[0].model.prefill_layer

            async def spy(state, layer, kv, _orig=orig, _c=c, _lead=lead):
                # layers the DE has been allowed to send beyond the one being computed
                exposed = max((sum(e.is_set() for e in t.exposed) for t in _c.pes[0]._inflight), default=0)
                _lead.append(exposed - layer - 1)
                await _orig(state, layer, kv)

            c.pes[0].model.prefill_layer = spy
            for path in ("de", "split", "pe"):
                got = [r.token_ids for r in await run_session(c, path, session=path, vocab=1000)]
                assert got == want, (kw, path)
            assert max(lead) <= ring - 1
