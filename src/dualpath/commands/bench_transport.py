"""``dualpath bench transport``: each transport moving Layer-Block-sized messages against its raw baseline.

Per backend and message size (64 KiB, 1 MiB, 4 MiB, 16 MiB), interleaved and repeated (medians):

* ``zmq`` (the default config) across two processes vs raw pyzmq PUSH/PULL with zero-copy frames between two
  processes: over tcp its default ``data_socket: auto`` sends payloads of at least ``data_socket_min_bytes`` over
  one plain TCP connection, received straight into the landing slot; ``zmq-frames`` the same with every payload
  as zmq frames (``data_socket: zmq``, what CURVE and ipc endpoints use); ``zmq-tcp`` forces the data socket;
* ``nixl`` across two processes vs raw NIXL WRITEs (agent to agent, a window of posted transfers, notification
  per message) between two processes; with ``--device cuda`` both sides' sources and landing regions are GPU
  memory (VRAM to VRAM; UCX's ``cuda_copy``/``cuda_ipc`` added to ``UCX_TLS``);
* ``loopback`` in one process vs a plain ``copy_`` of the same bytes, in alternating blocks (the ratio is the
  median of per-pair ratios: robust to other load on a shared box; see :func:`bench_loopback`). A third block
  of plain ``memmove`` calls rides along (``ratio_vs_memmove``): loopback copies small host buffers with
  ``memmove``, so that ratio is what its contract (expose, write, wait) costs over the bare copy.

Two references ride along with zmq (not the target's baseline): ``raw_land_gib_s``, raw PUSH/PULL whose receiver
also copies each frame into a landing slot (the copy any zmq receiver must make: libzmq owns the receive buffer),
and ``raw_tcp_land_gib_s`` (with its ``raw_tcp_land_cpu_s_per_gib``), one plain TCP connection whose receiver
reads each payload straight into a landing slot: what a transport owning its data socket could reach. One rides
along with nixl: ``raw_batched_gib_s`` / ``ratio_vs_raw_batched``, raw NIXL posting the window as two WRITEs of
``window // 2`` descriptors each, the shape our transport gives writes queued while others to the same peer are in
flight (one post and one notification for many): what raw NIXL gains from batching too, so the comparison is
also made like with like.

Before each size, one message's landed bytes are hashed against its source (``landed_intact``).
Our side is the full contract: the receiver exposes a tag per message (rotating over ``SLOTS`` landing slots, as
the raw NIXL receiver does) and awaits it; the sender keeps a window of concurrent writes in flight (``window``
in the JSON: 8 to 32, each write to its own tag; loopback copies inline, one at a time, like ``copy_``) and each
write returns once delivered (acknowledged). Both NIXL sides run agents without NIXL's own progress thread (our
transport's default, ``NixlTransportConfig.progress_thread``) and one polling thread per side: the raw receiver
polls notifications every 0.1 ms, ours on its event loop (~1 ms timed sleeps; ``notif_thread`` moves them to a
thread at the raw pace; both recorded in the JSON); the raw sender spins on its posted transfers, ours polls them
on its event loop, every pass while they progress. Raw NIXL posts from prepared descriptor lists.
Each socket pass also records the CPU seconds of both processes (``cpu_s_per_gib``, ``raw_cpu_s_per_gib``,
``cpu_ratio`` = raw / ours): on a box other work shares, wall-time ratios swing with the load, CPU cost does
not. Then the emulated link:
``link_accuracy`` (8 concurrent flows on a link set to X MB/s deliver X within +-5%) and ``link_priority`` (a
high-class transfer's latency with a saturating KV load present, over its latency on an idle link; the target is
<= 1.10). JSON: ``runs`` (one object per backend and size: ``gib_s``, ``raw_gib_s``, ``ratio``) plus the link
cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from dualpath.transports.child import JsonLineChild

KiB, MiB = 1 << 10, 1 << 20
SLOTS = 4  # landing slots the receiver rotates over (ours and the raw NIXL baseline alike)
SIZES = [64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer bytes and repeats (< 30 s)")
    parser.add_argument("--backends", default="loopback,zmq,zmq-frames,nixl",
                        help="comma-separated: loopback, zmq (the default config: its data socket over tcp), "
                             "zmq-frames (every payload as zmq frames), zmq-tcp (the data socket forced), nixl "
                             "(default loopback,zmq,zmq-frames,nixl)")
    parser.add_argument("--repeats", type=int, default=None, help="passes per point (default 5, quick 2)")
    parser.add_argument("--mib-per-point", type=int, default=None, help="MiB per pass (default 256, quick 96)")
    parser.add_argument("--no-links", action="store_true", help="skip the emulated link cases")
    parser.add_argument("--nixl-config", default=None,
                        help="JSON object of NixlTransportConfig fields for our nixl endpoints, e.g. "
                             "'{\"notif_thread\": true}' (default: the config's defaults)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where sources and landing regions live (cuda: nixl only, GPU memory to GPU memory "
                             "between two processes, with UCX's cuda_copy/cuda_ipc; default cpu)")


# --- child processes -------------------------------------------------------------------------------------------


class Child(JsonLineChild):
    """A helper process speaking JSON lines (ours: dualpath.transports.peer; raw: this module's __main__)."""


def _proto_out() -> Any:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries' prints go to stderr
    return out


def raw_zmq_pull() -> None:
    """Raw baseline receiver: PULL, zero-copy frames; ``{"op": "recv", "count": N}`` -> ``done`` after N."""
    import zmq

    out = _proto_out()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind("tcp://127.0.0.1:*")
    endpoint = s.getsockopt(zmq.LAST_ENDPOINT)
    out.write(json.dumps({"address": endpoint.decode() if isinstance(endpoint, bytes) else endpoint}) + "\n")
    import numpy as np

    land = np.zeros(0, dtype=np.uint8)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        if not cmd.get("land"):
            for _ in range(cmd["count"]):
                s.recv(copy=False)
        else:  # reference only: the same, plus one copy of each frame into a landing slot (what a transport must do)
            n = cmd["nbytes"]
            if land.size < SLOTS * n:
                land = np.zeros(SLOTS * n, dtype=np.uint8)
            for i in range(cmd["count"]):
                frame = s.recv(copy=False)
                np.copyto(land[(i % SLOTS) * n:(i % SLOTS + 1) * n], np.frombuffer(frame.buffer, dtype=np.uint8))
        out.write(json.dumps({"id": cmd["id"], "ok": True}) + "\n")
    s.close(0)
    ctx.term()


def raw_tcp_recv() -> None:
    """Reference receiver: one plain TCP connection, an 8-byte length before each message, the payload received
    by the kernel straight into a rotating landing slot (``recv_into``, no library buffer): what a transport
    that owned its data socket could reach. ``{"op": "recv", "count": N, "nbytes": n}`` -> ``done`` after N;
    ``{"op": "digest", "slot": j, "nbytes": n}`` -> the sha256 of landing slot j."""
    import socket

    import numpy as np

    out = _proto_out()
    lsock = socket.create_server(("127.0.0.1", 0))
    out.write(json.dumps({"port": lsock.getsockname()[1]}) + "\n")
    lsock.settimeout(120.0)
    conn, _ = lsock.accept()
    conn.settimeout(120.0)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    land = np.zeros(0, dtype=np.uint8)
    head = bytearray(8)

    def fill(mv: memoryview) -> None:
        got = 0
        while got < len(mv):
            k = conn.recv_into(mv[got:], len(mv) - got)
            if k == 0:
                raise ConnectionError("sender closed the connection")
            got += k

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        n = cmd["nbytes"]
        if cmd["op"] == "digest":  # what landed in slot j (tests)
            digest = hashlib.sha256(land[cmd["slot"] * n:(cmd["slot"] + 1) * n].tobytes()).hexdigest()
            out.write(json.dumps({"id": cmd["id"], "ok": True, "sha256": digest}) + "\n")
            continue
        if land.size < SLOTS * n:
            land = np.zeros(SLOTS * n, dtype=np.uint8)
        slots = [land[j * n:(j + 1) * n].data for j in range(SLOTS)]
        for i in range(cmd["count"]):
            fill(memoryview(head))
            if int.from_bytes(head, "little") != n:
                raise ValueError("raw tcp: unexpected message length")
            fill(slots[i % SLOTS])
        out.write(json.dumps({"id": cmd["id"], "ok": True}) + "\n")
    conn.close()
    lsock.close()


def _nixl_agent(name: str) -> Any:
    from dualpath.transports.nixl_agent import import_nixl, ucx_tls_with_cuda

    os.environ.setdefault("UCX_TLS", ucx_tls_with_cuda("tcp,self,sm"))  # what our transport's default sets
    nixl_mod = import_nixl()
    if nixl_mod is None:
        raise RuntimeError("raw NIXL baseline: no NIXL module (nixl-cu12 / nixl-cu13) installed")
    # the same agent configuration as our transport's default (NixlTransportConfig.progress_thread=False): no
    # NIXL progress thread; the receiver's own loop polls (and so drives UCX progress)
    return nixl_mod.nixl_agent(name, nixl_mod.nixl_agent_config(backends=["UCX"], enable_prog_thread=False))


def _nixl_mem(t: Any) -> tuple[str, int]:
    """NIXL's memory type and device id of a tensor's bytes."""
    return ("VRAM", t.get_device()) if t.is_cuda else ("DRAM", 0)


def raw_nixl_recv(nbytes: int, device: str = "cpu") -> None:
    """Raw baseline receiver: an agent with a registered buffer (on ``device``); ``recv N`` -> ``done`` after N
    notifications; ``{"op": "digest", "slot": j, "nbytes": n}`` -> the sha256 of landing slot j."""
    import torch

    out = _proto_out()
    agent = _nixl_agent(f"rawrecv{os.getpid()}")
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    agent.register_memory(buf)
    out.write(json.dumps({"md": agent.get_agent_metadata().hex(), "addr": buf.data_ptr()}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        if cmd["op"] == "digest":  # what landed in one slot (tests of the reference)
            n = cmd["nbytes"]
            digest = hashlib.sha256(buf[cmd["slot"] * n:(cmd["slot"] + 1) * n].cpu().numpy().tobytes()).hexdigest()
            out.write(json.dumps({"id": cmd.get("id"), "sha256": digest}) + "\n")
            continue
        got = 0
        while got < cmd["count"]:
            notifs = agent.get_new_notifs()
            n = sum(len(v) for v in notifs.values())
            got += n
            if not n:
                time.sleep(0.0001)
        out.write(json.dumps({"id": cmd["id"], "ok": True}) + "\n")


# --- measurements ---------------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of a process so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class _Cpu:
    """CPU seconds of this process and one child over a pass: what a method costs, which other load on a
    shared box does not inflate the way it inflates wall time."""

    def __init__(self, child: Child) -> None:
        self.pid = child.proc.pid

    def __enter__(self) -> _Cpu:
        self.c0, self.p0 = time.process_time(), _proc_cpu(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.process_time() - self.c0 + _proc_cpu(self.pid) - self.p0


def _window(size: int) -> int:
    """Writes in flight, each to its own landing tag (an engine streams many Layer Blocks at once): ~32 MiB
    outstanding, 8 to 32; the raw NIXL baseline keeps as many transfers posted (raw PUSH/PULL is bounded only by
    its high-water mark)."""
    return max(8, min(32, (32 * MiB) // size))


async def _ours_pass(t: Any, peer: Child, src: Any, size: int, count: int, prefix: str) -> float:
    import anyio

    t0 = time.perf_counter()
    # the receiver knows who writes (as an engine does): nixl hands us the landings as they are exposed
    peer.send(op="bench", nbytes=size, count=count, prefix=prefix, timeout=120.0, slots=SLOTS, sender=t.name)
    data = src[:size]
    tags = [f"{prefix}{i}" for i in range(count)]
    it = iter(tags)

    async def writer() -> None:  # `window` of these keep that many writes in flight
        for tag in it:
            await t.write("peer", tag, data, 120.0)

    async with anyio.create_task_group() as tg:
        for _ in range(min(count, _window(size))):
            tg.start_soon(writer)
    # every write has returned (landed), so nothing on this loop is needed for the peer's answer: read it here, as
    # the raw baselines do (a hop to a worker thread and back costs 140-300 us on a 2-core VM)
    reply = peer.read()
    if not reply.get("ok"):
        raise RuntimeError(f"peer failed: {reply}")
    return size * count / (time.perf_counter() - t0) / 2**30


def _raw_zmq_pass(sock: Any, raw: Child, src: Any, size: int, count: int, land: bool = False) -> float:
    arr = src[:size].numpy()
    t0 = time.perf_counter()
    raw.send(op="recv", count=count, nbytes=size, land=land)
    for _ in range(count):
        sock.send(arr, copy=False)
    raw.read()
    return size * count / (time.perf_counter() - t0) / 2**30


def _raw_tcp_pass(sock: Any, raw: Child, src: Any, size: int, count: int) -> float:
    payload = src[:size].numpy().data
    head = size.to_bytes(8, "little")
    t0 = time.perf_counter()
    raw.send(op="recv", count=count, nbytes=size)
    for _ in range(count):
        sock.sendall(head)
        sock.sendall(payload)
    raw.read()
    return size * count / (time.perf_counter() - t0) / 2**30


def _reap(agent: Any, inflight: list[Any]) -> list[Any]:
    """The raw sender's poll of its posted WRITEs: those still in progress (the others released)."""
    still = []
    for h in inflight:
        st = agent.check_xfer_state(h)
        if st == "PROC":
            still.append(h)
        elif st == "ERR":
            raise RuntimeError("raw NIXL transfer failed")
        else:
            h.release()
    return still


def _raw_nixl_done(raw: Child, t0: float, local: Any, rdesc: Any, nbytes: int) -> float:
    """GiB/s of a raw NIXL pass once its receiver counted every notification (descriptor lists released)."""
    raw.read()
    dt = time.perf_counter() - t0
    local.release()
    rdesc.release()
    return nbytes / dt / 2**30


def _raw_dlists(agent: Any, remote: str, raw: Child, src: Any, size: int) -> tuple[Any, Any]:
    """Prepared descriptor lists: the source's first ``size`` bytes, and the receiver's ``SLOTS`` landing slots
    (its buffer on the same kind of memory as ``src``)."""
    mem, dev = _nixl_mem(src)
    local = agent.prep_xfer_dlist("NIXL_INIT_AGENT", [(src.data_ptr(), size, dev)], mem)
    rdesc = agent.prep_xfer_dlist(remote, [(raw.first["addr"] + j * size, size, dev) for j in range(SLOTS)], mem)
    return local, rdesc


def _raw_nixl_pass(agent: Any, remote: str, raw: Child, src: Any, size: int, count: int) -> float:
    # descriptor lists prepared once and reused, as our transport does
    local, rdesc = _raw_dlists(agent, remote, raw, src, size)
    window = _window(size)
    t0 = time.perf_counter()
    raw.send(op="recv", count=count)
    inflight: list[Any] = []
    posted = 0
    while posted < count or inflight:
        while posted < count and len(inflight) < window:
            h = agent.make_prepped_xfer("WRITE", local, [0], rdesc, [posted % SLOTS], f"m{posted}".encode())
            if agent.transfer(h) == "ERR":
                raise RuntimeError("raw NIXL transfer failed")
            inflight.append(h)
            posted += 1
        inflight = _reap(agent, inflight)
    return _raw_nixl_done(raw, t0, local, rdesc, size * count)


def _raw_nixl_batched_pass(agent: Any, remote: str, raw: Child, src: Any, size: int, count: int) -> float:
    """Reference: raw NIXL posting the same window as two WRITEs in flight of ``window // 2`` descriptors each
    (one notification per WRITE), the shape our transport gives writes queued while others are in flight: what
    raw NIXL itself gains from batching, so ``ratio_vs_raw_batched`` compares like with like."""
    per = max(1, _window(size) // 2)
    local, rdesc = _raw_dlists(agent, remote, raw, src, size)
    posts = -(-count // per)
    t0 = time.perf_counter()
    raw.send(op="recv", count=posts)
    inflight: list[Any] = []
    posted = 0
    while posted < posts or inflight:
        while posted < posts and len(inflight) < 2:
            n = min(per, count - posted * per)
            idx = [(posted * per + k) % SLOTS for k in range(n)]
            h = agent.make_prepped_xfer("WRITE", local, [0] * n, rdesc, idx, f"b{posted}".encode())
            if agent.transfer(h) == "ERR":
                raise RuntimeError("raw NIXL transfer failed")
            inflight.append(h)
            posted += 1
        inflight = _reap(agent, inflight)
    return _raw_nixl_done(raw, t0, local, rdesc, size * count)


def _nixl_threads(cfg: Any) -> dict[str, Any]:
    """How our nixl endpoints progressed: NIXL's own progress thread, and the notification thread's poll period
    (``None`` without it: notifications polled on the event loop)."""
    return {"nixl_progress_thread": cfg.progress_thread,
            "nixl_notif_poll_s": cfg.notif_poll_s if cfg.uses_notif_thread else None}


# the zmq variants by their data_socket setting: the default (auto: the data socket over tcp), frames only, forced
_ZMQ_KINDS: dict[str, Literal["auto", "zmq", "tcp"]] = {"zmq": "auto", "zmq-frames": "zmq", "zmq-tcp": "tcp"}


def _counts(size: int, mib: int, max_messages: int | None = None) -> int:
    n = max(8, (mib * MiB) // size)
    return n if max_messages is None else max(8, min(n, max_messages))


async def _check_landed(t: Any, peer: Child, src: Any, size: int) -> None:
    """One write of ``src[:size]`` through our transport, then the sha256 of what landed in the peer's region
    against the source's: the benchmark's bytes arrive intact (on the GPU path too)."""
    tag = f"check{size}"
    peer.send(op="expose", tag=tag, offset=0, nbytes=size, sender=t.name)
    reply = peer.read()
    if not reply.get("ok"):
        raise RuntimeError(f"peer failed: {reply}")
    await t.write("peer", tag, src[:size], 60.0)
    peer.send(op="wait", tag=tag, timeout=60.0, offset=0, nbytes=size)
    reply = peer.read()
    want = hashlib.sha256(src[:size].cpu().numpy().tobytes()).hexdigest()
    if reply.get("sha") != want:
        raise RuntimeError(f"{size} bytes: what landed differs from what was sent ({reply})")


async def bench_socket_backend(kind: str, sizes: list[int], repeats: int, mib: int, device: str = "cpu",
                               nixl_config: dict[str, Any] | None = None,
                               max_messages: int | None = None) -> list[dict[str, Any]]:
    import torch

    from dualpath.transports import create_transport
    from dualpath.transports.config import NixlTransportConfig, ZmqTransportConfig

    zmq_like = kind in _ZMQ_KINDS
    cfg = ZmqTransportConfig(data_socket=_ZMQ_KINDS[kind]) if zmq_like else NixlTransportConfig(**(nixl_config or {}))
    data_socket = isinstance(cfg, ZmqTransportConfig) and cfg.uses_data_socket
    buf = 4 * max(sizes)
    peer = Child(["-m", "dualpath.transports.peer", "peer", cfg.model_dump_json(), str(buf), device])
    if zmq_like:
        raw = Child(["-m", "dualpath.commands.bench_transport", "raw-zmq"])
    else:
        raw = Child(["-m", "dualpath.commands.bench_transport", "raw-nixl", str(buf), device])
    runs = []
    try:
        src = torch.randint(0, 256, (max(sizes),), dtype=torch.uint8).to(device)
        async with create_transport(cfg, "bench") as t:
            t.register(src)
            await t.connect("peer", peer.first["address"])
            if data_socket:  # large writes take it once it is up (a few ms)
                import anyio

                with anyio.fail_after(30):
                    while not t.data_socket_ready("peer"):  # type: ignore[attr-defined]
                        await anyio.sleep(0.01)
            land_pass: Callable[[int, int], float] | None = None
            tcp_pass: Callable[[int, int], float] | None = None
            batched_pass: Callable[[int, int], float] | None = None
            tcp_child: Child | None = None
            if zmq_like:
                import zmq

                ctx = zmq.Context()
                sock = ctx.socket(zmq.PUSH)
                sock.connect(raw.first["address"])

                def raw_pass(size: int, count: int) -> float:
                    return _raw_zmq_pass(sock, raw, src, size, count)

                def _land_pass(size: int, count: int) -> float:
                    return _raw_zmq_pass(sock, raw, src, size, count, land=True)

                land_pass = _land_pass
                import socket

                tcp_child = Child(["-m", "dualpath.commands.bench_transport", "raw-tcp"])
                tcp_sock = socket.create_connection(("127.0.0.1", tcp_child.first["port"]))
                tcp_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tcp_sock.settimeout(120.0)

                def _tcp_pass(size: int, count: int) -> float:
                    return _raw_tcp_pass(tcp_sock, tcp_child, src, size, count)

                tcp_pass = _tcp_pass
            else:
                agent = _nixl_agent(f"rawsend{os.getpid()}")
                agent.register_memory(src)
                remote = agent.add_remote_agent(bytes.fromhex(raw.first["md"]))

                def raw_pass(size: int, count: int) -> float:
                    return _raw_nixl_pass(agent, remote, raw, src, size, count)

                def _batched_pass(size: int, count: int) -> float:
                    return _raw_nixl_batched_pass(agent, remote, raw, src, size, count)

                batched_pass = _batched_pass
            for size in sizes:
                count = _counts(size, mib, max_messages)
                await _check_landed(t, peer, src, size)
                # warm-up (connections, allocator)
                raw_pass(size, min(count, 16))
                await _ours_pass(t, peer, src, size, min(count, 16), f"w{size}-")
                if tcp_pass is not None:
                    tcp_pass(size, min(count, 16))
                if batched_pass is not None:
                    batched_pass(size, min(count, 16))
                ours, base, landed, tcp = [], [], [], []
                shared0, writes0 = getattr(t, "shared_writes", 0), t.stats.writes
                batched: list[float] = []
                cpu_tcp: list[float] = []
                cpu_ours, cpu_raw = [], []
                for r in range(repeats):
                    with _Cpu(raw) as c:
                        base.append(raw_pass(size, count))
                    cpu_raw.append(c.seconds)
                    with _Cpu(peer) as c:
                        ours.append(await _ours_pass(t, peer, src, size, count, f"r{r}s{size}-"))
                    cpu_ours.append(c.seconds)
                    if land_pass is not None:
                        landed.append(land_pass(size, count))
                    if tcp_pass is not None and tcp_child is not None:
                        with _Cpu(tcp_child) as c:
                            tcp.append(tcp_pass(size, count))
                        cpu_tcp.append(c.seconds)
                if batched_pass is not None:  # after the alternating passes, so they run as they always did
                    batched = [batched_pass(size, count) for _ in range(repeats)]
                g, rg = statistics.median(ours), statistics.median(base)
                gib = size * count / 2**30
                co, cr = statistics.median(cpu_ours), statistics.median(cpu_raw)
                extra: dict[str, Any] = {"cpu_s_per_gib": round(co / gib, 4), "raw_cpu_s_per_gib": round(cr / gib, 4),
                                         "cpu_ratio": round(cr / co, 3) if co > 0 else None}
                if kind == "nixl":  # of the timed writes, those posted together with others in one WRITE
                    shared = getattr(t, "shared_writes", 0) - shared0
                    extra["shared_write_fraction"] = round(shared / max(1, t.stats.writes - writes0), 3)
                if data_socket:  # writes that took the data socket so far (all of ours at these sizes)
                    extra["data_socket_writes"] = t.data_socket_stats["writes"]  # type: ignore[attr-defined]
                if landed:  # reference: raw PUSH/PULL whose receiver also copies each frame into a landing slot
                    lg = statistics.median(landed)
                    extra.update(raw_land_gib_s=round(lg, 3), ratio_vs_raw_land=round(g / lg, 3))
                if batched:  # reference: raw NIXL with its writes batched as ours are when several are in flight
                    bg = statistics.median(batched)
                    extra.update(raw_batched_gib_s=round(bg, 3), ratio_vs_raw_batched=round(g / bg, 3))
                if tcp:  # reference: a plain TCP socket received straight into the landing slots
                    tg = statistics.median(tcp)
                    extra.update(raw_tcp_land_gib_s=round(tg, 3), raw_tcp_land_over_raw=round(tg / rg, 3),
                                 raw_tcp_land_cpu_s_per_gib=round(statistics.median(cpu_tcp) / gib, 4))
                runs.append({"backend": kind, "device": str(src.device), "size_bytes": size, "messages": count,
                             "window": _window(size), "landed_intact": True,
                             "landing_slots": SLOTS, **(_nixl_threads(cfg) if kind == "nixl" else {}),
                             "gib_s": round(g, 3), "raw_gib_s": round(rg, 3), "ratio": round(g / rg, 3),
                             "baseline": "raw pyzmq PUSH/PULL zero-copy" if zmq_like else "raw NIXL WRITE",
                             "gib_s_all": [round(x, 3) for x in ours], "raw_gib_s_all": [round(x, 3) for x in base],
                             **extra})
                more = f"  (raw+landing copy {extra['raw_land_gib_s']:.2f}, ratio {extra['ratio_vs_raw_land']:.2f})" \
                    if landed else ""
                if tcp:
                    more += f"  (raw TCP into slots {extra['raw_tcp_land_gib_s']:.2f})"
                if batched:
                    more += f"  (raw batched {extra['raw_batched_gib_s']:.2f}, ratio {extra['ratio_vs_raw_batched']:.2f})"
                if extra["cpu_ratio"] is not None:
                    more += f"  CPU raw/ours {extra['cpu_ratio']:.2f}"
                print(f"  {kind:8s} {src.device.type:4s} {size // KiB:>6d} KiB  {g:6.2f} GiB/s  raw {rg:6.2f}  "
                      f"ratio {g / rg:5.2f}{more}", flush=True)
            if zmq_like:
                sock.close(0)
                ctx.term()
                tcp_sock.close()
    finally:
        peer.close()
        raw.close()
        if tcp_child is not None:
            tcp_child.close()
    return runs


def _loopback_block(size: int) -> int:
    """Transfers per timed block of the loopback bench: ~4 MiB of copies (1 to 64), so a block lasts long enough
    for the clock and short enough that load from other processes rarely lands in one side of a pair only."""
    return max(1, min(64, (4 * MiB) // size))


async def bench_loopback(sizes: list[int], repeats: int, mib: int) -> list[dict[str, Any]]:
    """Loopback (expose + write + wait per transfer, the full contract) vs a plain ``copy_`` of the same bytes.

    Both walk one shared cursor over 64 MiB pools (distinct Layer Blocks into distinct landing slots, as an engine
    does; larger than the caches, so each side copies cold bytes), in alternating blocks of
    :func:`_loopback_block` transfers: raw, ours, raw, ours... Each block gives a time per transfer; ``gib_s``
    and ``raw_gib_s`` come from the medians over all blocks and ``ratio`` is the median of the per-pair ratios
    (raw block time / the next ours block time), so load from other processes that hits a few blocks moves
    neither. ``gib_s_all``/``raw_gib_s_all`` are the per-repeat medians."""
    from ctypes import memmove

    import torch

    from dualpath.transports import create_transport
    from dualpath.transports.config import LoopbackTransportConfig
    from dualpath.transports.loopback import LoopbackFabric

    fabric = LoopbackFabric()
    cfg = LoopbackTransportConfig()
    runs = []
    clock = time.perf_counter_ns
    async with create_transport(cfg, "a", fabric=fabric) as a, create_transport(cfg, "b", fabric=fabric) as b:
        await a.connect("b", "b")
        pool = 64 * MiB
        src = torch.randint(0, 256, (pool,), dtype=torch.uint8)
        dst = torch.zeros(pool, dtype=torch.uint8)
        region = b.register(dst)
        a.register(src)
        for size in sizes:
            count = _counts(size, mib)
            slots = pool // size
            block = _loopback_block(size)
            srcs = [src[j * size:(j + 1) * size] for j in range(slots)]
            dsts = [dst[j * size:(j + 1) * size] for j in range(slots)]
            cursor = 0

            async def ours(block: int = block, size: int = size, slots: int = slots, srcs: Any = srcs) -> float:
                nonlocal cursor
                first = cursor
                cursor += block
                t0 = clock()
                for i in range(first, first + block):
                    j = i % slots
                    b.expose("t", region, j * size, size)
                    await a.write("b", "t", srcs[j], 10.0)
                    await b.wait("t", 10.0)
                return (clock() - t0) / block

            def raw(block: int = block, slots: int = slots, srcs: Any = srcs, dsts: Any = dsts) -> float:
                nonlocal cursor
                first = cursor
                cursor += block
                t0 = clock()
                for i in range(first, first + block):
                    j = i % slots
                    dsts[j].copy_(srcs[j])
                return (clock() - t0) / block

            ptrs = [(d.data_ptr(), s_.data_ptr()) for d, s_ in zip(dsts, srcs, strict=True)]

            def raw_memmove(block: int = block, slots: int = slots, size: int = size, ptrs: Any = ptrs) -> float:
                nonlocal cursor
                first = cursor
                cursor += block
                t0 = clock()
                for i in range(first, first + block):
                    d, s_ = ptrs[i % slots]
                    memmove(d, s_, size)
                return (clock() - t0) / block

            pairs = max(4, count // block)
            for _ in range(min(pairs, 8)):  # warm-up
                raw()
                raw_memmove()
                await ours()
            o_all: list[float] = []
            r_all: list[float] = []
            m_all: list[float] = []
            o_rep, r_rep = [], []
            for _ in range(repeats):
                o_ns, r_ns = [], []
                for _ in range(pairs):
                    r_ns.append(raw())
                    o_ns.append(await ours())
                    m_all.append(raw_memmove())
                o_all += o_ns
                r_all += r_ns
                o_rep.append(size / statistics.median(o_ns))  # bytes per ns
                r_rep.append(size / statistics.median(r_ns))
            to_gib_s = 1e9 / 2**30
            g = size / statistics.median(o_all) * to_gib_s
            rg = size / statistics.median(r_all) * to_gib_s
            ratio = statistics.median(r / o for r, o in zip(r_all, o_all, strict=True))
            ratio_mm = statistics.median(m / o for m, o in zip(m_all, o_all, strict=True))
            runs.append({"backend": "loopback", "size_bytes": size, "messages": pairs * repeats * block, "window": 1,
                         "block": block, "gib_s": round(g, 3), "raw_gib_s": round(rg, 3), "ratio": round(ratio, 3),
                         "ratio_of_medians": round(g / rg, 3), "baseline": "torch copy_",
                         "ratio_vs_memmove": round(ratio_mm, 3),
                         "raw_memmove_gib_s": round(size / statistics.median(m_all) * to_gib_s, 3),
                         "us_per_transfer": round(statistics.median(o_all) / 1e3, 3),
                         "raw_us_per_transfer": round(statistics.median(r_all) / 1e3, 3),
                         "gib_s_all": [round(x * to_gib_s, 3) for x in o_rep],
                         "raw_gib_s_all": [round(x * to_gib_s, 3) for x in r_rep]})
            print(f"  loopback {size // KiB:>6d} KiB  {g:6.2f} GiB/s  raw {rg:6.2f}  ratio {ratio:5.2f}"
                  f"  (vs memmove {ratio_mm:4.2f})"
                  f"  ({statistics.median(o_all) / 1e3:.2f} vs {statistics.median(r_all) / 1e3:.2f} us per transfer)",
                  flush=True)
    return runs


async def bench_links(quick: bool) -> list[dict[str, Any]]:
    import anyio

    from dualpath.traffic import Link
    from dualpath.types import TrafficClass

    out = []
    rate = 200e6
    reps = 2 if quick else 4
    # accuracy: 8 concurrent closed-loop flows of 0.5-1.4 MB messages (staggered, so completions do not
    # coincide and the link stays contended) for ~0.5-1 s
    acc = []
    for _ in range(reps):
        link = Link("bench", rate)
        seconds = 0.5 if quick else 1.0
        sizes = [500_000 + 125_000 * i for i in range(8)]
        per_flow = rate * seconds / 8
        t0 = time.perf_counter()

        async def flow(size: int, link: Link = link, per_flow: float = per_flow) -> None:
            for _ in range(max(1, int(per_flow // size))):
                await link.transfer(size)

        async with anyio.create_task_group() as tg:
            for size in sizes:
                tg.start_soon(flow, size)
        elapsed = time.perf_counter() - t0
        acc.append(link.stats.bytes["kv"] / elapsed)
    delivered = statistics.median(acc)
    out.append({"backend": "link_accuracy", "setting_mb_s": rate / 1e6, "delivered_mb_s": round(delivered / 1e6, 2),
                "ratio": round(delivered / rate, 4), "flows": 8, "all_mb_s": [round(x / 1e6, 2) for x in acc],
                "target": "within +-5% of the setting"})
    print(f"  link accuracy: set {rate / 1e6:.0f} MB/s, delivered {delivered / 1e6:.1f} MB/s "
          f"(ratio {delivered / rate:.3f})", flush=True)
    # priority: a 4 MB high-class transfer on an idle link vs with 8 saturating KV flows
    idle, busy, kv_during = [], [], []
    hi_bytes = 4_000_000
    for _ in range(reps):
        link = Link("bench", rate)
        t0 = time.perf_counter()
        await link.transfer(hi_bytes, TrafficClass.HIGH)
        idle.append(time.perf_counter() - t0)
        link = Link("bench", rate)
        stop = anyio.Event()

        async def kv_load(link: Link = link, stop: anyio.Event = stop) -> None:
            while not stop.is_set():
                await link.transfer(2_000_000, TrafficClass.KV)

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(kv_load)
            await anyio.sleep(0.05)
            kv0 = link.carried(TrafficClass.KV)
            t0 = time.perf_counter()
            await link.transfer(hi_bytes, TrafficClass.HIGH)
            dt = time.perf_counter() - t0
            busy.append(dt)
            kv_during.append((link.carried(TrafficClass.KV) - kv0) / dt / rate)
            stop.set()
            tg.cancel_scope.cancel()
    ratio = statistics.median(busy) / statistics.median(idle)
    out.append({"backend": "link_priority", "setting_mb_s": rate / 1e6, "high_bytes": hi_bytes,
                "idle_latency_s": round(statistics.median(idle), 5), "loaded_latency_s": round(statistics.median(busy), 5),
                "ratio": round(ratio, 4), "kv_share_while_high": round(statistics.median(kv_during), 4),
                "target": "loaded / idle <= 1.10; KV yields to ~1%"})
    print(f"  link priority: high-class latency loaded/idle = {ratio:.3f}; KV share while high active "
          f"{statistics.median(kv_during):.3f}", flush=True)
    return out


def _nixl_config_arg(text: str | None) -> dict[str, Any]:
    """``--nixl-config``: a JSON object of NixlTransportConfig fields, checked here (a ConfigError naming the
    option and the field)."""
    from pydantic import ValidationError

    from dualpath.errors import ConfigError
    from dualpath.transports.config import NixlTransportConfig

    if not text:
        return {}
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--nixl-config: not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ConfigError("--nixl-config: a JSON object of NixlTransportConfig fields is expected")
    try:
        NixlTransportConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--nixl-config: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return fields


def run(args: argparse.Namespace) -> int:
    import anyio

    quick = bool(getattr(args, "quick", False))
    repeats = args.repeats or (2 if quick else 5)
    device = getattr(args, "device", "cpu") or "cpu"
    # GPU memory moves ~100x faster than DRAM over TCP/shm: a pass of 256 MiB would last well under a millisecond,
    # about what each pass's fixed cost is (the commands to both helper processes, the last notification's
    # poll). On cuda a pass is 4 GiB, at most 4096 messages (a few tens of ms each, as DRAM passes are)
    mib = args.mib_per_point or (96 if quick else 4096 if device == "cuda" else 256)
    max_messages = 4096 if device == "cuda" else None
    nixl_config = _nixl_config_arg(getattr(args, "nixl_config", None))
    backends = [b.strip() for b in (args.backends or "").split(",") if b.strip()]
    sizes = SIZES
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    unknown = [b for b in backends if b != "loopback" and b != "nixl" and b not in _ZMQ_KINDS]
    if unknown:  # (before anything runs: a typo in the last name must not cost the others' minutes first)
        from dualpath.errors import ConfigError

        raise ConfigError(f"--backends: unknown backend {unknown[0]!r} (loopback, zmq, zmq-frames, zmq-tcp, nixl)")
    if device == "cuda":
        import torch

        from dualpath.errors import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
        others = [b for b in backends if b != "nixl"]
        if others:
            raise ConfigError(f"--device cuda measures nixl only (GPU memory to GPU memory); drop {others} from "
                              "--backends")

    async def main() -> None:
        for kind in backends:
            print(f"{kind}:", flush=True)
            if kind == "loopback":
                runs.extend(await bench_loopback(sizes, repeats, mib))
            elif kind in _ZMQ_KINDS or kind == "nixl":
                if kind == "nixl":
                    from dualpath.transports.nixl_agent import import_nixl

                    if import_nixl() is None:
                        skipped["nixl"] = "nixl extra not installed"
                        print("  skipped: nixl extra not installed")
                        continue
                runs.extend(await bench_socket_backend(kind, sizes, repeats, mib, device, nixl_config, max_messages))
        if not args.no_links:
            print("links:", flush=True)
            runs.extend(await bench_links(quick))

    anyio.run(main)
    targets = {"zmq": 0.85, "zmq-frames": 0.85, "zmq-tcp": 0.85, "nixl": 0.85, "loopback": 0.80}
    checks = {}
    for kind, target in targets.items():
        rs = [r["ratio"] for r in runs if r["backend"] == kind and (kind == "loopback" or r["size_bytes"] >= MiB)]
        if rs:
            checks[kind] = {"min_ratio": min(rs), "target": target, "met": min(rs) >= target}
    for r in runs:
        if r["backend"] == "link_accuracy":
            checks["link_accuracy"] = {"ratio": r["ratio"], "met": abs(r["ratio"] - 1) <= 0.05}
        if r["backend"] == "link_priority":
            checks["link_priority"] = {"ratio": r["ratio"], "met": r["ratio"] <= 1.10}
    result = {"bench": "transport", "device": device, "nixl_config": nixl_config, "quick": quick, "repeats": repeats, "mib_per_point": mib, "runs": runs,
              "checks": checks, "skipped": skipped, "cpu_count": os.cpu_count()}
    print("checks:", json.dumps(checks))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":  # helper processes of the raw baselines
    if sys.argv[1] == "raw-zmq":
        raw_zmq_pull()
    elif sys.argv[1] == "raw-tcp":
        raw_tcp_recv()
    elif sys.argv[1] == "raw-nixl":
        raw_nixl_recv(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "cpu")
