"""The nixl transport's per-request grants and their revocation fence (issue 16): one side-channel round trip per
request group however many layers it writes, later landings of the group pushed without a request, and a
withdrawn landing (cancel, wait timeout) revoked so no write of its grant lands afterwards, acknowledged by the
sender, or, for a sender that never acknowledges, made unreachable by re-registering the region."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import torch

from dualpath.errors import PeerTimeout, TransportClosed, TransportError
from dualpath.transports import create_transport
from dualpath.transports.config import NixlTransportConfig
from dualpath.transports.wire import Header, Kind, Status, decode, encode

try:
    import nixl_cu12  # noqa: F401

    HAVE_NIXL = True
except ImportError:  # pragma: no cover
    HAVE_NIXL = False

pytestmark = [pytest.mark.anyio, pytest.mark.nixl, pytest.mark.skipif(not HAVE_NIXL, reason="nixl extra")]

LAYERS, SIZE = 8, 32 << 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=[False, True], ids=["loop-notifs", "notif-thread"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[object, object]]:
    """Sender and receiver, the receiver's notifications polled on its event loop or on its notification thread
    (the guarantees hold either way)."""
    cfg = NixlTransportConfig(pending_timeout_s=0.5, notif_thread=request.param)
    async with create_transport(cfg, "snd") as a, create_transport(cfg, "rcv") as b:
        await a.connect("rcv", b.address)
        yield a, b


def _pattern(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _buffers(a: Any, b: Any, layers: int, seed: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``layers`` layers of zeros registered on the receiver ``b`` (with its region) and a pattern registered
    on the sender ``a``."""
    dst = torch.zeros(layers * SIZE, dtype=torch.uint8)
    region = b.register(dst)
    src = _pattern(layers * SIZE, seed)
    a.register(src)
    return dst, region, src


def _tag(layer: int) -> str:
    return f"r7/kv/l{layer}/p0"


def _record_replies(a: Any, peer: Any) -> list[list[bytes]]:
    """Restart the sender ``a``'s reader of ``peer`` so that every message it receives is also recorded (the
    returned list)."""
    frames: list[list[bytes]] = []
    recv = peer.sock.recv_multipart

    async def spy() -> list[bytes]:
        got = await recv()
        frames.append(got)
        return got

    peer.sock.recv_multipart = spy
    peer.reader.cancel()
    peer.reader = a._spawn(peer._read())
    return frames


async def _until(cond: object, what: str, deadline: float = 5.0) -> None:
    with anyio.fail_after(deadline):
        while not cond():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def test_one_handshake_for_all_layers_of_a_request(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, LAYERS, 1)
    for layer in range(LAYERS):
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
    for layer in range(LAYERS):  # layer by layer, as prefill streams them
        await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src)
    assert a.handshakes == 1
    # another request: its own single handshake
    for layer in range(2):
        b.expose(f"r8/kv/l{layer}/p0", region, layer * SIZE, SIZE)
    for layer in range(2):
        await a.write("rcv", f"r8/kv/l{layer}/p0", src[:SIZE], 5.0)
        await b.wait(f"r8/kv/l{layer}/p0", 5.0)
    assert a.handshakes == 2


async def test_landings_exposed_later_are_pushed(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, LAYERS, 2)
    peer = a._peers["rcv"]
    for layer in range(LAYERS):
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
        if layer > 0:
            await _until(lambda layer=layer: _tag(layer) in peer.grants, "pushed grant")
        await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src)
    assert a.handshakes == 1


