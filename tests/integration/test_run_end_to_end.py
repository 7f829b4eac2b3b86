"""``dualpath run`` end to end on a tiny emulated cluster: real engines, real files, two policies, JSON, plot;
bad input refused before anything runs; Ctrl-C stops cleanly with the partial table."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from dualpath.cli import main
from dualpath.runtime.defaults import load_run_config
from dualpath.runtime.runner import PolicyRun, run_policy
from dualpath.runtime.workload import load_trajectories

TINY = """
model: {kind: synthetic, n_layers: 2, n_kv_heads: 1, head_dim: 16, decode_step_s: 0.002, vocab_size: 1024,
        max_context: 4096, device_tflops: 1000.0}
cluster: {snic_gbps: 0.004, cnic_gbps: 0.04, kv_pool_tokens: 16384, host_buffer_bytes: 8388608}
workload: {dataset: tiny, n_agents: 4}
"""


def _cfg(tmp_path: Path, text: str = TINY) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(text + f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    return p


@pytest.mark.slow
def test_two_policies_end_to_end_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    rc = main(["run", "--config", str(_cfg(tmp_path)), "--policy", "dualpath", "--policy", "pe_only",
               "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "speed-up dualpath/pe_only" in text and "ceiling (P+D)/P" in text
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["pe_only", "dualpath"]  # report order, not argument order
    assert doc["ceiling"] == 2.0
    pe, dp = doc["runs"]
    assert doc["speedup"] == pytest.approx(dp["throughput_tok_s"] / pe["throughput_tok_s"])
    total_turns = sum(t.n_turns for t in load_trajectories(load_run_config(str(_cfg(tmp_path))).workload))
    for r in doc["runs"]:
        assert r["complete"] and r["turns"] == total_turns
        assert 0 < r["hit_rate"] < 1
        assert r["ttft_p50_s"] > 0 and r["tpot_p50_s"] > 0
        # every byte read from storage went through exactly one node's storage NIC
        snic = r["link_bytes"]["pnode0.snic.read"] + r["link_bytes"]["dnode0.snic.read"]
        assert snic == r["pe_path_bytes"] + r["de_path_bytes"] > 0
    assert pe["de_path_bytes"] == 0 and pe["paths"] == {"pe": total_turns}
    assert dp["de_path_bytes"] > 0 and dp["paths"].get("de", 0) > 0
    # both policies read the same hit KV (same trace, same cold storage)
    assert pe["pe_path_bytes"] == dp["pe_path_bytes"] + dp["de_path_bytes"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any((tmp_path / "kv").iterdir())  # per-policy storage removed


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("content", "fmt", "where", "what"),
    [
        ('{"id": 0, "turns": [{"append": 10, "gen": 2}]}\n{"id": 1, "turns": [oops\n', "jsonl", ":2:", "JSON"),
        ("", "jsonl", ":1:", "empty trace"),
        # (a turn longer than the synthetic model's context is no error: the emulated cluster is sized to the trace)
        ('{"id": 0, "turns": [{"append": 10, "gen": 2}]}\n\n{"id": 7, "turns": [{"append": 2, "gen": 2, '
         '"ids": [1, 99999]}]}\n', "jsonl", ":3:", "vocabulary"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
         '{"timestamp": 5, "input_length": 9000, "output_length": 2, "hash_ids": 2}\n', "mooncake", ":2:",
         "hash_ids"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]}\n', "mooncake", ":1:", "output_length"),
    ],
)
def test_bad_trace_errors_name_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fmt: str, where: str, what: str
) -> None:
    trace = _write(tmp_path, f"trace.{fmt}", content)
    rc = main(["run", "--config", str(_cfg(tmp_path)), "--trace", str(trace), "--trace-format", fmt, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{trace}{where}" in err and what in err


def test_cluster_that_cannot_hold_a_request_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path, TINY.replace("kv_pool_tokens: 16384", "kv_pool_tokens: 256"))
    out = tmp_path / "run.json"
    rc = main(["run", "--config", str(cfg), "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert "cannot hold the largest turn" in captured.err and "kv_pool_tokens" in captured.err
    assert "turns" not in captured.err.replace("largest turn", "")  # no progress line: nothing ran
    assert not out.exists()


def test_unknown_policy_and_bad_config_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(_cfg(tmp_path)), "--policy", "fastest"]) == 2
    assert "unknown policy 'fastest'" in capsys.readouterr().err
    bad = _write(tmp_path, "bad.yaml", "cluster: {prefill_nodez: 2}\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "cluster.prefill_nodez: unknown key" in capsys.readouterr().err


def test_cancelled_policy_run_keeps_finished_turns_and_leaves_no_tasks(tmp_path: Path) -> None:
    cfg = load_run_config(str(_cfg(tmp_path)))
    cfg.cluster.snic_gbps = 0.00002  # slow: the run cannot finish within the timeout
    trajs = load_trajectories(cfg.workload)
    run = PolicyRun("dualpath")
    leftover: list[asyncio.Task] = []

    async def go() -> None:
        with anyio.move_on_after(2.0):
            await run_policy(cfg, "dualpath", trajs, run)
        me = asyncio.current_task()
        leftover.extend(t for t in asyncio.all_tasks() if t is not me)

    anyio.run(go)
    assert leftover == []
    assert not run.complete
    assert 0 < len(run.records) < sum(t.n_turns for t in trajs)
    assert not any((tmp_path / "kv").iterdir())


@pytest.mark.slow
def test_ctrl_c_prints_partial_table(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, TINY.replace("snic_gbps: 0.004", "snic_gbps: 0.00002"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualpath.cli", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "turns" not in seen and time.monotonic() < deadline:  # wait for the first progress update
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, seen + err)
    assert "interrupted" in out and "(partial)" in out
    assert "turns done" in out
    assert "Traceback" not in err


@pytest.mark.slow
def test_online_mode_and_capacity_search_on_the_real_cluster(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    total = sum(t.n_turns for t in load_trajectories(load_run_config(str(cfg)).workload))
    out = tmp_path / "online.json"
    assert main(["run", "--config", str(cfg), "--policy", "dualpath", "--mode", "online", "--rate", "8",
                 "--json", str(out), "--quiet"]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["complete"] and run["turns"] == total and isinstance(run["slo_met"], bool)
    # the SLO attainment: the share of turns meeting both bounds, printed per policy; met means >= 90 %
    assert 0.0 <= run["slo_attainment"] <= 1.0 and run["slo_met"] == (run["slo_attainment"] >= 0.9)
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("SLO attainment")]
    assert row and row[0].split()[-1] == f"{run['slo_attainment'] * 100:.0f}%"
    cap_out = tmp_path / "cap.json"
    assert main(["run", "--config", str(cfg), "--policy", "pe_only", "--capacity", "--rate", "4",
                 "--json", str(cap_out), "--quiet"]) == 0
    cap = json.loads(cap_out.read_text())["capacity"]["pe_only"]
    rates = [p["rate_aps"] for p in cap["points"]]
    assert rates[0] == 2.0 and len(rates) >= 2  # starts at rate/2, then probes higher
    ok = [p["rate_aps"] for p in cap["points"] if p["ok"]]
    assert cap["capacity_aps"] == (max(ok) if ok else 0.0)


@pytest.mark.slow
def test_ablation_ladder_report_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ladder.json"
    assert main(["run", "--config", str(_cfg(tmp_path)), "--policy", "ladder", "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["basic", "layerwise", "round_robin", "dualpath", "split", "oracle"]
    assert doc["speedup_vs_basic"] is not None and doc["speedup_of"] == "dualpath/basic"
    runs = {r["policy"]: r for r in doc["runs"]}
    assert runs["oracle"]["snic_util"]["pnode0"] is None  # unlimited links: no utilisation to show
    assert runs["basic"]["de_path_bytes"] == runs["layerwise"]["de_path_bytes"] == 0
    assert runs["round_robin"]["paths"]["pe"] > 0 and runs["round_robin"]["paths"]["de"] > 0
    text = capsys.readouterr().out
    # the table's column header (the line above its rule); the run header may name policies too
    lines = text.splitlines()
    head = next(lines[i - 1] for i, line in enumerate(lines) if line.startswith("-----"))
    assert head.split() == ["basic", "layerwise", "round_robin", "dualpath", "split", "oracle"]
