"""Report, policy parsing, run config and the sim-to-real scenario of ``dualpath run`` (fast, no cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpath.errors import ConfigError, WorkloadError
from dualpath.runtime.app import parse_policies
from dualpath.runtime.calibrate import ComputeProfileFit, _nnls
from dualpath.runtime.defaults import DEFAULT_POLICIES, load_run_config
from dualpath.runtime.report import comparison, format_report, order_policies, report_json
from dualpath.runtime.runner import largest_turn, policy_config
from dualpath.runtime.sim2real import is_run_config, predict, scenario_from_run_config
from dualpath.runtime.workload import BUILTIN_NAME, check_trajectories, load_trajectories
from dualpath.storage.config import FaultsStorageConfig, MemoryStorageConfig
from dualpath.workload.trajectory import Trajectory, Turn


def test_policy_order_follows_the_ladder_then_oracle() -> None:
    assert parse_policies(None) == DEFAULT_POLICIES == ["pe_only", "dualpath"]
    assert parse_policies(["oracle,dualpath", "basic"]) == ["basic", "dualpath", "oracle"]
    assert parse_policies(["ladder"]) == ["basic", "layerwise", "round_robin", "dualpath", "split", "oracle"]
    assert order_policies(["dualpath", "pe_only"]) == ["pe_only", "dualpath"]
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        parse_policies(["dualpath,nope"])


def _run(thr: float, tpot: float, **kw: object) -> dict:
    return {"throughput_tok_s": thr, "tpot_p50_s": tpot, "jct_s": 100 / thr, "complete": True, **kw}


def test_speedup_ceiling_and_json() -> None:
    runs = {"dualpath": _run(180.0, 0.041), "pe_only": _run(100.0, 0.040), "basic": _run(90.0, 0.040)}
    cmp = comparison(runs, 1, 2)
    assert cmp["ceiling"] == 3.0
    assert cmp["speedup"] == pytest.approx(1.8) and cmp["speedup_of"] == "dualpath/pe_only"
    assert cmp["efficiency"] == pytest.approx(0.6)
    assert cmp["tpot_p50_ratio"] == pytest.approx(1.025)
    assert cmp["speedup_vs_basic"] == pytest.approx(2.0)
    doc = report_json(runs, 1, 2, wall_s=3.0)
    assert [r["policy"] for r in doc["runs"]] == ["basic", "dualpath", "pe_only"]
    assert doc["speedup"] == pytest.approx(1.8) and doc["ceiling"] == 3.0 and doc["wall_s"] == 3.0
    text = format_report(runs, 1, 2)
    assert "1.80x" in text and "(1+2)/1 = 3.00x" in text and "60% of the ceiling" in text
    # a partial run is shown but never used for the speed-up
    runs["dualpath"]["complete"] = False
    assert comparison(runs, 1, 2)["speedup"] is None
    assert "dualpath (partial)" in format_report(runs, 1, 2)


def test_run_config_layers_default_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = load_run_config(None)
    assert base.workload.dataset == BUILTIN_NAME and base.model.kind == "synthetic"
    assert base.cluster.snic_gbps is not None and base.cluster.cnic_gbps is not None
    assert base.cluster.cnic_gbps >= 4 * base.cluster.snic_gbps  # the CNIC is never the bottleneck
    f = tmp_path / "c.yaml"
    f.write_text("cluster: {decode_nodes: 2}\n")
    monkeypatch.setenv("DUALPATH_CLUSTER__SNIC_GBPS", "0.5")
    cfg = load_run_config(str(f))
    assert cfg.cluster.decode_nodes == 2 and cfg.cluster.snic_gbps == 0.5
    assert cfg.model.n_layers == base.model.n_layers  # untouched keys keep the embedded default
    assert is_run_config(str(f))


def test_policy_config_toggles() -> None:
    base = load_run_config(None)
    assert policy_config(base, "basic", None).scheduler.layerwise is False
    ora = policy_config(base, "oracle", None)
    assert ora.cluster.snic_gbps is None and ora.cluster.cnic_gbps is None
    assert policy_config(base, "dualpath", Path("/x")).storage.root == Path("/x")  # type: ignore[union-attr]
    assert base.cluster.snic_gbps is not None  # the base is not modified
    # a store a faults wrapper holds (however deep) gets the policy's root too: it was shared by every policy and
    # every run (the second policy found the first one's blocks: hit rate 98 % against 38 %)
    inner = {"kind": "faults", "inner": {"kind": "posix", "root": "/kv"}}
    wrapped = base.model_copy(update={"storage": FaultsStorageConfig.model_validate({"kind": "faults", "inner": inner})})
    got = policy_config(wrapped, "dualpath", Path("/x")).storage
    assert got.inner.inner.root == Path("/x")  # type: ignore[union-attr]
    assert wrapped.storage.inner.inner.root == Path("/kv")  # type: ignore[union-attr]
    assert policy_config(base.model_copy(update={"storage": MemoryStorageConfig()}), "basic", Path("/x")).storage \
        == MemoryStorageConfig()


def test_each_policy_of_a_faults_wrapped_posix_store_starts_empty(tmp_path: Path) -> None:
    """``examples/zmq-faults.yaml``'s shape: both policies read and write the same bytes, nothing is left."""
    from dualpath.cli import main

    root = tmp_path / "kv"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workload: {{n_agents: 2, max_turns: 3}}\ncluster: {{snic_gbps: 2, cnic_gbps: 16}}\n"
                   f"storage: {{kind: faults, inner: {{kind: posix, root: {root}}}}}\n")
    out = tmp_path / "r.json"
    assert main(["run", "--config", str(cfg), "--policy", "pe_only,dualpath", "--quiet", "--json", str(out)]) == 0
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["pe_only"]["hit_rate"] == runs["dualpath"]["hit_rate"] < 0.9, runs
    assert runs["pe_only"]["real_storage_written_bytes"] == runs["dualpath"]["real_storage_written_bytes"] > 0
    assert list(root.iterdir()) == []


