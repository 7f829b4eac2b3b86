"""Thinking Machines' Inkling (``InklingForCausalLM``, model_type ``inkling_text``, and the language model of its
image-text checkpoints), as transformers runs it, over the paged KV pool with pages that also hold short-convolution
states.

No RoPE: positions enter through a **relative logit bias** per head, ``(r_proj(x) @ proj)[distance]`` for a key
``distance`` tokens back (zero from ``rel_extent`` on; a sliding layer's extent is its window). Each layer:

* attention (``hybrid``: full, with its own heads; ``hybrid_sliding``: over ``sliding_window_size`` positions, with
  ``swa_*`` heads): ``q_norm(q_proj(x))``; keys and values each through a **short convolution** (causal, depthwise,
  ``conv_kernel_size`` taps, no bias, in fp32, plus its input) before ``k_norm``; scores ``q . k / head_dim`` plus
  the bias (full layers: queries and bias scaled by ``1 + alpha log(max((pos + 1) / n_floor, 1))`` with
  ``log_scaling_n_floor``); ``o_proj``, then another short convolution over the hidden state;
* a dense gated MLP times a learned ``global_scale``, or MoE: an fp32 sigmoid router over the routed and shared
  experts (the routed ones chosen by score plus ``e_score_correction_bias``; weights a softmax of the chosen and shared
  experts' log-sigmoids, times ``route_scale`` and ``global_scale``), packed routed experts plus weighted shared ones;
  then a short convolution over the hidden state.

Embeddings go through an RMS norm; the final state is divided by ``logits_mup_width_multiplier`` before the head
(never tied), whose logits past ``unpadded_vocab_size`` are dropped.

A layer's four convolution states (keys, values, attention output, MLP output: each its last ``conv_kernel_size - 1``
inputs, fp32) live after its KV rows in its pages, snapshotted at every block end; attention runs in torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, LayerwiseDecoder, RMSNorm, SeqBatch
from dualpath.model.moe import activation_of, dispatch_packed, gate_fn
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype

ARCH = "inkling_text"
KINDS = ("hybrid", "hybrid_sliding")
#: InklingTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 201024, "hidden_size": 6144, "num_hidden_layers": 66, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 128, "swa_num_attention_heads": 64, "swa_num_key_value_heads": 16,
    "swa_head_dim": 128, "sliding_window_size": 512, "d_rel": 16, "rel_extent": 1024, "log_scaling_alpha": 0.1,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "conv_kernel_size": 4, "intermediate_size": 24576,
    "hidden_act": "silu", "moe_intermediate_size": 3072, "n_routed_experts": 256, "num_experts_per_tok": 6,
    "n_shared_experts": 2, "route_scale": 8.0, "logits_mup_width_multiplier": 24.0, "bos_token_id": 1,
    "eos_token_id": 2,
}
#: the default block size :meth:`InklingSpec.kv_spec` sizes pages for (a deployment passes its own)
_DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class InklingSpec(ModelSpec):
    """A :class:`ModelSpec` (the full layers' heads; ``intermediate_size`` the dense MLP's) plus Inkling's fields."""

    layer_types: tuple[str, ...] = ()
    mlp_types: tuple[str, ...] = ()
    swa_heads: int = 64
    swa_kv_heads: int = 16
    swa_head_dim: int = 128
    window: int = 512
    d_rel: int = 16
    rel_extent: int = 1024
    log_floor: int | None = None
    log_alpha: float = 0.1
    conv_kernel: int = 4
    experts: int = 256
    top_k: int = 6
    shared: int = 2
    expert_width: int = 3072
    route_scale: float = 8.0
    mup_width: float = 24.0
    unpadded_vocab: int | None = None
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        n = self.n_layers
        if len(self.layer_types) != n or any(t not in KINDS for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'hybrid' or 'hybrid_sliding' for each of the {n} "
                             f"layers, got {list(self.layer_types)}")
        if len(self.mlp_types) != n or any(t not in ("dense", "sparse") for t in self.mlp_types):
            raise ModelError(f"model config: mlp_layer_types must name 'dense' or 'sparse' for each of the {n} "
                             f"layers, got {list(self.mlp_types)}")
        if self.swa_heads % self.swa_kv_heads:
            raise ModelError(f"model config: swa_num_attention_heads ({self.swa_heads}) must be a multiple of "
                             f"swa_num_key_value_heads ({self.swa_kv_heads})")
        if "sparse" in self.mlp_types and not (1 <= self.top_k <= self.experts and self.shared >= 1):
            raise ModelError(f"model config: num_experts_per_tok ({self.top_k}) must be in [1, n_routed_experts] "
                             f"and n_shared_experts ({self.shared}) at least 1 (the router's sink)")
        if self.unpadded_vocab is not None and not 0 < self.unpadded_vocab <= self.vocab_size:
            raise ModelError(f"model config: unpadded_vocab_size ({self.unpadded_vocab}) must be in "
                             f"(0, vocab_size={self.vocab_size}]")

    def heads(self, layer: int) -> tuple[int, int, int]:
        """``(query heads, KV heads, head_dim)`` of layer ``layer``."""
        if self.layer_types[layer] == "hybrid_sliding":
            return self.swa_heads, self.swa_kv_heads, self.swa_head_dim
        return self.n_heads, self.n_kv_heads, self.head_dim

    def layer_window(self, layer: int) -> int | None:
        return self.window if self.layer_types[layer] == "hybrid_sliding" else None

    @property
    def kv_width(self) -> int:
        """Values of K (or V) per token in the widest layer."""
        return max(h * d for _, h, d in (self.heads(i) for i in range(self.n_layers)))

    @property
    def conv_channels(self) -> int:
        """Channels of a layer's four convolution states: keys and values (the widest layer's), and twice the
        hidden state."""
        return 2 * self.kv_width + 2 * self.hidden_size

    def paged_kv_spec(self, block_tokens: int) -> KVSpec:
        """Rows ``[2, H, D]`` (``D`` the widest head, ``H`` enough for the widest layer's K and V), widened until a
        page of ``block_tokens`` rows also holds the fp32 convolution states."""
        if block_tokens <= 0:
            raise ModelError(f"block_tokens must be positive, got {block_tokens}")
        d = max(self.head_dim, self.swa_head_dim)
        elem = self.torch_dtype.itemsize
        kv_heads = -(-self.kv_width // d)
        state = 4 * self.conv_channels * (self.conv_kernel - 1)
        extra = -(-state // (2 * d * elem * block_tokens))
        return KVSpec.mha(self.n_layers, kv_heads + extra, d, self.dtype, state_pages=True)

    def kv_spec(self) -> KVSpec:
        return self.paged_kv_spec(_DEFAULT_BLOCK)

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["InklingForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "unpadded_vocab_size": self.unpadded_vocab, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "swa_num_attention_heads": self.swa_heads,
            "swa_num_key_value_heads": self.swa_kv_heads, "swa_head_dim": self.swa_head_dim,
            "sliding_window_size": self.window, "d_rel": self.d_rel, "rel_extent": self.rel_extent,
            "log_scaling_n_floor": self.log_floor, "log_scaling_alpha": self.log_alpha,
            "layer_types": list(self.layer_types), "mlp_layer_types": list(self.mlp_types),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "conv_kernel_size": self.conv_kernel, "intermediate_size": self.intermediate_size,
            "hidden_act": hf_activation(self.activation),
            "moe_intermediate_size": self.expert_width, "n_routed_experts": self.experts,
            "num_experts_per_tok": self.top_k, "n_shared_experts": self.shared, "route_scale": self.route_scale,
            "logits_mup_width_multiplier": self.mup_width, "tie_word_embeddings": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> InklingSpec:
    """The spec of an Inkling text config (its keys over InklingTextConfig's defaults; ``local_layer_ids``,
    ``dense_mlp_idx``, ``dense_intermediate_size``, ``sconv_kernel_size`` and ``model_max_length`` read as transformers
    reads them)."""
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    act = gate_activation(cfg, where)  # (its MLPs' and experts' gates)
    for theirs, ours in (("sconv_kernel_size", "conv_kernel_size"), ("model_max_length", "max_position_embeddings"),
                         ("sliding_window", "sliding_window_size")):
        if theirs in cfg and ours not in {k for k, v in cfg.items() if k == ours and v != DEFAULTS.get(ours)}:
            cfg[ours] = cfg[theirs]
    n = cfg_int(cfg, "num_hidden_layers", where)
    types = cfg.get("layer_types")
    if types is None:
        local = set(cfg["local_layer_ids"]) if cfg.get("local_layer_ids") is not None else \
            {i for i in range(n) if (i + 1) % 6}
        types = ["hybrid_sliding" if i in local else "hybrid" for i in range(n)]
    mlp = cfg.get("mlp_layer_types")
    if mlp is None:
        dense = int(cfg.get("dense_mlp_idx", 0))
        mlp = ["dense" if i < dense else "sparse" for i in range(n)]
    expert_width, dense_width = cfg.get("moe_intermediate_size"), cfg.get("intermediate_size")
    if cfg.get("dense_intermediate_size") is not None:  # (then intermediate_size is the experts' width)
        expert_width, dense_width = dense_width, cfg["dense_intermediate_size"]
    if not isinstance(types, list) or not isinstance(mlp, list):
        raise ModelError(f"{where}: layer_types and mlp_layer_types must be lists")
    floor = cfg.get("log_scaling_n_floor")
    return InklingSpec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(cfg, "vocab_size", where), hidden_size=cfg_int(cfg, "hidden_size", where),
        intermediate_size=cfg_int({"intermediate_size": dense_width}, "intermediate_size", where), n_layers=n,
        n_heads=cfg_int(cfg, "num_attention_heads", where), n_kv_heads=cfg_int(cfg, "num_key_value_heads", where),
        head_dim=cfg_int(cfg, "head_dim", where), rms_eps=cfg_num(cfg, "rms_norm_eps", where),
        max_position=cfg_int(cfg, "max_position_embeddings", where), tie_embeddings=False,
        dtype=config_dtype(cfg, dtype), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        context_cap=max_context, layer_types=tuple(types), mlp_types=tuple(mlp),
        swa_heads=cfg_int(cfg, "swa_num_attention_heads", where),
        swa_kv_heads=cfg_int(cfg, "swa_num_key_value_heads", where), swa_head_dim=cfg_int(cfg, "swa_head_dim", where),
        window=cfg_int(cfg, "sliding_window_size", where), d_rel=cfg_int(cfg, "d_rel", where),
        rel_extent=cfg_int(cfg, "rel_extent", where),
        log_floor=None if floor is None else cfg_int(cfg, "log_scaling_n_floor", where),
        log_alpha=cfg_num(cfg, "log_scaling_alpha", where, positive=False),
        conv_kernel=cfg_int(cfg, "conv_kernel_size", where), experts=cfg_int(cfg, "n_routed_experts", where),
        top_k=cfg_int(cfg, "num_experts_per_tok", where), shared=cfg_int(cfg, "n_shared_experts", where, 0),
        expert_width=cfg_int({"moe_intermediate_size": expert_width}, "moe_intermediate_size", where),
        route_scale=cfg_num(cfg, "route_scale", where), mup_width=cfg_num(cfg, "logits_mup_width_multiplier", where),
        unpadded_vocab=cfg.get("unpadded_vocab_size"),
    )


# --- modules (the checkpoints' names) ----------------------------------------------------------------------------


class ShortConv(nn.Module):
    """``x + causal_conv(x)`` in fp32 (depthwise, no bias), as transformers keeps it."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=False)


class RelativeLogits(nn.Module):
    def __init__(self, d_rel: int, extent: int) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.zeros(d_rel, extent))


class Attention(nn.Module):
    def __init__(self, spec: InklingSpec, layer: int) -> None:
        super().__init__()
        hq, hkv, d = spec.heads(layer)
        h = spec.hidden_size
        self.q_proj = nn.Linear(h, hq * d, bias=False)
        self.k_proj = nn.Linear(h, hkv * d, bias=False)
        self.v_proj = nn.Linear(h, hkv * d, bias=False)
        self.r_proj = nn.Linear(h, hq * spec.d_rel, bias=False)
        self.o_proj = nn.Linear(hq * d, h, bias=False)
        self.k_sconv = ShortConv(hkv * d, spec.conv_kernel)
        self.v_sconv = ShortConv(hkv * d, spec.conv_kernel)
        self.q_norm = RMSNorm(d, spec.rms_eps)
        self.k_norm = RMSNorm(d, spec.rms_eps)
        sliding = spec.layer_types[layer] == "hybrid_sliding"
        self.rel_logits_proj = RelativeLogits(spec.d_rel, spec.window if sliding else spec.rel_extent)


class Mlp(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.global_scale = nn.Parameter(torch.ones(1))
        self.act = gate_fn(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)) * self.global_scale)


class Router(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.experts + spec.shared, spec.hidden_size))
        self.global_scale = nn.Parameter(torch.ones(1))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.experts))


class Experts(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(spec.experts, 2 * spec.expert_width, spec.hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(spec.experts, spec.hidden_size, spec.expert_width))


class SharedExperts(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        s, i, h = spec.shared, spec.expert_width, spec.hidden_size
        self.gate_proj = nn.Parameter(torch.zeros(s, i, h))
        self.up_proj = nn.Parameter(torch.zeros(s, i, h))
        self.down_proj = nn.Parameter(torch.zeros(s, h, i))


class Moe(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = Experts(spec)
        self.shared_experts = SharedExperts(spec)
        self.k, self.n_shared, self.route_scale = spec.top_k, spec.shared, spec.route_scale
        self.act = activation_of(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate
        logits = F.linear(x.float(), g.weight.float())
        scores = logits.sigmoid()
        routed = scores[..., :-self.n_shared]
        idx = torch.topk(routed + g.e_score_correction_bias.float(), self.k, dim=-1, sorted=False)[1]
        chosen = torch.cat((logits[..., :-self.n_shared].gather(-1, idx), logits[..., -self.n_shared:]), dim=-1)
        lp = F.logsigmoid(chosen)
        w = torch.exp(lp - torch.logsumexp(lp, dim=-1, keepdim=True)) * self.route_scale * g.global_scale.float()
        w = w.to(x.dtype)
        ex = self.experts
        out = dispatch_packed(x, idx, w[..., :self.k], ex.gate_up_proj, ex.down_proj, act=self.act)
        se = self.shared_experts
        gam = w[..., self.k:].t()[:, :, None]  # [S, N, 1]
        xs = x[None].expand(self.n_shared, -1, -1)
        act = (self.act or F.silu)(torch.bmm(xs, se.gate_proj.transpose(1, 2)))
        act = act * torch.bmm(xs, se.up_proj.transpose(1, 2)) * gam
        shared = torch.bmm(act, se.down_proj.transpose(1, 2)).float().sum(dim=0).to(x.dtype)
        return out + shared


class DecoderLayer(nn.Module):
    def __init__(self, spec: InklingSpec, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.mlp: nn.Module = Moe(spec) if spec.mlp_types[layer] == "sparse" else Mlp(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.attn_sconv = ShortConv(spec.hidden_size, spec.conv_kernel)
        self.mlp_sconv = ShortConv(spec.hidden_size, spec.conv_kernel)


class NormedEmbedding(nn.Embedding):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__(spec.vocab_size, spec.hidden_size)
        self.embed_norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class Backbone(nn.Module):
    def __init__(self, spec: InklingSpec) -> None:
        super().__init__()
        self.embed_tokens = NormedEmbedding(spec)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


#: queries attended together in a prefill (each tile's keys: its band of the window, or the whole prefix)
_TILE = 128


@dataclass
class _Layer:
    """One layer's pages and its per-sequence bookkeeping within a forward."""

    kv: torch.Tensor      # [nb, bt, 2, H, D] view of the KV rows (the layer's own heads and width)
    conv: torch.Tensor    # [nb, C, K - 1] fp32 views of the four convolution states
    snaps: list[tuple[int, int, int]] = field(default_factory=list)  # (sequence, row, page)


class InklingModel(LayerwiseDecoder):
    """Inkling's text model (module docstring) over a paged KV pool whose pages also hold convolution states."""

    def __init__(self, spec: InklingSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        self.spec: InklingSpec = spec
        with torch.no_grad():  # (transformers keeps the convolutions, the correction bias and global scale in fp32)
            for name, p in self.named_parameters():
                if "sconv" in name or name.endswith(("e_score_correction_bias", "gate.global_scale")):
                    p.data = p.data.float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h) / self.spec.mup_width).float()
        cut = self.spec.unpadded_vocab
        if cut is not None and cut < logits.shape[-1]:
            logits = logits[..., :cut]
        return cast(torch.Tensor, logits)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        ids = self.checked_ids(batch)
        e = self.model.embed_tokens
        hidden = e.embed_norm(F.embedding(ids, e.weight))
        return ForwardState(batch=batch, hidden=hidden, cos=hidden[:, :0], sin=hidden[:, :0])

    def paged_kv_page(self, block_tokens: int) -> tuple[int, ...]:
        s = self.spec.paged_kv_spec(block_tokens)
        return (block_tokens, 2, s.n_kv_heads, s.head_dim)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        spec, b = self.spec, state.batch
        page = self.paged_kv_page(b.block_tokens)
        if kv_layer.dim() != 5 or tuple(kv_layer.shape[1:]) != page:
            raise ModelError(f"layer {layer}: KV tensor shape {tuple(kv_layer.shape)}, expected [num_blocks, {page}]")
        pages = self._pages_of(layer, kv_layer)
        blk = cast(DecoderLayer, self.model.layers[layer])
        hq, hkv, d = spec.heads(layer)
        kvw, hid = spec.kv_width, spec.hidden_size
        bt = b.block_tokens
        tables, cu, starts = b.block_tables.tolist(), b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        for i, start in enumerate(starts):  # (a snapshot after each block's last new token and after the chunk)
            for t in range(cu[i + 1] - cu[i]):
                if (start + t + 1) % bt == 0 or t == cu[i + 1] - cu[i] - 1:
                    pages.snaps.append((i, cu[i] + t, tables[i][(start + t) // bt]))
        h = state.hidden
        x = blk.input_layernorm(h)
        attn = blk.self_attn
        n = x.shape[0]
        k, ks = self._sconv(attn.k_sconv, attn.k_proj(x), pages, b, 0)
        v, vs = self._sconv(attn.v_sconv, attn.v_proj(x), pages, b, kvw)
        q = attn.q_norm(attn.q_proj(x).view(n, hq, d))
        k = attn.k_norm(k.view(n, hkv, d))
        v = v.view(n, hkv, d)
        slots = b.slot_mapping.to(x.device).long()
        pages.kv[slots // bt, slots % bt, 0] = k.to(pages.kv.dtype)
        pages.kv[slots // bt, slots % bt, 1] = v.to(pages.kv.dtype)
        rel = attn.r_proj(x).view(n, hq, spec.d_rel)
        o = self._attend(layer, attn, q, rel, pages, b)
        a, as_ = self._sconv(blk.attn_sconv, attn.o_proj(o.reshape(n, hq * d)), pages, b, 2 * kvw)
        h = h + a
        y, ys = self._sconv(blk.mlp_sconv, blk.mlp(blk.post_attention_layernorm(h)), pages, b, 2 * kvw + hid)
        state.hidden = h + y
        for j, (_, _, pg) in enumerate(pages.snaps):  # (after every read: a page written here may be read above)
            for parts, c0 in ((ks, 0), (vs, kvw), (as_, 2 * kvw), (ys, 2 * kvw + hid)):
                pages.conv[pg, c0:c0 + parts[j].shape[0]] = parts[j]
        state.next_layer += 1

    def _pages_of(self, layer: int, kv_layer: torch.Tensor) -> _Layer:
        spec = self.spec
        nb, bt, _, heads, d = kv_layer.shape
        try:
            flat = kv_layer.view(nb, -1)
        except RuntimeError as exc:
            raise ModelError(f"an Inkling page must be one contiguous page per block: {exc}") from None
        _, hkv, hd = spec.heads(layer)
        row_heads = -(-spec.kv_width // d)  # (the rest of the page, past the KV rows, holds the states)
        n_rows = bt * 2 * row_heads * d
        rows = flat[:, :n_rows].view(nb, bt, 2, row_heads * d)[..., :hkv * hd].unflatten(-1, (hkv, hd))
        k1 = spec.conv_kernel - 1
        f32 = flat[:, n_rows:].view(torch.uint8)[:, :4 * spec.conv_channels * k1].view(torch.float32)
        return _Layer(kv=rows, conv=f32.view(nb, spec.conv_channels, k1))

    def _sconv(self, conv: ShortConv, x: torch.Tensor, pages: _Layer, b: SeqBatch,
               c0: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``x + causal_conv(x)`` (fp32, back to ``x``'s dtype) per sequence, from the convolution state at channels
        ``c0:`` of each sequence's previous page; the states to snapshot (one per ``pages.snaps`` entry)."""
        c, k1 = x.shape[1], pages.conv.shape[2]
        w = conv.conv1d.weight
        out = torch.empty_like(x)
        snaps: list[torch.Tensor] = []
        cu, starts, tables = b.cu_seqlens_q.tolist(), b.start_pos.tolist(), b.block_tables.tolist()
        exts: dict[int, torch.Tensor] = {}
        for i, start in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            prev = (pages.conv[tables[i][(start - 1) // b.block_tokens], c0:c0 + c].clone() if start
                    else x.new_zeros(c, k1, dtype=torch.float32))
            ext = torch.cat((prev, x[r0:r1].float().t()), dim=1)  # [C, K - 1 + L]
            y = F.conv1d(ext[None], w, None, groups=c)[0]
            out[r0:r1] = (y.t() + x[r0:r1].float()).to(x.dtype)
            exts[i] = ext
        for i, row, _ in pages.snaps:
            t = row - cu[i]
            snaps.append(exts[i][:, t + 1:t + 1 + k1])
        return out, snaps

    def _attend(self, layer: int, attn: Attention, q: torch.Tensor, rel: torch.Tensor, pages: _Layer,
                b: SeqBatch) -> torch.Tensor:
        """Each sequence's queries over its keys and values in the pages, with the relative logit bias (and the
        full layers' log scaling), tile by tile: ``[N, Hq, D]``."""
        spec = self.spec
        hq, hkv, d = spec.heads(layer)
        window = spec.layer_window(layer)
        proj = attn.rel_logits_proj.proj
        extent = proj.shape[1]
        out = torch.empty_like(q)
        bt = b.block_tokens
        pos_all = b.positions.to(q.device)
        cu = b.cu_seqlens_q.tolist()
        tables = b.block_tables.to(q.device).long()
        for i in range(len(cu) - 1):
            r0, r1 = cu[i], cu[i + 1]
            for t0 in range(r0, r1, _TILE):
                t1 = min(r1, t0 + _TILE)
                qpos = pos_all[t0:t1]
                lo = max(0, int(qpos[0]) - window + 1) if window else 0
                kpos = torch.arange(lo, int(qpos[-1]) + 1, device=q.device)
                pg, off = tables[i, kpos // bt], kpos % bt
                keys = pages.kv[pg, off, 0].repeat_interleave(hq // hkv, dim=1)   # [K, Hq, D]
                vals = pages.kv[pg, off, 1].repeat_interleave(hq // hkv, dim=1)
                qq = q[t0:t1]
                dist = qpos[:, None] - kpos[None, :]                                 # [L, K]
                rl = (rel[t0:t1] @ proj)                                            # [L, Hq, extent]
                bias = rl.gather(-1, dist.clamp(0, extent - 1)[:, None, :].expand(-1, hq, -1))
                bias = bias.masked_fill(((dist < 0) | (dist >= extent))[:, None, :], 0.0)
                if window is None and spec.log_floor is not None:
                    tau = 1.0 + spec.log_alpha * torch.log(((qpos + 1).float() / spec.log_floor).clamp(min=1.0))
                    qq = (qq.float() * tau[:, None, None]).to(qq.dtype)
                    bias = (bias.float() * tau[:, None, None]).to(bias.dtype)
                logits = torch.einsum("lhd,khd->hlk", qq, keys) * (1.0 / d) + bias.transpose(0, 1)
                mask = dist >= 0
                if window:
                    mask = mask & (dist < window)
                logits = logits.masked_fill(~mask[None], float("-inf"))
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(qq.dtype)
                out[t0:t1] = torch.einsum("hlk,khd->lhd", probs, vals)
        return out


#: the released (image-text) checkpoints' layer names (left) for transformers' (right)
_HUB_NAMES = (("attn.wq_du.", "self_attn.q_proj."), ("attn.wk_dv.", "self_attn.k_proj."),
              ("attn.wv_dv.", "self_attn.v_proj."), ("attn.wr_du.", "self_attn.r_proj."),
              ("attn.wo_ud.", "self_attn.o_proj."), ("attn.q_norm.", "self_attn.q_norm."),
              ("attn.k_norm.", "self_attn.k_norm."), ("attn.k_sconv.weight", "self_attn.k_sconv.conv1d.weight"),
              ("attn.v_sconv.weight", "self_attn.v_sconv.conv1d.weight"),
              ("attn.rel_logits_proj.", "self_attn.rel_logits_proj."), ("attn_sconv.weight", "attn_sconv.conv1d.weight"),
              ("mlp_sconv.weight", "mlp_sconv.conv1d.weight"), ("mlp_norm.", "post_attention_layernorm."),
              ("attn_norm.", "input_layernorm."), ("mlp.gate.bias", "mlp.gate.e_score_correction_bias"),
              ("mlp.experts.w2_weight", "mlp.experts.down_proj"), ("mlp.w2_md.weight", "mlp.down_proj.weight"),
              ("mlp.shared_experts.shared_w2_weight", "mlp.shared_experts.down_proj"))
_TOP = {"model.llm.embed.weight": "model.embed_tokens.weight",
        "model.llm.embed_norm.weight": "model.embed_tokens.embed_norm.weight",
        "model.llm.norm.weight": "model.norm.weight", "model.llm.unembed.weight": "lm_head.weight"}


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows ``gate_0, up_0, gate_1, up_1, ...`` along ``dim`` as ``gate_0 .. gate_{I-1}, up_0 .. up_{I-1}``."""
    shape = list(t.shape)
    shape[dim:dim + 1] = [shape[dim] // 2, 2]
    return t.reshape(shape).transpose(dim, dim + 1).reshape(t.shape).contiguous()


def tensors_in(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names for a checkpoint's tensors: transformers' (a text checkpoint), or the image-text checkpoints' own
    (``model.llm.*``: ``wq_du`` / ``wk_dv`` / ..., gated MLPs and experts with gate and up rows interleaved in
    ``w13``), whose vision and audio towers are left out; multi-token-prediction layers left out, as transformers
    leaves them."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(("model.mtp.", "mtp.", "model.audio.", "model.visual.", "model.audio_tower.",
                           "model.vision_tower.")):
            continue
        if key in _TOP:
            out[_TOP[key]] = t
            continue
        if key.startswith("model.language_model."):  # (transformers' in-memory image-text names)
            out["model." + key[len("model.language_model."):]] = t
            continue
        if not key.startswith("model.llm.layers."):
            out[key] = t
            continue
        k = "model.layers." + key[len("model.llm.layers."):]
        if k.endswith("mlp.experts.w13_weight"):
            out[k[: -len("w13_weight")] + "gate_up_proj"] = _deinterleave(t, 1)
        elif k.endswith("mlp.shared_experts.shared_w13_weight"):
            gate, up = _deinterleave(t, 1).chunk(2, dim=1)
            base = k[: -len("shared_w13_weight")]
            out[base + "gate_proj"], out[base + "up_proj"] = gate.contiguous(), up.contiguous()
        elif k.endswith("mlp.w13_dn.weight"):
            gate, up = _deinterleave(t, 0).chunk(2, dim=0)
            base = k[: -len("w13_dn.weight")]
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
        else:
            for hub, ours in _HUB_NAMES:
                k = k.replace(hub, ours)
            out[k] = t
    return out
