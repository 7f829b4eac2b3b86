"""Chunked prefill on the runtime PE (paper 7.5): when the compute quota cuts a request, its later chunks attend to
the earlier chunks' KV kept on the PE, and the result (first-token logits, every generated token and logit, the
bytes each link moved) is the unchunked run's, on both read paths and inside a shared batch. A turn that fails
between its chunks gives back everything the PE held for it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import torch
from engine_helpers import BT, SESSION, llama_config, run_session, session_prompts, synthetic_config

from dualpath.cluster import Cluster
from dualpath.config import DualPathConfig
from dualpath.engine.model_api import LlamaAdapter
from dualpath.engine.timemodel import LayerTimeModel
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

pytest.importorskip("transformers")

#: new tokens per forward the quota allows: a time model of exactly one second per token and layer
CHUNK = 12
L = 3  # layers of engine_helpers' tiny Llama


def _model(cfg: DualPathConfig) -> Callable[[torch.device], LlamaAdapter]:
    """The real checkpoint with a fixed time model (1 s per token and layer), so the quota's cuts are exact."""
    tm = LayerTimeModel(a=0.0, b=1.0, e=0.0, d=0.0, n_layers=L)

    mc = cfg.model
    assert isinstance(mc, LlamaModelConfig)

    def build(device: torch.device) -> LlamaAdapter:
        model, _ = load_model(mc, device, with_tokenizer=False)
        return LlamaAdapter(model, BT, time_model=tm)

    return build


def _cluster(model_dir: Any, chunked: bool, **cluster: Any) -> Cluster:
    cfg = llama_config(model_dir, keep_logits=True, **cluster)
    cfg.cluster.prefill_quota_s = L * (CHUNK + 0.5) if chunked else None
    return Cluster(cfg, model=_model(cfg))


def _same(got: list[Any], want: list[Any]) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.token_ids == b.token_ids, i
        assert a.hit_tokens == b.hit_tokens, i
        assert a.link_bytes == b.link_bytes, i  # nothing read or shipped twice
        for x, y in zip(a.logits, b.logits, strict=True):  # the first one is the prefill's
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["pe", "de"])
async def test_a_chunked_session_equals_the_unchunked_one(model_dir: Any, path: str) -> None:
    runs = {}
    counts = {}
    for chunked in (False, True):
        # layers_ahead=1: layers 0 and 2 share a scratch slot, so a chunk finds its earlier rows only if it restores them
        async with _cluster(model_dir, chunked, layers_ahead=1) as c:
            with anyio.fail_after(120):
                runs[chunked] = await run_session(c, path)
            pe = c.pes[0]
            counts[chunked] = (pe.forwards, pe.chunks, pe.chunk_bytes, pe.host.used_bytes)
    _same(runs[True], runs[False])
    # the hits came from storage on the chosen side (turns 2 and 3), and every turn was cut into >= 3 chunks
    assert [r.hit_tokens for r in runs[True]] == [0, 32, 64]
    if path == "de":  # the DE streamed its hit to the PE once, in the first chunk
        assert runs[True][2].link_bytes["pe0.cnic.in"] == 64 * L * c.layout.spec.bytes_per_token_layer
    want = [math.ceil((r.prompt_tokens - r.hit_tokens) / CHUNK) for r in runs[True]]
    assert min(want) >= 3
    assert counts[False] == (len(SESSION), 0, 0, 0)
    assert counts[True] == (sum(want), sum(want), 0, 0)  # one request per forward; all memory given back


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "layerwise"), [("split", True), ("de", False), ("pe", False)])
async def test_synthetic_model_chunks_on_every_path_and_in_basic_mode(path: str, layerwise: bool) -> None:
    """The synthetic model's tokens hash every KV row it attends over (hit and earlier chunks included), its time
    model is exact; ``layerwise=False`` (the 'basic' baseline) loads every layer's cached rows before layer 0."""
    tokens = {}
    for chunked in (False, True):
        cfg = synthetic_config(layerwise=layerwise, layers_ahead=1)
        async with Cluster(cfg) as c:
            pe = c.pes[0]
            per_token = pe.model.predict_prefill_s(0, 8)
            assert per_token is not None
            cfg.cluster.prefill_quota_s = per_token if chunked else None  # about 8 new tokens per forward
            take = pe._take_batch

            def scribbled(take: Callable[[], Any] = take, pe: Any = pe) -> Any:
                assert pe.scratch is not None
                pe.scratch.random_(0, 256)  # no forward may rely on what an earlier one left in the scratch
                return take()

            pe._take_batch = scribbled  # type: ignore[method-assign]
            with anyio.fail_after(120):
                res = await run_session(c, path, pe_blocks=1 if path == "split" else None, vocab=1000)
            tokens[chunked] = [r.token_ids for r in res], [r.link_bytes for r in res], [r.hit_tokens for r in res]
            assert (pe.chunks > 3 * len(SESSION)) == chunked and pe.chunk_bytes == 0 and pe.host.used_bytes == 0
    assert tokens[True] == tokens[False]
    assert tokens[True][2][1:] == [32, 64]


