"""The report of ``dualpath run``: one column per policy, the speed-up against the ceiling, the JSON document.

A run's figures are a flat dict (see :data:`ROWS` for the keys shown); the JSON document is
``{"runs": [...], "speedup": ..., "ceiling": ..., ...}`` (design.md section 7). Bytes appear twice on purpose:
``real_*`` is what the storage backend and the transports really moved; ``link_*`` is what was charged to the
emulated links (the time they took is modelled from the configured NIC rates). The compute NICs also carry
host-device copies, so ``link_cnic_bytes`` exceeds the transport's bytes.

* ``speedup`` = dualpath throughput / pe_only throughput (the same trace, the same cluster), or the best
  DualPath-family policy against the best PE-only one present; ``speedup_vs_basic`` the same against ``basic``.
* ``ceiling`` = (P + D) / P: with storage NICs the bottleneck, DualPath can use P + D storage NICs where the
  classic path uses P.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dualpath.scheduler.policies import ABLATION_LADDER

#: report order: the ablation ladder, the oracle bound, then the others
EXTRA_ORDER = ["oracle", "pe_only", "de_only"]


def order_policies(names: Sequence[str]) -> list[str]:
    """The ablation ladder order, then oracle, then every other name in the order given (no duplicates)."""
    seen: list[str] = []
    for n in [*ABLATION_LADDER, *EXTRA_ORDER]:
        if n in names and n not in seen:
            seen.append(n)
    for n in names:
        if n not in seen:
            seen.append(n)
    # pe_only is the classic-path baseline: show it first when it is there without basic
    if "pe_only" in seen and "basic" not in seen:
        seen.remove("pe_only")
        seen.insert(0, "pe_only")
    return seen


def ceiling(prefill_nodes: int, decode_nodes: int) -> float:
    """(P + D) / P: the storage bandwidth DualPath can use over what the PE read path alone can."""
    return (prefill_nodes + decode_nodes) / prefill_nodes


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def comparison(runs: Mapping[str, Mapping[str, Any]], prefill_nodes: int, decode_nodes: int) -> dict[str, Any]:
    """``speedup``, ``ceiling``, ``efficiency`` (speedup / ceiling), TPOT ratio and the same against basic."""
    def thr(name: str) -> float | None:
        r = runs.get(name)
        return None if r is None or not r.get("complete", True) else r.get("throughput_tok_s")

    base_name = next((n for n in ("pe_only", "basic", "layerwise") if thr(n) is not None), None)
    dual_name = next((n for n in ("dualpath", "split", "round_robin") if thr(n) is not None), None)
    ceil = ceiling(prefill_nodes, decode_nodes)
    out: dict[str, Any] = {"ceiling": ceil, "speedup": None, "speedup_of": None, "efficiency": None}
    if base_name and dual_name:
        sp = _ratio(thr(dual_name), thr(base_name))
        out["speedup"] = sp
        out["speedup_of"] = f"{dual_name}/{base_name}"
        out["efficiency"] = None if sp is None else sp / ceil
        out["tpot_p50_ratio"] = _ratio(runs[dual_name].get("tpot_p50_s"), runs[base_name].get("tpot_p50_s"))
    if "basic" in runs and dual_name:
        out["speedup_vs_basic"] = _ratio(thr(dual_name), thr("basic"))
    return out


def _f(fmt: str) -> Callable[[Any], str]:
    def show(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return format(v, fmt)

    return show


def _ms(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1e3:.1f} ms"


def _s(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f} s"


def _mb(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:,.0f} MB" if v >= 100e6 else f"{v / 1e6:.2f} MB"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.0f}%"


def _util(v: Any) -> str:
    if not v:
        return "-"
    # prefill nodes first; None = an unlimited link (no utilisation)
    items = sorted(v.items(), key=lambda kv: (not kv[0].startswith("p"), kv[0]))
    return " ".join(f"{k}:{'-' if x is None else format(x * 100, '.0f') + '%'}" for k, x in items)


#: (label, key, formatter) of each row of the table
ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("turns done", "turns", _f("d")),
    ("JCT", "jct_s", _s),
    ("throughput (tok/s)", "throughput_tok_s", _f(",.0f")),
    ("TTFT p50", "ttft_p50_s", _s),
    ("TTFT p99", "ttft_p99_s", _s),
    ("TTST p50", "ttst_p50_s", _ms),
    ("TTST p99", "ttst_p99_s", _ms),
    ("TPOT p50", "tpot_p50_s", _ms),
    ("TPOT p99", "tpot_p99_s", _ms),
    ("hit rate", "hit_rate", _pct),
    ("read on PE path", "pe_path_bytes", _mb),
    ("read on DE path", "de_path_bytes", _mb),
    ("storage read: real", "real_storage_read_bytes", _mb),
    ("storage read: SNIC links", "link_storage_read_bytes", _mb),
    ("storage written: real", "real_storage_written_bytes", _mb),
    ("transport: real", "real_transport_bytes", _mb),
    ("CNIC links (in+out)", "link_cnic_bytes", _mb),
    ("SNIC utilisation", "snic_util", _util),
    ("SNIC max/avg", "snic_balance", _f(".2f")),
    ("SLO attainment", "slo_attainment", _pct),  # online runs only: turns meeting the TTFT and TPOT SLOs
]
#: rows shown only when some run has the figure
OPTIONAL_ROWS = {"slo_attainment"}


def format_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """A text table: one row per figure, one column per policy (in report order)."""
    names = order_policies(list(runs))
    header = ["", *[n + ("" if runs[n].get("complete", True) else " (partial)") for n in names]]
    rows = [header]
    for label, key, fmt in ROWS:
        if key in OPTIONAL_ROWS and all(runs[n].get(key) is None for n in names):
            continue
        rows.append([label, *[fmt(runs[n].get(key)) for n in names]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(r) if i > 0]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(
    runs: Mapping[str, Mapping[str, Any]], prefill_nodes: int, decode_nodes: int, title: str = ""
) -> str:
    """The table and the speed-up line(s)."""
    cmp = comparison(runs, prefill_nodes, decode_nodes)
    out = [title] if title else []
    out.append(format_table(runs))
    ceil = cmp["ceiling"]
    if cmp["speedup"] is not None:
        out.append(
            f"speed-up {cmp['speedup_of']} (throughput): {cmp['speedup']:.2f}x; ceiling (P+D)/P = "
            f"({prefill_nodes}+{decode_nodes})/{prefill_nodes} = {ceil:.2f}x; "
            f"{cmp['efficiency'] * 100:.0f}% of the ceiling"
        )
        if cmp.get("tpot_p50_ratio") is not None:
            out.append(f"TPOT p50 {cmp['speedup_of']}: {cmp['tpot_p50_ratio']:.2f}")
    else:
        out.append(f"ceiling (P+D)/P = {ceil:.2f}x (run pe_only and dualpath to see the speed-up)")
    if cmp.get("speedup_vs_basic") is not None:
        out.append(f"speed-up against basic: {cmp['speedup_vs_basic']:.2f}x")
    return "\n".join(out)


def report_json(
    runs: Mapping[str, Mapping[str, Any]], prefill_nodes: int, decode_nodes: int, **extra: Any
) -> dict[str, Any]:
    """The ``--json`` document: ``runs`` in report order, ``speedup``, ``ceiling`` and the other ratios."""
    names = order_policies(list(runs))
    doc: dict[str, Any] = {"runs": [dict(runs[n], policy=n) for n in names]}
    doc.update(comparison(runs, prefill_nodes, decode_nodes))
    doc.update(extra)
    return doc
