"""The host buffer bounds a turn: the context a cluster serves is the model's cut to the prompt whose KV a host
buffer holds, a longer turn is refused before any work (never retried), and a prompt that fills most of the buffer
is served and persisted in chunks (its whole copy cannot sit beside its own receive area)."""

from __future__ import annotations

import anyio
import pytest
from engine_helpers import synthetic_config

from dualpath.cluster import Cluster
from dualpath.control.channel import RemoteError
from dualpath.control.schedulerd import _retriable
from dualpath.engine.host_buffer import tokens_that_fit
from dualpath.errors import ModelError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _prompt(n: int) -> list[int]:
    return [1 + i % 900 for i in range(n)]


async def test_a_turn_is_bounded_by_the_host_buffer_and_one_that_fills_most_of_it_is_served() -> None:
    cfg = synthetic_config(host_buffer_bytes=4 << 20, deadline_s=5.0)
    async with Cluster(cfg) as c:
        fb, bt = c.layout.full_block_bytes, c.layout.block_tokens
        fits = tokens_that_fit(4 << 20, fb, bt)
        assert fits == (4 << 20) // fb * bt < c.model_context == 4096
        assert c.max_context == fits == min(de.served_context() for de in c.des) == c.pes[0].served_context()
        # longer than the buffer holds: refused before any work, naming the knob
        with pytest.raises(ModelError, match=f"context of {fits} tokens .*cluster.host_buffer_bytes = 4194304"):
            await c.run_turn("s0", _prompt(fits), 2)
        assert c.failed_turns == 0
        # 95 % of the buffer: served at once (it used to wait for the deadline for room beside its own receive area)
        # and persisted in chunks: its next turn hits every block of it
        n = int(fits * 0.95) // bt * bt
        with anyio.fail_after(4):
            res = await c.run_turn("s1", _prompt(n), 2)
        assert len(res.token_ids) == 2
        assert sum(de.persist_chunked for de in c.des) == 1 and sum(de.persist_skipped for de in c.des) == 0
        assert c.lookup(_prompt(n) + list(res.token_ids)) == n
        # a prompt under half the buffer is persisted whole, as before: its next turn hits
        half = int(fits * 0.4) // bt * bt
        first = await c.run_turn("s2", [2 + i % 800 for i in range(half)], 2)
        second = await c.run_turn("s2", [2 + i % 800 for i in range(half)] + list(first.token_ids) + [5, 6, 7], 2)
        assert second.hit_tokens >= half - bt and sum(de.persist_chunked for de in c.des) == 1


def test_a_request_that_can_never_fit_is_not_retried() -> None:
    assert not _retriable(RemoteError("CapacityError", "de0 host buffer: a request needs 9 bytes but holds 8"))
    assert _retriable(RemoteError("EngineError", "de0: peer failed"))

