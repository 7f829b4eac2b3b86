"""The multi-process deployment against an in-process recompute of every turn, on random agents under pressure.

Each run starts a deployment (``dualpath serve``'s launcher: a scheduler process and one process per engine) over
a tiny random Llama that ``transformers`` wrote (fp32, CPU), with a random shape: 1-2 prefill and 1-2 decode
nodes of one engine each, or one node of each role with two engines (whose processes share their node's storage
NIC), emulated storage NICs of 0.5 GB/s in a third of the runs, layer-wise or not, a small or large decode KV
pool, a forward-batch token limit of 64, 256 or 1,024, the zmq or the nixl transport (with or without end-to-end
checksums), posix storage with or without a 40-block capacity (so blocks get evicted). 2-8 agents run at once through one client each, some sharing a long prefix, each 1-5
turns of 1-8 generated tokens, of five kinds: greedy; streamed (the streamed tokens must be the result's);
seeded sampling; cancelled by the client after 0-300 ms; a short deadline (0.05-0.5 s: the turn ends with its
tokens or with ``DeadlineExceeded``). Contexts grow past the forward-batch limit (the prefill engines'
scratch then grows); only a prompt beyond the model's context may be refused.

Every turn that completes is run again in one process, with ``path="recompute"`` (no stored KV) and the same
sampling, and must give the same tokens: a loaded block with the wrong bytes, a layer streamed into the wrong
slot, a page shared by two requests would change them. No other turn may fail. At the end the scheduler's count
of turns in flight must drain within 15 s (``orphans_at_end``: what it counted when the agents were done, turns
just cancelled by their client; a submit its client had already failed, because the scheduler was found dead while
the submit waited for the connection, was once sent to the restarted scheduler and ran there for nobody;
``stale_dropped``: messages the last scheduler dropped as meant for its killed predecessor); then every engine must
hold no turn, decode nothing, have its whole KV pool and host buffer free, and as many registered regions as at the
start (the heartbeats report these); stopping the deployment must leave no process behind. Exits 1 on any finding.

    python benchmarks/deploy_model_fuzz.py [--seeds 8] [--start 0] [--json OUT]
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "reliability"))
from _fuzz_report import finish, seed_args, show  # noqa: E402
from engine_helpers import HF_BASE, hf_llama, llama_config  # noqa: E402 (the tests' tiny Llama and its config)
from serve_util import deployment  # noqa: E402 (a deployment checked for orphans on exit)

from dualpath.cluster import Cluster  # noqa: E402
from dualpath.config import DualPathConfig  # noqa: E402
from dualpath.control.channel import RemoteError  # noqa: E402
from dualpath.control.client import ServeClient  # noqa: E402
from dualpath.engine.sampling import SamplingParams  # noqa: E402
from dualpath.errors import PeerTimeout  # noqa: E402
from dualpath.storage.blockfile import file_size  # noqa: E402
from dualpath.storage.config import MemoryStorageConfig, PosixStorageConfig  # noqa: E402
from dualpath.transports.config import LoopbackTransportConfig, NixlTransportConfig, ZmqTransportConfig  # noqa: E402

VOCAB = HF_BASE["vocab_size"]
KINDS = ("greedy", "stream", "sampled", "cancel", "deadline")


def _shape(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.3:  # two engines per node (one node of each role)
        return {"prefill_nodes": 1, "decode_nodes": 1, "engines_per_node": 2, **_engine_shape(rng)}
    return {"prefill_nodes": rng.choice([1, 2]), "decode_nodes": rng.choice([1, 2]), **_engine_shape(rng)}


def _engine_shape(rng: random.Random) -> dict[str, Any]:
    return {"prefill_max_batch_tokens": rng.choice([64, 256, 1024]), "layerwise": rng.random() < 0.7,
            "kv_pool_tokens": rng.choice([512, 2048]), "layers_ahead": rng.choice([1, 2, 4]),
            "snic_gbps": rng.choice([None, None, 0.5])}


def _engines(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Each engine's heartbeat gauges from the scheduler's ``stats``."""
    out: dict[str, dict[str, int]] = {}
    for k, v in stats.items():
        name, _, key = k.partition(".")
        if re.fullmatch(r"(pe|de)\d+", name) and key:
            out.setdefault(name, {})[key] = v
    return out


async def _settled(c: ServeClient, base: dict[str, dict[str, int]], timeout: float) -> list[dict[str, Any]]:
    """Wait (up to ``timeout``) for every engine to hold nothing; the differences left at the end."""
    t_end = time.monotonic() + timeout
    while True:
        eng = _engines(await c.stats())
        left = []
        for name, g in sorted(eng.items()):
            b = base.get(name, {})
            for key, want in (("inflight", 0), ("seq", 0), ("host_used", 0),
                              ("free_kv_tokens", b.get("free_kv_tokens")), ("regions", b.get("regions")),
                              ("alive", 1)):
                if want is not None and g.get(key) != want:
                    left.append({"what": f"engine {key} not back to {want}", "engine": name, "value": g.get(key)})
        if not left or time.monotonic() > t_end:
            return left
        await anyio.sleep(0.2)


