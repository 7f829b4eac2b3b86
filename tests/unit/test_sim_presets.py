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
