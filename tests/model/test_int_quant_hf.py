"""GPTQ and AWQ checkpoints, and the packed bit streams under them (``dualpath.model.int_quant``).

GPTQ: three checkpoints in ``tests/data/gptq`` packed by AutoGPTQ's own ``QuantLinear.pack``, with the logits
transformers computes over the weights AutoGPTQ's own forward dequantizes (``make_fixtures.py`` wrote them): 4-bit
act-order groups with zero points in the original format (``lm_head`` quantized too, biases), GPTQModel's v2 format
with per-module widths (2, 3 and 8 bits, per channel and in groups) and zero biases beside bias-less layers, and
GPT-2's ``Conv1D`` layers. AWQ: AutoAWQ's GEMM layout written here from a random transformers model; the reference
is compressed-tensors' own AutoAWQ converter (vLLM's) and transformers' run of the converted checkpoint, which is
also read here (asymmetric ``pack-quantized``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_random import check_batched_against_hf, check_fixture_logits, prefill_all, two_sequences

from dualpath.errors import ModelError
from dualpath.model.config import LlamaModelConfig
from dualpath.model.int_quant import dequantized, int_quant, unpack_bits
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

GPTQ = Path(__file__).parents[1] / "data" / "gptq"
FIXTURES = ("llama_4bit_actorder", "llama_mixed_v2", "gpt2_4bit")


def _load(d: Any) -> Any:
    return load_model(LlamaModelConfig(path=str(d), time_model="off"), with_tokenizer=False)[0]


# --- the bit streams -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_bits_reads_compressed_tensors_packing(bits):
    """Every width from 1 to 8 (3, 5, 6 and 7 straddle words) reads back what compressed-tensors packed."""
    g = torch.Generator().manual_seed(bits)
    half = 1 << (bits - 1)
    values = torch.randint(-half, half, (5, 77), generator=g, dtype=torch.int8)
    packed = pack_to_int32(values, bits)
    assert torch.equal(unpack_bits(packed, bits, 77) - half, values.to(torch.int32))
    assert torch.equal(unpack_from_int32(packed, bits, values.shape).to(torch.int32), values.to(torch.int32))
    with pytest.raises(ModelError, match="cannot hold"):
        unpack_bits(packed, bits, packed.shape[1] * 32 // bits + 1)


# --- GPTQ ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_gptq_checkpoint_gives_the_logits_of_autogptqs_own_dequantization(name):
    check_fixture_logits(GPTQ / name)


def test_gptq_layouts_are_read_as_stored(tmp_path):
    """The v1 zero offset, the act-order ``g_idx`` and the ``Conv1D`` orientation each change the logits: reading
    the checkpoints without them does not give the reference (the fixtures exercise each)."""
    src = GPTQ / "llama_4bit_actorder"
    cfg = json.loads((src / "checkpoint" / "config.json").read_text())
    assert cfg["quantization_config"]["desc_act"] and cfg["quantization_config"]["checkpoint_format"] == "gptq"
    d = tmp_path / "v2"
    shutil.copytree(src / "checkpoint", d)
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(
        cfg["quantization_config"], checkpoint_format="gptq_v2"))))
    ref = load_file(str(src / "reference.safetensors"))
    assert not torch.allclose(prefill_all(_load(d), ref["ids"]), ref["logits"], atol=1e-2)
    t = load_file(str(src / "checkpoint" / "model.safetensors"))
    g_idx = t["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 32)  # (act order)
    save_file({k: v for k, v in t.items() if not k.endswith(".g_idx")}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    assert not torch.allclose(prefill_all(_load(d), ref["ids"]), ref["logits"], atol=1e-2)


def test_gptq_refusals_name_the_key_or_tensor(tmp_path):
    src = GPTQ / "llama_4bit_actorder" / "checkpoint"
    cfg = json.loads((src / "config.json").read_text())
    q = cfg["quantization_config"]
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    for change, match in (({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
                          ({"bits": 5}, r"quantization_config.bits must be one of 2, 3, 4, 8, got 5"),
                          ({"group_size": 0}, "group_size must be positive or -1")):
        (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(q, **change))))
        with pytest.raises(ModelError, match=match):
            _load(d)
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "quantization_config"}))
    with pytest.raises(ModelError, match=r"'[\w.]+\.qweight' is a GPTQ / AWQ packed weight"):
        _load(d)
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "model.safetensors"))
    for name, bad, match in (
            ("model.layers.1.mlp.up_proj.g_idx", lambda x: x + 5, "up_proj: g_idx .* does not fit 64 inputs in 2"),
            ("model.layers.1.mlp.up_proj.qzeros", lambda x: x[:, :3], r"up_proj'.*qzeros \(2, 3\) does not fit"),
            ("model.layers.0.self_attn.o_proj.scales", None, r"o_proj.qweight needs .*o_proj.scales")):
        broken = dict(t)
        if bad is None:
            del broken[name]
        else:
            broken[name] = bad(t[name]).contiguous()
        save_file(broken, str(d / "model.safetensors"))
        with pytest.raises(ModelError, match=match):
            _load(d)


def test_gptq_config_without_quantized_tensors_reads_plain_weights():
    """``int_quant`` parses each method's fields; a checkpoint with no packed tensor is returned as it is."""
    q = int_quant({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1,
                                            "checkpoint_format": "gptq_v2"}}, "c")
    assert q is not None and (q.method, q.bits, q.group_size, q.v1_zeros) == ("gptq", (8,), -1, False)
    plain = {"model.embed_tokens.weight": torch.ones(2, 2)}
    assert dequantized(plain, q) is plain
    awq = int_quant({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                                             "zero_point": False, "version": "GEMM"}}, "c")
    assert awq is not None and (awq.method, awq.group_size, awq.zero_point) == ("awq", 64, False)