def _reference_config(cfg: DualPathConfig) -> DualPathConfig:
    ref = cfg.model_copy(deep=True)
    ref.storage = MemoryStorageConfig()
    ref.transport = LoopbackTransportConfig()
    ref.cluster.prefill_nodes = ref.cluster.decode_nodes = ref.cluster.engines_per_node = 1
    ref.cluster.snic_gbps = None
    return ref


async def _recompute(cfg: DualPathConfig, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    problems = []
    async with Cluster(_reference_config(cfg)) as c:
        for t in done:
            ref = await c.run_turn(f"ref{t['session']}", t["prompt"], t["gen"], path="recompute",
                                   sampling=t["sampling"])
            if list(ref.token_ids) != t["tokens"]:
                problems.append({"what": "tokens differ from a recompute", "session": t["session"],
                                 "kind": t["kind"], "path": t["path"], "got": t["tokens"],
                                 "recompute": list(ref.token_ids)})
    return problems


def run(model_dir: Path, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    shape = _shape(rng)
    cfg = llama_config(model_dir, **shape)
    work = Path(tempfile.mkdtemp(prefix="dualpath-deploy-fuzz-"))
    checksum = rng.random() < 0.5
    transport = rng.choice(["zmq", "nixl"])
    cfg.transport = (ZmqTransportConfig(checksum=checksum, pending_timeout_s=5.0) if transport == "zmq"
                     else NixlTransportConfig(checksum=checksum, pending_timeout_s=5.0))
    cap_blocks = rng.choice([None, 40])
    cap = None
    if cap_blocks is not None:
        async def block_bytes() -> int:
            async with Cluster(_reference_config(cfg)) as probe:
                return probe.layout.full_block_bytes
        cap = cap_blocks * file_size(anyio.run(block_bytes))
    cfg.storage = PosixStorageConfig(root=str(work / "kv"), capacity_bytes=cap)
    cfg.serve = cfg.serve.model_copy(update={"port": 0, "heartbeat_s": 0.1, "dead_after_s": 2.0,
                                             "request_deadline_s": 60.0, "startup_timeout_s": 120.0})
    cfg = DualPathConfig.model_validate(cfg.model_dump(mode="python"))
    problems: list[dict[str, Any]] = []
    counts: dict[str, Any] = dict.fromkeys(KINDS, 0) | {"turns": 0, "with_hits": 0, "refused": 0,
                                                      "deadline_hit": 0, "fault_victims": 0, "killed": None,
                                                      "started": 0, "orphans_at_end": 0, "stale_dropped": 0}
    done: list[dict[str, Any]] = []
    fault = rng.choice([None, None, "scheduler", "engine"])
    window = {"from": float("inf"), "to": float("-inf")}  # turns running then may fail (the fault's victims)
    kill_after = rng.randint(1, 12)  # turns started
    started_enough = anyio.Event()
    limit = HF_BASE["max_position_embeddings"] - cfg.cluster.block_tokens  # the model's context (the scratch grows to it)
    t0 = time.monotonic()

    async def kill_one(dep: Any, names: list[str]) -> None:
        await started_enough.wait()  # (the agents' turns are under way)
        await anyio.sleep(rng.uniform(0.0, 0.3))
        victim = "scheduler" if fault == "scheduler" else rng.choice(names)
        old = dep.pid(victim)
        window["from"] = time.monotonic()
        dep.kill(victim, signal.SIGKILL)
        counts["killed"] = victim
        async with ServeClient.from_config(dep.address, cfg) as c:  # back: every engine registered again
            with anyio.fail_after(120):
                while True:
                    with contextlib.suppress(Exception):
                        eng = _engines(await c.stats(timeout=2.0))
                        if dep.pid(victim) != old and len(eng) == len(names) and \
                                all(g.get("alive") == 1 for g in eng.values()):
                            break
                    await anyio.sleep(0.1)
        window["to"] = time.monotonic() + 0.5

    async def main(dep: Any) -> None:
        address = dep.address
        async with ServeClient.from_config(address, cfg) as probe:
            base = _engines(await probe.stats())
            shared = [rng.randrange(3, VOCAB) for _ in range(rng.randint(20, 200))]
            sessions = iter(range(1, 1 << 20))

            async def agent(i: int) -> None:
                ctx = (shared[: rng.randint(0, len(shared))] if rng.random() < 0.7 else []) + \
                    [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 80))]
                async with ServeClient.from_config(address, cfg) as c:
                    for turn in range(rng.randint(1, 5)):
                        if len(ctx) > 400:
                            return
                        gen = rng.randint(1, 8)
                        kind = rng.choice(KINDS)
                        counts[kind] += 1
                        session = next(sessions)
                        sampling = (SamplingParams(temperature=rng.choice([0.7, 1.3]), top_k=rng.choice([0, 20]),
                                                   seed=rng.randrange(1 << 30)) if kind == "sampled" else None)
                        streamed: list[int] = []
                        kw: dict[str, Any] = {"sampling": sampling}
                        if kind == "stream":
                            kw["on_token"] = streamed.append
                        if kind == "deadline":
                            kw["deadline_s"] = rng.uniform(0.05, 0.5)
                        info = {"turn": turn, "agent": i, "kind": kind, "session": session, "len": len(ctx)}
                        t_start = time.monotonic()
                        counts["started"] += 1
                        if counts["started"] >= kill_after:
                            started_enough.set()
                        try:
                            if kind == "cancel":
                                with anyio.move_on_after(rng.uniform(0.0, 0.3)):
                                    await c.run_turn(session, list(ctx), gen)
                                continue
                            r = await c.run_turn(session, list(ctx), gen, **kw)
                        except Exception as exc:
                            text = str(exc)
                            if "one-layer scratch" in text and len(ctx) > limit:
                                counts["refused"] += 1  # beyond the model's context: refused, as documented
                                return
                            if kind == "deadline" and isinstance(exc, (RemoteError, PeerTimeout)) and \
                                    ("DeadlineExceeded" in text or "deadline" in text.lower()):
                                counts["deadline_hit"] += 1
                                continue
                            if time.monotonic() >= window["from"] and (t_start <= window["to"]
                                                                       or window["to"] == float("-inf")):
                                counts["fault_victims"] += 1  # ran while a process died or came back
                                continue
                            problems.append({**info, "what": "the turn failed", "error": repr(exc)[:300]})
                            return
                        tokens = list(r.token_ids)
                        counts["turns"] += 1
                        counts["with_hits"] += int(r.hit_tokens > 0)
                        if kind == "stream" and streamed != tokens:
                            problems.append({**info, "what": "streamed tokens differ from the result",
                                             "streamed": streamed, "tokens": tokens})
                        if len(tokens) != gen:
                            problems.append({**info, "what": "wrong number of tokens", "gen": gen, "got": tokens})
                        done.append({"session": session, "prompt": list(ctx), "gen": gen, "sampling": sampling,
                                     "tokens": tokens, "kind": kind, "path": str(r.path)})
                        ctx += tokens + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]

            with anyio.fail_after(400):
                async with anyio.create_task_group() as outer:
                    if fault is not None:
                        outer.start_soon(kill_one, dep, sorted(base))
                    async with anyio.create_task_group() as tg:
                        for i in range(rng.randint(2, 8)):
                            tg.start_soon(agent, i)
                    started_enough.set()  # (fewer turns than kill_after: the fault comes after them)
            # Turns cancelled by their client a moment ago may still be counted; a count that never drains (a
            # turn run for nobody) is a finding.
            st = await probe.stats()
            counts["orphans_at_end"] = int(st.get("inflight", 0))
            counts["stale_dropped"] = int(st.get("stale_messages", 0))  # meant for a killed scheduler: fenced
            t_end = time.monotonic() + 15.0
            while st.get("inflight") and time.monotonic() < t_end:
                await anyio.sleep(0.1)
                st = await probe.stats()
            if st.get("inflight"):
                problems.append({"what": "the scheduler still counts turns in flight", "inflight": st["inflight"]})
            problems.extend(await _settled(probe, base, 30.0))

    try:
        with deployment(cfg, work) as dep:
            anyio.run(main, dep)
    except AssertionError as exc:  # processes left behind
        problems.append({"what": "stopping the deployment", "error": str(exc)[:300]})
    except Exception as exc:
        problems.append({"what": "the run failed", "error": repr(exc)[:500]})
    problems.extend(anyio.run(_recompute, cfg, done))
    return {"seed": seed, "shape": shape, "transport": transport, "checksum": checksum,
            "capacity_blocks": cap_blocks, **counts, "problems": problems,
            "seconds": round(time.monotonic() - t0, 2)}


