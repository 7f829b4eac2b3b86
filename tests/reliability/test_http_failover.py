"""``dualpath serve --http`` (process mode: scheduler + 1 prefill + 1 decode engine process) under the operator's
commands and scheduler failures, as an HTTP client sees it.

* The scheduler SIGKILLed, then SIGSTOPped, while a streamed completion is in flight: the stream ends with an
  OpenAI error event (``scheduler_unavailable``) within seconds, never at its deadline; ``/health`` says 503
  while no scheduler answers and 200 again after the launcher's takeover; new requests are served with the
  in-process cluster's tokens (the HTTP server's control client reconnects to the new scheduler); the official
  ``openai`` client, retrying on 503 as it does by default, gets its completion.
* ``dualpath ctl drain``: a new request gets 503 with ``Retry-After`` and an error object naming the drain,
  ``/health`` says ``draining``, the stream in flight still finishes with every token.
* ``dualpath ctl stop``: the HTTP server exits 0 with one line, and every process of the deployment is gone.
* A deployment that dies for good (``serve.scheduler_restart: false`` and the scheduler killed): the HTTP server
  exits 1 with one line naming it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_util import pid_alive, stop_process, survivors, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from http_failover import listener_pid  # noqa: E402

PROMPT = list(range(3, 60))


class HttpServe:
    """A ``dualpath serve --http`` process on a free port; always stopped (with its deployment) by ``close``."""

    def __init__(self, tmp: Path, **over: Any) -> None:
        cfg = tiny_config(tmp / "kv", model={"decode_step_s": 0.01}, **over)
        self.config = cfg
        cfg_file = tmp / "serve.json"
        cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        self.workdir = tmp / "work"
        self.out_path = tmp / "serve.out"
        addr = tmp / "http.addr"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg_file), "--http", "127.0.0.1:0",
             "--http-address-file", str(addr), "--workdir", str(self.workdir)],
            stdout=self._out, stderr=subprocess.STDOUT, env=env)
        t_end = time.monotonic() + 180
        while not addr.exists() and self.proc.poll() is None and time.monotonic() < t_end:
            time.sleep(0.1)
        if not addr.exists():
            self.close()
            pytest.fail(f"serve --http did not start:\n{self.output()[-3000:]}")
        self.url = addr.read_text().strip()
        self.scheduler = (self.workdir / "scheduler.addr").read_text().strip()
        self.token_file = self.workdir / "control.token"

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.out_path.read_text(errors="replace")

    def scheduler_pid(self) -> int:
        pid = listener_pid(int(self.scheduler.rsplit(":", 1)[1]), [self.proc.pid])
        assert pid is not None, "no process listens on the scheduler's port"
        return pid

    def engine_pids(self) -> list[int]:
        """Every engine's pid, from the scheduler's stats."""
        import anyio

        from dualpath.control.client import ServeClient

        async def main() -> list[int]:
            async with ServeClient(self.scheduler) as c:
                st = await c.stats()
            return [int(v) for k, v in st.items() if k.endswith(".pid")]

        return anyio.run(main)

    def close(self) -> None:
        stop_process(self.proc, signal.SIGTERM)
        self._out.close()


def _stream(url: str, out: dict[str, Any], first: threading.Event, max_tokens: int = 400) -> None:
    """A streamed completion in a thread: records its events, error event and duration."""
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=60) as cl, cl.stream(
                "POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                                                 "ignore_eos": True, "temperature": 0, "return_token_ids": True}) as r:
            out["status"] = r.status_code
            out["events"] = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out["events"].append(line[6:])
                    first.set()
    except Exception as exc:
        out["exception"] = repr(exc)
    finally:
        out["seconds"] = time.monotonic() - t0
        first.set()


def _post(url: str, out: dict[str, Any], max_tokens: int = 400) -> None:
    """A non-streamed completion in a thread: records its status, Retry-After and body."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, *PROMPT], "max_tokens": max_tokens,
                                                   "ignore_eos": True}, timeout=60)
    out.update(status=r.status_code, retry_after=r.headers.get("retry-after"), body=r.json())


def _stream_result(out: dict[str, Any]) -> tuple[list[int], dict[str, Any] | None]:
    """(token ids streamed, the error object of an error event or None); the stream must end with [DONE]."""
    ev = out["events"]
    assert ev and ev[-1] == "[DONE]", out
    toks: list[int] = []
    err = None
    for e in ev[:-1]:
        d = json.loads(e)
        if "error" in d:
            err = d["error"]
        else:
            toks += [t for c in d["choices"] for t in c.get("token_ids", [])]
    return toks, err


