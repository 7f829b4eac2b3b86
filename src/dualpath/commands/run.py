"""``dualpath run``: the main job.

Until the emulated-cluster runtime lands, this runs the storage benchmark so that the README's first command
works from day one.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/TOML config file")
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")


def run(args: argparse.Namespace) -> int:
    from dualpath.commands import bench_storage

    ns = argparse.Namespace(json_out=args.json_out, quick=True)
    return bench_storage.run(ns)
