"""Separate requests sharing a long prompt prefix, sent together: waiting for the first one's stored prefix
(``http.inflight_prefix_wait_s``, the default 30 s) vs computing it in each request (``0``).

Starts two ``dualpath serve --http --inprocess`` servers (the embedded SmolLM2 on this machine's CPU), one per
setting, and in alternating rounds sends each ``--k`` concurrent completions whose prompts are a fresh
``--prefix-tokens`` prefix plus a distinct ``--tail-tokens`` tail (an agent fanning out sub-tasks over one
context; the choices of one question sent as separate requests). Prints each arm's wall time and prompt tokens
computed (prompt - cached, from ``/metrics``), the median ratio off / on of the wall time, and checks that
both arms give the same texts.

    python3 benchmarks/inflight_prefix.py [--k 4] [--prefix-tokens 1024] [--tail-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _inprocess_server import inprocess_server, metric, prompt_tokens_computed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="concurrent requests per round")
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    ap.add_argument("--tail-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    fresh = iter(range(1, 1 << 30))

    def prompts() -> list[list[int]]:  # a prefix no earlier round shares (its first prefill misses), k tails
        r = next(fresh)
        prefix = [(1000 + 97 * r + 7 * i) % 49000 + 100 for i in range(args.prefix_tokens)]
        return [prefix + [(300 + 13 * r + 31 * j + i) % 49000 + 100 for i in range(args.tail_tokens)]
                for j in range(args.k)]

    with contextlib.ExitStack() as stack:
        urls = {arm: stack.enter_context(inprocess_server(Path(tempfile.mkdtemp(prefix=f"inflight_{arm}_")),
                                                          settings={"http.inflight_prefix_wait_s": wait}))
                for arm, wait in (("on", "30"), ("off", "0"))}
        clients = {arm: stack.enter_context(httpx.Client(base_url=url, timeout=600)) for arm, url in urls.items()}
        body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}

        def send(arm: str, ps: list[list[int]]) -> list[str]:
            def one(p: list[int]) -> str:
                r = clients[arm].post("/v1/completions", json={**body, "prompt": p})
                r.raise_for_status()
                return str(r.json()["choices"][0]["text"])

            with ThreadPoolExecutor(len(ps)) as pool:
                return list(pool.map(one, ps))

        for arm in urls:
            send(arm, prompts())  # warm-up
        times: dict[str, list[float]] = {"on": [], "off": []}
        computed: dict[str, list[float]] = {"on": [], "off": []}
        texts: dict[str, list[list[str]]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            ps = prompts()
            for arm in ("off", "on"):
                c0, t0 = prompt_tokens_computed(urls[arm]), time.perf_counter()
                texts[arm].append(send(arm, ps))
                times[arm].append(time.perf_counter() - t0)
                computed[arm].append(prompt_tokens_computed(urls[arm]) - c0)
        ratio = statistics.median(f / n for f, n in zip(times["off"], times["on"], strict=True))
        print(f"k={args.k} requests of {args.prefix_tokens} shared + {args.tail_tokens} own prompt tokens, "
              f"{args.max_tokens} tokens each, {args.rounds} rounds")
        for arm in ("off", "on"):
            print(f"  {arm:3s} wall {statistics.median(times[arm]):6.2f} s   prompt tokens computed "
                  f"{statistics.median(computed[arm]):8.0f}")
        print(f"  ratio off / on (wall): {ratio:.2f}   same texts: {texts['on'] == texts['off']}   "
              f"requests held back: {metric(urls['on'], 'dualpath_prefix_waits_total'):.0f}")


if __name__ == "__main__":
    main()
