"""Config of the (emulated) cluster: nodes, engines, links."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dualpath._configbase import Section


class ClusterConfig(Section):
    """P prefill nodes and D decode nodes of ``engines_per_node`` engines; one storage NIC per node and one
    compute NIC per engine, emulated as links of the given bandwidths (None = unlimited: physical hardware)."""

    prefill_nodes: int = Field(default=1, ge=1)
    decode_nodes: int = Field(default=1, ge=1)
    engines_per_node: int = Field(default=1, ge=1)
    devices: Literal["auto", "cpu"] | list[str] = "auto"
    block_tokens: int = Field(default=64, gt=0)
    snic_gbps: float | None = Field(default=1.0, gt=0, description="storage NIC per node, GB/s (1e9 B/s)")
    cnic_gbps: float | None = Field(default=None, gt=0, description="compute NIC per engine, GB/s per direction")
    kv_share: float = Field(default=0.01, gt=0, le=1, description="guaranteed share of the KV traffic class")
    host_buffer_bytes: int = Field(default=1 << 30, gt=0, description="PE/DE host buffer per engine")
    kv_pool_tokens: int = Field(default=65536, gt=0, description="decode engine paged KV pool size, tokens")
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
        "prefill time stays within it (paper 7.5); None batches by prefill_max_batch(_tokens) only",
    )
    prefill_max_batch_tokens: int = Field(default=16384, ge=1, description="new tokens per PE forward batch")
    decode_max_batch: int = Field(default=64, ge=1, description="requests per DE decode step")
    persist: bool = Field(default=True, description="DE writes every Full Block that becomes full to storage")
    keep_logits: bool = Field(default=False, description="debug: keep every generated token's logits")
    on_transfer_failure: Literal["error", "recompute"] = Field(
        default="error",
        description="a failed or timed-out KV transfer fails the turn (error) or retries it once with recompute",
    )
