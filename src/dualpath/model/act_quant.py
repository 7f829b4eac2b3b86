"""The input quantization of a compressed-tensors W8A8 checkpoint's linear layers, as its config says
(``config_groups.*.input_activations``): FP8 (e4m3) or INT8, symmetric, a scale per token or per tensor, computed
from each input (dynamic) or the checkpoint's ``input_scale`` (static). Each quantized layer's input is quantized
and dequantized before its (dequantized) weight multiplies it, as transformers runs these checkpoints with
compressed-tensors and as vLLM's W8A8 kernels round: the logits equal transformers' (``test_compressed_tensors_hf``).

A per-tensor dynamic scale is the batch's: it depends on which tokens share a forward, here as in vLLM."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dualpath.errors import ModelError

#: fused checkpoint projections this project splits at load, and the parts that read the same input
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class ActivationQuant:
    """How a quantized layer's input is rounded: ``kind`` ``float`` (e4m3) or ``int`` (int8), its scale per
    ``token`` or per ``tensor``, from each input (``dynamic``) or a stored ``input_scale``."""

    kind: str
    strategy: str
    dynamic: bool

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` quantized and dequantized (compressed-tensors' ``fake_quantize``, in ``x``'s dtype)."""
        lo, hi = (-448.0, 448.0) if self.kind == "float" else (-128.0, 127.0)
        if scale is None:
            amax = x.abs().amax(dim=-1, keepdim=True) if self.strategy == "token" else x.abs().amax()
            scale = amax / ((hi - lo) / 2)
            scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype,
                                                         device=scale.device), scale)
        else:
            scale = scale.to(x.dtype)
        y = torch.clamp(x / scale, lo, hi)
        y = y.to(torch.float8_e4m3fn) if self.kind == "float" else torch.round(y)
        return y.to(x.dtype) * scale


def activation_quant(hf_config: Mapping[str, Any], where: str) -> ActivationQuant | None:
    """The input quantization a compressed-tensors config asks for, or None (none asked, or another method).
    Anything other than symmetric 8-bit FP8 / INT8 per token or per tensor is refused naming the key."""
    q = hf_config.get("quantization_config")
    if not isinstance(q, Mapping) or str(q.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    groups = q.get("config_groups")
    found: set[ActivationQuant] = set()
    for name, group in (groups.items() if isinstance(groups, Mapping) else ()):
        ia = group.get("input_activations") if isinstance(group, Mapping) else None
        if ia is None:
            continue
        key = f"quantization_config.config_groups.{name}.input_activations"
        if not isinstance(ia, Mapping):
            raise ModelError(f"{where}: {key} must be an object")
        kind, bits, strategy = ia.get("type", "int"), ia.get("num_bits"), ia.get("strategy", "tensor")
        dynamic, symmetric = ia.get("dynamic", False), ia.get("symmetric", True)
        if kind not in ("float", "int") or bits != 8 or symmetric is not True or strategy not in ("token", "tensor") \
                or not isinstance(dynamic, bool):
            raise ModelError(f"{where}: {key} {dict(ia)!r} is not supported (symmetric 8-bit float or int, per token "
                             "or per tensor, dynamic or static, is)")
        found.add(ActivationQuant(str(kind), str(strategy), dynamic))
    if len(found) > 1:
        raise ModelError(f"{where}: quantization_config.config_groups quantize inputs in {len(found)} different ways; "
                         "one is supported")
    return next(iter(found), None)


def quantized_layers(tensors: Mapping[str, torch.Tensor]) -> tuple[set[str], dict[str, torch.Tensor]]:
    """The checkpoint's quantized layers (a ``weight`` beside its ``weight_scale``, by module name) and their
    static ``input_scale``, read before the weights are dequantized and those scales dropped."""
    layers = {name[: -len(".weight_scale")] for name in tensors if name.endswith(".weight_scale")
              and name[: -len("_scale")] in tensors}
    scales = {name[: -len(".input_scale")]: t for name, t in tensors.items() if name.endswith(".input_scale")}
    return layers, scales


def install(model: nn.Module, aq: ActivationQuant, layers: Collection[str], input_scales: Mapping[str, torch.Tensor],
            source: str) -> int:
    """Quantize the input of each of ``layers`` (checkpoint module names; a fused ``qkv_proj`` / ``gate_up_proj``
    is the parts it was split into) before it runs; how many of the model's layers were hooked. A layer that is not
    one of the model's, or a static scheme's layer without its ``input_scale``, is an error naming it."""
    modules = dict(model.named_modules())
    hooked = 0
    for layer in sorted(layers):
        parent, _, leaf = layer.rpartition(".")
        targets = [layer] if layer in modules else [f"{parent}.{p}" for p in _FUSED_PARTS.get(leaf, ())]
        if not targets or any(not isinstance(modules.get(t), nn.Linear) for t in targets):
            raise ModelError(f"{source}: quantized layer {layer!r} has no linear layer here to quantize the input of")
        scale = input_scales.get(layer)
        if not aq.dynamic and scale is None:
            raise ModelError(f"{source}: quantized layer {layer!r} has no input_scale (its config quantizes inputs "
                             "with static scales)")
        for t in targets:
            modules[t].register_forward_pre_hook(_hook(aq, None if aq.dynamic else scale))
            hooked += 1
    return hooked


def _hook(aq: ActivationQuant, scale: torch.Tensor | None) -> Any:
    def quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        s = None if scale is None else scale.to(args[0].device)
        return (aq(args[0], s), *args[1:])

    return quantize_input
