"""``dualpath serve --http [HOST:PORT]``: the OpenAI-compatible API (docs/http.md).

* default (``http.mode: process``): start the deployment on this machine (one scheduler process and one process
  per engine, as plain ``dualpath serve``) and put the API in front of it; with ``--scheduler ADDR`` front an
  already running deployment instead of starting one.
* ``--inprocess`` (``http.mode: inprocess``): the emulated cluster runs inside the HTTP server's process.

With no config file the model is the embedded SmolLM2-135M-Instruct (real compute on the CPU); ``--model``
takes any supported checkpoint (safetensors directory or .gguf). ``--api-key`` (or ``http.api_key`` /
``DUALPATH_HTTP__API_KEY``) requires ``Authorization: Bearer <key>`` on ``/v1/*``; repeated, any of the keys
(``http.isolate_keys: true`` then gives each key its own share of the prefix cache).
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``dualpath serve`` adds for ``--http`` (called from commands/serve.py)."""
    g = parser.add_argument_group("OpenAI-compatible HTTP API")
    g.add_argument("--http", nargs="?", const="", metavar="HOST:PORT",
                   help="serve the OpenAI-compatible API here (default http.host:http.port, 127.0.0.1:8000)")
    g.add_argument("--inprocess", action="store_true",
                   help="with --http: run the emulated cluster inside the server process (http.mode: inprocess)")
    g.add_argument("--model", help="with --http: safetensors directory or .gguf (default: embedded SmolLM2-135M)")
    g.add_argument("--api-key", action="append",
                   help="with --http: require 'Authorization: Bearer KEY' on /v1/* (repeat it to accept several)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="with --http: the model id /v1/models reports and requests must name (http.model_name; "
                        "default from the model)")
    g.add_argument("--http-address-file", help="with --http: write http://HOST:PORT here once serving")


def check_http_only(args: argparse.Namespace) -> None:
    """The --http options make no sense without --http: say so instead of ignoring them."""
    from dualpath.errors import ConfigError

    for flag, value in (("--inprocess", args.inprocess), ("--model", args.model), ("--api-key", args.api_key),
                        ("--http-address-file", args.http_address_file),
                        ("--served-model-name", getattr(args, "served_model_name", None))):
        if value:
            raise ConfigError(f"{flag} applies to the HTTP API: add --http [HOST:PORT]")


def http_config_overrides(mode: str) -> dict[str, Any]:
    """Defaults of `serve --http` with no config file: the embedded real model, 16-token blocks."""
    from dualpath.http.backend import inprocess_overrides

    over = inprocess_overrides()
    if mode == "process":
        from dualpath.control.deploy import serve_defaults

        base = serve_defaults()
        over["storage"] = base["storage"]
        over["transport"] = base["transport"]
        over["cluster"] = {**over["cluster"], **base["cluster"], "snic_gbps": None}
    return over


def _loop_options() -> dict[str, Any]:
    """uvloop when installed (the HTTP server's per-request overhead is mostly event-loop and parsing work)."""
    import importlib.util

    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    import anyio

    from dualpath.config import load_config

    logging.basicConfig(level=os.environ.get("DUALPATH_LOG", "WARNING"))
    mode = "inprocess" if args.inprocess else None
    probe = load_config(args.config) if args.config else None
    if mode is None:
        mode = probe.http.mode if probe is not None else "process"
    # a config file merges over serve --http's own defaults (embedded model; posix + zmq in process mode)
    config = load_config([http_config_overrides(mode), args.config] if args.config else http_config_overrides(mode))
    updates: dict[str, Any] = {"mode": mode}
    if args.http:
        from dualpath.http.server import parse_hostport

        updates["host"], updates["port"] = parse_hostport(args.http, config.http.host)
    if args.api_key:
        updates["api_key"] = args.api_key[0] if len(args.api_key) == 1 else list(args.api_key)
    if getattr(args, "served_model_name", None):
        updates["model_name"] = args.served_model_name
    config.http = config.http.model_copy(update=updates)
    if args.model:
        from dualpath.model.config import LlamaModelConfig

        config.model = LlamaModelConfig(path=args.model)
    from dualpath.http.server import serve_app

    if mode == "inprocess":
        from dualpath.http.backend import InProcessBackend

        anyio.run(lambda: serve_app(InProcessBackend(config), config.http, address_file=args.http_address_file),
                  backend_options=_loop_options())
        return 0
    from dualpath.control.deploy import check_deployable
    from dualpath.http.backend import RemoteBackend

    config = check_deployable(config)
    if args.scheduler:  # a deployment started elsewhere: follow its operator's stop, ride out its failovers
        backend = RemoteBackend(config, args.scheduler)
        stop = anyio.Event()

        async def front() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_remote, backend, stop)
                await serve_app(backend, config.http, address_file=args.http_address_file, stop=stop)
                tg.cancel_scope.cancel()

        anyio.run(front, backend_options=_loop_options())
        if stop.is_set():
            print(f"dualpath serve: the deployment at {args.scheduler} was stopped by its operator (ctl stop); "
                  "the HTTP API stopped too", flush=True)
        return 0
    from dualpath.control.launcher import Deployment

    dep = Deployment(config, bind=args.bind, workdir=args.workdir)
    # the launcher's "stopping the deployment" record is replaced by this command's own final line
    logging.getLogger("dualpath.launcher").addFilter(
        lambda rec: "stopping the deployment" not in rec.getMessage())
    old = signal.getsignal(signal.SIGTERM)
    ended: list[str] = []
    try:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C (and cleans up)
        address = dep.start()
        print(f"dualpath serve: scheduler at {address}, {len(dep.children) - 1} engine processes; "
              f"logs in {dep.workdir / 'logs'}", flush=True)
        tf = dep.config.serve.token_file
        if tf is not None:
            print(f"dualpath serve: operator token (0600) in {tf}   (dualpath ctl stats|drain|cancel|stop "
                  f"--connect {address} --token-file {tf})", flush=True)

        async def main() -> None:
            from dualpath.engine.request import unwrap

            stop = anyio.Event()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_watch_deployment, dep, stop, ended)
                    await serve_app(RemoteBackend(config, address), config.http,
                                    address_file=args.http_address_file, stop=stop)
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as eg:  # serve_app's own error (a clear DualPathError), not the group
                raise unwrap(eg) from None

        anyio.run(main, backend_options=_loop_options())
    except KeyboardInterrupt:
        pass
    finally:
        dep.stop()
        signal.signal(signal.SIGTERM, old)
    if ended and ended[0] == "shutdown":
        print("dualpath serve: the deployment was stopped by the operator (ctl stop); the HTTP API stopped too",
              flush=True)
        return 0
    if ended:
        print(f"dualpath serve: error: {ended[0]}; the HTTP API stopped (logs in {dep.workdir / 'logs'})",
              file=sys.stderr, flush=True)
        return 1
    return 0


