"""Llama 4's text model (``Llama4ForCausalLM``, model_type ``llama4_text``; the language model of
``Llama4ForConditionalGeneration`` checkpoints) on the Llama path.

What it adds to Llama, as transformers runs it:

* RoPE over interleaved pairs (complex multiplication), read as our half-split rotation by permuting q/k rows at
  load (:mod:`dualpath.model.llama_variants`), on every layer but each ``no_rope_layer_interval``-th (its
  ``no_rope_layers`` flags: 1 = RoPE), whose queries and keys get no position at all (``ModelSpec.nope_layers``);
* on the RoPE layers, a weightless RMS norm (``L2Norm``) of each head's query and key after RoPE (``use_qk_norm``);
* on the NoPE layers, queries scaled by ``1 + attn_scale * log(1 + floor((position + 1) / floor_scale))``
  (``attn_temperature_tuning``);
* MoE layers (``moe_layers``, or every ``interleave_moe_layer_step``-th): a router (``router``, no bias) picks the
  top ``num_experts_per_tok`` logits, each chosen expert gets the token *scaled by* ``sigmoid(logit)`` as input, and
  a shared expert of the same width (``intermediate_size``) is always added; the dense layers' MLP is
  ``intermediate_size_mlp`` wide. Experts are packed ``gate_up_proj [E, hidden, 2I]`` / ``down_proj [E, I, hidden]``
  (``x @ W``), split at load and packed again at save; the MLP is named ``feed_forward``.

Its RoPE layers attend within chunks of ``attention_chunk_size`` tokens (``chunked_attention``: a query at position
``p`` sees the keys ``p // chunk * chunk .. p``; ``ModelSpec.attention_chunk``, the attention kernels' ``chunk``), its
NoPE layers attend to every earlier key. Stored KV does not depend on the chunking (it masks scores only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dualpath.errors import ModelError
from dualpath.model.moe import FeedForward, activation_of

if TYPE_CHECKING:
    from dualpath.model.spec import ModelSpec

#: Llama4TextConfig's defaults where Llama's differ
DEFAULTS: dict[str, Any] = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                            "head_dim": 128, "num_key_value_heads": 8}


def _int(cfg: dict[str, Any], key: str, default: Any, where: str, minimum: int = 0) -> Any:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ModelError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def normalize_config(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config in the Llama path's keys, the spec fields it sets)`` of a Llama 4 text config."""
    out = {**DEFAULTS, **cfg}
    n = _int(out, "num_hidden_layers", None, where, 1)
    if n is None:
        raise ModelError(f"{where}: missing required key 'num_hidden_layers'")
    interval = _int(out, "no_rope_layer_interval", 4, where, 1)
    flags = out.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) for f in flags):
        raise ModelError(f"{where}: no_rope_layers must hold a 0 or 1 for each of the {n} layers, got {flags!r}")
    nope = tuple(i for i, f in enumerate(flags) if not f)
    step = _int(out, "interleave_moe_layer_step", 1, where, 1)
    moe_layers = out.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n, step))
    if not isinstance(moe_layers, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n
                                                for x in moe_layers):
        raise ModelError(f"{where}: moe_layers must list layers of 0..{n - 1}, got {moe_layers!r}")
    chunk = _int(out, "attention_chunk_size", 8192, where, 1)
    types = out.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != n
                              or any(t not in ("chunked_attention", "full_attention") for t in types)):
        raise ModelError(f"{where}: layer_types must list 'chunked_attention' / 'full_attention' for each of the "
                         f"{n} layers, got {types!r}")
    chunked = chunk is not None and len(nope) < n
    if types is not None:  # transformers' default chunks exactly the RoPE layers; another pattern is not read
        want = ["chunked_attention" if chunked and i not in nope else "full_attention" for i in range(n)]
        if types != want:
            raise ModelError(f"{where}: layer_types must chunk exactly the RoPE layers (no_rope_layers 1) when "
                             f"attention_chunk_size is set, else none: expected {want}, got {types}")
    tuning = out.get("attn_temperature_tuning", True)
    if not isinstance(tuning, bool):
        raise ModelError(f"{where}: attn_temperature_tuning must be true or false, got {tuning!r}")
    floor_scale = _int(out, "floor_scale", 8192, where, 1)
    attn_scale = out.get("attn_scale", 0.1)
    if isinstance(attn_scale, bool) or not isinstance(attn_scale, (int, float)) or not math.isfinite(attn_scale):
        raise ModelError(f"{where}: attn_scale must be a number, got {attn_scale!r}")
    qk = out.get("use_qk_norm", True)
    if not isinstance(qk, bool):
        raise ModelError(f"{where}: use_qk_norm must be true or false, got {qk!r}")
    inter = _int(out, "intermediate_size", 8192, where, 1)
    inter_mlp = _int(out, "intermediate_size_mlp", 16384, where, 1)
    out["_nope_layers"] = nope  # (read by family_fields._nope_layers, as Cohere 2's)
    fields = {
        "use_qk_norm": qk,
        "attention_chunk": chunk if chunked else None,
        "nope_temperature": (float(floor_scale), float(attn_scale)) if tuning and nope else None,
        "n_experts": _int(out, "num_local_experts", 16, where, 1),
        "n_experts_per_tok": _int(out, "num_experts_per_tok", 1, where, 1),
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": inter,
        "norm_topk_prob": False,
        "mlp_only_layers": tuple(i for i in range(n) if i not in set(moe_layers)),
    }
    out["intermediate_size"] = inter_mlp  # the dense layers' MLP
    for key in ("no_rope_layers", "moe_layers", "layer_types", "attention_chunk_size", "num_local_experts",
                "num_experts_per_tok", "intermediate_size_mlp", "use_qk_norm"):
        out.pop(key, None)
    return out, fields


