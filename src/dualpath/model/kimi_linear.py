"""The KDA hybrids, as transformers runs them: Moonshot's Kimi Linear (``KimiLinearForCausalLM``, model_type
``kimi_linear``) and inclusionAI's Ling 3 hybrids (``BailingHybridForCausalLM``, ``bailing_hybrid``). DeepSeek-V3's
MLA and MoE (:mod:`dualpath.model.deepseek`) in some layers, Kimi Delta Attention (KDA) in the others, over one paged
pool whose pages hold MLA's latent rows or a KDA layer's state (state pages, :mod:`dualpath.model.state_pages`).

Kimi Linear:

* **MLA layers** (``layer_types`` ``full_attention``; the released checkpoints name them in ``linear_attn_config``'s
  1-indexed ``full_attn_layers``): DeepSeek-V3's latent attention with no position encoding at all (``mla_use_nope``:
  the ``qk_rope_head_dim`` part of each key is still shared across heads, but never rotated), scaled by
  ``qk_head_dim ** -0.5``. Their rows are the latent and that shared part, as DeepSeek's.
* **KDA layers**: ``q_proj`` / ``k_proj`` / ``v_proj`` (``linear_num_heads`` x ``linear_head_dim`` each), each through
  its own causal depthwise convolution (``q_conv1d`` ...) and SiLU; q and k L2-normalized; a decay per key channel
  ``g = -exp(A_log) * softplus(f_b_proj(f_a_proj(x)) + dt_bias)``, a rate ``beta = sigmoid(b_proj(x))``; the gated
  delta rule over them (:func:`dualpath.model.gated_delta.kda_segment`); the output RMS-normalized per head in fp32,
  times ``sigmoid(g_b_proj(g_a_proj(x)))``, then ``o_proj``.
* **The head** is never tied to the embeddings (transformers ties nothing for this family, whatever
  ``tie_word_embeddings`` says).
* **MLPs**: dense SwiGLU in the first ``first_k_dense_replace`` layers (``mlp_layer_types`` ``dense``), then
  DeepSeek-V3's MoE (sigmoid router with correction bias, ``num_experts_per_token`` of ``num_experts``, shared
  experts), stored as Mixtral's ``block_sparse_moe.experts.N.w1 / w2 / w3``.

Bailing hybrid (what differs): the MLA layers rotate the shared key part (DeepSeek's interleaved RoPE) and gate each
head's output by ``sigmoid(g_proj(x))``; the KDA gates are full-width projections (``f_proj``, ``g_proj``), the
decay bounded by default (``kda_safe_gate``: ``kda_lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``, else
Kimi's) and rounded to the compute dtype, the convolutions, ``A_log`` and ``dt_bias`` kept in fp32; one in every
``layer_group_size`` layers is MLA; KDA heads and width are the attention's (``num_attention_heads``, ``head_dim``).
Its checkpoints name ``model.word_embeddings``, ``layers.N.attention.*`` (``dense`` for ``o_proj``) and
``mlp.gate.expert_bias``; multi-token-prediction layers after the last are left out.

A page holds ``block_tokens`` latent rows, widened (``extra_bytes`` after each latent) until the page holds a KDA
layer's fp32 state: :meth:`KimiLinearSpec.paged_kv_spec` for the deployment's block size. MLA layers read the front
of each row, as DeepSeek-V3.2's rows carry its indexer key after the latent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model.deepseek import DecoderLayer, DeepseekV3Model, MoE
from dualpath.model.gated_delta import delta_step, kda_segment, l2norm
from dualpath.model.hybrid import DEFAULT_STATE_BLOCK, FloatGatedNorm
from dualpath.model.layernorm_family import hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, SeqBatch
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.moe import FeedForward, activation_of
from dualpath.model.spec_common import cfg_int, cfg_kinds
from dualpath.model.state_pages import ConvAct, decode_states, scan_sequences, state_bytes, state_views

ARCH = "kimi_linear"
BAILING = "bailing_hybrid"
GLM5_NEXT = "glm5_next_text"
#: the longest segment one KDA closed form runs (its per-channel pair weights grow as L^2 x head_dim; 16 ran a
#: 1,024-token prefill fastest on 2 cores: ``benchmarks/hybrid_prefill_speed.py --family kimi_linear``)
KDA_SEGMENT = 16
TYPES = ("linear_attention", "full_attention")
#: KimiLinearConfig's defaults, under DeepSeek-V3's key names
DEFAULTS: dict[str, Any] = {
    "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216, "moe_intermediate_size": 1024,
    "num_hidden_layers": 27, "num_attention_heads": 32, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5, "max_position_embeddings": 1048576,
    "bos_token_id": 163584, "eos_token_id": 163586, "linear_head_dim": 128, "linear_num_heads": 32,
    "linear_conv_kernel_dim": 4,
}
#: Kimi's key names -> DeepSeek-V3's (KimiLinearConfig.attribute_map)
_KEYS = {"num_experts": "n_routed_experts", "num_experts_per_token": "num_experts_per_tok",
         "num_shared_experts": "n_shared_experts", "num_expert_group": "n_group", "moe_renormalize": "norm_topk_prob",
         "model_max_length": "max_position_embeddings"}


@dataclass(frozen=True)
class KimiLinearSpec(DeepseekV3Spec):
    """A :class:`DeepseekV3Spec` (the MLA layers' and the MoE's shape) plus the KDA layers'."""

    layer_types: tuple[str, ...] = ()
    lin_heads: int = 0
    lin_dim: int = 0
    conv_kernel: int = 4
    gate_lower_bound: float | None = None  # Bailing's kda_safe_gate: the decay's lower bound (None: Kimi's decay)

    @property
    def kimi(self) -> bool:
        """Kimi Linear (no RoPE, low-rank KDA gates); else Bailing hybrid or GLM-5.3-Flash."""
        return self.model_type == ARCH

    @property
    def low_rank_gates(self) -> bool:
        """The KDA gates through one head's width (``f_a_proj`` / ``f_b_proj``, ``g_a_proj`` / ``g_b_proj``): Kimi
        Linear's and GLM-5.3-Flash's; Bailing's are full-width projections."""
        return self.model_type in (ARCH, GLM5_NEXT)

    def has_indexer(self, layer: int) -> bool:
        """Only MLA layers have an indexer (GLM-5.3-Flash's ``indexer_types`` names every layer)."""
        return self.layer_types[layer] == "full_attention" and super().has_indexer(layer)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or any(t not in TYPES for t in self.layer_types):
            raise ModelError(f"model config: layer_types must name 'linear_attention' or 'full_attention' for each of "
                             f"the {self.n_layers} layers, got {list(self.layer_types)}")
        if self.lin_heads <= 0 or self.lin_dim <= 0 or self.conv_kernel < 1:
            raise ModelError("model config: linear_num_heads, linear_head_dim and linear_conv_kernel_dim must be "
                             f"positive, got {self.lin_heads}, {self.lin_dim}, {self.conv_kernel}")
        if self.kv_format != "auto":
            raise ModelError(f"KV format {self.kv_format!r} unsupported for {self.model_type} (its pages hold KDA "
                             "states too; only 'auto')")
        if self.gate_lower_bound is not None and (self.kimi or not self.gate_lower_bound < 0):
            raise ModelError(f"model config: kda_lower_bound must be negative (Bailing hybrid's), got "
                             f"{self.gate_lower_bound}")

    @property
    def conv_dim(self) -> int:
        return 3 * self.lin_heads * self.lin_dim

    @property
    def state_bytes(self) -> int:
        """Bytes of one KDA layer's state (what its page must hold)."""
        return state_bytes(self.conv_dim, self.conv_kernel, self.lin_heads, self.lin_dim, self.lin_dim)

    def paged_kv_spec(self, block_tokens: int) -> KVSpec:
        """Latent rows of ``dtype``, widened by whole values after the latent until ``block_tokens`` of them hold a
        KDA state."""
        if block_tokens <= 0:
            raise ModelError(f"block_tokens must be positive, got {block_tokens}")
        esize = self.torch_dtype.itemsize
        row = max(self.latent_dim + self.index_row, -(-self.state_bytes // (block_tokens * esize)))
        return KVSpec.mla(self.n_layers, self.latent_dim, self.dtype, rope_dim=self.qk_rope_head_dim,
                          extra_bytes=esize * (row - self.latent_dim), state_pages=True)

    def kv_spec(self) -> KVSpec:
        return self.paged_kv_spec(DEFAULT_STATE_BLOCK)

    def to_hf_config(self) -> dict[str, Any]:
        k = min(self.first_k_dense_replace, self.n_layers)
        if self.model_type == GLM5_NEXT:
            from dualpath.model.glm5_next import hf_config

            return hf_config(self)
        if not self.kimi:
            rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
            return {
                "architectures": ["BailingHybridForCausalLM"], "model_type": BAILING, "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "moe_intermediate_size": self.moe_intermediate_size, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads, "head_dim": self.lin_dim,
                "kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank,
                "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
                "v_head_dim": self.v_head_dim, "num_experts": self.n_routed_experts,
                "num_experts_per_token": self.num_experts_per_tok, "num_shared_experts": self.n_shared_experts,
                "num_expert_group": self.n_group, "topk_group": self.topk_group,
                "moe_renormalize": self.norm_topk_prob, "routed_scaling_factor": self.routed_scaling_factor,
                "rms_norm_eps": self.rms_eps, "model_max_length": self.max_position,
                "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
                "hidden_act": hf_activation(self.activation), "dtype": self.dtype,
                "layer_types": list(self.layer_types),
                "mlp_layer_types": ["dense"] * k + ["sparse"] * (self.n_layers - k), "first_k_dense_replace": k,
                "short_conv_kernel_size": self.conv_kernel, "linear_head_dim": self.lin_dim,
                "linear_num_heads": self.lin_heads, "linear_conv_kernel_dim": self.conv_kernel,
                "kda_safe_gate": self.gate_lower_bound is not None,
                "kda_lower_bound": self.gate_lower_bound if self.gate_lower_bound is not None else -5.0,
                "rope_parameters": rope, "num_nextn_predict_layers": 0, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id, "pad_token_id": None,
            }
        return {
            "architectures": ["KimiLinearForCausalLM"], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads,
            "kv_lora_rank": self.kv_lora_rank, "q_lora_rank": self.q_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim, "num_experts": self.n_routed_experts,
            "num_experts_per_token": self.num_experts_per_tok, "num_shared_experts": self.n_shared_experts,
            "num_expert_group": self.n_group, "topk_group": self.topk_group, "moe_renormalize": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor, "rms_norm_eps": self.rms_eps,
            "model_max_length": self.max_position, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "hidden_act": hf_activation(self.activation),
            "dtype": self.dtype,
            "layer_types": list(self.layer_types), "mlp_layer_types": ["dense"] * k + ["sparse"] * (self.n_layers - k),
            "linear_head_dim": self.lin_dim, "linear_num_heads": self.lin_heads,
            "linear_conv_kernel_dim": self.conv_kernel, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": None,
        }


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                     max_context: int | None = None) -> KimiLinearSpec:
    """The spec of a Kimi Linear config: transformers' keys or the released checkpoints' (``linear_attn_config``
    with 1-indexed ``full_attn_layers`` / ``kda_layers``, ``first_k_dense_replace``), over KimiLinearConfig's
    defaults."""
    if cfg.get("mla_use_nope") is False:
        raise ModelError(f"{where}: mla_use_nope false unsupported (Kimi Linear's MLA layers use no RoPE; "
                         "transformers applies none)")
    act = cfg.get("moe_router_activation_func", "sigmoid")
    if act != "sigmoid":
        raise ModelError(f"{where}: moe_router_activation_func {act!r} unsupported (Kimi Linear's router: 'sigmoid')")
    linear = cfg.get("linear_attn_config") or {}
    if not isinstance(linear, dict):
        raise ModelError(f"{where}: linear_attn_config must be an object, got {linear!r}")
    norm = {_KEYS.get(k, k): v for k, v in cfg.items() if v is not None or k == "q_lora_rank"}
    for theirs, ours in (("head_dim", "linear_head_dim"), ("num_heads", "linear_num_heads"),
                         ("short_conv_kernel_size", "linear_conv_kernel_dim")):
        if linear.get(theirs) is not None:
            norm[ours] = linear[theirs]
    norm = {**DEFAULTS, **norm}
    n = cfg_int(norm, "num_hidden_layers", where)
    if norm.get("layer_types") is None and "full_attn_layers" in linear and "kda_layers" in linear:
        named: list[Any] = [None] * n
        for key, kind in (("full_attn_layers", "full_attention"), ("kda_layers", "linear_attention")):
            for i in linear[key] or []:
                if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n:
                    raise ModelError(f"{where}: linear_attn_config.{key}: {i!r} is not a layer number in [1, {n}]")
                named[i - 1] = kind
        norm["layer_types"] = named
    default = ["full_attention" if i and i % 4 == 0 else "linear_attention" for i in range(n)]
    types = cfg_kinds(norm, "layer_types", n, TYPES, where, default)
    kinds = norm.get("mlp_layer_types")
    if kinds is None:
        first = cfg_int({"first_k_dense_replace": norm.get("first_k_dense_replace", 1)}, "first_k_dense_replace",
                        where, minimum=0)
        norm["mlp_layer_types"] = ["dense" if i < first else "sparse" for i in range(n)]
    norm.pop("first_k_dense_replace", None)
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):  # (no RoPE)
        norm.pop(key, None)
    return _spec(norm, ARCH, types, where, dtype, kv_format, max_context, interleave=False)


