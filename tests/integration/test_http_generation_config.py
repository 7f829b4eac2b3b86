"""A checkpoint's ``generation_config.json`` over HTTP: its end-of-sequence ids end answers (also with no
tokenizer), its sampling values are the defaults of a request that sets none (``http.generation_config``), and a
tokenizer-less model's completions carry their token ids. The reference is transformers' own greedy continuation
of a random checkpoint transformers wrote."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest
import torch
from engine_helpers import hf_llama, llama_config
from http_helpers import start_http

from dualpath.errors import ModelError
from dualpath.http.app import Server
from dualpath.http.backend import Backend, InProcessBackend
from dualpath.http.config import HttpConfig
from dualpath.http.schemas import CompletionRequest
from dualpath.model.generation_config import GenerationDefaults, read_generation_defaults

PROMPT = [5, 17, 42, 99, 7, 150, 33, 8, 61, 120, 3, 77]
N = 10


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (no end-of-sequence id)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.anyio
async def test_generation_config_eos_and_defaults_without_a_tokenizer(tmp_path: Path):
    model = hf_llama(tmp_path)  # (no tokenizer is saved)
    greedy = _greedy(model, PROMPT, N)
    # an end-of-sequence id that the continuation reaches late, but not first: the answer must end there
    stop_at = next(i for i in range(3, N) if greedy[i] not in greedy[:i])
    eos = greedy[stop_at]
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [eos, 210], "temperature": 0.0, "top_k": 5, "_from_model_config": False}))
    (tmp_path / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "config.json").read_text()), "eos_token_id": 209}))
    defaults = read_generation_defaults(tmp_path)
    assert defaults.eos_ids == (eos, 210) and defaults.temperature == 0.0 and defaults.top_k == 5

    cfg = llama_config(tmp_path, kv_pool_tokens=4096)
    async with anyio.create_task_group() as tg:
        backend = InProcessBackend(cfg)
        url, stop = await start_http(tg, backend, HttpConfig(port=0))
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as cl:
                assert backend.tokenizer is None

                async def complete(**kw: object) -> dict:
                    r = await cl.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": N, **kw})
                    assert r.status_code == 200, r.text
                    return r.json()["choices"][0]

                # no temperature in the request: the file's 0.0 (greedy); the file's eos id ends the answer, and
                # with no tokenizer the ids come back without asking (the text cannot be made)
                ch = await complete()
                assert ch["token_ids"] == greedy[: stop_at + 1] and ch["finish_reason"] == "stop", ch
                assert ch["text"] == ""
                # ignore_eos: the whole greedy continuation
                ch = await complete(ignore_eos=True)
                assert ch["token_ids"] == greedy and ch["finish_reason"] == "length"
                # stop_token_ids ends it earlier, and still does with ignore_eos
                ch = await complete(stop_token_ids=[greedy[1]])
                assert ch["token_ids"] == greedy[: greedy.index(greedy[1]) + 1] and ch["finish_reason"] == "stop"
                ch = await complete(stop_token_ids=[greedy[2]], ignore_eos=True)
                assert ch["token_ids"] == greedy[: greedy.index(greedy[2]) + 1]
                # streamed: the same ids, chunk by chunk
                ids: list[int] = []
                finish = None
                async with cl.stream("POST", "/v1/completions",
                                     json={"prompt": PROMPT, "max_tokens": N, "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            c = json.loads(line[6:])["choices"][0]
                            ids += c.get("token_ids") or []
                            finish = c.get("finish_reason") or finish
                assert ids == greedy[: stop_at + 1] and finish == "stop"
                # refused, naming the field: a stop string (never matchable without a tokenizer), an id outside the
                # vocabulary, a negative id
                for body, param in (({"stop": ["x"]}, "stop"), ({"stop_token_ids": [211]}, "stop_token_ids")):
                    r = await cl.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body})
                    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                r = await cl.post("/v1/completions", json={"prompt": PROMPT, "stop_token_ids": [-1]})
                assert r.status_code == 400 and "stop_token_ids" in r.text
                ch = await complete(stop=[])  # (an empty list asks for nothing: served)
                assert ch["token_ids"] == greedy[: stop_at + 1]
        finally:
            stop.set()


def _server(gen: GenerationDefaults, **http: object) -> Server:
    backend = Backend()  # (nothing is generated: only the request's sampling is built)
    backend.generation, backend.vocab_size = gen, 1000
    return Server(backend, HttpConfig(**http))


def test_sampling_defaults_from_the_checkpoint():
    gen = GenerationDefaults(eos_ids=(7, 9), temperature=0.6, top_p=0.95, top_k=20, min_p=0.05,
                             repetition_penalty=1.1)
    s = _server(gen).sampling(CompletionRequest(prompt=[1, 2]))
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.1)
    assert s.stop_ids == (7, 9)
    # what the request sets wins, field by field (top_k -1: off)
    s = _server(gen).sampling(CompletionRequest(prompt=[1], temperature=1.2, top_k=-1, repetition_penalty=1.0,
                                                stop_token_ids=[3]))
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (1.2, 0.95, 0, 1.0)
    assert s.stop_ids == (3, 7, 9)
    # a configured default temperature wins over the file's; generation_config none ignores the file's sampling
    assert _server(gen, default_temperature=0.3).sampling(CompletionRequest(prompt=[1])).temperature == 0.3
    s = _server(gen, generation_config="none").sampling(CompletionRequest(prompt=[1]))
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    # max_new_tokens is the answer's length when a request gives none (within the context), unless configured
    with_new = GenerationDefaults(max_new_tokens=40)
    assert _server(with_new).limit(10, None, "max_tokens") == 40
    assert _server(with_new).limit(10, 7, "max_tokens") == 7
    assert _server(with_new, max_tokens_default=12).limit(10, None, "max_tokens") == 12
    assert _server(with_new, generation_config="none").limit(10, None, "max_tokens") == 256
    assert s.stop_ids == (7, 9)  # (end-of-sequence ids are not a sampling preference)
    assert _server(gen).sampling(CompletionRequest(prompt=[1], ignore_eos=True)).stop_ids == ()


def test_read_generation_defaults_sources_and_bad_files(tmp_path: Path):
    assert read_generation_defaults(tmp_path) == GenerationDefaults()
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": [1, 106]}}))
    assert read_generation_defaults(tmp_path).eos_ids == (1, 106)  # a multimodal wrapper's text model
    assert read_generation_defaults(tmp_path / "config.json").eos_ids == (1, 106)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert read_generation_defaults(tmp_path).eos_ids == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": None, "top_p": None}))
    got = read_generation_defaults(tmp_path)
    assert got.eos_ids == (2,) and got.sampling() == {}  # null: not set; config.json's id is the fallback
    for bad, key in (({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 1.5}, "top_k"),
                     ({"max_new_tokens": 0}, "max_new_tokens"),
                     ({"eos_token_id": [1, "x"]}, "eos_token_id"), ({"repetition_penalty": -1}, "repetition_penalty"),
                     ({"min_p": float("nan")}, "min_p")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=f"generation_config.json: {key}"):
            read_generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="generation_config.json: not a readable JSON"):
        read_generation_defaults(tmp_path)
