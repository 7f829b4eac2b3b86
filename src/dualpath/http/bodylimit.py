"""A cap on request body size (``http.max_body_bytes``): a larger body gets 413 before it is read into memory;
and a deadline on receiving it (``http.body_timeout_s``): a body not received whole in time gets 408.

An ASGI middleware: a declared ``Content-Length`` over the cap is refused at once, without reading the body; a
body sent without a length (chunked) is counted as it arrives and refused at the first chunk that crosses the
cap. While the body is incomplete every receive is bounded by what is left of the deadline (counted from the
request's start); once it is whole, receives are the app's own (a stream waits on them for the client's
disconnect). The answer is an OpenAI-style error object naming the limit and the config key, with
``Connection: close``.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import anyio

from dualpath.http.schemas import error_body

Scope = dict[str, Any]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Wraps an ASGI app; HTTP requests whose body exceeds ``max_bytes`` get 413, and those whose body is not
    received whole within ``timeout_s`` of the request's start get 408."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        seen = 0
        over = started = whole = False
        refusal = self._refuse
        deadline = anyio.current_time() + self.timeout_s

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen, over, whole, refusal
            if whole:
                return dict(await receive())
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                msg: dict[str, Any] = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > self.max_bytes:
                        over = True
                        raise _TooLarge  # (the app may turn it into its own error answer: replaced below)
                    whole = not msg.get("more_body", False)
                else:
                    whole = True  # (http.disconnect)
                return msg
            over, refusal = True, self._too_slow
            raise _TooLarge

        async def tracked_send(msg: dict[str, Any]) -> None:
            nonlocal started
            if over:  # whatever the app answers to a body cut short, the client gets the 413 (408)
                if msg["type"] == "http.response.start" and not started:
                    started = True
                    await refusal(send)
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted_receive, tracked_send)
        if over and not started:
            await refusal(send)

    async def _refuse(self, send: Any) -> None:
        await _answer(send, 413, f"request body larger than {self.max_bytes} bytes (http.max_body_bytes)",
                      "request_too_large")

    async def _too_slow(self, send: Any) -> None:
        await _answer(send, 408, f"request body not received within {self.timeout_s:g} s (http.body_timeout_s)",
                      "request_timeout")


async def _answer(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