def _spec(norm: dict[str, Any], model_type: str, types: list[str], where: str, dtype: str | None, kv_format: str,
          max_context: int | None, interleave: bool, lower_bound: float | None = None) -> KimiLinearSpec:
    """The spec of a normalized config (DeepSeek-V3's key names plus ``linear_*``): DeepSeek-V3's reading of the
    MLA and MoE keys, then the KDA layers'. Neither Kimi Linear's nor Bailing's transformers class ties the head to
    the embeddings (``_tied_weights_keys`` empty): ``lm_head`` is read whatever ``tie_word_embeddings`` says.
    GLM-5.3-Flash's image-text class ties it when its outer ``tie_word_embeddings`` says so (which
    :func:`dualpath.model.glm5_next.text_config` has put in ``norm``)."""
    arch = {ARCH: ["KimiLinearForCausalLM"], BAILING: ["BailingHybridForCausalLM"], GLM5_NEXT: []}[model_type]
    tie = model_type == GLM5_NEXT and bool(norm.get("tie_word_embeddings"))
    base = DeepseekV3Spec.from_hf_config({**norm, "architectures": arch, "model_type": model_type,
                                          "rope_interleave": interleave, "tie_word_embeddings": tie},
                                         dtype=dtype, kv_format="auto", where=where, max_context=max_context)
    return KimiLinearSpec(**{f.name: getattr(base, f.name) for f in fields(DeepseekV3Spec) if f.name != "kv_format"},
                          layer_types=tuple(types), lin_heads=cfg_int(norm, "linear_num_heads", where),
                          lin_dim=cfg_int(norm, "linear_head_dim", where),
                          conv_kernel=cfg_int(norm, "linear_conv_kernel_dim", where), kv_format=kv_format,
                          gate_lower_bound=lower_bound)


