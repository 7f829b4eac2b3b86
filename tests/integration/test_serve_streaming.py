"""Streaming, sampling and cancellation in the multi-process deployment (scheduler + one process per engine).

* A seeded sampled turn gives the same tokens as the in-process cluster with the same seed (the decode engine
  process samples with engine/sampling.py); its tokens stream while the turn is still running, and the streamed
  tokens equal the final result's.
* The HTTP API over the deployment (``RemoteBackend``) streams and samples; 500 clients that disconnect
  mid-stream each cancel their turn on both engines: afterwards the engines' heartbeats report no turn held and
  the whole KV pool free, the scheduler has nothing in flight, and the deployment still answers correctly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from serve_util import VOCAB, deployment, scheduler_loaded_torch, tiny_config  # noqa: E402

from dualpath.config import DualPathConfig  # noqa: E402
from dualpath.control.client import ServeClient  # noqa: E402
from dualpath.engine.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, DualPathConfig]]:
    tmp = tmp_path_factory.mktemp("stream")
    cfg = tiny_config(tmp / "kv")
    with deployment(cfg, tmp / "work") as d:
        yield d, cfg
        assert not scheduler_loaded_torch(d)  # after sampled, streamed, logprob and refused turns


def _reference(cfg: DualPathConfig, prompt: list[int], gen: int, sampling: SamplingParams | None) -> list[int]:
    """The in-process cluster's tokens (memory storage, loopback transport) for the same turn."""
    from dualpath.cluster import Cluster

    data = cfg.model_dump(mode="python")
    data["storage"], data["transport"] = {"kind": "memory"}, {"kind": "loopback"}

    async def main() -> list[int]:
        async with Cluster(DualPathConfig.model_validate(data)) as c:
            return list((await c.run_turn("ref", prompt, gen, sampling=sampling)).token_ids)

    return anyio.run(main)


async def _stats(client: ServeClient) -> dict[str, Any]:
    return await client.stats(timeout=5.0)


async def _settled(client: ServeClient, key: str, above: int = -1) -> int:
    """A heartbeat figure once it exceeds ``above`` and stays put for a few heartbeats (bounded wait)."""
    last, same = -1, 0
    with anyio.move_on_after(20):
        while same < 4:
            v = int((await _stats(client)).get(key, -1))
            same = same + 1 if v == last and v > above else 0
            last = v
            await anyio.sleep(0.1)
    return last


def test_seeded_sampling_streams_the_in_process_tokens(dep) -> None:
    d, cfg = dep
    prompt = [(7 * i + 3) % VOCAB for i in range(45)]
    gen = 40
    ref_sampled = _reference(cfg, prompt, gen, SEEDED)
    ref_greedy = _reference(cfg, prompt, gen, None)
    assert ref_sampled != ref_greedy  # (the sampling is not a no-op)

    async def main() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            streamed: list[int] = []
            while_running: list[int] = []  # tokens that arrived while the submit still waited for its result
            info: list[tuple[str, int]] = []

            def on_token(tok: int) -> None:
                streamed.append(tok)
                if c.channel.pending:
                    while_running.append(tok)

            out = await c.run_turn(11, prompt, gen, sampling=SEEDED, on_token=on_token,
                                   on_info=lambda p, h: info.append((p, h)))
            assert out.tokens == ref_sampled  # same tokens as in-process, same seed
            assert streamed == out.tokens  # the stream equals the authoritative result
            assert len(while_running) >= 1 and while_running == out.tokens[: len(while_running)]
            assert info and info[0][0] in ("pe", "de", "split", "recompute")
            # again (the prompt now hits storage): still the same tokens; through the async iterator
            it = c.stream_turn(12, prompt, gen, sampling=SEEDED)
            got = [tok async for tok in it]
            assert got == ref_sampled and it.outcome is not None and it.outcome.tokens == got
            assert it.outcome.hit_tokens > 0
            # greedy (no sampling fields on the wire) streams the greedy tokens
            greedy: list[int] = []
            out = await c.run_turn(13, prompt, gen, on_token=greedy.append)
            assert out.tokens == greedy == ref_greedy
            # a bad sampling field is refused by name before any engine sees it
            from dualpath.control.channel import RemoteError
            from dualpath.control.protocol import ProtocolError

            with pytest.raises((RemoteError, ProtocolError), match="top_p"):
                await c.channel.request(None, "submit", {"session": 14, "prompt": b"\x01" + b"\0" * 7, "gen": 2,
                                                         "top_p": 0.0}, 10.0)
            st = await _stats(c)
            assert st["streamed_tokens"] >= 2 * gen
            # 8 concurrent streams: the DE sends each decode step's tokens of all of them in one message
            before = await _settled(c, "de0.stream_messages")
            outs: dict[int, list[int]] = {}

            async def one(i: int) -> None:
                toks: list[int] = []
                out = await c.run_turn(20 + i, [i + 1, *prompt], gen, on_token=toks.append)
                assert toks == out.tokens
                outs[i] = toks

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(one, i)
            total = sum(len(t) for t in outs.values())
            sent = await _settled(c, "de0.stream_messages", above=before) - before
            assert total == 8 * gen and 1 <= sent <= total // 2, (sent, total)

    anyio.run(main)


