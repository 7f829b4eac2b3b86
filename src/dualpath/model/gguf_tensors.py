"""GGUF tensors in Hugging Face names (:func:`hf_tensors`): each architecture's llama.cpp names mapped back, every
tensor dequantized by the ``gguf`` package, and what llama.cpp's converter did to the values undone (q/k rows
permuted for Llama-converted families, ``1 + weight`` norms, GPT-2's transposed ``Conv1D``, StableLM's stacked
per-head norms, stacked or per-expert MoE weights, DeepSeek's ``kv_b_proj`` split into ``attn_k_b`` / ``attn_v_b``,
gpt-oss's experts split into gate and up). The config a file describes is :mod:`dualpath.model.gguf`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


#: per-architecture names where they differ from Llama's
_ARCH_NAMES: dict[str, dict[str, str]] = {
    "qwen2moe": {"ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                 "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                 "ffn_down_shexp": "mlp.shared_expert.down_proj"},
    "qwen3moe": {"ffn_gate_inp": "mlp.gate"},
    "llama": {"ffn_gate_inp": "mlp.gate"},  # (Mixtral: llama.cpp writes it as a Llama with experts)
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma2": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_ARCH_NAMES["gemma3"] = _ARCH_NAMES["gemma2"]
_ARCH_NAMES["glm4moe"] = {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate",
                          "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                          "ffn_down_shexp": "mlp.shared_experts.down_proj"}
_ARCH_NAMES["gpt-oss"] = {"post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router"}
_ARCH_NAMES["deepseek2"] = {"attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
                            "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
                            "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
                            "attn_kv_b": "self_attn.kv_b_proj", "ffn_gate_inp": "mlp.gate",
                            "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                            "ffn_down_shexp": "mlp.shared_experts.down_proj"}
_ARCH_NAMES["olmo2"] = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_ARCH_NAMES["starcoder2"] = {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
#: GPT-2's names (its own prefix); its Conv1D weights are stored transposed by llama.cpp
_GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
             "output": "lm_head"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
#: architectures whose norms llama.cpp stores as ``1 + weight``
_PLUS_ONE_NORMS = ("gemma", "gemma2", "gemma3", "nemotron")
#: stacked experts ``[E, out, in]`` -> one tensor per expert
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def _gguf_name(name: str, arch: str = "llama") -> str | None:
    parts = name.split(".")
    if arch == "gpt2":
        if len(parts) == 2 and parts[0] in _GPT2_TOP:
            return f"{_GPT2_TOP[parts[0]]}.{parts[1]}"
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GPT2_BLOCK:
            return f"transformer.h.{parts[1]}.{_GPT2_BLOCK[parts[2]]}.{parts[3]}"
        return None
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name in ("output_norm.bias", "output.bias"):
        return "model.norm.bias" if name == "output_norm.bias" else "lm_head.bias"
    names = {**_GGUF_NAMES, **_ARCH_NAMES.get(arch, {})}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


#: architectures llama.cpp converts as Llama's, q/k rows permuted into interleaved RoPE pairs
_PERMUTED = ("llama", "granite", "smollm3")

def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to Hugging Face's half split)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def hf_tensors(reader: Any, arch: str, cfg: dict[str, Any], n_heads: int, n_kv: int, dtype: torch.dtype,
               p: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file (``reader``: the ``gguf`` package's) under its Hugging Face name for ``arch``
    (llama.cpp's architecture; ``cfg``: the config read from the file), each computed in fp32 and kept in ``dtype``."""
    import gguf
    import numpy as np

    def read(t: Any) -> torch.Tensor:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{p}: tensor {t.name}: quantization {t.tensor_type.name} unsupported") from None
        return torch.from_numpy(np.array(arr, dtype=np.float32))

    tensors: dict[str, torch.Tensor] = {}
    kv_halves: dict[str, dict[str, torch.Tensor]] = {}  # (DeepSeek: kv_b_proj split into k_b and v_b)
    oss_experts: dict[str, dict[str, torch.Tensor]] = {}  # (gpt-oss: gate and up split out of its packed experts)
    for t in reader.tensors:
        if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
            continue
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= cfg["num_hidden_layers"]:
            continue  # (DeepSeek's multi-token-prediction layers: not decoder layers)
        if arch == "gpt-oss" and len(parts) == 4 and (parts[2] in _EXPERTS or parts[2] == "attn_sinks"):
            if parts[2] == "attn_sinks":
                tensors[f"model.layers.{parts[1]}.self_attn.sinks"] = read(t).reshape(-1).to(dtype)
            else:  # (assembled into transformers' packed experts below)
                oss_experts.setdefault(parts[1], {})[f"{parts[2]}.{parts[3]}"] = read(t)
            continue
        if arch in ("deepseek2", "glm4moe") and len(parts) == 4 and parts[2] in ("exp_probs_b", "attn_k_b", "attn_v_b"):
            if parts[2] == "exp_probs_b":
                tensors[f"model.layers.{parts[1]}.mlp.gate.e_score_correction_bias"] = read(t).reshape(-1).to(dtype)
            else:
                kv_halves.setdefault(parts[1], {})[parts[2]] = read(t)
            continue
        experts = _EXPERTS.get(parts[2]) if len(parts) == 4 and parts[0] == "blk" else None
        if len(parts) == 5 and parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down") \
                and parts[3].isdigit() and "num_local_experts" in cfg:  # (older Mixtral files: one tensor per expert)
            tensors[f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{parts[2][4:]}_proj.{parts[4]}"] = \
                read(t).to(dtype)
            continue
        hf_name = _gguf_name(t.name, arch)
        if hf_name is None and experts is None:
            raise ModelError(f"{p}: unexpected GGUF tensor {t.name!r} for architecture {arch!r}")
        w = read(t)
        if experts is not None:  # ([experts, out, in] -> one weight per expert)
            n_exp = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
            if w.dim() != 3 or w.shape[0] != n_exp:
                raise ModelError(f"{p}: tensor {t.name} has shape {tuple(w.shape)}, expected [{n_exp}, out, in] "
                                 f"({arch}.expert_count)")
            for e in range(n_exp):
                tensors[f"model.layers.{parts[1]}.mlp.experts.{e}.{experts}.{parts[3]}"] = w[e].to(dtype, copy=True)
            continue
        assert hf_name is not None
        if arch in _PERMUTED and ".self_attn.q_proj." in hf_name:
            w = _unpermute(w, n_heads)
        elif arch in _PERMUTED and ".self_attn.k_proj." in hf_name:
            w = _unpermute(w, n_kv)
        elif arch in _PLUS_ONE_NORMS and hf_name.endswith("norm.weight"):
            w = w - 1.0  # (llama.cpp stores these norms as 1 + weight)
        elif hf_name.endswith("mlp.shared_expert_gate.weight"):
            w = w.reshape(1, -1)
        elif arch == "gpt2" and w.dim() == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.t().contiguous()  # (back to Conv1D's [in, out])
        elif arch == "stablelm" and hf_name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            heads = n_heads if ".q_norm." in hf_name else n_kv  # ([heads, dim]: one LayerNorm per head)
            if w.dim() != 2 or w.shape[0] != heads:
                raise ModelError(f"{p}: tensor {t.name} has shape {tuple(w.shape)}, expected [{heads}, head_dim]")
            side = "q" if ".q_norm." in hf_name else "k"
            for h in range(heads):
                tensors[hf_name.replace(f"self_attn.{side}_norm.", f"self_attn.{side}_layernorm.norms.{h}.")] = \
                    w[h].to(dtype, copy=True)
            continue
        tensors[hf_name] = w.to(dtype)
    for bid, halves in kv_halves.items():
        tensors[f"model.layers.{bid}.self_attn.kv_b_proj.weight"] = _kv_b(halves, cfg, p, bid).to(dtype)
    for bid, parts_of in oss_experts.items():
        tensors.update({k: v.to(dtype) for k, v in _oss_experts(parts_of, cfg, p, bid).items()})
    return tensors


def _oss_experts(t: dict[str, torch.Tensor], cfg: dict[str, Any], p: Path, bid: str) -> dict[str, torch.Tensor]:
    """gpt-oss's experts in transformers' packed layout from llama.cpp's: ``gate_up_proj`` ``[E, hidden, 2 I]``
    with gate and up interleaved column by column (llama.cpp splits them into ``ffn_gate_exps`` / ``ffn_up_exps``
    ``[E, I, hidden]``), its bias likewise, ``down_proj`` ``[E, I, hidden]`` (``ffn_down_exps`` ``[E, hidden, I]``)."""
    n_exp, width, hidden = cfg["num_local_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    want = {"ffn_gate_exps.weight": (n_exp, width, hidden), "ffn_up_exps.weight": (n_exp, width, hidden),
            "ffn_down_exps.weight": (n_exp, hidden, width), "ffn_gate_exps.bias": (n_exp, width),
            "ffn_up_exps.bias": (n_exp, width), "ffn_down_exps.bias": (n_exp, hidden)}
    for k, shape in want.items():
        if k not in t or tuple(t[k].shape) != shape:
            raise ModelError(f"{p}: blk.{bid}.{k} has shape {None if k not in t else tuple(t[k].shape)}, expected "
                             f"{shape} ({'gpt-oss'}.expert_count, expert_feed_forward_length)")
    gate_up = torch.empty(n_exp, hidden, 2 * width)
    gate_up[..., 0::2], gate_up[..., 1::2] = t["ffn_gate_exps.weight"].transpose(1, 2), t["ffn_up_exps.weight"].transpose(1, 2)
    bias = torch.empty(n_exp, 2 * width)
    bias[:, 0::2], bias[:, 1::2] = t["ffn_gate_exps.bias"], t["ffn_up_exps.bias"]
    pre = f"model.layers.{bid}.mlp.experts."
    return {pre + "gate_up_proj": gate_up, pre + "gate_up_proj_bias": bias,
            pre + "down_proj": t["ffn_down_exps.weight"].transpose(1, 2).contiguous(),
            pre + "down_proj_bias": t["ffn_down_exps.bias"]}


def _kv_b(halves: dict[str, torch.Tensor], cfg: dict[str, Any], p: Path, bid: str) -> torch.Tensor:
    """DeepSeek's ``kv_b_proj`` ``[heads (nope + v), kv_lora]`` from llama.cpp's ``attn_k_b`` ``[heads, kv_lora,
    nope]`` (transposed per head) and ``attn_v_b`` ``[heads, v, kv_lora]``."""
    k_b, v_b = halves.get("attn_k_b"), halves.get("attn_v_b")
    heads, lora = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    if k_b is None or v_b is None or tuple(k_b.shape) != (heads, lora, nope) or tuple(v_b.shape) != (heads, v, lora):
        raise ModelError(f"{p}: blk.{bid}.attn_k_b / attn_v_b have shapes "
                         f"{None if k_b is None else tuple(k_b.shape)} / {None if v_b is None else tuple(v_b.shape)}, "
                         f"expected ({heads}, {lora}, {nope}) / ({heads}, {v}, {lora})")
    return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(heads * (nope + v), lora)
