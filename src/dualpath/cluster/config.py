"""Config of the (emulated) cluster: nodes, engines, links."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dualpath._configbase import Section


class ClusterConfig(Section):
    """P prefill nodes and D decode nodes of ``engines_per_node`` engines; one storage NIC per node and one
    compute NIC per engine, emulated as links of the given bandwidths (None = unlimited: physical hardware).
    Bandwidths are GB/s; strings with a unit are read by :func:`dualpath.units.parse_gbs` (``400Gbps``)."""

    @model_validator(mode="before")
    @classmethod
    def _bandwidth_names(cls, data: object) -> object:
        # snic_bandwidth / cnic_bandwidth: unit-neutral names of snic_gbps / cnic_gbps (GB/s)
        if isinstance(data, dict):
            for new, old in (("snic_bandwidth", "snic_gbps"), ("cnic_bandwidth", "cnic_gbps")):
                if new in data:
                    data = dict(data)
                    data[old] = data.pop(new)
        return data

    @field_validator("snic_gbps", "cnic_gbps", mode="before")
    @classmethod
    def _bandwidth_units(cls, v: object, info: object) -> object:
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            return v
        from dualpath.units import parse_gbs

        return parse_gbs(v, f"cluster.{getattr(info, 'field_name', 'bandwidth')}")

    # bounded: every engine of the emulated cluster is real (a model, buffers, a process under serve); a typo
    # like 100000 used to be accepted and then hung allocating (the simulator models big clusters: `simulate`)
    prefill_nodes: int = Field(default=1, ge=1, le=1024, description="prefill (PE) nodes: P of PxD")
    decode_nodes: int = Field(default=1, ge=1, le=1024, description="decode (DE) nodes: D of PxD")
    engines_per_node: int = Field(default=1, ge=1, le=64, description="engines (GPUs) per node, at most 64")
    devices: Literal["auto", "cpu"] | list[str] = Field(default="auto", description=(
        "where engines compute: auto (a GPU each where there are enough, else cpu), cpu, or one device per "
        "engine (e.g. [cuda:0, cuda:1])"
    ))
    block_tokens: int = Field(default=64, gt=0, description=(
        "tokens per KV block (a Full Block on storage holds every layer of this many tokens)"
    ))
    snic_gbps: float | None = Field(
        default=1.0, gt=0,
        description="storage NIC per node in GB/s (1e9 B/s); a unit may be given: 400Gbps = 50GB/s "
        "(also accepted as snic_bandwidth)")
    cnic_gbps: float | None = Field(
        default=None, gt=0,
        description="compute NIC per engine, GB/s per direction; a unit may be given: 400Gbps = 50GB/s "
        "(also accepted as cnic_bandwidth)")
    kv_share: float = Field(default=0.01, gt=0, le=1, description="guaranteed share of the KV traffic class")
    host_buffer_bytes: int = Field(default=1 << 30, gt=0, le=1 << 50, description="PE/DE host buffer per engine")
    kv_pool_tokens: int = Field(default=65536, gt=0, le=1 << 32, description="decode engine paged KV pool size, tokens")
    layers_ahead: int = Field(default=4, ge=1, description="DE-path streaming window, in layers")
    deadline_s: float = Field(default=30.0, gt=0, description="deadline of every wait on a peer or device")
    layerwise: bool = Field(
        default=True,
        description="layer-wise prefill (load layer l's hit KV just before computing it); False loads every layer "
        "of the batch's hit KV onto the device before the first layer (the 'basic' baseline)",
    )
    prefill_max_batch: int = Field(default=8, ge=1, description="requests per PE layer-wise forward batch")
    prefill_quota_s: float | None = Field(
        default=None,
        gt=0,
        description="compute quota of one PE forward batch: requests are packed FIFO while the model's predicted "
        "prefill time stays within it and the first that does not fit is chunked (paper 7.5); None batches by "
        "prefill_max_batch(_tokens) only",
    )
    prefill_max_batch_tokens: int = Field(
        default=16384, ge=1, description="new tokens per PE forward batch (the PE's one-layer scratch starts sized "
        "for it and grows for a longer prompt, up to the model's context)")
    decode_max_batch: int = Field(default=64, ge=1, description="requests per DE decode step")
    persist: bool = Field(default=True, description="DE writes every Full Block that becomes full to storage")
    keep_logits: bool = Field(default=False, description="debug: keep every generated token's logits")
    ep_bytes_per_token: int = Field(
        default=0, ge=0,
        description="emulated MoE all-to-all: bytes per token of every forward (all layers, each direction) on the "
        "engine's compute NIC, as model-execution (HIGH) traffic; prefill spreads it over the layers. 0 = none. "
        "A DeepSeek-V3.2 DE of a 4-node EP group: ~3.37e6 (dualpath.sim.presets ModelPreset.ep_bytes_per_token)",
    )
    traffic_isolation: bool = Field(
        default=True,
        description="the traffic manager: model-execution traffic ahead of KV on the compute NICs (paper 5.1); "
        "False sends it as ordinary traffic sharing the links fairly with KV",
    )
    on_transfer_failure: Literal["error", "recompute"] = Field(
        default="error",
        description="a failed or timed-out KV transfer fails the turn (error) or retries it once with recompute",
    )