async def test_a_burst_of_exposes_reaches_the_sender_as_one_packed_message(pair: tuple) -> None:  # type: ignore[type-arg]
    """Landings of a granted group exposed in one event-loop pass are pushed as one GRANTS frame, each grant
    usable (one handshake in all); a damaged GRANTS frame is dropped whole, so no write starts under it."""
    a, b = pair
    dst, region, src = _buffers(a, b, LAYERS, 4)
    peer = a._peers["rcv"]
    b.expose(_tag(0), region, 0, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)  # the group's one request
    await b.wait(_tag(0), 5.0)
    frames = _record_replies(a, peer)
    for layer in range(1, LAYERS):  # one pass: no await between them
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
    assert b._landings._slots[_tag(1)].host is None  # one-sided: the slot needs no host memoryview
    await _until(lambda: all(_tag(layer) in peer.grants for layer in range(1, LAYERS)), "pushed grants")
    assert len(frames) == 1 and len(frames[0]) == 1
    assert decode(frames[0][0]).kind is Kind.GRANTS and decode(frames[0][0]).payload_len == LAYERS - 1
    for layer in range(1, LAYERS):
        await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src) and a.handshakes == 1
    woken: set[str] = set()
    peer._on_grants(decode(frames[0][0][:-2]), woken)  # truncated: nothing of it is taken
    assert not woken and not peer.grants


async def test_an_expose_naming_its_sender_hands_over_the_landing_before_any_request(pair: tuple) -> None:  # type: ignore[type-arg]
    """Landings exposed with ``sender=`` the peer that said HELLO are claimed for it and pushed at once, in
    messages of at most ``_PUSH_CHUNK`` grants (the first writes need not wait for the last exposes): its writes
    need no request at all, and every byte lands once, in place."""
    from dualpath.transports import nixl

    a, b = pair
    n = 2 * nixl._PUSH_CHUNK + 5
    dst = torch.zeros(n * 1024, dtype=torch.uint8)
    region = b.register(dst)
    src = _pattern(n * 1024, 11)
    a.register(src)
    peer = a._peers["rcv"]
    frames = _record_replies(a, peer)
    for i in range(n):  # one event-loop pass
        b.expose(f"r3/hit/l{i}", region, i * 1024, 1024, sender="snd")
    await _until(lambda: len(peer.grants) == n, "pushed grants")
    sizes = [decode(f).payload_len for got in frames for f in got]
    assert sizes == [nixl._PUSH_CHUNK, nixl._PUSH_CHUNK, 5]
    for i in range(n):
        await a.write("rcv", f"r3/hit/l{i}", src[i * 1024 : (i + 1) * 1024], 5.0)
    for i in range(n):
        await b.wait(f"r3/hit/l{i}", 5.0)
    assert torch.equal(dst, src) and a.handshakes == 0
    # a name nobody said HELLO under is no one to push to: the write asks, once for its group
    b.expose("r4/hit/l0", region, 0, 1024, sender="nobody")
    await a.write("rcv", "r4/hit/l0", src[:1024], 5.0)
    await b.wait("r4/hit/l0", 5.0)
    assert a.handshakes == 1


async def test_a_landing_named_for_one_sender_is_taken_back_when_another_writes_it(pair: tuple) -> None:  # type: ignore[type-arg]
    """The hint does not bind: a second sender's request for a landing pushed to the first revokes the first's
    grant (fenced: acknowledged) and lands the second's bytes; the first's write under its old grant is refused
    and writes nothing."""
    a, b = pair
    cfg = NixlTransportConfig(pending_timeout_s=0.5)
    async with create_transport(cfg, "oth") as c:
        await c.connect("rcv", b.address)
        dst = torch.zeros(SIZE, dtype=torch.uint8)
        region = b.register(dst)
        src_a, src_c = _pattern(SIZE, 12), _pattern(SIZE, 13)
        a.register(src_a)
        c.register(src_c)
        b.expose(_tag(0), region, 0, SIZE, sender="snd")
        await _until(lambda: _tag(0) in a._peers["rcv"].grants, "pushed grant")
        await c.write("rcv", _tag(0), src_c, 5.0)
        await b.wait(_tag(0), 5.0)
        assert torch.equal(dst, src_c)
        with pytest.raises(TransportError):
            await a.write("rcv", _tag(0), src_a, 1.0)
        await anyio.sleep(0.05)
        assert torch.equal(dst, src_c)


