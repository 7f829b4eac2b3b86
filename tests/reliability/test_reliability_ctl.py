"""``dualpath ctl``: the operator's commands against a real deployment (scheduler + 1 prefill + 1 decode engine
process, no CURVE: the operator token of ``<workdir>/control.token``).

* ``stats`` prints the scheduler's counters as JSON; ``cancel --session N`` ends that session's turn of another
  client at once; ``drain`` makes the scheduler refuse new turns; ``stop`` shuts the deployment down: the
  launcher does not restart the scheduler or the engines, every process exits.
* A wrong token, no token, or no scheduler at the address: one line naming the problem, exit code 2, no
  traceback, and the deployment is untouched.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from serve_util import deployment, free_port, pid_alive, scheduler_loaded_torch, stats, tiny_config

from dualpath.cli import main
from dualpath.control.channel import RemoteError
from dualpath.control.client import ServeClient
from dualpath.control.deploy import create_tokens

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ctl")
    cfg = tiny_config(tmp / "kv", model={"decode_step_s": 0.02})
    with deployment(cfg, tmp / "work") as d:
        yield d, cfg


def _ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    rc = main(["ctl", *argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, [ln for ln in cap.err.strip().splitlines() if ln.strip()]


def test_ctl_fails_clearly(dep, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d, cfg = dep
    wrong = tmp_path / "wrong.token"
    create_tokens(wrong)  # a well-formed token file of another deployment
    for action in ("drain", "stop"):
        rc, _out, err = _ctl(capsys, action, "--connect", d.address, "--token-file", str(wrong))
        assert rc == 2 and len(err) == 1 and "unauthorized" in err[0] and "operator" in err[0], err
    rc, _out, err = _ctl(capsys, "drain", "--connect", d.address)  # no token at all
    assert rc == 2 and len(err) == 1 and "--token-file" in err[0], err
    t0 = time.monotonic()
    rc, _out, err = _ctl(capsys, "stats", "--connect", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1")
    assert rc == 2 and len(err) == 1 and "no handshake" in err[0], err
    assert time.monotonic() - t0 < 10
    st = stats(d.address, cfg)
    assert st["draining"] == 0 and st["engines_alive"] == 2 and st["refused_messages"] == 2
    assert all(d.alive().values())


def test_ctl_stats_cancel_drain_stop(dep, capsys: pytest.CaptureFixture[str]) -> None:
    d, cfg = dep
    token = ["--connect", d.address, "--token-file", str(d.config.serve.token_file)]
    rc, out, _err = _ctl(capsys, "stats", "--connect", d.address)
    assert rc == 0 and json.loads(out)["engines_alive"] == 2
    # the deployment's own config.json says port 0: the port bound is read from scheduler.addr beside it
    assert json.loads((d.workdir / "config.json").read_text())["serve"]["port"] == 0
    rc, out, _err = _ctl(capsys, "stats", "--config", str(d.workdir / "config.json"))
    assert rc == 0 and json.loads(out)["engines_alive"] == 2
    assert not scheduler_loaded_torch(d)  # (a cold restart does not pay for its import either)
    # cancel: another client's long turn of session 77 ends at once, explicitly
    got: dict[str, Any] = {}

    async def long_turn() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            await c.run_turn(77, list(range(1, 40)), 4000)

    def _run() -> None:
        try:
            anyio.run(long_turn)
        except BaseException as exc:
            got["err"] = exc

    th = threading.Thread(target=_run, daemon=True)
    th.start()
    t_end = time.monotonic() + 30
    while stats(d.address, cfg).get("inflight", 0) < 1:
        assert time.monotonic() < t_end, "the turn never started"
        time.sleep(0.05)
    rc, out, err = _ctl(capsys, "cancel", "--session", "77", *token)
    assert rc == 0 and "cancelled 1 turn" in out, (out, err)
    th.join(timeout=15)
    assert not th.is_alive() and isinstance(got.get("err"), RemoteError) and "cancelled by the operator" in str(got["err"])
    # drain: new turns are refused
    rc, out, _err = _ctl(capsys, "drain", *token)
    assert rc == 0 and "draining" in out

    async def submit() -> None:
        async with ServeClient.from_config(d.address, cfg) as c:
            await c.run_turn(78, [1, 2, 3], 2, deadline_s=5.0)

    with pytest.raises(RemoteError, match="draining"):
        anyio.run(submit)
    # stop: every process exits and the launcher restarts none of them
    pids = [c.pid for c in d.children.values()]
    restarts = d.restarts
    rc, out, _err = _ctl(capsys, "stop", *token)
    assert rc == 0 and "shutting down" in out
    t_end = time.monotonic() + 20
    while any(pid_alive(p) for p in pids) or not d.shut_down:
        assert time.monotonic() < t_end, f"still running after stop: {d.alive()}, shut_down={d.shut_down}"
        time.sleep(0.1)
    time.sleep(0.5)  # (a restart would show up here)
    assert d.restarts == restarts and not any(d.alive().values())
