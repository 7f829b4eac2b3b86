"""A prefill engine's predicted work (dualpath.engine.work): what DualPath ranks PEs by in the runtime and the
deployment. Checked against the synthetic model's own time (FLOPs over its rate, what its layers sleep) and by
hand-computed values; bad wire bodies are refused by field."""

from __future__ import annotations

import math

import pytest

from dualpath.cluster.config import ClusterConfig
from dualpath.engine.timemodel import LayerTimeModel
from dualpath.engine.work import PrefillWork
from dualpath.errors import SchedulerError
from dualpath.model.synthetic import SyntheticModel, SyntheticModelConfig
from dualpath.scheduler.state import RequestInfo


def test_the_synthetic_models_time_model_is_its_own_time() -> None:
    m = SyntheticModel(SyntheticModelConfig(n_layers=6, attn_flops_per_key_layer=3e5))
    tm = m.layer_time_model()
    for cached, new in [(0, 1), (0, 3000), (100, 37), (4096, 512), (30_000, 17)]:
        assert tm.prefill_s(cached, new) == pytest.approx(m.predict_prefill_s(cached, new), rel=1e-12)


def test_a_next_turn_costs_a_fraction_of_a_first_prompt_of_the_same_length() -> None:
    w = PrefillWork.from_time_model(SyntheticModel(SyntheticModelConfig()).layer_time_model())
    first = w(RequestInfo(0, context=0, append=40_000, hit=0, gen=1))
    nxt = w(RequestInfo(1, context=39_000, append=1_000, hit=39_000, gen=1))
    assert 0 < nxt < first / 10
    # the marginal cost: the forward's fixed cost is shared by a batch, so it is left out
    tm = LayerTimeModel(a=1e-3, b=2e-6, e=1e-10, d=5e-11, g=1e-9, n_layers=4)
    w2 = PrefillWork.from_time_model(tm)
    assert w2.seconds(100, 50) == pytest.approx(tm.prefill_s(100, 50) - 4 * 1e-3)
    assert w2.work(100, 50) == round((tm.prefill_s(100, 50) - 4e-3) * 1e6)
    assert w2.work(0, 0) == 1  # never free


def test_layerwise_work_is_at_least_the_hit_streaming_over_the_compute_nic() -> None:
    tm = LayerTimeModel(a=0.0, b=1e-7, e=0.0, d=0.0, n_layers=2)
    cc = ClusterConfig(cnic_gbps=2.0, layerwise=True)
    w = PrefillWork.for_engine(tm, cc, bytes_per_token=4000)
    assert w.hit_s_per_token == pytest.approx(4000 / 2e9)
    assert w.seconds(10_000, 10) == pytest.approx(10_000 * 4000 / 2e9)  # streaming bound
    assert w.seconds(0, 10) == pytest.approx(2 * 10 * 1e-7)  # nothing to stream: compute
    assert PrefillWork.for_engine(tm, ClusterConfig(cnic_gbps=2.0, layerwise=False), 4000).hit_s_per_token == 0
    assert PrefillWork.for_engine(tm, ClusterConfig(layerwise=True), 4000).hit_s_per_token == 0  # no rate


def test_the_work_model_crosses_the_wire_and_bad_bodies_name_the_field() -> None:
    w = PrefillWork(1e-7, 2e-9, 3e-11, 4e-12, 61, 5e-6)
    assert PrefillWork.from_wire(w.to_wire()) == w
    body = w.to_wire()
    with pytest.raises(SchedulerError, match="missing e"):
        PrefillWork.from_wire({k: v for k, v in body.items() if k != "e"})
    for field, bad in [("b", -1.0), ("d", math.nan), ("g", math.inf), ("e", True), ("hit_s_per_token", "1")]:
        with pytest.raises(SchedulerError, match=f"work model: {field} must be"):
            PrefillWork.from_wire({**body, field: bad})
    for bad in (0, 2.5):
        with pytest.raises(SchedulerError, match="n_layers must be an int >= 1"):
            PrefillWork.from_wire({**body, "n_layers": bad})
    with pytest.raises(SchedulerError, match="work_model must be a map"):
        PrefillWork.from_wire([1, 2])