async def test_a_granted_write_from_a_deregistered_source_is_refused(pair: tuple) -> None:  # type: ignore[type-arg]
    """The per-layer fast path remembers its last source region; once that region is deregistered, a write
    from it is refused as for any unregistered source (nothing is posted from memory NIXL no longer knows)."""
    a, b = pair
    dst, region, src = _buffers(a, b, 3, 5)
    for layer in range(3):
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
    for layer in range(2):  # the request (its answer grants the other layers), then one granted write
        await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        await b.wait(_tag(layer), 5.0)
    assert _tag(2) in a._peers["rcv"].grants and a._src_region is not None
    a.deregister(a.find_region(src))
    with pytest.raises(TransportError, match="registered region"):
        await a.write("rcv", _tag(2), src[2 * SIZE:], 5.0)
    assert not torch.any(dst[2 * SIZE:])


async def test_writers_waiting_on_the_request_take_pushed_grants_without_asking_again(pair: tuple) -> None:  # type: ignore[type-arg]
    """Every layer's write starts before anything is exposed: one request goes out and is held; the landings then
    exposed one by one are pushed while the other writers wait on that request, and each takes its own grant
    (none asks again): one handshake, every byte in place."""
    a, b = pair
    dst, region, src = _buffers(a, b, LAYERS, 9)

    async def write(layer: int) -> None:
        await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)

    async with anyio.create_task_group() as tg:
        for layer in range(LAYERS):
            tg.start_soon(write, layer)
        await _until(lambda: b._held, "the request held at the receiver")
        for layer in reversed(range(LAYERS)):  # the requested landing last: the others are pushed meanwhile
            b.expose(_tag(layer), region, layer * SIZE, SIZE)
            await anyio.sleep(0.01)
    for layer in range(LAYERS):
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src)
    assert a.handshakes == 1


async def test_duplicate_write_under_one_grant_is_refused(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, 2, 3)
    b.expose(_tag(0), region, 0, SIZE)
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)
    await a.write("rcv", _tag(1), src[SIZE:], 5.0)
    with pytest.raises(TransportError):
        await a.write("rcv", _tag(1), src[:SIZE], 5.0)  # a second arrival for a landed tag
    await b.wait(_tag(1), 5.0)
    assert torch.equal(dst[SIZE:], src[SIZE:])


async def test_cancel_mid_request_revokes_and_nothing_lands_after(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, LAYERS, 4)
    for layer in range(LAYERS):
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)  # grants every layer
    await b.wait(_tag(0), 5.0)
    peer = a._peers["rcv"]
    assert all(_tag(layer) in peer.grants for layer in range(1, LAYERS))
    handle = region.handle
    for layer in range(1, LAYERS):
        b.cancel(_tag(layer))
    await b.settle()  # every revocation acknowledged by the sender
    assert region.handle is handle  # acknowledged: no re-registration needed
    assert not any(_tag(layer) in peer.grants for layer in range(1, LAYERS))
    failed: list[int] = []

    async def late_write(layer: int) -> None:  # the prefill side carrying on after decode cancelled
        try:
            await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        except TransportError:
            failed.append(layer)

    async with anyio.create_task_group() as tg:
        for layer in range(1, LAYERS):
            tg.start_soon(late_write, layer)
    assert sorted(failed) == list(range(1, LAYERS))
    assert torch.count_nonzero(dst[SIZE:]) == 0
    assert torch.equal(dst[:SIZE], src[:SIZE])
    # the tags can be exposed again: a fresh grant under a new epoch, and the write lands
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(1), src[SIZE:2 * SIZE], 5.0)
    await b.wait(_tag(1), 5.0)
    assert torch.equal(dst[SIZE:2 * SIZE], src[SIZE:2 * SIZE])


