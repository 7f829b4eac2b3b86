"""Process gauges that every control-plane process reports (engines in their heartbeats, the scheduler in its
stats): resident memory and open file descriptors, read from Linux ``/proc``. Kept apart from the engine host so
that the scheduler process never imports torch."""

from __future__ import annotations

import os


def process_gauges() -> dict[str, int]:
    """RSS bytes and open fds of this process (Linux /proc; zeros elsewhere)."""
    rss = fds = 0
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        pass
    return {"rss": rss, "fds": fds}
