"""The trajectories a run replays, and the checks that must fail before anything runs.

Sources: the built-in CPU agentic trace (:data:`BUILTIN_SPEC`, the default of ``dualpath run``), any generator of
:mod:`dualpath.workload.generators`, our JSONL trajectories, or a Mooncake FAST'25 trace
(:func:`dualpath.workload.build_workload`). A trace that is empty, malformed, holds token ids outside the
model's vocabulary, or holds a turn longer than the model's context is an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dualpath.errors import WorkloadError
from dualpath.workload import build_workload
from dualpath.workload.arrivals import offline_arrivals, poisson_arrivals, with_arrivals
from dualpath.workload.config import WorkloadConfig
from dualpath.workload.csvtrace import resolve_format
from dualpath.workload.generators import DatasetSpec, generate_from_spec
from dualpath.workload.trajectory import Trajectory

#: the name of the built-in trace in ``workload.dataset``
BUILTIN_NAME = "agentic-cpu"

#: A CPU-sized agentic trace: ~12 turns per agent (10-16; a narrow spread, so all agents finish together and the
#: run's tail is short), sessions of 6.5-7.8K tokens, a task prompt of 15 % in the second turn, appends of ~600
#: tokens and short generations (~16 tokens): the shape of the paper's traces (Table 2: context >> append >>
#: generation) at 1/4 of the 32K dataset's length.
BUILTIN_SPEC = DatasetSpec(
    max_len=8192, turns_mu=math.log(12), turns_sigma=0.1, len_lo=0.8, len_hi=0.95, first_frac=0.15,
    gen_frac=0.03, synthetic_append=32,
)


def load_trajectories(cfg: WorkloadConfig) -> list[Trajectory]:
    """The trajectories ``cfg`` names (trace file, the built-in trace, or a named generator)."""
    if cfg.trace is None and cfg.dataset == BUILTIN_NAME:
        trajs = generate_from_spec(BUILTIN_SPEC, cfg.n_agents, seed=cfg.seed)
        if cfg.max_turns is not None:
            trajs = [t.truncated(None, cfg.max_turns) for t in trajs]
        arr = (
            offline_arrivals(len(trajs))
            if cfg.mode == "offline"
            else poisson_arrivals(len(trajs), cfg.rate_aps, seed=cfg.seed)
        )
        return with_arrivals(trajs, arr)
    if cfg.trace is not None and not Path(cfg.trace).exists():  # (a folder is one trace: its shards)
        raise WorkloadError("trace file not found", path=cfg.trace)
    trajs = build_workload(cfg)
    if not trajs or all(not t.turns for t in trajs):
        raise WorkloadError("the workload holds no turn", path=cfg.trace)
    return trajs


def _jsonl_lines(path: str) -> dict[int, int]:
    """Trajectory id -> line number of our JSONL file."""
    out: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for no, text in enumerate(f, start=1):
            if text.strip():
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("id"), int):
                    out.setdefault(obj["id"], no)
    return out


def _mooncake_line_over(path: str, max_context: int) -> int | None:
    """The first line of a Mooncake trace whose request (input + output) exceeds ``max_context``."""
    with open(path, encoding="utf-8") as f:
        for no, text in enumerate(f, start=1):
            if text.strip():
                try:
                    obj = json.loads(text)
                    if int(obj["input_length"]) + int(obj["output_length"]) > max_context:
                        return no
                except (ValueError, KeyError, TypeError):
                    continue
    return None


def check_trajectories(
    trajs: Sequence[Trajectory], cfg: WorkloadConfig, *, max_context: int, vocab_size: int
) -> None:
    """Every turn (prompt + generation) fits the model's context and its token ids its vocabulary.

    Errors name the trace file and the line of the offending trajectory (JSONL) or request (Mooncake).
    """
    lines: dict[int, int] | None = None

    def fail(t: Trajectory, msg: str, turn: int = 0) -> None:
        nonlocal lines
        path = cfg.trace
        line: int | None = None
        if path is not None and 0 <= turn < len(t.turns) and t.turns[turn].line is not None:
            line = t.turns[turn].line
        elif path is not None and resolve_format(path, cfg.trace_format) == "jsonl":
            lines = lines if lines is not None else _jsonl_lines(path)
            line = lines.get(t.tid)
        elif path is not None:
            line = _mooncake_line_over(path, max_context)
        raise WorkloadError(f"trajectory {t.tid}: {msg}", path=path or f"<{cfg.dataset} generator>", line=line)

    for t in trajs:
        total = 0
        for i, u in enumerate(t.turns):
            if u.append_ids and (min(u.append_ids) < 0 or max(u.append_ids) >= vocab_size):
                fail(t, f"turn {i} has token ids outside the model's vocabulary [0, {vocab_size})", i)
            total += u.append
            if total + max(1, u.gen) > max_context:
                fail(
                    t,
                    f"turn {i} needs {total} prompt + {max(1, u.gen)} generated tokens, more than the model's "
                    f"context of {max_context} tokens",
                    i,
                )
            total += u.gen


def fit_to_workload(cfg: Any, trajs: Sequence[Trajectory]) -> Any:
    """``cfg`` with an emulated cluster that holds a trace's largest turn (a copy when anything changes).

    Only the synthetic model is resized (it has no trained context): its ``max_context`` grows to the largest
    turn (prompt + generation), the PE scratch (``cluster.prefill_max_batch_tokens``) to the largest prompt, the
    DE KV pool (``cluster.kv_pool_tokens``) and the host buffers to hold it. Nothing shrinks. A real model keeps
    its context: a turn longer than it is an error naming the trace line (:func:`check_trajectories`).
    """
    from dualpath.workload.traces import largest_turn

    if cfg.model.kind != "synthetic" or cfg.workload.trace is None:  # generators: the config is the user's
        return cfg
    prompt, gen, _, _ = largest_turn(trajs)
    if prompt == 0:
        return cfg
    c, m = cfg.cluster, cfg.model
    bt = c.block_tokens
    need = -(-(prompt + gen) // bt) * bt
    from dualpath.kv.layout import KVSpec

    kv_bytes = (-(-prompt // bt) + 1) * bt * KVSpec.mha(m.n_layers, m.n_kv_heads, m.head_dim, m.kv_dtype).bytes_per_token
    grow = {
        ("model", "max_context"): need,
        ("cluster", "prefill_max_batch_tokens"): prompt,
        ("cluster", "kv_pool_tokens"): need + bt,
        ("cluster", "host_buffer_bytes"): 2 * kv_bytes,
    }
    if all(getattr(getattr(cfg, sec), key) >= v for (sec, key), v in grow.items()):
        return cfg
    cfg = cfg.model_copy(deep=True)
    for (sec, key), v in grow.items():
        part = getattr(cfg, sec)
        if getattr(part, key) < v:
            setattr(part, key, v)
    return cfg


def workload_source(cfg: Any, trajs: Sequence[Trajectory]) -> str:
    """The header's description of the workload: the generator, or the trace with what was kept of it, its ideal
    hit rate and the sizes its largest turn asked for."""
    from dualpath.workload.traces import ideal_hit_rate, largest_turn, load_trace

    w = cfg.workload
    if w.trace is None:
        return f"{w.dataset} generator"
    tw = load_trace(w.trace, w.trace_format, max_requests=w.max_requests, max_agents=w.max_agents, repeat=w.repeat,
                    time_scale=w.time_scale)
    prompt, gen, _, _ = largest_turn(trajs)
    sized = ""
    if cfg.model.kind == "synthetic":
        sized = (f"; largest turn {prompt}+{gen} tokens: model context {cfg.model.max_context}, PE scratch "
                 f"{cfg.cluster.prefill_max_batch_tokens} tokens, DE KV pool {cfg.cluster.kv_pool_tokens} tokens")
    timing = "at the trace's timestamps" if w.mode == "online" else "sessions from t=0, next turn when one ends"
    if w.mode == "online" and any(u.think for t in trajs for u in t.turns):
        timing += " and think times (a turn waits its delay after its session's previous turn ended)"
    return (f"trace {w.trace} ({tw.fmt}: {tw.note}; ideal hit rate {ideal_hit_rate(trajs):.3f} "
            f"(unlimited cache); {timing}{sized})")
