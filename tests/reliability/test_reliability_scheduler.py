"""The scheduler is not a single point of loss, and a stalled engine does not flap (issue 13, items 5-6). A real
deployment (scheduler + 1 prefill + 1 decode engine process):

* SIGKILL of the scheduler while turns are in flight: the client's turns fail explicitly with
  ``SchedulerLost`` (noticed from the dropped connection or missed heartbeats, not at the turn's deadline); the
  launcher restarts the scheduler on the same address; the engines register again with it (reporting the turns
  and blocks they hold); the same client configuration connects again and gets the reference tokens.
* SIGSTOP of an engine for several ``dead_after_s`` then SIGCONT: exactly one death declaration (epochs fence
  its stale heartbeats), it registers again under a new epoch and serves.
* ``dualpath run --serve`` against a scheduler that dies: one error line, exit 2, the finished turns' table.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serve_util import deployment, reference_tokens, replay, stats, tiny_config, tokens_of, trace, wait_for

from dualpath.control.client import SchedulerLost

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sched")
    cfg = tiny_config(tmp / "kv", model={"decode_step_s": 0.02},
                      serve={"heartbeat_s": 0.1, "dead_after_s": 0.6, "max_retries": 4})
    with deployment(cfg, tmp / "work") as d:
        yield d, cfg




def test_scheduler_killed_while_serving(dep) -> None:
    d, cfg = dep
    agents = trace(n_agents=4, n_turns=3, gen=24)
    ref = reference_tokens(cfg, agents)
    out: dict[str, Any] = {}

    def _run() -> None:
        try:
            out["res"] = replay(d.address, agents, cfg)
        except BaseException as exc:
            out["err"] = exc
            out["t_err"] = time.monotonic()

    old_pid = d.pid("scheduler")
    th = threading.Thread(target=_run)
    th.start()
    wait_for(lambda: stats(d.address, cfg).get("inflight", 0) >= 1, 60, "turns in flight")
    d.kill("scheduler", signal.SIGKILL)
    t_kill = time.monotonic()
    th.join(timeout=120)
    assert not th.is_alive(), "the client kept waiting on a dead scheduler"
    err = out.get("err")
    from dualpath.engine.request import unwrap

    assert err is not None and isinstance(unwrap(err), SchedulerLost), f"not an explicit loss: {err!r}"
    noticed = out["t_err"] - t_kill
    # the launcher restarts it; the engines register again; the same client config serves again
    wait_for(lambda: d.pid("scheduler") != old_pid, 30, "scheduler restart")
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 2, 30, "engines registered again")
    serving = time.monotonic() - t_kill
    st = stats(d.address, cfg)
    assert st.get("engines_recovered", 0) == 2, "the engines did not re-register from their earlier epoch"
    res = replay(d.address, agents, cfg)
    assert tokens_of(res) == ref
    print(f"\nscheduler SIGKILL: client noticed after {noticed:.2f} s ({noticed / cfg.serve.heartbeat_s:.1f} "
          f"heartbeats); serving again {serving:.2f} s after the kill")


def test_a_stalled_engine_is_declared_dead_once(dep) -> None:
    d, cfg = dep
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 2, 30, "both engines alive")
    before = stats(d.address, cfg)
    pid = d.pid("de0")
    d.kill("de0", signal.SIGSTOP)
    try:
        wait_for(lambda: stats(d.address, cfg).get("de0.alive", 1) == 0, 30, "de0 declared dead")
        time.sleep(3 * cfg.serve.dead_after_s)  # stays stopped for several more dead_after_s
    finally:
        d.kill("de0", signal.SIGCONT)
    wait_for(lambda: stats(d.address, cfg).get("de0.alive", 0) == 1, 30, "de0 registered again")
    time.sleep(3 * cfg.serve.dead_after_s)  # any flapping would show up here
    after = stats(d.address, cfg)
    assert d.pid("de0") == pid, "the stalled engine was restarted instead of re-registering"
    assert after["engine_deaths"] - before.get("engine_deaths", 0) == 1, "one stall, several declarations"
    assert after.get("de0.alive") == 1
    agents = trace(n_agents=2, n_turns=2)
    for a in agents:
        a.tid += 50
    assert tokens_of(replay(d.address, agents, cfg)) == reference_tokens(cfg, agents)


def test_run_serve_against_a_dying_scheduler_prints_one_line_and_the_partial_table(dep, tmp_path: Path,
                                                                                  capfd: pytest.CaptureFixture[str]
                                                                                  ) -> None:
    import json

    from dualpath.cli import main

    d, cfg = dep
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 2, 30, "both engines alive")
    conf = tmp_path / "client.json"
    conf.write_text(json.dumps({"model": cfg.model.model_dump(mode="json"),
                                "serve": {"heartbeat_s": 0.1, "request_deadline_s": 60.0}}))
    tr = tmp_path / "trace.jsonl"  # 6 sessions of 6 small turns: runs for more than the 3 s before the kill
    tr.write_text("".join(json.dumps({"id": a, "turns": [{"append": 40, "gen": 24}] * 6}) + "\n"
                          for a in range(6)))
    killer = threading.Timer(3.0, lambda: d.kill("scheduler", signal.SIGKILL))
    killer.start()
    try:
        rc = main(["run", "--serve", d.address, "--config", str(conf), "--mode", "offline", "--trace", str(tr)])
    finally:
        killer.cancel()
    cap = capfd.readouterr()
    err_lines = [ln for ln in cap.err.strip().splitlines() if ln.startswith("dualpath")]
    assert rc == 2, cap.err[-2000:]
    assert len(err_lines) == 1 and "scheduler" in err_lines[0], cap.err[-2000:]
    assert "Traceback" not in cap.err
    assert "(partial)" in cap.out
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 2, 30, "serving again")
