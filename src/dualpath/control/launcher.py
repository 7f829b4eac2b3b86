"""Spawn and supervise the processes of a deployment on this machine: one scheduler, one process per engine.

:class:`Deployment` writes the resolved config to its work directory (children read the same file), starts the
scheduler (it binds, writes its address to a file), then every engine, and waits until all engines have
registered. A supervisor thread restarts an engine process that died (``serve.restart_engines``, at most
``serve.max_restarts`` times) and a scheduler that died (``serve.scheduler_restart``: on the same address; the
engines register again with it). Without CURVE it writes the deployment's secret tokens to
``<workdir>/control.token`` (mode 0600; ``serve.token_file``), which engines and the operator present. :meth:`Deployment.stop` sends SIGTERM, waits, then
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
from dualpath.control.deploy import check_deployable, create_tokens, engine_name, engine_names, load_tokens
from dualpath.errors import ConfigError, DualPathError

log = logging.getLogger("dualpath.launcher")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


def threads_per_engine(config: DualPathConfig) -> int:
    """CPU threads (OpenMP/torch intra-op) each engine process of a deployment on this machine may use."""
    return max(1, (os.cpu_count() or 1) // max(1, len(engine_names(config))))


def _standby_preexec() -> None:  # runs in the standby scheduler between fork and exec
    _die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(STANDBY_NICE)


#: niceness of the standby scheduler until it takes over (then it asks for its priority back)
STANDBY_NICE = 10


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
        sc = self.config.serve
        if not sc.curve and sc.token_file is None:  # loopback: a fresh secret per deployment (0600)
            token_file = self.workdir / "control.token"
            create_tokens(token_file)
            self.config = self.config.model_copy(update={"serve": sc.model_copy(update={"token_file": token_file})})
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
        self._standby: subprocess.Popen[bytes] | None = None
        self._standby_due: float | None = None
        atexit.register(self._kill_all)

    # --- processes ---------------------------------------------------------------------------------------
    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}  # the file is the config
        env["DUALPATH_LOG"] = self.log_level
        env["PYTHONUNBUFFERED"] = "1"
        if "OMP_NUM_THREADS" not in env:
            # the machine's cores split between the engine processes: each process's default (every core) makes
            # N processes' OpenMP pools spin against each other, 4-5x slower per turn on a small box
            env["OMP_NUM_THREADS"] = str(threads_per_engine(self.config))
        env.update(extra)
        return env

    def _spawn_standby(self) -> None:
        """A warm scheduler process (imports done, nothing bound) that takes over at once when the scheduler dies
        (a fresh process spends seconds importing): it starts serving when a line arrives on its stdin."""
        sched = self.children["scheduler"]
        argv = [*sched.argv, "--standby"]
        argv[argv.index("--bind") + 1] = self.address
        with open(sched.log_path, "ab") as out:  # niced while it imports: it must not slow the live processes
            self._standby = subprocess.Popen(argv, env=sched.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.PIPE, preexec_fn=_standby_preexec, close_fds=True)
        self._standby_due = None

    def _promote_standby(self, child: Child) -> bool:
        sb = self._standby
        self._standby = None
        if sb is None or sb.poll() is not None or sb.stdin is None:
            return False
        try:
            sb.stdin.write(b"go\n")
            sb.stdin.close()
        except OSError:
            sb.kill()
            return False
        child.proc = sb  # type: ignore[assignment]
        child.expected_exit = False
        self._standby_due = time.monotonic() + 10.0  # the next standby once the new scheduler is settled
        return True

    def _stop_standby(self) -> None:
        sb, self._standby = self._standby, None
        if sb is not None and sb.poll() is None:
            sb.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                sb.wait(timeout=5)

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
        if self.config.serve.scheduler_restart and self.config.serve.scheduler_standby:
            self._standby_due = time.monotonic()
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
                if self._standby_due is not None and time.monotonic() >= self._standby_due:
                    self._spawn_standby()
                for child in self.children.values():
                    if child.proc is None or child.alive() or child.expected_exit:
                        continue
                    code = child.proc.returncode
                    child.exits.append(code)
                    if child.name == "scheduler":
                        if sc.scheduler_restart and child.restarts < sc.max_restarts and self.address:
                            child.restarts += 1
                            self.restarts += 1
                            log.warning("the scheduler exited (%s); restart %d at %s", code, child.restarts,
                                        self.address)
                            child.argv = [*child.argv[: child.argv.index("--bind") + 1], self.address,
                                          *child.argv[child.argv.index("--bind") + 2 :]]  # the same address
                            if not self._promote_standby(child):
                                self._spawn(child)
                                if sc.scheduler_standby:
                                    self._standby_due = time.monotonic() + 10.0
                            continue
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
    @property
    def operator_token(self) -> str | None:
        """The secret that lets a client act as the operator (shutdown, drain) without CURVE."""
        tf = self.config.serve.token_file
        return load_tokens(tf)["operator"] if tf is not None else None

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
            self._standby_due = None
            self._stop_standby()
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
        if self._standby is not None and self._standby.poll() is None:
            self._standby.kill()
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
        if dep.config.serve.token_file is not None:
            print_fn(f"engine/operator tokens (0600): {dep.config.serve.token_file}")
        while not stop.wait(0.2):
            if dep.scheduler_failed:
                print_fn("dualpath serve: the scheduler exited; stopping")
                return 1
        return 0
    finally:
        dep.stop()
        for s, h in old.items():
            signal.signal(s, h)
