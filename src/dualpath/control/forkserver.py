"""A warm process that a deployment's engine processes fork from, so each starts without importing torch again.

An engine process spends most of its start importing torch (about 2.5 s of CPU on a small machine); a deployment
of N engines on one box pays it N times at once, and again at every engine restart. :class:`ForkServer` starts
one process (``python -m dualpath.control.forkserver``) that imports torch, and nothing that reads the engine's
environment at import time (no kernels, no CUDA, no NIXL), then forks an engine on request: the child takes the
engine's environment, log file and arguments and runs its module as ``python -m`` would. CUDA is first touched
after the fork, in the child, as in a process started fresh.

Protocol (JSON lines, no pickle): the launcher writes ``{"module", "args", "env", "log"}`` to the server's stdin;
the server answers ``{"pid": n}`` for each (in order) and ``{"exit": pid, "code": c}`` when a child ends (``c`` as
:attr:`subprocess.Popen.returncode`: negative for a signal). The server is single-threaded (its children are
forked from the thread that reads), reaps its children on ``SIGCHLD`` and exits when its stdin closes.

Lifetimes: the server dies with the launcher (``PR_SET_PDEATHSIG``) and every engine with the server, so nothing
is orphaned; an engine is still its own process: signals go to it directly (:class:`ForkedProcess`, a
:class:`subprocess.Popen` look-alike for the launcher). A server that died fails the next spawn: the launcher then
starts engines as fresh processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dualpath.errors import DualPathError

log = logging.getLogger("dualpath.launcher")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

#: environment variables an engine may set differently from the fork server: read after the fork (CUDA and NIXL
#: at their first use, the thread count applied in the child), so a forked engine behaves as one started fresh
_FORKABLE_ENV = ("DUALPATH_", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "OMP_NUM_THREADS", "UCX_", "NIXL_")


def die_with_parent() -> None:
    """``PR_SET_PDEATHSIG``: SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


def _set_name(name: str) -> None:
    """This process's name in ``ps -o comm``, ``top`` and ``pgrep`` (``PR_SET_NAME``, 15 bytes): a forked engine
    keeps the server's command line, so this is where ``dualpath-pe0`` shows."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except OSError:  # pragma: no cover - not Linux
        pass


def forkable(server_env: dict[str, str], env: dict[str, str]) -> bool:
    """Whether a process with environment ``env`` can be forked from a server started with ``server_env``: they
    differ only in variables read after the fork (see ``_FORKABLE_ENV``), none of them a secret of its own (a
    per-engine CURVE key: a forked engine starts with a copy of the server's memory, where the requests of the
    engines forked before it passed; an engine with a secret of its own is started fresh)."""
    differs = (k for k in set(server_env) | set(env) if server_env.get(k) != env.get(k))
    return all(k.startswith(_FORKABLE_ENV) and "SECRET" not in k and "TOKEN" not in k for k in differs)


class ForkedProcess:
    """An engine forked by the server: the parts of :class:`subprocess.Popen` the launcher uses. Its exit code
    comes from the server (which reaps it); signals go straight to its pid, never after its exit was reported."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The launcher's side: starts the server process and spawns engines from it (see the module docstring)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = dict(env)
        self.log_path = log_path
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dualpath.control.forkserver"], env=self.env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out,
                                         preexec_fn=die_with_parent, close_fds=True)
        self._ready = threading.Event()
        self._spawned: queue.Queue[ForkedProcess | None] = queue.Queue()
        self._children: dict[int, ForkedProcess] = {}
        self._lock = threading.Lock()  # one spawn at a time: the answers come in order
        self._late = threading.Lock()  # (a spawn given up vs its answer arriving)
        self._abandoned = 0  # spawns given up before their pid came: those children are killed on arrival
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="dualpath-forkserver", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self._dead and self.proc.poll() is None

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        try:
            for line in out:
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.error("fork server: unreadable line %r", line[:200])
                    continue
                if "ready" in msg:
                    self._ready.set()
                elif "pid" in msg:
                    child = ForkedProcess(int(msg["pid"]))
                    self._children[child.pid] = child
                    with self._late:
                        if self._abandoned:  # its spawn gave up (and started it fresh): not a second copy
                            self._abandoned -= 1
                            child.kill()
                        else:
                            self._spawned.put(child)
                elif "exit" in msg:
                    gone = self._children.pop(int(msg["exit"]), None)
                    if gone is not None:
                        gone._exited(int(msg["code"]))
        finally:  # the server is gone: its children died with it (PR_SET_PDEATHSIG)
            self._dead = True
            self._ready.set()
            self._spawned.put(None)
            for child in list(self._children.values()):
                child._exited(-signal.SIGKILL)
            self._children.clear()

    def spawn(self, module: str, args: list[str], env: dict[str, str], log_path: Path,
              timeout: float, name: str = "") -> ForkedProcess:
        """Fork ``python -m module *args`` with ``env``, its output appended to ``log_path``, its process named
        ``dualpath-<name>`` (``ps -o comm``; its command line stays the server's). Raises :class:`DualPathError`
        when the server is not ready within ``timeout`` s or has died."""
        if not self._ready.wait(timeout) or self._dead:
            raise DualPathError(f"the engine fork server is not running (see {self.log_path})")
        line = json.dumps({"module": module, "args": args, "env": env, "log": str(log_path),
                           "name": f"dualpath-{name}" if name else ""}) + "\n"
        with self._lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line.encode())
                self.proc.stdin.flush()
                child = self._spawned.get(timeout=timeout)
            except OSError as exc:
                raise DualPathError(f"the engine fork server did not fork {module}: {exc!r}") from exc
            except queue.Empty:
                with self._late:
                    try:  # it came just now
                        child = self._spawned.get_nowait()
                    except queue.Empty:
                        self._abandoned += 1
                        raise DualPathError(f"the engine fork server did not fork {module} within {timeout:g} s "
                                            f"(see {self.log_path})") from None
        if child is None:
            raise DualPathError(f"the engine fork server died (see {self.log_path})")
        return child

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server (its stdin closed; SIGKILL past ``timeout``). Engines still running die with it."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout=2.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


# --- the server process -----------------------------------------------------------------------------------------

def _child(req: dict[str, Any], keep: tuple[int, ...]) -> None:
    """In the forked child: become the engine (never returns)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        die_with_parent()
        if req.get("name"):
            _set_name(req["name"])
        out = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # (the server's pipes on 0 and 1 are replaced here)
        os.dup2(out, 1)
        os.dup2(out, 2)
        for fd in {out, null, *keep} - {0, 1, 2}:
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            import torch

            torch.set_num_threads(int(threads))
        import runpy

        sys.argv = [req["module"], *req["args"]]
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = int(exc.code or 0)
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve() -> int:
    import warnings

    import torch  # noqa: F401  (the point of this process)

    # (Python 3.12+ warns at a fork with threads running: torch's import leaves one, idle, holding no lock that a
    # child needs; forking after importing torch is what its own DataLoader workers do)
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")

    rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)

    def say(msg: dict[str, Any]) -> None:
        os.write(wfd, (json.dumps(msg) + "\n").encode())

    say({"ready": os.getpid(), "t": time.time()})
    buf = b""
    while True:
        ready, _, _ = select.select([rfd, wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while True:  # reap every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if rfd not in ready:
            continue
        data = os.read(rfd, 1 << 16)
        if not data:
            return 0  # the launcher closed our stdin (or died): stop
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(req, (rfd, wfd, wake_r, wake_w))
            say({"pid": pid})


if __name__ == "__main__":
    from dualpath.procexit import exit_with

    exit_with(_serve())