#: BailingHybridConfig's defaults, under DeepSeek-V3's key names
BAILING_DEFAULTS: dict[str, Any] = {
    "vocab_size": 157184, "hidden_size": 2560, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 42, "num_attention_heads": 32, "n_routed_experts": 512, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "first_k_dense_replace": 2, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 6e6,
    "head_dim": 128, "short_conv_kernel_size": 4, "layer_group_size": 6, "kda_safe_gate": True,
    "kda_lower_bound": -5.0, "bos_token_id": None, "eos_token_id": 156895,
}


def bailing_spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                             max_context: int | None = None) -> KimiLinearSpec:
    """The spec of a Bailing hybrid (Ling 3) config over BailingHybridConfig's defaults: the KDA layers' heads and
    width are ``linear_num_heads`` / ``linear_head_dim`` where the config has them (transformers writes them), else
    the attention's (``num_attention_heads``, ``head_dim``), their kernel ``short_conv_kernel_size``; the
    last of every ``layer_group_size`` layers is MLA unless ``layer_types`` says otherwise."""
    norm = {**BAILING_DEFAULTS, **{_KEYS.get(k, k): v for k, v in cfg.items() if v is not None or k == "q_lora_rank"}}
    n = cfg_int(norm, "num_hidden_layers", where)
    group = cfg_int(norm, "layer_group_size", where)
    types = cfg_kinds(norm, "layer_types", n, TYPES, where,
                      ["full_attention" if (i + 1) % group == 0 else "linear_attention" for i in range(n)])
    if norm.get("mlp_layer_types") is None:
        first = cfg_int(norm, "first_k_dense_replace", where, minimum=0)
        norm["mlp_layer_types"] = ["dense" if i < first else "sparse" for i in range(n)]
    norm.pop("first_k_dense_replace", None)
    # (BailingHybridConfig derives these from the attention's keys; a config it saved carries them, and they win
    # there: its head_dim is by then DeepSeek-V3's qk_rope_head_dim)
    for ours, theirs in (("linear_num_heads", "num_attention_heads"), ("linear_head_dim", "head_dim"),
                         ("linear_conv_kernel_dim", "short_conv_kernel_size")):
        norm.setdefault(ours, norm[theirs])
    bound = None
    if bool(norm["kda_safe_gate"]):
        lb = norm["kda_lower_bound"]
        if isinstance(lb, bool) or not isinstance(lb, (int, float)) or not lb < 0:
            raise ModelError(f"{where}: kda_lower_bound must be a negative number (the decay's floor in log space), "
                             f"got {lb!r}")
        bound = float(lb)
    return _spec(norm, BAILING, types, where, dtype, kv_format, max_context, interleave=True, lower_bound=bound)


