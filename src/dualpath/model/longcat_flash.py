"""LongCat-Flash (``LongcatFlashForCausalLM``, model_type ``longcat_flash``; Meituan's 560B MoE), as transformers runs
it, over the paged latent KV pool of DeepSeek-V3's MLA (:mod:`dualpath.model.deepseek`).

* **Two attention sublayers per layer.** Each of the config's ``num_layers`` layers runs MLA, a dense SwiGLU MLP,
  MLA again and a second dense MLP, each sublayer with its own pre-norm. Each MLA sublayer keeps its own latent
  rows, so the pool has ``2 * num_layers`` KV layers (``spec.n_layers``, transformers' ``num_hidden_layers``) and
  the layer-wise forward runs one *sublayer* per step: KV layer ``2i`` is layer ``i``'s first attention and MLP,
  ``2i + 1`` its second.
* **Shortcut-connected MoE.** The MoE block reads the first MLP's input (the first sublayer's post-attention
  norm) and its output joins the residual after the second MLP (:attr:`ForwardState.carry` holds it in between).
* **Zero-computation experts.** The router (fp32, no bias) scores ``n_routed_experts + zero_expert_num`` experts
  by softmax, picks ``moe_topk`` by score plus a correction bias, and weights them by score times
  ``routed_scaling_factor`` (no renormalization). A picked zero expert returns its input (times its weight).
* **MLA** is DeepSeek-V3's (interleaved RoPE over ``qk_rope_head_dim``, which must equal the config's ``head_dim``,
  the width transformers' RoPE uses), with the LoRA scalings: queries times ``sqrt(hidden / q_lora_rank)``, the
  normed key latent times ``sqrt(hidden / kv_lora_rank)`` before it is stored.

Tensor names are transformers' (``model.layers.3.self_attn.1.q_a_proj.weight``, ``model.layers.3.mlps.0.*``,
``model.layers.3.mlp.router.classifier.weight``, ``model.layers.3.mlp.experts.7.gate_proj.weight`` or packed
``gate_up_proj`` / ``down_proj``); the multi-token-prediction tensors (``model.mtp.*``) and the zero experts'
unused ``gate_proj`` / ``up_proj`` that transformers writes are left out at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.deepseek import DeepseekV3Model, MLAttention
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.spec_common import cfg_int, cfg_num, parse_rope

__all__ = ["ARCH", "LongcatFlashModel", "LongcatFlashSpec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "longcat_flash"
ARCHITECTURE = "LongcatFlashForCausalLM"

#: LongcatFlashConfig's defaults (the released LongCat-Flash's shapes)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 6144, "num_layers": 28, "num_attention_heads": 64, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "attention_bias": False, "ffn_hidden_size": 12288, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "head_dim": 64, "v_head_dim": 128,
    "moe_topk": 12, "n_routed_experts": 512, "zero_expert_num": 256, "expert_ffn_hidden_size": 2048,
    "routed_scaling_factor": 6.0,
}
#: the names LongcatFlashConfig's attribute_map reads as its own
_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
            "intermediate_size": "ffn_hidden_size", "moe_intermediate_size": "expert_ffn_hidden_size"}


@dataclass(frozen=True)
class LongcatFlashSpec(DeepseekV3Spec):
    """A :class:`DeepseekV3Spec` whose ``n_layers`` counts MLA sublayers (two per layer), plus the zero experts."""

    zero_experts: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers % 2:
            raise ModelError(f"model config: LongCat-Flash has two attention sublayers per layer, so an even number "
                             f"of KV layers; got {self.n_layers}")
        if self.q_lora_rank is None:
            raise ModelError("model config: q_lora_rank null unsupported (LongCat-Flash's queries always have a LoRA)")
        if self.zero_experts < 0:
            raise ModelError(f"model config: zero_expert_num must be >= 0, got {self.zero_experts}")

    def _check_routing(self) -> None:
        if self.n_routed_experts <= 0 or self.moe_intermediate_size <= 0:
            raise ModelError("model config: LongCat-Flash needs positive n_routed_experts and expert_ffn_hidden_size")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts + self.zero_experts:
            raise ModelError(f"model config: moe_topk ({self.num_experts_per_tok}) must be in [1, n_routed_experts + "
                             f"zero_expert_num = {self.n_routed_experts + self.zero_experts}]")

    @property
    def mla_lora_scales(self) -> tuple[float, float] | None:
        assert self.q_lora_rank is not None
        return (self.hidden_size / self.q_lora_rank) ** 0.5, (self.hidden_size / self.kv_lora_rank) ** 0.5

    def is_moe_layer(self, layer: int) -> bool:
        return False  # (the shortcut MoE is not a sublayer's MLP: LongcatFlashModel runs it)

    def to_hf_config(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURE], "model_type": ARCH, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "num_layers": self.n_layers // 2, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads, "hidden_act": hf_activation(self.activation), "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.rms_eps, "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias, "ffn_hidden_size": self.intermediate_size,
            "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim, "qk_rope_head_dim": self.qk_rope_head_dim,
            "head_dim": self.qk_rope_head_dim, "v_head_dim": self.v_head_dim, "qk_head_dim": self.qk_head_dim,
            "moe_topk": self.num_experts_per_tok, "n_routed_experts": self.n_routed_experts,
            "zero_expert_num": self.zero_experts, "expert_ffn_hidden_size": self.moe_intermediate_size,
            "routed_scaling_factor": self.routed_scaling_factor, "rope_parameters": rope,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "dtype": self.dtype,
        }
        return cfg


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None, kv_format: str = "auto",
                     max_context: int | None = None) -> LongcatFlashSpec:
    """The spec of a LongCat-Flash ``config.json`` (its keys over LongcatFlashConfig's defaults; the
    attribute-map aliases read as transformers reads them)."""
    norm = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    for alias, key in _ALIASES.items():
        if alias in cfg and cfg[alias] is not None and key not in cfg:
            norm[key] = cfg[alias]
    if "num_layers" not in cfg and cfg.get("num_hidden_layers") is not None:  # (the config's setter: halved)
        total = cfg_int(cfg, "num_hidden_layers", where)
        if total % 2:
            raise ModelError(f"{where}: num_hidden_layers must be even (two attention sublayers per layer), got "
                             f"{total}")
        norm["num_layers"] = total // 2
    act = gate_activation(norm, where)
    if norm.get("zero_expert_type", "identity") != "identity":
        raise ModelError(f"{where}: zero_expert_type {norm['zero_expert_type']!r} unsupported (transformers' zero "
                         "experts are identities)")
    for key in ("mla_scale_q_lora", "mla_scale_kv_lora"):
        if norm.get(key, True) is not True:
            raise ModelError(f"{where}: {key} {norm[key]!r} unsupported (transformers always scales the LoRA "
                             "latents)")
    if norm.get("router_bias", False) is not False:
        raise ModelError(f"{where}: router_bias {norm['router_bias']!r} unsupported (transformers builds the "
                         "router's bias but never adds it: neither reading is guessed)")
    rope_dim = cfg_int(norm, "qk_rope_head_dim", where)
    if cfg_int(norm, "head_dim", where) != rope_dim:
        raise ModelError(f"{where}: head_dim ({norm['head_dim']}) must equal qk_rope_head_dim ({rope_dim}): "
                         "transformers' RoPE turns head_dim dims of the qk_rope_head_dim-wide part")
    nope = cfg_int(norm, "qk_nope_head_dim", where, minimum=0)
    if norm.get("qk_head_dim") not in (None, nope + rope_dim):
        raise ModelError(f"{where}: qk_head_dim ({norm['qk_head_dim']}) must be qk_nope_head_dim + qk_rope_head_dim "
                         f"({nope + rope_dim})")
    if "rope_theta" not in norm and not isinstance(norm.get("rope_parameters"), dict):
        norm["rope_theta"] = 10000000.0  # (LongcatFlashConfig.default_theta)
    elif isinstance(norm.get("rope_parameters"), dict) and "rope_theta" not in norm["rope_parameters"] \
            and "rope_theta" not in norm:
        norm["rope_theta"] = 10000000.0
    rope_theta, rope_scaling = parse_rope(norm, where)
    if dtype is None:
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = "float32"
    return LongcatFlashSpec(
        activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=cfg_int(norm, "hidden_size", where),
        intermediate_size=cfg_int(norm, "ffn_hidden_size", where),
        moe_intermediate_size=cfg_int(norm, "expert_ffn_hidden_size", where),
        n_layers=2 * cfg_int(norm, "num_layers", where), n_heads=cfg_int(norm, "num_attention_heads", where),
        kv_lora_rank=cfg_int(norm, "kv_lora_rank", where), qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=cfg_int(norm, "v_head_dim", where), q_lora_rank=cfg_int(norm, "q_lora_rank", where),
        n_routed_experts=cfg_int(norm, "n_routed_experts", where),
        num_experts_per_tok=cfg_int(norm, "moe_topk", where),
        routed_scaling_factor=cfg_num(norm, "routed_scaling_factor", where),
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=rope_theta, rope_scaling=rope_scaling,
        rope_interleave=True, max_position=cfg_int(norm, "max_position_embeddings", where),
        tie_embeddings=bool(norm.get("tie_word_embeddings")), attention_bias=bool(norm.get("attention_bias")),
        dtype=dtype, kv_format=kv_format, bos_token_id=norm.get("bos_token_id"),
        eos_token_id=norm.get("eos_token_id"), model_type=ARCH, topk_method="greedy",
        norm_topk_prob=False, zero_experts=cfg_int(norm, "zero_expert_num", where, minimum=0),
        context_cap=max_context)


class ZeroExpertRouter(nn.Module):
    """Softmax over routed and zero experts (in fp32, no bias), the choice shifted by the correction bias; weights
    are the scores times ``routed_scaling_factor``."""

    keep_fp32 = True

    def __init__(self, spec: LongcatFlashSpec) -> None:
        super().__init__()
        total = spec.n_routed_experts + spec.zero_experts
        self.classifier = nn.Linear(spec.hidden_size, total, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(total), requires_grad=False)
        self.k, self.scale = spec.num_experts_per_tok, spec.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.classifier.weight.float()).softmax(dim=-1)
        idx = (scores + self.e_score_correction_bias.float()).topk(self.k, dim=-1, sorted=False)[1]
        return idx, scores.gather(1, idx) * self.scale


class ZeroExpertMoE(nn.Module):
    def __init__(self, spec: LongcatFlashSpec) -> None:
        super().__init__()
        self.router = ZeroExpertRouter(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_intermediate_size, act=activation_of(spec))
                                     for _ in range(spec.n_routed_experts))
        self.zero: list[nn.Module] = [nn.Identity()] * spec.zero_experts  # (not parameters: no state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.router(x)
        return dispatch_experts(x, idx, w, [*self.experts, *self.zero])


class LongcatLayer(nn.Module):
    def __init__(self, spec: LongcatFlashSpec, layer: int) -> None:
        super().__init__()
        self.self_attn = nn.ModuleList(MLAttention(spec, 2 * layer + i) for i in range(2))
        self.mlps = nn.ModuleList(FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec))
                                  for _ in range(2))
        self.input_layernorm = nn.ModuleList(RMSNorm(spec.hidden_size, spec.rms_eps) for _ in range(2))
        self.post_attention_layernorm = nn.ModuleList(RMSNorm(spec.hidden_size, spec.rms_eps) for _ in range(2))
        self.mlp = ZeroExpertMoE(spec)


class _Backbone(nn.Module):
    def __init__(self, spec: LongcatFlashSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LongcatLayer(spec, i) for i in range(spec.n_layers // 2))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)


class LongcatFlashModel(DeepseekV3Model):
    """LongCat-Flash (module docstring): one MLA sublayer per KV layer."""

    def __init__(self, spec: LongcatFlashSpec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        if not isinstance(spec, LongcatFlashSpec):
            raise ModelError(f"LongcatFlashModel runs LongCat-Flash specs, got {type(spec).__name__}")
        super().__init__(spec, device=device, backend=backend, backbone=_Backbone(spec))

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        if layer != state.next_layer:
            raise ModelError(f"layer {layer} run out of order (expected layer {state.next_layer})")
        self._check_kv(layer, kv_layer, state.batch.block_tokens)
        mod = cast(LongcatLayer, self.model.layers[layer // 2])
        sub = layer % 2
        h = state.hidden
        x = mod.input_layernorm[sub](h)
        h = h + self.attention(cast(MLAttention, mod.self_attn[sub]), x, state, kv_layer)
        y = mod.post_attention_layernorm[sub](h)
        if sub == 0:
            state.carry = mod.mlp(y)  # the shortcut MoE's output, added after the second sublayer
            state.hidden = h + mod.mlps[0](y)
        else:
            assert state.carry is not None
            state.hidden = h + mod.mlps[1](y) + state.carry
            state.carry = None
        state.next_layer += 1


def tensors_in(spec: LongcatFlashSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as ours (after :func:`dualpath.model.tensor_names.deepseek_tensors` split packed
    experts): the multi-token-prediction layers and the zero experts' ``gate_proj`` / ``up_proj`` (which nothing
    reads) left out."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("model.mtp."):
            continue
        parts = name.split(".")
        if len(parts) > 5 and parts[3:5] == ["mlp", "experts"] and parts[5].isdigit() \
                and int(parts[5]) >= spec.n_routed_experts:
            continue
        out[name] = t
    return out


def tensors_out(spec: LongcatFlashSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours as transformers' save_pretrained writes them: the zero experts' (unused) ``gate_proj`` / ``up_proj``
    as zeros, which its packed ``gate_up_proj`` expects."""
    out = dict(tensors)
    h, w = spec.hidden_size, spec.moe_intermediate_size
    for layer in range(spec.n_layers // 2):
        ref = out[f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"]
        for e in range(spec.n_routed_experts, spec.n_routed_experts + spec.zero_experts):
            for part in ("gate_proj", "up_proj"):
                out[f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"] = torch.zeros(w, h, dtype=ref.dtype)
    return out
