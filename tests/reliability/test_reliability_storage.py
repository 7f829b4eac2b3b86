"""Storage under real faults: writers SIGKILLed mid-write many times (no torn block ever reads back), a disk
that fills up under a running deployment (writes fail cleanly, turns still finish with the right tokens, no
torn block visible), and a slow storage link on one node (the scheduler moves reads to the other side)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from serve_util import deployment, reference_tokens, replay, stats, tiny_config, tokens_of, trace

from dualpath.storage import blockfile as bf

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_sigkill_during_writes_never_leaves_a_torn_block(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(HERE / "crash_writer.py"), str(tmp_path / "kv"), "25", "7"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["kills"] == 25
    assert res["files"] > 0 and res["read_ok"] == res["files"]
    assert res["torn_or_wrong_files"] == 0
    assert res["read_wrong"] == 0 and res["read_bad"] == 0


def _verify_files(root: Path) -> tuple[int, int]:
    """(block files, torn/corrupt ones) checked by raw I/O: full size and payload xxh3 equal to the header's."""
    n = bad = 0
    for f in root.glob("*/*/*.kvb"):
        n += 1
        data = f.read_bytes()
        if len(data) < bf.HEADER_SIZE + 8:
            bad += 1
            continue
        length = int.from_bytes(data[80:88], "little")
        csum = int.from_bytes(data[88:96], "little")
        payload = data[bf.HEADER_SIZE :]
        bad += int(len(payload) != length or xxhash.xxh3_64_intdigest(payload) != csum)
    return n, bad


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_under_a_running_deployment(tmp_path: Path, tiny_tmpfs: Path) -> None:
    cfg = tiny_config(tiny_tmpfs)
    agents = trace(n_agents=4, n_turns=3, append=60)
    ref = reference_tokens(cfg, agents)
    with deployment(cfg, tmp_path / "work") as d:
        res = replay(d.address, agents, cfg)
        st = stats(d.address, cfg)
    assert tokens_of(res) == ref and st.get("failed", 0) == 0
    n, bad = _verify_files(tiny_tmpfs)
    used = sum(f.stat().st_size for f in tiny_tmpfs.rglob("*") if f.is_file())
    assert n > 0 and bad == 0
    assert used <= 48 * 1024
    # the disk really filled: the trace's full blocks need more room than the disk has
    total_blocks = sum(a.total_tokens // 16 for a in agents)
    assert total_blocks * bf.file_size(2 * 16 * 32) > 48 * 1024


def test_slow_storage_link_moves_reads_to_the_other_side(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "kv", model={"decode_step_s": 0.01})
    agents = trace(n_agents=6, n_turns=4, append=64, gen=4)
    ref = reference_tokens(cfg, agents)
    slow = {"pe0": {"DUALPATH_CLUSTER__SNIC_GBPS": "0.00001"}}  # the prefill node's storage NIC: 10 kB/s
    with deployment(cfg, tmp_path / "work", engine_env=slow) as d:
        res = replay(d.address, agents, cfg)
        st = stats(d.address, cfg)
    assert tokens_of(res) == ref
    hits = [r for r in res.records if r.outcome.hit_tokens > 0]
    de_side = [r for r in hits if r.outcome.path == "de"]
    assert st["peak.pe0.read_q"] > 0, "the slow node's read queue never showed up in its heartbeats"
    # With symmetric links most reads go to the PE side (a tie goes there; 4 of 18 went to the DE in a check
    # run). Heartbeats make the scheduler's view of the queue a little stale, so the share moved varies from run
    # to run (9-12 of 18 seen); a third is well above the symmetric share and not timing-sensitive.
    assert 3 * len(de_side) >= len(hits), (len(de_side), len(hits), st)
    assert np.mean([r.outcome.hit_tokens for r in hits]) > 0
