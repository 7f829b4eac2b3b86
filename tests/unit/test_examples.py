"""Every shipped example config loads (the run examples also over the embedded default of `dualpath run`)."""

from pathlib import Path

import pytest

from dualpath.config import load_config
from dualpath.runtime.defaults import load_run_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.*"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"1p2d-posix.yaml", "zmq-faults.yaml", "serve-1p1d.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path):
    cfg = load_config(path, env={})
    assert cfg.storage.kind in ("posix", "faults")
    if path.suffix in (".yaml", ".yml"):
        run_cfg = load_run_config(str(path))
        assert run_cfg.cluster.snic_gbps is not None
