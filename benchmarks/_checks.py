"""Named pass/fail checks for the client benchmarks (``langchain_check.py``, ``instructor_check.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Checks:
    """Runs checks one by one, printing a line each; :meth:`exit_code` says whether any failed."""

    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, name: str, fn: Callable[[], Any], ok: Callable[[Any], bool]) -> None:
        try:
            out = fn()
            good = ok(out)
        except Exception as exc:  # a check that raises is a failed check, reported with its error
            out, good = f"{type(exc).__name__}: {str(exc)[:300]}", False
        self.failed += not good
        print(f"{'ok  ' if good else 'FAIL'} {name}: {str(out)[:160]}", flush=True)

    def exit_code(self) -> int:
        print("all checks passed" if not self.failed else f"{self.failed} check(s) failed")
        return 1 if self.failed else 0
