"""What a process's exit costs, with and without the final garbage collection (``dualpath.procexit``).

    python benchmarks/process_exit.py [--json OUT]

1. ``import torch`` (and ``transformers``), then exit: seconds from the last line the process prints to its end,
   plain and with ``skip_final_collection()`` just before (the median of 5 each, alternating).
2. A whole ``dualpath serve --http`` deployment (scheduler, 1 prefill + 1 decode engine, fork server, warm
   standby, HTTP front): seconds from SIGTERM to the front's exit, the median of 3 deployments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _exit_seconds(imports: str, skip: bool) -> float:
    code = (f"import {imports}\nimport sys, time\n"
            + ("from dualpath.procexit import skip_final_collection\nskip_final_collection()\n" if skip else "")
            + "sys.stdout.write(repr(time.monotonic())); sys.stdout.flush()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return time.monotonic() - float(out)


def _serve_stop_seconds() -> float:
    sys.path.insert(0, str(HERE.parent / "tests" / "reliability"))
    from test_http_failover import HttpServe  # the suite's own launcher of `dualpath serve --http`

    with tempfile.TemporaryDirectory() as tmp:
        srv = HttpServe(Path(tmp))
        time.sleep(1.0)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(60)
        took = time.monotonic() - t0
        srv.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, object] = {"cpus": os.cpu_count()}
    for imports in ("torch", "torch, transformers"):
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(5):
            for skip in (False, True):
                runs[skip].append(_exit_seconds(imports, skip))
        plain, skipped = statistics.median(runs[False]), statistics.median(runs[True])
        result[f"import {imports}"] = {"plain_exit_s": round(plain, 3), "skipped_exit_s": round(skipped, 3),
                                       "ratio": round(skipped / plain, 3)}
        print(f"import {imports}: exit {plain:.3f} s plain, {skipped:.3f} s skipping the final collection "
              f"({skipped / plain:.2f}x)")
    stops = [_serve_stop_seconds() for _ in range(3)]
    result["serve_http_stop_s"] = round(statistics.median(stops), 3)
    print(f"dualpath serve --http deployment: SIGTERM to exit {statistics.median(stops):.2f} s (median of 3)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
