"""Spawn and supervise the processes of a deployment on this machine: one scheduler, one process per engine.

:class:`Deployment` writes the resolved config to its work directory (children read the same file), starts the
scheduler (it binds, writes its address to a file), then every engine, and waits until all engines have
registered. A supervisor thread restarts an engine process that died (``serve.restart_engines``, at most
``serve.max_restarts`` times) and notices a dead scheduler. :meth:`Deployment.stop` sends SIGTERM, waits, then
SIGKILLs what is left; children also get ``PR_SET_PDEATHSIG`` so they die with the launcher even if it is
SIGKILLed: no orphans. Each child's output goes to ``<workdir>/logs/<name>.log``.

``engine_env`` adds environment variables to one engine's process (e.g. ``DUALPATH_CLUSTER__SNIC_GBPS`` to make
one node's storage link slow): the tests' fault injection uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualpath.config import DualPathConfig
from dualpath.control.deploy import check_deployable, engine_name, engine_names
from dualpath.errors import ConfigError, DualPathError

log = logging.getLogger("dualpath.launcher")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    expected_exit: bool = False
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Deployment:
    """A scheduler and its engine processes on this machine (see the module docstring)."""

    def __init__(self, config: DualPathConfig, *, workdir: str | Path | None = None,
                 engine_env: dict[str, dict[str, str]] | None = None, bind: str | None = None,
                 log_level: str = "WARNING") -> None:
        self.config = check_deployable(config)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dualpath-serve-"))
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.json"
        self.config_path.write_text(json.dumps(self.config.model_dump(mode="json")))
        self.address_file = self.workdir / "scheduler.addr"
        sc = self.config.serve
        self.bind = bind or f"tcp://{sc.host}:{sc.port}"
        self.engine_env = engine_env or {}
        self.log_level = log_level
        self.children: dict[str, Child] = {}
        self.address = ""
        self.restarts = 0
        self.scheduler_failed = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        atexit.register(self._kill_all)

    # --- processes ---------------------------------------------------------------------------------------
    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}  # the file is the config
        env["DUALPATH_LOG"] = self.log_level
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _spawn(self, child: Child) -> None:
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(child.argv, env=child.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                          close_fds=True)
        child.expected_exit = False

    def start(self, timeout: float | None = None) -> str:
        """Start everything; returns the scheduler's address once every engine has registered."""
        timeout = self.config.serve.startup_timeout_s if timeout is None else timeout
        t_end = time.monotonic() + timeout
        py = sys.executable
        with contextlib.suppress(FileNotFoundError):
            self.address_file.unlink()
        sched = Child("scheduler", [py, "-m", "dualpath.control.schedulerd", "--config", str(self.config_path),
                                    "--bind", self.bind, "--address-file", str(self.address_file)],
                      self._env({}), self.workdir / "logs" / "scheduler.log")
        self.children["scheduler"] = sched
        self._spawn(sched)
        while not self.address_file.exists():
            if not sched.alive():
                raise DualPathError(f"the scheduler exited at start; see {sched.log_path}:\n{self._tail(sched)}")
            if time.monotonic() > t_end:
                raise DualPathError(f"the scheduler did not start within {timeout:g} s; see {sched.log_path}")
            time.sleep(0.05)
        self.address = self.address_file.read_text().strip()
        for role, rank, _node in engine_names(self.config):
            name = engine_name(role, rank)
            child = Child(name, [py, "-m", "dualpath.control.enginehost", "--config", str(self.config_path),
                                 "--role", role.value, "--rank", str(rank), "--scheduler", self.address],
                          self._env(self.engine_env.get(name, {})), self.workdir / "logs" / f"{name}.log")
            self.children[name] = child
            self._spawn(child)
        self._wait_engines(len(self.children) - 1, t_end)
        self._supervisor = threading.Thread(target=self._supervise, name="dualpath-supervisor", daemon=True)
        self._supervisor.start()
        return self.address

    def _wait_engines(self, n: int, t_end: float) -> None:
        import anyio

        from dualpath.control.client import ServeClient, wait_ready
        from dualpath.control.deploy import client_curve

        async def _wait() -> None:
            async with ServeClient(self.address, curve=client_curve(self.config)) as c:
                await wait_ready(c, n, max(0.1, t_end - time.monotonic()))

        try:
            anyio.run(_wait)
        except TimeoutError:
            dead = [c for c in self.children.values() if not c.alive()]
            detail = "".join(f"\n--- {c.name} ({c.log_path}):\n{self._tail(c)}" for c in dead)
            self.stop()
            raise DualPathError(f"not every engine registered in time{detail}") from None

    def _tail(self, child: Child, n: int = 2000) -> str:
        try:
            return child.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _supervise(self) -> None:
        sc = self.config.serve
        while not self._stopping.wait(0.1):
            with self._lock:
                for child in self.children.values():
                    if child.proc is None or child.alive() or child.expected_exit:
                        continue
                    code = child.proc.returncode
                    child.exits.append(code)
                    if child.name == "scheduler":
                        log.error("the scheduler exited (%s); stopping the deployment", code)
                        self.scheduler_failed = True
                        child.expected_exit = True
                        continue
                    if sc.restart_engines and child.restarts < sc.max_restarts:
                        child.restarts += 1
                        self.restarts += 1
                        log.warning("engine %s exited (%s); restart %d", child.name, code, child.restarts)
                        self._spawn(child)
                    else:
                        child.expected_exit = True

    # --- control -----------------------------------------------------------------------------------------
    def pid(self, name: str) -> int:
        return self.children[name].pid

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to one child (fault injection); returns its pid."""
        child = self.children[name]
        if child.proc is None:
            raise ConfigError(f"no process {name}")
        pid = child.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        return pid

    def alive(self) -> dict[str, bool]:
        return {n: c.alive() for n, c in self.children.items()}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, wait up to ``timeout``, SIGKILL the rest; idempotent."""
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=2.0)
        with self._lock:
            procs = [c for c in self.children.values() if c.alive()]
            for c in self.children.values():
                c.expected_exit = True
            # engines first, then the scheduler
            for c in sorted(procs, key=lambda c: c.name == "scheduler"):
                with contextlib.suppress(ProcessLookupError):
                    assert c.proc is not None
                    c.proc.send_signal(signal.SIGTERM)
            t_end = time.monotonic() + timeout
            for c in procs:
                assert c.proc is not None
                try:
                    c.proc.wait(timeout=max(0.01, t_end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not exit on SIGTERM; killing it", c.name)
                    c.proc.kill()
                    c.proc.wait(timeout=5)
        atexit.unregister(self._kill_all)

    def _kill_all(self) -> None:
        for c in self.children.values():
            if c.alive():
                assert c.proc is not None
                c.proc.kill()

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_foreground(config: DualPathConfig, *, bind: str | None = None, workdir: str | None = None,
                   print_fn: Any = print) -> int:
    """`dualpath serve` (whole deployment): start, print the address, supervise until SIGINT/SIGTERM."""
    dep = Deployment(config, bind=bind, workdir=workdir)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        address = dep.start()
        n = len(dep.children) - 1
        print_fn(f"dualpath serve: scheduler at {address}, {n} engine processes; logs in {dep.workdir / 'logs'}")
        print_fn(f"submit with: dualpath run --serve {address}   (Ctrl-C stops the deployment)")
        while not stop.wait(0.2):
            if dep.scheduler_failed:
                print_fn("dualpath serve: the scheduler exited; stopping")
                return 1
        return 0
    finally:
        dep.stop()
        for s, h in old.items():
            signal.signal(s, h)
