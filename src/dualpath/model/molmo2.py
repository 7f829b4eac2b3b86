"""Molmo2's language model (``Molmo2ForConditionalGeneration``'s ``molmo2_text``), as transformers runs it on text,
over the paged KV pool (:class:`~dualpath.model.llama.LlamaModel`'s layers).

AllenAI's Molmo2 puts a SigLIP-style vision tower and a pooling adapter in front of one of two language models, and
its text config says which one:

* ``qk_norm_type: qwen3`` (Molmo2 4B / 8B, over Qwen3): RMSNorms over each head's query and key, before RoPE;
* ``qk_norm_type: olmo`` (Molmo2-O, over OLMo): RMSNorms over the whole q and k projections, before RoPE;
* ``norm_after: true``: each sublayer's output is normed before the residual (``input_layernorm`` after the
  attention, ``post_attention_layernorm`` after the MLP) instead of its input; the norms multiply in the compute
  dtype, as Llama's do (not OLMo 2's fp32).

Both combine freely with either. Further:

* **an embedding wider than the head**: ``vocab_size + additional_vocab_size`` rows (the image and frame tokens),
  while the LM head has ``vocab_size`` rows; our logits keep the embedding's width with -inf past the head
  (:attr:`ModelSpec.output_vocab_size`), so no sampler picks an image token;
* **a RoPE per layer**: a scaled RoPE (``rope_parameters``: YaRN, linear, ...) on the layers of
  ``rope_scaling_layers`` (all by default) and the plain RoPE of the same base on the others;
* **the head is never tied** (transformers builds no tie, whatever ``tie_word_embeddings`` says).

Tensor names: the released layout, which transformers also writes (``model.transformer.blocks.N`` with a fused
``att_proj`` = q; k; v, ``attn_out``, ``ff_proj`` = up; gate, ``ff_out``, ``attn_norm`` / ``ff_norm``, ``ln_f``,
and the embedding as ``wte.embedding`` + ``wte.new_embedding``), or transformers' in-memory names under
``model.language_model.``. The vision tower and adapter (``model.vision_backbone.*``) are left out: requests carry
text, and without an image the prompt is the language model's alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.model.hf_config import canonical_keys
from dualpath.model.layernorm_family import gate_activation, hf_activation
from dualpath.model.spec import ModelSpec
from dualpath.model.spec_common import cfg_int, cfg_num, config_dtype, parse_rope

__all__ = ["ARCH", "Molmo2Spec", "spec_from_config", "tensors_in", "tensors_out"]

ARCH = "molmo2_text"
ARCHITECTURE = "Molmo2ForConditionalGeneration"
#: Molmo2TextConfig's defaults
DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "additional_vocab_size": 128, "attention_bias": False, "qk_norm_type": "qwen3", "num_hidden_layers": 36,
    "intermediate_size": 12288, "hidden_act": "silu", "max_position_embeddings": 36864, "rms_norm_eps": 1e-6,
    "norm_after": False, "rope_theta": 10000.0,
}
#: the placeholder vision tower and adapter written beside the language model by :meth:`Molmo2Spec.to_hf_config`:
#: the written checkpoint holds no vision weights, so transformers builds this one-layer tower (randomly
#: initialized) instead of its 25-layer default
_VISION_PLACEHOLDER: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16}


@dataclass(frozen=True)
class Molmo2Spec(ModelSpec):
    """A :class:`ModelSpec` plus Molmo2's q/k norm span, output norms and the layers on the plain RoPE."""

    qk_norm_type: str = "qwen3"
    norm_after: bool = False
    unscaled_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "unscaled_layers", tuple(sorted(set(self.unscaled_layers))))
        if self.qk_norm_type not in ("qwen3", "olmo"):
            raise ModelError(f"model config: qk_norm_type must be 'qwen3' (per head) or 'olmo' (whole projections), "
                             f"got {self.qk_norm_type!r}")
        if any(not 0 <= i < self.n_layers for i in self.unscaled_layers):
            raise ModelError(f"model config: rope_scaling_layers must name layers 0..{self.n_layers - 1}")
        if self.unscaled_layers and (self.rope_scaling is None or self.rope_local_theta != self.rope_theta):
            raise ModelError("model config: layers outside rope_scaling_layers turn the plain RoPE of rope_theta, "
                             "which only a scaled RoPE sets apart")

    @property
    def qk_norm(self) -> bool:
        return self.qk_norm_type == "qwen3"

    @property
    def qk_norm_full(self) -> bool:
        return self.qk_norm_type == "olmo"

    @property
    def post_norms(self) -> bool:
        return self.norm_after

    def local_rope_layer(self, layer: int) -> bool:
        return layer in self.unscaled_layers

    def to_hf_config(self) -> dict[str, Any]:
        head = self.output_vocab_size or self.vocab_size
        rope = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        text = {
            "model_type": ARCH, "vocab_size": head, "additional_vocab_size": self.vocab_size - head,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "hidden_act": hf_activation(self.activation),
            "max_position_embeddings": self.max_position, "rms_norm_eps": self.rms_eps,
            "attention_bias": self.attention_bias, "qk_norm_type": self.qk_norm_type, "norm_after": self.norm_after,
            "rope_parameters": rope,
            "rope_scaling_layers": [i for i in range(self.n_layers) if i not in self.unscaled_layers],
            "tie_word_embeddings": False, "dtype": self.dtype,
        }
        vision = dict(_VISION_PLACEHOLDER)
        adapter = {**{k: vision[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                             "head_dim", "intermediate_size")},
                   "text_hidden_size": self.hidden_size, "vision_feature_layer": [-1]}
        return {"architectures": [ARCHITECTURE], "model_type": "molmo2", "text_config": text,
                "vision_config": vision, "adapter_config": adapter, "tie_word_embeddings": False,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "dtype": self.dtype}


