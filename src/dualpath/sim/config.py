"""``SimConfig``: the ``sim`` section of a config file for ``dualpath simulate --config FILE``.

Either a named ``preset`` (scenario) or ``model``/``gpu``/``node`` presets with ``P`` and ``D``; ``overrides``
sets any :class:`~dualpath.sim.scenario.SimScenario` field by name (e.g. ``snic_bw: 25e9``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from dualpath._configbase import Section


class SimConfig(Section):
    """The simulated cluster and workload: a named scenario (``preset``), or ``model``/``gpu``/``node``
    presets with ``P`` and ``D`` (a file without a ``sim`` section is read as this section itself; a ``dualpath
    run`` config is simulated as that run instead, with its own cluster and trace)."""

    preset: str | None = Field(default="ds660b-2p4d-64k", description="named scenario (see --list-presets)")
    model: str | None = Field(default=None, description="model preset (with P, D: instead of a scenario)")
    gpu: str = Field(default="h800", description="GPU preset (dualpath simulate --list-presets): HBM, FLOPS, memory bandwidth")
    node: str = Field(default="hopper8", description="node preset: GPUs per node, storage and compute NIC bandwidths, DRAM")
    P: int | None = Field(default=None, ge=1, description="prefill nodes (with model: instead of a scenario)")
    D: int | None = Field(default=None, ge=1, description="decode nodes (with model: instead of a scenario)")
    dataset: str | None = Field(default=None, description=(
        "the paper's Table-2 dataset (32k, 48k, 64k, small, tiny); None: the scenario's"
    ))
    agents: int | None = Field(default=None, ge=1, description="agents of the dataset; None: the scenario's")
    seed: int = Field(default=0, ge=0, description="seed of the dataset and of the online arrivals")
    mode: Literal["offline", "online"] = Field(default="offline", description=(
        "offline (every agent at t = 0) or online (Poisson arrivals at rate_aps)"
    ))
    rate_aps: float | None = Field(default=None, gt=0, description="online: agent arrivals per second")
    horizon_s: float = Field(default=3000.0, gt=0, description="online: simulated seconds")
    warmup_s: float | None = Field(default=None, ge=0, description="online: start of the measured window")
    policies: list[str] = Field(default_factory=lambda: ["basic", "dualpath"], description=(
        "the policies simulated, each on the same trajectories"
    ))
    include_indexer_kv: bool | None = Field(default=None, description=(
        "DeepSeek V3.2: count the DSA indexer's keys in the KV bytes; None: the model preset's"
    ))
    append_scale: float = Field(default=1.0, gt=0, description="multiply every turn's append length (Fig. 9)")
    gen_scale: float = Field(default=1.0, gt=0, description="multiply every turn's generation length (Fig. 9)")
    prefill_slowdown: float = Field(default=1.0, gt=0, description="what-if, not a preset: prefill time x this")
    decode_slowdown: float = Field(default=1.0, gt=0, description="what-if, not a preset: decode step time x this")
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "any SimScenario field by name (e.g. snic_bw: 25e9), applied last"
    ))
