"""Build a :class:`~dualpath.model.llama.LlamaModel` (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2, Mixtral, Qwen2/3-MoE) or a
:class:`~dualpath.model.deepseek.DeepseekV3Model` (chosen by the checkpoint's architecture) from a safetensors
directory, a GGUF file (Llama family), or seeded random weights, and check that a checkpoint matches its config
(every tensor present, every shape right).

DeepSeek-V3 checkpoints load straight from their shards: per-expert tensors (``mlp.experts.7.gate_proj.weight``)
or transformers' packed ones (``mlp.experts.gate_up_proj``), block-scaled FP8 weights (``weight`` float8_e4m3fn +
``weight_scale_inv`` per 128x128 block) dequantized to the compute dtype, and multi-token-prediction layers past
``num_hidden_layers`` ignored.

Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints load in the per-expert layout of hub checkpoints (and of what
transformers 5 ``save_pretrained`` writes: Mixtral's ``block_sparse_moe.experts.{i}.w1/w3/w2``, Qwen's
``mlp.experts.{i}.gate_proj/up_proj/down_proj``) or in transformers' packed in-memory layout
(``mlp.experts.gate_up_proj [E, 2I, H]`` + ``mlp.experts.down_proj [E, H, I]``).

GPT-2, GPT-Neo, GPT-J, GPT-NeoX, GPTBigCode, OPT, Phi, StableLM, StarCoder 2, Cohere (1, 2), Falcon, Nemotron, Bloom and MPT checkpoints are renamed to our tensors (and back
when saving) by :mod:`dualpath.model.layernorm_family`: GPT-2's transposed ``Conv1D`` weights and fused ``c_attn``,
GPTBigCode's fused ``c_attn``, GPT-NeoX's per-head fused ``query_key_value``, GPT-J's and Cohere's interleaved-RoPE
q/k rows permuted, Falcon's fused ``query_key_value`` in each of its layouts, StableLM's per-head q/k norms.

Phi-3 checkpoints hold fused ``self_attn.qkv_proj`` (q rows, then k, then v) and ``mlp.gate_up_proj`` (gate rows,
then up): split at load time, fused again by :func:`save_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from dualpath.errors import ModelError
from dualpath.model import llama_variants as lv
from dualpath.model.act_quant import ActivationQuant, activation_quant, quantized_layers
from dualpath.model.act_quant import install as install_activation_quant
from dualpath.model.bnb_quant import bnb_dequantized
from dualpath.model.cpu_precision import warn_if_emulated
from dualpath.model.gguf import read_gguf
from dualpath.model.int_quant import IntQuant
from dualpath.model.int_quant import dequantized as int_dequantized
from dualpath.model.int_quant import int_quant as int_quant_of
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.mlx_quant import MlxQuant, mlx_dequantized, mlx_quant
from dualpath.model.mx_quant import mx_dequantized
from dualpath.model.noinit import skip_default_init
from dualpath.model.quant import (
    check_quantization,
    ct_block_size,
    fp8_block_size,
    fp8_dequantized,
    scaled_dequantized,
)
from dualpath.model.spec import ModelSpec, load_spec
from dualpath.model.tensor_names import (
    _GEMMA3_LM_PREFIXES,
    _PERI_NAMES,
    _renamed,
    _suffixes_renamed,
    codegen_tensors,
    cosmos3_language_tensors,
    deepseek_tensors,
    exaone_tensors,
    gemma3_language_tensors,
    glm_tensors,
    gpt_oss_tensors,
    mla_language_tensors,
    moe_tensors,
    phi3_tensors,
    sarvam_tensors,
    tensors_out,
)

if TYPE_CHECKING:
    from dualpath.model.beam import BeamModel
    from dualpath.model.chameleon import ChameleonModel
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.deepseek import DeepseekV3Model
    from dualpath.model.deepseek_ocr2 import DeepseekOcr2Model
    from dualpath.model.deepseek_v4 import DeepseekV4Model
    from dualpath.model.doge import DogeModel
    from dualpath.model.dory import DoryModel
    from dualpath.model.falcon_h1 import FalconH1Model
    from dualpath.model.gemma3n import Gemma3nModel
    from dualpath.model.gemma4 import Gemma4Model
    from dualpath.model.granite_hybrid import GraniteHybridModel
    from dualpath.model.hrm_text import HrmTextModel
    from dualpath.model.inkling import InklingModel
    from dualpath.model.jamba import JambaModel
    from dualpath.model.laguna import LagunaModel
    from dualpath.model.lara_mini import LaraMiniModel
    from dualpath.model.lfm2 import Lfm2Model
    from dualpath.model.llama import LlamaModel
    from dualpath.model.mamba1 import Mamba1Model
    from dualpath.model.mimo_v2 import MiMoV2Model
    from dualpath.model.minimax import MiniMaxModel
    from dualpath.model.minimax_m3 import MiniMaxM3Model
    from dualpath.model.modernbert_decoder import ModernBertDecoderModel
    from dualpath.model.muse_glimmer import MuseGlimmerModel
    from dualpath.model.nemotron_h import NemotronHModel
    from dualpath.model.olmo_hybrid import OlmoHybridModel
    from dualpath.model.qwen4_exp import Qwen4ExpModel
    from dualpath.model.qwen_hybrid import HybridModel
    from dualpath.model.recurrent_gemma import RecurrentGemmaModel
    from dualpath.model.rwkv import RwkvModel
    from dualpath.model.step3p7 import Step3p7Model
    from dualpath.model.zamba import ZambaModel
    from dualpath.model.zamba2 import Zamba2Model
    from dualpath.model.zaya import ZayaModel

    AnyModel = (LlamaModel | DeepseekV3Model | Gemma4Model | Gemma3nModel | MiMoV2Model | ModernBertDecoderModel
                | LagunaModel | BeamModel | HybridModel | GraniteHybridModel
                | NemotronHModel | Lfm2Model | Mamba1Model | JambaModel
                | OlmoHybridModel | FalconH1Model | MiniMaxModel | LaraMiniModel
                | RecurrentGemmaModel | Zamba2Model | DeepseekV4Model | ZambaModel | RwkvModel | ZayaModel | InklingModel | DoryModel | Qwen4ExpModel
                | DogeModel | MiniMaxM3Model | Step3p7Model | HrmTextModel | DeepseekOcr2Model
                | MuseGlimmerModel | ChameleonModel)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: families whose linear layers are GPT-2's ``Conv1D`` (weights stored ``[in, out]``)
CONV1D_ARCHS = ("gpt2", "openai-gpt")


# --- weights in ------------------------------------------------------------------------------------------------


def assign_weights(model: AnyModel, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy Hugging Face-named ``tensors`` into ``model``. Raises :class:`ModelError` naming the missing,
    unexpected or wrongly shaped tensors."""
    params = dict(model.named_parameters(remove_duplicate=True))
    tied = model.spec.tie_embeddings
    expected = {k for k in params if not (tied and k == "lm_head.weight")}
    given = {k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)}
    if tied:
        given.discard("lm_head.weight")
    missing = sorted(expected - given)
    unexpected = sorted(k for k in given - expected  # (GPTQ writers keep a bias-less layer's zero bias)
                        if not (k.endswith(".bias") and k[: -len("bias")] + "weight" in params
                                and not bool(torch.any(tensors[k] != 0))))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        raise ModelError(f"{source} does not match the model config: " + "; ".join(parts))
    for name in sorted(expected):
        t = tensors[name]
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ModelError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config implies {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name].to(dtype=params[name].dtype))