def _health_until(url: str, want: int, within: float) -> list[int]:
    """Poll /health until it answers ``want``; returns the codes seen (the last one is ``want``)."""
    seen: list[int] = []
    t_end = time.monotonic() + within
    while time.monotonic() < t_end:
        seen.append(httpx.get(f"{url}/health", timeout=10).status_code)
        if seen[-1] == want:
            return seen
        time.sleep(0.05)
    pytest.fail(f"/health never answered {want} within {within} s: {seen[-10:]}")


def reference(config: Any, prompt: list[int], gen: int) -> list[int]:
    """The in-process cluster's greedy tokens (memory storage, loopback transport, no decode delay)."""
    import anyio

    from dualpath.cluster import Cluster
    from dualpath.config import DualPathConfig

    data = config.model_dump(mode="python")
    data["storage"], data["transport"] = {"kind": "memory"}, {"kind": "loopback"}
    data["model"]["decode_step_s"] = 0.0

    async def main() -> list[int]:
        async with Cluster(DualPathConfig.model_validate(data)) as c:
            return list((await c.run_turn("ref", prompt, gen)).token_ids)

    return anyio.run(main)


def test_scheduler_failover_through_http(tmp_path: Path) -> None:
    import openai

    srv = HttpServe(tmp_path)
    try:
        ref = reference(srv.config, PROMPT, 400)  # (greedy, no end of sequence: 6 tokens are its first 6)
        body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
        with httpx.Client(base_url=srv.url, timeout=30) as cl:
            r = cl.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == ref[:6], r.text
            for sig in (signal.SIGKILL, signal.SIGSTOP):
                _health_until(srv.url, 200, 30)
                time.sleep(2.0)  # the launcher's next warm standby is importing
                out: dict[str, Any] = {}
                first = threading.Event()
                th = threading.Thread(target=_stream, args=(srv.url, out, first))
                th.start()
                plain: dict[str, Any] = {}  # and a non-streamed request in flight
                th2 = threading.Thread(target=_post, args=(srv.url, plain))
                th2.start()
                assert first.wait(30), out
                time.sleep(0.2)
                os.kill(srv.scheduler_pid(), sig)
                t0 = time.monotonic()
                th.join(20)  # the stream's deadline is 300 s (http.request_timeout_s): it must end long before
                th2.join(20)
                assert not th.is_alive() and not th2.is_alive(), f"a request in flight did not end after {sig!r}"
                assert plain["status"] == 503 and plain["retry_after"] == "1", plain
                assert plain["body"]["error"]["code"] == "scheduler_unavailable", plain
                toks, err = _stream_result(out)
                assert err is not None and err["code"] == "scheduler_unavailable", out
                assert 0 < len(toks) < 400 and toks == ref[: len(toks)]
                seen = _health_until(srv.url, 200, 30)
                assert 503 in seen, seen  # not ready while no scheduler answered
                # a request right after the takeover: served by the new scheduler, the same tokens
                r = cl.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == ref[:6], r.text
                assert time.monotonic() - t0 < 15, seen
            # the official client, retrying on 503 as it does by default, gets its answer across a kill
            os.kill(srv.scheduler_pid(), signal.SIGKILL)
            oc = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=6, timeout=30)
            got = oc.completions.create(model=oc.models.list().data[0].id, prompt=PROMPT, max_tokens=6,
                                        temperature=0, extra_body={"return_token_ids": True})
            assert got.choices[0].model_extra is not None and got.choices[0].model_extra["token_ids"] == ref[:6]
    finally:
        srv.close()
    assert srv.proc.returncode == 0, srv.output()[-2000:]


