"""``dualpath serve --http`` in its default mode: the real command starts the multi-process deployment (scheduler
+ one process per engine) and puts the HTTP API in front. Tokens equal the in-process cluster's; the second
turn reports cached tokens; a seeded sampled request gives the in-process cluster's tokens for that seed (the
decode engine process samples); /health and /metrics see the engines; SIGTERM stops every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from serve_util import cached_tokens_total, stop_process, survivors, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow


def _reference(cfg, prompt: list[int], gen: int, sampling=None) -> list[int]:
    return list(_reference_turn(cfg, prompt, gen, sampling).token_ids)


def _reference_turn(cfg, prompt: list[int], gen: int, sampling=None):
    """The in-process cluster's :class:`TurnResult` for the same config (memory storage, loopback transport)."""
    import anyio

    from dualpath.cluster import Cluster
    from dualpath.config import DualPathConfig

    data = cfg.model_dump(mode="python")
    data["storage"], data["transport"] = {"kind": "memory"}, {"kind": "loopback"}

    async def main():
        async with Cluster(DualPathConfig.model_validate(data)) as c:
            return await c.run_turn("ref", prompt, gen, sampling=sampling)

    return anyio.run(main)


def test_serve_http_fronts_the_multi_process_deployment(tmp_path: Path):
    # a host buffer that holds fewer tokens' KV than the model's context: the context served is cut to it
    cfg = tiny_config(tmp_path / "kv", cluster={"host_buffer_bytes": 131_072})
    from dualpath.cluster import Cluster

    served = Cluster(cfg).max_context
    assert served < cfg.model.max_context
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    addr = tmp_path / "http.addr"
    out = open(tmp_path / "serve.out", "wb")  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg_file), "--http",
                             "127.0.0.1:0", "--api-key", "k1", "--http-address-file", str(addr),
                             "--workdir", str(tmp_path / "work")], stdout=out, stderr=subprocess.STDOUT, env=env)
    pids: list[int] = []
    try:
        t_end = time.monotonic() + 180
        while not addr.exists() and proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.1)
        assert addr.exists(), (tmp_path / "serve.out").read_text()[-3000:]
        url = addr.read_text().strip()
        auth = {"Authorization": "Bearer k1"}
        with httpx.Client(base_url=url, timeout=120) as cl:
            health = cl.get("/health")
            assert health.status_code == 200 and health.json()["engines_alive"] == 2
            # the engines' served context, learned from the scheduler: advertised and checked before any work
            assert cl.get("/v1/models", headers={"Authorization": "Bearer k1"}).json()["data"][0][
                "max_model_len"] == served
            over = cl.post("/v1/completions", headers={"Authorization": "Bearer k1"},
                           json={"prompt": [5] * (served - 3), "max_tokens": 4})
            assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded", over.text
            assert cl.post("/v1/completions", json={"prompt": [1, 2]}).status_code == 401
            prompt = list(range(3, 80))
            ref = _reference(cfg, prompt, 7)
            body = {"prompt": prompt, "max_tokens": 7, "return_token_ids": True, "temperature": 0}
            r = cl.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == ref
            assert r.headers["x-dualpath-read-path"] in ("pe", "de", "split", "recompute")
            # again: the prompt's full blocks now come from storage
            events = []
            with cl.stream("POST", "/v1/completions", headers=auth,
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
                assert s.status_code == 200
                events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])] == ref
            assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prompt) - 1) // 16 * 16
            # sampling happens in the decode engine process: the in-process tokens for the same seed
            from dualpath.engine.sampling import SamplingParams

            sp = SamplingParams(temperature=0.8, top_p=0.9, seed=77)
            ref_s = _reference(cfg, prompt, 7, sp)
            r = cl.post("/v1/completions", headers=auth, json={**body, "temperature": 0.8, "top_p": 0.9, "seed": 77})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == ref_s != ref
            m = cl.get("/metrics").text
            assert 'dualpath_engine_up{engine="pe0"} 1.0' in m and 'dualpath_engine_up{engine="de0"} 1.0' in m
            assert "dualpath_ttft_seconds_count 3.0" in m
            st = cl.get("/health").json()
            assert st["status"] == "ok"
            # a one-token prompt's log-probabilities: its first token has none (was a 503 "lost in transit")
            one = cl.post("/v1/completions", headers=auth, json={"prompt": [7], "max_tokens": 1, "prompt_logprobs": 1})
            assert one.status_code == 200 and one.json()["choices"][0]["prompt_logprobs"] == [None], one.text
            # logprobs travel from the decode engine process with each streamed token: the in-process values;
            # n=2 samples with seeds 77 and 78
            turns = [_reference_turn(cfg, prompt, 7, SamplingParams(temperature=0.8, top_p=0.9, seed=s, logprobs=3))
                     for s in (77, 78)]
            for stream in (False, True):
                req = {**body, "temperature": 0.8, "top_p": 0.9, "seed": 77, "logprobs": 3, "n": 2, "stream": stream}
                with cl.stream("POST", "/v1/completions", headers=auth, json=req) as s:
                    assert s.status_code == 200
                    raw = s.read().decode()
                parts = [json.loads(x[6:]) for x in raw.splitlines() if x.startswith("data: {")] if stream else \
                    [json.loads(raw)]
                for j, turn in enumerate(turns):
                    got = [ch for p in parts for ch in p["choices"] if ch["index"] == j]
                    assert [t for ch in got for t in ch.get("token_ids", [])] == turn.token_ids
                    lps = [v for ch in got if ch["logprobs"] for v in ch["logprobs"]["token_logprobs"]]
                    assert lps == pytest.approx([x.logprob for x in turn.logprobs], abs=1e-5)
                    tops = [t for ch in got if ch["logprobs"] for t in ch["logprobs"]["top_logprobs"]]
                    assert [len(t) for t in tops] == [len({*(i for i, _ in x.top), x.token}) for x in turn.logprobs]
            # n choices of one long prompt share its prefill: the decode engine process stores the prompt's Full
            # Blocks before the first choice's first token, and choices 1 and 2 load them
            long_prompt = [(7 * i) % 900 + 3 for i in range(300)]
            before = cached_tokens_total(url)
            r = cl.post("/v1/completions", headers=auth, json={"prompt": long_prompt, "max_tokens": 2, "n": 3,
                                                               "temperature": 0.5, "seed": 3})
            assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
            assert cached_tokens_total(url) - before >= 2 * ((len(long_prompt) - 1) // 16 * 16)
            # so do separate requests sent together whose prompts share a long prefix (distinct tails)
            from concurrent.futures import ThreadPoolExecutor

            fan = [[(11 * i) % 900 + 3 for i in range(300)] + [901 + j] * 4 for j in range(3)]
            with ThreadPoolExecutor(3) as pool:
                rs = list(pool.map(lambda p: cl.post("/v1/completions", headers=auth, json={
                    "prompt": p, "max_tokens": 2, "temperature": 0}), fan))
            assert all(x.status_code == 200 for x in rs), [x.text for x in rs]
            hits = sorted(x.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for x in rs)
            assert hits[0] == 0 and hits[1] >= 288 and hits[2] >= 288, hits  # 18 Full Blocks of the shared 300
            # echo with logprobs: the prefill engine process computes the prompt's (a recomputed turn), and they
            # come back with the result; max_tokens 0 scores the prompt only
            ref_p = _reference_turn(cfg, prompt, 1, SamplingParams(logprobs=2, prompt_logprobs=2))
            r = cl.post("/v1/completions", headers=auth, json={"prompt": prompt, "max_tokens": 0, "echo": True,
                                                               "logprobs": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(prompt)
            assert lp["token_logprobs"][1:] == pytest.approx([x.logprob for x in ref_p.prompt_logprobs], abs=1e-5)
            assert lp["tokens"] == [f"<{t}>" for t in prompt]  # (the synthetic model has no tokenizer)
            assert r.json()["usage"]["completion_tokens"] == 0
            # vLLM's prompt_logprobs: the same values, with each token's rank computed by the PE process
            r = cl.post("/v1/completions", headers=auth, json={"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2,
                                                               "temperature": 0})
            assert r.status_code == 200, r.text
            plp = r.json()["choices"][0]["prompt_logprobs"]
            assert plp[0] is None and len(plp) == len(prompt)
            for entry, tok, ref in zip(plp[1:], prompt[1:], ref_p.prompt_logprobs, strict=True):
                mine = entry[str(tok)]
                assert mine["rank"] == ref.rank >= 1 and mine["logprob"] == pytest.approx(ref.logprob, abs=1e-5)
                assert [e["rank"] for k, e in entry.items() if k != str(tok)] == [
                    i for i, (t, _) in enumerate(ref.top, start=1) if t != tok]
        pids = _engine_pids(tmp_path / "work")
    finally:
        stop_process(proc, signal.SIGTERM)
        out.close()
    assert not survivors(pids), "engine processes outlived `dualpath serve --http`"


def _engine_pids(workdir: Path) -> list[int]:
    """The scheduler's view of the engine pids (from its stats), via the control client."""
    import anyio

    from dualpath.control.client import ServeClient

    address = (workdir / "scheduler.addr").read_text().strip()

    async def main() -> list[int]:
        async with ServeClient(address) as c:
            st = await c.stats()
        return [int(v) for k, v in st.items() if k.endswith(".pid")]

    return anyio.run(main)
