"""Sourced presets for the simulator: models, GPUs, nodes, and named scenarios.

Every value is a published figure or derived from one; its source is stated next to it (``source=`` text, kept
in each preset's ``sources`` mapping and printed by ``dualpath simulate --list-presets``). Source keys are those
of ``shared/reference/presets.md`` (V32-CFG, FMLA, DAY6, DP = the DualPath paper, ...). Nothing here is fitted to
a DualPath result. Units: bytes, FLOP, seconds, bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dualpath.errors import ConfigError

Src = tuple[Any, str]


def _split(values: dict[str, Src]) -> tuple[dict[str, Any], dict[str, str]]:
    return {k: v for k, (v, _) in values.items()}, {k: s for k, (_, s) in values.items()}


@dataclass(frozen=True)
class ModelPreset:
    """Per-token compute and KV size of a model (FLOP convention: presets.md section 1.5).

    Prefill of ``n`` new tokens on ``C`` cached ones attends on average ``L = C + n/2`` keys per token:
    ``F = linear + n_layers * (attn * min(L, topk) + indexer * L)`` FLOP per token (``topk = 0`` = dense).
    ``kv_bytes_per_token`` includes the DSA indexer key only when ``include_indexer_kv`` (a switch: the paper does
    not say whether its blocks carry it; the indexer physically needs it, so it is on by default).
    """

    name: str
    label: str
    n_layers: int
    linear_flops_per_token: float
    attn_flops_per_key_layer: float
    attn_topk: int
    indexer_flops_per_key_layer: float
    kv_bytes_per_token_layer: int
    indexer_kv_bytes_per_token_layer: int
    replicated_params: float
    expert_params: float
    weight_bytes_per_param: float
    compute_dtype: str
    include_indexer_kv: bool = True
    #: expert-parallel all-to-all (inference traffic on the compute NICs): hidden size, MoE layers, routed experts
    #: per token, the most nodes one token may be routed to (node-limited routing; 0 = no limit)
    hidden: int = 0
    moe_layers: int = 0
    experts_per_token: int = 0
    node_limit: int = 0
    dispatch_bytes_per_elem: float = 1.0
    combine_bytes_per_elem: float = 2.0
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_bytes_per_token(self) -> int:
        per_layer = self.kv_bytes_per_token_layer + (self.indexer_kv_bytes_per_token_layer if self.include_indexer_kv else 0)
        return per_layer * self.n_layers

    def prefill_flops(self, cached: int, new: int) -> float:
        """FLOPs of computing ``new`` tokens on top of ``cached`` ones (all layers, linear + attention)."""
        if new <= 0:
            return 0.0
        L = cached + new / 2.0
        kq = min(L, self.attn_topk) if self.attn_topk else L
        return new * (self.linear_flops_per_token + self.n_layers * (self.attn_flops_per_key_layer * kq
                                                                     + self.indexer_flops_per_key_layer * L))

    def attention_flops(self, cached: int, new: int) -> float:
        """Attention + indexer FLOPs only (what the PE compute quota bounds, paper section 7.5)."""
        if new <= 0:
            return 0.0
        L = cached + new / 2.0
        kq = min(L, self.attn_topk) if self.attn_topk else L
        return new * self.n_layers * (self.attn_flops_per_key_layer * kq + self.indexer_flops_per_key_layer * L)

    def decode_flops(self, context: int) -> float:
        """FLOPs of one decode step of one request with ``context`` tokens of KV."""
        return self.prefill_flops(context, 1)

    def decode_kv_bytes(self, context: int) -> float:
        """HBM bytes of KV one decode step of one request reads (sparse attention reads top-k entries only)."""
        kq = min(context, self.attn_topk) if self.attn_topk else context
        return self.n_layers * (self.kv_bytes_per_token_layer * kq + self.indexer_kv_bytes_per_token_layer * context)

    def decode_linear_flops(self) -> float:
        """FLOPs of one decode token's linear layers (weights GEMMs), without attention."""
        return self.linear_flops_per_token

    def decode_attention_flops(self, context: int) -> float:
        """Attention + indexer FLOPs of one decode token on ``context`` keys."""
        return self.attention_flops(context, 1)

    def ep_bytes_per_token(self, n_nodes: int) -> float:
        """Bytes one token sends over its GPU's compute NIC per forward for the MoE all-to-all (dispatch + combine,
        every MoE layer) in an EP group spanning ``n_nodes`` nodes; it receives as many. DeepEP sends a token once
        per remote node it is routed to and fans out over NVLink inside the node (DEEPEP), so the remote part is the
        expected number of distinct remote nodes among ``experts_per_token`` uniformly routed experts, at most
        ``node_limit`` nodes in all (node-limited routing, V3-TR). Dispatch FP8, combine BF16 (DAY6)."""
        if n_nodes <= 1 or self.moe_layers <= 0 or self.experts_per_token <= 0:
            return 0.0
        k, n = self.experts_per_token, n_nodes
        touched = n * (1.0 - (1.0 - 1.0 / n) ** k)  # expected distinct nodes (own included)
        if self.node_limit:
            touched = min(touched, float(self.node_limit))
        remote = touched * (n - 1) / n
        return remote * self.hidden * (self.dispatch_bytes_per_elem + self.combine_bytes_per_elem) * self.moe_layers

    def weight_bytes_per_gpu(self, n_gpus: int) -> float:
        """Weights one GPU holds: attention/dense/shared parts replicated (attention DP), routed experts sharded
        over the ``n_gpus`` of the expert-parallel group (the engine's role, as in the paper's EP/DP setup)."""
        return (self.replicated_params + self.expert_params / max(1, n_gpus)) * self.weight_bytes_per_param


