"""The common end of the model-based fuzzers (``storage_model_fuzz.py``, ``transport_model_fuzz.py``,
``cluster_model_fuzz.py``): a line per run with its first findings, a summary, the JSON file, the exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any


def show(line: str, row: dict[str, Any]) -> None:
    """Print one run's line and its first five findings."""
    print(f"{line}: {len(row['problems'])} findings ({row['seconds']} s)", flush=True)
    for p in row["problems"][:5]:
        print(f"    {p}", flush=True)


def finish(rows: list[dict[str, Any]], what: str, json_path: str | None, **totals: Any) -> int:
    """Print ``what`` (e.g. "240 runs, 60000 operations") and the runs with findings; write ``json_path``; the
    exit code (1 on any finding)."""
    bad = sum(1 for r in rows if r["problems"])
    print(f"{what}: {bad} runs with findings")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"command": " ".join(sys.argv), "runs": rows, "runs_with_findings": bad, **totals}, f,
                      indent=1)
    return 1 if bad else 0


def seed_args(doc: str, default_seeds: int, extra: Callable[[argparse.ArgumentParser], None] | None = None
              ) -> argparse.Namespace:
    """The fuzzers' common command line: ``--seeds N --start S --json OUT`` (and what ``extra`` adds); a bad
    count or start is refused. Turns off warning logs: refusals and cancels log by design, findings count."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=default_seeds)
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--json", help="write every run's shape, counts and findings here")
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if args.seeds < 1 or args.start < 0:
        ap.error("--seeds must be >= 1, --start >= 0")
    logging.disable(logging.WARNING)
    return args
