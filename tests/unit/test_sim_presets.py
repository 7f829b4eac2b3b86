"""Presets: sourced values, the FLOP convention of presets.md 1.5, scenarios and the CLI's bad input."""

from __future__ import annotations

import dataclasses

import pytest

from dualpath.errors import ConfigError
from dualpath.sim.compute import RooflineCompute, curve_efficiency
from dualpath.sim.presets import BATCH_CURVE, GPUS, MODELS, NODES, SCENARIOS, get_scenario


def test_every_preset_value_has_a_source() -> None:
    for table in (MODELS, GPUS, NODES):
        for p in table.values():
            numeric = [f.name for f in dataclasses.fields(p)
                       if f.name not in ("name", "label", "sources", "compute_dtype", "include_indexer_kv")]
            assert set(numeric) <= set(p.sources), (p.name, set(numeric) - set(p.sources))
            assert all(p.sources[k].strip() for k in numeric)


def test_ds_v32_matches_the_worked_example() -> None:
    m = MODELS["ds_v32"]
    # presets.md 1.5: C = 32,721, n = 429 -> F = 140.8 GFLOP/token, cache-compute ratio 21.7 / 26.0 GB/PFLOP
    f = m.prefill_flops(32721, 429) / 429
    assert f == pytest.approx(140.8e9, rel=0.005)
    assert m.kv_bytes_per_token == 48068
    mla_only = dataclasses.replace(m, include_indexer_kv=False)
    assert mla_only.kv_bytes_per_token == 40016
    assert 32721 * 40016 / 1e9 / (429 * f / 1e15) == pytest.approx(21.7, abs=0.1)
    assert MODELS["qwen25_32b"].kv_bytes_per_token == 262144
    assert MODELS["ds27b"].kv_bytes_per_token == 21720


def test_compute_model() -> None:
    assert curve_efficiency(6000) == 1.0 and curve_efficiency(1e6) == 1.0
    xs = [50, 300, 1000, 1500, 2500, 3000, 5000]
    effs = [curve_efficiency(x) for x in xs]
    assert effs == sorted(effs) and effs[1] == pytest.approx(BATCH_CURVE[0][1])
    c = RooflineCompute(MODELS["ds_v32"], GPUS["h800"], n_pe_gpus=16, n_de_gpus=32)
    t = c.prefill_time([(32721, 429)] * 16)
    assert t == pytest.approx(16 * 429 * 140.8e9 / 350e12, rel=0.01)  # saturated batch at 350 TFLOPS
    assert c.de_free_hbm() > 0 and c.pe_free_hbm() > 0
    assert c.decode_step_time(4, 1e9, 1e12) > c.decode_step_time(1, 1e8, 1e11)


def test_unknown_preset_lists_the_presets(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as exc:
        get_scenario("nope")
    assert all(name in str(exc.value) for name in SCENARIOS)
    from dualpath.cli import main

    assert main(["simulate", "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "ds660b-2p4d-64k" in err


def test_simulate_cli_small_run(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from dualpath.cli import main

    out = tmp_path / "s.json"
    rc = main(["simulate", "--preset", "tiny", "--agents", "4", "--dataset", "small", "--policy", "basic",
               "--policy", "dualpath", "--json", str(out), "--P", "4", "--D", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["runs"]] == ["basic", "dualpath"]
    assert data["ceiling"] == pytest.approx(5 / 4) and set(data["speedup"]) == {"basic", "dualpath"}
    assert "outside the bottleneck-free range" in capsys.readouterr().err  # P/D = 4 saturates a DE link


def test_whatif_slowdowns_scale_prefill_quota_and_decode_times_exactly() -> None:
    """The what-if knobs (not presets) multiply every prefill, quota and decode time; 1 is the sourced roofline."""
    base = RooflineCompute(MODELS["ds_v32"], GPUS["h800"], n_pe_gpus=16, n_de_gpus=32)
    slow = RooflineCompute(MODELS["ds_v32"], GPUS["h800"], n_pe_gpus=16, n_de_gpus=32, prefill_slowdown=1.63,
                           decode_slowdown=2.93)
    chunks = [(32_000, 429), (10_000, 2_000)]
    assert slow.prefill_time(chunks) == pytest.approx(1.63 * base.prefill_time(chunks))
    assert slow.attention_time(32_000, 429) == pytest.approx(1.63 * base.attention_time(32_000, 429))
    kb, fl = base.decode_request_cost(33_000)
    assert slow.decode_step_time(24, 24 * kb, 24 * fl) == pytest.approx(2.93 * base.decode_step_time(24, 24 * kb, 24 * fl))
    with pytest.raises(ConfigError, match="slowdown"):
        RooflineCompute(MODELS["ds_v32"], GPUS["h800"], n_pe_gpus=16, n_de_gpus=32, decode_slowdown=0.0)


def test_pe_hbm_budget_first_principles() -> None:
    """The PE-HBM cap of full-block (non-layer-wise) prefill, from the sourced figures of presets.md (H800 80 GB,
    DS-V3.2 FP8 weights 17.97B replicated + 653.9B routed experts over EP16 = 2P, 8 GB activation reserve, 48,068 B
    of KV per token): 13.16 GB = 273,805 tokens, ~8 requests at the 64K dataset's mean context (32,721); layer-wise
    prefill holds one of the 61 layers, 61x more tokens. The scenario's cap is this budget."""
    from dualpath.sim.runner import scenario_from_preset

    c = RooflineCompute(MODELS["ds_v32"], GPUS["h800"], n_pe_gpus=16, n_de_gpus=32)
    b = c.pe_hbm_budget(context_tokens=32721)
    free = 80e9 - (17.97e9 + 653.9e9 / 16) - 8e9
    assert b["free"] == pytest.approx(free) and free == pytest.approx(13.161e9, rel=1e-4)
    assert b["kv_tokens"] == pytest.approx(free / 48068) and int(b["kv_tokens"]) == 273804
    assert b["kv_tokens_layerwise"] == pytest.approx(61 * free / 48068)
    assert 8.0 < b["requests"] < 8.5
    assert b["replicated_weights"] + b["expert_weights"] + b["activation_reserve"] + b["free"] == pytest.approx(80e9)
    sc = scenario_from_preset("ds660b-2p4d-64k", agents=8)
    assert sc.pe_hbm_kv_tokens == int(b["kv_tokens"])