@dataclass(frozen=True)
class GPUPreset:
    """A GPU: dense peaks, HBM, and the achieved fractions (MFU, HBM efficiency) applied to them."""

    name: str
    fp8_tflops: float
    bf16_tflops: float
    hbm_bytes: float
    hbm_bw: float
    mfu: float
    hbm_efficiency: float
    activation_reserve_bytes: float
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def flops_per_s(self, dtype: str) -> float:
        peak = self.fp8_tflops if dtype == "fp8" else self.bf16_tflops
        return peak * 1e12 * self.mfu


@dataclass(frozen=True)
class NodePreset:
    """A node: ``gpus`` engines, one storage NIC per node, one compute NIC per GPU, host DRAM."""

    name: str
    gpus: int
    snic_bw: float
    cnic_bw: float
    dram_bw: float
    kv_share: float
    read_slots: int
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def _model(**kw: Any) -> ModelPreset:
    vals, srcs = _split({k: v for k, v in kw.items() if isinstance(v, tuple)})
    plain = {k: v for k, v in kw.items() if not isinstance(v, tuple)}
    return ModelPreset(**plain, **vals, sources=srcs)


def _gpu(**kw: Any) -> GPUPreset:
    vals, srcs = _split({k: v for k, v in kw.items() if isinstance(v, tuple)})
    plain = {k: v for k, v in kw.items() if not isinstance(v, tuple)}
    return GPUPreset(**plain, **vals, sources=srcs)


def _node(**kw: Any) -> NodePreset:
    vals, srcs = _split({k: v for k, v in kw.items() if isinstance(v, tuple)})
    plain = {k: v for k, v in kw.items() if not isinstance(v, tuple)}
    return NodePreset(**plain, **vals, sources=srcs)


# ---- models (presets.md section 1) ---------------------------------------------------------------------------

MODELS: dict[str, ModelPreset] = {
    "ds_v32": _model(
        name="ds_v32",
        label="DeepSeek-V3.2 (paper: DS 660B)",
        n_layers=(61, "V32-CFG n_layers"),
        linear_flops_per_token=(7.31e10, "presets.md 1.5: 2 x 36.55e9 activated params in the layers (derived from V32-CFG)"),
        attn_flops_per_key_layer=(278528, "presets.md 1.5: MLA MQA mode 2*128*((512+64)+512) (V32-CFG dims; DSA runs on MQA mode, V32-PDF)"),
        attn_topk=(2048, "V32-CFG index_topk"),
        indexer_flops_per_key_layer=(16384, "presets.md 1.5: 2*index_n_heads 64*index_head_dim 128 (V32-CFG)"),
        kv_bytes_per_token_layer=(656, "FMLA FP8 KV format: 512 fp8 + 4 fp32 scales + 64 bf16 RoPE"),
        indexer_kv_bytes_per_token_layer=(132, "V32-CODE Indexer: 128 fp8 + one fp32 scale"),
        replicated_params=(17.97e9, "derived from V32-CFG: attention+indexer 201.06M x 61 + 3 dense FFN 396.4M + 58 shared experts 44.04M + routers + embed/head 2 x 0.927B"),
        expert_params=(653.9e9, "derived from V32-CFG: 58 MoE layers x 256 routed experts x 3*7168*2048"),
        weight_bytes_per_param=(1.0, "V32-CFG: FP8 e4m3 weights"),
        compute_dtype="fp8",
        hidden=(7168, "V32-CFG hidden_size"),
        moe_layers=(58, "V32-CFG: 61 layers - 3 dense (first_k_dense_replace)"),
        experts_per_token=(8, "V32-CFG num_experts_per_tok"),
        node_limit=(4, "V32-CFG topk_group 4 (node-limited routing, V3-TR 2.1.2: at most 4 nodes per token)"),
        dispatch_bytes_per_elem=(1.0, "DAY6: dispatch in FP8"),
        combine_bytes_per_elem=(2.0, "DAY6: combine in BF16"),
    ),
    "ds27b": _model(
        name="ds27b",
        label="DS 27B (paper's downscaled V3.2-like model)",
        n_layers=(30, "DP 9.1 (App. A.2)"),
        linear_flops_per_token=(7.9e9, "presets.md 1.5: 2 x 3.96B activated params in the layers (derived; MLA dims assumed as V2-Lite)"),
        attn_flops_per_key_layer=(69632, "derived: MQA mode 2*32 heads*((512+64)+512) (DP A.2 heads; MLA dims assumption from V2L-CFG)"),
        attn_topk=(1024, "DP 9.1 (App. A.2) top-k"),
        indexer_flops_per_key_layer=(4096, "derived: 2*32 indexer heads*64 dim (DP A.2)"),
        kv_bytes_per_token_layer=(656, "FMLA FP8 format on the assumed 512+64 MLA dims (presets.md 1.3)"),
        indexer_kv_bytes_per_token_layer=(68, "presets.md 1.3: 64 fp8 + one fp32 scale (same format as V3.2)"),
        replicated_params=(2.56e9, "derived (presets.md 1.3): attention+indexer 37.4M x 30 + dense FFN 94.4M + 29 x 2 shared experts 11.8M + embed/head 0.66B"),
        expert_params=(24.64e9, "derived (presets.md 1.3): 29 MoE layers x 72 experts x 3*2560*1536"),
        weight_bytes_per_param=(1.0, "assumption: FP8 weights as V3.2"),
        compute_dtype="fp8",
        hidden=(2560, "DP 9.1 (App. A.2)"),
        moe_layers=(29, "DP 9.1 (App. A.2): 30 layers, 1 initial dense layer"),
        experts_per_token=(6, "DP 9.1 (App. A.2): 6 active routed experts"),
        node_limit=(0, "not published: no node limit assumed"),
        dispatch_bytes_per_elem=(1.0, "assumption: as V3 (DAY6: dispatch FP8)"),
        combine_bytes_per_elem=(2.0, "assumption: as V3 (DAY6: combine BF16)"),
    ),
    "qwen25_32b": _model(
        name="qwen25_32b",
        label="Qwen2.5-32B",
        n_layers=(64, "QWEN-CFG"),
        linear_flops_per_token=(6.24e10, "presets.md 1.5: 2 x 31.21B layer params (derived from QWEN-CFG)"),
        attn_flops_per_key_layer=(20480, "presets.md 1.5: 4*H*d_h = 4*40*128 (GQA)"),
        attn_topk=(0, "dense attention"),
        indexer_flops_per_key_layer=(0, "no indexer"),
        kv_bytes_per_token_layer=(4096, "presets.md 1.4: 2*8 kv heads*128*2 B (FP16 KV, DP 2.2)"),
        indexer_kv_bytes_per_token_layer=(0, "no indexer"),
        replicated_params=(32.5e9, "QWEN-CARD 32.5B total; DP-only parallelism (DP 8): every GPU holds all weights"),
        expert_params=(0.0, "dense model"),
        weight_bytes_per_param=(2.0, "BF16 weights (QWEN-CARD)"),
        compute_dtype="bf16",
        hidden=(5120, "QWEN-CFG hidden_size"),
        moe_layers=(0, "dense model: no MoE all-to-all (DP-only, DP 8)"),
        experts_per_token=(0, "dense model"),
        node_limit=(0, "dense model"),
        dispatch_bytes_per_elem=(0.0, "dense model: no all-to-all"),
        combine_bytes_per_elem=(0.0, "dense model: no all-to-all"),
    ),
}

# ---- GPUs (presets.md section 2.1, 3) --------------------------------------------------------------------------

_MFU_SRC = (
    "DAY6-derived production prefill rate of DeepSeek-V3 on H800: ~330-390 TFLOPS per GPU (presets.md 3.1); midpoint"
    " 350 / FP8 dense peak 1979 = 0.177. The one end-to-end measured rate (kernel ceilings 640-1550 exclude"
    " communication and scheduling); applied to the dtype's dense peak, prefill and decode alike"
)

GPUS: dict[str, GPUPreset] = {
    "h800": _gpu(
        name="h800",
        fp8_tflops=(1979.0, "ISCA25 4.1 + GH200-DS (dense, same as H100)"),
        bf16_tflops=(989.0, "ISCA25 4.1 + GH200-DS (dense)"),
        hbm_bytes=(80e9, "80 GB HBM3 [secondary] (presets.md 2.1)"),
        hbm_bw=(3.35e12, "3.35 TB/s [secondary] (presets.md 2.1)"),
        mfu=(350.0 / 1979.0, _MFU_SRC),
        hbm_efficiency=(0.90, "FMLA: 3000 GB/s memory-bound of 3.35 TB/s"),
        activation_reserve_bytes=(8e9, "assumption: HBM kept for activations/workspace (not published)"),
    ),
    "h100": _gpu(
        name="h100",
        fp8_tflops=(1978.9, "KLOCK, GH200-DS"),
        bf16_tflops=(989.4, "KLOCK, GH200-DS"),
        hbm_bytes=(80e9, "KLOCK"),
        hbm_bw=(3.35e12, "awesomeagents [secondary]"),
        mfu=(350.0 / 1979.0, _MFU_SRC),
        hbm_efficiency=(0.90, "FMLA: 3000 GB/s memory-bound of 3.35 TB/s"),
        activation_reserve_bytes=(8e9, "assumption: HBM kept for activations/workspace (not published)"),
    ),
    "h200": _gpu(
        name="h200",
        fp8_tflops=(1979.0, "same die as H100 (presets.md 2.1, secondary)"),
        bf16_tflops=(989.0, "same die as H100 (presets.md 2.1, secondary)"),
        hbm_bytes=(141e9, "MLC-H200: 141 GB HBM3e"),
        hbm_bw=(4.8e12, "4.8 TB/s [secondary] (presets.md 2.1)"),
        mfu=(350.0 / 1979.0, _MFU_SRC),
        hbm_efficiency=(0.90, "FMLA: 3000 GB/s memory-bound of 3.35 TB/s (same fraction assumed)"),
        activation_reserve_bytes=(8e9, "assumption: HBM kept for activations/workspace (not published)"),
    ),
}

# ---- nodes (presets.md section 2.2, 2.3; DP 6, 9.1) -----------------------------------------------------------

