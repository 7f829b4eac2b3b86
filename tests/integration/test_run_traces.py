"""``dualpath run`` on a Mooncake trace: every request served once, cross-session reuse reaches storage, the
header says what was kept and what the cluster was sized to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpath.cli import main

SHARED = Path(__file__).parent.parent / "data" / "mooncake_shared.jsonl"

CFG = """
model: {kind: synthetic, n_layers: 2, n_kv_heads: 1, head_dim: 16, decode_step_s: 0.002, vocab_size: 1024,
        max_context: 1024, device_tflops: 1000.0}
cluster: {snic_gbps: 50MB/s, cnic_gbps: 400MB/s, block_tokens: 64}
workload: {n_agents: 24}
"""


def test_mooncake_trace_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CFG + f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    out = tmp_path / "r.json"
    rc = main(["run", "--config", str(cfg), "--trace", str(SHARED), "--trace-format", "mooncake", "--policy",
               "dualpath", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    # the model's context (1024) was raised to the largest turn (2564 + 4 tokens), not refused
    assert "4 of 4 requests (every request)" in text and "model context 2624" in text
    run = json.loads(out.read_text())["runs"][0]
    assert run["turns"] == 4 and run["agents"] == 3  # not replayed into 24 agents
    # offline every session starts at t = 0 (A, B and C together: nothing stored yet); A's follow-up hits its own
    # session's 2048 tokens
    assert run["hit_rate"] >= 2048 / 7248 - 1e-9


def test_online_trace_reuses_content_across_sessions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CFG + f"storage: {{kind: posix, root: {tmp_path / 'kv'}}}\n")
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 2048, "output_length": 4, "hash_ids": [1, 2, 3, 4]}\n'
                     '{"timestamp": 1500, "input_length": 1100, "output_length": 4, "hash_ids": [1, 2, 6]}\n')
    out = tmp_path / "r.json"
    rc = main(["run", "--config", str(cfg), "--trace", str(trace), "--trace-format", "mooncake", "--mode", "online",
               "--policy", "dualpath", "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    run = json.loads(out.read_text())["runs"][0]
    # two sessions; the second, sent at its timestamp (1.5 s, after the first finished), hits the first one's
    # two shared 512-token blocks: 1024 of 3148 prompt tokens
    assert run["agents"] == 2 and run["jct_s"] >= 1.5
    assert run["hit_rate"] == pytest.approx(1024 / 3148)
