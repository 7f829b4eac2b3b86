"""``http.max_body_bytes``: a request body over the cap is refused with 413 before it is read into memory, whether
it declares its length or streams it in chunks; a body within the cap is served as usual."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from dualpath.config import load_config
from dualpath.http.app import create_app
from dualpath.http.backend import InProcessBackend
from dualpath.http.config import HttpConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(cap: int) -> httpx.AsyncClient:
    cfg = load_config(None, env={}, overrides={"model": {"kind": "synthetic", "n_layers": 1, "n_kv_heads": 1,
                                                         "head_dim": 8, "vocab_size": 64},
                                               "storage": {"kind": "memory"}, "transport": {"kind": "loopback"}})
    app = create_app(InProcessBackend(cfg), HttpConfig(max_body_bytes=cap))  # (not started: no lifespan)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_a_declared_length_over_the_cap_is_refused_unread() -> None:
    body = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    async with _client(4096) as c:
        r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and "http.max_body_bytes" in err["message"]


async def test_a_chunked_body_is_counted_as_it_arrives() -> None:
    sent = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):  # 100 KiB in 1 KiB chunks, no Content-Length
            sent.append(1)
            yield b" " * 1024

    async with _client(4096) as c:
        r = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_a_body_within_the_cap_reaches_validation() -> None:
    async with _client(4096) as c:
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "bogus": 1})
    assert r.status_code == 400 and "unknown field 'bogus'" in r.json()["error"]["message"]


async def test_a_body_not_received_in_time_is_a_408_and_a_whole_body_is_not_timed() -> None:
    """``http.body_timeout_s``: a client that sends part of its body and then nothing gets 408 (``Connection:
    close``) once the deadline passes (uvicorn has no such deadline: the connection, and its descriptor, were held
    forever). Once the body is whole, the app's receives (a stream waiting for the client's disconnect) are not
    bounded."""
    import anyio

    from dualpath.http.bodylimit import BodyLimit

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        after = await receive()  # (what a streaming response does: wait for the disconnect)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body + after["type"].encode()})

    def scripted(*steps):  # type: ignore[no-untyped-def]
        it = iter(steps)

        async def receive():  # type: ignore[no-untyped-def]
            delay, msg = next(it)
            await anyio.sleep(delay)
            return msg
        return receive

    for stalled in (True, False):
        sent: list[dict] = []

        async def send(msg, sent=sent):  # type: ignore[no-untyped-def]
            sent.append(msg)

        tail = (3600.0, {"type": "http.request", "body": b"b"}) if stalled else (0.0, {"type": "http.request",
                                                                                     "body": b"b"})
        receive = scripted((0.0, {"type": "http.request", "body": b"a", "more_body": True}), tail,
                           (0.5, {"type": "http.disconnect"}))
        t0 = anyio.current_time()
        with anyio.fail_after(10):
            await BodyLimit(app, max_bytes=1 << 20, timeout_s=0.2)({"type": "http", "headers": []}, receive, send)
        if stalled:
            assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
            err = json.loads(sent[1]["body"])["error"]
            assert err["code"] == "request_timeout" and "http.body_timeout_s" in err["message"]
            assert anyio.current_time() - t0 < 5
        else:  # the body came whole in time; the half-second wait after it is the app's own
            assert sent[0]["status"] == 200 and sent[1]["body"] == b"abhttp.disconnect"


async def test_too_many_prompts_are_refused_before_any_is_tokenized() -> None:
    """A batch of prompts x ``n`` over the 128 generations a request may ask for is a 400 naming ``n`` before a
    prompt is tokenized, before the request is even admitted (a batch of 20k prompts was tokenized first: seconds
    of work for a refusal). This app is not started: a request admitted would be a 503 ``not_ready``."""
    async with _client(1 << 20) as c:
        r = await c.post("/v1/completions", json={"prompt": ["some text"] * 200, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        r = await c.post("/v1/completions", json={"prompt": ["some text"] * 2, "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
