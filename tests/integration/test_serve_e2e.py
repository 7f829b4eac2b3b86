"""`dualpath serve` end to end: the real command starts a scheduler and engine processes; a client replays a
trace; the tokens equal the in-process cluster's; malformed messages are refused while the system keeps
serving; SIGINT stops every process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

from serve_util import (  # noqa: E402
    VOCAB,
    reference_tokens,
    replay,
    stats,
    stop_process,
    survivors,
    tiny_config,
    tokens_of,
    trace,
)

from dualpath.control.channel import RemoteError  # noqa: E402
from dualpath.control.client import ServeClient  # noqa: E402
from dualpath.control.protocol import encode  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(tmp / "kv")
    cfg_file = tmp / "serve.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    work = tmp / "work"
    log = open(tmp / "serve.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg_file),
                             "--workdir", str(work)], stdout=log, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        addr_file = work / "scheduler.addr"
        t_end = time.monotonic() + 120
        address = None
        while time.monotonic() < t_end and proc.poll() is None:
            if addr_file.exists():
                address = addr_file.read_text().strip()
                st = _try_stats(address, cfg)
                if st and st.get("engines_alive", 0) >= 2:
                    pids = [int(st["pe0.pid"]), int(st["de0.pid"])]
                    break
            time.sleep(0.2)
        assert address and pids, f"serve did not come up: {(tmp / 'serve.out').read_text()[-3000:]}"
        yield address, cfg, proc, pids
    finally:
        stop_process(proc, signal.SIGINT)
        log.close()
        assert not survivors(pids), "engine processes outlived `dualpath serve`"


def _try_stats(address: str, cfg) -> dict | None:
    try:
        return stats(address, cfg)
    except Exception:
        return None


def test_same_tokens_as_in_process(served) -> None:
    address, cfg, _, _ = served
    agents = trace(n_agents=3, n_turns=3)
    ref = reference_tokens(cfg, agents)
    res = replay(address, agents, cfg)
    assert len(res.records) == 9
    assert tokens_of(res) == ref
    later = [r for r in res.records if r.turn > 0]
    assert all(r.outcome.hit_tokens > 0 for r in later), "the next turn must hit the KV the DE persisted"
    # DualPath ranks PEs by predicted work: the PE process reports its work (engine/work.py), none once idle
    t_end = time.monotonic() + 10
    while (st := stats(address, cfg)).get("pe0.work") != 0 and time.monotonic() < t_end:
        time.sleep(0.1)
    assert st.get("pe0.work") == 0 and "de0.work" not in st, st


def test_malformed_messages_are_refused_and_serving_continues(served) -> None:
    address, cfg, _, _ = served
    before = stats(address, cfg)["rejected_messages"]
    bad = [
        b"",
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 99, "t": "ping", "id": 1, "re": 0, "b": {}}),
        msgpack.packb({"v": 1, "t": "rm -rf", "id": 1, "re": 0, "b": {}}),
        msgpack.packb({"v": 1, "t": "submit", "id": 1, "re": 0, "b": {"session": -1, "prompt": b"", "gen": 1}}),
        msgpack.packb({"v": 1, "t": "submit", "id": 1, "re": 0, "b": {"session": 1, "prompt": b"1234567", "gen": 1}}),
        msgpack.packb({"v": 1, "t": "submit", "id": 1, "re": 0, "b": {"session": 1, "prompt": b"", "gen": 1, "x": 1}}),
        b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." ,  # a pickle
        b"\xdd\x7f\xff\xff\xff",  # array32 header claiming 2^31 elements, no payload
    ]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(address)
    try:
        for frame in bad:
            sock.send(frame)
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert reply["t"] == "error" and reply["b"]["code"] == "bad_message", reply
        sock.send_multipart([b"a", b"b"])  # two frames
        assert msgpack.unpackb(sock.recv(), raw=False)["t"] == "error"
        sock.send(encode("ping", {}, mid=7))
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["t"] == "pong" and reply["re"] == 7
    finally:
        sock.close()
        ctx.term()
    after = stats(address, cfg)["rejected_messages"]
    assert after - before == len(bad) + 1
    res = replay(address, trace(n_agents=1, n_turns=1), cfg)  # still serving
    assert len(res.records) == 1 and len(res.records[0].outcome.tokens) == 6


def test_impossible_turns_end_with_an_explicit_error(served) -> None:
    address, cfg, _, _ = served

    async def main() -> list[str]:
        codes = []
        async with ServeClient.from_config(address, cfg) as c:
            for prompt, gen in (([VOCAB + 5, 1, 2], 2), ([1] * 4000, 500)):
                with pytest.raises(RemoteError) as ei:
                    await c.run_turn(99, prompt, gen, deadline_s=20)
                codes.append(ei.value.code)
            ok = await c.run_turn(98, [1, 2, 3, 4], 2)
            assert len(ok.tokens) == 2
        return codes

    assert anyio.run(main) == ["SchedulerError", "SchedulerError"]


def test_turns_sent_together_compute_their_shared_prefix_once(served) -> None:
    # four clients send one 256-token prefix (the default inflight_prefix_min_tokens) with their own 16-token
    # tails at once: one turn computes it, the scheduler holds the others until that turn's DE says the prompt is
    # stored (``stored``), and they read it; their tokens are those an in-process cluster gives each prompt alone
    address, cfg, _, _ = served
    rng = np.random.default_rng(11)
    shared = rng.integers(1, VOCAB, 256).tolist()
    prompts = [shared + rng.integers(1, VOCAB, 16).tolist() for _ in range(4)]
    held_before = stats(address, cfg)["held"]

    async def main() -> list[Any]:
        out: dict[int, Any] = {}
        async with ServeClient.from_config(address, cfg) as c:

            async def one(i: int) -> None:
                out[i] = await c.run_turn(500 + i, prompts[i], 3)

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
        return [out[i] for i in range(4)]

    outcomes = anyio.run(main)
    assert sorted(o.hit_tokens for o in outcomes) == [0, 256, 256, 256]
    assert stats(address, cfg)["held"] - held_before == 3
    alone = _in_process_tokens(cfg, prompts, 3)
    assert [list(o.tokens) for o in outcomes] == alone


def _in_process_tokens(cfg: Any, prompts: list[list[int]], gen: int) -> list[list[int]]:
    from dualpath.cluster import Cluster

    data = cfg.model_dump(mode="python")
    data["storage"] = {"kind": "memory"}
    data["transport"] = {"kind": "loopback"}
    data["model"].update(decode_step_s=0.0, device_tflops=1e6)
    local = type(cfg).model_validate(data)

    async def main() -> list[list[int]]:
        async with Cluster(local) as c:
            return [list((await c.run_turn(str(i), p, gen)).token_ids) for i, p in enumerate(prompts)]

    return anyio.run(main)
