"""The deployment ranks prefill engines by predicted work, as the in-process runtime does (dualpath.engine.work): a
PE's hello carries its work model, its heartbeats its work, and the scheduler adds what it sent since. The real
scheduler daemon runs in this process; engines are raw control channels (message by message, no processes)."""

from __future__ import annotations

import secrets
from pathlib import Path

import anyio
import pytest
from test_reliability_roles import _beat, _cfg, _Engine, _hello, _scheduler

from dualpath.control.channel import RemoteError
from dualpath.control.deploy import create_tokens
from dualpath.engine.work import PrefillWork
from dualpath.scheduler.state import RequestInfo

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MODEL = PrefillWork(b=1e-6, g=0.0, e=1e-10, d=1e-11, n_layers=4, hit_s_per_token=0.0)


async def test_a_pe_reports_its_work_and_the_driver_predicts_with_its_model(tmp_path: Path) -> None:
    tokens = create_tokens(tmp_path / "control.token")
    cfg = _cfg(tmp_path, token_file=str(tmp_path / "control.token"))
    async with _scheduler(cfg) as d:
        sched = d.driver.scheduler
        assert sched.pe_work is not None  # dualpath: ranked by work
        req = RequestInfo(0, context=900, append=100, hit=900, gen=1)
        assert sched.pe_work(req) == req.tokens  # no PE has sent a model yet: tokens, as the snapshots say
        pe = _Engine(d.channel.address, b"pe0." + secrets.token_hex(4).encode())
        async with pe.ch:
            bad = {**MODEL.to_wire(), "e": -1.0}
            with pytest.raises(RemoteError, match="hello from pe0: work model: e must be a finite number"):
                await pe.ch.request(None, "hello", _hello(token=tokens["engine"], work_model=bad), 5)
            assert "pe0" not in d.engines
            w = await pe.ch.request(None, "hello", _hello(token=tokens["engine"], work_model=MODEL.to_wire()), 5)
            assert d.engines["pe0"].work_model == MODEL
            assert sched.pe_work(req) == MODEL.work(900, 100)
            await pe.ch.notify(None, "heartbeat", {**_beat(w.body["epoch"]), "tok": 5000, "work": 1234})
            with anyio.fail_after(5):
                while d.engines["pe0"].hb.get("work") != 1234:
                    await anyio.sleep(0.01)
            (snap,), _ = d.cluster.snapshots()
            assert (snap.tok, snap.work) == (0, 1234)  # (tok: the scheduler's own count)
            rec = d.engines["pe0"]
            rec.assigned_work[7] = (rec.hb_time + 0.001, 500)  # sent after the last heartbeat: counted
            rec.assigned_work[8] = (rec.hb_time - 0.001, 900)  # before it: the heartbeat has it
            (snap,), _ = d.cluster.snapshots()
            assert snap.work == 1234 + 500


async def test_without_work_ranking_nothing_is_predicted(tmp_path: Path) -> None:
    tokens = create_tokens(tmp_path / "control.token")
    cfg = _cfg(tmp_path, token_file=str(tmp_path / "control.token"))
    cfg.scheduler.work_ranking = False
    async with _scheduler(cfg) as d:
        assert d.driver.scheduler.pe_work is None
        pe = _Engine(d.channel.address, b"pe0." + secrets.token_hex(4).encode())
        async with pe.ch:
            w = await pe.ch.request(None, "hello", _hello(token=tokens["engine"], work_model=MODEL.to_wire()), 5)
            await pe.ch.notify(None, "heartbeat", {**_beat(w.body["epoch"]), "work": 1234})
            await anyio.sleep(0.2)
            (snap,), _ = d.cluster.snapshots()
            assert snap.work == -1  # ranked by tokens