async def test_wait_timeout_revokes_before_it_returns(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, 2, 5)
    b.expose(_tag(0), region, 0, SIZE)
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)
    await b.wait(_tag(0), 5.0)
    with pytest.raises(PeerTimeout):
        await b.wait(_tag(1), 0.05)
    # wait returned only after the fence: the sender has already dropped the grant and acknowledged
    peer = a._peers["rcv"]
    assert _tag(1) not in peer.grants and any(t == _tag(1) for t, _ in peer.revoked)
    with pytest.raises(TransportError):
        await a.write("rcv", _tag(1), src[SIZE:], 5.0)
    assert torch.count_nonzero(dst[SIZE:]) == 0


async def test_notification_of_a_revoked_grant_is_dropped(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    dst, region, src = _buffers(a, b, 2, 6)
    b.expose(_tag(0), region, 0, SIZE)
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)
    epoch = a._peers["rcv"].grants[_tag(1)].epoch
    b.cancel(_tag(1))
    await b.settle()
    rejected = b._landings.rejected
    b._on_notif("snd", encode(Header(Kind.DONE, 99, _tag(1), SIZE, arg=epoch)))  # as if posted before the revoke
    assert b._landings.rejected == rejected  # dropped quietly, not counted as a bad arrival
    b._on_notif("snd", encode(Header(Kind.DONE, 98, _tag(1), SIZE, arg=epoch + 1000)))  # never granted
    assert b._landings.rejected == rejected + 1


async def test_silent_sender_gets_its_region_reregistered(pair: tuple, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    from dualpath.transports import nixl

    monkeypatch.setattr(nixl, "_FENCE_S", 0.3)
    a, b = pair
    dst, region, src = _buffers(a, b, 2, 7)
    b.expose(_tag(0), region, 0, SIZE)
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)
    await b.wait(_tag(0), 5.0)
    handle, epoch = region.handle, b._md_epoch
    await a.close()  # the sender dies holding the grant of layer 1: it will never acknowledge the revocation
    b.cancel(_tag(1))
    await b.settle()
    assert region.handle is not None and region.handle is not handle  # old remote keys are invalid
    assert b._md_epoch > epoch  # honest senders reload the metadata on their next grant
    # the re-registered region still receives: a new sender, a new grant
    cfg = NixlTransportConfig(pending_timeout_s=0.5)
    async with create_transport(cfg, "snd2") as c:
        src2 = _pattern(SIZE, 8)
        c.register(src2)
        await c.connect("rcv", b.address)
        b.expose(_tag(1), region, SIZE, SIZE)
        await c.write("rcv", _tag(1), src2, 5.0)
        await b.wait(_tag(1), 5.0)
    assert torch.equal(dst[SIZE:], src2)


async def test_second_sender_takes_a_landing_granted_to_the_first(pair: tuple) -> None:  # type: ignore[type-arg]
    """Grouping only batches grants: a landing of the group granted to one sender is revoked (acknowledged) and
    granted to another sender that asks for it; each landing still takes exactly one arrival."""
    a, b = pair
    dst, region, src = _buffers(a, b, 2, 9)
    b.expose(_tag(0), region, 0, SIZE)
    b.expose(_tag(1), region, SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)  # layer 1 is now granted to snd too
    assert _tag(1) in a._peers["rcv"].grants
    cfg = NixlTransportConfig(pending_timeout_s=0.5)
    async with create_transport(cfg, "snd2") as c:
        src2 = _pattern(SIZE, 10)
        c.register(src2)
        await c.connect("rcv", b.address)
        await c.write("rcv", _tag(1), src2, 5.0)
        await b.wait(_tag(1), 5.0)
        assert torch.equal(dst[SIZE:], src2)
        assert _tag(1) not in a._peers["rcv"].grants  # revoked at the first sender
        with pytest.raises(TransportError):
            await a.write("rcv", _tag(1), src[SIZE:], 5.0)
    await b.wait(_tag(0), 5.0)
    assert torch.equal(dst[:SIZE], src[:SIZE]) and torch.equal(dst[SIZE:], src2)


