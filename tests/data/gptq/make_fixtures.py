"""Writes the GPTQ fixtures of ``tests/model/test_int_quant_hf.py``: small random transformers models whose linear
layers are quantized and packed by AutoGPTQ's own ``QuantLinear.pack`` (``auto_gptq/nn_modules/qlinear/
qlinear_cuda.py``, AutoGPTQ 0.7.1), and the logits transformers computes with the weights AutoGPTQ's own torch
forward dequantizes from them (a fixed identity input through each packed layer). Neither side is this project's
code, so the test checks the loader against the writer's own reading.

Not run by the suite (AutoGPTQ is not a dependency). To regenerate, with AutoGPTQ's wheel unpacked somewhere:

    pip download auto-gptq==0.7.1 --no-deps -d /tmp/ag && unzip -q /tmp/ag/auto_gptq-*.whl -d /tmp/ag/x
    python tests/data/gptq/make_fixtures.py /tmp/ag/x/auto_gptq/nn_modules/qlinear/qlinear_cuda.py

Each fixture folder holds ``checkpoint/`` (``config.json`` and ``model.safetensors``) and ``reference.safetensors``
(``ids`` [2, T] and transformers' ``logits`` [2, T, vocab] in fp32)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).parent


def _quant_linear_class(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("qlinear_cuda", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.QuantLinear


def _qparams(w: torch.Tensor, g_idx: torch.Tensor, n_groups: int, bits: int, sym: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zeros ``[out, groups]`` of ``w`` ``[out, in]`` under ``g_idx``."""
    maxq = 2 ** bits - 1
    scales, zeros = [], []
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            amax = torch.maximum(lo.abs(), hi)
            s = (2 * amax / maxq).clamp(min=1e-6)
            z = torch.full_like(s, (maxq + 1) // 2)
        else:
            s = ((hi - lo) / maxq).clamp(min=1e-6)
            z = torch.round(-lo / s).clamp(0, maxq)
        scales.append(s)
        zeros.append(z)
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def _pack(QL: Any, linear: Any, bits: int, group: int, desc_act: bool, sym: bool, v2: bool, gen: torch.Generator,
          conv1d: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoGPTQ's packed tensors of one layer, and the weight ``[out, in]`` its own forward dequantizes."""
    w = (linear.weight.data.t() if conv1d else linear.weight.data).float()
    n_out, n_in = w.shape
    size = n_in if group == -1 else group
    n_groups = -(-n_in // size)
    g_idx = torch.arange(n_in, dtype=torch.int32) // size
    if desc_act:
        g_idx = g_idx[torch.randperm(n_in, generator=gen)]
    scales, zeros = _qparams(w, g_idx, n_groups, bits, sym)
    scales = scales.half().float()  # (as stored)
    has_bias = getattr(linear, "bias", None) is not None
    ql = QL(bits, group, n_in, n_out, has_bias, weight_dtype=torch.float16)
    ql.pack(linear, scales.clone(), zeros.clone(), g_idx.clone())
    out = {"qweight": ql.qweight.clone(), "qzeros": ql.qzeros.clone(), "scales": ql.scales.clone(),
           "g_idx": ql.g_idx.clone().to(torch.int32)}
    if has_bias:
        out["bias"] = ql.bias.clone()
    ql.scales = ql.scales.float()
    if has_bias:
        ql.bias = None
    dense = ql(torch.eye(n_in)).t().contiguous()  # [out, in], AutoGPTQ's own dequantization
    if v2:  # GPTQModel's v2: the zeros themselves, packed by the same code
        ql2 = QL(bits, group, n_in, n_out, has_bias, weight_dtype=torch.float16)
        ql2.pack(linear, scales.clone(), zeros.clone() + 1, g_idx.clone())
        out["qzeros"] = ql2.qzeros.clone()
    return out, dense


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(7))


def _write(name: str, cfg: Any, model: Any, tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> None:
    d = HERE / name / "checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    cfg_dict["quantization_config"] = qcfg
    cfg_dict["torch_dtype"] = "float32"
    (d / "config.json").write_text(json.dumps(cfg_dict, indent=1, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits.float()
    save_file({"ids": ids, "logits": logits.contiguous()}, str(d.parent / "reference.safetensors"))
    print(name, {p.name: p.stat().st_size for p in (*d.iterdir(), d.parent / "reference.safetensors")})


def _quantize(QL: Any, model: Any, plan: dict[str, tuple[int, int, bool]], sym: bool, v2: bool, conv1d: bool,
              zero_bias: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with each ``plan`` module (name -> bits, group, act order) packed; the model's
    weights replaced by AutoGPTQ's dequantization of them."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # (the float tensors are stored in fp16: the model holds the values they keep)
        for p in model.parameters():
            p.copy_(p.half().float())
    state = {k: v.half() for k, v in model.state_dict().items() if v.is_floating_point()}
    mods = dict(model.named_modules())
    for m, (bits, group, desc_act) in plan.items():
        packed, dense = _pack(QL, mods[m], bits, group, desc_act, sym, v2, gen, conv1d)
        del state[m + ".weight"]
        state.pop(m + ".bias", None)
        state.update({f"{m}.{k}": v for k, v in packed.items()})
        with torch.no_grad():
            mods[m].weight.copy_(dense.t() if conv1d else dense)
        if m.endswith(zero_bias):
            state[m + ".bias"] = torch.zeros(dense.shape[0], dtype=torch.float16)
    return state


def main(qlinear_path: str) -> None:
    QL = _quant_linear_class(qlinear_path)
    torch.manual_seed(0)
    # A: Llama (q/k/v/o with biases), 4-bit groups of 32, act order, asymmetric, the original format, lm_head too
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attention_bias=True, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.mul_(4.0)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    state = _quantize(QL, model, dict.fromkeys(linears, (4, 32, True)), sym=False, v2=False, conv1d=False)
    _write("llama_4bit_actorder", cfg, model, state,
           {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "lm_head": True,
            "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01, "static_groups": False})
    # B: Llama without biases, GPTQModel's v2 format, per-module widths (dynamic): 3-bit per channel by default,
    # 2-bit attention, 8-bit down projections; zero biases written beside the MLP layers (old writers did)
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.mul_(4.0)
    plan = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            plan[n] = (2, 16, False) if "self_attn" in n else (8, 32, True) if "down_proj" in n else (3, -1, False)
    state = _quantize(QL, model, plan, sym=True, v2=True, conv1d=False, zero_bias=("gate_proj", "up_proj"))
    _write("llama_mixed_v2", cfg, model, state,
           {"quant_method": "gptq", "bits": 3, "group_size": -1, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq_v2", "dynamic": {r"+:.*self_attn.*": {"bits": 2, "group_size": 16},
                                                        r"+:.*down_proj.*": {"bits": 8, "group_size": 32,
                                                                             "desc_act": True}}})
    # C: GPT-2 (Conv1D layers), 4-bit groups of 32, symmetric
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                  eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" not in n:
                p.mul_(4.0)
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    state = _quantize(QL, model, dict.fromkeys(conv, (4, 32, False)), sym=True, v2=False, conv1d=True)
    state.pop("lm_head.weight", None)  # (tied)
    _write("gpt2_4bit", cfg, model, state,
           {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True})


if __name__ == "__main__":
    main(sys.argv[1])
