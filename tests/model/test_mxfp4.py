"""MXFP4 dequantization of gpt-oss experts against transformers: its packed-tensor converter and its own
``from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))`` load path, both run on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dualpath.errors import ModelError
from dualpath.model.mxfp4 import dequantize_mxfp4, gpt_oss_dense_experts, is_mxfp4

transformers = pytest.importorskip("transformers")
mx = pytest.importorskip("transformers.integrations.mxfp4")

E, H, INTER = 3, 64, 32
P = "model.layers.0.mlp.experts."
CONFIG: dict[str, Any] = {"hidden_size": H, "intermediate_size": INTER, "num_local_experts": E,
                          "num_experts_per_tok": 2, "num_hidden_layers": 1, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128}


def _pair(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[E, rows, cols/32, 16]`` blocks and ``[E, rows, cols/32]`` scales near the bias (finite values)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 135, (E, rows, cols // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


def _checkpoint() -> dict[str, torch.Tensor]:
    gb, gs = _pair(2 * INTER, H, seed=1)
    db, ds = _pair(H, INTER, seed=2)
    return {P + "gate_up_proj_blocks": gb, P + "gate_up_proj_scales": gs,
            P + "down_proj_blocks": db, P + "down_proj_scales": ds}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_rows", [1 << 16, 7])
def test_dequantize_matches_transformers_converter(dtype: torch.dtype, chunk_rows: int) -> None:
    for name, (rows, cols) in {"gate_up_proj": (2 * INTER, H), "down_proj": (H, INTER)}.items():
        blocks, scales = _pair(rows, cols, seed=len(name))
        ours = dequantize_mxfp4(blocks, scales, dtype, chunk_rows=chunk_rows)
        assert ours.shape == (E, rows, cols) and ours.dtype == dtype
        # transformers returns the values with the last two axes swapped (integrations/mxfp4.py:285)
        ref = mx.convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(ours.transpose(1, 2), ref), name
        assert torch.isfinite(ours).all()


def test_dequantize_known_values() -> None:
    # byte 0x21: low nibble 1 -> 0.5 first, high nibble 2 -> 1.0; 0xF8: -0.0 then -6.0; scale 128 -> x2
    blocks = torch.tensor([[0x21, 0xF8] + [0x00] * 14], dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert out.shape == (32,)
    assert out[:4].tolist() == [1.0, 2.0, -0.0, -12.0] and out[:4][2].signbit()
    assert not out[4:].any()
    out = dequantize_mxfp4(blocks, torch.tensor([125], dtype=torch.uint8), torch.float32)
    assert out[:4].tolist() == [0.125, 0.25, -0.0, -1.5]


def test_dense_experts_shapes_and_passthrough() -> None:
    ref_model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**CONFIG))
    dense_shapes = {n: p.shape for n, p in ref_model.named_parameters()}
    bias = torch.randn(E, 2 * INTER, dtype=torch.bfloat16)
    tensors = {"model.embed_tokens.weight": torch.zeros(1), **_checkpoint(), P + "gate_up_proj_bias": bias}
    out = gpt_oss_dense_experts(tensors, torch.bfloat16)
    assert list(out) == ["model.embed_tokens.weight", P + "gate_up_proj", P + "down_proj", P + "gate_up_proj_bias"]
    assert out["model.embed_tokens.weight"] is tensors["model.embed_tokens.weight"]
    assert out[P + "gate_up_proj_bias"] is bias
    for name in ("gate_up_proj", "down_proj"):
        assert out[P + name].shape == dense_shapes[P + name] and out[P + name].dtype == torch.bfloat16
    assert out[P + "gate_up_proj"].shape == (E, H, 2 * INTER) and out[P + "down_proj"].shape == (E, INTER, H)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory: Any) -> Path:
    """A gpt-oss checkpoint as OpenAI publishes it: transformers' own random model with the experts replaced by
    MXFP4 blocks/scales, and a ``quantization_config`` saying mxfp4."""
    from safetensors.torch import save_file

    cfg = transformers.GptOssConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg)
    sd = {n: t.detach().contiguous() for n, t in model.state_dict().items()
          if not n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    sd.update(_checkpoint())
    d = Path(tmp_path_factory.mktemp("gpt_oss_mxfp4"))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {**cfg.to_dict(), "architectures": ["GptOssForCausalLM"],
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_experts_match_transformers_dequantize_load(mxfp4_dir: Path, dtype: torch.dtype) -> None:
    """transformers' real load path: ``Mxfp4HfQuantizer`` with ``dequantize=True`` on CPU (no kernels needed)."""
    from safetensors.torch import load_file

    assert is_mxfp4(json.loads((mxfp4_dir / "config.json").read_text()))
    hf = transformers.GptOssForCausalLM.from_pretrained(
        mxfp4_dir, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=dtype, device_map="cpu")
    experts = hf.model.layers[0].mlp.experts
    assert type(experts).__name__ == "GptOssExperts"   # the dense module, not Mxfp4GptOssExperts
    ours = gpt_oss_dense_experts(load_file(str(mxfp4_dir / "model.safetensors")), dtype)
    for name in ("gate_up_proj", "down_proj"):
        theirs = getattr(experts, name).detach()
        assert ours[P + name].shape == theirs.shape and ours[P + name].dtype == theirs.dtype == dtype
        assert torch.equal(ours[P + name], theirs), name
    assert not any(k.endswith(("_blocks", "_scales")) for k in ours)


