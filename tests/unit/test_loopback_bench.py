"""``dualpath bench transport --backends loopback``: paired blocks of raw ``copy_`` and the full contract."""

from __future__ import annotations

import anyio
import pytest

from dualpath.commands.bench_transport import KiB, MiB, _loopback_block, bench_loopback


def test_block_size_bounds() -> None:
    assert _loopback_block(64 * KiB) == 64
    assert _loopback_block(1 * MiB) == 4
    assert _loopback_block(16 * MiB) == 1


def test_loopback_bench_reports_paired_ratios() -> None:
    runs = anyio.run(bench_loopback, [64 * KiB, 1 * MiB], 2, 4)
    assert [r["size_bytes"] for r in runs] == [64 * KiB, 1 * MiB]
    for r in runs:
        block = _loopback_block(r["size_bytes"])
        pairs = max(4, (4 * MiB // r["size_bytes"]) // block)
        assert r["block"] == block and r["messages"] == 2 * pairs * block
        assert r["baseline"] == "torch copy_" and r["window"] == 1
        assert 0 < r["ratio"] < 10 and r["gib_s"] > 0 and r["raw_gib_s"] > 0
        assert r["us_per_transfer"] == pytest.approx(r["size_bytes"] / (r["gib_s"] * 2**30) * 1e6, rel=0.02)
        assert len(r["gib_s_all"]) == len(r["raw_gib_s_all"]) == 2
