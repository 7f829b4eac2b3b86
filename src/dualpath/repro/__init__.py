"""Reproduction of the paper's evaluation through the simulator (``dualpath reproduce``).

``reproduce(size="quick", out_dir="...", jobs=2) -> dict`` runs the plan of :mod:`.suite`, writes ``report.md``,
``results.json`` and the PNG plots into ``out_dir`` and returns the report's rows and metadata.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from dualpath.errors import ConfigError
from dualpath.repro.suite import SIZES, Results, Row, Size, plan, rows
from dualpath.repro.tasks import run_tasks

__all__ = ["SIZES", "Row", "Size", "render", "reproduce"]


def reproduce(size: str | Size = "quick", out_dir: str = "reproduce-out", jobs: int = 1, *, plots: bool = True,
              command: str = "dualpath reproduce", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the evaluation of ``size`` (``full``, ``quick``, ``tiny``) and write the report into ``out_dir``."""
    from dualpath import __version__

    if isinstance(size, str) and size not in SIZES:
        raise ConfigError(f"reproduce: unknown size {size!r}; known: {', '.join(SIZES)}")
    if jobs < 1:
        raise ConfigError(f"reproduce: jobs must be >= 1, got {jobs}")
    sz = SIZES[size] if isinstance(size, str) else size
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    specs = plan(sz)
    if progress:
        progress(f"reproduce ({size}): {len(specs)} tasks, {jobs} worker(s)")
    runs = run_tasks(specs, jobs=jobs, progress=progress)
    res = Results(runs)
    wall = time.perf_counter() - t0
    meta = {"size": sz.name, "command": command, "wall_s": wall, "runs": len(runs), "jobs": jobs,
            "cpu_s": sum(float(r.get("cpu_s", 0.0)) for r in runs), "version": __version__}
    return _write(sz, res, meta, out_dir, plots)


def _write(sz: Size, res: Results, meta: dict[str, Any], out_dir: str, plots: bool) -> dict[str, Any]:
    from dualpath.repro import report

    table = rows(sz, res)
    pngs = report.plots(sz, res, out_dir) if plots else []
    md = report.markdown(sz, table, meta, pngs)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": [r.as_dict() for r in table], "runs": res.runs}, f, indent=1, default=str)
    return {"meta": meta, "rows": table, "plots": pngs, "report": md}


def render(out_dir: str, *, plots: bool = True, size: Size | None = None) -> dict[str, Any]:
    """Rebuild ``report.md``, the rows and the plots of ``out_dir`` from its ``results.json`` (no simulation);
    ``size``: the plan the results came from (default: the named size recorded in the file)."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        meta = dict(data["meta"])
        sz = size if size is not None else SIZES[meta["size"]]
        runs = list(data["runs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a reproduce results file ({exc})") from None
    return _write(sz, Results(runs), meta, out_dir, plots)
