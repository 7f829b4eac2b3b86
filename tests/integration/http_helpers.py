"""Starting the HTTP API in a test's own event loop."""

from __future__ import annotations

from typing import Any

import anyio

from dualpath.http.config import HttpConfig
from dualpath.http.server import serve_app


async def start_http(tg: Any, backend: Any, http: HttpConfig | None = None,
                     timeout: float = 60.0) -> tuple[str, anyio.Event]:
    """A real uvicorn server over ``backend`` on a free port of 127.0.0.1, run in task group ``tg``: returns its
    base URL and the event that shuts it down gracefully (lifespan: the backend is closed)."""
    ready, stop = anyio.Event(), anyio.Event()
    box: dict[str, str] = {}

    def on_ready(url: str) -> None:
        box["url"] = url
        ready.set()

    tg.start_soon(lambda: serve_app(backend, http or HttpConfig(port=0), on_ready=on_ready, stop=stop))
    with anyio.fail_after(timeout):
        await ready.wait()
    return box["url"], stop
