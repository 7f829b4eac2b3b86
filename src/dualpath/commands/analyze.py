"""``dualpath analyze``: the bottleneck-free P/D range (paper eq. 9) and the per-link load table.

Units: ``--cnic-bw`` (``-B``) is the paper's B in **GB/s** (10^9 bytes/s) per direction, as in the paper's worked
example (B = 50 GB/s = 400 Gb/s); a unit may be given: ``-B 400Gbps`` is ``-B 50GB/s`` (:mod:`dualpath.units`).
``--dram-bw`` (``-M``) is M, likewise; ``--snic-per-node`` is s (storage bandwidth per node = s*B). The old names
``--cnic-gbps`` and ``--dram-gbs`` still work (GB/s) and print a deprecation note.
"""

from __future__ import annotations

import argparse

DEFAULT_PD = ["1/2", "1/1", "2/1"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus-per-node", "-g", type=str, default="8", help="g: GPUs (engines) per node (8)")
    parser.add_argument("--snic-per-node", "-s", type=str, default="1", help="s: storage bandwidth per node / B (1)")
    parser.add_argument("--cnic-bw", "-B", type=str, default=None,
                        help="B: compute NIC bandwidth per direction: 50GB/s (default), 400Gbps, or a number in GB/s")
    parser.add_argument("--dram-bw", "-M", type=str, default=None,
                        help="M: host memory bandwidth per node: 500GB/s (default), or a number in GB/s")
    parser.add_argument("--cnic-gbps", type=str, default=None, help=argparse.SUPPRESS)  # deprecated: --cnic-bw
    parser.add_argument("--dram-gbs", type=str, default=None, help=argparse.SUPPRESS)  # deprecated: --dram-bw
    parser.add_argument(
        "--pd", action="append", default=None, help="P/D to tabulate: 2/4, 2P4D or 0.5 (repeatable; default 1/2 1 2)"
    )
    parser.add_argument("--json", dest="json_out", help="write the range and the table as JSON here")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from dualpath.analysis import LINKS, Hardware, check_pd, link_loads, parse_pd, pd_range
    from dualpath.errors import ConfigError
    from dualpath.units import parse_gbs

    def bw(new: str | None, old: str | None, new_flag: str, old_flag: str, default: str) -> str:
        if old is not None:
            if new is not None:
                raise ConfigError(f"give {new_flag} or {old_flag}, not both")
            print(f"note: {old_flag} is deprecated (its number is GB/s, not Gb/s); use {new_flag} "
                  f"{old}GB/s or a unit such as 400Gbps", file=sys.stderr)
            new = old
        v = parse_gbs(new if new is not None else default, new_flag)
        return repr(v) if v != int(v) else str(int(v))

    hw = Hardware.of(args.gpus_per_node, args.snic_per_node,
                     bw(args.cnic_bw, args.cnic_gbps, "--cnic-bw", "--cnic-gbps", "50"),
                     bw(args.dram_bw, args.dram_gbs, "--dram-bw", "--dram-gbs", "500"))
    rng = pd_range(hw)
    print(f"g={hw.g} s={hw.s} B={hw.B} GB/s M={hw.M} GB/s")
    bounds = ", ".join(f"{k} {v}" for k, v in rng.upper_by.items())
    print(f"bottleneck-free P/D range: {rng}  (lower: pe_cnic_write {rng.lower}; upper: min of {bounds})")
    if rng.empty:
        print("warning: the range is empty: no P/D ratio is bottleneck-free", file=sys.stderr)
    if not rng.pe_cnic_read_ok:
        print("warning: pe_cnic_read saturates for every P/D (needs 2s <= g)", file=sys.stderr)
    if not rng.pe_dram_ok:
        print("warning: pe_dram saturates for every P/D (needs 2sB <= M)", file=sys.stderr)
    runs = []
    header = f"{'P/D':>8} " + " ".join(f"{k:>14}" for k in LINKS) + "   (GB/s)"
    print(header)
    for text in args.pd or DEFAULT_PD:
        p, d = parse_pd(text)
        loads = link_loads(p, d, hw)
        print(f"{str(p / d):>8} " + " ".join(f"{float(x.load):>14.3f}" for x in loads))
        warnings = check_pd(p, d, hw)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        runs.append(
            {
                "P": str(p),
                "D": str(d),
                "pd": str(p / d),
                "links": {
                    x.link: {"load_gbs": float(x.load), "capacity_gbs": float(x.capacity), "saturates": x.saturates}
                    for x in loads
                },
                "warnings": warnings,
            }
        )
    if args.json_out:
        out = {
            "hardware": {"g": str(hw.g), "s": str(hw.s), "B_gbs": str(hw.B), "M_gbs": str(hw.M)},
            "range": {
                "lower": str(rng.lower),
                "upper": str(rng.upper),
                "lower_float": float(rng.lower),
                "upper_float": float(rng.upper),
                "upper_by": {k: str(v) for k, v in rng.upper_by.items()},
            },
            "runs": runs,
        }
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0
