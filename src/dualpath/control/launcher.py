"""Spawn and supervise the processes of a deployment on this machine: one scheduler, one process per engine.

:class:`Deployment` writes the resolved config to its work directory (children read the same file), starts the
scheduler (it binds, writes its address to a file), then every engine, and waits until all engines have
registered. A supervisor thread restarts an engine process that died (``serve.restart_engines``, at most
``serve.max_restarts`` times) and a scheduler that died (``serve.scheduler_restart``: on the same address; the
engines register again with it), from a warm standby process when one is ready (``serve.scheduler_standby``; the
next standby is started right after a takeover). It also pings the scheduler's event loop over the control
channel every ``serve.heartbeat_s``: a scheduler alive but not answering for ``serve.scheduler_hung_after_s`` (SIGSTOPped,
or its loop blocked) is SIGKILLed and replaced exactly as a dead one; a busy scheduler still answers pings (its
turns run as tasks), so it is left alone. A scheduler that exits cleanly (the operator's ``shutdown``, SIGTERM)
stops the deployment (:attr:`Deployment.shut_down`) instead of being restarted.

Without CURVE it writes the deployment's secret tokens to ``<workdir>/control.token`` (mode 0600;
``serve.token_file``), which engines and the operator present. With CURVE and no engine key configured it
generates a key pair per engine: the scheduler gets every engine's public key (``serve.curve_engine_keys``), each
engine only its own pair (in its environment). The resolved config (``<workdir>/config.json``) is mode 0600.
:meth:`Deployment.stop` sends SIGTERM, waits, then SIGKILLs what is left; children also get ``PR_SET_PDEATHSIG``
so they die with the launcher even if it is SIGKILLed: no orphans. Each child's output goes to
``<workdir>/logs/<name>.log``.

``engine_env`` adds environment variables to one engine's process (e.g. ``DUALPATH_CLUSTER__SNIC_GBPS`` to make
one node's storage link slow): the tests' fault injection uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
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
from dualpath.control.channel import CurveKeys
from dualpath.control.deploy import (
    check_deployable,
    client_curve,
    create_engine_keys,
    create_tokens,
    engine_name,
    engine_names,
    load_tokens,
)
from dualpath.control.forkserver import ForkedProcess, ForkServer, die_with_parent, forkable
from dualpath.control.protocol import ProtocolError, decode, encode
from dualpath.errors import ConfigError, DualPathError

log = logging.getLogger("dualpath.launcher")
def threads_per_engine(config: DualPathConfig) -> int:
    """CPU threads (OpenMP/torch intra-op) each engine process of a deployment on this machine may use."""
    return max(1, (os.cpu_count() or 1) // max(1, len(engine_names(config))))


def _standby_preexec() -> None:  # runs in the standby scheduler between fork and exec
    die_with_parent()
    with contextlib.suppress(OSError):
        os.nice(STANDBY_NICE)


#: niceness of the standby scheduler until it takes over (then it asks for its priority back)
STANDBY_NICE = 10


class _Pinger:
    """Pings the scheduler's event loop over its control channel (plain pyzmq, polled by the supervisor thread;
    never blocks): :meth:`hung` says for how long no ``pong`` came back once that exceeds the limit.

    Only a connection that is up counts: a stopped process or a blocked event loop keeps its connection (the
    kernel and libzmq's I/O thread hold it) but answers nothing. A scheduler that closed its socket (shutting
    down) is left ``gone_grace`` seconds to exit before it is taken for hung as well."""

    def __init__(self, address: str, curve: CurveKeys | None, period: float, hung_after: float,
                 first_within: float, gone_grace: float = 10.0) -> None:
        import zmq

        self.address, self.curve, self.period = address, curve, period
        self.hung_after, self.first_within, self.gone_grace = hung_after, first_within, gone_grace
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sock: Any = None
        self._mon: Any = None
        self._ids = itertools.count(1)
        self.since = self.last_sent = self.last_ok = self.changed = 0.0
        self.answered = self.up = self.was_up = False
        self.reset(time.monotonic())

    def reset(self, now: float) -> None:
        """A new scheduler process: a fresh connection (pings queued for the old one are dropped)."""
        zmq = self._zmq
        self._close_sockets()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a connection that is not up
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        if self.curve is not None:
            sock.curve_serverkey = (self.curve.server or "").encode()
            sock.curve_secretkey = self.curve.secret.encode()
            sock.curve_publickey = self.curve.public.encode()
        self._mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._sock = sock
        self.since = self.changed = now
        self.last_sent = -1e18
        self.answered = self.up = self.was_up = False

    def hung(self, now: float) -> float | None:
        """Seconds without an answer when that is past the limit, else None: ``hung_after`` once the process
        has answered (``first_within`` before), counted while the connection is up; ``gone_grace`` after the
        process closed the connection. Sends the next ping when one is due."""
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        while True:
            try:
                ev = recv_monitor_message(self._mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            up = ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if up != self.up:
                self.up, self.changed = up, now
                self.was_up = self.was_up or up
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if decode(data, max_bytes=1 << 16).type == "pong":
                    self.last_ok, self.answered = now, True
            except ProtocolError:
                continue
        if now - self.last_sent >= self.period:
            with contextlib.suppress(zmq.Again):
                self._sock.send(encode("ping", {}, mid=next(self._ids)), zmq.NOBLOCK)
            self.last_sent = now
        if self.up or not self.was_up:  # connected (or not yet): silent since the last answer or the connection
            silent = now - max(self.last_ok if self.answered else self.since, self.changed if self.up else 0.0)
            limit = self.hung_after if self.answered else self.first_within
        else:  # the process closed its socket: it is on its way out
            silent, limit = now - self.changed, self.gone_grace
        return silent if silent > limit else None

    def _close_sockets(self) -> None:
        for s in (self._mon, self._sock):
            if s is not None:
                s.close(linger=0)
        self._mon = self._sock = None

    def close(self) -> None:
        self._close_sockets()
        self._ctx.term()


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | ForkedProcess | None = None
    restarts: int = 0
    expected_exit: bool = False
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def exposure_warning(config: DualPathConfig) -> str | None:
    """A warning line when the control plane listens beyond this machine without CURVE: any peer that reaches the
    port can then submit turns and read stats (operator commands still need the token file)."""
    import ipaddress

    sc = config.serve
    host = sc.host.strip("[]")
    if sc.curve or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return (f"warning: serve.host {sc.host!r} is reachable beyond this machine and serve.curve is off: any peer "
            "that reaches the port can submit turns and read stats; turn CURVE on (docs/deployment.md) or bind "
            "127.0.0.1")


class Deployment:
    """A scheduler and its engine processes on this machine (see the module docstring)."""

    def __init__(self, config: DualPathConfig, *, workdir: str | Path | None = None,
                 engine_env: dict[str, dict[str, str]] | None = None, bind: str | None = None,
                 log_level: str = "WARNING") -> None:
        self.config = check_deployable(config)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dualpath-serve-"))
        try:
            (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--workdir {self.workdir}: cannot create its logs folder there "
                              f"({exc.strerror or exc})") from None
        sc = self.config.serve
        if not sc.curve and sc.token_file is None:  # loopback: a fresh secret per deployment (0600)
            token_file = self.workdir / "control.token"
            create_tokens(token_file)
            self.config = self.config.model_copy(update={"serve": sc.model_copy(update={"token_file": token_file})})
        # CURVE without engine keys: a fresh pair per engine; the scheduler learns the public keys from the config,
        # each engine gets only its own pair (its environment), so an engine's key binds it to its name
        self._engine_keys: dict[str, tuple[str, str]] = {}
        if sc.curve and sc.curve_engine_keys:
            raise ConfigError("serve.curve_engine_keys: `dualpath serve` (one machine) generates the engines' key "
                              "pairs itself; remove it, or run each engine with --role and its own "
                              "serve.curve_engine_public_key/secret_key")
        if sc.curve and not sc.curve_engine_public_key:
            self._engine_keys = create_engine_keys(self.config)
            pubs = {name: pair[0] for name, pair in self._engine_keys.items()}
            self.config = self.config.model_copy(update={"serve": sc.model_copy(update={"curve_engine_keys": pubs})})
        self.config_path = self.workdir / "config.json"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold CURVE secrets
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(json.dumps(self.config.model_dump(mode="json")))
        self.address_file = self.workdir / "scheduler.addr"
        sc = self.config.serve
        self.bind = bind or f"tcp://{sc.host}:{sc.port}"
        self.engine_env = engine_env or {}
        self.log_level = log_level
        self.children: dict[str, Child] = {}
        self.address = ""
        self.restarts = 0
        self.scheduler_failed = False
        self.shut_down = False  # the scheduler exited cleanly (operator shutdown / SIGTERM): the deployment stops
        self.standby_takeovers = 0  # scheduler failovers served by the warm standby
        self.cold_restarts = 0  # ... by a fresh process
        self.hung_kills = 0  # schedulers SIGKILLed because their event loop stopped answering pings
        self._pinger: _Pinger | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._standby: subprocess.Popen[bytes] | None = None
        self._standby_due: float | None = None
        self._forkserver: ForkServer | None = None
        self.forked = 0  # engine processes started from the fork server (the others: fresh processes)
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
        with contextlib.suppress(OSError):  # its normal priority back at once (it may still be importing)
            os.setpriority(os.PRIO_PROCESS, sb.pid, 0)
        child.proc = sb  # type: ignore[assignment]
        child.expected_exit = False
        # the next standby starts now (niced while it imports), so a second failure soon after is warm too
        self._standby_due = time.monotonic()
        return True

    def _stop_standby(self) -> None:
        sb, self._standby = self._standby, None
        if sb is not None and sb.poll() is None:
            sb.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                sb.wait(timeout=5)

    def _spawn(self, child: Child, timeout: float = 30.0) -> None:
        fs = self._forkserver
        if child.name != "scheduler" and fs is not None and fs.alive() and forkable(fs.env, child.env):
            try:
                child.proc = fs.spawn(child.argv[2], child.argv[3:], child.env, child.log_path, timeout,
                                      name=child.name)
                child.expected_exit = False
                self.forked += 1
                return
            except DualPathError as exc:
                log.warning("%s; starting %s as a fresh process", exc, child.name)
        with open(child.log_path, "ab") as out:
            child.proc = subprocess.Popen(child.argv, env=child.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                          close_fds=True)
        child.expected_exit = False

    def start(self, timeout: float | None = None) -> str:
        """Start everything; returns the scheduler's address once every engine has registered. A start that fails
        stops what it started (``with Deployment(...)`` never reaches ``__exit__`` then) before raising."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float | None) -> str:
        timeout = self.config.serve.startup_timeout_s if timeout is None else timeout
        t_end = time.monotonic() + timeout
        py = sys.executable
        with contextlib.suppress(FileNotFoundError):
            self.address_file.unlink()
        envs: dict[str, dict[str, str]] = {}
        for role, rank, _node in engine_names(self.config):
            name = engine_name(role, rank)
            extra = dict(self.engine_env.get(name, {}))
            if name in self._engine_keys:  # this engine's own CURVE pair (the config file has only public keys);
                pub, sec = self._engine_keys[name]  # quoted: the environment's values are parsed as YAML
                extra["DUALPATH_SERVE__CURVE_ENGINE_PUBLIC_KEY"] = json.dumps(pub)
                extra["DUALPATH_SERVE__CURVE_ENGINE_SECRET_KEY"] = json.dumps(sec)
            envs[name] = self._env(extra)
        base = self._env({})
        if (self.config.serve.fork_engines and sys.platform.startswith("linux")  # (fork after torch: Linux only)
                and any(forkable(base, env) for env in envs.values())):  # it imports torch while the scheduler starts
            self._forkserver = ForkServer(base, self.workdir / "logs" / "forkserver.log")
        sched = Child("scheduler", [py, "-m", "dualpath.control.schedulerd", "--config", str(self.config_path),
                                    "--bind", self.bind, "--address-file", str(self.address_file)],
                      base, self.workdir / "logs" / "scheduler.log")
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
                          envs[name], self.workdir / "logs" / f"{name}.log")
            self.children[name] = child
            self._spawn(child, max(1.0, t_end - time.monotonic()))
        self._wait_engines(len(self.children) - 1, t_end)
        sc = self.config.serve
        if sc.scheduler_restart and sc.scheduler_standby:
            self._standby_due = time.monotonic()
        if sc.scheduler_restart:
            self._pinger = _Pinger(self.address, client_curve(self.config), sc.heartbeat_s, sc.hung_after_s(),
                                   sc.startup_timeout_s)
        self._supervisor = threading.Thread(target=self._supervise, name="dualpath-supervisor", daemon=True)
        self._supervisor.start()
        return self.address

    def _wait_engines(self, n: int, t_end: float) -> None:
        import anyio

        from dualpath.control.client import ServeClient
        from dualpath.control.deploy import client_curve

        async def _wait() -> None:
            async with ServeClient(self.address, curve=client_curve(self.config)) as c:
                with anyio.fail_after(max(0.1, t_end - time.monotonic())):
                    while True:
                        if any(not ch.alive() for ch in self.children.values()):
                            return  # a process exited at start: fail now, not at startup_timeout_s
                        with contextlib.suppress(Exception):  # (the scheduler is still starting)
                            if int((await c.stats(timeout=2.0)).get("engines_alive", 0)) >= n:
                                return
                        await anyio.sleep(0.1)

        try:
            anyio.run(_wait)
            died = any(not ch.alive() for ch in self.children.values())
        except TimeoutError:
            died = True
        if died:
            dead = [c for c in self.children.values() if not c.alive()]
            detail = "".join(f"\n--- {c.name} ({c.log_path}):\n{self._tail(c)}" for c in dead)
            self.stop()
            why = "a process exited before every engine registered" if dead else "not every engine registered in time"
            raise DualPathError(f"{why}{detail}")

    def _tail(self, child: Child, n: int = 2000) -> str:
        """The end of a child's log; when it died of one of this project's errors (bad input: an address it
        cannot bind, a config it refuses), just that error's message, not the traceback around it."""
        try:
            text = child.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = text.rstrip().splitlines()
        for i in range(len(lines) - 1, max(-1, len(lines) - 40), -1):
            if lines[i].startswith("dualpath.errors.") and ": " in lines[i] and "Traceback" in text:
                return "\n".join([lines[i].split(": ", 1)[1], *lines[i + 1:]])
        return text[-n:]

    def _check_hung(self) -> None:
        """SIGKILL a scheduler that is alive but whose event loop stopped answering pings (the dead-scheduler
        path below then replaces it)."""
        sched = self.children.get("scheduler")
        if self._pinger is None or sched is None or sched.proc is None or not sched.alive() or sched.expected_exit:
            return
        silent = self._pinger.hung(time.monotonic())
        if silent is None:
            return
        self.hung_kills += 1
        log.warning("the scheduler (pid %d) has not answered pings for %.2f s (serve.scheduler_hung_after_s): "
                    "killing it", sched.proc.pid, silent)
        sched.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            sched.proc.wait(timeout=5)

    def _supervise(self) -> None:
        sc = self.config.serve
        while not self._stopping.wait(0.1):
            with self._lock:
                if self._standby_due is not None and time.monotonic() >= self._standby_due:
                    self._spawn_standby()
                self._check_hung()
                for child in self.children.values():
                    if child.proc is None or child.alive() or child.expected_exit:
                        continue
                    code = child.proc.returncode
                    assert code is not None  # (not alive: it was reaped)
                    child.exits.append(code)
                    if child.name == "scheduler" and code == 0 and not self.shut_down:
                        log.warning("the scheduler exited cleanly (shutdown by the operator); stopping the "
                                    "deployment")
                        self.shut_down = True
                        self._standby_due = None
                        self._stop_standby()
                        for c in self.children.values():  # the engines follow its shutdown notice
                            c.expected_exit = True
                        break
                    if child.name == "scheduler":
                        if sc.scheduler_restart and child.restarts < sc.max_restarts and self.address:
                            child.restarts += 1
                            self.restarts += 1
                            log.warning("the scheduler exited (%s); restart %d at %s", code, child.restarts,
                                        self.address)
                            child.argv = [*child.argv[: child.argv.index("--bind") + 1], self.address,
                                          *child.argv[child.argv.index("--bind") + 2 :]]  # the same address
                            if self._promote_standby(child):
                                self.standby_takeovers += 1
                            else:
                                self._spawn(child)
                                self.cold_restarts += 1
                                if sc.scheduler_standby:
                                    self._standby_due = time.monotonic()
                            if self._pinger is not None:
                                self._pinger.reset(time.monotonic())
                            continue
                        log.error("the scheduler exited (%s); stopping the deployment", code)
                        self.scheduler_failed = True
                        child.expected_exit = True
                        continue
                    if code == 0:  # an engine exits cleanly only when told to (the scheduler's shutdown)
                        child.expected_exit = True
                    elif sc.restart_engines and child.restarts < sc.max_restarts:
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

    @property
    def forkserver_pid(self) -> int | None:
        """The engine fork server's process (``serve.fork_engines``), while it runs."""
        fs = self._forkserver
        return fs.pid if fs is not None and fs.alive() else None

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
            if self._pinger is not None:
                self._pinger.close()
                self._pinger = None
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
            if self._forkserver is not None:
                self._forkserver.close()
                self._forkserver = None
        atexit.unregister(self._kill_all)

    def _kill_all(self) -> None:
        if self._standby is not None and self._standby.poll() is None:
            self._standby.kill()
        for c in self.children.values():
            if c.alive():
                assert c.proc is not None
                c.proc.kill()
        if self._forkserver is not None:
            self._forkserver.kill()

    def __enter__(self) -> Deployment:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_foreground(config: DualPathConfig, *, bind: str | None = None, workdir: str | None = None,
                   print_fn: Any = print, address_file: str | None = None) -> int:
    """`dualpath serve` (whole deployment): start, print the address (and write it to ``address_file``, as
    ``--role scheduler`` does), supervise until SIGINT/SIGTERM."""
    dep = Deployment(config, bind=bind, workdir=workdir)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        address = dep.start()
        if address_file:
            tmp = f"{address_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(address)
            os.replace(tmp, address_file)
        n = len(dep.children) - 1
        print_fn(f"dualpath serve: scheduler at {address}, {n} engine processes; logs in {dep.workdir / 'logs'}")
        print_fn(f"submit with: dualpath run --serve {address}   (Ctrl-C stops the deployment)")
        exposed = exposure_warning(dep.config)
        if exposed:
            print_fn(exposed)
        tf = dep.config.serve.token_file
        if tf is not None:
            print_fn(f"engine/operator tokens (0600): {tf}   (operator: dualpath ctl stats|drain|cancel|stop "
                     f"--connect {address} --token-file {tf})")
        while not stop.wait(0.2):
            if dep.shut_down:
                print_fn("dualpath serve: the scheduler was shut down by the operator; stopping")
                return 0
            if dep.scheduler_failed:
                print_fn("dualpath serve: the scheduler exited; stopping")
                return 1
        return 0
    finally:
        dep.stop()
        for s, h in old.items():
            signal.signal(s, h)
