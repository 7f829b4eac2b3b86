"""Faults injected for real into a running multi-process deployment (2 prefill + 2 decode engine processes):
SIGKILL of an engine process while turns are in flight, bytes flipped in stored block files, block files
that fail to read or hang. Every submitted turn must end with the in-process cluster's tokens."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serve_util import deployment, reference_tokens, replay, stats, tiny_config, tokens_of, trace, wait_for

from dualpath.storage.blockfile import HEADER_SIZE

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("rel")
    cfg = tiny_config(tmp / "kv", prefill_nodes=2, decode_nodes=2,
                      model={"decode_step_s": 0.02, "device_tflops": 0.3},
                      serve={"max_retries": 4, "restart_engines": True})
    with deployment(cfg, tmp / "work") as d:
        yield d, cfg, tmp / "kv"


_refs: dict[Any, Any] = {}


def _reference(cfg, agents) -> dict:
    key = tuple((a.tid, tuple((t.append, t.gen) for t in a.turns)) for a in agents)
    if key not in _refs:
        _refs[key] = reference_tokens(cfg, agents)
    return _refs[key]




def _kill_during_replay(d, cfg, agents, victim: str) -> tuple[Any, dict, dict]:
    out: dict[str, Any] = {}

    def _run() -> None:
        try:
            out["res"] = replay(d.address, agents, cfg)
        except BaseException as exc:  # reported by the main thread
            out["err"] = exc

    before = stats(d.address, cfg)
    th = threading.Thread(target=_run)
    th.start()
    wait_for(lambda: stats(d.address, cfg).get(f"{victim}.assigned", 0) >= 1, 60, f"{victim} holding turns")
    d.kill(victim)
    th.join(timeout=180)
    assert not th.is_alive(), "the replay never finished: some turn waits forever"
    if "err" in out:
        raise out["err"]
    return out["res"], before, stats(d.address, cfg)


@pytest.mark.parametrize("victim", ["de0", "pe1"])
def test_engine_killed_while_serving(dep, victim: str) -> None:
    d, cfg, _ = dep
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 4, 90, "all four engines alive")
    agents = trace(n_agents=8, n_turns=3, gen=8)
    ref = _reference(cfg, agents)
    old_pid = d.pid(victim)
    res, before, after = _kill_during_replay(d, cfg, agents, victim)
    assert len(res.records) == 24, "requests lost"
    assert tokens_of(res) == ref
    assert after.get("engine_deaths", 0) > before.get("engine_deaths", 0)
    assert after.get("retries", 0) > before.get("retries", 0), "the killed engine's turns were re-dispatched"
    assert after.get("failed", 0) == before.get("failed", 0)
    # the launcher restarts it; it registers again and serves
    wait_for(lambda: d.pid(victim) != old_pid, 30, "restart")
    wait_for(lambda: stats(d.address, cfg).get("engines_alive", 0) == 4, 90, f"{victim} back")
    more = trace(n_agents=4, n_turns=2, gen=8)
    res2 = replay(d.address, more, cfg)
    assert tokens_of(res2) == _reference(cfg, more)


def _block_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.kvb"))


def test_flipped_bytes_in_stored_blocks_are_never_served(dep) -> None:
    d, cfg, root = dep
    agents = trace(n_agents=3, n_turns=2, append=50)
    for a in agents:
        a.tid += 100
    ref = _reference(cfg, agents)
    assert tokens_of(replay(d.address, agents, cfg)) == ref  # persists the sessions' blocks
    files = _block_files(root)
    assert files
    for f in files:  # flip the first payload byte: the synthetic model's tokens depend on it
        with open(f, "r+b") as fh:
            fh.seek(HEADER_SIZE)
            b = fh.read(1)
            fh.seek(HEADER_SIZE)
            fh.write(bytes([b[0] ^ 0xFF]))
    res = replay(d.address, agents, cfg)  # same prompts: every hit block is now corrupt
    assert tokens_of(res) == ref
    first_turns = [r for r in res.records if r.turn == 0]
    assert all(r.outcome.hit_tokens == 0 for r in first_turns), "a corrupt block counted as a hit"


def _release_fifos(fifos: list[Path]) -> None:
    for f in fifos:  # a writer that closes at once: the blocked open() returns and the read comes up short
        try:
            fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass


@pytest.mark.slow
def test_failing_and_hanging_reads_are_recomputed(dep) -> None:
    """Half the blocks are directories, half FIFOs (which used to hang ``open()`` past the engines' read
    deadline). The posix backend opens only regular files (``O_NONBLOCK | O_NOFOLLOW``, then ``S_ISREG``), so
    both are FAILED at once and leave the index; either way the block is a miss and the turn is recomputed.
    The releaser stays as a safety net: were a read to hang again, it would be set free after the deadline."""
    d, cfg, root = dep
    agents = trace(n_agents=2, n_turns=2, append=50)
    for a in agents:
        a.tid += 200
    ref = _reference(cfg, agents)
    before = set(_block_files(root))
    assert tokens_of(replay(d.address, agents, cfg)) == ref
    new = sorted(set(_block_files(root)) - before)
    assert len(new) >= 4
    fifos = []
    for i, f in enumerate(new):
        f.unlink()
        if i % 2 == 0:
            f.mkdir()  # open() works, the read fails (EISDIR): an I/O error
        else:
            os.mkfifo(f)  # open() blocks until a writer comes: a read that never returns
            fifos.append(f)
    # Release the hung reads once they are past the read deadline, and keep releasing: a non-blocking writer
    # open fails (ENXIO) while no reader has the FIFO open yet, so one release can come before a slow reader.
    stop = threading.Event()

    def _releaser() -> None:
        if stop.wait(cfg.cluster.deadline_s + 1.0):
            return
        while not stop.wait(0.2):
            _release_fifos(fifos)

    releaser = threading.Thread(target=_releaser, daemon=True)
    releaser.start()
    try:
        res = replay(d.address, agents, cfg)
        assert tokens_of(res) == ref
        assert all(r.outcome.hit_tokens == 0 for r in res.records if r.turn == 0)
    finally:
        stop.set()
        releaser.join(5)
        _release_fifos(fifos)


@pytest.mark.nixl
def test_an_engine_killed_comes_back_over_nixl(tmp_path: Path) -> None:
    """The same over the ``nixl`` transport (2 prefill + 1 decode engine processes): the restarted prefill engine
    registers again and serves. Its NIXL agent keeps its name (pe1) at a new address; the decode engine holds
    the old incarnation's metadata, and NIXL refused the new one (NIXL_ERR_NOT_ALLOWED): the restarted engine
    failed its start, over and over, and turns sent to it failed. Found by ``benchmarks/deploy_model_fuzz.py``."""
    pytest.importorskip("nixl_cu12")
    cfg = tiny_config(tmp_path / "kv", prefill_nodes=2, decode_nodes=1, transport={"kind": "nixl"},
                      serve={"max_retries": 4, "restart_engines": True})
    with deployment(cfg, tmp_path / "work") as d:
        old_pid = d.pid("pe1")
        d.kill("pe1")
        new_pid = wait_for(lambda: d.pid("pe1") != old_pid and d.pid("pe1"), 30, "restart")

        def back() -> bool:
            st = stats(d.address, cfg)
            return st.get("pe1.pid") == new_pid and st.get("pe1.alive") == 1 and st.get("engines_alive") == 3

        wait_for(back, 90, "the restarted pe1 registered")
        time.sleep(2.0)  # (a restart that fails its start dies within this)
        assert d.children["pe1"].restarts == 1 and d.pid("pe1") == new_pid, "the restarted engine died again"
        assert back()
        agents = trace(n_agents=6, n_turns=2, gen=4)
        res = replay(d.address, agents, cfg)
        assert tokens_of(res) == _reference(cfg, agents)
        assert stats(d.address, cfg).get("failed", 0) == 0