def init_random(model: AnyModel, seed: int = 0, std: float = 0.02) -> None:
    """Seeded weights, identical on every machine: N(0, std) matrices, norms 1 + N(0, 0.1) (Gemma's, which scale
    by ``1 + weight``, N(0, 0.1)), biases N(0, std) (MoE router correction biases N(0, 0.1), so that they change the
    routing; gpt-oss's attention sinks N(0, 1), so that they change the attention)."""
    gen = torch.Generator().manual_seed(seed)
    norm_one = 0.0 if getattr(model.spec, "gemma_style", False) else 1.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(remove_duplicate=True)):
            if name.endswith("norm.weight"):
                val = norm_one + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("e_score_correction_bias"):
                val = 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("self_attn.sinks"):  # gpt-oss: sinks of the scores' order, so that they matter
                val = torch.randn(p.shape, generator=gen)
            else:
                val = std * torch.randn(p.shape, generator=gen)
            p.copy_(val.to(p.dtype))


def state_dict_for_save(model: AnyModel) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors (no duplicate tied head), contiguous, on CPU, under each family's checkpoint names
    (:func:`~dualpath.model.tensor_names.tensors_out`: e.g. Mixtral's ``block_sparse_moe.experts.{i}.w1/w3/w2``)."""
    out = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters(remove_duplicate=True)}
    if model.spec.tie_embeddings:
        out.pop("lm_head.weight", None)
    return tensors_out(model.spec, out)