async def _queued(model_dir: Any, chunked: bool, prompts: list[list[int]]) -> tuple[list[Any], list[Any]]:
    """Run ``prompts`` queued together on one PE behind a first request (its compute held until they queue);
    returns the results (first request first) and the PE's forward batches as (session, start, end)."""
    batches: list[list[tuple[str, int, int]]] = []
    out: list[Any] = [None] * (len(prompts) + 1)
    async with _cluster(model_dir, chunked) as c:
        pe = c.pes[0]
        take = pe._take_batch

        def spy() -> Any:
            batch = take()
            batches.append([(x.turn.session, x.start, x.end) for x in batch])
            return batch

        pe._take_batch = spy  # type: ignore[method-assign]

        async def one(i: int, ids: list[int]) -> None:
            out[i] = await c.run_turn(f"s{i}", ids, 3, path="recompute")

        limiter = pe.model._limiter  # type: ignore[attr-defined]
        await limiter.acquire()  # the PE's compute waits until every request is queued
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, 0, [9, 8, 7])
                while not pe._inflight:
                    await anyio.sleep(0.001)
                for i, ids in enumerate(prompts, 1):
                    tg.start_soon(one, i, ids)
                while len(pe.queue) < len(prompts):
                    await anyio.sleep(0.001)
                limiter.release()
        assert pe.chunk_bytes == 0 and pe.host.used_bytes == 0
    return out, batches


@pytest.mark.anyio
async def test_a_cut_request_shares_its_first_forward_and_matches(model_dir: Any) -> None:
    """Three requests queued together: the quota packs two whole and cuts the third, whose rest runs next."""
    prompts = [[(7 * i + s) % 200 + 1 for i in range(n)] for s, n in enumerate((5, 4, 30))]
    want, _ = await _queued(model_dir, False, prompts)
    got, batches = await _queued(model_dir, True, prompts)
    _same(got, want)
    # forward 2 holds requests 1 and 2 whole and the first 3 tokens of request 3 (5 + 4 + 3 = CHUNK); then 12, 12, 3
    assert batches[0] == [("s0", 0, 3)]
    assert batches[1] == [("s1", 0, 5), ("s2", 0, 4), ("s3", 0, 3)]
    assert batches[2:] == [[("s3", 3, 15)], [("s3", 15, 27)], [("s3", 27, 30)]]


@pytest.mark.anyio
async def test_a_turn_failing_between_its_chunks_gives_back_its_memory(model_dir: Any) -> None:
    async with _cluster(model_dir, True) as c:
        pe, de = c.pes[0], c.des[0]
        first = await c.run_turn("s", list(range(1, 40)), 4, path="recompute")
        prompt = list(range(1, 40)) + first.token_ids + list(range(50, 90))
        seen = 0
        with anyio.fail_after(60):
            with anyio.CancelScope() as scope:

                async def watch() -> None:
                    nonlocal seen
                    while pe.chunk_bytes == 0:
                        await anyio.sleep(0.0005)
                    seen = pe.chunk_bytes
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await c.run_turn("s", prompt, 4, path="pe")
        assert seen > 0  # cancelled while the PE held the turn's earlier chunks (and its PE-read hit)
        with anyio.fail_after(30):
            while pe.queue or pe._inflight:
                await anyio.sleep(0.001)
        assert pe.chunk_bytes == 0 and pe.host.used_bytes == 0 and de.host.used_bytes == 0
        again = await c.run_turn("s", prompt, 4, path="pe")  # the cluster still serves it
        assert again.hit_tokens > 0 and len(again.token_ids) == 4


def test_dualpath_run_reports_its_chunks(tmp_path: Any) -> None:
    """`dualpath run` with a quota that binds: every turn completes and the JSON counts the PE's chunks."""
    import json

    from dualpath.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: {kind: synthetic, n_layers: 2, n_kv_heads: 1, head_dim: 16, decode_step_s: 0.002, vocab_size: 1024,\n"
        "        max_context: 4096, device_tflops: 1000.0}\n"
        "cluster: {snic_gbps: null, cnic_gbps: null, kv_pool_tokens: 16384, host_buffer_bytes: 8388608}\n"
        "workload: {dataset: tiny, n_agents: 2}\n"
        "scheduler: {compute_quota_s: 1.0e-4}\n"  # about 50 new tokens per forward
        f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n"
    )
    out = tmp_path / "run.json"
    assert main(["run", "--config", str(cfg), "--policy", "dualpath,round_robin", "--json", str(out), "--quiet"]) == 0
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    dp, rr = runs["dualpath"], runs["round_robin"]
    assert dp["complete"] and rr["complete"] and dp["turns"] == rr["turns"] == 9
    assert dp["prefill_chunks"] > dp["turns"] and dp["prefill_forwards"] >= dp["prefill_chunks"] // 2
    assert rr["prefill_chunks"] == 0  # round_robin packs by size only (no quota)


@pytest.mark.anyio
async def test_a_chunked_prefill_longer_than_the_deadline_reaches_the_de() -> None:
    """Only the final chunk ships KV, so the DE's first layer can come the turn's whole prefill after it started:
    a prefill several times ``deadline_s`` long, cut into many chunks, must not time out on the DE."""
    probe = synthetic_config()
    async with Cluster(probe) as c:
        per_1 = c.pes[0].model.predict_prefill_s(0, SESSION[0][0])
    assert per_1 is not None
    cfg = synthetic_config(deadline_s=0.4)
    assert cfg.model.kind == "synthetic"
    cfg.model.device_tflops *= per_1 / 1.2  # the first turn's prefill: 1.2 s, three times the deadline
    cfg.cluster.prefill_quota_s = 0.1
    async with Cluster(cfg) as c:
        with anyio.fail_after(60):
            res = await c.run_turn("long", session_prompts(vocab=1000)[0], 2, path="pe")
        assert len(res.token_ids) == 2 and c.pes[0].chunks >= 10
