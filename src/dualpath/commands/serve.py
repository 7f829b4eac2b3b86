"""``dualpath serve``: the scheduler and the engines as processes.

* ``dualpath serve [--config FILE]`` starts everything on this machine (one scheduler process + one process per
  engine), prints the scheduler's address and supervises until Ctrl-C / SIGTERM. With no config file: the
  synthetic model, posix storage under /tmp/dualpath-serve-kv and the zmq transport on loopback.
* ``--role scheduler`` / ``--role prefill --rank N`` / ``--role decode --rank N`` runs one piece, for any
  launcher (ssh, Slurm, Kubernetes) on a multi-host cluster; engines find the scheduler at ``--scheduler ADDR``
  (default ``serve.address`` or ``tcp://serve.host:serve.port``). See docs/deployment.md.
* ``--http [HOST:PORT]`` puts the OpenAI-compatible API in front (see commands/serve_http.py, docs/http.md).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/TOML/JSON config file (default: a one-machine demo deployment)")
    parser.add_argument("--role", choices=["all", "scheduler", "prefill", "decode"], default="all",
                        help="all (default): every process on this machine; else one piece of the deployment")
    parser.add_argument("--rank", type=int, help="engine rank within its role (with --role prefill|decode)")
    parser.add_argument("--scheduler", help="scheduler address for an engine (default from serve.address/host/port)")
    parser.add_argument("--bind", help="scheduler bind address (default tcp://serve.host:serve.port)")
    parser.add_argument("--address-file", help="the scheduler writes its bound address here once listening")
    parser.add_argument("--workdir", help="--role all: where the resolved config and process logs go")
    from dualpath.commands import serve_http

    serve_http.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    import anyio

    from dualpath.config import load_config
    from dualpath.control.deploy import check_deployable, serve_defaults
    from dualpath.errors import ConfigError
    from dualpath.types import Role

    if getattr(args, "http", None) is not None:  # --http: the OpenAI-compatible API (commands/serve_http.py)
        from dualpath.commands.serve_http import run as run_http

        return run_http(args)
    from dualpath.commands.serve_http import check_http_only

    check_http_only(args)
    logging.basicConfig(level=os.environ.get("DUALPATH_LOG", "WARNING"))
    # a config file merges over serve's own defaults (posix storage, zmq), as `chat --config` does
    config = load_config([serve_defaults(), args.config] if args.config else serve_defaults())
    config = check_deployable(config)
    if args.role == "all":
        from dualpath.control.launcher import run_foreground

        if args.rank is not None or args.scheduler is not None:
            raise ConfigError("--rank and --scheduler are for one engine (--role prefill|decode), not the whole "
                              "deployment (--role all)")
        return run_foreground(config, bind=args.bind, workdir=args.workdir, address_file=args.address_file)
    if args.role == "scheduler":
        from dualpath.control.schedulerd import serve_scheduler

        anyio.run(lambda: serve_scheduler(config, bind=args.bind, address_file=args.address_file))
        return 0
    if args.rank is None:
        raise ConfigError(f"--role {args.role} needs --rank N")
    from dualpath.control.enginehost import serve_engine

    anyio.run(serve_engine, config, Role(args.role), args.rank, args.scheduler)
    return 0