def spec_from_config(cfg: dict[str, Any], where: str, dtype: str | None = None,
                     max_context: int | None = None) -> Molmo2Spec:
    """The spec of a Molmo2 config (the image-text checkpoint's ``text_config``, or a ``molmo2_text`` config alone)
    over Molmo2TextConfig's defaults."""
    text = cfg.get("text_config", cfg) if cfg.get("model_type") != ARCH else cfg
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise ModelError(f"{where}: text_config must be an object (Molmo2's language model)")
    # (Molmo2TextConfig's attribute_map, for a text config that names no model_type too)
    text = canonical_keys({**text, "model_type": ARCH}, where)
    norm = {**DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    for key in ("torch_dtype", "dtype", "bos_token_id", "eos_token_id"):
        if text.get(key) is None and cfg.get(key) is not None:
            norm[key] = cfg[key]
    act = gate_activation(norm, f"{where}: text_config")
    if norm.get("qk_norm_type") not in ("qwen3", "olmo"):
        raise ModelError(f"{where}: text_config.qk_norm_type must be 'qwen3' or 'olmo', got "
                         f"{norm.get('qk_norm_type')!r}")
    n = cfg_int(norm, "num_hidden_layers", where)
    vocab = cfg_int(norm, "vocab_size", where)
    extra = cfg_int(norm, "additional_vocab_size", where, minimum=0)
    theta, scaling = parse_rope(norm, where)
    scaled = norm.get("rope_scaling_layers")
    if scaled is None:
        scaled = list(range(n))
    if not isinstance(scaled, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n
                                           for i in scaled):
        raise ModelError(f"{where}: text_config.rope_scaling_layers must list layer indices 0..{n - 1}, got "
                         f"{scaled!r}")
    unscaled = tuple(i for i in range(n) if i not in scaled) if scaling is not None else ()
    return Molmo2Spec(
        architecture=ARCH, activation=act, vocab_size=vocab + extra, output_vocab_size=vocab if extra else None,
        hidden_size=cfg_int(norm, "hidden_size", where), intermediate_size=cfg_int(norm, "intermediate_size", where),
        n_layers=n, n_heads=cfg_int(norm, "num_attention_heads", where),
        n_kv_heads=cfg_int(norm, "num_key_value_heads", where), head_dim=cfg_int(norm, "head_dim", where),
        rms_eps=cfg_num(norm, "rms_norm_eps", where), rope_theta=theta, rope_scaling=scaling,
        rope_local_theta=theta if unscaled else None,
        max_position=cfg_int(norm, "max_position_embeddings", where), tie_embeddings=False,
        attention_bias=bool(norm["attention_bias"]), dtype=config_dtype(norm, dtype),
        bos_token_id=norm.get("bos_token_id"), eos_token_id=norm.get("eos_token_id"), context_cap=max_context,
        qk_norm_type=str(norm["qk_norm_type"]), norm_after=bool(norm["norm_after"]), unscaled_layers=unscaled)


#: the released layout's names in a block -> ours (the norms: see :func:`_norm_names`)
_BLOCK_NAMES = {"self_attn.attn_out.": "self_attn.o_proj.", "mlp.ff_out.": "mlp.down_proj.",
                "self_attn.q_norm.": "self_attn.q_norm.", "self_attn.k_norm.": "self_attn.k_norm."}
_RELEASED = "model.transformer."
_IN_MEMORY = "model.language_model."


def _norm_names(spec: Molmo2Spec) -> dict[str, str]:
    """Molmo2's two block norms -> ours: with ``norm_after`` they norm the attention's and the MLP's outputs (our
    ``post_attention_layernorm`` / ``post_feedforward_layernorm``), else their inputs."""
    if spec.norm_after:
        return {"input_layernorm.": "post_attention_layernorm.", "post_attention_layernorm.": "post_feedforward_layernorm."}
    return {"input_layernorm.": "input_layernorm.", "post_attention_layernorm.": "post_attention_layernorm."}


def _released_names(spec: Molmo2Spec) -> dict[str, str]:
    """The released layout's unfused names in a block -> ours."""
    norms = _norm_names(spec)
    return {"attn_norm.": norms["input_layernorm."], "ff_norm.": norms["post_attention_layernorm."], **_BLOCK_NAMES}


def _split_rows(t: torch.Tensor, sizes: list[int], name: str, source: str) -> tuple[torch.Tensor, ...]:
    if t.shape[0] != sum(sizes):
        raise ModelError(f"{source}: {name} has {t.shape[0]} rows, expected {sum(sizes)} ({' + '.join(map(str, sizes))})")
    return tuple(torch.split(t, sizes, dim=0))


def tensors_in(spec: Molmo2Spec, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The language model's tensors under our names, from the released layout or transformers' in-memory one; the
    vision tower and adapter left out."""
    norms = _norm_names(spec)
    if not any(k.startswith(_RELEASED) for k in tensors):  # (transformers' in-memory names)
        out = {}
        for name, t in tensors.items():
            if name.startswith(_IN_MEMORY):  # (the loader may have taken the prefix off already)
                name = "model." + name[len(_IN_MEMORY):]
            if name.startswith("model.layers."):
                for theirs, ours in norms.items():
                    if f".{theirs}" in name:
                        name = name.replace(f".{theirs}", f".{ours}")
                        break
            if name.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
                out[name] = t
        return out
    d, hq, hkv = spec.head_dim, spec.n_heads, spec.n_kv_heads
    released = _released_names(spec)
    out = {}
    embed = []
    for part in ("embedding", "new_embedding"):
        key = f"{_RELEASED}wte.{part}"
        if key in tensors:
            embed.append(tensors[key])
    if embed:
        out["model.embed_tokens.weight"] = torch.cat(embed, dim=0)
    for name, t in tensors.items():
        if name == "lm_head.weight":
            out[name] = t
        elif name.startswith(f"{_RELEASED}ln_f."):
            out["model.norm." + name[len(f"{_RELEASED}ln_f."):]] = t
        elif name.startswith(f"{_RELEASED}blocks."):
            layer, _, rest = name[len(f"{_RELEASED}blocks."):].partition(".")
            prefix = f"model.layers.{layer}."
            if rest.startswith("self_attn.att_proj."):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = _split_rows(t, [hq * d, hkv * d, hkv * d], name, source)
                out.update({f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                            f"{prefix}self_attn.v_proj.{kind}": v})
            elif rest.startswith("mlp.ff_proj."):
                kind = rest.rsplit(".", 1)[1]
                up, gate = _split_rows(t, [spec.intermediate_size] * 2, name, source)
                out.update({f"{prefix}mlp.up_proj.{kind}": up, f"{prefix}mlp.gate_proj.{kind}": gate})
            else:
                mine = next((o + rest[len(r):] for r, o in released.items() if rest.startswith(r)), None)
                if mine is None:
                    raise ModelError(f"{source}: unexpected tensor {name!r} in a Molmo2 block")
                out[prefix + mine] = t
    return out


def tensors_out(spec: Molmo2Spec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors in the released layout, as transformers writes a Molmo2 checkpoint (the embedding's first
    ``vocab_size`` rows as ``wte.embedding``, the image tokens' as ``wte.new_embedding``)."""
    back = {ours: theirs for theirs, ours in _released_names(spec).items()}
    head = spec.output_vocab_size or spec.vocab_size
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name == "model.embed_tokens.weight":
            out[f"{_RELEASED}wte.embedding"] = t[:head]
            out[f"{_RELEASED}wte.new_embedding"] = t[head:]
        elif name.startswith("model.norm."):
            out[f"{_RELEASED}ln_f." + name[len("model.norm."):]] = t
        elif name.startswith("model.layers."):
            layer, _, rest = name[len("model.layers."):].partition(".")
            layers.setdefault(layer, {})[rest] = t
        else:
            out[name] = t
    for layer, parts in layers.items():
        prefix = f"{_RELEASED}blocks.{layer}."
        for kind in ("weight", "bias"):
            if f"self_attn.q_proj.{kind}" in parts:
                out[f"{prefix}self_attn.att_proj.{kind}"] = torch.cat(
                    [parts.pop(f"self_attn.{p}_proj.{kind}") for p in "qkv"], dim=0)
            if f"mlp.up_proj.{kind}" in parts:
                out[f"{prefix}mlp.ff_proj.{kind}"] = torch.cat(
                    [parts.pop(f"mlp.up_proj.{kind}"), parts.pop(f"mlp.gate_proj.{kind}")], dim=0)
        for rest, t in parts.items():
            theirs = next((th + rest[len(o):] for o, th in back.items() if rest.startswith(o)), None)
            if theirs is None:
                raise ModelError(f"no Molmo2 name for model.layers.{layer}.{rest}")
            out[prefix + theirs] = t
    return out
