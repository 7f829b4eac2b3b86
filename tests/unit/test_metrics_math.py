"""Metrics math on hand-made inputs with known answers, JSON export and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dualpath.errors import DualPathError
from dualpath.metrics import LinkSeries, MetricsRecorder, RequestRecord, percentiles, storage_balance
from dualpath.metrics.plots import plot_jct_bars, plot_link_utilisation


def rec(rid: int, tid: int, t0: float, t1: float, t2: float, t3: float, gen: int = 6, **kw) -> RequestRecord:  # type: ignore[no-untyped-def]
    base = {
        "prompt_tokens": 1000,
        "hit_tokens": 640,
        "path": "pe",
        "pe": 0,
        "de": 0,
        "bytes_pe_path": 640,
        "bytes_de_path": 0,
    }
    base.update(kw)
    return RequestRecord(rid, tid, 0, gen_tokens=gen, t_submit=t0, t_first_token=t1, t_second_token=t2, t_done=t3,
                         **base)  # fmt: skip


def test_request_latencies() -> None:
    r = rec(0, 0, 1.0, 3.0, 3.5, 5.5, gen=6)
    assert (r.ttft, r.ttst, r.tpot, r.jct) == (2.0, 0.5, 0.5, 4.5)
    short = rec(1, 0, 0.0, 1.0, 1.2, 1.2, gen=2)
    assert short.tpot is None and short.ttst == pytest.approx(0.2)
    pending = RequestRecord(2, 0, 0, 10, 0, 5, "de", 0, 0, t_submit=0.0)
    assert pending.ttft is None and pending.jct is None and pending.ttst is None


def test_percentiles_known() -> None:
    p = percentiles([4.0, 1.0, None, 3.0, 2.0])
    assert p["n"] == 4 and p["mean"] == 2.5 and p["p50"] == 2.5
    assert p["p90"] == pytest.approx(3.7) and p["p99"] == pytest.approx(3.97)
    assert percentiles([])["p99"] is None


def test_summary_figures() -> None:
    m = MetricsRecorder("x")
    m.add_request(rec(0, 0, 0.0, 1.0, 1.5, 3.0))
    m.add_request(rec(1, 0, 3.0, 4.0, 4.5, 8.0, path="de", bytes_pe_path=0, bytes_de_path=640))
    m.add_request(rec(2, 1, 0.0, 2.0, 2.5, 4.0, hit_tokens=0, bytes_pe_path=0))
    m.add_request(RequestRecord(3, 2, 0, 10, 0, 5, "pe", 0, 0, t_submit=1.0))  # never finished
    s = m.summary()
    assert s["n_requests"] == 4 and s["n_done"] == 3
    assert s["jct_s"] == 8.0
    assert s["trajectory_jct_s"]["n"] == 2 and s["trajectory_jct_s"]["mean"] == pytest.approx((8.0 + 4.0) / 2)
    assert s["throughput"]["tokens_per_s"] == pytest.approx((3000 + 18) / 8.0)
    assert s["hit_rate"] == {"rate": pytest.approx(1280 / 3000), "hit_tokens": 1280, "prompt_tokens": 3000}
    assert s["bytes"] == {"pe_path": 640, "de_path": 640}
    assert s["paths"] == {"pe": 2, "de": 1}
    assert s["ttft_s"]["mean"] == pytest.approx((1 + 1 + 2) / 3)
    assert s["links"] == {} and s["snic_balance"] is None


def test_link_window_bytes_interpolates() -> None:
    s = LinkSeries("a", "snic")
    s.add(0.0, 0.0)
    s.add(2.0, 200.0)
    assert list(s.window_bytes(np.array([0.0, 1.0, 2.0, 3.0]))) == [100.0, 100.0, 0.0]
    with pytest.raises(DualPathError):
        s.add(1.0, 300.0)
    with pytest.raises(DualPathError):
        s.add(3.0, 100.0)


def _two_snics() -> MetricsRecorder:
    m = MetricsRecorder()
    m.add_link_timeline("snic0", "snic", [0.0, 1.0, 2.0], [100.0, 100.0], capacity_bytes_per_s=200.0)
    for t, c in [(0.0, 0.0), (1.0, 300.0), (2.0, 400.0)]:
        m.record_link("snic1", "snic", t, c, capacity_bytes_per_s=400.0)
    m.record_link("cnic0", "cnic_out", 0.0, 0.0)
    m.record_link("cnic0", "cnic_out", 2.0, 50.0)
    return m


def test_storage_balance_known() -> None:
    m = _two_snics()
    # window 0: max 300 / mean 200 = 1.5; window 1: 100 / 100 = 1.0
    assert storage_balance(m.snics(), 1.0) == pytest.approx(1.25)
    assert storage_balance(m.snics(), 1.0, min_fraction=0.6) == pytest.approx(1.5)
    assert storage_balance(m.snics(), 2.0) == pytest.approx(400 / 300)
    s = m.summary(window_s=1.0)
    assert s["snic_balance"] == pytest.approx(1.25)
    assert s["links"]["snic0"]["mean_util"] == pytest.approx(0.5)
    assert s["links"]["snic1"]["timeline"]["util"] == pytest.approx([0.75, 0.25])
    assert s["links"]["cnic0"]["timeline"]["util"] is None
    assert s["links"]["cnic0"]["timeline"]["bytes_per_s"] == pytest.approx([25.0, 25.0])
    with pytest.raises(DualPathError, match="kind"):
        m.record_link("x", "nic", 0.0, 0.0)
    with pytest.raises(DualPathError):
        m.record_link("snic0", "cnic_in", 3.0, 500.0)


def test_json_and_plots(tmp_path: Path) -> None:
    m = _two_snics()
    m.add_request(rec(0, 0, 0.0, 1.0, 1.5, 2.0))
    out = tmp_path / "m.json"
    text = m.to_json(out)
    doc = json.loads(out.read_text())
    assert doc == json.loads(text) and doc["requests"][0]["ttft"] == 1.0 and "snic0" in doc["links"]
    other = MetricsRecorder()
    other.add_link_timeline("snic0", "snic", [0.0, 1.0, 2.0], [150.0, 150.0])
    png = tmp_path / "links.png"
    plot_link_utilisation({"dualpath": m, "basic": other.summary()}, png)
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = tmp_path / "jct.png"
    plot_jct_bars({"basic": 10.0, "dualpath": m, "oracle": 1.0}, bars, baseline="basic")
    assert bars.stat().st_size > 1000 and bars.read_bytes()[:4] == b"\x89PNG"
