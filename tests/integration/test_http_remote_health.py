"""The process-mode HTTP server (``RemoteBackend``) with no scheduler at its address, on a real uvicorn server:
``/health`` answers 503 ``unavailable`` at once (never waits for a request's timeout), a request gets the
OpenAI error object ``scheduler_unavailable`` with ``Retry-After`` within ``serve.handshake_timeout_s``, and one
whose own deadline (``http.request_timeout_s``) passes first gets 503 ``timeout``."""

from __future__ import annotations

import socket
import time

import anyio
import httpx
import pytest
from http_helpers import start_http

from dualpath.config import load_config
from dualpath.http.backend import RemoteBackend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
async def test_no_scheduler_gives_503_health_and_requests_fast() -> None:
    cfg = load_config(None, env={}, overrides={
        "model": {"kind": "synthetic", "vocab_size": 1000, "max_context": 4096},
        "serve": {"handshake_timeout_s": 1.0, "heartbeat_s": 0.1}})
    backend = RemoteBackend(cfg, f"tcp://127.0.0.1:{_free_port()}")
    async with anyio.create_task_group() as tg:
        url, stop = await start_http(tg, backend, timeout=30)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as cl:
                for _ in range(3):  # the first waits for the stats (at most ~1 s); the next ones not at all
                    t0 = time.monotonic()
                    h = await cl.get("/health")
                    assert h.status_code == 503 and h.json()["status"] == "unavailable", h.text
                    assert h.json()["reason"] and time.monotonic() - t0 < 3.0
                t0 = time.monotonic()
                r = await cl.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["code"] == "scheduler_unavailable", r.text
                assert time.monotonic() - t0 < 5.0
                # the request's own deadline (http.request_timeout_s) before any handshake: 503 timeout, not a
                # client-gone 499
                backend.timeout_s = 0.3
                r = await cl.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
                assert r.status_code == 503 and r.json()["error"]["code"] == "timeout", r.text
                assert "http.request_timeout_s" in r.json()["error"]["message"]
        finally:
            stop.set()
