"""``dualpath trace stats F [--trace-format auto|jsonl|mooncake|bailian|csv|sharegpt|weka] [--json OUT]``: the shape of a request trace.

Requests, sessions, input/output length distributions, the ideal hit rate (an unlimited content-keyed prefix
cache, :func:`dualpath.workload.traces.ideal_hit_rate`), the arrival rate and the largest turn (what a cluster
must hold). A bad file is a one-line error naming the file and line (exit 2).
"""

from __future__ import annotations

import argparse

from dualpath.workload.csvtrace import FORMATS as TRACE_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trace_cmd", metavar="SUBCOMMAND")
    st = sub.add_parser("stats", help="requests, sessions, lengths, ideal hit rate, arrival rate, largest turn")
    st.add_argument("file", help="the trace file")
    st.add_argument("--trace-format", choices=TRACE_FORMATS, default="auto",
                    help="auto (default: from the first line), jsonl (our trajectories), mooncake (timestamp, "
                         "input_length, output_length, hash_ids; also AIPerf's session_id, delay, text_input, messages), bailian (Qwen-Bailian sessions), csv (Azure / "
                         "BurstGPT columns), sharegpt (conversations, agent trajectories) or weka (kv-cache-tester Claude Code traces)")
    st.add_argument("--json", dest="json_out", metavar="OUT", help="also write the figures as JSON here")


def _row(name: str, d: dict[str, float]) -> str:
    return (f"  {name:22s} mean {d['mean']:9.1f}  p50 {d['p50']:8.0f}  p90 {d['p90']:8.0f}  p99 {d['p99']:8.0f}  "
            f"max {d['max']:8.0f}")


def run(args: argparse.Namespace) -> int:
    import json
    import math
    import sys

    if getattr(args, "trace_cmd", None) != "stats":
        print("usage: dualpath trace stats FILE [--trace-format auto|jsonl|mooncake|bailian|csv|sharegpt|weka] [--json OUT]", file=sys.stderr)
        return 2
    from dualpath.workload.traces import trace_stats

    s = trace_stats(args.file, args.trace_format)
    lt = s["largest_turn"]
    rate = s["arrival_rate_rps"]
    print(f"trace {s['path']} ({s['format']})")
    skipped = s.get("skipped_rows") or {}
    print(f"  requests               {s['requests']}"
          + "".join(f"; {n} {what} skipped" for what, n in (("with 0 input tokens", skipped.get("zero_input", 0)),
                                                              ("failed (0 response tokens)", skipped.get("failed", 0)))
                    if n))
    print(f"  sessions               {s['sessions']}")
    print(_row("turns per session", s["turns_per_session"]))
    print(_row("input tokens", s["input_tokens"]))
    print(_row("output tokens", s["output_tokens"]))
    print(f"  total tokens           {s['total_input_tokens']} in, {s['total_output_tokens']} out")
    across = s.get("content_keys", s["format"] == "mooncake")
    print(f"  ideal hit rate         {s['ideal_hit_rate']:.3f} (unlimited cache, content-keyed prefix reuse"
          f"{' across all requests' if across else ' within sessions'})")
    print(f"  span                   {s['span_s']:.1f} s; arrival rate "
          + (f"{rate:.3f} requests/s" if not math.isnan(rate) else "- (all at once)"))
    if "think_s" in s:
        d = s["think_s"]
        print(f"  {'think time (s)':22s} mean {d['mean']:9.2f}  p50 {d['p50']:8.2f}  p90 {d['p90']:8.2f}  p99 "
              f"{d['p99']:8.2f}  max {d['max']:8.2f}  ({s['think_turns']} turns wait this long after their previous)")
    where = f" (session {lt['session']}, turn {lt['turn']}" + (f", line {lt['line']})" if "line" in lt else ")")
    print(f"  largest turn           {lt['prompt']} prompt + {lt['gen']} generated = {lt['tokens']} tokens{where}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(s, f, indent=1)
    return 0
