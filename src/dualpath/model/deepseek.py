"""A DeepSeek-V3 / DeepSeek-V2 / DeepSeek-V3.2 decoder (Multi-head Latent Attention + DeepSeekMoE) with a layer-wise
forward over paged latent KV. V3 and V2 differ only in the MoE router (:class:`Router`; V2: softmax scores, greedy
or group-limited greedy top-k, no correction bias) and V2's fixed interleaved RoPE layout; V3.2 adds DeepSeek
Sparse Attention (:mod:`dualpath.model.dsa`: each layer's lightning indexer keeps a key per token in the KV row, and
once a sequence holds more than ``index_topk`` keys each query attends to the ones its indexer selects, on the torch
reference; below that the MLA kernels run as for V3).

Parameter names equal Hugging Face's (``model.layers.3.self_attn.kv_a_proj_with_mqa.weight``,
``model.layers.3.mlp.experts.7.gate_proj.weight``, ...), so a DeepSeek-V3 checkpoint loads as is. The forward has
the same layer-wise shape as :class:`dualpath.model.llama.LlamaModel` (``prefill_begin`` / ``prefill_layer`` /
``prefill_end``) over the same :class:`~dualpath.model.llama.SeqBatch`, so engines drive either.

The cache holds, per token and layer, one row: the normalized latent ``c`` (``kv_lora_rank`` values, after
``kv_a_layernorm``) followed by the RoPE'd shared key part ``k_rot`` (``qk_rope_head_dim`` values) -- in the
compute dtype, or in the FP8 latent format (656 bytes for 512 + 64). Decode attends in the *absorbed* form:
``kv_b_proj``'s key half is folded into the query (``q_lat = q_nope @ W_uk``), every head attends to the shared
latent rows as MQA with a ``kv_lora_rank + rope`` wide key and the latent as value, and the value half of
``kv_b_proj`` maps the result back (``o = o_lat @ W_uv^T``). Prefill takes that form or the *decompressed* one
(each sequence's latent rows expanded into per-head keys and values, then ``scaled_dot_product_attention``),
whichever needs fewer FLOPs for the batch (``prefill_form``, set from the model config's ``mla_prefill``): on an
H200 the decompressed form runs a whole 8K prompt 5.9x faster than the absorbed kernels, a 1K append over 32K
cached tokens 3.6x (``benchmarks/gpu_mla_prefill_forms.py``).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from dualpath.errors import ModelError
from dualpath.kernels import mla_decode_attention, mla_prefill_attention, store_latent
from dualpath.kernels.reference import dequantize_latent_fp8, mla_masked_attention
from dualpath.model.dsa import Indexer, pooled_selection, selected_keys
from dualpath.model.llama import ForwardState, LayerwiseDecoder, RMSNorm, SeqBatch
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.rope import rope_frequencies

__all__ = ["DeepseekV3Model"]



class MLAttention(nn.Module):
    def __init__(self, spec: DeepseekV3Spec, layer: int = 0) -> None:
        super().__init__()
        h, bias = spec.n_heads, spec.attention_bias
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(spec.hidden_size, h * spec.qk_head_dim, bias=False)
        elif spec.q_gate:  # A.X-K2: queries and output gates from [normed latent, latent] (its checkpoints' q_b_proj)
            self.q_a_proj = nn.Linear(spec.hidden_size, spec.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.latent_norm_eps)
            self.q_b_proj = nn.Linear(2 * spec.q_lora_rank, h * (spec.qk_head_dim + spec.v_head_dim), bias=False)
        else:
            self.q_a_proj = nn.Linear(spec.hidden_size, spec.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.latent_norm_eps)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, h * spec.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(spec.hidden_size, spec.kv_lora_rank + spec.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, spec.latent_norm_eps)
        self.kv_b_proj = nn.Linear(spec.kv_lora_rank, h * (spec.qk_nope_head_dim + spec.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * spec.v_head_dim, spec.hidden_size, bias=bias)
        self.indexer: Indexer | None = None
        if spec.has_indexer(layer):  # DeepSeek Sparse Attention's lightning indexer (GLM-5: not on shared layers)
            self.indexer = Indexer(spec)
        if spec.head_gates_and_sinks:  # Hy4: a sigmoid gate per output channel, a sink logit per head
            self.gate_proj = nn.Linear(spec.hidden_size, h * spec.v_head_dim, bias=False)
            self.sinks = nn.Parameter(torch.zeros(h))


class Router(nn.Module):
    """Picks each token's routed experts and their weights. Kept in fp32.

    DeepSeek-V3 (``noaux_tc``): sigmoid scores, the correction bias shifts the choice only, groups ranked by the sum
    of their two best biased scores. DeepSeek-V2: softmax over all experts, then ``greedy`` (plain top-k) or
    ``group_limited_greedy`` (groups ranked by their best score); no bias, no renormalization. Mistral 4: V3's
    grouping and renormalization over softmax scores, with no bias.
    """

    keep_fp32 = True  # (as DeepSeek and transformers keep it; LayerwiseDecoder._build)

    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.n_routed_experts, spec.hidden_size))
        self.e_score_correction_bias: nn.Parameter | None = None
        if spec.topk_method == "noaux_tc" and spec.scoring_func == "sigmoid":  # (Mistral 4: softmax, no bias)
            self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.n_routed_experts), requires_grad=False)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        logits = F.linear(x.float(), self.weight.float())                                 # [N, E]
        if self.e_score_correction_bias is not None:  # V3 (noaux_tc)
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
        else:
            scores = choice = logits.softmax(dim=-1)
        if s.topk_method == "greedy":
            idx = choice.topk(s.num_experts_per_tok, dim=-1, sorted=False)[1]
            return idx, scores.gather(1, idx) * s.routed_scaling_factor
        n = x.shape[0]
        per_group = s.n_routed_experts // s.n_group
        grouped = choice.view(n, s.n_group, per_group)
        if s.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)                              # [N, G]
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = group_scores.topk(s.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask[:, :, None].expand(n, s.n_group, per_group).reshape(n, -1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
        idx = choice.topk(s.num_experts_per_tok, dim=-1, sorted=False)[1]                 # [N, K]
        w = scores.gather(1, idx)
        if s.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * s.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        self.gate = Router(spec)
        act = activation_of(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_intermediate_size, act=act)
                                     for _ in range(spec.n_routed_experts))
        self.has_shared = spec.n_shared_experts > 0
        if self.has_shared:
            self.shared_experts = FeedForward(spec.hidden_size, spec.moe_intermediate_size * spec.n_shared_experts,
                                              bias=getattr(spec, "shared_bias", False) or (
                                                  isinstance(spec, DeepseekV3Spec) and bool(spec.mlp_bias)),
                                              act=act)  # (Hy3's and DeepSeek-V2's mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x)
        limit = getattr(self.gate.spec, "swiglu_limit", 0)  # (Hy4: the routed experts' SwiGLU clamped)
        experts = [_Clamped(cast(FeedForward, e), limit) for e in self.experts] if limit else self.experts
        out = dispatch_experts(x, idx, w, experts)
        if self.has_shared:
            out = out + self.shared_experts(x)
        return out


class _Clamped:
    """A routed expert with its SwiGLU clamped (Hy4): the gate above ``limit``, the up projection to +-``limit``;
    always SiLU (``hidden_act`` reaches Hy4's dense MLPs and shared experts only)."""

    def __init__(self, ff: FeedForward, limit: float) -> None:
        self.ff, self.limit = ff, limit

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = self.ff.gate_proj(x).clamp(max=self.limit)
        u = self.ff.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return cast(torch.Tensor, self.ff.down_proj(F.silu(g) * u))  # (SiLU whatever hidden_act: transformers')


def _index_keys(kv_layer: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The indexer keys' part of a V3.2 pool layer (``[NB, bt, D]``): values after the latent, or bfloat16 bytes
    after an FP8 row."""
    keys = kv_layer[..., width:]
    return keys.view(torch.bfloat16) if kv_layer.dtype == torch.uint8 else keys


class GatedRMSNorm(nn.Module):
    """A.X-K2's norm: ``y = RMSNorm(x)``, then ``y * sigmoid(W_up(silu(W_down(y))))`` (the gate in fp32)."""

    def __init__(self, hidden: int, rank: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.W_down = nn.Linear(hidden, rank, bias=False)
        self.W_up = nn.Linear(rank, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return (y * torch.sigmoid(self.W_up(F.silu(self.W_down(y))).float())).to(y.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DeepseekV3Spec, layer: int) -> None:
        super().__init__()
        gated = spec.gated_norm_rank  # (A.X-K2: before attention, and before each MoE block)
        self.input_layernorm: nn.Module = (GatedRMSNorm(spec.hidden_size, gated, spec.rms_eps) if gated
                                           else RMSNorm(spec.hidden_size, spec.rms_eps))
        self.self_attn = MLAttention(spec, layer)
        self.post_attention_layernorm: nn.Module = (
            GatedRMSNorm(spec.hidden_size, gated, spec.rms_eps) if gated and spec.is_moe_layer(layer)
            else RMSNorm(spec.hidden_size, spec.rms_eps))
        self.mlp: nn.Module = (MoE(spec) if spec.is_moe_layer(layer)
                               else FeedForward(spec.hidden_size, spec.intermediate_size, bias=bool(spec.mlp_bias),
                                                act=activation_of(spec)))
        if spec.post_moe_norm and spec.is_moe_layer(layer):  # A.X-K1: an RMSNorm on the MoE block's output
            self.post_mlp_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)


class Backbone(nn.Module):
    def __init__(self, spec: DeepseekV3Spec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """RoPE on the last dim of ``x [..., P]``; ``cos, sin [N, P/2]`` broadcast over the middle dims.

    Interleaved checkpoints (DeepSeek's own layout) rotate pairs ``(x0, x1), (x2, x3), ...``; the result is laid
    out de-interleaved (evens then odds), as Hugging Face does: a fixed permutation applied to both q and k,
    so every dot product is unchanged.
    """
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class DeepseekV3Model(LayerwiseDecoder):
    """DeepSeek-V3 (or V2) over a paged latent KV pool (``[num_blocks, bt, latent]`` per layer, or FP8 rows)."""

    inv_freq: torch.Tensor

    def __init__(self, spec: DeepseekV3Spec, device: str | torch.device = "cpu", backend: str = "auto",
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        # (the router stays fp32: Router.keep_fp32; Kimi Linear passes its own layers)
        self._build(spec, backbone if backbone is not None else Backbone(spec), device, backend)
        inv_freq, self._rope_scale = rope_frequencies(spec.qk_rope_head_dim, spec.rope_theta, spec.rope_scaling,
                                                      spec.max_position)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.scale = spec.softmax_scale
        self.kv_spec = spec.kv_spec()
        ks = self.kv_spec  # a row: the latent (what the MLA kernels read), then V3.2's indexer key
        self._latent_width = ks.row_elems - (ks.extra_bytes if ks.latent_format == "fp8"
                                             else ks.extra_bytes // ks.elem_bytes)
        #: prefill attention form: ``auto`` (the one with fewer FLOPs, see :meth:`_decompress`), ``absorbed`` (the
        #: MLA kernels over the latent, as decode always is) or ``decompressed`` (keys and values expanded, SDPA)
        self.prefill_form: str = "auto"
        #: expanded keys + values of one sequence in one layer, at most (None: 1 GiB; on a GPU a 20th of its memory,
        #: 1 to 4 GiB)
        self.decompress_max_bytes: int | None = None

    def _check_kv(self, layer: int, kv_layer: torch.Tensor, block_tokens: int) -> None:
        ks = self.kv_spec
        width = ks.row_elems
        dt = torch.uint8 if ks.latent_format == "fp8" else self.spec.torch_dtype
        if kv_layer.dim() != 3 or tuple(kv_layer.shape[1:]) != (block_tokens, width) or kv_layer.dtype != dt:
            raise ModelError(f"layer {layer}: latent KV tensor {tuple(kv_layer.shape)} {kv_layer.dtype}, expected "
                             f"[num_blocks, {block_tokens}, {width}] {dt}")

    # --- layer-wise forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        """Embed the batch's new tokens and precompute the RoPE tables (``[N, rope/2]``)."""
        ids = batch.input_ids.to(self.device)
        if int(ids.max()) >= self.spec.vocab_size or int(ids.min()) < 0:
            raise ModelError(f"token id out of range [0, {self.spec.vocab_size})")
        freqs = batch.positions.to(self.device, torch.float32)[:, None] * self.inv_freq[None, :]
        dt = self.spec.torch_dtype
        cos = (freqs.cos() * self._rope_scale).to(dt)
        sin = (freqs.sin() * self._rope_scale).to(dt)
        # (GLM-5.3-Flash's pooled selection decides even short prompts' attention, on the torch reference)
        sparse = self.spec.has_dsa and (self.spec.index_kpool > 0 or int(batch.seq_lens.max()) > self.spec.index_topk)
        hidden = self.model.embed_tokens(ids)
        if self.spec.scale_emb is not None:  # MiniCPM3: the scale rounded to the compute dtype, as transformers does
            hidden = hidden * torch.tensor(self.spec.scale_emb).to(hidden.dtype)
        q_scale = None
        if self.spec.query_scale_beta is not None:  # 1 + beta * log(1 + floor(p / orig)), rounded as transformers
            orig = float((self.spec.rope_scaling or {})["original_max_position_embeddings"])
            pos = batch.positions.to(self.device, torch.float32)
            q_scale = (1 + self.spec.query_scale_beta * torch.log(1 + torch.floor(pos / orig))).to(dt)[:, None, None]
        spans = None
        if not batch.is_decode and not sparse and self._decompress(batch):  # decided once per forward, not per layer
            cu = batch.cu_seqlens_q.tolist()
            spans = [(i, cu[i], cu[i + 1], n) for i, n in enumerate(batch.seq_lens.tolist()) if cu[i + 1] > cu[i]]
        return ForwardState(batch=batch, hidden=hidden, cos=cos, sin=sin, sparse=sparse, q_scale=q_scale,
                            mla_spans=spans)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (MiniCPM3 divides the normed state by ``logits_scaling`` first)."""
        h = cast(RMSNorm, self.model.norm)(h)
        if self.spec.logits_scaling is not None:
            h = h / self.spec.logits_scaling
        return cast(torch.Tensor, self.lm_head(h).float())

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        """Run layer ``layer`` (in order). ``kv_layer`` holds each sequence's cached latent prefix at its block
        table; the new tokens' latent rows are written into it, then every new token attends over its prefix."""
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        spec, b = self.spec, state.batch
        self._check_kv(layer, kv_layer, b.block_tokens)
        mod = cast(DecoderLayer, self.model.layers[layer])
        out = self.attention(cast(MLAttention, mod.self_attn), mod.input_layernorm(state.hidden), state, kv_layer)
        rs = spec.residual_scale  # MiniCPM3: each block's outputs scaled
        hid = state.hidden + (out if rs is None else out * rs)
        out = mod.mlp(mod.post_attention_layernorm(hid))
        post = getattr(mod, "post_mlp_layernorm", None)
        if post is not None:
            out = post(out)
        state.hidden = hid + (out if rs is None else out * rs)
        state.next_layer += 1

    def attention(self, attn: MLAttention, x: torch.Tensor, state: ForwardState,
                  kv_layer: torch.Tensor) -> torch.Tensor:
        """One layer's attention over the normed hidden states ``x``: the new tokens' latent rows (and indexer keys)
        written into ``kv_layer``, then every new token attends over its prefix -> ``o_proj``'s output."""
        spec, b = self.spec, state.batch
        n, h, r = x.shape[0], spec.n_heads, spec.kv_lora_rank
        nope, rope, vd = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        q_resid = gate = None
        if spec.q_lora_rank is None:
            q = attn.q_proj(x)
        elif spec.q_gate:  # A.X-K2
            c = attn.q_a_proj(x)
            q_resid = attn.q_a_layernorm(c)
            q, gate = attn.q_b_proj(torch.cat((q_resid, c), dim=-1)).view(n, h, -1).split([spec.qk_head_dim, vd], -1)
        else:
            q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
            q = attn.q_b_proj(q_resid)
        q = q.reshape(n, h, spec.qk_head_dim)
        lora_scales = spec.mla_lora_scales
        if lora_scales is not None:  # (LongCat-Flash: the query and key latents' LoRA scalings)
            q = q * lora_scales[0]
        if state.q_scale is not None:  # Mistral 4's position-dependent query scale
            q = q * state.q_scale
        q_nope, q_rot = q.split([nope, rope], dim=-1)
        ckv = attn.kv_a_proj_with_mqa(x)
        c, k_rot = ckv.split([r, rope], dim=-1)
        c = attn.kv_a_layernorm(c)
        if lora_scales is not None:
            c = c * lora_scales[1]
        q_rot = _rotate(q_rot, state.cos, state.sin, spec.rope_interleave)
        k_rot = _rotate(k_rot, state.cos, state.sin, spec.rope_interleave)
        latent = kv_layer[..., : self._latent_width]  # (a view: the indexer keys, if any, follow in each row)
        store_latent(torch.cat((c, k_rot), dim=-1), latent, b.slot_mapping, r, backend=self.backend)
        if attn.indexer is not None:
            self._store_index_keys(attn.indexer, x, state, kv_layer)
        sinks = cast(torch.Tensor | None, getattr(attn, "sinks", None))
        if state.mla_spans is not None and sinks is None:
            o = self._decompressed_attention(attn, q_nope, q_rot, latent, b, state.mla_spans)
        else:
            # absorbed products in fp32: a bf16 q_lat would round a kv_lora_rank-long sum per head
            w = attn.kv_b_proj.weight.view(h, nope + vd, r).float()
            q_lat = torch.einsum("nhd,hdr->nhr", q_nope.float(), w[:, :nope])
            qq = torch.cat((q_lat, q_rot.float()), dim=-1).contiguous()             # [N, H, R + rope] fp32
            if state.sparse:  # a sequence holds more than index_topk keys: each query attends to its selection only
                assert q_resid is not None  # (V3.2 has a q_lora_rank)
                o_lat = self._sparse_attention(attn.indexer, x, q_resid, qq, state, kv_layer, latent, sinks)
            elif sinks is not None:  # (Hy4: a sink per head in each softmax; on the torch reference)
                o_lat = self._sink_attention(qq, latent, b, sinks)
            elif b.is_decode:
                o_lat = mla_decode_attention(qq, latent, b.block_tables, b.seq_lens, self.scale, r,
                                             backend=self.backend)
            else:
                o_lat = mla_prefill_attention(qq, latent, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                              self.scale, r, backend=self.backend)
            o = torch.einsum("nhr,hvr->nhv", o_lat, w[:, nope:]).to(x.dtype)
        if gate is not None:  # (A.X-K2: each head's output scaled by the sigmoid of its gate, in fp32)
            o = (o * torch.sigmoid(gate.float())).to(o.dtype)
        head_gate = getattr(attn, "g_proj", None)
        if head_gate is not None:  # (Bailing hybrid: one gate per head, its sigmoid rounded to the compute dtype)
            o = o * torch.sigmoid(head_gate(x).float()).to(o.dtype)[..., None]
        channel_gate = getattr(attn, "gate_proj", None)
        if channel_gate is not None:  # (Hy4: a gate per output channel, in the compute dtype)
            o = o * torch.sigmoid(channel_gate(x).view(n, h, vd))
        return cast(torch.Tensor, attn.o_proj(o.reshape(n, h * vd)))

    def _sink_attention(self, qq: torch.Tensor, latent: torch.Tensor, b: SeqBatch,
                        sinks: torch.Tensor) -> torch.Tensor:
        """Absorbed attention with a sink logit per head (Hy4), causal over each sequence's keys, on the torch
        reference: ``[N, H, R]`` like the MLA kernels."""
        out = torch.empty((*qq.shape[:2], self.spec.kv_lora_rank), dtype=qq.dtype, device=qq.device)
        cu = b.cu_seqlens_q.tolist()
        for i in range(b.batch_size):
            lo, hi = cu[i], cu[i + 1]
            if hi == lo:
                continue
            n = int(b.seq_lens[i])
            qpos = b.positions[lo:hi].to(qq.device)
            mask = torch.arange(n, device=qq.device)[None, :] <= qpos[:, None]
            out[lo:hi] = mla_masked_attention(qq[lo:hi], latent, b.block_tables[i], n, self.scale,
                                              self.spec.kv_lora_rank, mask, sinks)
        return out

    def _decompress(self, b: SeqBatch) -> bool:
        """Whether this prefill attends in the decompressed form (:meth:`_decompressed_attention`): ``prefill_form``
        ``absorbed`` / ``decompressed``, or ``auto``: where it takes fewer FLOPs than the absorbed form (per head:
        the absorbed form pays ``2 (R + P) + 2 R`` per query-key pair plus ``2 R (nope + v)`` per query to fold
        ``kv_b_proj`` in and out; the decompressed one ``2 (nope + P) + 2 v`` per pair plus ``2 R (nope + v)`` per
        key to expand the latent), and its expanded keys and values of one sequence fit ``decompress_max_bytes``."""
        form = self.prefill_form
        if form != "auto":
            return form == "decompressed"
        spec = self.spec
        r, p, nope, vd = spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_nope_head_dim, spec.v_head_dim
        elem = torch.finfo(spec.torch_dtype).bits // 8
        limit = self.decompress_max_bytes
        if limit is None:
            dev = self.device
            limit = 1 << 30
            if dev.type == "cuda":
                limit = max(limit, min(4 << 30, torch.cuda.get_device_properties(dev).total_memory // 20))
        fold = 2 * r * (nope + vd)
        absorbed = decompressed = 0.0
        for m, n in zip((b.seq_lens - b.start_pos).tolist(), b.seq_lens.tolist(), strict=True):
            if n * spec.n_heads * (nope + p + vd) * elem > limit:
                return False
            pairs = m * (n - (m - 1) / 2)  # causal over the new rows, full over the prefix
            absorbed += pairs * (4 * r + 2 * p) + m * fold
            decompressed += pairs * (2 * (nope + p) + 2 * vd) + n * fold
        return decompressed < absorbed

    def _decompressed_attention(self, attn: MLAttention, q_nope: torch.Tensor, q_rot: torch.Tensor,
                                latent: torch.Tensor, b: SeqBatch,
                                spans: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Prefill attention in the form Hugging Face's and DeepSeek's prefill use: each sequence's latent rows
        (dequantized from FP8 if so stored) expanded by ``kv_b_proj`` into per-head keys and values, then
        ``scaled_dot_product_attention`` (FlashAttention on a GPU), causal from the bottom right (the new rows
        see the whole cached prefix) -> ``[N, H, v_head_dim]`` in the compute dtype. ``spans``: each sequence's
        ``(index, first new row, end, keys)`` with new rows (:meth:`prefill_begin` reads them off the batch once)."""
        spec = self.spec
        h, r, p = spec.n_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        nope, vd = spec.qk_nope_head_dim, spec.v_head_dim
        dt = q_nope.dtype
        bt = latent.shape[1]
        out = torch.empty((q_nope.shape[0], h, vd), dtype=dt, device=q_nope.device)
        pad = max(0, nope + p - vd)
        for i, lo, hi, n in spans:
            m = hi - lo
            nb = -(-n // bt)
            rows = latent[b.block_tables[i, :nb].long()].reshape(nb * bt, latent.shape[2])[:n]
            if rows.dtype == torch.uint8:
                rows = dequantize_latent_fp8(rows, r, dt)
            kvb = attn.kv_b_proj(rows[:, :r]).view(n, h, nope + vd)
            k_nope, v = kvb.split([nope, vd], dim=-1)
            # [1, H, tokens, dim]: the fused kernels (flash, memory-efficient) take 4-D inputs only
            k = torch.cat((k_nope, rows[:, None, r:].expand(n, h, p)), dim=-1).transpose(0, 1)[None]
            q = torch.cat((q_nope[lo:hi], q_rot[lo:hi]), dim=-1).transpose(0, 1)[None]
            if pad:  # FlashAttention takes one head size for keys and values: zero columns, cut off below
                v = F.pad(v, (0, pad))
            mask = None if m == n else causal_lower_right(m, n)
            o = F.scaled_dot_product_attention(q, k, v.transpose(0, 1)[None], attn_mask=mask,
                                               is_causal=mask is None, scale=self.scale)
            out[lo:hi] = o[0].transpose(0, 1)[..., :vd]
        return out

    def _store_index_keys(self, indexer: Indexer, x: torch.Tensor, state: ForwardState,
                          kv_layer: torch.Tensor) -> None:
        """Write the new tokens' indexer keys into their rows."""
        b = state.batch
        keys = indexer.keys(x, state.cos, state.sin)
        pool = _index_keys(kv_layer, self._latent_width, x.dtype)[..., :self.spec.index_row]
        slots = b.slot_mapping.long()
        keep = slots >= 0
        bt = kv_layer.shape[1]
        pool[slots[keep] // bt, slots[keep] % bt] = keys[keep].to(pool.dtype)

    def _sparse_attention(self, indexer: Indexer | None, x: torch.Tensor, q_resid: torch.Tensor, qq: torch.Tensor,
                          state: ForwardState, kv_layer: torch.Tensor, latent: torch.Tensor,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Each sequence's queries over the keys its indexer selects (:func:`dualpath.model.dsa.selected_keys`),
        on the torch reference: ``[N, H, R]`` like the MLA kernels. A layer without an indexer (GLM-5's shared
        ones) reuses the selection of the last layer before it that has one, kept in ``state.dsa_masks``."""
        b, spec = state.batch, self.spec
        if indexer is not None:
            iq, iw = indexer.queries(x, q_resid, state.cos, state.sin)
            pool = _index_keys(kv_layer, self._latent_width, x.dtype)[..., :spec.index_row]
            state.dsa_masks = {}
        elif state.dsa_masks is None:
            raise ModelError(f"layer {state.next_layer} reuses an indexer selection, but no earlier layer made one")
        bt = kv_layer.shape[1]
        out = torch.empty((*qq.shape[:2], spec.kv_lora_rank), dtype=qq.dtype, device=qq.device)
        cu = b.cu_seqlens_q.tolist()
        for i in range(b.batch_size):
            lo, hi = cu[i], cu[i + 1]
            if hi == lo:
                continue
            n = int(b.seq_lens[i])
            table = b.block_tables[i]
            if indexer is not None:
                nb = -(-n // bt)
                keys = pool[table[:nb].long()].reshape(nb * bt, -1)[:n]
                qpos = b.positions[lo:hi].to(qq.device)
                if indexer.kpool:  # (GLM-5.3-Flash: pools of keys, plus each query's open pool)
                    state.dsa_masks[i] = pooled_selection(iq[lo:hi], iw[lo:hi], keys, indexer.index_kpool_compress_ape,
                                                          qpos, spec.index_topk, indexer.kpool)
                else:
                    state.dsa_masks[i] = selected_keys(iq[lo:hi], iw[lo:hi], keys, qpos, spec.index_topk)
            out[lo:hi] = mla_masked_attention(qq[lo:hi], latent, table, n, self.scale, spec.kv_lora_rank,
                                              state.dsa_masks[i], sinks)
        return out
