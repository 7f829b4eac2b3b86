"""The bottleneck-free analysis (paper eq. 9) and its per-link table, exactly."""

from __future__ import annotations

import json
from fractions import Fraction as F

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath.analysis import Hardware, check_pd, link_loads, parse_pd, pd_range, saturated_links
from dualpath.errors import ConfigError

PAPER = Hardware.of(8, 1, 50, 500)


def test_paper_range_is_exactly_one_seventh_to_seven_halves() -> None:
    r = pd_range(PAPER)
    assert (r.lower, r.upper) == (F(1, 7), F(7, 2))
    assert r.upper_by == {"de_cnic_read": F(6), "de_cnic_write": F(7, 2), "de_dram": F(7, 2)}
    assert str(r) == "[1/7, 7/2]"


@pytest.mark.parametrize(
    ("P", "D", "row"),
    [  # the digest's table (section 6), GB/s: PE read, PE write, DE read, DE write, DE DRAM, PE DRAM
        (2, 4, (12.5, 18.75, 15.625, 12.5, 200, 100)),
        (1, 1, (12.5, 12.5, 18.75, 18.75, 250, 100)),
        (2, 1, (12.5, 9.375, 25.0, 31.25, 350, 100)),
    ],
)
def test_per_link_table_matches_the_paper_digest(P: int, D: int, row: tuple[float, ...]) -> None:
    loads = link_loads(P, D, PAPER)
    assert [x.link for x in loads] == ["pe_cnic_read", "pe_cnic_write", "de_cnic_read", "de_cnic_write",
                                       "de_dram", "pe_dram"]
    assert tuple(x.load for x in loads) == tuple(F(str(v)) for v in row)
    assert not check_pd(P, D, PAPER)


def test_outside_the_range_names_the_saturating_link() -> None:
    assert [x.link for x in saturated_links(4, 1, PAPER)] == ["de_cnic_write", "de_dram"]
    (w,) = check_pd(1, 8, PAPER)
    assert "pe_cnic_write" in w and "[1/7, 7/2]" in w
    assert not check_pd(1, 7, PAPER) and not check_pd(7, 2, PAPER)  # the bounds themselves are fine


@settings(max_examples=60, deadline=None)
@given(g=st.integers(3, 16), s=st.integers(1, 2), b=st.integers(10, 100), m=st.integers(200, 1500))
def test_range_is_exactly_where_no_cnic_or_dram_saturates(g: int, s: int, b: int, m: int) -> None:
    if 2 * s > g or 2 * s * b > m:
        return
    hw = Hardware.of(g, s, b, m)
    r = pd_range(hw)
    if r.empty:
        return
    for ratio in {r.lower, r.upper, (r.lower + r.upper) / 2}:
        assert not saturated_links(ratio, 1, hw)
    assert saturated_links(r.lower * F(99, 100), 1, hw)
    assert saturated_links(r.upper * F(101, 100), 1, hw)


def test_parse_and_bad_input() -> None:
    assert parse_pd("2P4D") == (2, 4) and parse_pd("2/4") == (2, 4) and parse_pd("0.5") == (F(1, 2), 1)
    with pytest.raises(ConfigError):
        parse_pd("x")
    with pytest.raises(ConfigError):
        Hardware.of(8, 0, 50, 500)


def test_analyze_cli_json(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from dualpath.cli import main

    out = tmp_path / "a.json"
    assert main(["analyze", "--pd", "2P4D", "--pd", "4/1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["range"]["lower"] == "1/7" and data["range"]["upper"] == "7/2"
    assert [r["pd"] for r in data["runs"]] == ["1/2", "4"]
    assert data["runs"][0]["warnings"] == [] and "de_cnic_write" in data["runs"][1]["warnings"][0]
    captured = capsys.readouterr()
    assert "[1/7, 7/2]" in captured.out and "de_cnic_write" in captured.err
