"""A Llama-family decoder (Llama, Mistral, Ministral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2, Gemma 3, OLMo 2, OLMo 3, SmolLM3,
Granite, and the MoE relatives Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss and GLM-4.5) with a layer-wise forward over
paged KV.

Parameter names equal Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...), so a transformers
state dict loads as is. The MoE blocks use Qwen-MoE's names for every family (``mlp.gate``,
``mlp.experts.{i}.gate_proj/up_proj/down_proj``, ``mlp.shared_expert``, ``mlp.shared_expert_gate``); the loader
maps Mixtral's (``block_sparse_moe``, ``w1/w3/w2``) and transformers' packed experts onto them, and splits
Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` into these modules' ``q/k/v_proj`` / ``gate_proj`` + ``up_proj``.

The forward is split so that a prefill engine can wait for a layer's cached KV before computing that layer::

    state = model.prefill_begin(batch)              # embeddings, positions, slot mapping
    for l in range(spec.n_layers):
        kv = await_layer_kv(l)                      # [num_blocks, bt, 2, H, D] holding every cached prefix
        model.prefill_layer(l, state, kv)           # writes the new tokens' K/V into kv, updates hidden
    logits = model.prefill_end(state)               # [B, vocab] at each sequence's last new token

Keys and values are stored after RoPE, in the KV tensor's dtype. A batch where every sequence has exactly one
new token runs the paged decode kernel; anything else the prefill-with-prefix kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kernels import paged_decode_attention, paged_prefill_attention, store_kv
from dualpath.model.archs import SIGMOID_ROUTER_ARCHS
from dualpath.model.gpt_oss import GptOssMoE
from dualpath.model.layernorm_family import SCALED_EMBEDDINGS, SINUSOIDAL
from dualpath.model.llama4 import Llama4MoE, l2_norm, nope_query_scale
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts, softmax_topk, sparsemixer_top2
from dualpath.model.rope import rope_frequencies, rope_inv_freq
from dualpath.model.spec import GROUP_ROUTER_ARCHS, ModelSpec

__all__ = ["ForwardState", "LlamaModel", "PrefillState", "SeqBatch"]


@dataclass
class SeqBatch:
    """A batch of sequences, each with ``start_pos`` cached tokens and a chunk of new tokens.

    Build it with :meth:`build` (from lists) or :meth:`decode` (from tensors, one new token each).
    ``block_tables[b]`` must cover ``seq_lens[b] = start_pos[b] + new_b`` tokens.
    """

    input_ids: torch.Tensor      # [N] int64, new tokens of all sequences concatenated
    positions: torch.Tensor      # [N] int64
    slot_mapping: torch.Tensor   # [N] int64, flat pool slot of each new token
    cu_seqlens_q: torch.Tensor   # [B+1] int32
    seq_lens: torch.Tensor       # [B] int32, cached + new
    start_pos: torch.Tensor      # [B] int32, cached tokens
    block_tables: torch.Tensor   # [B, max_blocks] int32
    last_index: torch.Tensor     # [B] int64, row of each sequence's last new token
    block_tokens: int
    is_decode: bool

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def page_offsets(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each new token's ``(page, offset in the page)`` on ``device`` (its slot, split): where the families that
        write their own rows (DeepSeek-V4, Qwen4-Exp, Doge) put them."""
        slots = self.slot_mapping.to(device, torch.int64)
        return slots // self.block_tokens, slots % self.block_tokens

    @classmethod
    def build(cls, tokens: Sequence[Sequence[int]], start_pos: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_tokens: int, device: str | torch.device = "cpu") -> SeqBatch:
        if not (len(tokens) == len(start_pos) == len(block_tables)) or not tokens:
            raise ModelError("SeqBatch needs one token list, start position and block table per sequence")
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        lens: list[int] = []
        for b, (toks, start, table) in enumerate(zip(tokens, start_pos, block_tables, strict=True)):
            if len(toks) == 0:
                raise ModelError(f"sequence {b} has no new tokens")
            if start < 0:
                raise ModelError(f"sequence {b}: negative start position {start}")
            end = start + len(toks)
            need = -(-end // block_tokens)
            if len(table) < need:
                raise ModelError(
                    f"sequence {b}: block table has {len(table)} blocks but {end} tokens need {need} "
                    f"blocks of {block_tokens}"
                )
            ids.extend(int(t) for t in toks)
            for p in range(start, end):
                pos.append(p)
                slots.append(int(table[p // block_tokens]) * block_tokens + p % block_tokens)
            cu.append(cu[-1] + len(toks))
            lens.append(end)
        width = max(1, max(len(t) for t in block_tables))
        bt = torch.zeros((len(tokens), width), dtype=torch.int32)
        for b, table in enumerate(block_tables):
            if len(table):
                bt[b, : len(table)] = torch.tensor(list(table), dtype=torch.int32)
        dev = torch.device(device)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            cu_seqlens_q=cu_t.to(dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            start_pos=torch.tensor(list(start_pos), dtype=torch.int32, device=dev),
            block_tables=bt.to(dev),
            last_index=(cu_t[1:] - 1).to(dtype=torch.int64, device=dev),
            block_tokens=block_tokens,
            is_decode=all(len(t) == 1 for t in tokens),
        )

    @classmethod
    def decode(cls, token_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
               block_tokens: int) -> SeqBatch:
        """One new token per sequence at ``positions [B]`` (so ``seq_lens = positions + 1``), tensors kept."""
        dev = token_ids.device
        pos = positions.to(device=dev, dtype=torch.int64)
        tables = block_tables.to(device=dev, dtype=torch.int32)
        b = int(token_ids.shape[0])
        if tables.shape[0] != b or pos.shape[0] != b:
            raise ModelError("decode: token_ids, positions and block_tables disagree on the batch size")
        blk_idx = pos // block_tokens
        if int(blk_idx.max()) >= tables.shape[1]:
            raise ModelError(f"decode: a position needs more than the {tables.shape[1]} blocks of its table")
        phys = tables.gather(1, blk_idx[:, None]).squeeze(1).to(torch.int64)
        ar = torch.arange(b + 1, dtype=torch.int32, device=dev)
        return cls(
            input_ids=token_ids.to(torch.int64),
            positions=pos,
            slot_mapping=phys * block_tokens + pos % block_tokens,
            cu_seqlens_q=ar,
            seq_lens=(pos + 1).to(torch.int32),
            start_pos=pos.to(torch.int32),
            block_tables=tables,
            last_index=ar[1:].to(torch.int64) - 1,
            block_tokens=block_tokens,
            is_decode=True,
        )


@dataclass
class ForwardState:
    """What flows between layers of one batch's forward: hidden states and the batch's index tensors."""

    batch: SeqBatch
    hidden: torch.Tensor   # [N, hidden]
    cos: torch.Tensor      # [N, rotary_dim] (head_dim unless partial RoPE)
    sin: torch.Tensor
    next_layer: int = 0
    local: tuple[torch.Tensor, torch.Tensor] | None = None  # Gemma 3: the sliding layers' own (cos, sin)
    sparse: bool = False  # DeepSeek-V3.2: some sequence holds more than index_topk keys (decided once per batch)
    # DeepSeek Sparse Attention: each sequence's key selection [M, n] by the last layer with an indexer (GLM-5's
    # shared layers reuse it)
    dsa_masks: dict[int, torch.Tensor] | None = None
    # MLA: each sequence's (index, first new row, end, keys) when this prefill attends in the decompressed form
    mla_spans: list[tuple[int, int, int, int]] | None = None
    q_scale: torch.Tensor | None = None  # each query's position scale [N, 1, 1] (LlamaModel._query_scale), or None
    # a family's values carried between layers (LongCat-Flash: a layer's shortcut-MoE output, from its first
    # sublayer to its second; Mistral Large 4: the KV-source layers' new latent rows)
    carry: Any = None


PrefillState = ForwardState


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalized in fp32, cast back, times ``weight``. ``offset`` (Gemma): times ``1 + weight``
    in fp32, then cast back (Gemma rounds once, after the scaling). ``fp32_scale`` (gpt-oss, whose norms
    transformers keeps in fp32): times ``weight`` in fp32, then cast back."""

    def __init__(self, dim: int, eps: float, offset: bool = False, fp32_scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset
        self.fp32_scale = fp32_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dt)
        if self.fp32_scale:
            return (h * self.weight.float()).to(dt)
        return self.weight * h.to(dt)


def _norm(spec: ModelSpec, dim: int) -> nn.Module:
    """A layer's or the model's norm in the family's style: RMSNorm, or LayerNorm with a bias for the LayerNorm
    families (:mod:`dualpath.model.layernorm_family`)."""
    if spec.architecture in ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text"):  # bias-free, in fp32 (Command A+'s: or RMSNorms)
        return RMSNorm(dim, spec.rms_eps) if spec.rms_norms else HeadLayerNorm(0, dim, spec.rms_eps)
    if spec.architecture == "nemotron":
        return LayerNorm1P(dim, eps=spec.rms_eps)
    if spec.architecture in ("mpt", "dbrx"):  # bias-free
        return nn.LayerNorm(dim, eps=spec.rms_eps, bias=False)
    if spec.architecture == "olmo":  # neither weight nor bias
        return PlainLayerNorm(dim, spec.rms_eps)
    if spec.plain_norms:  # OPT's layer_norm_elementwise_affine false: nn.LayerNorm without weight or bias
        return nn.LayerNorm(dim, eps=spec.rms_eps, elementwise_affine=False)
    if spec.architecture == "nanochat":
        return PlainRMSNorm(spec.rms_eps)
    if spec.architecture in ("jais2", "phimoe"):  # a LayerNorm with a bias, on the Llama path
        return nn.LayerNorm(dim, eps=spec.rms_eps)
    if spec.layer_norm:
        return nn.LayerNorm(dim, eps=spec.rms_eps)
    return RMSNorm(dim, spec.rms_eps, spec.gemma_style, fp32_scale=spec.fp32_norm_scale)


class PlainLayerNorm(nn.Module):
    """OLMo's LayerNorm: no weight, no bias; normalized in fp32, rounded back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)


class PlainRMSNorm(nn.Module):
    """NanoChat's RMSNorm: no weight; normalized in fp32, rounded back (Llama 4's ``L2Norm`` too)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_norm(x, self.eps)


class LayerNorm1P(nn.LayerNorm):
    """Nemotron's LayerNorm: scaled by ``1 + weight`` (zero-centred weights), with a bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class HeadLayerNorm(nn.Module):
    """A bias-free LayerNorm normalized in fp32 and rounded once: StableLM's and Cohere's query / key norms, one per
    head (``weight [heads, head_dim]``), and with ``heads`` 0 Cohere's hidden-state norm (``weight [dim]``)."""

    def __init__(self, heads: int, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim) if heads else torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, heads, dim]
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (h * self.weight.float()).to(x.dtype)


class XIELU(nn.Module):
    """xIELU (Apertus's MLP activation): ``alpha_p * x^2 + beta * x`` for ``x > 0``, else
    ``(expm1(min(x, eps)) - x) * alpha_n + beta * x``, with ``alpha_p = softplus(a_p)``, ``alpha_n = beta +
    softplus(a_n)`` from the learned ``a_p`` / ``a_n``; ``beta`` and ``eps`` are read from the checkpoint too
    (parameters here that are not trained, so that loading and saving carry them)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha_p = nn.Parameter(torch.log(torch.expm1(torch.tensor(0.8))).reshape(1))
        self.alpha_n = nn.Parameter(torch.log(torch.expm1(torch.tensor(0.3))).reshape(1))
        self.beta = nn.Parameter(torch.tensor(0.5), requires_grad=False)
        self.eps = nn.Parameter(torch.tensor(-1e-6), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.minimum(x, self.eps)) - x) * alpha_n + self.beta * x)


class PlainMLP(nn.Module):
    """The LayerNorm families' MLP ``down(act(up(x)))`` (biases as the spec says)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        from dualpath.model.layernorm_family import activation

        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.act: Callable[[torch.Tensor], torch.Tensor]
        if spec.activation == "xielu":  # Apertus: an activation with learned parameters (mlp.act_fn.*)
            self.act_fn = XIELU()
            self.act = self.act_fn
        else:
            self.act = activation(str(spec.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.act(self.up_proj(x))))


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int = 0) -> None:
        super().__init__()
        hq, hkv, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        # (GPT-NeoX-Japanese: only the last layer's output projection has a bias)
        o_bias = spec.o_bias or (spec.architecture == "gpt_neox_japanese" and layer == spec.n_layers - 1)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=o_bias)
        self.q_norm: nn.Module
        self.k_norm: nn.Module
        if spec.qk_layernorm and spec.architecture in ("phi", "persimmon"):  # one LayerNorm (bias) shared by every head
            self.q_norm = nn.LayerNorm(d, eps=spec.rms_eps)
            self.k_norm = nn.LayerNorm(d, eps=spec.rms_eps)
        elif spec.qk_layernorm:  # StableLM, Cohere: one per head
            self.q_norm = HeadLayerNorm(hq, d, spec.rms_eps)
            self.k_norm = HeadLayerNorm(hkv, d, spec.rms_eps)
        elif spec.architecture == "nanochat":  # weightless, per head
            self.q_norm = PlainRMSNorm(spec.rms_eps)
            self.k_norm = PlainRMSNorm(spec.rms_eps)
        elif spec.qk_norm:  # Qwen3; Gemma 3 (by 1 + weight); Flint (gpt-oss's norms: scaled in fp32)
            self.q_norm = RMSNorm(d, spec.rms_eps, spec.gemma_style, fp32_scale=spec.fp32_norm_scale)
            self.k_norm = RMSNorm(d, spec.rms_eps, spec.gemma_style, fp32_scale=spec.fp32_norm_scale)
        elif spec.qk_norm_full:  # OLMo 2 and 3: over every head at once
            self.q_norm = _norm(spec, hq * d)
            self.k_norm = _norm(spec, hkv * d)
        if spec.attention_sinks:  # gpt-oss: one logit per query head in each softmax's denominator
            self.sinks = nn.Parameter(torch.zeros(hq))
        if spec.attn_output_gate:  # Trinity: the attention's output gated per channel before o_proj
            self.gate_proj = nn.Linear(spec.hidden_size, hq * d, bias=False)
        if spec.architecture == "bitnet":  # an RMSNorm over the attention's output, before o_proj
            self.attn_sub_norm = RMSNorm(hq * d, spec.rms_eps)


class MLP(FeedForward):
    """The dense MLP of ``intermediate_size``: SwiGLU, for Gemma GeGLU ``down(gelu_tanh(gate(x)) * up(x))``, or
    ``down(act(gate(x)) * up(x))`` with the spec's ``activation`` where a config names another ``hidden_act``."""

    def __init__(self, spec: ModelSpec) -> None:
        from dualpath.model.layernorm_family import activation

        name = spec.activation or ("gelu_tanh" if spec.gemma_style else "silu")
        super().__init__(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias,
                         act=None if name == "silu" else activation(name))


class BitNetMLP(FeedForward):
    """BitNet's gated MLP: ``down(norm(act(gate(x)) * up(x)))``, an RMSNorm (``ffn_sub_norm``) before ``down_proj``,
    the activation by ``hidden_act`` (ReLU squared by default)."""

    def __init__(self, spec: ModelSpec) -> None:
        from dualpath.model.layernorm_family import activation

        super().__init__(spec.hidden_size, spec.intermediate_size)
        self.ffn_sub_norm = RMSNorm(spec.intermediate_size, spec.rms_eps)
        self.act = activation(str(spec.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.down_proj(self.ffn_sub_norm(self.act(self.gate_proj(x)) * self.up_proj(x))))


class _Fp32Linear(nn.Linear):
    """A router's linear layer whose weights stay fp32 in a bf16 model (LayerwiseDecoder._build)."""

    keep_fp32 = True


class _Statics(nn.Module):
    """ERNIE 4.5 MoE's ``moe_statics``: the router's correction bias ``[1, n_experts]`` (fp32)."""

    keep_fp32 = True

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, n_experts), requires_grad=False)


