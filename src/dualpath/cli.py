"""The ``dualpath`` command line.

Each command lives in its own module under :mod:`dualpath.commands`, imported only when that command runs (so
``dualpath analyze`` never imports torch kernels or NIXL). A command module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from dualpath.commands import check_output_file
from dualpath.errors import DualPathError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("dualpath.commands.run", "serve an agentic workload on an emulated cluster and compare policies"),
    "simulate": ("dualpath.commands.simulate", "discrete-event simulation of a cluster of any size"),
    "analyze": ("dualpath.commands.analyze", "bottleneck-free P/D range and per-link loads (paper eq. 9)"),
    "chat": ("dualpath.commands.chat", "a multi-turn session with a real model through the cluster"),
    "generate": ("dualpath.commands.generate", "greedy generation with this project's model and kernels"),
    "serve": ("dualpath.commands.serve", "run engines and the scheduler as processes"),
    "ctl": ("dualpath.commands.ctl", "operator commands for a running deployment: stats, drain, stop, cancel"),
    "reproduce": ("dualpath.commands.reproduce", "regenerate the paper's evaluation (Figs. 7-14, Table 3) by simulation"),
    "trace": ("dualpath.commands.trace", "request traces: shape and reuse statistics (trace stats FILE)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "storage": ("dualpath.commands.bench_storage", "storage backend reads/writes vs raw os.preadv"),
    "transport": ("dualpath.commands.bench_transport", "transports vs raw pyzmq / NIXL / copy_, and link accuracy"),
    "kernels": ("dualpath.commands.bench_kernels", "paged attention kernels vs torch SDPA (GPU)"),
    "http": ("dualpath.commands.bench_http", "replay a trace as chats against any OpenAI-compatible server"),
    "serve": ("dualpath.commands.bench_serve", "the same trace in one process and as a deployment (ratio)"),
}


def _load(module: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualpath", description="DualPath KV-cache loading for agentic inference")
    parser.add_argument("--version", action="version", version=f"dualpath {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _parser=p)
        _add_args(p, module)
    bench = sub.add_parser("bench", help="benchmarks against raw baselines", description="benchmarks")
    bench.set_defaults(_parser=bench)
    bsub = bench.add_subparsers(dest="bench", metavar="WHAT")
    for name, (module, help_text) in BENCHES.items():
        p = bsub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _parser=p)
        _add_args(p, module)
    return parser


def _add_args(parser: argparse.ArgumentParser, module: str) -> None:
    # Argument definitions are small; importing the module here is cheap because command modules import
    # their heavy dependencies inside run().
    try:
        mod = _load(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("dualpath"):
            parser.set_defaults(_unavailable=str(exc))
            return
        raise
    mod.add_arguments(parser)


def _version() -> str:
    from dualpath import __version__

    return __version__


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
    field = ".".join(str(p) for p in err.get("loc", ()))
    return f"{exc.title}{'.' + field if field else ''}: {err.get('msg', 'invalid value')}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # (also while the commands' modules are still importing)
        print("dualpath: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dualpath trace stats F | head`): no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter's flush at exit)
        return 141


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, with its usage (not the top-level one)
        owner: argparse.ArgumentParser = getattr(args, "_parser", parser)
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"dualpath: this command is not built yet ({args._unavailable})", file=sys.stderr)
        return 2
    try:
        for attr, flag in (("json_out", "--json"), ("plot", "--plot")):  # refused now, not after the work
            if isinstance(getattr(args, attr, None), str):
                check_output_file(flag, getattr(args, attr))
        return int(_load(module).run(args) or 0)
    except DualPathError as exc:
        print(f"dualpath: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a value set from a flag (--rate nan): one line naming the field, not a traceback
        print(f"dualpath: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def console() -> int:
    """The ``dualpath`` command (``[project.scripts]``): :func:`main`, then the process's exit without the final
    garbage collection (:mod:`dualpath.procexit`)."""
    try:
        return main()
    finally:  # (also after argparse's SystemExit: --help, --version, a bad flag)
        from dualpath.procexit import skip_final_collection

        skip_final_collection()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console())