def _describe(shape: dict[str, Any]) -> str:
    n = shape.get("engines_per_node", 1)
    return (f"{shape['prefill_nodes'] * n} PE + {shape['decode_nodes'] * n} DE"
            + (f" ({n} per node)" if n > 1 else "") + (" layer-wise" if shape["layerwise"] else "")
            + (f", snic {shape['snic_gbps']} GB/s" if shape.get("snic_gbps") else ""))


def main() -> int:
    args = seed_args(__doc__, 8)
    model_dir = Path(tempfile.mkdtemp(prefix="dualpath-deploy-fuzz-model-"))
    hf_llama(model_dir)
    rows = []
    for seed in range(args.start, args.start + args.seeds):
        row = run(model_dir, seed)
        rows.append(row)
        show(f"seed {seed}: {row['turns']} turns ({row['with_hits']} with hits, {row['cancel']} cancelled, "
             f"{row['deadline_hit']} past a short deadline, {row['refused']} refused), {row['transport']}"
             f"{'+checksum' if row['checksum'] else ''} cap {row['capacity_blocks']}, {_describe(row['shape'])}"
             + (f", killed {row['killed']} ({row['fault_victims']} turns failed with it, {row['stale_dropped']} "
                f"messages fenced)" if row["killed"] else ""),
             row)
    return finish(rows, f"{len(rows)} runs, {sum(r['turns'] for r in rows)} turns compared with a recompute",
                  args.json)


if __name__ == "__main__":
    sys.exit(main())