class _SigmoidGate(nn.Module):
    """Flint's and Kolibri 1's router: an fp32 linear layer (``weight``), and for Kolibri 1 a correction bias that
    joins the logits for the choice only (``e_score_correction_bias``)."""

    def __init__(self, hidden: int, n_experts: int, bias: bool, fp32: bool = True) -> None:
        super().__init__()
        self.keep_fp32 = fp32  # (Command A+'s sigmoid router runs in the compute dtype)
        self.weight = nn.Parameter(torch.zeros(n_experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(n_experts), requires_grad=False) if bias else None

    def route(self, x: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(idx [N, k], weights [N, k] fp32)``: the ``k`` best logits (plus the bias), weighted by their sigmoid."""
        if not self.keep_fp32:  # (Command A+: the top k of the logits in the compute dtype, their sigmoid there)
            logits = F.linear(x, self.weight)
            top, idx = logits.topk(k, dim=-1)
            w = top.sigmoid()
            return idx, (w / w.sum(dim=-1, keepdim=True) if renormalize else w)
        logits = F.linear(x.float(), self.weight.float())
        choice = logits if self.e_score_correction_bias is None else logits + self.e_score_correction_bias.float()
        idx = choice.topk(k, dim=-1)[1]
        w = logits.gather(-1, idx).sigmoid()
        return idx, (w / w.sum(dim=-1, keepdim=True) if renormalize else w)


class SparseMoE(nn.Module):
    """Mixtral / Qwen2-MoE / Qwen3-MoE sparse block: a linear router (``gate``, in the compute dtype, as
    transformers runs it), softmax in fp32, top-k (renormalized with ``norm_topk_prob``; Qwen rounds the weights
    to the compute dtype, Mixtral keeps them fp32), the routed experts, and for Qwen2-MoE a shared expert scaled by
    ``sigmoid(shared_expert_gate(x))`` (GraniteMoE-Shared: an ungated one). GraniteMoE's router takes the softmax of
    the top-k logits, which is this softmax renormalized over the top k. Flint and Kolibri 1 route by sigmoid
    (:class:`_SigmoidGate`) and add an ungated shared expert."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.n_experts_per_tok
        self.renormalize = spec.norm_topk_prob
        # ERNIE 4.5 MoE: an fp32 router (weights kept fp32, as transformers keeps them) picking by softmax scores
        # plus a correction bias, weighted by the scores over max(their sum, moe_norm_min)
        self.norm_min = spec.moe_norm_min
        self.fp32_router = spec.architecture in ("ernie4_5_moe", "hunyuan_v1_moe")  # (Hunyuan's: softmax top-k)
        if self.norm_min is not None:
            self.moe_statics = _Statics(spec.n_experts)
        self.round_weights = spec.architecture != "mixtral"
        self.jitter_eps = spec.router_jitter_eps  # PhiMoE's sparsemixer router (None: softmax top-k)
        self.gate: nn.Linear | _SigmoidGate
        self.sigmoid_router = spec.architecture in SIGMOID_ROUTER_ARCHS or spec.expert_selection == "sigmoid"
        self.shared_average = bool(spec.shared_expert_average)  # (Command A+'s default: (routed + shared) / 2)
        if self.sigmoid_router:
            self.gate = _SigmoidGate(spec.hidden_size, spec.n_experts, bias=spec.architecture == "kolibri1",
                                     fp32=spec.architecture in SIGMOID_ROUTER_ARCHS)
        else:
            self.gate = (_Fp32Linear if self.fp32_router else nn.Linear)(spec.hidden_size, spec.n_experts, bias=False)
        act = activation_of(spec)  # (transformers' experts apply ACT2FN[hidden_act] to the gate; Aria's routed
        routed = None if spec.architecture == "aria_text" else act  # ones always SiLU, its shared ones hidden_act)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_intermediate_size, act=routed)
                                     for _ in range(spec.n_experts))
        self.shared_expert: FeedForward | None = None
        self.shared_gate = spec.architecture == "qwen2_moe"  # (GraniteMoE-Shared's shared expert is ungated)
        if spec.shared_expert_intermediate_size:
            self.shared_expert = FeedForward(spec.hidden_size, spec.shared_expert_intermediate_size,
                                             bias=bool(spec.mlp_has_bias), act=act)  # (ERNIE 4.5 MoE's, Aria's)
            if self.shared_gate:
                self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_min is not None:  # ERNIE 4.5 MoE
            probs = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
            idx = (probs + self.moe_statics.e_score_correction_bias.float()).topk(self.top_k, dim=-1)[1]
            w = probs.gather(-1, idx)
            w = (w / w.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)).to(x.dtype)
            out = dispatch_experts(x, idx, w, self.experts)
            return out + self.shared_expert(x) if self.shared_expert is not None else out
        if self.sigmoid_router:  # Flint, Kolibri 1 (their weights stay fp32, as transformers computes them)
            assert isinstance(self.gate, _SigmoidGate)
            idx, w = self.gate.route(x, self.top_k, self.renormalize)
            out = dispatch_experts(x, idx, w, self.experts)
            return self._with_shared(x, out)
        logits = F.linear(x.float(), self.gate.weight.float()) if self.fp32_router else self.gate(x)
        if self.jitter_eps is not None:  # PhiMoE
            idx, w = sparsemixer_top2(logits, self.jitter_eps)
        else:
            idx, w = softmax_topk(logits, self.top_k, self.renormalize)
        if self.round_weights:
            w = w.to(logits.dtype)
        out = dispatch_experts(x, idx, w, self.experts)
        if self.shared_expert is not None and self.shared_gate:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out
        return self._with_shared(x, out)

    def _with_shared(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The routed output plus the ungated shared expert's, or their mean (Command A+'s ``average``)."""
        if self.shared_expert is None:
            return out
        return (out + self.shared_expert(x)) / 2 if self.shared_average else out + self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int = 0) -> None:
        super().__init__()
        if not spec.post_norms:  # OLMo 2 and 3 norm a block's output, not its input
            self.input_layernorm = _norm(spec, spec.hidden_size)
        self.self_attn = Attention(spec, layer)
        if not spec.shared_norm_parallel:  # (Phi's attention and MLP read one input norm)
            self.post_attention_layernorm = _norm(spec, spec.hidden_size)
        if spec.post_norms:
            self.post_feedforward_layernorm = _norm(spec, spec.hidden_size)
        self.mlp: nn.Module
        if spec.architecture == "gpt_oss":
            self.mlp = GptOssMoE(spec)
        elif spec.architecture == "llama4_text" and spec.is_moe_layer(layer):
            self.mlp = Llama4MoE(spec)
        elif spec.architecture in GROUP_ROUTER_ARCHS and spec.is_moe_layer(layer):
            from dualpath.model.deepseek import MoE  # (deepseek imports this module)

            self.mlp = MoE(_glm_routing(spec))  # type: ignore[arg-type]
        elif spec.architecture == "bitnet":
            self.mlp = BitNetMLP(spec)
        elif not spec.gated_mlp:
            self.mlp = PlainMLP(spec)
        else:
            self.mlp = SparseMoE(spec) if spec.is_moe_layer(layer) else MLP(spec)
        if spec.glm4_norms:  # norms on the attention's and the MLP's outputs
            self.post_self_attn_layernorm = _norm(spec, spec.hidden_size)
            self.post_mlp_layernorm = _norm(spec, spec.hidden_size)
        if spec.sandwich_norms:  # Gemma 2 (by 1 + weight), Trinity
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, spec.gemma_style)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps, spec.gemma_style)


def _glm_routing(spec: ModelSpec) -> SimpleNamespace:
    """GLM-4.5's MoE block is DeepSeek-V3's (sigmoid router with a correction bias and groups, routed experts,
    shared experts): the fields :class:`dualpath.model.deepseek.MoE` reads, from a ``glm4_moe`` spec; MiniMax-M2's
    is the same with one group, a factor of 1 and no shared expert."""
    return SimpleNamespace(
        n_routed_experts=spec.n_experts, hidden_size=spec.hidden_size, topk_method="noaux_tc", scoring_func="sigmoid",
        num_experts_per_tok=spec.n_experts_per_tok, n_group=spec.n_group, topk_group=spec.topk_group,
        norm_topk_prob=spec.norm_topk_prob, routed_scaling_factor=spec.routed_scaling_factor,
        moe_intermediate_size=spec.moe_intermediate_size,
        n_shared_experts=spec.shared_expert_intermediate_size // spec.moe_intermediate_size,
        activation=spec.activation, shared_bias=bool(spec.mlp_has_bias))


class SinusoidalPositions(nn.Module):
    """A sinusoidal position table, computed in fp32 and held in the model's dtype, as transformers holds its buffer.
    fairseq's (XGLM): row ``p`` is ``[sin(p w_i), cos(p w_i)]`` with ``w_i = exp(-i log(10000) / (dim / 2 - 1))``,
    row 1 (the padding id's) zero, positions read from row 2. ``ctrl``: ``w_i = 10000 ** (-2 i / dim)``, positions
    from row 0."""

    weight: torch.Tensor

    def __init__(self, rows: int, dim: int, padding_row: int = 1, ctrl: bool = False) -> None:
        super().__init__()
        import math

        half = dim // 2
        if ctrl:  # (its angle_defn: pos / 10000 ** (2 (i // 2) / dim), the even columns' sines, the odd ones' cosines)
            i = torch.arange(dim, dtype=torch.int64).float()
            angles = torch.arange(rows, dtype=torch.int64).float()[:, None] * (
                1 / torch.pow(10000, (2 * (i // 2)) / dim))[None, :]
            self.register_buffer("weight", torch.cat([torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])], dim=-1),
                                 persistent=False)
            return
        freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
        angles = torch.arange(rows, dtype=torch.int64).float()[:, None] * freq[None, :]
        table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if dim % 2:
            table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
        table[padding_row] = 0
        self.register_buffer("weight", table, persistent=False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[rows]


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        width = spec.embed_proj_dim or spec.hidden_size
        self.embed_tokens = nn.Embedding(spec.vocab_size, width)
        if spec.embed_proj_dim:  # OPT's word_embed_proj_dim: embeddings projected in, the last hidden state out
            self.project_in = nn.Linear(width, spec.hidden_size, bias=False)
            self.project_out = nn.Linear(spec.hidden_size, width, bias=False)
        if spec.architecture in ("bloom", "nanochat"):  # Bloom's word_embeddings_layernorm; NanoChat's norm
            self.embed_norm = _norm(spec, spec.hidden_size)
        self.embed_positions: nn.Module
        if spec.architecture in SINUSOIDAL:  # XGLM's (fairseq's, from row 2) or CTRL's sinusoids: a buffer
            self.embed_positions = SinusoidalPositions(spec.max_position + spec.position_offset, spec.hidden_size,
                                                       ctrl=spec.architecture == "ctrl")
        elif spec.learned_positions:  # GPT-2's wpe (OPT's starts two rows before position 0)
            self.embed_positions = nn.Embedding(spec.max_position + spec.position_offset, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.n_layers))
        self.norm: nn.Module | None = (
            None if spec.post_layer_norm or spec.no_final_norm  # (OPT-350m's post-norm blocks; _remove_final_layer_norm)
            else nn.LayerNorm(spec.hidden_size, eps=spec.final_norm_eps) if spec.final_norm_eps is not None  # CTRL's
            else _norm(spec, spec.hidden_size))


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies ``theta ** (-2i / dim)`` over ``dim`` rotated dims (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


@dataclass
class TypedRopeState(ForwardState):
    """:class:`ForwardState` plus each layer type's RoPE tables (:func:`rope_tables`)."""

    tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def rope_tables(positions: torch.Tensor, inv_freqs: Mapping[str, torch.Tensor],
                dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer type's ``(cos, sin)`` ``[N, 2 * len(inv_freq)]`` at fp32 ``positions``, rounded to ``dtype`` (the
    families with a RoPE per layer type: Gemma 3n / 4, MiMo-V2-Flash, Laguna, the ModernBERT decoder)."""
    out = {}
    for kind, inv in inv_freqs.items():
        freqs = positions[:, None] * inv.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        out[kind] = (emb.cos().to(dtype), emb.sin().to(dtype))
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head (all of them unless partial), the rest passed."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, x[..., r:]), dim=-1)


class LayerwiseDecoder(nn.Module):
    """What every decoder here shares: ``prefill_begin`` / ``prefill_layer`` (model-specific) drive the
    layer-wise forward; the whole forward, the logits and a decode step are built on them. Subclasses set
    ``spec`` (with ``n_layers``), ``model`` (a backbone with ``embed_tokens`` and ``norm``) and ``lm_head``."""

    spec: Any
    model: Any
    lm_head: nn.Linear

    def _build(self, spec: Any, backbone: nn.Module, device: str | torch.device, backend: str) -> None:
        """Set the spec, the backbone and the LM head (tied to the embeddings when the spec says so), then move
        everything to ``device`` in the spec's dtype."""
        self.spec = spec
        self.backend = backend
        self.model = backbone
        self.lm_head = nn.Linear(getattr(spec, "embed_proj_dim", None) or spec.hidden_size,
                                 getattr(spec, "output_vocab_size", None) or spec.vocab_size,
                                 bias=bool(getattr(spec, "lm_head_bias", False)))
        if spec.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.to(device=device, dtype=spec.torch_dtype)
        for m in self.modules():  # the routers transformers keeps in fp32 (_keep_in_fp32_modules) stay fp32 here
            if getattr(m, "keep_fp32", False):
                m.float()

    @property
    def device(self) -> torch.device:
        return cast(nn.Embedding, self.model.embed_tokens).weight.device

    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        raise NotImplementedError

    def checked_ids(self, batch: SeqBatch) -> torch.Tensor:
        """The batch's token ids on the model's device; a :class:`ModelError` for one outside the vocabulary."""
        ids = batch.input_ids.to(self.device)
        if int(ids.max()) >= self.spec.vocab_size or int(ids.min()) < 0:
            raise ModelError(f"token id out of range [0, {self.spec.vocab_size})")
        return ids

    @staticmethod
    def check_layer(layer: int, state: ForwardState, kv_layer: torch.Tensor, page: tuple[int, ...]) -> None:
        """Layers run in order, each over a ``[num_blocks, *page]`` KV tensor; else a :class:`ModelError`."""
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        if kv_layer.dim() != 1 + len(page) or tuple(kv_layer.shape[1:]) != tuple(page):
            raise ModelError(f"layer {layer}: KV tensor shape {tuple(kv_layer.shape)}, expected [num_blocks, "
                             f"{tuple(page)}]")

    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def prefill_end(self, state: ForwardState, all_positions: bool = False) -> torch.Tensor:
        """Logits ``[B, vocab]`` at each sequence's last new token (``[N, vocab]`` with ``all_positions``)."""
        if state.next_layer != self.spec.n_layers:
            raise ModelError(f"prefill_end after {state.next_layer} of {self.spec.n_layers} layers")
        return self.head(state.hidden if all_positions else state.hidden[state.batch.last_index])

    @torch.no_grad()
    def logits_at(self, state: ForwardState, rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[len(rows), vocab]`` at rows ``rows`` of the batch's new tokens, after the last
        layer (what :meth:`prefill_end` gives for the last rows; prompt log-probabilities take other rows)."""
        if state.next_layer != self.spec.n_layers:
            raise ModelError(f"logits_at after {state.next_layer} of {self.spec.n_layers} layers")
        return self.head(state.hidden[rows.to(state.hidden.device)])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: float32 logits of hidden states ``h``."""
        return cast(torch.Tensor, self.lm_head(cast(nn.Module, self.model.norm)(h)).float())

    # --- whole forward -----------------------------------------------------------------------------------
    def forward(self, batch: SeqBatch, kv_layers: Sequence[torch.Tensor],
                all_positions: bool = False) -> torch.Tensor:
        if len(kv_layers) != self.spec.n_layers:
            raise ModelError(f"got KV for {len(kv_layers)} layers, model has {self.spec.n_layers}")
        state = self.prefill_begin(batch)
        for layer in range(self.spec.n_layers):
            self.prefill_layer(layer, state, kv_layers[layer])
        return self.prefill_end(state, all_positions)

    def decode_step(self, token_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                    kv_layers: Sequence[torch.Tensor], block_tokens: int | None = None) -> torch.Tensor:
        """One decode step for ``B`` sequences: token ``token_ids[b]`` at ``positions[b]`` -> ``[B, vocab]``."""
        bt = block_tokens or int(kv_layers[0].shape[1])
        return self.forward(SeqBatch.decode(token_ids, positions, block_tables, bt), kv_layers)


class TypedRopeDecoder(LayerwiseDecoder):
    """A decoder with a RoPE per layer type (its spec's ``rope_by_type``: type -> base, or (base, partial factor))
    and windows by layer: :meth:`prefill_begin` embeds (:meth:`embed`) and builds every type's tables (MiMo-V2-Flash,
    Laguna, the ModernBERT decoder)."""

    def _typed_rope(self, spec: Any) -> None:
        self.inv_freq: dict[str, torch.Tensor] = {}
        for kind, rope in spec.rope_by_type.items():
            theta, partial = rope if isinstance(rope, tuple) else (rope, 1.0)
            self.inv_freq[kind] = default_inv_freq(theta, int(spec.head_dim * partial))
        self.windows = [spec.layer_window(i) for i in range(spec.n_layers)]

    def layer_state(self, layer: int, state: ForwardState, kv_layer: torch.Tensor,
                    row_heads: int | None = None) -> TypedRopeState:
        """``state`` as a :class:`TypedRopeState`, once ``kv_layer`` is checked to be layer ``layer``'s pages, in
        order: rows of ``[block_tokens, 2, row_heads, head_dim]`` (``row_heads``: the KV heads unless a family stores
        more per row)."""
        heads = self.spec.n_kv_heads if row_heads is None else row_heads
        self.check_layer(layer, state, kv_layer, (state.batch.block_tokens, 2, heads, self.spec.head_dim))
        return cast(TypedRopeState, state)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.model.embed_tokens(ids))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, batch: SeqBatch,
               scale: float, window: int | None = None) -> torch.Tensor:
        """Store the new tokens' ``k, v`` in the pages ``kv`` (a layer's ``[nb, bt, 2, H, D]`` view) and attend
        (over the last ``window`` positions, when given): ``[N, Hq, D]``."""
        store_kv(k, v, kv, batch.slot_mapping, backend=self.backend)
        if batch.is_decode:
            return paged_decode_attention(q, kv, batch.block_tables, batch.seq_lens, scale, backend=self.backend,
                                          window=window)
        return paged_prefill_attention(q, kv, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, batch.start_pos,
                                       scale, backend=self.backend, window=window)

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        ids = self.checked_ids(batch)
        tables = rope_tables(batch.positions.to(self.device, torch.float32), self.inv_freq, self.spec.torch_dtype)
        none = torch.empty(batch.positions.shape[0], 0, device=self.device, dtype=self.spec.torch_dtype)
        cos, sin = next(iter(tables.values()), (none, none))  # (Beam: no layer type may rotate)
        return TypedRopeState(batch=batch, hidden=self.embed(ids), cos=cos, sin=sin, tables=tables)