def test_drain_then_stop_through_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import openai

    from dualpath.cli import main as cli

    srv = HttpServe(tmp_path)
    pids: list[int] = []
    try:
        ref = reference(srv.config, PROMPT, 400)
        pids = [*srv.engine_pids(), srv.scheduler_pid()]
        out: dict[str, Any] = {}
        first = threading.Event()
        th = threading.Thread(target=_stream, args=(srv.url, out, first))
        th.start()
        assert first.wait(30), out
        op = ["--connect", srv.scheduler, "--token-file", str(srv.token_file)]
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        # the operator cancels a request in flight (the front's second session): its client gets a 499 naming the
        # operator, which the official client does not retry (a 503 it would retry, undoing the cancel)
        cut: dict[str, Any] = {}

        def cancelled_request() -> None:
            oc = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", timeout=30)  # (retries: 2, its default)
            try:
                cut["ok"] = oc.completions.create(model="synthetic", prompt=PROMPT, max_tokens=300,
                                                  extra_body={"ignore_eos": True})
            except openai.APIStatusError as exc:
                cut.update(status=exc.status_code, body=exc.body)

        th_cut = threading.Thread(target=cancelled_request)
        th_cut.start()
        capsys.readouterr()
        t_end = time.monotonic() + 20
        while True:
            assert cli(["ctl", "cancel", "--session", "2", *op]) == 0
            if "cancelled 1 turn" in capsys.readouterr().out:
                break
            assert time.monotonic() < t_end and th_cut.is_alive(), cut
            time.sleep(0.1)
        th_cut.join(30)
        assert cut.get("status") == 499, cut
        assert cut["body"]["code"] == "cancelled" and "the operator" in cut["body"]["message"], cut
        assert cli(["ctl", "drain", *op]) == 0
        # /health says so at once (the scheduler tells its clients), not at the front's next stats poll (1 s)
        t_end = time.monotonic() + 0.5
        while (h := httpx.get(f"{srv.url}/health", timeout=10)).json()["status"] != "draining":
            assert time.monotonic() < t_end, h.json()
            time.sleep(0.02)
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        err = r.json()["error"]
        assert err["code"] == "draining" and "drain" in err["message"], err
        oc = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as exc_info:
            oc.completions.create(model="synthetic", prompt=PROMPT, max_tokens=4)
        assert exc_info.value.status_code == 503
        t_end = time.monotonic() + 10
        while (h := httpx.get(f"{srv.url}/health", timeout=10)).json()["status"] != "draining":
            assert time.monotonic() < t_end, h.json()
            time.sleep(0.1)
        assert h.status_code == 503
        th.join(60)
        toks, err = _stream_result(out)
        assert err is None and toks == ref, out  # the stream in flight finished, every token
        # stop: the scheduler and engines exit, and so does the HTTP front (exit 0, one line)
        assert cli(["ctl", "stop", *op]) == 0
        srv.proc.wait(timeout=30)
    finally:
        srv.close()
    text = srv.output()
    assert srv.proc.returncode == 0, text[-2000:]
    assert "Traceback" not in text
    lines = text.splitlines()
    after = lines[next(i for i, ln in enumerate(lines) if "OpenAI-compatible API at" in ln) + 1:]
    assert len(after) == 1 and "stopped by the operator" in after[0], text[-2000:]  # one line, no traceback
    assert not survivors(pids), "processes outlived `dualpath ctl stop` of `serve --http`"


def test_http_front_exits_when_the_deployment_dies_for_good(tmp_path: Path) -> None:
    srv = HttpServe(tmp_path, serve={"scheduler_restart": False})
    try:
        pid = srv.scheduler_pid()
        os.kill(pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
    finally:
        srv.close()
    text = srv.output()
    assert srv.proc.returncode == 1, text[-2000:]
    lines = text.splitlines()
    after = lines[next(i for i, ln in enumerate(lines) if "OpenAI-compatible API at" in ln) + 1:]
    assert len(after) == 1 and "error" in after[0], text[-2000:]  # one line, no traceback
    assert "scheduler" in after[0] and "scheduler_restart" in after[0], after
    assert not pid_alive(pid)


def test_a_front_of_a_deployment_started_elsewhere_follows_its_operators_stop(tmp_path: Path) -> None:
    """``serve --http --scheduler ADDR`` fronts a deployment it did not start: it serves through it, and when the
    operator stops that deployment (``ctl stop``) the front exits 0 with one line. Before, it went on answering
    503 forever: the scheduler told its engines of the stop but not its clients."""
    from serve_util import deployment

    from dualpath.cli import main as cli

    cfg = tiny_config(tmp_path / "kv", model={"decode_step_s": 0.0})
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps(cfg.model_dump(mode="json")))
    addr_file = tmp_path / "http.addr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALPATH_")}
    with deployment(cfg, tmp_path / "work") as dep, open(tmp_path / "front.out", "wb") as out:
        scheduler = dep.address
        front = subprocess.Popen(
            [sys.executable, "-m", "dualpath.cli", "serve", "--config", str(cfg_file), "--http", "127.0.0.1:0",
             "--http-address-file", str(addr_file), "--scheduler", scheduler],
            stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            t_end = time.monotonic() + 120
            while not addr_file.exists() and front.poll() is None and time.monotonic() < t_end:
                time.sleep(0.1)
            assert addr_file.exists(), (tmp_path / "front.out").read_text()[-2000:]
            url = addr_file.read_text().strip()
            r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True},
                           timeout=60)
            assert r.status_code == 200, r.text
            _health_until(url, 200, 30)
            op = ["--connect", scheduler, "--token-file", str(tmp_path / "work" / "control.token")]
            assert cli(["ctl", "stop", *op]) == 0
            front.wait(timeout=30)
        finally:
            stop_process(front, signal.SIGTERM)
    text = (tmp_path / "front.out").read_text(errors="replace")
    assert front.returncode == 0, text[-2000:]
    assert "Traceback" not in text
    lines = text.splitlines()
    after = lines[next(i for i, ln in enumerate(lines) if "OpenAI-compatible API at" in ln) + 1:]
    assert len(after) == 1 and "stopped by its operator" in after[0], text[-2000:]
