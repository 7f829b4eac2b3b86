"""Per-request records and their latency figures (paper section 9.1 metrics)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class RequestRecord:
    """One request (one turn of one trajectory) as measured by the runtime or the simulator.

    Times are seconds on one clock; ``None`` until reached. ``path`` is a :class:`~dualpath.types.PathKind`
    value. ``bytes_pe_path`` / ``bytes_de_path``: KV bytes read from storage on the PE / DE side.
    """

    rid: int
    tid: int
    turn: int
    prompt_tokens: int
    hit_tokens: int
    gen_tokens: int
    path: str
    pe: int
    de: int
    t_submit: float
    t_first_token: float | None = None
    t_second_token: float | None = None
    t_done: float | None = None
    #: the last token out (``t_done``, the request's end, may also wait for its blocks to be stored)
    t_last_token: float | None = None
    bytes_pe_path: int = 0
    bytes_de_path: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: submit to the first token (prefill, KV load and queueing included)."""
        return None if self.t_first_token is None else self.t_first_token - self.t_submit

    @property
    def ttst(self) -> float | None:
        """Time to second token, measured from the first (the PD hand-off plus one decode step), as the paper's
        TTST of 0.2 s against a TTFT of 1.7 s implies."""
        if self.t_first_token is None or self.t_second_token is None:
            return None
        return self.t_second_token - self.t_first_token

    @property
    def tpot(self) -> float | None:
        """Time per output token after the second: ``(t_last - t_second) / (gen - 2)``, to the last token
        (``t_last_token``, else ``t_done``); None below 3 tokens."""
        t_last = self.t_last_token if self.t_last_token is not None else self.t_done
        if self.t_second_token is None or t_last is None or self.gen_tokens < 3:
            return None
        return (t_last - self.t_second_token) / (self.gen_tokens - 2)

    @property
    def jct(self) -> float | None:
        """Submit to last token."""
        return None if self.t_done is None else self.t_done - self.t_submit

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ttft=self.ttft, ttst=self.ttst, tpot=self.tpot, jct=self.jct)
        return d


def percentiles(
    values: Iterable[float | None], qs: tuple[int, ...] = (50, 90, 99)
) -> dict[str, float | None]:
    """Mean and percentiles (numpy's linear interpolation) of the non-None values; all None when empty."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    out: dict[str, float | None] = {"n": float(arr.size)}
    if arr.size == 0:
        out["mean"] = None
        out.update({f"p{q}": None for q in qs})
        return out
    out["mean"] = float(arr.mean())
    out.update({f"p{q}": float(np.percentile(arr, q)) for q in qs})
    return out