def test_a_folder_trace_runs_as_the_docs_say(tmp_path: Path) -> None:
    """``dualpath run --trace DIR`` refused a folder ("trace file not found") that ``trace stats`` reads."""
    from dualpath.workload.config import WorkloadConfig

    shards = tmp_path / "shards"
    shards.mkdir()
    src = Path(__file__).parents[1] / "data" / "trajectories_small.jsonl"
    (shards / "part-0.jsonl").write_text(src.read_text())
    trajs = load_trajectories(WorkloadConfig(trace=str(shards)))
    assert len(trajs) == len(load_trajectories(WorkloadConfig(trace=str(src)))) > 0
    with pytest.raises(WorkloadError, match="trace file not found"):
        load_trajectories(WorkloadConfig(trace=str(tmp_path / "nowhere")))


def test_builtin_trace_fits_the_default_model_and_cluster() -> None:
    cfg = load_run_config(None)
    trajs = load_trajectories(cfg.workload)
    assert len(trajs) == cfg.workload.n_agents
    check_trajectories(trajs, cfg.workload, max_context=cfg.model.max_context, vocab_size=cfg.model.vocab_size)
    prompt, gen = largest_turn(trajs)
    assert prompt + gen <= cfg.cluster.kv_pool_tokens
    with pytest.raises(WorkloadError, match="context of 1000 tokens"):
        check_trajectories(trajs, cfg.workload, max_context=1000, vocab_size=cfg.model.vocab_size)
    bad = [Trajectory(0, [Turn(3, 1, [1, 2, 99])])]
    with pytest.raises(WorkloadError, match="vocabulary"):
        check_trajectories(bad, cfg.workload, max_context=100, vocab_size=50)


def test_nnls_and_profile() -> None:
    import numpy as np

    a = np.array([[1.0, x] for x in (1, 2, 3, 4)])
    assert _nnls(a, 2 + 0.5 * a[:, 1]) == pytest.approx([2.0, 0.5])
    assert _nnls(a, 5 - 0.1 * a[:, 1])[1] == 0.0  # a negative slope is not supported by the model
    p = ComputeProfileFit(0.01, 1e-5, 0.0, 0.04, 0.001, flops_rate=1e12, linear_flops=1e9,
                          attn_flops_key_layer=0.0, n_layers=2)
    assert p.prefill_time([(0, 100)]) == pytest.approx(0.01 + 1e-3 + 100 * 1e9 / 1e12)
    assert p.decode_step(4) == pytest.approx(0.044) and p.decode_step(0) == 0.0


def test_sim_scenario_from_run_config_uses_the_same_numbers() -> None:
    cfg = load_run_config(None)
    cfg.workload.n_agents = 3
    trajs = load_trajectories(cfg.workload)
    prof = ComputeProfileFit(0.01, 2e-5, 0.0, 0.04, 0.0003, flops_rate=1e14, linear_flops=2e9,
                             attn_flops_key_layer=2048.0, n_layers=4)
    sc = scenario_from_run_config(cfg, trajs, prof)
    c = cfg.cluster
    assert (sc.P, sc.D, sc.gpus_per_node) == (c.prefill_nodes, c.decode_nodes, c.engines_per_node)
    assert sc.snic_bw == pytest.approx(c.snic_gbps * 1e9) and sc.cnic_bw == pytest.approx(c.cnic_gbps * 1e9)
    assert sc.kv_bytes_per_token == 4 * 2 * 1 * 32 * 2 and sc.de_kv_tokens == c.kv_pool_tokens
    assert len(sc.trajectories) == 3
    pred = predict(cfg, ["pe_only", "dualpath"], prof, trajs)
    assert pred["pe_only"]["all_done"] and pred["dualpath"]["all_done"]
    assert pred["pe_only"]["bytes_read_de_path"] == 0 and pred["dualpath"]["bytes_read_de_path"] > 0


def test_simulate_with_a_run_config_takes_its_trace_and_refuses_scenario_flags(tmp_path: Path, capsys) -> None:
    """``dualpath simulate --config RUN_CONFIG``: the workload flags apply (a trace replaces the config's generator);
    the flags of the simulator's own scenarios are refused by name instead of being ignored."""
    from dualpath.cli import main

    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text("model: {kind: synthetic, n_layers: 2}\ncluster: {prefill_nodes: 1, decode_nodes: 1}\n"
                       "workload: {dataset: tiny, n_agents: 2}\n")
    trace = tmp_path / "mooncake.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 1000 * i, "input_length": 300, "output_length": 4,
                                         "hash_ids": [0, 1, 2 + i]}) + "\n" for i in range(5)))
    # (the compute profile is calibrated on this machine: a few seconds)
    assert main(["simulate", "--config", str(run_cfg), "--trace", str(trace), "--trace-format", "mooncake",
                 "--max-requests", "4", "--policy", "pe_only"]) == 0
    assert "4 agents, 4 turns" in capsys.readouterr().out
    assert main(["simulate", "--config", str(run_cfg), "--preset", "tiny", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "--preset, --plot: not with --config" in err