def test_http_streams_samples_and_cancels_on_disconnect_without_leaks(dep) -> None:
    from http_helpers import start_http

    from dualpath.http.backend import RemoteBackend
    from dualpath.http.config import HttpConfig

    d, cfg = dep
    prompt = [(5 * i + 1) % VOCAB for i in range(30)]
    n_cancel = 500  # (issue #15: no leak after 500 cancelled streams)

    async def main() -> None:
        backend = RemoteBackend(cfg, d.address)
        async with anyio.create_task_group() as tg:
            url, stop = await start_http(tg, backend, HttpConfig(port=0, max_inflight=64))
            async with httpx.AsyncClient(base_url=url, timeout=60) as cl, \
                    ServeClient.from_config(d.address, cfg) as ctl:
                # sampling is accepted (no 400) and streams the engine's seeded tokens
                body = {"prompt": prompt, "max_tokens": 24, "temperature": SEEDED.temperature,
                        "top_p": SEEDED.top_p, "top_k": SEEDED.top_k, "seed": SEEDED.seed, "stream": True,
                        "return_token_ids": True, "stream_options": {"include_usage": True}}
                async with cl.stream("POST", "/v1/completions", json=body) as s:
                    assert s.status_code == 200, await s.aread()
                    assert s.headers["x-dualpath-read-path"] in ("pe", "de", "split", "recompute")
                    events = [line[6:] async for line in s.aiter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                toks = [t for ch in chunks for c in ch["choices"] for t in c.get("token_ids", [])]
                direct = await ctl.run_turn(99, prompt, 24, sampling=SEEDED)
                assert toks == direct.tokens and len(toks) == 24
                assert chunks[-1]["usage"]["completion_tokens"] == 24

                # clients that go away mid-stream: each turn is cancelled on both engines
                async def cancel_one(i: int) -> None:
                    b = {"prompt": [i % 90 + 1, *prompt], "max_tokens": 1000, "stream": True, "temperature": 0,
                         "return_token_ids": True}
                    async with cl.stream("POST", "/v1/completions", json=b) as resp:
                        assert resp.status_code == 200
                        async for _line in resp.aiter_lines():
                            break

                for start in range(0, n_cancel, 5):
                    async with anyio.create_task_group() as burst:
                        for i in range(start, min(n_cancel, start + 5)):
                            burst.start_soon(cancel_one, i)

                # nothing left behind: no turn held by either engine, the whole KV pool free, nothing in flight
                pool = cfg.cluster.kv_pool_tokens
                st: dict[str, Any] = {}
                with anyio.move_on_after(60):
                    while True:
                        st = await _stats(ctl)
                        if (st.get("de0.inflight") == 0 and st.get("pe0.inflight") == 0 and st["inflight"] == 0
                                and st.get("de0.free_kv_tokens") == pool and st.get("de0.seq") == 0
                                and st.get("pe0.seq") == 0 and backend.inflight == 0):
                            break
                        await anyio.sleep(0.1)
                want = {"de0.inflight": 0, "pe0.inflight": 0, "inflight": 0, "de0.free_kv_tokens": pool,
                        "de0.seq": 0, "pe0.seq": 0}  # (turns held, pool room, turns assigned, per engine)
                assert {k: st.get(k) for k in want} == want, json.dumps(st)
                assert backend.inflight == 0
                assert st["cancelled"] + st.get("cancelled_on_engines", 0) >= n_cancel
                assert st.get("cancelled_on_engines", 0) >= 1  # (turns that were running were aborted there)
                assert st.get("completed", 0) < n_cancel  # they did not run to their 1,000 tokens
                # and the deployment still answers correctly
                again = await ctl.run_turn(100, prompt, 24, sampling=SEEDED)
                assert again.tokens == direct.tokens
            stop.set()

    anyio.run(main)


def test_stream_notices_are_delivered_once_in_order_and_sampling_fields_are_checked() -> None:
    from dualpath.control.client import _Stream
    from dualpath.control.protocol import ProtocolError, decode, encode, sampling_body, sampling_of

    got: list[int] = []
    st = _Stream(got.append, None)
    st.deliver(3, [13, 14])  # ahead of a gap: held
    st.deliver(0, [10, 11])
    assert got == [10, 11]
    st.deliver(1, [11, 12])  # overlaps what was delivered: only the new token, then the held ones
    st.deliver(0, [10])  # a duplicate
    assert got == [10, 11, 12, 13, 14]
    # sampling parameters survive the wire; bad values are refused naming the field
    body = {"session": 1, "prompt": b"\x01" + b"\0" * 7, "gen": 4, **sampling_body(SEEDED)}
    assert sampling_of(decode(encode("submit", body)).body, "submit") == SEEDED
    assert sampling_of({"session": 1}, "submit") is None
    with pytest.raises(ProtocolError, match="top_k"):
        encode("submit", {**body, "top_k": -1})
    with pytest.raises(ProtocolError, match="top_p"):
        sampling_of({**body, "top_p": 0.0}, "submit")
    with pytest.raises(ProtocolError, match="counts"):
        encode("tokens", {"rids": [1], "offsets": [0], "counts": [0], "tokens": []})


def test_the_client_hears_once_that_the_prompt_is_stored_while_the_turn_decodes(dep) -> None:
    """``run_turn(on_stored=)``: the DE's ``stored`` notice reaches the client (a ``stream`` notice with
    ``stored: true``) once, while the turn still decodes, and a turn sent then loads every Full Block of the
    prompt (the HTTP front's shared prefixes and choices start there)."""
    import time

    d, cfg = dep
    bt = cfg.cluster.block_tokens
    prompt = [(11 * i + 5) % VOCAB for i in range(6 * bt + 3)]

    async def main() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            told: list[float] = []
            follower: list[Any] = []

            async def follow() -> None:
                follower.append(await c.run_turn(41, prompt, 2))

            async with anyio.create_task_group() as tg:
                def on_stored() -> None:
                    told.append(time.perf_counter())
                    tg.start_soon(follow)

                out = await c.run_turn(40, prompt, 300, on_token=lambda t: None, on_stored=on_stored)
                t_end = time.perf_counter()
            assert len(told) == 1 and told[0] < t_end - 0.1, (told, t_end)  # (300 steps of 2 ms after it)
            assert out.hit_tokens == 0 and follower[0].hit_tokens == 6 * bt
            # the result says when the last token was out (its TPOT counts to it), before the turn's end
            assert out.t_first_token < out.timings.t_last_token <= out.t_done
            assert out.tpot == pytest.approx((out.timings.t_last_token - out.t_first_token) / 299)

    anyio.run(main)


def test_a_cache_salt_keeps_a_deployments_stored_prefixes_apart(dep) -> None:
    """``run_turn(salt=)`` in a deployment: the salt reaches the scheduler's lookups and both engines' keys, so
    a prompt stored under one salt is a hit for that salt only; the tokens are the same either way."""
    d, cfg = dep
    bt = cfg.cluster.block_tokens
    prompt = [(13 * i + 1) % VOCAB for i in range(5 * bt + 2)]

    async def main() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            first = await c.run_turn(60, prompt, 3, salt="tenant-a")
            assert first.hit_tokens == 0
            for i, (salt, want) in enumerate((("tenant-a", 5 * bt), ("tenant-b", 0), (None, 0))):
                out = await c.run_turn(61 + i, prompt, 3, salt=salt)
                assert out.tokens == first.tokens and out.hit_tokens == want, (salt, out.hit_tokens)

    anyio.run(main)


def test_a_requests_own_sampling_error_comes_back_once_by_its_code(dep) -> None:
    """Sampling masks that exclude every token fail on the decode engine process: the client gets the engine's
    ``InvalidTurn`` code (the scheduler passes a peer's error on with its own code; the HTTP front maps it to
    400, as in process), the scheduler does not re-run the turn (it would fail the same way), and the deployment
    still answers."""
    from dualpath.control.channel import RemoteError

    d, cfg = dep
    prompt = [(7 * i + 3) % VOCAB for i in range(20)]

    async def main() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            before = await _stats(c)
            for temperature in (0.0, 1.0):
                bad = SamplingParams(temperature=temperature, seed=1, allowed_ids=(5, 6), bad_words=((5,), (6,)))
                with pytest.raises(RemoteError) as ei:
                    await c.run_turn(70, prompt, 3, sampling=bad)
                assert ei.value.code == "InvalidTurn", ei.value
                assert "allowed_token_ids, bad_words exclude every token" in ei.value.remote_message
            after = await _stats(c)
            assert after.get("retries", 0) == before.get("retries", 0)  # (counters appear once they count)
            assert after.get("failed", 0) == before.get("failed", 0) + 2
            out = await c.run_turn(71, prompt, 3, sampling=SamplingParams(allowed_ids=(5, 6), bad_words=((5,),)))
            assert out.tokens == [6, 6, 6]

    anyio.run(main)
