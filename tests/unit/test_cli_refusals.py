"""Command-line mistakes are refused up front, by the flag's name, with exit status 2: before a benchmark runs
its other parts, before a reproduction simulates anything, never as a traceback."""

from __future__ import annotations

import time

import pytest

from dualpath.cli import main


def test_a_control_plane_beyond_this_machine_without_curve_is_warned_about() -> None:
    from dualpath.config import load_config
    from dualpath.control.launcher import exposure_warning

    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert exposure_warning(load_config(serve={"host": host})) is None, host
    for host in ("0.0.0.0", "10.1.2.3", "::", "my-host.example"):
        w = exposure_warning(load_config(serve={"host": host}))
        assert w is not None and f"serve.host {host!r}" in w and "CURVE" in w, host


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "storage", "--blocks", "0"], "--blocks"),
    (["bench", "transport", "--backends", "zmq,rdma"], "--backends: unknown backend 'rdma'"),
    (["reproduce", "--quick", "--out", "{file}/sub"], "--out: cannot create"),
    (["simulate", "--preset", "tiny", "--seed", "-1"], "simulate: sim.seed: Input should be greater than or equal to 0"),
    (["bench", "serve", "--seed", "-1"], "--seed must be >= 0"),
    (["bench", "serve", "--root", "{file}"], "--root"),
    (["bench", "serve", "--root", ""], "--root ''"),
    (["bench", "storage", "--root", ""], "--root ''"),
    (["analyze", "--cnic-bw", "1e999"], "--cnic-bw: a bandwidth must be a finite number"),
    (["analyze", "--pd", "1e999"], "--pd: cannot parse"),
    (["analyze", "--pd", "0/2"], "--pd: P and D must be > 0"),
    (["serve", "--bind", "x", "--workdir", "{tmp}/w"], "cannot use control address 'x'"),  # (the scheduler's log)
    (["serve", "--workdir", "{file}/sub"], "--workdir {file}/sub: cannot create its logs folder there"),
    (["run", "--config", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML: line 2, column 1: expected ','"),
    (["run", "--mode", "online", "--rate", "nan"], "--rate must be a finite number > 0, got nan"),
    # (audit) results that could not be written were lost after the whole run, with a traceback
    (["run", "--json", "{tmp}"], "--json: {tmp} is a directory; give a file name"),
    (["run", "--plot", "{file}/sub/x.png"], "--plot: directory {file}/sub does not exist"),
    (["simulate", "--preset", "tiny", "--json", "{tmp}"], "--json: {tmp} is a directory"),
    (["trace", "stats", "tests/data/trajectories_small.jsonl", "--json", "{file}/x.json"], "--json: directory"),
    # conflicting flags: refused, not one of them silently dropped
    (["run", "--capacity", "--mode", "offline"], "--capacity searches the online arrival rate"),
    (["run", "--serve", "tcp://127.0.0.1:9", "--policy", "basic", "--sim"],
     "--serve replays the trace against a running deployment, which runs its own policy: --policy, --sim cannot"),
    # a decode node the model's weights fill (the sim's KV size went negative: "de_kv_tokens must be > 0")
    (["simulate", "--P", "1", "--D", "1"], "D = 1 decode node(s) (8 GPUs): ds_v32's weights take"),
    (["run", "--config", "{tmp}/dataset.yaml"], "workload.dataset: unknown dataset 'nosuch'; known: 32k, 48k, 64k, small, tiny, agentic-cpu"),
    (["run", "--config", "{tmp}/huge.yaml"], "cluster.host_buffer_bytes: Input should be less than or equal to"),
    (["run", "--config", "{tmp}/root.yaml"], "storage.root: cannot make the run's block directory under {file}/kv"),
])
def test_a_bad_flag_exits_2_naming_it_before_any_work(argv: list[str], message: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "broken.yaml").write_text("cluster: [1, 2\n")
    (tmp_path / "dataset.yaml").write_text("workload: {dataset: nosuch}\n")
    (tmp_path / "huge.yaml").write_text("cluster: {host_buffer_bytes: 100000000000000000000000000}\n")
    (tmp_path / "root.yaml").write_text(f"storage: {{kind: posix, root: {blocker}/kv}}\n")  # (under a file)
    t0 = time.perf_counter()
    rc = main([a.replace("{file}", str(blocker)).replace("{tmp}", str(tmp_path)) for a in argv])
    assert rc == 2
    err = capsys.readouterr().err
    message = message.replace("{file}", str(blocker)).replace("{tmp}", str(tmp_path))
    assert message in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 3  # (one line, maybe beside a usage line)
    assert time.perf_counter() - t0 < 30  # refused before the work (each of these runs for minutes otherwise)


@pytest.mark.parametrize("argv,owner", [
    (["run", "--bogus"], "dualpath run"),
    (["bench", "storage", "--x", "1"], "dualpath bench storage"),
    (["bench", "--zz"], "dualpath bench"),
    (["--zz"], "dualpath"),
])
def test_an_unknown_flag_is_named_by_the_command_it_was_given_to(argv: list[str], owner: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """``dualpath run --bogus`` prints ``run``'s usage and ``dualpath run: error: unrecognized arguments: --bogus``
    (argparse's top-level parser printed its own usage, which lists no flag of ``run``)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    extra = " ".join(a for a in argv if a.startswith("-") or a.isdigit())
    assert f"{owner}: error: unrecognized arguments: {extra}" in err
    assert err.startswith(f"usage: {owner} ")


def test_memory_a_config_field_sizes_is_refused_naming_the_field() -> None:
    """A host buffer or KV pool this machine cannot allocate was torch's or numpy's traceback, not the field."""
    import torch

    from dualpath.engine.base import allocating
    from dualpath.errors import ConfigError

    with (pytest.raises(ConfigError, match=r"^cluster.kv_pool_tokens: 123,456,789 tokens cannot be allocated here "
                                           r"\(Unable to allocate 1 PiB\); lower it$"),
          allocating("cluster.kv_pool_tokens", 123456789, "tokens")):
        raise MemoryError("Unable to allocate 1 PiB")
    with (pytest.raises(ConfigError, match="cluster.host_buffer_bytes: 1,000,000,000,000,000 bytes cannot be"),
          allocating("cluster.host_buffer_bytes", 10**15, "bytes")):
        torch.empty(10**15, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="a bug"), allocating("cluster.kv_pool_tokens", 1, "tokens"):
        raise RuntimeError("a bug")  # anything else is not the config's doing


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback() -> None:
    """``dualpath trace stats F | head -1``: a BrokenPipeError traceback after head had its line."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write fails (EPIPE)
    try:
        p = subprocess.run([sys.executable, "-m", "dualpath.cli", "trace", "stats", "tests/data/trajectories_small.jsonl"],
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
                           cwd=__file__.rsplit("/tests/", 1)[0])
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr

