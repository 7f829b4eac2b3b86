"""Transports against their contract, on random concurrent transfers, every byte of the receiver checked.

Three endpoints in one process (two senders, one receiver) of one backend. Each round runs 4 to 12 transfers at
once, each in its own 64 KiB slot of one registered receive buffer (a random offset and 1 byte to ~63 KiB), of a
kind drawn from:

* ``normal``: expose, then write and wait together: both succeed, the slot holds the source's bytes;
* ``early``: write first, expose within a third of ``pending_timeout_s``: the same;
* ``reexpose``: expose, cancel, settle, expose the same tag again, then as ``normal``;
* ``hinted_other``: exposed naming one sender (``expose(..., sender=)``), written by the other: as ``normal``;
* ``mismatch``: a write one byte longer or shorter than the slot: the write and the wait both fail;
* ``cancel``: expose, cancel, settle, then write: the write fails, nothing lands;
* ``wait_timeout``: a wait that times out (50 ms), then a write: both fail, nothing lands;
* ``cancel_inflight``: cancel while the write may be under way: if the wait succeeded, the bytes are right;
* ``dup``: one sender writes the slot twice at once, different bytes: exactly one write succeeds, the slot
  holds its bytes;
* ``two_senders``: both senders write the slot at once: the same;
* ``short_timeout``: a 50 ms write to a tag nobody exposes: it fails;
* ``never``: a write to a tag nobody exposes: it fails (after ``pending_timeout_s``).

After a round, a quarter of the time, the second sender closes and a new endpoint takes its name (a restarted
process; both sides connect again). Every write must end within its timeout plus one second. At the end, every byte outside the slots a transfer was
allowed to touch must still hold the canary (nothing lands where it was not asked to, or after a cancel).
Backends: ``loopback``, ``zmq`` (every payload as zmq frames), ``zmq-ipc``, ``zmq-tcp`` (the data socket for
every size), ``zmq-ck`` (checksums), ``nixl``, ``nixl-ck``. Exits 1 on any finding.

    python benchmarks/transport_model_fuzz.py [--seeds 4] [--start 0] [--rounds 6] [--kinds ...] [--json OUT]

It found, in the 47th session: nixl refused a write into a landing cancelled at once and exposed again (the
revocation overtook the grant's push); zmq failed every write to a peer when one write to it was cancelled or timed
out, though their bytes had landed; nixl let two senders both report delivery of one landing (three causes). In the
48th session, with sender restarts added: nixl refused the metadata of a restarted peer (NIXL_ERR_NOT_ALLOWED for
an agent name it already held), first found by ``deploy_model_fuzz.py`` as engines that never came back.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from functools import partial
from typing import Any

import anyio
import torch
from _fuzz_report import finish, show

from dualpath.errors import PeerTimeout, TransportError
from dualpath.transports import Transport, create_transport
from dualpath.transports.config import LoopbackTransportConfig, NixlTransportConfig, ZmqTransportConfig
from dualpath.transports.loopback import LoopbackFabric

PENDING = 0.3  # pending_timeout_s of the endpoints
SLOT = 1 << 16
NSLOT = 24
CANARY = 0xA5
ACTIONS = ("normal", "early", "reexpose", "hinted_other", "mismatch", "cancel", "wait_timeout", "cancel_inflight",
           "dup", "two_senders", "short_timeout", "never")
KINDS = ("loopback", "zmq", "zmq-ipc", "zmq-tcp", "zmq-ck", "nixl", "nixl-ck")


def config(kind: str) -> Any:
    common = {"pending_timeout_s": PENDING}
    if kind == "loopback":
        return LoopbackTransportConfig(**common)
    if kind == "zmq":
        return ZmqTransportConfig(data_socket="zmq", **common)
    if kind == "zmq-ipc":
        return ZmqTransportConfig(scheme="ipc", **common)
    if kind == "zmq-tcp":
        return ZmqTransportConfig(data_socket="tcp", data_socket_min_bytes=0, **common)
    if kind == "zmq-ck":
        return ZmqTransportConfig(checksum=True, **common)
    if kind == "nixl":
        return NixlTransportConfig(**common)
    if kind == "nixl-ck":
        return NixlTransportConfig(checksum=True, **common)
    raise SystemExit(f"--kinds: unknown backend {kind!r} (expected some of {', '.join(KINDS)})")


class Run:
    """One backend, one seed: the endpoints, the receive buffer and what each transfer may touch."""

    def __init__(self, kind: str, seed: int, a: Transport, a2: Transport, b: Transport) -> None:
        self.kind, self.rng = kind, random.Random(seed)
        self.a, self.a2, self.b = a, a2, b
        self.dst = torch.full((SLOT * NSLOT,), CANARY, dtype=torch.uint8)
        self.region = b.register(self.dst)
        gen = torch.Generator().manual_seed(seed)
        self.src = torch.randint(0, 256, (SLOT * 4,), dtype=torch.uint8, generator=gen)
        self.src2 = torch.randint(0, 256, (SLOT * 4,), dtype=torch.uint8, generator=gen)
        a.register(self.src)
        a2.register(self.src2)
        self.touched = torch.zeros(SLOT * NSLOT, dtype=torch.bool)  # bytes a transfer may have changed
        self.problems: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.tags = 0

    def problem(self, action: str, what: str, **detail: Any) -> None:
        self.problems.append({"action": action, "what": what, **detail})

    async def write(self, out: dict[str, str], key: str, tag: str, src: torch.Tensor, *,
                    sender: Transport | None = None, timeout: float = 5.0, action: str = "") -> None:
        t0 = time.monotonic()
        try:
            await (sender or self.a).write("rcv", tag, src, timeout)
            out[key] = "ok"
        except PeerTimeout:
            out[key] = "PeerTimeout"
        except TransportError as exc:
            out[key] = type(exc).__name__
        if time.monotonic() - t0 > timeout + 1.0:
            self.problem(action, "a write overran its deadline", seconds=round(time.monotonic() - t0, 3))

    async def wait(self, out: dict[str, str], tag: str, timeout: float = 5.0) -> None:
        try:
            await self.b.wait(tag, timeout)
            out["wait"] = "ok"
        except TransportError as exc:  # PeerTimeout is one
            out["wait"] = type(exc).__name__

    async def transfer(self, action: str, tag: str, off: int, n: int, so: int) -> None:
        """One transfer of kind ``action`` into ``[off, off + n)`` from ``src[so:so + n]``."""
        b, region, rng = self.b, self.region, self.rng
        src, src2 = self.src[so:so + n], self.src2[so:so + n]
        res: dict[str, str] = {}
        landed = self.dst[off:off + n]
        if action in ("normal", "reexpose", "early", "hinted_other"):
            if action == "reexpose":
                b.expose(tag, region, off, n)
                b.cancel(tag)
                await b.settle()
            writer, data = (self.a2, src2) if action == "hinted_other" else (self.a, src)
            async with anyio.create_task_group() as g:
                if action == "early":
                    g.start_soon(self.write, res, "w", tag, data)
                    await anyio.sleep(rng.uniform(0, PENDING / 3))
                    b.expose(tag, region, off, n)
                else:
                    b.expose(tag, region, off, n, sender="snd" if action == "hinted_other" else None)
                    g.start_soon(partial(self.write, res, "w", tag, data, sender=writer, action=action))
                g.start_soon(self.wait, res, tag)
            self.touched[off:off + n] = True
            if res != {"w": "ok", "wait": "ok"}:
                self.problem(action, "did not deliver", outcome=res)
            elif not torch.equal(landed, data):
                self.problem(action, "wrong bytes in the landing")
        elif action == "mismatch":
            m = n + rng.choice([-1, 1]) if n > 1 else 2
            b.expose(tag, region, off, n)
            async with anyio.create_task_group() as g:
                g.start_soon(self.write, res, "w", tag, self.src[so:so + m])
                g.start_soon(self.wait, res, tag)
            self.touched[off:off + n] = True  # a failed landing's bytes are unspecified
            if "ok" in res.values():
                self.problem(action, "a wrongly sized write counted", outcome=res)
        elif action == "cancel":
            b.expose(tag, region, off, n)
            b.cancel(tag)
            await b.settle()
            await self.write(res, "w", tag, src, action=action)
            if res["w"] == "ok":
                self.problem(action, "a write into a cancelled landing succeeded")
        elif action == "wait_timeout":
            b.expose(tag, region, off, n)
            await self.wait(res, tag, 0.05)
            await self.write(res, "w", tag, src, action=action)
            if "ok" in res.values():
                self.problem(action, "a withdrawn landing took a write", outcome=res)
        elif action == "cancel_inflight":
            b.expose(tag, region, off, n)
            async with anyio.create_task_group() as g:
                g.start_soon(self.write, res, "w", tag, src)
                g.start_soon(self.wait, res, tag)
                await anyio.sleep(rng.uniform(0, 0.01))
                b.cancel(tag)
            await b.settle()
            self.touched[off:off + n] = True
            if res.get("wait") == "ok" and not torch.equal(landed, src):
                self.problem(action, "a landing that completed holds wrong bytes")
        elif action in ("dup", "two_senders"):
            other, other_sender = (src2, self.a2) if action == "two_senders" else (self.src[so + 1:so + 1 + n], self.a)
            b.expose(tag, region, off, n)
            async with anyio.create_task_group() as g:
                g.start_soon(self.write, res, "w1", tag, src)
                g.start_soon(partial(self.write, res, "w2", tag, other, sender=other_sender))
                g.start_soon(self.wait, res, tag)
            self.touched[off:off + n] = True
            oks = [res["w1"], res["w2"]].count("ok")
            if oks != 1 or res["wait"] != "ok":
                self.problem(action, "not exactly one delivery", outcome=res,
                             holds_first=torch.equal(landed, src), holds_second=torch.equal(landed, other))
            elif not torch.equal(landed, src if res["w1"] == "ok" else other):
                self.problem(action, "the landing holds the bytes of the write that failed")
        elif action in ("short_timeout", "never"):
            await self.write(res, "w", tag, src, timeout=0.05 if action == "short_timeout" else 5.0, action=action)
            if res["w"] == "ok":
                self.problem(action, "a write to a tag nobody exposed succeeded")

    async def round(self, index: int) -> None:
        rng = self.rng
        slots = list(range(NSLOT))
        rng.shuffle(slots)
        async with anyio.create_task_group() as tg:
            for s in slots[: rng.randint(4, 12)]:
                action = rng.choice(ACTIONS)
                self.counts[action] = self.counts.get(action, 0) + 1
                self.tags += 1
                # nixl groups tags of the form r{rid}/{what}: half the transfers share a few groups
                tag = f"r{rng.randrange(4)}/x{self.tags}" if rng.random() < 0.5 else f"t{self.tags}/{index}"
                n = rng.randint(1, SLOT - 512)
                tg.start_soon(self.transfer, action, tag, s * SLOT + rng.randrange(512), n,
                              rng.randrange(SLOT * 3))

    def check_canary(self) -> None:
        bad = (~self.touched) & (self.dst != CANARY)
        if bool(bad.any()):
            self.problem("*", "bytes changed outside every landing", count=int(bad.sum()),
                         first=int(bad.nonzero()[0]))


async def run(kind: str, seed: int, rounds: int) -> dict[str, Any]:
    fabric = LoopbackFabric()
    cfg = config(kind)
    t0 = time.monotonic()
    restarts = 0
    async with create_transport(cfg, "snd", fabric=fabric) as a, create_transport(cfg, "rcv", fabric=fabric) as b:
        await a.connect("rcv", b.address)
        a2 = await _sender(cfg, fabric, b)
        r = Run(kind, seed, a, a2, b)
        try:
            with anyio.fail_after(60 + 20 * rounds):
                for i in range(rounds):
                    await r.round(i)
                    if r.rng.random() < 0.25:  # the second sender's process restarts under its name
                        await r.a2.close()
                        r.a2 = await _sender(cfg, fabric, b)
                        r.a2.register(r.src2)
                        restarts += 1
                await b.settle()
        except Exception as exc:
            r.problem("*", "the run failed", error=repr(exc)[:300])
        finally:
            await r.a2.close()
        r.check_canary()
    return {"kind": kind, "seed": seed, "transfers": r.counts, "sender_restarts": restarts, "problems": r.problems,
            "seconds": round(time.monotonic() - t0, 2)}


async def _sender(cfg: Any, fabric: LoopbackFabric, b: Transport) -> Transport:
    """A started endpoint named ``snd2``, connected to ``b`` (and ``b`` to it: both directions hello)."""
    t = create_transport(cfg, "snd2", fabric=fabric)
    await t.start()
    await t.connect("rcv", b.address)
    await b.connect("snd2", t.address)
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of concurrent transfers per run")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated backends")
    ap.add_argument("--json", help="write every run's counts and findings here")
    args = ap.parse_args()
    if args.seeds < 1 or args.rounds < 1 or args.start < 0:
        ap.error("--seeds and --rounds must be >= 1, --start >= 0")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for k in kinds:
        config(k)  # an unknown backend is refused before anything runs
    logging.disable(logging.WARNING)  # refusals are logged by design; the findings are what counts
    rows = []
    for seed in range(args.start, args.start + args.seeds):
        for kind in kinds:
            row = anyio.run(run, kind, seed, args.rounds)
            rows.append(row)
            show(f"{kind:9s} seed {seed}: {sum(row['transfers'].values()):3d} transfers", row)
    total = sum(sum(r["transfers"].values()) for r in rows)
    return finish(rows, f"{len(rows)} runs, {total} transfers", args.json, transfers=total)


if __name__ == "__main__":
    sys.exit(main())