def hf_config(spec: ModelSpec, cfg: dict[str, Any]) -> dict[str, Any]:
    """Llama4TextConfig's keys over the Llama-shaped ``cfg``."""
    n = spec.n_layers
    chunk = spec.attention_chunk
    temp = spec.nope_temperature
    cfg.update(
        intermediate_size=spec.moe_intermediate_size, intermediate_size_mlp=spec.intermediate_size,
        num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
        moe_layers=[i for i in range(n) if spec.is_moe_layer(i)],
        no_rope_layers=[0 if i in spec.nope_layers else 1 for i in range(n)],
        use_qk_norm=bool(spec.use_qk_norm), attention_bias=spec.attention_bias,
        attention_chunk_size=chunk if chunk is not None else 8192,
        layer_types=["chunked_attention" if chunk is not None and i not in spec.nope_layers else "full_attention"
                     for i in range(n)],
        attn_temperature_tuning=temp is not None,
        rope_parameters={**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta})
    if temp is not None:
        cfg.update(floor_scale=int(temp[0]), attn_scale=temp[1])
    del cfg["rope_theta"], cfg["rope_scaling"]
    return cfg


def nope_query_scale(positions: torch.Tensor, temperature: tuple[float, float]) -> torch.Tensor:
    """The NoPE layers' query scale per position ``[N]`` (fp32)."""
    floor_scale, attn_scale = temperature
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Llama4MoE(nn.Module):
    """Llama 4's MoE block (module docstring): routed experts fed ``sigmoid(logit) * x``, plus a shared expert."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.n_experts_per_tok
        self.router = nn.Linear(spec.hidden_size, spec.n_experts, bias=False)
        act = activation_of(spec)
        self.experts = nn.ModuleList(FeedForward(spec.hidden_size, spec.moe_intermediate_size, act=act)
                                     for _ in range(spec.n_experts))
        self.shared_expert = FeedForward(spec.hidden_size, spec.shared_expert_intermediate_size, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top.float()).to(x.dtype)
        out = self.shared_expert(x)
        for e in torch.unique(idx).tolist():
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            out = out.index_add(0, rows, self.experts[e](x[rows] * scores[rows, slot, None]))
        return out


_EXPERT = re.compile(r"^(.*)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def tensors_in(spec: ModelSpec, tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Llama 4's tensors in our names: ``feed_forward`` -> ``mlp``, packed experts split (``x @ W`` layout)."""
    out: dict[str, torch.Tensor] = {}
    inter = spec.moe_intermediate_size
    for name, t in tensors.items():
        m = _EXPERT.match(name)
        if m is None:
            out[name.replace(".feed_forward.", ".mlp.")] = t
            continue
        layer, kind = m.groups()
        e_n, h = spec.n_experts, spec.hidden_size
        want = (e_n, h, 2 * inter) if kind == "gate_up_proj" else (e_n, inter, h)
        if tuple(t.shape) != want:
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config implies {want}")
        for e in range(e_n):
            if kind == "gate_up_proj":
                out[f"{layer}.mlp.experts.{e}.gate_proj.weight"] = t[e, :, :inter].t().contiguous()
                out[f"{layer}.mlp.experts.{e}.up_proj.weight"] = t[e, :, inter:].t().contiguous()
            else:
                out[f"{layer}.mlp.experts.{e}.down_proj.weight"] = t[e].t().contiguous()
    return out


def tensors_out(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`tensors_in`."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    pat = re.compile(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name, t in tensors.items():
        m = pat.match(name)
        if m is None:
            out[name.replace(".mlp.", ".feed_forward.")] = t
            continue
        experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
    for layer, parts in experts.items():
        n = len(parts["gate_proj"])
        out[f"{layer}.feed_forward.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e].t(), parts["up_proj"][e].t()], dim=1) for e in range(n)]).contiguous()
        out[f"{layer}.feed_forward.experts.down_proj"] = torch.stack(
            [parts["down_proj"][e].t() for e in range(n)]).contiguous()
    return out


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless RMS norm of each head (fp32, rounded back)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

