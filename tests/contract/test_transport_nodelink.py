"""One node, one set of links across processes: engines of one node in different processes share the node's
emulated storage NIC (its bandwidth model) and its read queue through the node's link service
(:mod:`dualpath.traffic.nodelink`). Two engine processes plus this process (the node's first engine, which
serves the links)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import textwrap

import anyio
import pytest

from dualpath.engine.links import LinkSet
from dualpath.errors import PeerTimeout
from dualpath.traffic.nodelink import NodeLinkServer, RemoteLink, share_node_links
from dualpath.types import TrafficClass

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


GBPS = 0.002  # 2 MB/s: a 2 MB read takes ~1 s on the emulated link
READ = 2_000_000
TOKENS = 640

ENGINE = textwrap.dedent("""
    import json, sys, anyio
    from dualpath.engine.links import LinkSet
    from dualpath.traffic.nodelink import share_node_links

    async def main(index, scheduler, mode):
        links = LinkSet()
        for d in ("read", "write"):
            links.add_link(f"pnode0.snic.{d}", %(gbps)r)
        client = await share_node_links(links, "pnode0", index, scheduler, 3)
        link = links.links["pnode0.snic.read"]
        try:
            print(json.dumps({"ready": type(link).__name__}), flush=True)
            if mode == "watch":  # until another engine's read shows in the node's queue (deadline 20 s)
                seen = 0
                with anyio.move_on_after(20):
                    while seen < %(tokens)d:
                        seen = max(seen, link.queued_tokens)
                        await anyio.sleep(0.01)
                print(json.dumps({"seen_tokens": seen}), flush=True)
            # a storage read as the traffic manager charges it: in the node's queue while it runs
            with link.track(%(read)d, %(tokens)d):
                print(json.dumps({"reading": True}), flush=True)
                await link.transfer(%(read)d, tokens=%(tokens)d, track=False)
            print(json.dumps({"done": link.stats.bytes["kv"]}), flush=True)
        finally:
            await client.close()

    anyio.run(main, int(sys.argv[1]), sys.argv[2], sys.argv[3])
""") % {"gbps": GBPS, "tokens": TOKENS, "read": READ}


class Engine:
    def __init__(self, index: int, scheduler: str, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ENGINE, str(index), scheduler, mode],
                                     stdout=subprocess.PIPE, text=True)

    def read(self, timeout: float = 30.0) -> dict[str, object]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "engine process did not answer in time"
        line = self.proc.stdout.readline()
        assert line, f"engine process exited with {self.proc.poll()}"
        return json.loads(line)  # type: ignore[no-any-return]

    async def aread(self, timeout: float = 30.0) -> dict[str, object]:
        return await anyio.to_thread.run_sync(self.read, timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.mark.slow
async def test_two_engine_processes_share_the_node_snic_and_read_queue(tmp_path: object) -> None:
    scheduler = f"tcp://127.0.0.1:1|test-{id(tmp_path)}"
    links = LinkSet()
    for d in ("read", "write"):
        links.add_link(f"pnode0.snic.{d}", GBPS)
    server = await share_node_links(links, "pnode0", 0, scheduler, 3)
    assert isinstance(server, NodeLinkServer)
    shared = links.links["pnode0.snic.read"]
    peak = [0]

    async def watch_queue() -> None:  # from before any read starts (a read lasts ~1 s: a late look may miss it)
        while True:
            peak[0] = max(peak[0], shared.queued_tokens)
            await anyio.sleep(0.005)

    watcher = Engine(1, scheduler, "watch")
    reader = Engine(2, scheduler, "read")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_queue)
            assert (await watcher.aread())["ready"] == "RemoteLink"
            assert (await reader.aread())["ready"] == "RemoteLink"
            assert (await reader.aread())["reading"] is True
            # the other process sees the reader's read in the node's queue, and so does the serving engine
            assert (await watcher.aread())["seen_tokens"] == TOKENS
            assert (await watcher.aread())["reading"] is True
            assert peak[0] >= TOKENS
            # both processes' bytes crossed the one emulated link of the node
            assert (await reader.aread())["done"] == READ
            assert (await watcher.aread())["done"] == READ
            assert shared.stats.bytes[TrafficClass.KV.value] == 2 * READ
            assert shared.stats.transfers[TrafficClass.KV.value] == 2
            with anyio.fail_after(10):
                while shared.queued_tokens or shared.queued_bytes:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    finally:
        watcher.close()
        reader.close()
        await server.close()


async def test_one_engine_per_node_or_unlimited_links_share_nothing() -> None:
    links = LinkSet()
    for d in ("read", "write"):
        links.add_link(f"dnode0.snic.{d}", None)
    assert await share_node_links(links, "dnode0", 1, "tcp://127.0.0.1:1", 2) is None
    links.add_link("dnode0.snic.read", 1.0)
    assert await share_node_links(links, "dnode0", 1, "tcp://127.0.0.1:1", 1) is None
    assert not isinstance(links.links["dnode0.snic.read"], RemoteLink)


async def test_cancelled_remote_transfer_leaves_the_shared_link_and_a_dead_service_times_out() -> None:
    scheduler = "tcp://127.0.0.1:1|test-cancel"
    host = LinkSet()
    for d in ("read", "write"):
        host.add_link(f"pnode0.snic.{d}", GBPS)
    server = await share_node_links(host, "pnode0", 0, scheduler, 2)
    other = LinkSet()
    for d in ("read", "write"):
        other.add_link(f"pnode0.snic.{d}", GBPS)
    client = await share_node_links(other, "pnode0", 1, scheduler, 2)
    assert server is not None and client is not None
    shared, remote = host.links["pnode0.snic.read"], other.links["pnode0.snic.read"]
    assert isinstance(remote, RemoteLink)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(remote.transfer, 10 * READ)  # ~10 s on the shared link: cancelled long before
            with anyio.fail_after(10):
                while shared.queued_bytes < 10 * READ:  # the flow is on the node's link, seen by the host
                    await anyio.sleep(0.01)
            with anyio.fail_after(10):
                while remote.queued_bytes < 10 * READ:  # ... and pushed to the other engine
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):  # the service dropped the flow: nothing queued, nothing counted as carried
            while shared.queued_bytes:
                await anyio.sleep(0.01)
        assert shared.stats.bytes[TrafficClass.KV.value] == 0
    finally:
        await server.close()
    assert isinstance(client, type(remote.client))
    client.timeout_s = 0.2  # nobody serves the node any more: a transfer ends in its deadline
    with pytest.raises(PeerTimeout, match="link service"):
        await remote.transfer(1000)
    await client.close()
