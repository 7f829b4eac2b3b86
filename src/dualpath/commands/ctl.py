"""``dualpath ctl``: operator commands against a running deployment's scheduler (see docs/deployment.md).

    dualpath ctl stats  [--connect ADDR] [--config FILE]                  # the scheduler's counters (JSON)
    dualpath ctl drain  [--connect ADDR] [--token-file F | --config FILE] # refuse new turns, finish the others
    dualpath ctl stop   [--connect ADDR] [--token-file F | --config FILE] # shut the deployment down
    dualpath ctl cancel --session N [...]                                 # end every turn of session N now

The address defaults to the config's ``serve.address`` (or ``tcp://serve.host:serve.port``). ``drain``, ``stop``
and ``cancel`` need the operator role: without CURVE the ``operator`` token of the deployment's token file
(``--token-file``, default ``serve.token_file``; ``dualpath serve`` prints where it wrote it), with CURVE the
``serve.curve_operator_*`` key pair of ``--config``. A refusal, a wrong token or no scheduler at the address ends
with one line and exit code 2, within ``--timeout``.
"""

from __future__ import annotations

import argparse

ACTIONS = ("stats", "drain", "stop", "cancel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("--connect", metavar="ADDR", help="the scheduler's address (default from the config)")
    parser.add_argument("--config", help="config file: serve.address, serve.token_file and the CURVE keys")
    parser.add_argument("--token-file", help="the deployment's token file (<workdir>/control.token) without CURVE")
    parser.add_argument("--session", type=int, help="cancel: the session whose turns end now")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the scheduler (default 5)")


def run(args: argparse.Namespace) -> int:
    import json
    import math

    import anyio

    from dualpath.config import load_config
    from dualpath.control.client import ServeClient
    from dualpath.control.deploy import client_curve, load_tokens, operator_curve
    from dualpath.errors import ConfigError

    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout: must be a positive number of seconds, not {args.timeout}")
    if args.action == "cancel" and (args.session is None or args.session < 0):
        raise ConfigError("--session: `dualpath ctl cancel` needs the session number (--session N, N >= 0)")
    config = load_config(args.config)
    sc = config.serve
    address = args.connect or sc.scheduler_address()
    if args.connect is None and args.config and sc.address is None and sc.port == 0:
        # a deployment's own <workdir>/config.json with port 0: the port bound is in scheduler.addr beside it
        from pathlib import Path

        bound = Path(args.config).with_name("scheduler.addr")
        if not bound.is_file():
            raise ConfigError(f"--config {args.config}: serve.port is 0 (any free port) and no scheduler.addr beside "
                              "it says which was bound; pass --connect ADDRESS")
        address = bound.read_text().strip()
    operator = args.action != "stats"
    token: str | None = None
    if sc.curve:
        keys = operator_curve(config) if operator or sc.curve_operator_secret_key else client_curve(config)
    else:
        keys = None
        token_file = args.token_file or sc.token_file
        if token_file is not None:
            token = load_tokens(token_file)["operator"]
        elif operator:
            raise ConfigError(f"--token-file: `dualpath ctl {args.action}` needs the operator token: pass the "
                              "deployment's token file (<workdir>/control.token, printed by `dualpath serve`)")

    async def main() -> None:
        async with ServeClient(address, curve=keys, heartbeat_s=None, handshake_timeout=args.timeout) as c:
            if args.action == "stats":
                print(json.dumps(await c.stats(timeout=args.timeout), indent=1, sort_keys=True))
            elif args.action == "drain":
                await c.drain(timeout=args.timeout, token=token)
                print(f"dualpath ctl: {address} is draining (new turns are refused, those in flight finish)")
            elif args.action == "stop":
                await c.shutdown(timeout=args.timeout, token=token)
                print(f"dualpath ctl: {address} is shutting down")
            else:
                n = await c.cancel(args.session, timeout=args.timeout, token=token)
                print(f"dualpath ctl: cancelled {n} turn(s) of session {args.session}")

    anyio.run(main)
    return 0
