"""compressed-tensors' FP8 and INT8 checkpoints (the ``float-quantized``, ``int-quantized`` and ``naive-quantized``
formats vLLM serves: W8A16, W8A8-FP8, W8A8-INT8), written by the compressed-tensors library itself from a random
transformers model. Weights only, for each weight strategy (per tensor, per channel, per group, per block, with
KV-cache scales beside them): the reference is the library's own decompression of the checkpoint into transformers'
model. With their inputs quantized too (W8A8: per token or static per tensor): the reference is transformers' own
run of the checkpoint. FBGEMM's per-row and NVIDIA ModelOpt's per-tensor FP8 checkpoints are written here in their
layouts."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import check_batched_against_hf, two_sequences

from dualpath.errors import ModelError
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

VOCAB = 97
FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
ASYM = {"type": "int", "symmetric": False, "dynamic": False}
#: weights only (W8A16, W4A16, ...): name -> (format, weight args, KV-cache scales beside them)
KINDS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "fp8_channel": ("float-quantized", dict(FP8, strategy="channel"), False),
    "fp8_tensor_kv": ("float-quantized", dict(FP8, strategy="tensor"), True),
    "fp8_block": ("float-quantized", dict(FP8, strategy="block", block_structure=[16, 32]), False),
    "int8_channel": ("int-quantized", dict(INT8, strategy="channel"), False),
    "int8_group": ("naive-quantized", dict(INT8, strategy="group", group_size=16), False),
    "int8_channel_asym": ("int-quantized", dict(ASYM, num_bits=8, strategy="channel"), False),
    "int8_group_asym": ("naive-quantized", dict(ASYM, num_bits=8, strategy="group", group_size=16), False),
    # packed (llm-compressor's W4A16 and W4A16_ASYM and other widths)
    "int4_group": ("pack-quantized", dict(INT8, num_bits=4, strategy="group", group_size=16), False),
    "int4_group_asym": ("pack-quantized", dict(ASYM, num_bits=4, strategy="group", group_size=32), False),
    "int4_channel_asym": ("pack-quantized", dict(ASYM, num_bits=4, strategy="channel"), False),
    "int3_group_asym": ("pack-quantized", dict(ASYM, num_bits=3, strategy="group", group_size=32), False),
    "int2_group": ("pack-quantized", dict(INT8, num_bits=2, strategy="group", group_size=16), False),
    "int8_packed_channel": ("pack-quantized", dict(INT8, strategy="channel"), False),
    # 4-, 6- and 8-bit floats (llm-compressor's NVFP4A16 / MXFP4A16 / MXFP6A16 / MXFP8A16 presets)
    "nvfp4": ("nvfp4-pack-quantized", {"preset": "NVFP4A16"}, False),
    "mxfp4": ("mxfp4-pack-quantized", {"preset": "MXFP4A16"}, False),
    "mxfp6": ("mxfp6-pack-quantized", {"preset": "MXFP6A16"}, False),
    "mxfp8": ("mxfp8-quantized", {"preset": "MXFP8A16"}, False),
}


def _extrema(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min / max a calibration would observe for each scale of ``w`` under ``args``' strategy."""
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "tensor":
        return w.amin(), w.amax()
    if args.strategy in ("group", "tensor_group"):
        g = w.unflatten(1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    b0, b1 = args.block_structure
    g = w.reshape(w.shape[0] // b0, b0, w.shape[1] // b1, b1)
    return g.amin((1, 3)), g.amax((1, 3))


def _calibrate(model: Any, args: QuantizationArgs) -> None:
    """Each quantized module's weight scales (and NVFP4's global scale) from its weight's extrema, as a calibration
    would set them."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                lo, hi = _extrema(module.weight.float(), args)
                gscale = None
                if hasattr(module, "weight_global_scale"):  # (NVFP4: one global scale per tensor)
                    from compressed_tensors.quantization.utils import generate_gparam

                    gscale = generate_gparam(module.weight.float().amin(), module.weight.float().amax())
                    # a power of two, so that the library's bf16 decompression is exact and comparable
                    gscale = torch.exp2(torch.round(torch.log2(gscale)))
                    module.weight_global_scale.copy_(gscale.reshape(module.weight_global_scale.shape))
                scale, _ = calculate_qparams(lo, hi, args, global_scale=gscale)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))


def _random_llama() -> tuple[Any, Any]:
    """A small Llama's config and transformers' model on seeded random weights (all but the norms scaled up)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    return cfg, model


def _checkpoint(d: Any, kind: str) -> Any:
    """A random Llama quantized and written by compressed-tensors; returns transformers' model holding the weights
    the library decompresses from it."""
    fmt, wargs, kv = KINDS[kind]
    cfg, model = _random_llama()
    if "preset" in wargs:
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(wargs["preset"], ["Linear"])
        assert scheme.weights is not None and scheme.input_activations is None
        args = scheme.weights
    else:
        args = QuantizationArgs(**wargs)
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt,
                            kv_cache_scheme=QuantizationArgs(**dict(FP8, strategy="tensor")) if kv else None)
    apply_quantization_config(model, qc)
    _calibrate(model, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(d)
    compressor.update_config(str(d))
    if kv:  # (the library writes the KV-cache scales from its calibration hooks; hub checkpoints carry them so)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / "model.safetensors"))
        for i in range(cfg.num_hidden_layers):
            for key in ("k_scale", "v_scale"):
                tensors[f"model.layers.{i}.self_attn.{key}"] = torch.tensor(0.37)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    compressor.decompress_model(model)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref.state_dict()}, strict=True)
    return ref


