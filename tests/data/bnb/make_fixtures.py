"""Writes the bitsandbytes fixtures of ``tests/model/test_bnb_quant_hf.py``: small random transformers models
quantized by bitsandbytes (0.50, its CPU backend) through transformers' ``BitsAndBytesConfig`` and written by
transformers' ``save_pretrained``, with the logits transformers computes over the weights bitsandbytes' own
``dequantize_4bit`` / ``int8_vectorwise_dequant`` give for the quantized modules (not the quantized model's own run:
on CPU its 4-bit kernel differs from that dequantization by up to 2e-2 on these logits, and LLM.int8 also quantizes
its inputs, which is not reproduced). Neither side is this project's code.

Not run by the suite (bitsandbytes is not a dependency). To regenerate:

    python -m venv --system-site-packages /tmp/bnb && /tmp/bnb/bin/pip install --no-deps bitsandbytes==0.50.2
    /tmp/bnb/bin/python tests/data/bnb/make_fixtures.py

Each fixture folder holds ``checkpoint/`` (``config.json`` and ``model.safetensors``) and ``reference.safetensors``
(``ids`` [2, T] and ``logits`` [2, T, vocab] in fp32)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import bitsandbytes.functional as bnbf
import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent


def _random(family: str, seed: int) -> Any:
    torch.manual_seed(seed)
    kw = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False}
    cfg = transformers.Qwen2Config(**kw) if family == "qwen2" else transformers.LlamaConfig(**kw)
    model = (transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
            p.copy_(p.half().float())  # (the unquantized tensors are stored in fp16: the model holds their values)
    return model


def _write(name: str, family: str, seed: int, bnb: Any) -> None:
    model = _random(family, seed)
    src = Path(tempfile.mkdtemp())
    model.save_pretrained(src)
    q = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, device_map="cpu",
                                                          dtype=torch.float32).eval()
    d = HERE / name / "checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    q.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)
    stored = load_file(str(d / "model.safetensors"))
    stats = ("absmax", "quant_map", ".SCB")  # (bitsandbytes' own statistics stay as it wrote them)
    save_file({k: v.half() if v.dtype == torch.float32 and not k.endswith(stats) else v for k, v in stored.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # (the weights bitsandbytes dequantizes, run unquantized)
        t = load_file(str(d / "model.safetensors"))
        qmods = dict(q.named_modules())
        for m, mod in model.named_modules():
            if m + ".SCB" in t:
                mod.weight.copy_(bnbf.int8_vectorwise_dequant(t[m + ".weight"], t[m + ".SCB"]))
            elif any(k.startswith(m + ".weight.quant_state.") for k in t):
                p = qmods[m].weight
                mod.weight.copy_(bnbf.dequantize_4bit(p.data, p.quant_state).float())
        logits = model(ids).logits.float()
    save_file({"ids": ids, "logits": logits.contiguous()}, str(d.parent / "reference.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    print(name, cfg["quantization_config"], {p.name: p.stat().st_size for p in d.iterdir()})


def main() -> None:
    _write("llama_nf4_double_quant", "llama", 0, transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head", "down_proj"]))
    _write("qwen2_fp4", "qwen2", 1, transformers.BitsAndBytesConfig(  # (q/k/v biases beside 4-bit weights)
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32))
    _write("llama_int8", "llama", 2, transformers.BitsAndBytesConfig(load_in_8bit=True))


if __name__ == "__main__":
    main()
