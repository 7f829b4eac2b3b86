"""``n`` choices of one prompt: one shared prefill vs one prefill per choice, through a real HTTP server.

Starts ``dualpath serve --http --inprocess`` (the embedded SmolLM2 on this machine's CPU) and, alternating, asks
for ``--n`` completions of a fresh ``--prompt-tokens`` prompt in two ways:

* ``shared``: one request with ``n`` (the server prefills the prompt once; the other choices load its KV);
* ``each``: ``n`` concurrent requests of one choice with seeds ``seed .. seed + n - 1`` (what the server did for
  ``n`` before: every choice computed the whole prompt; the server runs with ``http.inflight_prefix_wait_s: 0``,
  else separate requests would share the prefix too).

Prints the wall time of each and the median ratio each / shared, the prompt tokens computed per arm (prompt -
cached, from the server's ``/metrics``), and checks that both arms give the same texts on one prompt.

    python3 benchmarks/shared_prefill.py [--n 8] [--prompt-tokens 1024] [--max-tokens 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _inprocess_server import inprocess_server, prompt_tokens_computed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shared_prefill_"))
    # separate requests sharing a prefix also wait for one another (http.inflight_prefix_wait_s; measured by
    # benchmarks/inflight_prefix.py): off here, so the `each` arm is what `n` did before it shared its prefill
    with inprocess_server(tmp, settings={"http.inflight_prefix_wait_s": "0"}) as url:
        cl = httpx.Client(base_url=url, timeout=600)
        base = {"max_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
        fresh = iter(range(1, 1 << 30))

        def prompt() -> list[int]:  # token ids no earlier prompt shares (every prefill misses)
            k = next(fresh)
            return [(1000 + 97 * k + 7 * i) % 49000 + 100 for i in range(args.prompt_tokens)]

        def shared(p: list[int]) -> list[str]:
            r = cl.post("/v1/completions", json={**base, "prompt": p, "n": args.n, "seed": 7})
            r.raise_for_status()
            return [c["text"] for c in r.json()["choices"]]

        def each(p: list[int]) -> list[str]:
            def one(j: int) -> str:
                r = cl.post("/v1/completions", json={**base, "prompt": p, "seed": 7 + j})
                r.raise_for_status()
                return str(r.json()["choices"][0]["text"])

            with ThreadPoolExecutor(args.n) as pool:
                return list(pool.map(one, range(args.n)))

        shared(prompt())  # warm-up
        times: dict[str, list[float]] = {"shared": [], "each": []}
        computed: dict[str, list[float]] = {"shared": [], "each": []}
        for _ in range(args.rounds):
            for arm, fn in (("each", each), ("shared", shared)):
                c0, t0 = prompt_tokens_computed(url), time.perf_counter()
                fn(prompt())
                times[arm].append(time.perf_counter() - t0)
                computed[arm].append(prompt_tokens_computed(url) - c0)
        p = prompt()
        same = each(p) == shared(p)  # (the shared arm now hits everywhere: the texts must not change)
        ratio = statistics.median(e / s for e, s in zip(times["each"], times["shared"], strict=True))
        print(f"n={args.n}, {args.prompt_tokens}-token prompts, {args.max_tokens} tokens each, {args.rounds} rounds")
        for arm in ("each", "shared"):
            print(f"  {arm:6s} wall {statistics.median(times[arm]):6.2f} s   prompt tokens computed "
                  f"{statistics.median(computed[arm]):8.0f}")
        print(f"  ratio each / shared (wall): {ratio:.2f}   same texts: {same}")


if __name__ == "__main__":
    main()