@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_weights_equal_the_librarys_own_decompression(tmp_path, kind):
    ref = _checkpoint(tmp_path, kind)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    fmt, wargs = KINDS[kind][:2]
    w = "model.layers.0.mlp.up_proj.weight" + ("_packed" if fmt.endswith("pack-quantized") else "")
    want = {"float-quantized": "F8_E4M3", "pack-quantized": "I32", "mxfp8-quantized": "F8_E4M3"}
    assert stored[w] == want.get(fmt, "U8" if fmt.endswith("fp4-pack-quantized") or fmt.startswith("mxfp6") else "I8")
    assert "model.layers.0.mlp.up_proj.weight_scale" in stored
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in stored) == (not wargs.get("symmetric", True))
    if KINDS[kind][2]:
        assert "model.layers.0.self_attn.k_scale" in stored
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, ref, two_sequences(VOCAB))


def test_unsupported_formats_and_misfit_zero_points_are_refused(tmp_path):
    """A compressed-tensors format not read here (2:4 sparse Marlin) is refused by name before any weight is
    read; a zero point that fits no scale of its weight names the tensor."""
    _checkpoint(tmp_path, "int8_channel")
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = dict(cfg, quantization_config=dict(cfg["quantization_config"], format="marlin-24"))
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="format 'marlin-24'"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    groups = cfg["quantization_config"]["config_groups"]  # (4-bit inputs in groups: not read here)
    nvfp4_inputs = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "dynamic": "local"}
    bad = dict(cfg, quantization_config=dict(cfg["quantization_config"], config_groups={
        "group_0": dict(groups["group_0"], input_activations=nvfp4_inputs)}))
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"config_groups\.group_0\.input_activations"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight_zero_point"
    tensors[name] = torch.ones(64, 3, dtype=torch.int8)  # (one scale per row)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match=r"o_proj.weight_zero_point \(64, 3\) does not fit"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)


def _fp8_checkpoint(d: Any, per_row: bool, quant: dict[str, Any], extra: dict[str, torch.Tensor]) -> Any:
    """A random Llama whose linear weights are stored in e4m3 with their scales as FBGEMM (one per row, ``[out,
    1]``) or NVIDIA ModelOpt (one per tensor) export them; transformers' model over the same dequantized weights is
    the reference."""
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(1)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
            if name.endswith("_proj.weight"):
                amax = p.abs().amax(dim=1, keepdim=True) if per_row else p.abs().amax().reshape(())
                scale = (amax / torch.finfo(torch.float8_e4m3fn).max).float()
                q = (p / scale).to(torch.float8_e4m3fn)
                p.copy_(q.float() * scale)  # (the reference holds exactly what the checkpoint stores)
                tensors[name], tensors[name + "_scale"] = q, scale
            else:
                tensors[name] = p.detach().clone()
    save_file({**tensors, **extra}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(dict(cfg.to_dict(), architectures=["LlamaForCausalLM"],
                                                   quantization_config=quant)))
    return ref