NODES: dict[str, NodePreset] = {
    "hopper8": _node(
        name="hopper8",
        gpus=(8, "DP 9.1: 8 Hopper GPUs per node"),
        snic_bw=(50e9, "DP 9.1: one 400 Gbps storage NIC = 50 GB/s; DP 8: 3FS saturates it"),
        cnic_bw=(50e9, "DP 9.1 / CX7: one 400 Gbps CNIC per GPU = 50 GB/s per direction"),
        dram_bw=(500e9, "DP 6: M ~ 500 GB/s per node"),
        kv_share=(0.01, "DP 5.3: ~99% of bandwidth reserved for model traffic, KV on the low VL"),
        read_slots=(8, "assumption: concurrent Full-Block read tasks per SNIC (one per engine of the node)"),
    ),
}

#: DRAM buffer per node (DP 3.1): 80 GB for the DS models, 320 GB for Qwen-32B.
DRAM_BUFFER: dict[str, tuple[float, str]] = {
    "ds_v32": (80e9, "DP 3.1"),
    "ds27b": (80e9, "DP 3.1"),
    "qwen25_32b": (320e9, "DP 3.1"),
}

#: Relative prefill token throughput vs request batch size (30K context, 300 appended tokens each):
#: DP 2.4 / Fig. 3 right [fig-read]: 1 -> 1.0, 5 -> 2.58, 10 -> 2.92, 20 -> 3.01. As (new tokens, efficiency).
BATCH_CURVE: tuple[tuple[float, float], ...] = (
    (300.0, 1.0 / 3.01),
    (1500.0, 2.58 / 3.01),
    (3000.0, 2.92 / 3.01),
    (6000.0, 1.0),
)
BATCH_CURVE_SOURCE = "DP 2.4, Fig. 3 right [fig-read], normalised to its saturation (the MFU above is a saturated rate)"

#: Largest new-token batch of one PE forward without the DualPath quota: DeepSeek's published prefill profile runs
#: 16K tokens per GPU per batch (PROF).
MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class ScenarioPreset:
    """A named scenario: model + GPU + node presets, P and D nodes, dataset and agents."""

    name: str
    model: str
    gpu: str
    node: str
    P: int
    D: int
    dataset: str
    agents: int
    note: str = ""


SCENARIOS: dict[str, ScenarioPreset] = {
    s.name: s
    for s in (
        ScenarioPreset("ds660b-2p4d-64k", "ds_v32", "h800", "hopper8", 2, 4, "64k", 2048, "Fig. 7 DS 660B 64K"),
        ScenarioPreset("ds660b-2p4d-48k", "ds_v32", "h800", "hopper8", 2, 4, "48k", 2048, "Table 3 small unit"),
        ScenarioPreset("ds660b-48p96d-48k", "ds_v32", "h800", "hopper8", 48, 96, "48k", 49152, "Table 3, 1,152 GPUs"),
        ScenarioPreset("ds27b-1p1d-64k", "ds27b", "h800", "hopper8", 1, 1, "64k", 2048, "Fig. 7 DS 27B 64K"),
        ScenarioPreset("qwen32b-1p2d-64k", "qwen25_32b", "h200", "hopper8", 1, 2, "64k", 512,
                       "Fig. 7 Qwen 32B; H200: BF16 weights (65 GB) + a 64K FP16 context do not fit an 80 GB GPU"),
        ScenarioPreset("tiny", "ds27b", "h800", "hopper8", 1, 1, "64k", 16, "smoke test"),
    )
}


def get_scenario(name: str) -> ScenarioPreset:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(SCENARIOS)}") from None


def get_model(name: str) -> ModelPreset:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(MODELS)}") from None


def get_gpu(name: str) -> GPUPreset:
    try:
        return GPUS[name]
    except KeyError:
        raise ConfigError(f"unknown GPU preset {name!r}; known: {', '.join(GPUS)}") from None


def get_node(name: str) -> NodePreset:
    try:
        return NODES[name]
    except KeyError:
        raise ConfigError(f"unknown node preset {name!r}; known: {', '.join(NODES)}") from None