# --- AWQ -------------------------------------------------------------------------------------------------------

#: AutoAWQ's order within a word: value k holds output column _ORDER[k]
_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_pack(ints: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` values 0..15 -> AutoAWQ's int32 words ``[rows, cols / 8]``."""
    r, c = ints.shape
    g = ints.reshape(r, c // 8, 8)[:, :, list(_ORDER)].to(torch.int64)
    word = sum(g[:, :, k] << (4 * k) for k in range(8))
    return (word - ((word >> 31) << 32)).to(torch.int32)  # (as signed int32)


def _awq_quantize(w: torch.Tensor, group: int, zero_point: bool) -> tuple[torch.Tensor, ...]:
    """``w`` ``[out, in]`` -> qweight, qzeros, scales in AutoAWQ's GEMM layout; power-of-two scales, so that any
    reader's fp16 dequantization is exact."""
    wt = w.t()
    n_in, n_out = wt.shape
    g = wt.reshape(n_in // group, group, n_out)
    if zero_point:
        lo, hi = g.amin(1).clamp(max=0), g.amax(1).clamp(min=0)
        s = torch.exp2(torch.round(torch.log2(((hi - lo) / 15).clamp(min=1e-5))))
        z = torch.round(-lo / s).clamp(0, 15)
    else:
        s = torch.exp2(torch.round(torch.log2((g.abs().amax(1) / 7).clamp(min=1e-5))))
        z = torch.full_like(s, 8)
    q = torch.clamp(torch.round(g / s[:, None]) + z[:, None], 0, 15).reshape(n_in, n_out).to(torch.int32)
    return _awq_pack(q), _awq_pack(z.to(torch.int32)), s.half()


def _awq_checkpoint(d: Path, zero_point: bool, group: int = 32) -> None:
    from test_compressed_tensors_hf import _random_llama

    _, model = _random_llama()
    model.save_pretrained(d)
    tensors = load_file(str(d / "model.safetensors"))
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and n != "lm_head":
            qweight, qzeros, scales = _awq_quantize(mod.weight.data.float(), group, zero_point)
            del tensors[n + ".weight"]
            tensors[n + ".qweight"], tensors[n + ".scales"] = qweight, scales
            if zero_point:
                tensors[n + ".qzeros"] = qzeros
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": zero_point,
                                "version": "gemm", "modules_to_not_convert": None}
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("zero_point", [True, False], ids=["zero_point", "symmetric"])
def test_awq_checkpoint_equals_compressed_tensors_conversion(tmp_path, zero_point):
    """Ours on the AWQ checkpoint, and on compressed-tensors' conversion of it (``pack-quantized``, with zero
    points when AWQ has them), both equal transformers' run of the converted checkpoint."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    awq, ct = tmp_path / "awq", tmp_path / "ct"
    _awq_checkpoint(awq, zero_point)
    qcfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    convert_checkpoint(str(awq), str(ct), AutoAWQConverter.from_autoawq_config(qcfg), max_workers=1, device="cpu")
    converted = load_file(str(ct / "model.safetensors"))
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in converted) == zero_point
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(ct), quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval().float()
    for d in (awq, ct):
        check_batched_against_hf(_load(d), ref, two_sequences(97))


def test_awq_refusals_name_the_key(tmp_path):
    d = tmp_path / "awq"
    _awq_checkpoint(d, True)
    cfg = json.loads((d / "config.json").read_text())
    q = cfg["quantization_config"]
    for change, match in (({"version": "gemv"}, "version 'gemv' is not supported for AWQ"),
                          ({"backend": "llm-awq"}, "backend 'llm-awq'"),
                          ({"bits": 8}, "quantization_config.bits must be one of 4")):
        (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(q, **change))))
        with pytest.raises(ModelError, match=match):
            _load(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(q, group_size=48))))
    with pytest.raises(ModelError, match=r"_proj: \d group\(s\) of scales do not fit \d+ inputs in groups of 48"):
        _load(d)


# --- compressed-tensors' activation-order groups -----------------------------------------------------------------


def test_packed_weight_groups_follow_g_idx():
    """A ``weight_g_idx`` (older llm-compressor act-order checkpoints) picks each input's scale and zero point."""
    g = torch.Generator().manual_seed(0)
    rows, cols, groups, bits = 16, 64, 4, 4
    values = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    zp = torch.randint(-8, 8, (rows, groups), generator=g, dtype=torch.int8)
    scale = torch.rand(rows, groups, generator=g) + 0.5
    g_idx = (torch.randperm(cols, generator=g) // (cols // groups)).to(torch.int32)
    base = "model.layers.0.mlp.up_proj.weight"
    tensors = {base + "_packed": pack_to_int32(values, bits), base + "_scale": scale,
               base + "_shape": torch.tensor([rows, cols]), base + "_zero_point": pack_to_int32(zp, bits, packed_dim=0),
               base + "_g_idx": g_idx}
    q = int_quant({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "g": {"format": "pack-quantized", "weights": {"num_bits": bits}}}}}, "c")
    got = dequantized(tensors, q)[base]
    gi = g_idx.long()
    want = (unpack_from_int32(tensors[base + "_packed"], bits, values.shape).float()
            - unpack_from_int32(tensors[base + "_zero_point"], bits, zp.shape, packed_dim=0).float()[:, gi]) \
        * scale[:, gi]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    contiguous = dict(tensors)
    del contiguous[base + "_g_idx"]
    assert not torch.equal(dequantized(contiguous, q)[base], got)


def test_packed_weights_load_into_a_bf16_model_as_their_fp32_dequantization_rounded():
    """In a bf16 model each dequantized weight is its fp32 dequantization rounded once (kept in the model's dtype
    as it is made, so the host never holds the whole checkpoint in fp32)."""
    from dualpath.model.bnb_quant import bnb_dequantized

    d = GPTQ / "llama_4bit_actorder" / "checkpoint"
    fp32 = _load(d)
    bf16 = load_model(LlamaModelConfig(path=str(d), dtype="bfloat16", time_model="off"), with_tokenizer=False)[0]
    p32, p16 = dict(fp32.named_parameters()), dict(bf16.named_parameters())
    name = next(n for n in p32 if n.endswith("down_proj.weight"))
    assert p16[name].dtype == torch.bfloat16 and torch.equal(p16[name], p32[name].to(torch.bfloat16))
    t = load_file(str(d / "model.safetensors"))
    q = int_quant(json.loads((d / "config.json").read_text()), "c")
    assert dequantized(t, q, dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16
    bnb = load_file(str(Path(__file__).parents[1] / "data" / "bnb" / "llama_int8" / "checkpoint" / "model.safetensors"))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(bnb_dequantized(bnb, dtype=torch.bfloat16)[w], bnb_dequantized(bnb)[w].to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.anyio
async def test_awq_checkpoint_through_the_cluster_read_paths(tmp_path):
    """An AWQ checkpoint served through the emulated cluster: a two-turn session gives transformers' greedy tokens
    (on compressed-tensors' conversion of it) on every read path (PE, DE, split, recompute)."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter
    from hf_random import cluster_two_turns

    awq, ct = tmp_path / "awq", tmp_path / "ct"
    _awq_checkpoint(awq, True)
    qcfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    convert_checkpoint(str(awq), str(ct), AutoAWQConverter.from_autoawq_config(qcfg), max_workers=1, device="cpu")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(ct), quantization_config=transformers.CompressedTensorsConfig(run_compressed=False)).eval().float()
    await cluster_two_turns(awq, ref, 97)