@pytest.mark.parametrize("layout", ["fbgemm_fp8", "modelopt", "autofp8"])
def test_fbgemm_and_modelopt_fp8_weights(tmp_path, layout):
    """FBGEMM's per-row FP8 (Meta's Llama 3.1 405B FP8; ``quant_method: fbgemm_fp8``), ModelOpt's per-tensor FP8
    with its activation and KV-cache scales (``quant_method: modelopt``) and AutoFP8's per-tensor FP8 with static
    input scales (``quant_method: fp8`` without ``weight_block_size``: Neural Magic's ``-FP8`` releases) read as the
    weights they store."""
    if layout == "fbgemm_fp8":
        ref = _fp8_checkpoint(tmp_path, True, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, {})
    elif layout == "autofp8":
        extra = {f"model.layers.{i}.mlp.up_proj.input_scale": torch.tensor(0.25) for i in range(2)}
        ref = _fp8_checkpoint(tmp_path, False, {"quant_method": "fp8", "activation_scheme": "static"}, extra)
    else:
        extra = {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale": torch.tensor(0.5) for i in range(2) for p in "kv"}
        extra.update({f"model.layers.{i}.mlp.up_proj.input_scale": torch.tensor(0.25) for i in range(2)})
        ref = _fp8_checkpoint(tmp_path, False, {"quant_method": "modelopt", "quant_algo": "FP8",
                                                "kv_cache_quant_algo": "FP8"}, extra)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, ref, two_sequences(VOCAB))
    cfg = json.loads((tmp_path / "config.json").read_text())
    if layout == "modelopt":  # (ModelOpt's INT4 AWQ formats are not read: refused by name)
        cfg["quantization_config"]["quant_algo"] = "W4A8_AWQ"
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match="quant_algo 'W4A8_AWQ'"):
            load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)


