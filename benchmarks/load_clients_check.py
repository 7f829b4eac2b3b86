"""Serving benchmarks and a client router nobody here wrote, against ``dualpath serve --http``: GuideLLM (Red Hat's
load generator for OpenAI-compatible servers), AIPerf (NVIDIA's) and LiteLLM.

Starts ``dualpath serve --http --inprocess`` with the embedded SmolLM2, then, each from ``--python`` (an
interpreter where they are installed: they are not dependencies of dualpath and pull in their own stacks, so a
separate virtual environment is best, ``python3 -m venv V && V/bin/pip install guidellm aiperf litellm``):

* GuideLLM ``run``: its multi-turn prefix-caching scenario shape (synthetic chats, 3 turns, a 128-token shared
  prefix), 4 concurrent streams, 24 requests through ``/v1/chat/completions``: every request must succeed;
* AIPerf ``profile``: streaming chat, 4 concurrent, 12 requests; every request must succeed, its TTFT and
  inter-token latency are printed;
* LiteLLM: chat, streaming with usage, text completion, a forced tool call, ``n=2`` (async), and an embeddings
  call, which must be refused with a 404 naming the endpoints served. Greedy (``temperature: 0``) where the check
  reads the answer: a sampled city name can outrun ``max_tokens``, and a call cut short is returned as the text it
  is (content), not as a call.

Prints one line per check and exits 1 if any failed. ``--skip NAME`` leaves a client out.

    python3 benchmarks/load_clients_check.py --python V/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checks import Checks  # noqa: E402
from _inprocess_server import inprocess_server  # noqa: E402

_LITELLM = r'''
import asyncio, json, sys
import litellm
base, model = sys.argv[1], "openai/" + sys.argv[2]
kw = {"api_base": base, "api_key": "unused", "model": model}
out = {}
r = litellm.completion(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, temperature=0, **kw)
out["chat"] = [r.choices[0].message.content, r.usage.completion_tokens]
parts, usage = [], None
for ch in litellm.completion(messages=[{"role": "user", "content": "Count to 3"}], max_tokens=8, stream=True,
                             temperature=0, stream_options={"include_usage": True}, **kw):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    usage = getattr(ch, "usage", None) or usage
out["stream"] = ["".join(parts), usage.completion_tokens if usage else None]
t = litellm.text_completion(prompt="The capital of France is", max_tokens=5, temperature=0, **kw)
out["text"] = [t.choices[0].text]
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
r = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, max_tokens=40,
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, **kw)
call = r.choices[0].message.tool_calls[0]
out["tool"] = [call.function.name, json.loads(call.function.arguments)]
async def two():
    r = await litellm.acompletion(messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2, **kw)
    return [c.message.content for c in r.choices]
out["n2"] = asyncio.run(two())
try:
    litellm.embedding(input=["x"], **kw)
    out["embeddings"] = "accepted"
except Exception as exc:
    out["embeddings"] = str(exc)
print(json.dumps(out))
'''


def _run(cmd: list[str], timeout: float, cwd: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def guidellm(py: str, url: str, tok: str, tmp: str) -> dict[str, Any]:
    spec = {"spec": {
        "backend": {"kind": "openai_http", "target": url, "request_format": "/v1/chat/completions"},
        "profile": {"kind": "concurrent", "streams": 4},
        "tokenizer": {"kind": "hf_auto", "model": tok},
        "data": [{"kind": "synthetic_text", "prompt_tokens": 200, "output_tokens": 24, "turns": 3,
                  "prefix_tokens": 128, "prefix_count": 2}],
        "constraints": [{"kind": "max_requests", "count": 24}],
        "outputs": [{"kind": "json", "path": f"{tmp}/guidellm.json"}]}}
    Path(f"{tmp}/guidellm_scenario.json").write_text(json.dumps(spec))
    bin_ = str(Path(py).parent / "guidellm")
    p = _run([bin_, "run", "-c", f"{tmp}/guidellm_scenario.json", "--disable-console-interactive"], 900, tmp)
    if p.returncode:
        raise RuntimeError(p.stderr[-600:] or p.stdout[-600:])
    bench = json.loads(Path(f"{tmp}/guidellm.json").read_text())["benchmarks"][0]
    return dict(bench["metrics"]["request_totals"])


def aiperf(py: str, url: str, model: str, tok: str, tmp: str) -> dict[str, Any]:
    bin_ = str(Path(py).parent / "aiperf")
    p = _run([bin_, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
              "--concurrency", "4", "--request-count", "12", "--synthetic-input-tokens-mean", "200",
              "--output-tokens-mean", "24", "--tokenizer", tok, "--artifact-dir", f"{tmp}/aiperf", "--ui", "none"],
             900, tmp)
    if p.returncode:
        raise RuntimeError(p.stderr[-600:] or p.stdout[-600:])
    rows = [json.loads(line) for line in Path(f"{tmp}/aiperf/profile_export.jsonl").read_text().splitlines()]
    errors = sum(1 for r in rows if r.get("error"))
    ttft = sorted(r["metrics"]["time_to_first_token"]["value"] for r in rows if "time_to_first_token" in r["metrics"])
    itl = sorted(r["metrics"]["inter_token_latency"]["value"] for r in rows if "inter_token_latency" in r["metrics"])
    return {"requests": len(rows), "errors": errors, "ttft_ms_p50": round(ttft[len(ttft) // 2]),
            "itl_ms_p50": round(itl[len(itl) // 2])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="the interpreter where the clients are installed")
    ap.add_argument("--skip", action="append", default=[], choices=["guidellm", "aiperf", "litellm"])
    args = ap.parse_args()
    from dualpath.model.embedded import embedded_model_path

    tok = str(embedded_model_path())  # the served model's tokenizer, for the load generators' synthetic prompts
    tmp = tempfile.mkdtemp(prefix="load_clients_")
    check = Checks()
    with inprocess_server(Path(tmp)) as url:
        import httpx

        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        if "guidellm" not in args.skip:
            check("guidellm: 24 multi-turn chat requests, 4 streams", lambda: guidellm(args.python, url, tok, tmp),
                  lambda t: t["successful"] == 24 and t["errored"] == 0 and t["incomplete"] == 0)
        if "aiperf" not in args.skip:
            check("aiperf: 12 streaming chat requests, 4 concurrent",
                  lambda: aiperf(args.python, url, model, tok, tmp), lambda t: t["requests"] == 12 and not t["errors"])
        if "litellm" not in args.skip:
            def litellm() -> dict[str, Any]:
                p = _run([args.python, "-c", _LITELLM, f"{url}/v1", model], 600, tmp)
                if p.returncode:
                    raise RuntimeError(p.stderr[-600:])
                return dict(json.loads(p.stdout.strip().splitlines()[-1]))

            out: dict[str, Any] = {}
            check("litellm: run", lambda: out.update(litellm()) or out, lambda o: bool(o))
            check("litellm: chat", lambda: out["chat"], lambda v: bool(v[0]) and v[1] == 8)
            check("litellm: stream with usage", lambda: out["stream"], lambda v: bool(v[0]) and v[1] == 8)
            check("litellm: text completion", lambda: out["text"], lambda v: bool(v[0]))
            check("litellm: forced tool call", lambda: out["tool"],
                  lambda v: v[0] == "get_weather" and isinstance(v[1].get("city"), str))
            check("litellm: n=2 (async)", lambda: out["n2"], lambda v: len(v) == 2)
            check("litellm: embeddings refused, naming what is served", lambda: out["embeddings"],
                  lambda v: "404" in v and "/v1/chat/completions" in v)
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
