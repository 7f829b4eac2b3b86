"""The common end of the model-based fuzzers (``storage_model_fuzz.py``, ``transport_model_fuzz.py``,
``cluster_model_fuzz.py``): a line per run with its first findings, a summary, the JSON file, the exit code."""

from __future__ import annotations

import json
import sys
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