def save_pretrained(model: AnyModel, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (readable by transformers and :func:`load_safetensors_dir`)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.spec.to_hf_config(), indent=2))
    save_file(state_dict_for_save(model), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


# --- weight files: safetensors, or PyTorch's pickled state dicts ----------------------------------------------


def _shard_index(index: Path, directory: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{index}: malformed shard index ({exc})") from None
    files = sorted({directory / f for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise ModelError(f"{index}: shard {f.name} is missing")
    return files


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: its safetensors (``model.safetensors.index.json``'s shards, else every
    ``*.safetensors`` but Mistral's ``consolidated*.safetensors``, its own format shipped beside the Hugging Face one,
    when others are there), or, when it has none, PyTorch's ``pytorch_model.bin`` (or the shards its
    ``pytorch_model.bin.index.json`` names), as older checkpoints ship them."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return _shard_index(index, directory)
    files = sorted(directory.glob("*.safetensors"))
    hf_files = [f for f in files if not f.name.startswith("consolidated")]
    if hf_files:
        return hf_files
    if files:
        return files
    index = directory / "pytorch_model.bin.index.json"
    if index.exists():
        return _shard_index(index, directory)
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{directory}: no weights (*.safetensors, or pytorch_model*.bin)")
    return files


def _read_pickled_state(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``.bin`` state dict, read with ``weights_only`` (tensors and plain containers only: a pickle that
    would run code or build other objects is refused, never executed)."""
    import pickle

    try:
        sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(f"{f}: refused: the pickle holds more than tensors, and it is only read with "
                         f"weights_only ({str(exc).splitlines()[0]}); convert it to safetensors") from None
    except Exception as exc:  # a truncated zip, not a torch file at all, ...
        raise ModelError(f"{f}: cannot read a PyTorch state dict ({exc})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelError(f"{f}: not a state dict (a mapping of names to tensors)")
    return sd


def read_weights_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's :func:`weight_files`, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(directory)):
        if f.suffix == ".bin":
            out.update(_read_pickled_state(f))
            continue
        try:
            out.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"{f}: cannot read safetensors ({exc})") from None
    return out


def files_identity(files: list[Path]) -> str:
    """A content hash that is cheap for large files: size, first 1 MiB and 16 sampled 64 KiB windows."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:32]


# --- entry points --------------------------------------------------------------------------------------------


def _weights_dequantized(tensors: Mapping[str, torch.Tensor], spec: ModelSpec | DeepseekV3Spec, source: str,
                         ct_block: tuple[int, int] | None, int_quant: IntQuant | None,
                         mlx: MlxQuant | None) -> Mapping[str, torch.Tensor]:
    """A checkpoint's tensors with every quantized weight in the formats read at this point dequantized:
    bitsandbytes, MLX, compressed-tensors' NVFP4 / MX floats, packed integers (GPTQ, AWQ, ``pack-quantized``), then
    compressed-tensors' FP8 / INT8 (value x scale); each kept in the model's dtype once made."""
    wdtype = spec.torch_dtype
    tensors = mx_dequantized(mlx_dequantized(bnb_dequantized(tensors, source, wdtype), mlx, source, wdtype), source,
                             wdtype)
    tensors = int_dequantized(tensors, int_quant, source, spec.architecture in CONV1D_ARCHS, wdtype)
    return scaled_dequantized(tensors, source, ct_block)


#: the families built as ``module.Model(spec)`` whose checkpoint names go through ``module.tensors_in(tensors)``
_PLAIN_FAMILIES: dict[str, tuple[str, str]] = {
    "doge": ("doge", "DogeModel"),
    "dory": ("dory", "DoryModel"),
    "inkling_text": ("inkling", "InklingModel"),
    "zaya": ("zaya", "ZayaModel"),
    "rwkv": ("rwkv", "RwkvModel"),
    "deepseek_v4": ("deepseek_v4", "DeepseekV4Model"),
    "falcon_h1": ("falcon_h1", "FalconH1Model"),
    "olmo_hybrid": ("olmo_hybrid", "OlmoHybridModel"),
    "recurrent_gemma": ("recurrent_gemma", "RecurrentGemmaModel"),
    "hrm_text": ("hrm_text", "HrmTextModel"),
    "muse_glimmer_text": ("muse_glimmer", "MuseGlimmerModel"),
    "muse_spark_text": ("muse_glimmer", "MuseGlimmerModel"),
    "chameleon": ("chameleon", "ChameleonModel"),
    "kosmos2_5_text": ("kosmos2_5", "Kosmos25Model"),
    "git": ("git", "GitModel"),
}


def _construct(spec: ModelSpec | DeepseekV3Spec, tensors: Mapping[str, torch.Tensor] | None, backend: str,
               source: str, fp8_block: tuple[int, int]) -> tuple[AnyModel, Mapping[str, torch.Tensor] | None]:
    """``spec``'s model built on CPU for :func:`build_model`, and ``tensors`` (when given) under its parameter names."""
    model: AnyModel
    if spec.architecture == "glm5_next_text":
        from dualpath.model import glm5_next, kimi_linear

        gspec = cast(kimi_linear.KimiLinearSpec, spec)
        model = glm5_next.Glm5NextModel(gspec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = deepseek_tensors(gspec, glm5_next.tensors_in(gspec, tensors), source, fp8_block)
    elif spec.architecture in ("kimi_linear", "bailing_hybrid"):
        from dualpath.model import kimi_linear

        kspec = cast(kimi_linear.KimiLinearSpec, spec)
        model = kimi_linear.KimiLinearModel(kspec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = deepseek_tensors(kspec, kimi_linear.tensors_in(kspec, tensors), source, fp8_block)
    elif spec.architecture == "dots3_note_text":
        from dualpath.model import dots3_note

        d3 = cast(dots3_note.Dots3NoteSpec, spec)
        model = dots3_note.Dots3NoteModel(d3, device="cpu", backend=backend)
        if tensors is not None:
            tensors = deepseek_tensors(d3, dots3_note.tensors_in(d3, tensors), source, fp8_block)
    elif spec.architecture == "mistral_large4_text":
        from dualpath.model import mistral_large4

        mspec = cast(mistral_large4.MistralLarge4Spec, spec)
        model = mistral_large4.MistralLarge4Model(mspec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = deepseek_tensors(mspec, mistral_large4.tensors_in(tensors), source, fp8_block)
    elif spec.architecture == "longcat_flash":
        from dualpath.model import longcat_flash

        lcspec = cast(longcat_flash.LongcatFlashSpec, spec)
        model = longcat_flash.LongcatFlashModel(lcspec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = longcat_flash.tensors_in(lcspec, deepseek_tensors(lcspec, tensors, source, fp8_block))
    elif isinstance(spec, DeepseekV3Spec):
        from dualpath.model.deepseek import DeepseekV3Model

        if spec.model_type in ("hy_v4", "hy_v4_vl_text"):  # (hyper-connections around GLM-5's sparse MLA)
            from dualpath.model.hy_v4 import HyV4Model

            model = HyV4Model(spec, device="cpu", backend=backend)
            if tensors is not None:
                from dualpath.model.hy_v4 import tensors_in as hy_v4_in

                tensors = hy_v4_in(dict(mla_language_tensors(tensors)))
        else:
            model = DeepseekV3Model(spec, device="cpu", backend=backend)
        if tensors is not None:  # (Kimi K2.5: its language model's tensors; Kimi's INT4 experts)
            tensors = deepseek_tensors(spec, mla_language_tensors(tensors), source, fp8_block)
    elif spec.architecture in _PLAIN_FAMILIES:
        import importlib

        module_name, class_name = _PLAIN_FAMILIES[spec.architecture]
        family = importlib.import_module(f"dualpath.model.{module_name}")
        model = getattr(family, class_name)(spec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = family.tensors_in(fp8_dequantized(tensors, source, fp8_block))
    elif spec.architecture == "gemma4_text":
        from dualpath.model import gemma4

        model = gemma4.Gemma4Model(cast(gemma4.Gemma4Spec, spec), device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors)
            tensors = gemma4.tensors_in(cast(gemma4.Gemma4Spec, spec), gemma3_language_tensors(tensors))
    elif spec.architecture == "gemma3n_text":
        from dualpath.model import gemma3n

        model = gemma3n.Gemma3nModel(cast(gemma3n.Gemma3nSpec, spec), device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors)
            tensors = gemma3n.tensors_in(cast(gemma3n.Gemma3nSpec, spec), gemma3_language_tensors(tensors))
    elif spec.architecture == "jetmoe":
        from dualpath.model import jetmoe

        model = jetmoe.JetMoeModel(cast(jetmoe.JetMoeSpec, spec), device="cpu", backend=backend)
    elif spec.architecture == "beam":
        from dualpath.model import beam

        model = beam.BeamModel(cast(beam.BeamSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = beam.tensors_in(tensors, source)
    elif spec.architecture in ("lfm2", "lfm2_moe", "lfm3"):
        from dualpath.model import lfm2

        model = lfm2.Lfm2Model(cast(lfm2.Lfm2Spec, spec), device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors)
            tensors = lfm2.tensors_in(gemma3_language_tensors(fp8_dequantized(tensors, source, fp8_block)), source)
    elif spec.architecture == "qwen4_exp_text":
        from dualpath.model import qwen4_exp

        q4 = cast(qwen4_exp.Qwen4ExpSpec, spec)
        model = qwen4_exp.Qwen4ExpModel(q4, device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors)
            tensors = qwen4_exp.tensors_in(q4, gemma3_language_tensors(fp8_dequantized(tensors, source, fp8_block)),
                                           source)
    elif spec.architecture == "zamba":
        from dualpath.model import zamba

        zv1 = cast(zamba.ZambaSpec, spec)
        model = zamba.ZambaModel(zv1, device="cpu", backend=backend,
                                 own_blocks=zamba.untied_layers(zv1, None if tensors is None else list(tensors)))
        if tensors is not None:
            tensors = zamba.tensors_in(fp8_dequantized(tensors, source, fp8_block))
    elif spec.architecture == "zamba2":
        from dualpath.model import zamba2

        zspec = cast(zamba2.Zamba2Spec, spec)
        own = zamba2.untied_layers(zspec, tensors if tensors is not None else ())
        model = zamba2.Zamba2Model(zspec, device="cpu", backend=backend, own_blocks=own)
        if tensors is not None:
            tensors = zamba2.tensors_in(fp8_dequantized(tensors, source, fp8_block))
    elif spec.architecture == "lara_mini":
        from dualpath.model import lara_mini

        lspec = cast(lara_mini.LaraMiniSpec, spec)
        model = lara_mini.LaraMiniModel(lspec, device="cpu", backend=backend)
        if tensors is not None:
            tensors = lara_mini.tensors_in(lspec, fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "minimax":
        from dualpath.model import minimax

        model = minimax.MiniMaxModel(cast(minimax.MiniMaxSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = minimax.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "jamba":
        from dualpath.model import jamba

        model = jamba.JambaModel(cast(jamba.JambaSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = jamba.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture in ("mamba", "falcon_mamba"):
        from dualpath.model import mamba1

        model = mamba1.Mamba1Model(cast(mamba1.Mamba1Spec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = mamba1.tensors_in(fp8_dequantized(tensors, source, fp8_block))
    elif spec.architecture in ("nemotron_h", "mamba2"):
        from dualpath.model import nemotron_h as nh

        model = nh.NemotronHModel(cast(nh.NemotronHSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = nh.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture in ("granitemoehybrid", "bamba"):
        from dualpath.model import granite_hybrid as gh

        model = gh.GraniteHybridModel(cast(gh.GraniteHybridSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = gh.tensors_in(fp8_dequantized(tensors, source, fp8_block))
    elif spec.architecture in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):
        from dualpath.model import qwen_hybrid as qh

        model = qh.HybridModel(cast(qh.HybridSpec, spec), device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors)
            tensors = qh.tensors_in(cast(qh.HybridSpec, spec), gemma3_language_tensors(
                fp8_dequantized(tensors, source, fp8_block)), source)
    elif spec.architecture == "deepseek_ocr2_text":
        from dualpath.model import deepseek_ocr2

        model = deepseek_ocr2.DeepseekOcr2Model(cast(deepseek_ocr2.DeepseekOcr2Spec, spec), device="cpu",
                                                backend=backend)
        if tensors is not None:
            tensors = deepseek_ocr2.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "step3p5":
        from dualpath.model import step3p7

        s37 = cast(step3p7.Step3p7Spec, spec)
        model = step3p7.Step3p7Model(s37, device="cpu", backend=backend)
        if tensors is not None:
            tensors = step3p7.tensors_in(s37, fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "minimax_m3_vl_text":
        from dualpath.model import minimax_m3

        model = minimax_m3.MiniMaxM3Model(cast(minimax_m3.MiniMaxM3Spec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = minimax_m3.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "laguna":
        from dualpath.model import laguna

        model = laguna.LagunaModel(cast(laguna.LagunaSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = laguna.tensors_in(fp8_dequantized(tensors, source, fp8_block), source)
    elif spec.architecture == "mimo_v2_flash":
        from dualpath.model import mimo_v2

        model = mimo_v2.MiMoV2Model(cast(mimo_v2.MiMoV2Spec, spec), device="cpu", backend=backend)
        if tensors is not None:  # (block-scaled FP8 weights, as the hub's checkpoint holds them)
            tensors = mimo_v2.tensors_in(cast(mimo_v2.MiMoV2Spec, spec), fp8_dequantized(tensors, source, fp8_block),
                                         source)
    elif spec.architecture == "modernbert-decoder":
        from dualpath.model import modernbert_decoder as mbd

        model = mbd.ModernBertDecoderModel(cast(mbd.ModernBertDecoderSpec, spec), device="cpu", backend=backend)
        if tensors is not None:
            tensors = mbd.tensors_in(tensors)
    else:
        from dualpath.model.llama import LlamaModel

        if spec.architecture == "diffllama":  # (Llama's blocks and tensors, differential attention)
            from dualpath.model.diffllama import DiffLlamaModel

            model = DiffLlamaModel(spec, device="cpu", backend=backend)
        else:
            model = LlamaModel(spec, device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors; EXAONE's names)
            tensors = codegen_tensors(exaone_tensors(gemma3_language_tensors(fp8_dequantized(
                tensors, source, fp8_block))), source)
        if tensors is not None and spec.architecture == "gpt_oss":
            tensors = gpt_oss_tensors(spec, tensors)
        elif tensors is not None and spec.architecture == "molmo2_text":  # (its released layout, fused projections)
            from dualpath.model import molmo2

            tensors = molmo2.tensors_in(cast(molmo2.Molmo2Spec, spec), tensors, source)
        elif tensors is not None and spec.architecture == "llama4_text":  # (MoE, in its own layout)
            tensors = lv.tensors_in(spec, tensors, source)
        elif tensors is not None and spec.is_moe:  # (ERNIE 4.5 MoE, Command A+: their interleaved RoPE rows first)
            if spec.architecture == "glm4_moe":  # (Sarvam-MoE's released names, as transformers reads them)
                tensors = sarvam_tensors(spec, tensors, source)
            if spec.architecture in lv.VARIANT_ARCHS:
                tensors = lv.tensors_in(spec, tensors, source)
            elif spec.layer_norm:
                from dualpath.model.layernorm_family import tensors_in as layernorm_tensors_in

                tensors = layernorm_tensors_in(spec, tensors)
            tensors = moe_tensors(spec, tensors, source)
        elif tensors is not None and spec.architecture == "phi3":
            tensors = phi3_tensors(spec, tensors, source)
        elif tensors is not None and spec.architecture in ("glm", "glm4"):
            tensors = glm_tensors(spec, tensors, source)
        elif tensors is not None and spec.peri_norms:  # HyperCLOVA X's Peri-LN norms
            tensors = _suffixes_renamed(tensors, _PERI_NAMES)
        elif tensors is not None and spec.layer_norm:
            from dualpath.model.layernorm_family import tensors_in

            tensors = tensors_in(spec, tensors)
        elif tensors is not None and spec.architecture in lv.VARIANT_ARCHS:
            tensors = lv.tensors_in(spec, tensors, source)
    return model, tensors


def build_model(spec: ModelSpec | DeepseekV3Spec, tensors: Mapping[str, torch.Tensor] | None, *, seed: int = 0,
                device: str | torch.device = "cpu", backend: str = "auto", source: str = "checkpoint",
                fp8_block: tuple[int, int] = (128, 128), ct_block: tuple[int, int] | None = None,
                act_quant: ActivationQuant | None = None, int_quant: IntQuant | None = None,
                mlx: MlxQuant | None = None) -> AnyModel:
    """A model on CPU filled from ``tensors`` (or seeded random weights when None), then moved to ``device``.
    ``fp8_block`` / ``ct_block``: the tiles of block-scaled FP8 weights (``weight_block_size``) and of
    compressed-tensors' ``block`` strategy (``block_structure``). ``act_quant``: the input quantization of the
    checkpoint's quantized layers (:mod:`dualpath.model.act_quant`). ``int_quant``: the format of its packed integer
    weights (GPTQ, AWQ, compressed-tensors' ``pack-quantized``; :mod:`dualpath.model.int_quant`). ``mlx``: an
    mlx-lm checkpoint's ``quantization`` (:mod:`dualpath.model.mlx_quant`)."""
    quantized: tuple[set[str], dict[str, torch.Tensor]] = (set(), {})
    if tensors is not None and act_quant is not None:  # (read before the scales are dropped)
        layers, scales = quantized_layers(tensors)
        quantized = ({_renamed(n, _GEMMA3_LM_PREFIXES) for n in layers},
                     {_renamed(n, _GEMMA3_LM_PREFIXES): s for n, s in scales.items()})
    if tensors is not None:
        tensors = _weights_dequantized(tensors, spec, source, ct_block, int_quant, mlx)
    with skip_default_init():  # (every parameter is assigned below: torch's default fill is wasted work)
        model, tensors = _construct(spec, tensors, backend, source, fp8_block)
    if tensors is None:
        init_random(model, seed)
        if spec.architecture == "gemma4_text":
            from dualpath.model.gemma4 import random_init_overrides

            random_init_overrides(model, torch.Generator().manual_seed(seed + 1))  # type: ignore[arg-type]
        elif spec.architecture == "gemma3n_text":
            from dualpath.model.gemma3n import random_init_overrides as gemma3n_init

            gemma3n_init(model, torch.Generator().manual_seed(seed + 1))  # type: ignore[arg-type]
        elif spec.architecture == "deepseek_v4":
            from dualpath.model.deepseek_v4 import random_init_overrides as deepseek_v4_init

            deepseek_v4_init(model, torch.Generator().manual_seed(seed + 1))  # type: ignore[arg-type]
    else:
        assign_weights(model, tensors, source)
    if act_quant is not None and quantized[0]:
        install_activation_quant(model, act_quant, quantized[0], quantized[1], source)
    return model.to(device).eval()


#: a model directory has a tokenizer when it holds one of these: transformers' own files, or only the tokenizer's
#: model as older repos ship it (a SentencePiece or tiktoken ``tokenizer.model``, GPT-2's ``vocab.json`` and
#: ``merges.txt``, T5's ``spiece.model``), the class then told by ``config.json``
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "tokenizer.tiktoken")


def load_tokenizer(path: str | Path) -> Any | None:
    """The Hugging Face tokenizer of a model directory or GGUF file, or None (no tokenizer, or no transformers)."""
    p = Path(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover
        return None
    try:
        if p.is_file() and p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if any((p / name).exists() for name in _TOKENIZER_FILES):
            tok = AutoTokenizer.from_pretrained(str(p))
        else:
            return None
    except Exception as exc:
        raise ModelError(f"{p}: cannot load the tokenizer ({exc})") from None
    if not getattr(tok, "chat_template", None):
        template = processor_chat_template(p)
        if template is not None:
            tok.chat_template = template
    return tok


#: where an image-text checkpoint's processor keeps its chat template when the tokenizer's config does not have it
_PROCESSOR_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")


def processor_chat_template(directory: Path) -> str | dict[str, str] | None:
    """The chat template an image-text checkpoint keeps for its processor beside the tokenizer (transformers'
    ``AutoTokenizer`` does not read it, ``AutoProcessor`` does): ``chat_template.jinja``, ``chat_template.json``
    (``{"chat_template": ...}``) or ``processor_config.json``'s ``chat_template``, the first found; None when there
    is none. A file that is not valid JSON is a :class:`ModelError` naming it."""
    for name in _PROCESSOR_TEMPLATE_FILES:
        f = directory / name
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        if name.endswith(".jinja"):
            return text
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{f}: not valid JSON ({exc})") from None
        template = obj.get("chat_template") if isinstance(obj, dict) else None
        named = isinstance(template, dict) and all(isinstance(v, str) for v in template.values())
        if template is not None and not (isinstance(template, str) or named):
            raise ModelError(f"{f}: chat_template must be a string (or named strings), got {type(template).__name__}")
        if template:
            return template  # type: ignore[no-any-return]
    return None


def load_model(config: LlamaModelConfig | str | os.PathLike[str] | Mapping[str, Any] | None = None,
               device: str | torch.device = "cpu", *,
               path: str | Path | None = None, with_tokenizer: bool = True) -> tuple[AnyModel, Any | None]:
    """Build the model a :class:`~dualpath.model.config.LlamaModelConfig` names (``path`` overrides its path).

    ``config``: that config, a mapping as a config file's ``model`` section holds it, or a checkpoint's path
    alone (``load_model("ckpt/")``, as ``from_pretrained`` takes one). ``path``: a checkpoint directory
    (safetensors or PyTorch ``.bin`` weights, sharded or not, with config.json), a ``.gguf`` file, a
    ``config.json`` (with ``random_init``), or None for the embedded SmolLM2-135M-Instruct (converted once, cached).
    """
    from dualpath.model.config import LlamaModelConfig

    given: LlamaModelConfig | None = None
    if isinstance(config, str | os.PathLike):
        if path is not None:
            raise ModelError("load_model: a checkpoint path given twice (as config and as path=)")
        path = Path(config)
    elif isinstance(config, Mapping):
        from dualpath.config import validate_section

        given = validate_section(LlamaModelConfig, config, "model")
    elif isinstance(config, LlamaModelConfig):
        given = config
    elif config is not None:
        raise ModelError(f"load_model: config must be a model config, a mapping or a checkpoint path, "
                         f"got {type(config).__name__}")
    cfg = given or LlamaModelConfig()
    from dualpath.model.embedded import checkpoint_path

    p = checkpoint_path(path if path is not None else cfg.path)
    if not p.exists():
        raise ModelError(f"model.path: {p} does not exist")
    tokenizer = None
    spec: ModelSpec | DeepseekV3Spec
    fp8_block: tuple[int, int] = (128, 128)
    ct_block: tuple[int, int] | None = None
    act_quant: ActivationQuant | None = None
    iq: IntQuant | None = None
    mq: MlxQuant | None = None
    if p.is_file() and p.suffix == ".gguf":
        hf_cfg, tensors = read_gguf(p, getattr(torch, cfg.dtype))  # (each tensor kept in the model's dtype)
        spec = load_spec(hf_cfg, dtype=cfg.dtype, kv_format=cfg.kv_format, max_context=cfg.max_context)
        weights_id = f"random:{cfg.seed}" if cfg.random_init else files_identity([p])
        model_tensors: Mapping[str, torch.Tensor] | None = None if cfg.random_init else tensors
    else:
        cfg_path = p if p.is_file() else p / "config.json"
        spec = load_spec(cfg_path, dtype=cfg.dtype, kv_format=cfg.kv_format, max_context=cfg.max_context)
        from dualpath.model.spec_common import read_hf_config

        hf_config = read_hf_config(cfg_path)[0]
        fp8_block, ct_block = fp8_block_size(hf_config), ct_block_size(hf_config)
        if not cfg.random_init:  # (random weights have no quantization to read)
            check_quantization(hf_config, str(cfg_path))
            act_quant = activation_quant(hf_config, str(cfg_path))
            iq = int_quant_of(hf_config, str(cfg_path))
            mq = mlx_quant(hf_config, str(cfg_path))
        if cfg.random_init:
            model_tensors, weights_id = None, f"random:{cfg.seed}"
        else:
            files = weight_files(p if p.is_dir() else p.parent)
            model_tensors = cosmos3_language_tensors(hf_config, read_weights_dir(p if p.is_dir() else p.parent))
            weights_id = files_identity(files)
    from dataclasses import replace

    spec = replace(spec, weights_id=weights_id)
    model = build_model(spec, model_tensors, seed=cfg.seed, device=device, backend=cfg.attention_backend,
                        source=str(p), fp8_block=fp8_block, ct_block=ct_block, act_quant=act_quant, int_quant=iq,
                        mlx=mq)
    if hasattr(model, "prefill_form"):  # MLA
        model.prefill_form = cfg.mla_prefill
    warn_if_emulated(cfg.dtype, torch.device(device).type)
    if with_tokenizer:
        tokenizer = load_tokenizer(p if p.is_dir() or p.suffix == ".gguf" else p.parent)
    return model, tokenizer
