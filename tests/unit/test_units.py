"""Bandwidth units: GB/s everywhere, strings with a unit accepted (400Gbps = 50GB/s), clear errors."""

from __future__ import annotations

import pytest

from dualpath.cli import main
from dualpath.errors import ConfigError
from dualpath.units import fmt_gbs, parse_gbs


@pytest.mark.parametrize(
    ("text", "gbs"),
    [(50, 50.0), ("50", 50.0), ("50GB/s", 50.0), ("50 GBps", 50.0), ("400Gbps", 50.0), ("400 Gb/s", 50.0),
     ("400Gbit/s", 50.0), ("800MB/s", 0.8), ("6400Mbps", 0.8), ("1.6Tbps", 200.0), ("0.2TB/s", 200.0),
     ("10MB/s", 0.01), ("1e3MB/s", 1.0)],
)
def test_parse(text: object, gbs: float) -> None:
    assert parse_gbs(text) == pytest.approx(gbs)


def test_binary_prefix() -> None:
    assert parse_gbs("1GiB/s") == pytest.approx(2**30 / 1e9)


@pytest.mark.parametrize("bad", ["fast", "50G", "-5GB/s", "0", True, [50], "50 GB/h"])
def test_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="cluster.snic"):
        parse_gbs(bad, "cluster.snic_gbps")


def test_format() -> None:
    assert (fmt_gbs(50), fmt_gbs(0.01), fmt_gbs(None)) == ("50 GB/s", "10 MB/s", "unlimited")


def test_cluster_config_reads_units() -> None:
    from dualpath.cluster.config import ClusterConfig

    assert ClusterConfig(snic_gbps="400Gbps").snic_gbps == pytest.approx(50.0)
    assert ClusterConfig(cnic_bandwidth="80MB/s").cnic_gbps == pytest.approx(0.08)
    with pytest.raises(ValueError, match="cannot read 'fast'"):
        ClusterConfig(snic_gbps="fast")


def test_analyze_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "-B", "400Gbps"]) == 0
    bits = capsys.readouterr().out
    assert main(["analyze", "--cnic-bw", "50GB/s"]) == 0
    assert capsys.readouterr().out == bits and "B=50 GB/s" in bits and "(GB/s)" in bits
    assert main(["analyze", "--cnic-gbps", "50"]) == 0  # the old name still works, with a note
    io = capsys.readouterr()
    assert io.out == bits and "deprecated" in io.err
    assert main(["analyze", "-B", "50G"]) == 2
