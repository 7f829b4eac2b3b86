"""A cap on request body size (``http.max_body_bytes``): a larger body gets 413 before it is read into memory.

An ASGI middleware: a declared ``Content-Length`` over the cap is refused at once, without reading the body; a
body sent without a length (chunked) is counted as it arrives and refused at the first chunk that crosses the
cap. The answer is an OpenAI-style error object naming the limit and the config key.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from dualpath.http.schemas import error_body

Scope = dict[str, Any]


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Wraps an ASGI app; HTTP requests whose body exceeds ``max_bytes`` get 413."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        over = started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen, over
            msg: dict[str, Any] = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge  # (the app may turn it into its own error answer: replaced below)
            return msg

        async def tracked_send(msg: dict[str, Any]) -> None:
            nonlocal started
            if over:  # whatever the app answers to a body cut short, the client gets the 413
                if msg["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send)
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted_receive, tracked_send)
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body(f"request body larger than {self.max_bytes} bytes (http.max_body_bytes)",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
