"""MiniMax-M3's language model (``MiniMaxM3SparseForConditionalGeneration``'s ``minimax_m3_vl_text``, also run alone
as ``MiniMaxM3VLForCausalLM``), as transformers runs it, over the paged KV pool.

* **Attention**: GQA with per-head q/k RMS norms (Gemma's ``1 + weight``, in fp32) and RoPE over the first
  ``head_dim * partial_rotary_factor`` values of each head (rotate-half).
* **Block-sparse layers** (``layer_types``: ``minimax_m3_sparse``): a lightning indexer (``index_n_heads`` query
  heads of ``index_head_dim``, one key head; normed and rotated the same way) scores every visible key by a plain
  dot product, max-pools the scores over blocks of ``index_block_size`` keys (from position 0), forces the
  ``index_local_blocks`` blocks ending at the query's own, and keeps each query's ``index_topk_blocks`` best
  blocks, **per indexer head**: query head ``h`` attends to the keys of the blocks its group's indexer head kept
  (``num_attention_heads / index_n_heads`` query heads per group). A token's indexer key sits in its page row after
  the attention's KV heads, so a prefix read from storage or forwarded by a decode engine carries it. These layers
  attend on the torch reference; full layers on the attention kernels.
* **MLPs**: dense layers (``mlp_layer_types``) and shared experts are one fused ``gate_up_proj``; every SwiGLU is
  gpt-oss's clamped one (``gate`` clamped above and ``up`` both ways at ``swiglu_limit``,
  ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``), not interleaved. The MoE routes by sigmoid scores plus a
  correction bias, renormalized; the routed sum times ``routed_scaling_factor``, plus the shared expert.

RoPE turns ``head_dim * partial_rotary_factor`` values (the factor in ``rope_parameters`` or at the top level), as
transformers does: the config's ``rotary_dim`` is not read by its model, nor here (its class default, 64, disagrees
with most small configs, whose heads transformers then rotates whole).

Tensor names: the image-text checkpoint's (``language_model.model.layers.N.block_sparse_moe.experts.E.w1``,
``self_attn.index_q_proj``, ... as transformers' save_pretrained writes them) or the text model's
(``model.layers.N.mlp.experts.gate_up_proj`` packed, ``self_attn.indexer.q_proj``); the vision tower, projectors and
``mtp.*`` left out. Our save_pretrained writes the text model (``MiniMaxM3VLForCausalLM``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model.family_fields import _partial_rotary
from dualpath.model.gemma4 import layer_view
from dualpath.model.hybrid import Backbone
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, TypedRopeState, _rope
from dualpath.model.moe import SigmoidBiasRouter, dispatch_experts
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype, parse_rope

__all__ = ["ARCH", "MiniMaxM3Model", "MiniMaxM3Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "minimax_m3_vl_text"
SPARSE = "minimax_m3_sparse"
#: MiniMaxM3VLTextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 3072, "num_hidden_layers": 60,
    "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 524288,
    "rms_norm_eps": 1e-6, "bos_token_id": 200034, "eos_token_id": 200020, "tie_word_embeddings": False,
    "num_experts_per_tok": 4, "num_local_experts": 128, "dense_intermediate_size": 12288,
    "shared_intermediate_size": 3072, "routed_scaling_factor": 2.0, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
    "index_n_heads": 4, "index_head_dim": 128, "index_block_size": 128, "index_topk_blocks": 16,
    "index_local_blocks": 1,
}
#: the legacy ``sparse_attention_config`` keys MiniMaxM3VLTextConfig reads
_LEGACY = {"index_n_heads": "sparse_num_index_heads", "index_head_dim": "sparse_index_dim",
           "index_block_size": "sparse_block_size", "index_topk_blocks": "sparse_topk_blocks",
           "index_local_blocks": "sparse_local_block"}
#: query rows per tile of the sparse layers' attention (bounds the [heads, rows, keys] scores)
_TILE = 256


@dataclass(frozen=True)
class MiniMaxM3Spec(ModelSpec):
    """A :class:`ModelSpec` (``intermediate_size``: the dense MLPs') plus MiniMax-M3's fields."""

    sparse_layers: tuple[int, ...] = ()
    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    shared_width: int = 0
    moe_scale: float = 1.0
    glu_alpha: float = 1.702
    glu_limit: float = 7.0
    idx_heads: int = 0
    idx_dim: int = 0
    idx_block: int = 0
    idx_topk: int = 0
    idx_local: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("sparse_layers", "dense_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.dense_layers) < self.n_layers and not (0 < self.moe_top_k <= self.moe_experts
                                                           and self.moe_width > 0 and self.shared_width > 0):
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"num_local_experts ({self.moe_experts}) and positive intermediate_size "
                             f"({self.moe_width}) and shared_intermediate_size ({self.shared_width})")
        if not self.glu_limit > 0:
            raise ModelError(f"model config: swiglu_limit must be positive, got {self.glu_limit}")
        if self.sparse_layers:
            if min(self.idx_heads, self.idx_dim, self.idx_block, self.idx_topk) <= 0 or self.idx_local < 0:
                raise ModelError("model config: the sparse layers need positive index_n_heads, index_head_dim, "
                                 "index_block_size, index_topk_blocks and index_local_blocks >= 0")
            if self.n_heads % self.idx_heads:
                raise ModelError(f"model config: num_attention_heads ({self.n_heads}) must be a multiple of "
                                 f"index_n_heads ({self.idx_heads}): each indexer head selects for a group")
            if self.rotary_dim > self.idx_dim:
                raise ModelError(f"model config: the rotated dims ({self.rotary_dim}) must fit index_head_dim "
                                 f"({self.idx_dim})")
            if self.idx_topk < self.idx_local:
                raise ModelError(f"model config: index_topk_blocks ({self.idx_topk}) below index_local_blocks "
                                 f"({self.idx_local}): which forced block is dropped would be a tie-break")

    @property
    def rope_by_type(self) -> dict[str, tuple[float, float]]:
        """One RoPE for every layer (:class:`~dualpath.model.llama.TypedRopeDecoder`'s tables)."""
        return {"all": (self.rope_theta, self.partial_rotary_factor)}

    @property
    def idx_heads_in_row(self) -> int:
        """Row heads after the KV heads holding a token's indexer key (K and V halves both); 0 without sparse
        layers."""
        return -(-self.idx_dim // (2 * self.head_dim)) if self.sparse_layers else 0

    def kv_spec(self) -> KVSpec:
        return KVSpec.mha(self.n_layers, self.n_kv_heads + self.idx_heads_in_row, self.head_dim, self.dtype)

    def to_hf_config(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        return {
            "architectures": ["MiniMaxM3VLForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.moe_width or self.intermediate_size,
            "dense_intermediate_size": self.intermediate_size, "shared_intermediate_size": self.shared_width or 1,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "rotary_dim": self.rotary_dim,
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "tie_word_embeddings": self.tie_embeddings, "num_local_experts": self.moe_experts or 1,
            "num_experts_per_tok": self.moe_top_k or 1, "routed_scaling_factor": self.moe_scale,
            "swiglu_alpha": self.glu_alpha, "swiglu_limit": self.glu_limit,
            "index_n_heads": self.idx_heads or 4, "index_head_dim": self.idx_dim or 128,
            "index_block_size": self.idx_block or 128, "index_topk_blocks": self.idx_topk or 16,
            "index_local_blocks": self.idx_local,
            "layer_types": [SPARSE if i in self.sparse_layers else "full_attention" for i in range(self.n_layers)],
            "mlp_layer_types": ["dense" if i in self.dense_layers else "sparse" for i in range(self.n_layers)],
            "rope_parameters": rope, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": None, "dtype": self.dtype,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> MiniMaxM3Spec:
    """The spec of a MiniMax-M3 text config (its keys over MiniMaxM3VLTextConfig's defaults, the legacy
    ``sparse_attention_config`` and ``moe_layer_freq`` read as transformers reads them)."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if cfg.get("num_experts") is not None and cfg.get("num_local_experts") is None:  # (its attribute map)
        norm["num_local_experts"] = cfg["num_experts"]
    legacy = cfg.get("sparse_attention_config") or {}
    if not isinstance(legacy, dict):
        raise ModelError(f"{where}: sparse_attention_config must be an object")
    for key, old in _LEGACY.items():
        if old in legacy:
            norm[key] = legacy[old]
    n = cfg_int(norm, "num_hidden_layers", where)
    default_types = ["full_attention"] * n
    if cfg.get("layer_types") is None and isinstance(legacy.get("sparse_attention_freq"), list):
        default_types = [SPARSE if f else "full_attention" for f in legacy["sparse_attention_freq"]]
    types = cfg_kinds(norm, "layer_types", n, ("full_attention", SPARSE), where, default_types)
    default_mlp = ["sparse"] * n
    if cfg.get("mlp_layer_types") is None and isinstance(cfg.get("moe_layer_freq"), list):
        default_mlp = ["sparse" if f else "dense" for f in cfg["moe_layer_freq"]]
    mlp = cfg_kinds(norm, "mlp_layer_types", n, ("dense", "sparse"), where, default_mlp)
    head_dim = cfg_int(norm, "head_dim", where)
    rope = norm.get("rope_parameters")
    if not isinstance(rope, dict) and norm.get("rope_theta") is None:
        norm["rope_theta"] = 5000000.0  # (MiniMaxM3VLTextConfig.default_theta)
    theta, scaling = parse_rope(norm, where)
    if scaling is not None:
        raise ModelError(f"{where}: rope_parameters of type {scaling.get('rope_type')!r} unsupported for MiniMax-M3 "
                         "(only 'default')")
    partial = _partial_rotary(norm, where, 1.0)
    if not 0 < partial <= 1 or int(head_dim * partial) % 2 or int(head_dim * partial) == 0:
        raise ModelError(f"{where}: partial_rotary_factor ({partial}) must rotate an even number of dims in "
                         f"(0, head_dim={head_dim}]")
    sparse = "sparse" in mlp
    return MiniMaxM3Spec(
        architecture=ARCH, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "dense_intermediate_size", where), n_layers=n,
        n_heads=cfg_int(norm, "num_attention_heads", where), n_kv_heads=cfg_int(norm, "num_key_value_heads", where),
        head_dim=head_dim, rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta,
        partial_rotary_factor=partial, max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm["tie_word_embeddings"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        sparse_layers=tuple(i for i, t in enumerate(types) if t == SPARSE),
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        moe_experts=cfg_int(norm, "num_local_experts", where) if sparse else 0,
        moe_top_k=cfg_int(norm, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(norm, "intermediate_size", where) if sparse else 0,
        shared_width=cfg_int(norm, "shared_intermediate_size", where) if sparse else 0,
        moe_scale=cfg_num(norm, "routed_scaling_factor", where), glu_alpha=cfg_num(norm, "swiglu_alpha", where),
        glu_limit=cfg_num(norm, "swiglu_limit", where),
        idx_heads=cfg_int(norm, "index_n_heads", where), idx_dim=cfg_int(norm, "index_head_dim", where),
        idx_block=cfg_int(norm, "index_block_size", where), idx_topk=cfg_int(norm, "index_topk_blocks", where),
        idx_local=cfg_int(norm, "index_local_blocks", where, minimum=0),
    )


# --- modules -------------------------------------------------------------------------------------------------


def _gemma_norm(dim: int, eps: float) -> RMSNorm:
    return RMSNorm(dim, eps, offset=True)


def _clamped_glu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1.0) * (gate * torch.sigmoid(gate * alpha))


class DenseMLP(nn.Module):
    """A fused ``gate_up_proj`` and ``down_proj`` around the clamped SwiGLU."""

    def __init__(self, spec: MiniMaxM3Spec, width: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, spec.hidden_size, bias=False)
        self.alpha, self.limit = spec.glu_alpha, spec.glu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return cast(torch.Tensor, self.down_proj(_clamped_glu(gate, up, self.alpha, self.limit)))


class Expert(nn.Module):
    """A routed expert (``gate_proj`` / ``up_proj`` / ``down_proj``) around the clamped SwiGLU."""

    def __init__(self, spec: MiniMaxM3Spec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.moe_width, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.moe_width, bias=False)
        self.down_proj = nn.Linear(spec.moe_width, spec.hidden_size, bias=False)
        self.alpha, self.limit = spec.glu_alpha, spec.glu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        glu = _clamped_glu(self.gate_proj(x), self.up_proj(x), self.alpha, self.limit)
        return cast(torch.Tensor, self.down_proj(glu))


class MoE(nn.Module):
    def __init__(self, spec: MiniMaxM3Spec) -> None:
        super().__init__()
        self.gate = SigmoidBiasRouter(spec.hidden_size, spec.moe_experts, spec.moe_top_k)
        self.experts = nn.ModuleList(Expert(spec) for _ in range(spec.moe_experts))
        self.shared_experts = DenseMLP(spec, spec.shared_width)
        self.scale = spec.moe_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_experts(x)
        w, idx = self.gate(x)
        return dispatch_experts(x, idx, w, self.experts) * self.scale + shared


class Indexer(nn.Module):
    def __init__(self, spec: MiniMaxM3Spec) -> None:
        super().__init__()
        self.q_proj = nn.Linear(spec.hidden_size, spec.idx_heads * spec.idx_dim, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, spec.idx_dim, bias=False)
        self.q_norm = _gemma_norm(spec.idx_dim, spec.rms_eps)
        self.k_norm = _gemma_norm(spec.idx_dim, spec.rms_eps)


class Attention(nn.Module):
    def __init__(self, spec: MiniMaxM3Spec, layer: int) -> None:
        super().__init__()
        hq, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=False)
        self.q_norm = _gemma_norm(d, spec.rms_eps)
        self.k_norm = _gemma_norm(d, spec.rms_eps)
        self.indexer = Indexer(spec) if layer in spec.sparse_layers else None


class DecoderLayer(nn.Module):
    def __init__(self, spec: MiniMaxM3Spec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = _gemma_norm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = _gemma_norm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (DenseMLP(spec, spec.intermediate_size) if layer in spec.dense_layers else MoE(spec))


class MiniMaxM3Model(TypedRopeDecoder):
    """MiniMax-M3's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: MiniMaxM3Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        backbone = Backbone(spec, lambda i: DecoderLayer(spec, i), norm=_gemma_norm(spec.hidden_size, spec.rms_eps))
        self._build(spec, backbone, device, backend)
        self.spec: MiniMaxM3Spec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer, self.spec.n_kv_heads + self.spec.idx_heads_in_row)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables["all"]
        q = _rope(attn.q_norm(attn.q_proj(x).view(n, hq, d)), cos[:, None, :], sin[:, None, :])
        k = _rope(attn.k_norm(attn.k_proj(x).view(n, hkv, d)), cos[:, None, :], sin[:, None, :])
        v = attn.v_proj(x).view(n, hkv, d)
        if attn.indexer is None:
            o = self.attend(q, k, v, layer_view(kv_layer, hkv, d), b, d ** -0.5)
        else:
            o = self._sparse(attn.indexer, x, q, k, v, st, kv_layer)
        h = st.hidden + attn.o_proj(o.reshape(n, hq * d))
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1

    def _sparse(self, ix: Indexer, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                st: TypedRopeState, kv_layer: torch.Tensor) -> torch.Tensor:
        """A block-sparse layer's attention (module docstring) on the torch reference: ``[N, Hq, D]``."""
        spec, b = self.spec, st.batch
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        hi, di, bs, e = spec.idx_heads, spec.idx_dim, spec.idx_block, spec.idx_heads_in_row
        cos, sin = st.tables["all"]
        iq = _rope(ix.q_norm(ix.q_proj(x).view(n, hi, di)), cos[:, None, :], sin[:, None, :])
        ik = _rope(ix.k_norm(ix.k_proj(x)), cos, sin)
        bt = b.block_tokens
        pages, offs = b.page_offsets(x.device)
        kv_layer[pages, offs, 0, :hkv] = k.to(kv_layer.dtype)
        kv_layer[pages, offs, 1, :hkv] = v.to(kv_layer.dtype)
        kv_layer[pages, offs, :, hkv:hkv + e] = F.pad(ik, (0, 2 * e * d - di)).view(n, 2, e, d).to(kv_layer.dtype)
        tables = b.block_tables.to(x.device, torch.int64)
        pos = b.positions.to(x.device)
        out = torch.empty_like(q)
        cu, starts = b.cu_seqlens_q.tolist(), b.start_pos.tolist()
        for i, p0 in enumerate(starts):
            r0, r1 = cu[i], cu[i + 1]
            if r1 == r0:
                continue
            p1 = p0 + (r1 - r0)
            kpos = torch.arange(p1, device=x.device)
            kp, ko = tables[i][kpos // bt], kpos % bt
            keys = kv_layer[kp, ko, 0, :hkv].repeat_interleave(hq // hkv, dim=1)
            values = kv_layer[kp, ko, 1, :hkv].repeat_interleave(hq // hkv, dim=1)
            ikeys = kv_layer[kp, ko, :, hkv:hkv + e].reshape(p1, -1)[:, :di].float()
            blocks = -(-p1 // bs)
            for t0 in range(r0, r1, _TILE):
                t1 = min(r1, t0 + _TILE)
                qp = pos[t0:t1]
                visible = kpos[None, :] <= qp[:, None]                                       # [L, p1]
                keep = self._blocks_kept(iq[t0:t1], ikeys, visible, qp, blocks)            # [Hi, L, blocks]
                by_key = keep.repeat_interleave(bs, dim=-1)[..., :p1] & visible[None]       # [Hi, L, p1]
                mask = by_key.repeat_interleave(hq // hi, dim=0)                            # [Hq, L, p1]
                logits = torch.einsum("lhd,khd->hlk", q[t0:t1], keys) * d ** -0.5
                probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1, dtype=torch.float32)
                out[t0:t1] = torch.einsum("hlk,khd->lhd", probs.to(values.dtype), values)
        return out

    def _blocks_kept(self, iq: torch.Tensor, ikeys: torch.Tensor, visible: torch.Tensor, qp: torch.Tensor,
                     blocks: int) -> torch.Tensor:
        """``[Hi, L, blocks]`` bool: per indexer head and query, the blocks kept (max-pooled dot-product scores of
        the visible keys, the local blocks forced, the best ``index_topk_blocks``; blocks with no visible key
        never)."""
        spec = self.spec
        bs = spec.idx_block
        scores = torch.einsum("lhd,kd->hlk", iq.float(), ikeys)                             # [Hi, L, p1]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        pad = blocks * bs - scores.shape[-1]
        block_scores = F.pad(scores, (0, pad), value=float("-inf")).view(*scores.shape[:2], blocks, bs).amax(-1)
        if spec.idx_local > 0:
            local = (qp // bs)[:, None] - torch.arange(spec.idx_local, device=qp.device)[None, :]
            local = local.clamp(min=0)[None].expand(block_scores.shape[0], -1, -1)
            block_scores.scatter_(-1, local, float("inf"))
        top, idx = block_scores.topk(min(spec.idx_topk, blocks), dim=-1)
        keep = torch.zeros_like(block_scores, dtype=torch.bool)
        return keep.scatter_(-1, idx, top > float("-inf"))


# --- tensors -------------------------------------------------------------------------------------------------

#: the parts of an image-text checkpoint that are not its language model
_OTHER = ("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.", "model.vision_tower.",
          "model.multi_modal_projector.")
#: the image-text checkpoint's names (left) for ours (right)
_NAMES = ((".block_sparse_moe.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),
          (".block_sparse_moe.", ".mlp."), (".self_attn.index_q_proj.", ".self_attn.indexer.q_proj."),
          (".self_attn.index_k_proj.", ".self_attn.indexer.k_proj."),
          (".self_attn.index_q_norm.", ".self_attn.indexer.q_norm."),
          (".self_attn.index_k_norm.", ".self_attn.indexer.k_norm."))
_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's language-model tensors under our names (module docstring): packed experts split, the
    separate ``gate_proj`` / ``up_proj`` of the dense MLPs and shared experts fused."""
    from dualpath.model.tensor_names import _split_packed_experts

    renamed: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_OTHER) or name.startswith("mtp.") or ".mtp." in name:
            continue
        for prefix, ours in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                             ("model.language_model.", "model.")):
            if name.startswith(prefix):
                name = ours + name[len(prefix):]
                break
        for theirs, ours in _NAMES:
            name = name.replace(theirs, ours)
        name = re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m.group(1)}.{_EXPERT[m.group(2)]}.", name)
        if not _split_packed_experts(name, t, renamed, source):
            renamed[name] = t
    out: dict[str, torch.Tensor] = {}
    for name, t in renamed.items():
        m = re.match(r"^(.*\.mlp(?:\.shared_experts)?)\.(gate_proj|up_proj)\.weight$", name)
        if m is None:
            out[name] = t
        elif m.group(2) == "gate_proj":
            up = renamed.get(f"{m.group(1)}.up_proj.weight")
            if up is None:
                raise ModelError(f"{source}: {name} has no {m.group(1)}.up_proj.weight to fuse with")
            out[f"{m.group(1)}.gate_up_proj.weight"] = torch.cat((t, up))
    return out


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours as transformers' save_pretrained writes the text model: experts packed."""
    from dualpath.model.tensor_names import _packed_experts

    return _packed_experts(dict(tensors))