def _expect(tensors: dict[str, torch.Tensor], pattern: str) -> None:
    with pytest.raises(ModelError, match=re.escape(pattern)):
        gpt_oss_dense_experts(tensors, torch.bfloat16)


def test_missing_partner_names_the_tensor() -> None:
    t = _checkpoint()
    del t[P + "down_proj_scales"]
    _expect(t, P + "down_proj_blocks has no matching " + P + "down_proj_scales")
    t = _checkpoint()
    del t[P + "gate_up_proj_blocks"]
    _expect(t, P + "gate_up_proj_scales has no matching " + P + "gate_up_proj_blocks")


def test_bad_dtypes_name_the_tensor() -> None:
    t = _checkpoint()
    t[P + "gate_up_proj_blocks"] = t[P + "gate_up_proj_blocks"].to(torch.int16)
    _expect(t, P + "gate_up_proj_blocks: MXFP4 blocks must be uint8, got torch.int16")
    t = _checkpoint()
    t[P + "down_proj_scales"] = t[P + "down_proj_scales"].float()
    _expect(t, P + "down_proj_scales: MXFP4 scales must be uint8")


def test_bad_shapes_name_the_tensor() -> None:
    t = _checkpoint()
    t[P + "down_proj_scales"] = t[P + "down_proj_scales"][:, :-1]
    _expect(t, P + "down_proj_scales: shape (3, 63, 1) does not match")
    t = _checkpoint()
    t[P + "gate_up_proj_blocks"] = t[P + "gate_up_proj_blocks"].reshape(E, 2 * INTER, 1, 32)
    t[P + "gate_up_proj_scales"] = t[P + "gate_up_proj_scales"][..., :1]
    _expect(t, P + "gate_up_proj_blocks: MXFP4 blocks must be [..., G, 16], got (3, 64, 1, 32)")
    t = _checkpoint()
    t[P + "down_proj_blocks"] = t[P + "down_proj_blocks"][0]
    t[P + "down_proj_scales"] = t[P + "down_proj_scales"][0]
    _expect(t, P + "down_proj_blocks: expert blocks must be [E, rows, G, 16]")
    t = {**_checkpoint(), P + "down_proj": torch.zeros(E, INTER, H)}
    _expect(t, P + "down_proj: checkpoint holds both")
    with pytest.raises(ModelError, match="w_scales: shape"):
        dequantize_mxfp4(torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8),
                         torch.float32, name="w")


def test_is_mxfp4() -> None:
    assert is_mxfp4({"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}})
    assert is_mxfp4({"quantization_config": {"quant_method": "MXFP4"}})
    assert not is_mxfp4({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert not is_mxfp4({"model_type": "gpt_oss"})
    assert not is_mxfp4({"quantization_config": None})


def test_load_model_serves_the_mxfp4_checkpoint(mxfp4_dir: Path) -> None:
    """End to end: our loader dequantizes the published layout and our model's logits over paged KV equal those of
    transformers' dequantized model (fp32)."""
    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    ours = load_model(LlamaModelConfig(path=str(mxfp4_dir), attention_backend="torch"), with_tokenizer=False)[0]
    hf = transformers.GptOssForCausalLM.from_pretrained(
        mxfp4_dir, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        device_map="cpu").eval()
    seq = torch.randint(0, 128, (13,), generator=torch.Generator().manual_seed(4)).tolist()
    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    table = pool.allocate(4)
    got = torch.cat([ours(SeqBatch.build([seq[:9]], [0], [table], 4), pool.layers, all_positions=True),
                     ours(SeqBatch.build([seq[9:]], [9], [table], 4), pool.layers, all_positions=True)])
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].float()
    assert torch.isfinite(ref).all() and float(ref.abs().max()) > 0.1
    torch.testing.assert_close(got, ref, atol=2e-4 * float(ref.abs().max()), rtol=1e-4)