async def _watch_deployment(dep: Any, stop: Any, ended: list[str], period_s: float = 0.2) -> None:
    """Stop the HTTP server when its deployment is over: the operator stopped it (``ctl stop``: the launcher
    saw the scheduler exit cleanly), or it died for good (the launcher gave up on the scheduler, or every engine
    exited with no restart left). Appends the reason to ``ended`` ("shutdown" or a one-line description)."""
    import time

    import anyio

    engines_gone_since: float | None = None
    while True:
        if dep.shut_down:
            ended.append("shutdown")
            break
        if dep.scheduler_failed:
            sched = dep.children.get("scheduler")
            codes = sched.exits if sched is not None else []
            ended.append(f"the scheduler exited (exit codes {codes}) and was not restarted "
                         f"(serve.scheduler_restart, serve.max_restarts); the deployment is down")
            break
        engines = [c for name, c in dep.children.items() if name != "scheduler"]
        gone = bool(engines) and all(c.expected_exit and not c.alive() for c in engines)
        engines_gone_since = (engines_gone_since or time.monotonic()) if gone else None
        # (held 2 s: on an operator's stop the engines may exit just before the launcher sees the scheduler's exit)
        if engines_gone_since is not None and time.monotonic() - engines_gone_since > 2.0:
            ended.append("every engine process exited and none will be restarted (serve.restart_engines, "
                         "serve.max_restarts); the deployment is down")
            break
        await anyio.sleep(period_s)
    stop.set()


async def _watch_remote(backend: Any, stop: Any, period_s: float = 0.2, keepalive_s: float = 2.0) -> None:
    """Set ``stop`` once the remote scheduler says its operator stopped the deployment (a crash or a failover
    says nothing: the front answers 503 meanwhile and serves again when a scheduler is back). Every
    ``keepalive_s`` the front asks for the scheduler's stats, so that scheduler (or the one that replaced it)
    knows this front as a client to tell of a stop even while no request comes."""
    import time

    import anyio

    t_keep = 0.0
    while True:
        await anyio.sleep(period_s)
        client = backend.client
        if client is not None and client.stopped:
            stop.set()
            return
        if client is not None and time.monotonic() - t_keep >= keepalive_s:
            t_keep = time.monotonic()
            await backend.stats(wait_s=0.0)  # (starts a refresh in a task of its own; never raises)
