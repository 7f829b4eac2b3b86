"""Writes the MLX fixtures of ``tests/model/test_mlx_quant_hf.py``: small random transformers models whose linear
layers and embedding table are quantized by MLX's own ``mx.quantize`` (affine mode) and written as mlx-lm writes a
quantized checkpoint (uint32 ``weight`` words, ``scales`` and ``biases`` in fp16, ``quantization`` in
``config.json``), with the logits transformers computes over the weights MLX's own ``mx.dequantize`` gives back.
Neither side is this project's code.

Not run by the suite (MLX is not a dependency). To regenerate (MLX's Linux CPU wheels):

    python -m venv --system-site-packages /tmp/mlx && /tmp/mlx/bin/pip install --no-deps mlx==0.32.4 mlx-cpu==0.32.4
    /tmp/mlx/bin/python tests/data/mlx/make_fixtures.py

Each fixture folder holds ``checkpoint/`` (``config.json`` and ``model.safetensors``) and ``reference.safetensors``
(``ids`` [2, T] and ``logits`` [2, T, vocab] in fp32)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).parent


def _random(family: str, seed: int) -> Any:
    torch.manual_seed(seed)
    kw = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
          "eos_token_id": 2, "tie_word_embeddings": family == "qwen2"}
    cfg = transformers.Qwen2Config(**kw) if family == "qwen2" else transformers.LlamaConfig(**kw)
    model = (transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
            p.copy_(p.half().float())  # (unquantized tensors are stored in fp16)
    return model


def _write(name: str, family: str, seed: int, quantization: dict[str, Any]) -> None:
    model = _random(family, seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # (the embedding table's own tensor: quantized once, under its own name)
            m = key[: -len(".weight")]
            of = quantization.get(m, {"bits": quantization["bits"], "group_size": quantization["group_size"]})
            if not key.endswith(".weight") or of is False or not isinstance(
                    modules.get(m), (torch.nn.Linear, torch.nn.Embedding)):
                tensors[key] = t.half()
                continue
            bits, group = of["bits"], of["group_size"]
            q, s, b = mx.quantize(mx.array(t.float().numpy()), group_size=group, bits=bits)
            s, b = s.astype(mx.float16), b.astype(mx.float16)
            tensors[key] = torch.from_numpy(np.array(q).view(np.int32)).view(torch.uint32)
            tensors[m + ".scales"] = torch.from_numpy(np.array(s.astype(mx.float32))).half()
            tensors[m + ".biases"] = torch.from_numpy(np.array(b.astype(mx.float32))).half()
            dense = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)
            modules[m].weight.copy_(torch.from_numpy(np.array(dense)))
    d = HERE / name / "checkpoint"
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.update(quantization=quantization, quantization_config=quantization, torch_dtype="float16")
    (d / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "mlx"})
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(ids).logits.float()
    save_file({"ids": ids, "logits": logits.contiguous()}, str(d.parent / "reference.safetensors"))
    print(name, {p.name: p.stat().st_size for p in d.iterdir()})


def main() -> None:
    # A: Llama, 4-bit in groups of 32, the embedding table and the LM head quantized too
    _write("llama_4bit", "llama", 0, {"group_size": 32, "bits": 4})
    # B: Qwen2 (q/k/v biases, tied embeddings), 3-bit in groups of 32 by default; per-module overrides: the down
    # projections 8-bit in groups of 64, layer 1's attention output 6-bit, layer 0's query left unquantized
    _write("qwen2_mixed", "qwen2", 1, {
        "group_size": 32, "bits": 3,
        "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8},
        "model.layers.1.mlp.down_proj": {"group_size": 64, "bits": 8},
        "model.layers.1.self_attn.o_proj": {"group_size": 32, "bits": 6},
        "model.layers.0.self_attn.q_proj": False})


if __name__ == "__main__":
    main()
