"""DeepSeek-OCR 2's language model (``DeepseekOcr2ForConditionalGeneration``'s ``deepseek_ocr2_text``), as
transformers runs it, over the paged KV pool.

DeepSeek-V2's decoder with Llama's attention in place of MLA: multi-head (or grouped) attention over
``hidden_size / num_attention_heads``-wide heads (transformers sets ``head_dim`` so, whatever the config says), RoPE
over each whole head; dense layers and MoE layers by ``mlp_layer_types`` (required: its config class has no default).
The MoE is DeepSeek-V2's: an fp32 softmax router, ``greedy`` top-k or ``group_limited_greedy`` (groups ranked by their
best expert), the weights times ``routed_scaling_factor`` (not renormalized), plus shared experts
``moe_intermediate_size x n_shared_experts`` wide.

Tensor names: transformers' (``model.language_model.`` or the text model's ``model.``; packed or per-expert experts);
the vision tower, projector and view separator are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.hybrid import Backbone
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.llama import ForwardState, RMSNorm, TypedRopeDecoder, _rope
from dualpath.model.moe import FeedForward, activation_of, dispatch_experts
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_kinds, cfg_num, config_dtype, inherit_outer, parse_rope

__all__ = ["ARCH", "DeepseekOcr2Model", "DeepseekOcr2Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "deepseek_ocr2_text"
ARCHITECTURE = "DeepseekOcr2ForConditionalGeneration"
#: DeepseekOcr2TextConfig's defaults (DeepseekV2Config's, less MLA)
DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
    "num_hidden_layers": 32, "num_attention_heads": 32, "n_routed_experts": 64, "n_shared_experts": 2,
    "topk_method": "greedy", "routed_scaling_factor": 1.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
}


@dataclass(frozen=True)
class DeepseekOcr2Spec(ModelSpec):
    """A :class:`ModelSpec` plus DeepSeek-V2's MoE fields."""

    dense_layers: tuple[int, ...] = ()
    moe_experts: int = 0
    moe_top_k: int = 0
    moe_width: int = 0
    n_shared: int = 0
    topk_method: str = "greedy"
    groups: int = 1
    groups_kept: int = 1
    moe_scale: float = 1.0
    rope_by_type: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        if len(self.dense_layers) == self.n_layers:
            return
        if not 0 < self.moe_top_k <= self.moe_experts or self.moe_width <= 0 or self.n_shared < 0:
            raise ModelError(f"model config: the MoE layers need 1 <= num_experts_per_tok ({self.moe_top_k}) <= "
                             f"n_routed_experts ({self.moe_experts}) and a positive moe_intermediate_size")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ModelError(f"model config: topk_method {self.topk_method!r} unsupported (greedy or "
                             "group_limited_greedy, as DeepSeek-V2's router)")
        if self.topk_method == "group_limited_greedy" and (
                self.groups <= 0 or self.moe_experts % self.groups or not 0 < self.groups_kept <= self.groups
                or self.moe_top_k > self.groups_kept * (self.moe_experts // self.groups)):
            raise ModelError(f"model config: group_limited_greedy needs n_group ({self.groups}) dividing "
                             f"n_routed_experts ({self.moe_experts}), 1 <= topk_group ({self.groups_kept}) <= n_group, "
                             "and enough experts in the kept groups")

    def to_hf_config(self) -> dict[str, Any]:
        n = self.n_layers
        text = {
            "model_type": ARCH, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_width or 1,
            "num_hidden_layers": n, "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "n_routed_experts": self.moe_experts or 1, "n_shared_experts": self.n_shared,
            "num_experts_per_tok": self.moe_top_k or 1, "topk_method": self.topk_method, "n_group": self.groups,
            "topk_group": self.groups_kept, "routed_scaling_factor": self.moe_scale,
            "mlp_layer_types": ["dense" if i in self.dense_layers else "sparse" for i in range(n)],
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "attention_bias": self.attention_bias, "hidden_act": hf_activation(self.activation),
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": None,
            "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype,
        }
        return {"architectures": [ARCHITECTURE], "model_type": "deepseek_ocr2", "text_config": text,
                "tie_word_embeddings": self.tie_embeddings, "dtype": self.dtype}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> DeepseekOcr2Spec:
    """The spec of a DeepSeek-OCR 2 config (the image-text checkpoint's ``text_config`` over its defaults)."""
    text = cfg.get("text_config", cfg)
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (DeepSeek-OCR 2's language model)")
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    inherit_outer(norm, text, cfg)
    if text is not cfg:  # (the image-text model ties its head by its own config's key, never by the text config's)
        norm["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    act = gate_activation(norm, where)
    if norm.get("mlp_bias"):
        raise ModelError(f"{where}: mlp_bias=true unsupported for DeepSeek-OCR 2 (its experts carry no biases)")
    n = cfg_int(norm, "num_hidden_layers", where)
    if norm.get("mlp_layer_types") is None:
        raise ModelError(f"{where}: DeepSeek-OCR 2 needs mlp_layer_types (its config class has no default, and "
                         "transformers' model cannot be built without it)")
    mlp = cfg_kinds(norm, "mlp_layer_types", n, ("dense", "sparse"), where, [])
    heads = cfg_int(norm, "num_attention_heads", where)
    hidden = cfg_int(norm, "hidden_size", where)
    if hidden % heads:
        raise ModelError(f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    theta, scaling = parse_rope(norm, where)
    if scaling is not None:
        raise ModelError(f"{where}: rope_parameters of type {scaling.get('rope_type')!r} unsupported for DeepSeek-OCR "
                         "2 (only 'default')")
    sparse = "sparse" in mlp
    return DeepseekOcr2Spec(
        architecture=ARCH, activation=act, vocab_size=cfg_int(norm, "vocab_size", where), hidden_size=hidden,
        intermediate_size=cfg_int(norm, "intermediate_size", where), n_layers=n, n_heads=heads,
        n_kv_heads=int(norm.get("num_key_value_heads") or heads), head_dim=hidden // heads,
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta,
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=bool(norm["tie_word_embeddings"]),
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        dense_layers=tuple(i for i, m in enumerate(mlp) if m == "dense"),
        moe_experts=cfg_int(norm, "n_routed_experts", where) if sparse else 0,
        moe_top_k=cfg_int(norm, "num_experts_per_tok", where) if sparse else 0,
        moe_width=cfg_int(norm, "moe_intermediate_size", where) if sparse else 0,
        n_shared=cfg_int(norm, "n_shared_experts", where, minimum=0) if sparse else 0,
        topk_method=str(norm["topk_method"]), groups=int(norm.get("n_group") or 1),
        groups_kept=int(norm.get("topk_group") or 1), moe_scale=cfg_num(norm, "routed_scaling_factor", where),
        rope_by_type={"all": (theta, 1.0)})


class Router(nn.Module):
    """DeepSeek-V2's router (module docstring), in fp32."""

    keep_fp32 = True

    def __init__(self, spec: DeepseekOcr2Spec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(spec.moe_experts, spec.hidden_size))
        self.spec = spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        if s.topk_method == "group_limited_greedy":
            groups = scores.view(x.shape[0], s.groups, -1)
            keep = groups.amax(dim=-1).topk(s.groups_kept, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, keep, True)
            scores = scores.masked_fill(~mask[:, :, None].expand_as(groups).reshape_as(scores), 0.0)
        w, idx = scores.topk(s.moe_top_k, dim=-1, sorted=False)
        return idx, w * s.moe_scale


class MoE(nn.Module):
    def __init__(self, spec: DeepseekOcr2Spec) -> None:
        super().__init__()
        self.gate = Router(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_width, act=activation_of(spec)) for _ in range(spec.moe_experts))
        self.shared_experts = FeedForward(spec.hidden_size, spec.moe_width * spec.n_shared, act=activation_of(spec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.gate(x)
        return dispatch_experts(x, idx, w, self.experts) + self.shared_experts(x)


class Attention(nn.Module):
    def __init__(self, spec: DeepseekOcr2Spec) -> None:
        super().__init__()
        hq, hkv, d, bias = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, hq * d, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=bias)
        self.o_proj = nn.Linear(hq * d, spec.hidden_size, bias=bias)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DeepseekOcr2Spec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp: nn.Module = (FeedForward(spec.hidden_size, spec.intermediate_size, act=activation_of(spec)) if layer in spec.dense_layers
                               else MoE(spec))


class DeepseekOcr2Model(TypedRopeDecoder):
    """DeepSeek-OCR 2's language model (module docstring) over a paged KV pool."""

    def __init__(self, spec: DeepseekOcr2Spec, device: str | torch.device = "cpu", backend: str = "auto") -> None:
        super().__init__()
        self._build(spec, Backbone(spec, lambda i: DecoderLayer(spec, i)), device, backend)
        self.spec: DeepseekOcr2Spec = spec
        self._typed_rope(spec)

    @torch.no_grad()
    def prefill_layer(self, layer: int, state: ForwardState, kv_layer: torch.Tensor) -> None:
        st = self.layer_state(layer, state, kv_layer)
        spec, b = self.spec, state.batch
        mod = cast(DecoderLayer, self.model.layers[layer])
        attn = mod.self_attn
        x = mod.input_layernorm(st.hidden)
        n, hq, hkv, d = x.shape[0], spec.n_heads, spec.n_kv_heads, spec.head_dim
        cos, sin = st.tables["all"]
        q = _rope(attn.q_proj(x).view(n, hq, d), cos[:, None, :], sin[:, None, :])
        k = _rope(attn.k_proj(x).view(n, hkv, d), cos[:, None, :], sin[:, None, :])
        o = self.attend(q, k, attn.v_proj(x).view(n, hkv, d), kv_layer, b, d ** -0.5)
        h = st.hidden + attn.o_proj(o.reshape(n, hq * d))
        st.hidden = h + mod.mlp(mod.post_attention_layernorm(h))
        state.next_layer += 1


#: the image-text checkpoint's parts that are not its language model (released and transformers' names)
_OTHER = ("model.vision_tower.", "model.multi_modal_projector.", "model.view_separator", "model.view_seperator",
          "model.sam_model.", "model.vision_model.", "model.qwen2_model.", "model.projector.", "vision_tower.",
          "multi_modal_projector.")


def tensors_out(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours under transformers' in-memory names of the image-text model (``model.language_model.``, packed
    experts), which its ``from_pretrained`` reads as they are."""
    from dualpath.model.tensor_names import _packed_experts

    return {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
            for k, v in _packed_experts(dict(tensors)).items()}


def tensors_in(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The language model's tensors under our names (``model.language_model.`` -> ``model.``), packed experts
    split; the vision parts left out."""
    from dualpath.model.tensor_names import _split_packed_experts

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_OTHER):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out
