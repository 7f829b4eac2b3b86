"""MLX-quantized checkpoints (``dualpath.model.mlx_quant``): two in ``tests/data/mlx``, quantized by MLX's own
``mx.quantize`` and written as mlx-lm writes them (``make_fixtures.py``): a Llama at 4 bits with its embedding table
and LM head quantized, and a Qwen2 at 3 bits with per-module overrides (8-bit and 6-bit modules, one left
unquantized). The reference logits are transformers' over the weights MLX's own ``mx.dequantize`` gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_random import check_fixture_logits
from safetensors.torch import load_file, save_file

from dualpath.errors import ModelError
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.mlx_quant import mlx_quant

MLX = Path(__file__).parents[1] / "data" / "mlx"
FIXTURES = ("llama_4bit", "qwen2_mixed")


def _load(d: Any, dtype: str = "float32") -> Any:
    return load_model(LlamaModelConfig(path=str(d), dtype=dtype, time_model="off"),  # type: ignore[arg-type]
                      with_tokenizer=False)[0]


@pytest.mark.parametrize("name", FIXTURES)
def test_mlx_checkpoint_gives_the_logits_of_mlxs_own_dequantization(name):
    check_fixture_logits(MLX / name)


def test_mlx_fixtures_hold_what_they_name():
    t = load_file(str(MLX / "qwen2_mixed" / "checkpoint" / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16  # (left unquantized)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (64, 128 * 8 // 32)  # (8-bit)
    assert t["model.layers.1.self_attn.o_proj.weight"].shape == (64, 64 * 6 // 32)  # (6-bit: straddles words)
    assert t["model.layers.0.mlp.up_proj.weight"].shape == (128, 64 * 3 // 32)  # (3-bit default)
    a = load_file(str(MLX / "llama_4bit" / "checkpoint" / "model.safetensors"))
    assert a["model.embed_tokens.weight"].dtype == torch.uint32 and "lm_head.scales" in a


def test_mlx_config_and_tensor_refusals(tmp_path):
    src = MLX / "llama_4bit" / "checkpoint"
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    cfg = json.loads((src / "config.json").read_text())
    q = cfg["quantization"]
    for change, match in (({"mode": "mxfp4"}, "quantization.mode 'mxfp4' is not read"),
                          ({"bits": 7}, r"quantization.bits must be one of 2, 3, 4, 5, 6, 8, got 7"),
                          ({"model.layers.0.mlp.up_proj": 3}, r"quantization.model.layers.0.mlp.up_proj must be")):
        (d / "config.json").write_text(json.dumps(dict(cfg, quantization={**q, **change},
                                                       quantization_config={**q, **change})))
        with pytest.raises(ModelError, match=match):
            _load(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization={**q, "group_size": 64},
                                                   quantization_config={**q, "group_size": 64})))
    with pytest.raises(ModelError, match=r"scales \(\d+, 2\) and biases .* do not fit 4-bit values in groups of 64"):
        _load(d)
    bare = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    (d / "config.json").write_text(json.dumps(bare))
    with pytest.raises(ModelError, match=r"\.biases' is an MLX quantization bias, but config.json has no quantization"):
        _load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.1.mlp.gate_proj.weight"] = t["model.layers.1.mlp.gate_proj.weight"].view(torch.int32).float()
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match=r"gate_proj' needs model.layers.1.mlp.gate_proj.weight as uint32 words"):
        _load(d)


def test_mlx_weights_load_into_a_bf16_model_rounded_once():
    d = MLX / "llama_4bit" / "checkpoint"
    fp32, bf16 = _load(d), _load(d, "bfloat16")
    p32, p16 = dict(fp32.named_parameters()), dict(bf16.named_parameters())
    name = next(n for n in p32 if n.endswith("up_proj.weight"))
    assert p16[name].dtype == torch.bfloat16 and torch.equal(p16[name], p32[name].to(torch.bfloat16))
    assert mlx_quant({"quantization": {"bits": 4, "group_size": 32, "lm_head": False}}, "c").of("lm_head") is None