def test_modelopt_nvfp4_reads_as_compressed_tensors_converts_it(tmp_path):
    """NVIDIA ModelOpt's NVFP4 layout (FP4 bytes as ``weight``, ``weight_scale``, ``weight_scale_2`` = 1 / the global
    scale, input and KV-cache scales beside them), made from a compressed-tensors NVFP4 checkpoint the library wrote:
    compressed-tensors' own ModelOpt converter accepts it and gives back that checkpoint's tensors, and ours reads it
    as the library decompresses the original."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
    from safetensors.torch import load_file, save_file

    ct_dir, mo_dir, back = tmp_path / "ct", tmp_path / "modelopt", tmp_path / "back"
    ct_dir.mkdir()
    ref = _checkpoint(ct_dir, "nvfp4")
    ct = load_file(str(ct_dir / "model.safetensors"))
    mo: dict[str, torch.Tensor] = {}
    for name, t in ct.items():
        if name.endswith(".weight_packed"):
            mo[name[: -len("_packed")]] = t
        elif name.endswith(".weight_global_scale"):
            mo[name[: -len("global_scale")] + "scale_2"] = 1 / t
            mo[name[: -len("weight_global_scale")] + "input_scale"] = torch.tensor([0.5])
        else:
            mo[name] = t
    for i in range(2):
        for p in "kv":
            mo[f"model.layers.{i}.self_attn.{p}_proj.{p}_scale"] = torch.tensor(0.25)
    mo_dir.mkdir()
    save_file(mo, str(mo_dir / "model.safetensors"))
    cfg = json.loads((ct_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                  "exclude_modules": ["lm_head"]}
    (mo_dir / "config.json").write_text(json.dumps(cfg))
    kv = QuantizationArgs(**dict(FP8, strategy="tensor"))
    convert_checkpoint(str(mo_dir), str(back), ModelOptNvfp4Converter(ignore=["lm_head"], kv_cache_scheme=kv),
                       max_workers=1, device="cpu")
    round_trip = load_file(str(back / "model.safetensors"))
    for name, t in ct.items():
        assert torch.equal(round_trip[name], t), name
    ours = load_model(LlamaModelConfig(path=str(mo_dir), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, ref, two_sequences(VOCAB))


#: W8A8 checkpoints: name -> (format, weight args, input activation args)
W8A8: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "fp8_dynamic": ("float-quantized", dict(FP8, strategy="channel"), dict(FP8, strategy="token", dynamic=True)),
    "int8_dynamic": ("int-quantized", dict(INT8, strategy="channel"), dict(INT8, strategy="token", dynamic=True)),
    "fp8_static": ("float-quantized", dict(FP8, strategy="tensor"), dict(FP8, strategy="tensor")),
}


def _w8a8_checkpoint(d: Any, kind: str) -> None:
    """A random Llama quantized by compressed-tensors with its inputs quantized too (static scales: calibrated on a
    forward of the unquantized model), written by the library."""
    fmt, wargs, iargs = W8A8[kind]
    _, model = _random_llama()
    amax: dict[str, float] = {}  # (each layer's input range over a calibration forward)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(n, float(a[0].abs().amax())))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.arange(3, 40)[None])
    for h in hooks:
        h.remove()
    args = QuantizationArgs(**wargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=QuantizationArgs(**iargs))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        format=fmt))
    _calibrate(model, args)
    with torch.no_grad():
        for n, module in model.named_modules():
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(amax[n] / 448.0)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(d)
    compressor.update_config(str(d))


def _prefill(model: Any, seq: list[int]) -> torch.Tensor:
    """Our logits at every position of ``seq``, prefilled in one piece (as transformers computes it)."""
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    return model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)


@pytest.mark.parametrize("kind", list(W8A8))
def test_w8a8_inputs_are_quantized_as_transformers_runs_them(tmp_path, kind):
    """A W8A8 checkpoint's layers quantize their inputs (FP8 or INT8; per token from each input, or per tensor from
    the stored input_scale) before their weights multiply them: a prefill's logits equal transformers' own run of
    the checkpoint (compressed-tensors decompressing it) on most positions to float rounding, where the weights
    alone are off by percents everywhere. Where a float-rounding difference (a different summation order) crosses a
    rounding boundary of an 8-bit input, that value moves by a step: so the largest difference is bounded by 1% of
    the logit range, and chunked and batched over paged KV by 3%."""
    from hf_random import hf_logits

    _w8a8_checkpoint(tmp_path, kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    seqs = two_sequences(VOCAB)
    refs = [hf_logits(hf, s) for s in seqs]
    for seq, ref in zip(seqs, refs, strict=True):
        diff = (_prefill(ours, seq) - ref).abs().max(dim=1).values
        assert float(diff.median()) < 1e-5 and float(diff.max()) < 0.01 * float(ref.abs().max())
    check_batched_against_hf(ours, hf, seqs, atol=0.03 * float(refs[0].abs().max()), rtol=0.0)
    cfg = json.loads((tmp_path / "config.json").read_text())  # (the same weights, inputs left as they are)
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plain = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert float((_prefill(plain, seqs[0]) - refs[0]).abs().max(dim=1).values.median()) > 1e-3


def test_mixed_precision_groups_each_read_in_their_format(tmp_path):
    """A ``mixed-precision`` checkpoint (llm-compressor's per-group formats: FP8 attention, packed INT4 MLPs, written by
    the library) reads as the library decompresses it; a group in a format not read here is refused by its key."""
    cfg, model = _random_llama()
    fp8 = QuantizationArgs(**dict(FP8, strategy="channel"))
    w4 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    groups = {"group_0": QuantizationScheme(targets=["re:.*self_attn.*"], weights=fp8, format="float-quantized"),
              "group_1": QuantizationScheme(targets=["re:.*mlp.*"], weights=w4, format="pack-quantized")}
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"],
                                                        format="mixed-precision"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                args = fp8 if "self_attn" in name else w4
                scale, _ = calculate_qparams(*_extrema(module.weight.float(), args), args)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=None)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["format"] == "mixed-precision"
    compressor.decompress_model(model)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k in ref.state_dict()}, strict=True)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, ref, two_sequences(VOCAB))
    saved["quantization_config"]["config_groups"]["group_1"]["format"] = "marlin-24"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ModelError, match=r"config_groups.group_1.format 'marlin-24'"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
