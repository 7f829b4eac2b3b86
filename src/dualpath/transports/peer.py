"""A transport endpoint in its own process, driven over stdin: the second process of the transport contract
tests and of ``dualpath bench transport``.

Runs one transport endpoint and obeys JSON-line commands on stdin, answering JSON lines on stdout (``id``
echoed). Commands: ``expose {tag, offset, nbytes[, sender]}``, ``wait {tag, timeout}`` -> ``{sha}`` of the landed bytes,
``connect {peer, address}``, ``write {peer, tag, nbytes, seed, timeout}`` (deterministic bytes from ``seed``),
``exit``. The first line printed is ``{"address": ...}``.
Usage: ``python -m dualpath.transports.peer NAME CONFIG_JSON BUFFER_BYTES [DEVICE]`` (DEVICE ``cpu``, the default, or
``cuda``: the landing and source buffers in GPU memory).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from typing import Any

import anyio
import torch
from pydantic import TypeAdapter

from dualpath.transports import create_transport
from dualpath.transports.config import TransportConfig


def pattern(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def parse_config(text: str) -> TransportConfig:
    return TypeAdapter(TransportConfig).validate_python(json.loads(text))  # type: ignore[no-any-return]


async def main(name: str, config_json: str, buffer_bytes: int, device: str = "cpu") -> None:
    config = parse_config(config_json)
    out_lock = anyio.Lock()
    # the protocol owns the original stdout; anything libraries print (NIXL logs) goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    async def say(obj: dict[str, Any]) -> None:
        async with out_lock:
            proto.write(json.dumps(obj) + "\n")
            proto.flush()

    async with create_transport(config, name) as t:
        buf = torch.zeros(buffer_bytes, dtype=torch.uint8, device=device)
        region = t.register(buf)
        src_buf = torch.zeros(buffer_bytes, dtype=torch.uint8, device=device)
        t.register(src_buf)
        await say({"address": t.address})

        async def handle(cmd: dict[str, Any]) -> None:
            reply: dict[str, Any] = {"id": cmd.get("id")}
            try:
                op = cmd["op"]
                if op == "expose":
                    t.expose(cmd["tag"], region, cmd["offset"], cmd["nbytes"], sender=cmd.get("sender"))
                elif op == "wait":
                    await t.wait(cmd["tag"], cmd["timeout"])
                    reply["sha"] = sha(buf[cmd["offset"]: cmd["offset"] + cmd["nbytes"]])
                elif op == "connect":
                    await t.connect(cmd["peer"], cmd["address"])
                elif op == "write":
                    n = cmd["nbytes"]
                    src = src_buf[:n]
                    src.copy_(pattern(n, cmd["seed"]))
                    for _ in range(cmd.get("repeat", 1)):
                        await t.write(cmd["peer"], cmd["tag"], src, cmd["timeout"])
                elif op == "bench":  # receive count messages of nbytes under tags prefix+i (window of exposes)
                    n, count = cmd["nbytes"], cmd["count"]
                    for i in range(count):
                        t.expose(f"{cmd['prefix']}{i}", region, (i % cmd.get("slots", 4)) * n, n,
                                 sender=cmd.get("sender"))
                    for i in range(count):
                        await t.wait(f"{cmd['prefix']}{i}", cmd["timeout"])
                reply["ok"] = True
            except Exception as exc:
                reply.update(ok=False, error=type(exc).__name__, msg=str(exc))
            await say(reply)

        # commands read on the event loop (no thread hop: the raw baselines' children read stdin directly)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        async with anyio.create_task_group() as tg:
            while True:
                line = (await stdin.readline()).decode()
                if not line:
                    break
                cmd = json.loads(line)
                if cmd.get("op") == "exit":
                    await say({"id": cmd.get("id"), "ok": True})
                    break
                tg.start_soon(handle, cmd)
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    from dualpath.procexit import exit_with

    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "cpu")
    exit_with(0)
