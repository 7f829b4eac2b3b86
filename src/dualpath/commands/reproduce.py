"""``dualpath reproduce [--quick] [--out DIR] [--jobs N]``: the paper's evaluation (Figs. 7-14, Table 3) through
the simulator, with one sourced preset set; writes ``report.md`` (paper vs measured, within tolerance or why not),
``results.json`` and PNG plots shaped like the paper's figures into ``--out``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller agent counts and horizons (<= 10 min on 2 cores)")
    g.add_argument("--size", choices=["full", "quick", "tiny"], help="full (default), quick, or tiny (tests)")
    parser.add_argument("--out", default="reproduce-out", help="output directory (default reproduce-out)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: min(2, CPUs))")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild report.md and the plots from --out's results.json, simulating nothing")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from dualpath.errors import ConfigError
    from dualpath.repro import render, reproduce

    size = "quick" if args.quick else (args.size or "full")
    jobs = args.jobs if args.jobs is not None else max(1, min(2, os.cpu_count() or 1))
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if not args.render_only:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out: cannot create {args.out}: {exc.strerror or exc}") from None

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cmd = "dualpath reproduce" + (" --quick" if size == "quick" else f" --size {size}" if size != "full" else "")
    if args.render_only:
        out = render(args.out, plots=not args.no_plots)
    else:
        out = reproduce(size, args.out, jobs, plots=not args.no_plots, command=cmd, progress=progress)
    rows = [r for r in out["rows"] if r.kind == "measured"]  # the what-if section is never counted
    judged = [r for r in rows if r.within is not None]
    print(f"{sum(1 for r in judged if r.within)}/{len(judged)} rows within tolerance "
          f"({out['meta']['wall_s']:.0f} s); report: {os.path.join(args.out, 'report.md')}")
    for r in rows:
        if r.within is False:
            print(f"  miss: {r.figure} {r.setting} {r.metric}: paper {r.paper} measured {r.measured:.4g}")
    return 0