class _StuckAgent:
    """The sender's NIXL agent with every posted WRITE reported in progress forever (a peer that stopped
    progressing): what the per-layer fast path's deadline and ``close`` must end."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def transfer(self, handle: Any) -> str:
        self._agent.transfer(handle)
        return "PROC"

    def check_xfer_state(self, handle: Any) -> str:
        return "PROC"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)


async def _granted_stuck_sender(a: Any, b: Any, layers: int) -> torch.Tensor:
    """Layer 0 written (the grant round trip, which also grants the other layers), then ``a``'s agent stuck."""
    dst, region, src = _buffers(a, b, layers, 5)
    for layer in range(layers):
        b.expose(_tag(layer), region, layer * SIZE, SIZE)
    await a.write("rcv", _tag(0), src[:SIZE], 5.0)
    await _until(lambda: _tag(1) in a._peers["rcv"].grants, "the pushed grant of layer 1")
    a._agent = _StuckAgent(a._agent)
    for task in list(a._tasks):  # the progress loop holds the agent it started with: start it again
        if "_progress" in repr(task.get_coro()):
            task.cancel()
    a._spawn(a._progress())
    return src


async def test_a_granted_write_that_never_completes_times_out_at_its_deadline(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    src = await _granted_stuck_sender(a, b, 2)
    assert a.handshakes == 1
    # the per-layer fast path (grant held, no checksum) has no cancel scope: the progress loop ends it
    t0 = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(PeerTimeout, match="deadline"):
        await a.write("rcv", _tag(1), src[SIZE:2 * SIZE], 0.3)
    assert 0.25 <= anyio.current_time() - t0 < 3.0
    assert not a._inflight  # nothing left polled; the handle was released


async def test_close_ends_a_granted_write_that_never_completes(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    src = await _granted_stuck_sender(a, b, 2)
    errors: list[BaseException] = []

    async def writer() -> None:
        try:
            await a.write("rcv", _tag(1), src[SIZE:2 * SIZE], 30.0)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await _until(lambda: bool(a._inflight), "the write posted")
        await a.close()
    assert len(errors) == 1 and isinstance(errors[0], TransportClosed), errors


class _PostedAgent:
    """The sender's NIXL agent with every WRITE reported still in progress when posted (the real one polled
    afterwards): a peer with writes in flight, whatever the copy's speed on this machine."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def transfer(self, handle: Any) -> str:
        state = self._agent.transfer(handle)
        return "PROC" if state == "DONE" else state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)


async def _granted_all(a: Any, b: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` landings of ``b`` exposed for ``a`` (their grants pushed and held), ``a``'s agent reporting every
    WRITE in progress when posted."""
    dst, region, src = _buffers(a, b, n, seed)
    peer = a._peers["rcv"]
    b.expose("r1/kv/l0/p0", region, 0, SIZE)  # a first write loads the receiver's agent metadata
    await a.write("rcv", "r1/kv/l0/p0", src[:SIZE], 5.0)
    await b.wait("r1/kv/l0/p0", 5.0)
    dst.zero_()
    for layer in range(n):
        b.expose(_tag(layer), region, layer * SIZE, SIZE, sender="snd")
    await _until(lambda: len(peer.grants) == n, "pushed grants")
    a._agent = _PostedAgent(a._agent)
    return dst, src


async def test_writes_to_a_peer_with_writes_in_flight_share_one_write_and_each_lands_once(pair: tuple) -> None:  # type: ignore[type-arg]
    """Fast-path writes issued while another is in flight to the same peer are posted together at the end of
    the loop pass, as one NIXL WRITE whose notification names every landing: each lands once, in place."""
    a, b = pair
    n = 12
    dst, src = await _granted_all(a, b, n, 21)
    async with anyio.create_task_group() as tg:  # all in one loop pass: the first posts, the rest join
        for layer in range(n):
            tg.start_soon(a.write, "rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
    for layer in range(n):
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src)
    assert a.shared_writes == n - 1 and a.handshakes == 1  # the first write's, before the exposes
    assert b.stats.arrivals == n + 1 and a.stats.writes == n + 1 and not a._peers["rcv"].active


async def test_a_landing_revoked_while_its_write_waits_to_be_posted_gets_nothing(pair: tuple) -> None:  # type: ignore[type-arg]
    """A revocation that reaches the sender between a write joining the batch and the batch's post refuses that
    write (nothing of it lands); the batch's other writes land."""
    a, b = pair
    n, victim = 6, 3
    dst, src = await _granted_all(a, b, n, 22)
    peer = a._peers["rcv"]
    errors: dict[int, BaseException] = {}

    async def write(layer: int) -> None:
        try:
            await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
        except TransportError as exc:
            errors[layer] = exc

    async def revoke() -> None:  # runs after the writers in the same loop pass: the batch is queued, not posted
        assert peer.batch is not None
        epoch = next(r.epoch for tag, _, r, _, _ in peer.batch.items if tag == _tag(victim))
        peer._on_push(Header(Kind.GRANT, 0, _tag(victim), status=Status.CLOSED, arg=epoch), set())

    async with anyio.create_task_group() as tg:
        for layer in range(n):
            tg.start_soon(write, layer)
        tg.start_soon(revoke)
    assert list(errors) == [victim] and "withdrew" in str(errors[victim])
    for layer in range(n):
        if layer != victim:
            await b.wait(_tag(layer), 5.0)
    await anyio.sleep(0.05)
    assert not dst[victim * SIZE:(victim + 1) * SIZE].any()
    keep = torch.ones(n * SIZE, dtype=torch.bool)
    keep[victim * SIZE:(victim + 1) * SIZE] = False
    assert torch.equal(dst[keep], src[keep])


async def test_a_shared_write_that_never_completes_ends_every_writer_at_the_deadline(pair: tuple) -> None:  # type: ignore[type-arg]
    a, b = pair
    src = await _granted_stuck_sender(a, b, 4)
    errors: list[BaseException] = []

    async def write(layer: int) -> None:
        try:
            await a.write("rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 0.3)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for layer in (1, 2, 3):
                tg.start_soon(write, layer)
    assert a.shared_writes == 2
    assert len(errors) == 3 and all(isinstance(e, PeerTimeout) for e in errors), errors
    assert not a._inflight and not a._peers["rcv"].active


async def test_a_batch_that_fills_up_is_posted_at_once(pair: tuple, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    """A batch is posted as soon as the next write would take it past ``_BATCH_BYTES``, so several WRITEs stay
    in flight (and a batch's first writer does not wait for an unbounded one); every landing still lands once."""
    from dualpath.transports import nixl

    a, b = pair
    n = 12
    monkeypatch.setattr(nixl, "_BATCH_BYTES", 2 * SIZE)
    dst, src = await _granted_all(a, b, n, 23)
    posts: list[int] = []
    init = a._agent.initialize_xfer

    def counted(op: str, local: Any, remote: Any, *args: Any) -> Any:
        posts.append(local.descCount())
        return init(op, local, remote, *args)

    a._agent.initialize_xfer = counted
    async with anyio.create_task_group() as tg:
        for layer in range(n):
            tg.start_soon(a.write, "rcv", _tag(layer), src[layer * SIZE:(layer + 1) * SIZE], 5.0)
    for layer in range(n):
        await b.wait(_tag(layer), 5.0)
    assert torch.equal(dst, src)
    # the first write posts alone (nothing in flight yet); the other 11 go two per WRITE, the last one alone
    assert posts == [2, 2, 2, 2, 2] and a.shared_writes == 10
