"""A ``dualpath serve --http --inprocess`` subprocess (the embedded SmolLM2) for the HTTP benchmarks, and reading
its ``/metrics``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def inprocess_server(tmp: Path, *extra: str, start_timeout_s: float = 240.0,
                     settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start the server with its output in ``tmp/server.out``; yields its base URL; stops it on exit.
    ``settings``: config values by dotted path (``{"http.inflight_prefix_wait_s": "0"}``), as ``DUALPATH_*``
    variables (the caller's own ``DUALPATH_*`` variables are not passed on)."""
    addr = tmp / "http.addr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    env.update({"DUALPATH_" + k.upper().replace(".", "__"): v for k, v in (settings or {}).items()})
    with open(tmp / "server.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "serve", "--http", "127.0.0.1:0",
                                 "--inprocess", "--http-address-file", str(addr), *extra], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        try:
            t_end = time.monotonic() + start_timeout_s
            while not addr.exists() and proc.poll() is None and time.monotonic() < t_end:
                time.sleep(0.1)
            if not addr.exists():
                raise RuntimeError(f"the server did not start: see {tmp / 'server.out'}")
            yield addr.read_text().strip()
        finally:
            proc.terminate()
            proc.wait(30)


def metric(url: str, name: str) -> float:
    """The unlabelled sample ``name`` of the server's ``/metrics`` (0 when absent)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def prompt_tokens_computed(url: str) -> float:
    """Prompt tokens the server computed so far: served minus loaded from storage."""
    return metric(url, "dualpath_prompt_tokens_total") - metric(url, "dualpath_cached_tokens_total")
