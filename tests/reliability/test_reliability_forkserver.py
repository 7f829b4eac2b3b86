"""Engine processes forked from the launcher's fork server (``serve.fork_engines``) serve as processes started
fresh do; an engine whose environment the server was not started with is started fresh; an engine's exit is
reported through the server and it is forked again; the server killed takes its engines with it (no orphan) and
they come back as fresh processes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from serve_util import (
    child_pids,
    deployment,
    pid_alive,
    reference_tokens,
    replay,
    stats,
    tiny_config,
    tokens_of,
    trace,
    wait_for,
)

from dualpath.control.forkserver import ForkedProcess, ForkServer, forkable
from dualpath.errors import DualPathError


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_only_variables_read_after_the_fork_may_differ() -> None:
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "2", "DUALPATH_LOG": "WARNING"}
    assert forkable(base, base)
    assert forkable(base, {**base, "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "1", "UCX_TLS": "tcp",
                           "DUALPATH_CLUSTER__SNIC_GBPS": "5"})
    assert not forkable(base, {**base, "LD_PRELOAD": "libx.so"})  # read when the process starts
    assert not forkable(base, {**base, "PATH": "/usr/bin"})
    assert not forkable(base, {k: v for k, v in base.items() if k != "PATH"})
    # a secret of its own: the server's memory (other engines' requests) must not be inherited
    assert not forkable(base, {**base, "DUALPATH_SERVE__CURVE_ENGINE_SECRET_KEY": '"x"'})


def test_exit_codes_signals_and_a_spawn_given_up(tmp_path: Path) -> None:
    """The server's children report their exit codes as ``Popen`` does; a spawn that the server does not answer
    in time fails (the launcher then starts the engine fresh), and the child forked late is killed at once: no
    second copy of an engine runs, and the next spawn gets its own child."""
    (tmp_path / "sleeper.py").write_text(
        "import sys, time\ntime.sleep(float(sys.argv[1]))\nprint('slept', flush=True)\nsys.exit(int(sys.argv[2]))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    fs = ForkServer(env, tmp_path / "server.log")
    try:
        a = fs.spawn("sleeper", ["0", "3"], env, tmp_path / "a.log", timeout=60)
        assert a.wait(30) == 3 and (tmp_path / "a.log").read_text() == "slept\n"
        b = fs.spawn("sleeper", ["60", "0"], env, tmp_path / "b.log", timeout=30)
        assert child_pids(fs.pid) == [b.pid] and b.poll() is None
        b.terminate()
        assert b.wait(30) == -signal.SIGTERM
        os.kill(fs.pid, signal.SIGSTOP)  # a server that does not answer
        try:
            with pytest.raises(DualPathError, match="did not fork sleeper within 0.3 s"):
                fs.spawn("sleeper", ["60", "0"], env, tmp_path / "c.log", timeout=0.3)
        finally:
            os.kill(fs.pid, signal.SIGCONT)
        d = fs.spawn("sleeper", ["0.5", "5"], env, tmp_path / "d.log", timeout=30)
        assert d.wait(30) == 5 and (tmp_path / "d.log").read_text() == "slept\n"
        wait_for(lambda: not child_pids(fs.pid), 10, "the late child killed")
        assert not (tmp_path / "c.log").exists() or (tmp_path / "c.log").read_text() == ""
    finally:
        fs.close()
    assert not pid_alive(fs.pid)


def test_forked_engines_serve_exit_restart_and_die_with_the_server(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "kv", prefill_nodes=2, decode_nodes=1, serve={"restart_engines": True})
    agents = trace(n_agents=4, n_turns=2, gen=4)
    ref = reference_tokens(cfg, agents)
    with deployment(cfg, tmp_path / "work", engine_env={"pe1": {"LD_BIND_NOW": "1"}}) as d:
        server = d.forkserver_pid
        assert server is not None and d.forked == 2
        assert _ppid(d.pid("pe0")) == server and _ppid(d.pid("de0")) == server
        assert Path(f"/proc/{d.pid('pe0')}/comm").read_text().strip() == "dualpath-pe0"  # what ps and top show
        assert isinstance(d.children["pe1"].proc, subprocess.Popen) and _ppid(d.pid("pe1")) == os.getpid()
        assert tokens_of(replay(d.address, agents, cfg)) == ref

        # an engine killed: its exit code comes through the server, and it is forked again
        old = d.kill("pe0")
        new = wait_for(lambda: d.pid("pe0") != old and d.pid("pe0"), 30, "pe0 restarted")
        assert d.children["pe0"].exits == [-signal.SIGKILL] and _ppid(new) == server
        assert isinstance(d.children["pe0"].proc, ForkedProcess) and d.forked == 3

        # the server killed: its engines die with it and come back as fresh processes
        forked = {n: d.pid(n) for n in ("pe0", "de0")}
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in forked.values()), 10, "the forked engines gone")
        wait_for(lambda: all(d.pid(n) != p and _ppid(d.pid(n)) == os.getpid() for n, p in forked.items()), 30,
                 "the engines restarted as fresh processes")

        def back() -> bool:
            st = stats(d.address, cfg)
            return st.get("engines_alive") == 3 and all(st.get(f"{n}.pid") == d.pid(n) for n in forked)

        wait_for(back, 60, "the restarted engines registered")
        assert d.forkserver_pid is None and d.forked == 3
        assert tokens_of(replay(d.address, agents, cfg)) == ref
        assert stats(d.address, cfg).get("failed", 0) == 0
