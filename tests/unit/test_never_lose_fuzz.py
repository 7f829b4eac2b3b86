"""``benchmarks/never_lose_fuzz.py``: its trace shapes are what its docstring says, and a short run summarises."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import never_lose_fuzz  # noqa: E402


def test_trace_shapes():
    rng = random.Random(3)
    noreuse = never_lose_fuzz.trace(rng, "noreuse", 40, 100)
    ids = [i for r in noreuse for i in r["hash_ids"]]
    assert len(ids) == len(set(ids))  # nothing shared
    assert all(0 < r["input_length"] <= 512 * len(r["hash_ids"]) for r in noreuse)
    burst = never_lose_fuzz.trace(rng, "burst", 40, 100)
    assert {r["timestamp"] for r in burst} == {0}
    deep = never_lose_fuzz.trace(rng, "deep", 60, 100)
    grown = sum(any(p["hash_ids"] == r["hash_ids"][: len(p["hash_ids"])] for p in deep[:i]) for i, r in enumerate(deep))
    assert grown >= 30  # most requests continue an earlier one's session, its blocks a prefix of theirs
    assert all(len(r["hash_ids"]) <= 120 for r in deep)
    assert all(500 <= r["output_length"] <= 4000 for r in never_lose_fuzz.trace(rng, "longout", 20, 100))
    times = [r["timestamp"] for r in never_lose_fuzz.trace(rng, "mooncake", 30, 100)]
    assert times == sorted(times) and times[-1] > 0


def test_a_short_run_writes_its_summary(tmp_path):
    out = tmp_path / "fuzz.json"
    assert never_lose_fuzz.main(["--runs", "3", "--seed", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3 and data["summary"]["all"]["runs"] == 3
    for row in data["rows"]:
        assert row["ratio"] == row["basic_jct_s"] / row["dualpath_jct_s"] > 0
    ratios = [row["ratio"] for row in data["rows"]]
    summary = data["summary"]["all"]
    assert summary["min"] == round(min(ratios), 3) and summary["below_0.99"] == sum(r < 0.99 for r in ratios)
    for key in ("shape", "requests", "preset", "mode"):  # (each grouping covers every run once)
        assert sum(d["runs"] for d in data["summary"][f"by_{key}"].values()) == 3
