"""Bad input ends in one clear line and exit code 2, never a traceback (issue 13, item 7). In process: every
case fails while the config, flags or trace are checked, before any cluster is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpath.cli import main


def _config(tmp_path: Path, data: dict) -> str:
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    return str(f)


def _yaml(tmp_path: Path, text: str) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return str(f)


def _check(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_infinite_bandwidth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _check(["run", "--config", _yaml(tmp_path, "cluster: {snic_gbps: .inf}\n"), "--agents", "1"], capsys,
           "cluster.snic_gbps", "finite")


def test_storage_root_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    cfg = _config(tmp_path, {"storage": {"kind": "posix", "root": str(tmp_path / "afile")}})
    _check(["run", "--config", cfg, "--agents", "1"], capsys, "storage.root", "not a directory")


def test_storage_root_under_proc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, {"storage": {"kind": "posix", "root": "/proc/self/kv"}})
    _check(["run", "--config", cfg, "--agents", "1"], capsys, "storage.root", "/proc")


def test_absurd_engines_per_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, {"cluster": {"engines_per_node": 100000}})
    _check(["run", "--config", cfg, "--agents", "1"], capsys, "cluster.engines_per_node")


def test_nan_rate(capsys: pytest.CaptureFixture[str]) -> None:
    _check(["run", "--rate", "nan", "--mode", "online", "--agents", "1"], capsys, "rate", "finite")


def test_empty_policy_list(capsys: pytest.CaptureFixture[str]) -> None:
    _check(["run", "--policy", ",", "--agents", "1"], capsys, "--policy")


def test_non_utf8_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"tid": 0, "turns": [[10, 2]]}\n\xff\xfe\n')
    _check(["run", "--trace", str(f), "--agents", "1"], capsys, "t.jsonl")


def test_deeply_nested_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    _check(["run", "--trace", str(f), "--agents", "1"], capsys, "t.jsonl")
