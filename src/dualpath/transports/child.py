"""The parent's end of a helper process speaking JSON lines (standard library only, so command modules can
import it at no cost): the transport peer process of the contract tests and of ``dualpath bench transport``."""

from __future__ import annotations

import json
import select
import subprocess
import sys
from typing import Any


class JsonLineChild:
    """The parent's end of a helper process that speaks JSON lines (this module's peer, or a benchmark's raw
    baseline): commands carry an ``id``; every read has a deadline; ``close`` asks it to exit, then kills it."""

    def __init__(self, argv: list[str], first_timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.n = 0
        self.first = self.read(first_timeout)

    def read(self, timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"helper process {self.proc.args!r} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"helper process exited with {self.proc.poll()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, **cmd: Any) -> int:
        assert self.proc.stdin is not None
        self.n += 1
        self.proc.stdin.write(json.dumps({"id": self.n, **cmd}) + "\n")
        self.proc.stdin.flush()
        return self.n

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait(10)
