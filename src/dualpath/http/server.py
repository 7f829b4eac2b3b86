"""Run the HTTP app on uvicorn: bind first (so port 0 resolves to a real port we can report), then serve until
SIGINT/SIGTERM. ``address_file`` receives ``http://HOST:PORT`` once the app is ready (tests and scripts wait on
it)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio

from dualpath.errors import ConfigError, DualPathError
from dualpath.http.backend import Backend
from dualpath.http.config import HttpConfig

log = logging.getLogger("dualpath.http")


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port); a clear error otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        p = int(port)
    except ValueError:
        raise ConfigError(f"--http: expected HOST:PORT, got {text!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"--http: port {p} is outside 0..65535")
    return host, p


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--http: cannot bind {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


#: seconds uvicorn waits for requests in flight once it stops, and of them the seconds they get to finish on
#: their own before the server ends them with a 503 (the rest lets those answers out)
GRACE_S, FINISH_S = 5, 3.0


def _uvicorn_server() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopping on SIGINT/SIGTERM without re-raising the signal once it has stopped (the
        caller cleans up and exits normally)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server


async def serve_app(backend: Backend, config: HttpConfig, *, address_file: str | None = None,
                    log_level: str = "warning", on_ready: Any = None, stop: anyio.Event | None = None) -> None:
    """Serve until stopped (a signal, or ``stop`` set); the backend is started and closed by the app's lifespan.
    ``on_ready(url)`` is called once the app serves."""
    import uvicorn

    from dualpath.http.app import create_app

    _Uvicorn = _uvicorn_server()

    app = create_app(backend, config)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    uv = _Uvicorn(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=GRACE_S,
                                 access_log=False))

    async def _wind_down() -> None:
        # once the server stops (a signal, or ``stop``), requests in flight get FINISH_S to finish; those still
        # running then end with a 503 (a stream: its error event and [DONE]) while uvicorn's grace period lets
        # their answers out, instead of being cancelled at its end (a plain-text 500, a stream cut off)
        while not uv.should_exit:
            await anyio.sleep(0.05)
        await anyio.sleep(FINISH_S)
        n = backend.stop_jobs("the server is shutting down")
        if n:
            log.warning("shutting down: %d request(s) still running ended with 503 server_shutting_down", n)

    async def _announce() -> None:
        while not uv.started:
            if uv.should_exit:
                return
            await anyio.sleep(0.05)
        if address_file:
            tmp = f"{address_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(url)
            os.replace(tmp, address_file)
        print(f"dualpath: OpenAI-compatible API at {url}/v1 (model {config.model_name or backend.model_name})",
              flush=True)
        if on_ready is not None:
            on_ready(url)
        if stop is not None:
            await stop.wait()
            uv.should_exit = True

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_announce)
            tg.start_soon(_wind_down)
            try:
                await uv.serve(sockets=[sock])
            except SystemExit:  # uvicorn exits when the app's startup failed: raise the reason below
                if app.state.server.startup_error is None:
                    raise
            tg.cancel_scope.cancel()
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    err = app.state.server.startup_error
    if err is not None:  # the backend did not start (a bad model path, an engine that cannot build, ...)
        if isinstance(err, DualPathError):
            raise err
        raise DualPathError(f"the HTTP server could not start: {type(err).__name__}: {err}") from err
