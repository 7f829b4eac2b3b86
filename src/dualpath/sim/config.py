"""``SimConfig``: the ``sim`` section of a config file for ``dualpath simulate --config FILE``.

Either a named ``preset`` (scenario) or ``model``/``gpu``/``node`` presets with ``P`` and ``D``; ``overrides``
sets any :class:`~dualpath.sim.scenario.SimScenario` field by name (e.g. ``snic_bw: 25e9``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dualpath._configbase import Section


class SimConfig(Section):
    preset: str | None = Field(default="ds660b-2p4d-64k", description="named scenario (see --list-presets)")
    model: str | None = Field(default=None, description="model preset (with P, D: instead of a scenario)")
    gpu: str = "h800"
    node: str = "hopper8"
    P: int | None = Field(default=None, ge=1)
    D: int | None = Field(default=None, ge=1)
    dataset: str | None = None
    agents: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    mode: Literal["offline", "online"] = "offline"
    rate_aps: float | None = Field(default=None, gt=0)
    horizon_s: float = Field(default=3000.0, gt=0, description="online: simulated seconds")
    warmup_s: float | None = Field(default=None, ge=0, description="online: start of the measured window")
    policies: list[str] = Field(default_factory=lambda: ["basic", "dualpath"])
    include_indexer_kv: bool | None = None
    append_scale: float = Field(default=1.0, gt=0, description="multiply every turn's append length (Fig. 9)")
    gen_scale: float = Field(default=1.0, gt=0, description="multiply every turn's generation length (Fig. 9)")
    prefill_slowdown: float = Field(default=1.0, gt=0, description="what-if, not a preset: prefill time x this")
    decode_slowdown: float = Field(default=1.0, gt=0, description="what-if, not a preset: decode step time x this")
    overrides: dict[str, Any] = Field(default_factory=dict)