class LlamaModel(LayerwiseDecoder):
    """The decoder of every family in the module docstring over a paged KV pool. ``backend``: kernel backend
    (``auto``/``torch``/``triton``)."""

    inv_freq: torch.Tensor
    local_inv_freq: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    alibi_bf16: bool = False
    embed_scale: torch.Tensor

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec), device, backend)
        inv_freq, self._rope_scale = rope_inv_freq(spec)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        local = None  # Gemma 3's sliding layers: their own RoPE base
        if spec.rope_local_theta is not None:
            local = rope_frequencies(spec.rotary_dim, spec.rope_local_theta, None, spec.max_position)[0].to(device)
        self.register_buffer("local_inv_freq", local, persistent=False)
        # Gemma: sqrt(hidden) as a float32 scalar rounded to the compute dtype, as GemmaTextScaledWordEmbedding
        embed_scale = torch.tensor(spec.hidden_size ** 0.5 if spec.gemma_style else 1.0).to(spec.torch_dtype)
        self.register_buffer("embed_scale", embed_scale.to(device), persistent=False)
        self.scales = [spec.layer_attn_scale(i) for i in range(spec.n_layers)]  # (GPT-2 may scale per layer)
        self.softcap = spec.attn_logit_softcapping
        self.windows = [spec.layer_window(i) for i in range(spec.n_layers)]  # each layer's sliding window
        # Llama 4: its RoPE layers attend within chunks of attention_chunk tokens
        self.chunks = [spec.attention_chunk if i not in spec.nope_layers else None for i in range(spec.n_layers)]
        # Gemma 3, OLMo 3: the layers that slide turn their keys with the local RoPE (Molmo2: the unscaled layers)
        self._local_rope = [local is not None and spec.local_rope_layer(i) for i in range(spec.n_layers)]
        # SmolLM3: NoPE layers have none; GPT-2 none at all (learned positions)
        self._rope = [i not in spec.nope_layers and not spec.learned_positions and not spec.alibi
                      for i in range(spec.n_layers)]
        # the layers whose queries are scaled by position (_query_scale): every one of Ministral 3's, Llama 4's NoPE ones
        self._q_scaled = [spec.query_scale_beta is not None or (spec.nope_temperature is not None and not rope)
                          for rope in self._rope]
        slopes = None
        if spec.alibi:  # Bloom, MPT, falcon-rw: each query head's ALiBi slope (fp32), passed to the attention kernels
            from dualpath.model.layernorm_family import alibi_slopes

            slopes = alibi_slopes(spec.n_heads, spec.architecture).to(device)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.alibi_bf16 = bool(spec.falcon_alibi)  # falcon-rw's bias: bf16(slope * key position), unscaled
        self.residual_scale = spec.residual_multiplier  # Granite: each block's output scaled (None: 1)

    def _last_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (none after OPT-350m's post-norm blocks), then OPT's ``project_out``."""
        if self.model.norm is not None:
            h = self.model.norm(h)
        if self.spec.embed_proj_dim:
            h = self.model.project_out(h)
        return h

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """As :meth:`LayerwiseDecoder.head`; Gemma 2 soft-caps the logits in the compute dtype first. A pruned LM
        head (Apertus 1.5's ``output_vocab_size``) gives the ids past it -inf: every row is ``vocab_size`` wide."""
        cap = self.spec.final_logit_softcapping
        logits = self.lm_head(self._last_hidden(h))
        if self.spec.logit_scale is not None:  # Cohere
            logits = logits * self.spec.logit_scale
        if self.spec.logits_scaling is not None:  # Granite: logits divided, in the compute dtype (HyperCLOVA X: times)
            if self.spec.architecture == "hyperclovax":
                logits = logits * self.spec.logits_scaling
            else:
                logits = logits / self.spec.logits_scaling
        elif cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out = logits.float()
        if self.spec.output_vocab_size is not None:
            out = F.pad(out, (0, self.spec.vocab_size - self.spec.output_vocab_size), value=float("-inf"))
        return cast(torch.Tensor, out)

    # --- layer-wise forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        """Embed the batch's new tokens and precompute RoPE tables. Works for decode batches too."""
        ids = batch.input_ids.to(self.device)
        if int(ids.max()) >= self.spec.vocab_size or int(ids.min()) < 0:
            raise ModelError(f"token id out of range [0, {self.spec.vocab_size})")
        if self.spec.rope_long is False and int(batch.positions.max()) >= self.spec.context_limit:
            # LongRoPE on its short factors: past original_max_position_embeddings transformers would turn every
            # position with the long ones, which the KV already computed cannot follow; never a silent mismatch
            from dualpath.model.spec_common import context_note

            raise ModelError(f"position {int(batch.positions.max())} is past the model's context of "
                             f"{self.spec.context_limit} tokens ({context_note(self.spec)})")
        positions = batch.positions.to(self.device, torch.float32)
        cos, sin = self._rope_tables(positions, self.inv_freq, self._rope_scale)
        local = None
        if self.local_inv_freq is not None:
            local = self._rope_tables(positions, self.local_inv_freq, 1.0)
        hidden = self.model.embed_tokens(ids)
        if self.spec.embed_proj_dim:  # OPT
            hidden = self.model.project_in(hidden)
        if self.spec.architecture in ("bloom", "nanochat"):
            hidden = self.model.embed_norm(hidden)
        scaled_first = self.spec.architecture in SCALED_EMBEDDINGS and self.spec.embedding_multiplier is not None
        if scaled_first:  # BioGPT, XGLM: the tokens' embeddings scaled, then the positions added
            hidden = hidden * self.spec.embedding_multiplier
        if self.spec.learned_positions:  # GPT-2, OPT: a position past the table has no embedding
            if int(batch.positions.max()) >= self.spec.max_position:
                raise ModelError(f"position {int(batch.positions.max())} is past the model's "
                                 f"{self.spec.max_position} learned positions (n_positions)")
            pos = batch.positions.to(self.device) + self.spec.position_offset
            hidden = hidden + self.model.embed_positions(pos)
        if self.spec.gemma_style:
            hidden = hidden * self.embed_scale.to(hidden.dtype)
        elif self.spec.embedding_multiplier is not None and not scaled_first:  # Granite
            hidden = hidden * self.spec.embedding_multiplier
        return ForwardState(batch=batch, hidden=hidden, cos=cos, sin=sin, local=local,
                            q_scale=self._query_scale(positions))

    def _query_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Each query's scale by its position ``[N, 1, 1]``, applied in the layers of ``_q_scaled``: Ministral 3's
        ``1 + beta * log(1 + floor(p / original_max_position_embeddings))`` (rounded to the compute dtype first, as
        transformers does), or Llama 4's NoPE-layer temperature (fp32); None for every other model."""
        spec = self.spec
        if spec.query_scale_beta is not None:
            orig = float((spec.rope_scaling or {})["original_max_position_embeddings"])
            scale = 1 + spec.query_scale_beta * torch.log(1 + torch.floor(positions / orig))
            return scale.to(spec.torch_dtype)[:, None, None]
        if spec.nope_temperature is not None:
            return nope_query_scale(positions, spec.nope_temperature)[:, None, None]
        return None

    def _rope_tables(self, positions: torch.Tensor, inv_freq: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dt = torch.float32 if self.spec.rope_fp32 else self.spec.torch_dtype
        return (emb.cos() * scale).to(dt), (emb.sin() * scale).to(dt)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        """Run layer ``layer`` (layers must come in order). ``kv_layer [num_blocks, bt, 2, Hkv, D]`` holds each
        sequence's cached prefix at its block table; the new tokens' K/V are written into it."""
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        spec, b = self.spec, state.batch
        exp = (b.block_tokens, 2, spec.n_kv_heads, spec.head_dim)
        if kv_layer.dim() != 5 or tuple(kv_layer.shape[1:]) != exp:
            raise ModelError(f"layer {layer}: KV tensor shape {tuple(kv_layer.shape)}, expected [num_blocks, {exp}]")
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = cast(Attention, mod.self_attn)
        x = state.hidden if spec.post_norms or spec.post_layer_norm else cast(nn.Module, mod.input_layernorm)(state.hidden)
        n = x.shape[0]
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if spec.qk_norm_full:  # OLMo 2 and 3, OLMoE: over the whole projections
            q, k = attn.q_norm(q), attn.k_norm(k)
        if spec.clip_qkv is not None:  # OLMoE
            c = spec.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(n, spec.n_heads, spec.head_dim)
        k = k.view(n, spec.n_kv_heads, spec.head_dim)
        v = v.view(n, spec.n_kv_heads, spec.head_dim)
        if (spec.qk_norm or spec.qk_layernorm) and not spec.qk_norm_after_rope:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if self._rope[layer]:
            cos, sin = state.cos, state.sin
            if state.local is not None and self._local_rope[layer]:  # Gemma 3, OLMo 3: a sliding layer's RoPE
                cos, sin = state.local
            cos, sin = cos[:, None, :], sin[:, None, :]
            if spec.rope_fp32:  # (Llama 4, ERNIE 4.5: rotated in fp32, then rounded)
                q, k = _rope(q.float(), cos, sin).to(q.dtype), _rope(k.float(), cos, sin).to(k.dtype)
            else:
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if spec.qk_norm_after_rope:  # Hunyuan: the rotated query and key are normed
            q, k = attn.q_norm(q), attn.k_norm(k)
        if spec.l2_qk_norm and self._rope[layer]:  # Llama 4's RoPE layers: weightless norms after RoPE
            q, k = l2_norm(q, spec.rms_eps), l2_norm(k, spec.rms_eps)
        if state.q_scale is not None and self._q_scaled[layer]:  # Ministral 3; Llama 4's NoPE layers
            q = (q * state.q_scale).to(q.dtype)
        scale = self.scales[layer]
        if spec.scale_query_first:  # OPT scales its queries before the scores
            q, scale = q * scale, 1.0
        store_kv(k, v, kv_layer, b.slot_mapping, backend=self.backend)
        sinks = attn.sinks if spec.attention_sinks else None
        if b.is_decode:
            o = paged_decode_attention(q, kv_layer, b.block_tables, b.seq_lens, scale,
                                       backend=self.backend,
                                       softcap=self.softcap, window=self.windows[layer], sinks=sinks,
                                       alibi=self.alibi_slopes, alibi_bf16=self.alibi_bf16, chunk=self.chunks[layer])
        else:
            o = paged_prefill_attention(q, kv_layer, b.block_tables, b.cu_seqlens_q, b.seq_lens, b.start_pos,
                                        scale, backend=self.backend, softcap=self.softcap,
                                        window=self.windows[layer], sinks=sinks, alibi=self.alibi_slopes,
                                        alibi_bf16=self.alibi_bf16, chunk=self.chunks[layer])
        o = o.reshape(n, spec.n_heads * spec.head_dim)
        if spec.architecture == "bitnet":
            o = attn.attn_sub_norm(o)
        if spec.attn_output_gate:  # Trinity
            o = o * torch.sigmoid(attn.gate_proj(x))
        a = attn.o_proj(o)
        if spec.sandwich_norms:  # Gemma 2, Trinity, HyperCLOVA X: norms on the attention output and around the MLP
            a = cast(RMSNorm, mod.post_attention_layernorm)(a)
            h = state.hidden + (a if self.residual_scale is None else a * self.residual_scale)
            m = cast(RMSNorm, mod.post_feedforward_layernorm)(mod.mlp(cast(RMSNorm, mod.pre_feedforward_layernorm)(h)))
            state.hidden = h + (m if self.residual_scale is None else m * self.residual_scale)
        elif spec.post_norms:  # OLMo 2 and 3: norms on each block's output
            h = state.hidden + cast(RMSNorm, mod.post_attention_layernorm)(a)
            state.hidden = h + cast(RMSNorm, mod.post_feedforward_layernorm)(mod.mlp(h))
        elif spec.glm4_norms:
            h = state.hidden + cast(nn.Module, mod.post_self_attn_layernorm)(a)
            m = mod.mlp(cast(nn.Module, mod.post_attention_layernorm)(h))
            state.hidden = h + cast(nn.Module, mod.post_mlp_layernorm)(m)
        elif spec.norm_residual:  # Bloom's apply_residual_connection_post_layernorm: residuals from the norms
            y = cast(nn.Module, mod.post_attention_layernorm)(x + a)
            state.hidden = y + mod.mlp(y)
        elif spec.post_layer_norm:  # OPT-350m: each residual sum normed
            h = cast(nn.Module, mod.input_layernorm)(state.hidden + a)
            state.hidden = cast(nn.Module, mod.post_attention_layernorm)(h + mod.mlp(h))
        elif spec.layer_norm and spec.parallel_residual:
            # the parallel residual, summed in each family's order: Phi / StableLM read the input norm's output
            # twice, GPT-NeoX has a second norm on the block's input
            if spec.shared_norm_parallel:
                m = mod.mlp(x)
                state.hidden = a + m + state.hidden if spec.architecture in ("phi", "falcon") else state.hidden + a + m
            else:
                state.hidden = mod.mlp(cast(nn.Module, mod.post_attention_layernorm)(state.hidden)) + a + state.hidden
            # (Falcon: (mlp + attn) + x, the same sums)
        elif self.residual_scale is not None:  # Granite
            h = state.hidden + a * self.residual_scale
            state.hidden = h + mod.mlp(cast(RMSNorm, mod.post_attention_layernorm)(h)) * self.residual_scale
        else:
            h = state.hidden + a
            state.hidden = h + mod.mlp(cast(RMSNorm, mod.post_attention_layernorm)(h))
        state.next_layer += 1
