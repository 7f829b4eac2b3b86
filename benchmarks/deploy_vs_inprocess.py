"""The deployment answers as the in-process server does, request by request.

Starts ``dualpath serve --http --inprocess`` and ``dualpath serve --http`` (the multi-process deployment: scheduler +
one process per engine) on the embedded SmolLM2 (the deployment over an empty storage root), and sends both the same random
OpenAI requests one at a time: chat and completions, streamed or not, greedy or seeded sampling with every
sampling field (penalties, ``logit_bias``, ``min_tokens``, ``stop``, ``bad_words``, ``allowed_token_ids``),
``logprobs``, ``n`` / ``best_of``, ``echo``, ``prompt_logprobs``, ``json_object``, ``guided_choice``, forced tool
calls cut by ``max_tokens`` or not; then Responses API requests (``--responses``: plain and multi-turn input,
``instructions``, tools, ``text.format``, streamed or not). For each it compares the status, every choice's text,
token ids, tool calls and finish reason (each output item's), the token counts, and the log-probabilities (within
``--atol``). A field that does not reach
the decode engine process, or an error mapped differently, shows as a difference.

    python benchmarks/deploy_vs_inprocess.py [--requests 80] [--seed 0] [--json OUT]

Exit status 1 when any request differs (each difference is printed and kept in the JSON) or when either server
answered a 5xx (a server error is a finding even when both make it). Stream chunking and
``cached_tokens`` are not compared: they depend on timing (when a prompt's write lands).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = ["the", "cat", "weather", "Paris", "code", "agent", "tool", "list", "number", "why", "how", "seven", "blue", "json"]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _start(tmp: Path, name: str, inprocess: bool) -> tuple[subprocess.Popen[bytes], Path]:
    addr = tmp / f"{name}.addr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    argv = [sys.executable, "-m", "dualpath.cli", "serve", "--http", "127.0.0.1:0", "--http-address-file", str(addr)]
    if inprocess:
        argv.append("--inprocess")
    else:  # (its default storage is posix under /tmp/dualpath-kv, kept across runs: here an empty root of its own)
        argv += ["--workdir", str(tmp / f"{name}-work")]
        env["DUALPATH_STORAGE__ROOT"] = str(tmp / f"{name}-kv")
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (the server's whole life)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), addr


def _wait(addr: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300.0) -> str:
    end = time.monotonic() + timeout
    while not addr.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return addr.read_text().strip()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(lo, hi)))


def _sampling(rng: random.Random) -> dict[str, Any]:
    d: dict[str, Any] = {"max_tokens": rng.choice([1, 8, 20]), "return_token_ids": True}
    if rng.random() < 0.5:
        d["temperature"] = 0
    else:
        d.update(temperature=rng.choice([0.3, 0.8, 1.2]), seed=rng.randrange(1000))
        for key, p, values in (("top_p", 0.5, [0.5, 0.9]), ("top_k", 0.3, [5, 40]), ("min_p", 0.3, [0.05])):
            if rng.random() < p:
                d[key] = rng.choice(values)
    for key, p, values in (("presence_penalty", 0.3, [-0.5, 0.8]), ("frequency_penalty", 0.3, [0.6]),
                           ("repetition_penalty", 0.3, [1.2]), ("min_tokens", 0.2, [5]), ("n", 0.3, [2])):
        if rng.random() < p:
            d[key] = rng.choice(values)
    if rng.random() < 0.3:
        d["logit_bias"] = {str(rng.randrange(49152)): rng.choice([-100, 5]) for _ in range(3)}
    if rng.random() < 0.2:
        d["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.2:
        d["bad_words"] = [rng.choice(WORDS)]
    if rng.random() < 0.1:
        d["allowed_token_ids"] = list(range(200, 400))
    return d


def make_requests(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = _sampling(rng)
        logprobs = rng.random() < 0.3
        if rng.random() < 0.35:
            s.update(stream=True, stream_options={"include_usage": True})
        if rng.random() < 0.33:
            body = {"prompt": _text(rng, 3, 60), **s}
            if logprobs:
                body["logprobs"] = 2
            if rng.random() < 0.2 and not body.get("stream"):
                body["echo"] = True
            if rng.random() < 0.2:
                body["prompt_logprobs"] = 1
            if rng.random() < 0.15 and not body.get("stream"):
                body["best_of"] = int(body.get("n", 1)) + 1
            out.append(("/v1/completions", body))
            continue
        body = {"messages": [{"role": "user", "content": _text(rng, 3, 60)}], **s}
        if logprobs:
            body.update(logprobs=True, top_logprobs=2)
        r = rng.random()
        if r < 0.15:
            body["response_format"] = {"type": "json_object"}
        elif r < 0.3:
            body.update(tools=[TOOL], tool_choice=rng.choice(["required", "auto",
                                                              {"type": "function", "function": {"name": "get_weather"}}]))
        elif r < 0.35:
            body["guided_choice"] = ["yes", "no", "maybe"]
        out.append(("/v1/chat/completions", body))
    return out


def make_responses_requests(n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """Responses API requests (not stored: a stored chain's ids are each server's own), drawn apart from the
    others so a seed's chat and completions requests stay the same."""
    rng = random.Random(1_000_003 + seed)
    out = []
    for _ in range(n):
        body: dict[str, Any] = {"max_output_tokens": rng.choice([4, 16]), "store": False,
                                "input": _text(rng, 3, 40) if rng.random() < 0.5 else [
                                    {"role": "user", "content": _text(rng, 3, 20)},
                                    {"role": "assistant", "content": _text(rng, 2, 10)},
                                    {"role": "user", "content": _text(rng, 3, 20)}]}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, seed=rng.randrange(1000))
        if rng.random() < 0.3:
            body["instructions"] = _text(rng, 3, 12)
        if rng.random() < 0.3:
            body["stream"] = True
        r = rng.random()
        if r < 0.25:
            fn = TOOL["function"]
            body.update(tools=[{"type": "function", "name": fn["name"], "parameters": fn["parameters"]}],
                        tool_choice=rng.choice(["auto", "required", {"type": "function", "name": fn["name"]}]))
        elif r < 0.35:
            body["text"] = {"format": {"type": "json_schema", "name": "city", "schema": {
                "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
        out.append(("/v1/responses", body))
    return out


def _response_answer(resp: httpx.Response, stream: bool) -> dict[str, Any]:
    """A Responses API answer: status, each output item's text or call, the token counts."""
    if resp.status_code != 200:
        return {"status": resp.status_code, "error": resp.json().get("error", {}).get("type")}
    body = resp.json() if not stream else next(
        (json.loads(x[6:])["response"] for x in reversed(resp.text.splitlines())
         if x.startswith("data: {") and '"response":' in x and json.loads(x[6:]).get("type") in (
             "response.completed", "response.incomplete", "response.failed")), {"status": "no final event"})
    items = [[o.get("type"), o.get("status"), o.get("name"), o.get("arguments"),
              "".join(c.get("text", "") for c in o.get("content") or [] if isinstance(c, dict))]
             for o in body.get("output") or []]
    usage = body.get("usage") or {}
    return {"status": 200, "state": body.get("status"), "items": items,
            "usage": [usage.get("input_tokens"), usage.get("output_tokens")]}


def _answer(resp: httpx.Response, stream: bool) -> dict[str, Any]:
    """What is compared: status, each choice's text / ids / calls / finish / logprobs, the token counts."""
    if resp.status_code != 200:
        return {"status": resp.status_code, "error": resp.json().get("error", {}).get("type")}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    events = [json.loads(x[6:]) for x in resp.text.splitlines() if x.startswith("data: {")] if stream else [resp.json()]
    for ev in events:
        if "error" in ev:
            return {"status": "error in stream", "error": ev["error"].get("type")}
        usage = ev.get("usage") or usage
        for ch in ev.get("choices", []):
            a = choices.setdefault(ch["index"], {"text": "", "ids": [], "calls": [], "finish": None, "lp": []})
            msg = ch.get("message") or ch.get("delta") or {}
            a["text"] += (msg.get("content") or "") + (ch.get("text") or "")
            a["ids"] += ch.get("token_ids") or []
            for c in msg.get("tool_calls") or []:
                fn = c.get("function") or {}
                if fn.get("name"):
                    a["calls"].append([fn.get("name"), fn.get("arguments") or ""])
                elif a["calls"]:
                    a["calls"][-1][1] += fn.get("arguments") or ""
            a["finish"] = ch.get("finish_reason") or a["finish"]
            lp = ch.get("logprobs") or {}
            a["lp"] += [e["logprob"] for e in lp.get("content") or []]
            a["lp"] += [x for x in lp.get("token_logprobs") or [] if x is not None]
    counts = {k: v for k, v in (usage or {}).items() if k in ("prompt_tokens", "completion_tokens")}
    return {"status": 200, "choices": [choices[k] for k in sorted(choices)], "usage": counts}


def _same(a: Any, b: Any, atol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= atol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--responses", type=int, default=20, help="Responses API requests after the others (default 20)")
    ap.add_argument("--atol", type=float, default=1e-3, help="log-probabilities within this (default 1e-3)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    reqs = make_requests(args.requests, args.seed) + make_responses_requests(args.responses, args.seed)
    with tempfile.TemporaryDirectory(prefix="dualpath-diff-") as tmp_s:
        tmp = Path(tmp_s)
        servers = [_start(tmp, "inprocess", True), _start(tmp, "deployment", False)]
        try:
            urls = [_wait(addr, proc, tmp / f"{name}.log") for (proc, addr), name in zip(
                servers, ("inprocess", "deployment"), strict=True)]
            diffs: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            statuses: dict[str, int] = {}
            t0 = time.perf_counter()
            with httpx.Client(timeout=300) as client:
                model = client.get(f"{urls[0]}/v1/models").json()["data"][0]["id"]
                for i, (path, body) in enumerate(reqs):
                    body = {"model": model, **body}
                    read = _response_answer if path == "/v1/responses" else _answer
                    got = [read(client.post(url + path, json=body), bool(body.get("stream"))) for url in urls]
                    statuses[str(got[0]["status"])] = statuses.get(str(got[0]["status"]), 0) + 1
                    if any(str(g["status"]).startswith("5") or g["status"] == "error in stream" for g in got):
                        errors.append({"request": i, "path": path, "body": body, "inprocess": got[0],
                                       "deployment": got[1]})
                        print(f"5xx request {i} {path}: {json.dumps(body)[:300]} -> {got[0]} / {got[1]}", flush=True)
                    if not _same(got[0], got[1], args.atol):
                        diffs.append({"request": i, "path": path, "body": body, "inprocess": got[0],
                                      "deployment": got[1]})
                        print(f"DIFF request {i} {path}: {json.dumps(body)[:300]}\n  in process: "
                              f"{json.dumps(got[0])[:400]}\n  deployment: {json.dumps(got[1])[:400]}", flush=True)
            wall = time.perf_counter() - t0
        finally:
            for proc, _ in servers:
                proc.terminate()
            for proc, _ in servers:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"{len(reqs)} requests ({statuses}), {len(diffs)} differ, {len(errors)} server errors; {wall:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"requests": len(reqs), "seed": args.seed, "statuses": statuses,
                                                   "differ": len(diffs), "diffs": diffs, "server_errors": errors,
                                                   "wall_s": round(wall, 1)},
                                                  indent=1))
    return 1 if diffs or errors else 0


if __name__ == "__main__":
    sys.exit(main())