# --- modules -------------------------------------------------------------------------------------------------


class KimiDeltaAttention(nn.Module):
    """A KDA layer over state pages (module docstring); its tensors under the checkpoints' names."""

    def __init__(self, spec: KimiLinearSpec) -> None:
        super().__init__()
        h, d, hidden, k = spec.lin_heads, spec.lin_dim, spec.hidden_size, spec.conv_kernel
        self.heads, self.dim, self.kernel = h, d, k
        self.kimi, self.bound = spec.kimi, spec.gate_lower_bound
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, h * d, bias=False) for _ in range(3))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(h * d, h * d, k, groups=h * d, bias=False, padding=k - 1) for _ in range(3))
        conv_act = activation_of(spec)  # (the short convolutions': hidden_act, as transformers' KDA)
        self.conv_act: ConvAct = True if conv_act is None else conv_act
        if spec.low_rank_gates:  # (through one head's width)
            self.f_a_proj = nn.Linear(hidden, d, bias=False)
            self.f_b_proj = nn.Linear(d, h * d, bias=False)
            self.g_a_proj = nn.Linear(hidden, d, bias=False)
            self.g_b_proj = nn.Linear(d, h * d, bias=False)
        else:
            self.f_proj = nn.Linear(hidden, h * d, bias=False)
            self.g_proj = nn.Linear(hidden, h * d, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(h * d))
        self.A_log = nn.Parameter(torch.zeros((1, 1, h, 1) if spec.kimi else (h,)))
        self.low_rank, self.round_decay = spec.low_rank_gates, spec.model_type == BAILING
        self.b_proj = nn.Linear(hidden, h, bias=False)
        self.o_norm = FloatGatedNorm(d, spec.rms_eps)
        self.o_proj = nn.Linear(h * d, hidden, bias=False)

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel log decay ``[N, H, D]`` (fp32): Kimi's ``-exp(A_log) softplus(f + dt_bias)``, or
        Bailing's bounded ``lower_bound * sigmoid(exp(A_log) (f + dt_bias))`` rounded to the compute dtype."""
        h, d = self.heads, self.dim
        f = self.f_b_proj(self.f_a_proj(x)) if self.low_rank else self.f_proj(x)
        f = (f.float() + self.dt_bias.float()).view(-1, h, d)
        rate = self.A_log.float().exp().view(1, h, 1)
        if self.kimi or (self.bound is None and self.low_rank):  # (softplus as transformers writes it)
            return -rate * torch.where(f > 20.0, f, torch.log(1.0 + torch.exp(f)))
        g = self.bound * torch.sigmoid(rate * f) if self.bound is not None else -rate * F.softplus(f)
        return g.to(x.dtype).float() if self.round_decay else g  # (Bailing's rounded; GLM-5.3-Flash's fp32)

    def _qkv(self, conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Convolved ``[L, 3 H D]`` -> fp32 ``q`` (normalized, scaled), ``k`` (normalized), ``v``, each ``[L, H, D]``
        (rounded to the compute dtype first, as transformers' convolution returns them)."""
        conv = conv.to(self.o_proj.weight.dtype)
        q, k, v = (t.reshape(t.shape[0], self.heads, self.dim).float() for t in conv.split(self.heads * self.dim, -1))
        return l2norm(q) * self.dim ** -0.5, l2norm(k), v

    def forward(self, x: torch.Tensor, batch: SeqBatch, kv_layer: torch.Tensor) -> torch.Tensor:
        h, d = self.heads, self.dim
        conv_pages, rec_pages = state_views(kv_layer, 3 * h * d, self.kernel, h, d, d)
        mixed = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        weight = torch.cat((self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight))[:, 0]
        mixed = mixed.to(weight.dtype)  # (Bailing's convolutions run in fp32, their output rounded back in _qkv)
        g = self.decay(x)
        beta = torch.sigmoid(self.b_proj(x)).float()
        if batch.is_decode:
            conv, s0, commit = decode_states(batch, conv_pages, rec_pages, mixed, weight, None, self.conv_act)
            q, k, v = self._qkv(conv)
            core, s1 = delta_step(q, k, v, g, beta, s0)
            commit(s1)
        else:
            core = torch.empty(x.shape[0], h, d, dtype=torch.float32, device=x.device)

            def run(conv: torch.Tensor, a: int, b: int, s: torch.Tensor) -> torch.Tensor:
                q, k, v = (t.transpose(0, 1) for t in self._qkv(conv))
                for lo in range(0, b - a, KDA_SEGMENT):  # (its pair weights are [H, L, L, D]: short segments)
                    hi = min(b - a, lo + KDA_SEGMENT)
                    o, s = kda_segment(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[a + lo:a + hi].transpose(0, 1),
                                       beta[a + lo:a + hi].t(), s)
                    core[a + lo:a + hi] = o.transpose(0, 1)
                return s

            scan_sequences(batch, conv_pages, rec_pages, mixed, weight, None, run, self.conv_act)
        gate = self.g_b_proj(self.g_a_proj(x)) if self.low_rank else self.g_proj(x)
        out = self.o_norm(core.to(x.dtype), gate.view(-1, h, d))
        return cast(torch.Tensor, self.o_proj(out.reshape(x.shape[0], h * d)))


class KdaLayer(nn.Module):
    def __init__(self, spec: KimiLinearSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = KimiDeltaAttention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (MoE(spec) if spec.is_moe_layer(layer)
                               else FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)))


class Backbone(nn.Module):
    def __init__(self, spec: KimiLinearSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(KdaLayer(spec, i) if kind == "linear_attention" else _mla_layer(spec, i)
                                    for i, kind in enumerate(spec.layer_types))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


def _mla_layer(spec: KimiLinearSpec, layer: int) -> DecoderLayer:
    """DeepSeek-V3's layer; Bailing's attention also gates each head's output (``g_proj``, one logit per head)."""
    mod = DecoderLayer(spec, layer)
    if spec.model_type == BAILING:
        mod.self_attn.g_proj = nn.Linear(spec.hidden_size, spec.n_heads, bias=False)
    return mod


class KimiLinearModel(DeepseekV3Model):
    """Kimi Linear (module docstring) over a paged pool of widened latent rows and KDA states."""

    def __init__(self, spec: KimiLinearSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__(spec, device=device, backend=backend, backbone=Backbone(spec))
        self.spec: KimiLinearSpec = spec
        for layer in self.model.layers:  # (transformers keeps the forget gate's bias in fp32; Bailing's also its
            if isinstance(layer, KdaLayer):  # convolutions and A_log)
                kda = layer.self_attn
                kept = [kda.dt_bias] + ([] if spec.kimi else [kda.A_log, kda.q_conv1d.weight, kda.k_conv1d.weight,
                                                              kda.v_conv1d.weight])
                for p in kept:
                    p.data = p.data.float()

    def _check_kv(self, layer: int, kv_layer: torch.Tensor, block_tokens: int) -> None:
        """Rows of at least the latent's width (widened for the pool's block size: :meth:`KimiLinearSpec.paged_kv_spec`)."""
        dt = self.spec.torch_dtype
        if (kv_layer.dim() != 3 or kv_layer.shape[1] != block_tokens or kv_layer.shape[2] < self.spec.latent_dim
                or kv_layer.dtype != dt):
            raise ModelError(f"layer {layer}: KV tensor {tuple(kv_layer.shape)} {kv_layer.dtype}, expected "
                             f"[num_blocks, {block_tokens}, >= {self.spec.latent_dim}] {dt} "
                             "(the model's paged_kv_spec for the block size)")

    @torch.no_grad()
    def prefill_begin(self, batch: SeqBatch) -> ForwardState:
        """:meth:`DeepseekV3Model.prefill_begin`; Kimi Linear's with identity rotations (no RoPE: ``cos`` 1, ``sin``
        0)."""
        state = super().prefill_begin(batch)
        if self.spec.kimi:
            state.cos = torch.ones_like(state.cos)
            state.sin = torch.zeros_like(state.sin)
        return state

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if self.spec.layer_types[layer] == "full_attention":
            super().prefill_layer(layer, state, kv_layer)
            return
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        b = state.batch
        self._check_kv(layer, kv_layer, b.block_tokens)
        mod = cast(KdaLayer, self.model.layers[layer])
        h = state.hidden + mod.self_attn(mod.input_layernorm(state.hidden), b, kv_layer)
        state.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


# --- tensors in and out --------------------------------------------------------------------------------------

_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
#: Bailing's checkpoint names -> ours (what transformers' conversion renames)
_BAILING = ((".attention.", ".self_attn."), (".self_attn.dense.", ".self_attn.o_proj."),
            (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))


def tensors_in(spec: KimiLinearSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's names as ours. Kimi Linear: ``block_sparse_moe`` as ``mlp``, its experts' ``w1 / w3 / w2``
    as ``gate_proj / up_proj / down_proj``. Bailing: ``word_embeddings``, ``attention``, ``dense`` and
    ``expert_bias`` (:data:`_BAILING`). Both: transformers' in-memory names too (the forget gate's tensors under
    ``forget_gate.``, the three convolutions packed in one ``conv1d``). Multi-token-prediction layers and packed
    experts are left for :func:`dualpath.model.tensor_names.deepseek_tensors`."""
    out: dict[str, torch.Tensor] = {}
    width = spec.lin_heads * spec.lin_dim
    for name, t in tensors.items():
        if spec.model_type == BAILING:
            if name.startswith("model.word_embeddings."):
                name = "model.embed_tokens." + name[len("model.word_embeddings."):]
            for theirs, ours in _BAILING:
                name = name.replace(theirs, ours)
        name = name.replace(".block_sparse_moe.", ".mlp.").replace(".self_attn.forget_gate.", ".self_attn.")
        parts = name.split(".")
        if len(parts) == 8 and parts[4] == "experts" and parts[6] in _EXPERTS:
            parts[6] = _EXPERTS[parts[6]]
            name = ".".join(parts)
        if name.endswith(".self_attn.conv1d.weight") and t.shape[0] == 3 * width:
            for p, part in zip("qkv", t.split(width), strict=True):
                out[name.replace(".conv1d.", f".{p}_conv1d.")] = part
            continue
        out[name] = t
    return out


def tensors_out(spec: KimiLinearSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the names transformers' ``save_pretrained`` writes (Kimi Linear: every MLP, dense ones too,
    under ``block_sparse_moe``; with no shared experts, the zero-width ones transformers builds and expects)."""
    back = {ours: theirs for theirs, ours in _EXPERTS.items()}
    moe = "block_sparse_moe" if spec.kimi else "mlp"
    out: dict[str, torch.Tensor] = {}
    if spec.n_shared_experts == 0:
        hidden, dt = spec.hidden_size, spec.torch_dtype
        for i in range(spec.n_layers):
            if spec.is_moe_layer(i):
                for proj, shape in (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0))):
                    out[f"model.layers.{i}.{moe}.shared_experts.{proj}.weight"] = torch.empty(shape, dtype=dt)
    for name, t in tensors.items():
        if spec.model_type == BAILING:
            if name.startswith("model.embed_tokens."):
                name = "model.word_embeddings." + name[len("model.embed_tokens."):]
            for theirs, ours in reversed(_BAILING):
                name = name.replace(ours, theirs)
        elif spec.kimi and ".mlp." in name:  # (transformers writes the dense layers' MLPs under block_sparse_moe too)
            name = name.replace(".mlp.", ".block_sparse_moe.")
            parts = name.split(".")
            if len(parts) == 8 and parts[4] == "experts" and parts[6] in back:
                parts[6] = back[parts[6]]
                name = ".".join(parts)
        out[name] = t
    return out
