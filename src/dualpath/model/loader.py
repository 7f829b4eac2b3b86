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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dualpath.errors import ModelError
from dualpath.model import llama_variants as lv
from dualpath.model.gguf import read_gguf
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.quant import (
    _dequantized,
    check_quantization,
    fp8_block_size,
    fp8_dequantized,
    int4_dequantized,
)
from dualpath.model.spec import GROUP_ROUTER_ARCHS, ModelSpec, load_spec

if TYPE_CHECKING:
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.deepseek import DeepseekV3Model
    from dualpath.model.llama import LlamaModel

    AnyModel = LlamaModel | DeepseekV3Model

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
    unexpected = sorted(given - expected)
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
    """Hugging Face-named tensors (no duplicate tied head), contiguous, on CPU; Mixtral's MoE tensors under its
    hub names (``block_sparse_moe.gate``, ``block_sparse_moe.experts.{i}.w1/w3/w2``)."""
    out = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters(remove_duplicate=True)}
    if model.spec.tie_embeddings:
        out.pop("lm_head.weight", None)
    if getattr(model.spec, "architecture", "") in ("mixtral", "phimoe"):
        out = {_mixtral_hub_name(k): v for k, v in out.items()}
    if getattr(model.spec, "architecture", "") == "minimax_m2":  # Mixtral's hub names, the bias on the block
        out = {_mixtral_hub_name(k.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")): v
               for k, v in out.items()}
    if getattr(model.spec, "architecture", "") == "exaone_moe":  # (the bias on the block, as K-EXAONE stores it)
        out = {k.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"): v for k, v in out.items()}
    if getattr(model.spec, "architecture", "") in ("granitemoe", "granitemoeshared"):
        out = _granite_moe_hub_tensors(out)
    if getattr(model.spec, "architecture", "") == "afmoe":
        for theirs, ours in _AFMOE_NAMES.items():
            out = {k.replace(ours, theirs): v for k, v in out.items()}
    if getattr(model.spec, "peri_norms", None):
        out = _suffixes_renamed(out, {ours: theirs for theirs, ours in _PERI_NAMES.items()})
    if getattr(model.spec, "architecture", "") == "mistral4":  # (transformers reads Mistral 4's experts packed only)
        out = _packed_experts(out)
    if getattr(model.spec, "architecture", "") == "phi3":
        out = _fuse_phi3(out)
    if getattr(model.spec, "architecture", "") in ("glm", "glm4"):
        out = _glm_hub_tensors(model.spec, out)  # type: ignore[arg-type]
    if getattr(model.spec, "layer_norm", False):  # GPT-2, GPT-NeoX, Phi, StableLM, StarCoder 2: their own names
        from dualpath.model.layernorm_family import tensors_out

        out = tensors_out(model.spec, out)  # type: ignore[arg-type]
    if getattr(model.spec, "architecture", "") in lv.VARIANT_ARCHS:  # the one-twist Llamas and Llama 4
        out = lv.tensors_out(model.spec, out)  # type: ignore[arg-type]
    return out


_PHI3_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _fuse_phi3(tensors: dict[str, torch.Tensor], fused_map: dict[str, tuple[str, ...]] | None = None
               ) -> dict[str, torch.Tensor]:
    """Our split Phi-3 projections -> the checkpoint's fused ``qkv_proj`` and ``gate_up_proj`` (rows concatenated);
    ``fused_map``: which of them (default both)."""
    parts_of = {part: (fused, parts) for fused, parts in (fused_map or _PHI3_FUSED).items() for part in parts}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module = ".".join(name.split(".")[-3:-1])  # e.g. self_attn.q_proj
        if module not in parts_of or not name.endswith(".weight"):
            out[name] = t
        elif module == parts_of[module][1][0]:  # the first part: write the fused tensor once
            fused, parts = parts_of[module]
            prefix = name[: -len(f"{module}.weight")]
            out[f"{prefix}{fused}.weight"] = torch.cat([tensors[f"{prefix}{q}.weight"] for q in parts]).contiguous()
    return out


def phi3_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Phi-3 checkpoint tensors in this model's names: ``qkv_proj [(Hq + 2 Hkv) D, hidden]`` split into
    ``q_proj`` / ``k_proj`` / ``v_proj``, ``gate_up_proj [2 I, hidden]`` into ``gate_proj`` / ``up_proj``."""
    q_rows, kv_rows = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    sizes = {"self_attn.qkv_proj": [q_rows, kv_rows, kv_rows],
             "mlp.gate_up_proj": [spec.intermediate_size, spec.intermediate_size]}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        fused = next((f for f in _PHI3_FUSED if name.endswith(f".{f}.weight")), None)
        if fused is None:
            out[name] = t
            continue
        if t.dim() != 2 or t.shape[0] != sum(sizes[fused]):
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config implies "
                             f"({sum(sizes[fused])}, {spec.hidden_size})")
        prefix = name[: -len(f"{fused}.weight")]
        for part, piece in zip(_PHI3_FUSED[fused], t.split(sizes[fused]), strict=True):
            out[f"{prefix}{part}.weight"] = piece
    return out


_QK_ROWS = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias")


def glm_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """GLM / GLM-4 checkpoint tensors in this model's names: ``gate_up_proj`` split (as Phi-3's), and the q/k rows
    (weights and biases) of its interleaved RoPE permuted into our half-split order."""
    from dualpath.model.layernorm_family import interleaved_to_half

    out = phi3_tensors(spec, tensors, source)
    return {k: interleaved_to_half(spec, k, v) if k.endswith(_QK_ROWS) else v for k, v in out.items()}


def _glm_hub_tensors(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`glm_tensors`."""
    from dualpath.model.layernorm_family import interleaved_to_half

    out = {k: interleaved_to_half(spec, k, v, inverse=True) if k.endswith(_QK_ROWS) else v for k, v in tensors.items()}
    return _fuse_phi3(out, {"mlp.gate_up_proj": _PHI3_FUSED["mlp.gate_up_proj"]})


_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _mixtral_hub_name(name: str) -> str:
    """Our MoE tensor name -> Mixtral's hub name (``.mlp.experts.3.gate_proj.`` ->
    ``.block_sparse_moe.experts.3.w1.``)."""
    if ".mlp." not in name:
        return name
    name = name.replace(".mlp.", ".block_sparse_moe.")
    for hub, ours in _MIXTRAL_EXPERT_NAMES.items():
        name = name.replace(f".{ours}.", f".{hub}.")
    return name


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
    ``*.safetensors``), or, when it has none, PyTorch's ``pytorch_model.bin`` (or the shards its
    ``pytorch_model.bin.index.json`` names), as older checkpoints ship them."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return _shard_index(index, directory)
    files = sorted(directory.glob("*.safetensors"))
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


def deepseek_tensors(spec: DeepseekV3Spec, tensors: Mapping[str, torch.Tensor],
                     source: str = "checkpoint", fp8_block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 / V2 checkpoint tensors in this model's names: FP8 blocks dequantized, packed experts split,
    multi-token-prediction layers (``model.layers.{n >= num_hidden_layers}``) dropped, and the empty shared-expert
    tensors transformers' DeepseekV2 writes when ``n_shared_experts`` is 0 dropped."""
    out: dict[str, torch.Tensor] = {}
    if spec.has_dsa:
        _check_indexer(spec, tensors, source)
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= spec.n_layers:
            continue
        if spec.n_shared_experts == 0 and ".mlp.shared_experts." in name and t.numel() == 0:
            continue
        if name.endswith("weight_scale_inv"):
            continue
        t = _dequantized(name, t, tensors, source, fp8_block)
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def _check_indexer(spec: DeepseekV3Spec, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every layer of a DeepSeek-V3.2 checkpoint has its lightning indexer, shaped as the config says."""
    assert spec.q_lora_rank is not None
    h, d = spec.index_n_heads, spec.index_head_dim
    shapes = {"wq_b.weight": (h * d, spec.q_lora_rank), "wk.weight": (d, spec.hidden_size), "k_norm.weight": (d,),
              "k_norm.bias": (d,), "weights_proj.weight": (h, spec.hidden_size)}
    for layer in range(spec.n_layers):
        if not spec.has_indexer(layer):  # (GLM-5's shared layers have none)
            continue
        for suffix, shape in shapes.items():
            name = f"model.layers.{layer}.self_attn.indexer.{suffix}"
            t = tensors.get(name)
            if t is None:
                raise ModelError(f"{source}: DeepSeek-V3.2 tensor {name!r} is missing")
            if t.dtype != torch.float8_e4m3fn and tuple(t.shape) != shape:
                raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config implies {shape}")


def _split_packed_experts(name: str, t: torch.Tensor, out: dict[str, torch.Tensor], source: str) -> bool:
    """transformers' packed experts -> per-expert tensors in ``out``: ``mlp.experts.gate_up_proj [E, 2I, H]``
    (gate rows first, then up) and ``mlp.experts.down_proj [E, H, I]``. False when ``name`` is not packed."""
    for packed in ("gate_up_proj", "down_proj"):
        if name.endswith(f".mlp.experts.{packed}"):
            break
    else:
        return False
    if t.dim() != 3 or (packed == "gate_up_proj" and t.shape[1] % 2):
        raise ModelError(f"{source}: packed expert tensor {name!r} has shape {tuple(t.shape)}, expected "
                         f"{'[experts, 2 * intermediate, hidden]' if packed == 'gate_up_proj' else '[experts, hidden, intermediate]'}")
    prefix = name[: -len(packed)]
    if packed == "gate_up_proj":
        gate, up = t.chunk(2, dim=1)
        for e in range(t.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
            out[f"{prefix}{e}.up_proj.weight"] = up[e]
    else:
        for e in range(t.shape[0]):
            out[f"{prefix}{e}.down_proj.weight"] = t[e]
    return True


#: GraniteMoE's hub names (``block_sparse_moe.input_linear``: every expert's gate rows then up rows, ``[E, 2I, H]``;
#: ``output_linear`` ``[E, H, I]``; ``router.layer``; GraniteMoE-Shared's ``shared_mlp``) -> transformers' packed
#: names, which :func:`_split_packed_experts` splits (transformers >= 5 also writes those packed names)
_GRANITE_MOE_NAMES = ((".block_sparse_moe.input_linear.weight", ".mlp.experts.gate_up_proj"),
                      (".block_sparse_moe.output_linear.weight", ".mlp.experts.down_proj"),
                      (".block_sparse_moe.router.layer.weight", ".mlp.gate.weight"),
                      (".block_sparse_moe.router.weight", ".mlp.gate.weight"),
                      (".block_sparse_moe.experts.gate_up_proj", ".mlp.experts.gate_up_proj"),
                      (".block_sparse_moe.experts.down_proj", ".mlp.experts.down_proj"),
                      (".shared_mlp.output_linear.weight", ".mlp.shared_expert.down_proj.weight"))


def _granite_moe_in(name: str, t: torch.Tensor, out: dict[str, torch.Tensor], source: str) -> bool:
    """A GraniteMoE tensor into ``out`` under our names (False: not one of its MoE tensors)."""
    if name.endswith(".shared_mlp.input_linear.weight"):  # [2S, H]: the shared expert's gate rows, then up rows
        if t.dim() != 2 or t.shape[0] % 2:
            raise ModelError(f"{source}: {name!r} has shape {tuple(t.shape)}, expected [2 * shared_intermediate_size, "
                             "hidden]")
        prefix = name[: -len(".shared_mlp.input_linear.weight")] + ".mlp.shared_expert."
        out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = t.chunk(2, dim=0)
        return True
    for theirs, ours in _GRANITE_MOE_NAMES:
        if name.endswith(theirs):
            name = name[: -len(theirs)] + ours
            if not _split_packed_experts(name, t, out, source):
                out[name] = t
            return True
    return False


def _packed_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_split_packed_experts`: per-expert ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
    packed as transformers' ``mlp.experts.gate_up_proj [E, 2I, H]`` (gate rows, then up) and ``down_proj``."""
    import re

    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for (prefix, part), by_e in experts.items():
        stacked = torch.stack([by_e[e] for e in sorted(by_e)])
        if part == "gate_proj":
            up = experts[(prefix, "up_proj")]
            out[f"{prefix}.gate_up_proj"] = torch.cat([stacked, torch.stack([up[e] for e in sorted(up)])],
                                                      dim=1).contiguous()
        elif part == "down_proj":
            out[f"{prefix}.down_proj"] = stacked.contiguous()
    return out


def _granite_moe_hub_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_granite_moe_in`: our per-expert tensors packed under GraniteMoE's hub names (which
    transformers 4 and 5 both read)."""
    import re

    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    shared: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        elif (m := re.match(r"^(.*)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$", name)):
            shared.setdefault(m.group(1), {})[m.group(2)] = t
        elif name.endswith(".mlp.gate.weight"):
            out[name[: -len(".mlp.gate.weight")] + ".block_sparse_moe.router.layer.weight"] = t
        else:
            out[name] = t
    for (layer, part), by_e in experts.items():
        if part == "up_proj":
            continue
        stacked = torch.stack([by_e[e] for e in sorted(by_e)])
        if part == "gate_proj":
            up = experts[(layer, "up_proj")]
            stacked = torch.cat([stacked, torch.stack([up[e] for e in sorted(up)])], dim=1)
            out[f"{layer}.block_sparse_moe.input_linear.weight"] = stacked.contiguous()
        else:
            out[f"{layer}.block_sparse_moe.output_linear.weight"] = stacked.contiguous()
    for layer, parts in shared.items():
        out[f"{layer}.shared_mlp.input_linear.weight"] = torch.cat([parts["gate_proj"], parts["up_proj"]]).contiguous()
        out[f"{layer}.shared_mlp.output_linear.weight"] = parts["down_proj"]
    return out


#: HyperCLOVA X's Peri-LN norms -> ours (Gemma 2's four; its pre-MLP norm keeps Llama's name there)
_PERI_NAMES = {".post_norm1.weight": ".post_attention_layernorm.weight",
               ".post_attention_layernorm.weight": ".pre_feedforward_layernorm.weight",
               ".post_norm2.weight": ".post_feedforward_layernorm.weight"}


def _suffixes_renamed(tensors: Mapping[str, torch.Tensor], suffixes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``tensors`` with each name's suffix in ``suffixes`` replaced once (the renames may swap names)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        old = next((s for s in suffixes if name.endswith(s)), None)
        out[name if old is None else name[: -len(old)] + suffixes[old]] = t
    return out


#: Trinity (afmoe) tensor names -> ours (GLM-4.5's router; Gemma 2's names for the norms around the MLP), the bias
#: first (written back in this order, it must not become the router's)
_AFMOE_NAMES = {".mlp.expert_bias": ".mlp.gate.e_score_correction_bias", ".mlp.router.gate.": ".mlp.gate.",
                ".pre_mlp_layernorm.": ".pre_feedforward_layernorm.", ".post_mlp_layernorm.": ".post_feedforward_layernorm."}


def moe_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4.5 checkpoint tensors in this model's names: Mixtral's
    ``block_sparse_moe`` and ``w1/w3/w2`` renamed to ``mlp`` and ``gate_proj/up_proj/down_proj``, transformers'
    packed experts split, GLM-4.5's multi-token-prediction layers dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if (spec.architecture in GROUP_ROUTER_ARCHS and len(parts) > 2 and parts[:2] == ["model", "layers"]
                and parts[2].isdigit() and int(parts[2]) >= spec.n_layers):
            continue  # GLM-4.5's multi-token-prediction layers (num_nextn_predict_layers): not a decoder layer
        if spec.architecture in ("exaone_moe", "mellum") and name.startswith(("mtp.", "model.mtp.")):
            continue  # K-EXAONE's and Mellum's multi-token-prediction blocks
        if spec.architecture in ("granitemoe", "granitemoeshared") and _granite_moe_in(name, t, out, source):
            continue
        if spec.architecture == "afmoe":  # Trinity's names for the router, its bias and the MLP's norms
            for theirs, ours in _AFMOE_NAMES.items():
                name = name.replace(theirs, ours)
        if spec.architecture in ("minimax_m2", "exaone_moe") and name.endswith(("mlp.e_score_correction_bias",
                                                                  "block_sparse_moe.e_score_correction_bias")):
            name = name[: -len("e_score_correction_bias")].replace(".block_sparse_moe.", ".mlp.") + \
                "gate.e_score_correction_bias"  # (the block's buffer there; our router's here)
        if spec.architecture == "phimoe" and name.endswith(".mlp.router.weight"):  # (transformers' in-memory name)
            name = name[: -len("router.weight")] + "gate.weight"
        if spec.architecture in ("mixtral", "minimax_m2", "phimoe") and ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            parts = name.split(".")
            if len(parts) == 8 and parts[4] == "experts" and parts[6] in _MIXTRAL_EXPERT_NAMES:
                parts[6] = _MIXTRAL_EXPERT_NAMES[parts[6]]
                name = ".".join(parts)
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


#: where Gemma 3's image-text checkpoints keep the language model (transformers >= 4.52 and <= 4.51), and the
#: vision parts a text model leaves
_GEMMA3_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.lm_head.", "lm_head."))
_GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.", "visual.", "model.visual.", "vision_model.",
                           "model.vision_model.")


#: EXAONE 3's tensor names -> Llama's (``transformer.h.3.attn.attention.q_proj`` -> ``model.layers.3.self_attn.q_proj``)
_EXAONE_NAMES = ((r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.h\.", "model.layers."),
                 (r"^transformer\.ln_f\.", "model.norm."), (r"\.attn\.attention\.", ".self_attn."),
                 (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"\.ln_1\.", ".input_layernorm."),
                 (r"\.ln_2\.", ".post_attention_layernorm."), (r"\.mlp\.c_fc_0\.", ".mlp.gate_proj."),
                 (r"\.mlp\.c_fc_1\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj."))


def codegen_tensors(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """CodeGen's fused ``attn.qkv_proj.weight`` (rows in 4 groups of ``[q, v, k]``, each group a quarter of the
    heads) as GPT-J's ``q_proj`` / ``k_proj`` / ``v_proj``; other tensors (and GPT-J checkpoints) unchanged."""
    if not any(k.endswith(".attn.qkv_proj.weight") for k in tensors):
        return tensors
    from dualpath.model.hf_config import CODEGEN_MP

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not name.endswith(".attn.qkv_proj.weight"):
            if not name.endswith(".attn.causal_mask"):
                out[name] = t
            continue
        if t.dim() != 2 or t.shape[0] % (3 * CODEGEN_MP):
            raise ModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected [3 * hidden, hidden] "
                             f"in {CODEGEN_MP} groups")
        groups = t.reshape(CODEGEN_MP, 3, t.shape[0] // (3 * CODEGEN_MP), t.shape[1])
        prefix = name[: -len("qkv_proj.weight")]
        for i, part in enumerate(("q_proj", "v_proj", "k_proj")):
            out[f"{prefix}{part}.weight"] = groups[:, i].reshape(-1, t.shape[1]).contiguous()
    return out


def exaone_tensors(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """EXAONE 3 / 3.5 checkpoints (Llama under GPT-2-like names) in Llama's names; other tensors unchanged."""
    if not any(k.startswith("transformer.h.") and ".attn.attention." in k for k in tensors):
        return tensors
    import re

    out = {}
    for name, t in tensors.items():
        for pattern, repl in _EXAONE_NAMES:
            name = re.sub(pattern, repl, name)
        out[name] = t
    return out


def gemma3_language_tensors(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """An image-text checkpoint's language-model tensors under its text architecture's names (the vision tower
    and projector left out): Gemma 3, Mistral 3, Llava, Qwen2-VL / 2.5-VL / 3-VL; a text checkpoint's tensors
    unchanged."""
    if not any(k.startswith((*(p for p, _ in _GEMMA3_LM_PREFIXES), *_GEMMA3_VISION_PREFIXES)) for k in tensors):
        return tensors
    return _language_model(tensors, _GEMMA3_VISION_PREFIXES)


def _language_model(tensors: Mapping[str, torch.Tensor], vision: tuple[str, ...],
                    renames: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
    """An image-text checkpoint's tensors without those under ``vision``: the language model's prefix
    (:data:`_GEMMA3_LM_PREFIXES`) replaced by the text model's, then the first of ``renames`` that applies."""
    return {_renamed(_renamed(name, _GEMMA3_LM_PREFIXES), renames): t for name, t in tensors.items()
            if not name.startswith(vision)}


def _renamed(name: str, prefixes: Sequence[tuple[str, str]]) -> str:
    """``name`` with the first ``old`` prefix of ``prefixes`` it starts with replaced by its ``new``."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


#: Kimi K2.5's vision parts, left out of its language model
_KIMI_VISION_PREFIXES = ("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector.")


def mla_language_tensors(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A Kimi K2.5 checkpoint's language-model tensors under DeepSeek-V3's names: ``language_model.model.`` (and
    ``model.language_model.``) -> ``model.``, its decoder layers as ``model.layers.`` (transformers writes them as
    ``blocks``), ``language_model.lm_head.`` -> ``lm_head.``; the vision tower and projector left out. A text
    checkpoint's tensors unchanged."""
    if not any(k.startswith(("language_model.", "model.language_model.")) for k in tensors):
        return tensors
    return _language_model(tensors, _KIMI_VISION_PREFIXES, (("model.blocks.", "model.layers."),))


def gpt_oss_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A gpt-oss checkpoint's tensors with its MXFP4 experts (``*_blocks`` / ``*_scales``, as OpenAI publishes
    them) dequantized to the dense parameters; a dense checkpoint's unchanged."""
    if not any(name.endswith(("_blocks", "_scales")) for name in tensors):
        return tensors
    from dualpath.model.mxfp4 import gpt_oss_dense_experts

    return gpt_oss_dense_experts(dict(tensors), spec.torch_dtype)


def build_model(spec: ModelSpec | DeepseekV3Spec, tensors: Mapping[str, torch.Tensor] | None, *, seed: int = 0,
                device: str | torch.device = "cpu", backend: str = "auto", source: str = "checkpoint",
                fp8_block: tuple[int, int] = (128, 128)) -> AnyModel:
    """A model on CPU filled from ``tensors`` (or seeded random weights when None), then moved to ``device``."""
    model: AnyModel
    if isinstance(spec, DeepseekV3Spec):
        from dualpath.model.deepseek import DeepseekV3Model

        model = DeepseekV3Model(spec, device="cpu", backend=backend)
        if tensors is not None:  # (Kimi K2.5: its language model's tensors; Kimi's INT4 experts)
            tensors = deepseek_tensors(spec, mla_language_tensors(int4_dequantized(tensors, source)), source,
                                       fp8_block)
    else:
        from dualpath.model.llama import LlamaModel

        model = LlamaModel(spec, device="cpu", backend=backend)
        if tensors is not None:  # (an image-text checkpoint: its language model's tensors; EXAONE's names)
            tensors = codegen_tensors(exaone_tensors(gemma3_language_tensors(fp8_dequantized(
                int4_dequantized(tensors, source), source, fp8_block))), source)
        if tensors is not None and spec.architecture == "gpt_oss":
            tensors = gpt_oss_tensors(spec, tensors)
        elif tensors is not None and spec.architecture == "llama4_text":  # (MoE, in its own layout)
            tensors = lv.tensors_in(spec, tensors, source)
        elif tensors is not None and spec.is_moe:  # (ERNIE 4.5 MoE: its interleaved RoPE rows first)
            if spec.architecture in lv.VARIANT_ARCHS:
                tensors = lv.tensors_in(spec, tensors, source)
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
    if tensors is None:
        init_random(model, seed)
    else:
        assign_weights(model, tensors, source)
    return model.to(device).eval()


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
        if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:
        raise ModelError(f"{p}: cannot load the tokenizer ({exc})") from None
    return None


def load_model(config: LlamaModelConfig | None = None, device: str | torch.device = "cpu", *,
               path: str | Path | None = None, with_tokenizer: bool = True) -> tuple[AnyModel, Any | None]:
    """Build the model a :class:`~dualpath.model.config.LlamaModelConfig` names (``path`` overrides its path).

    ``path``: a checkpoint directory (safetensors or PyTorch ``.bin`` weights, sharded or not, with config.json), a ``.gguf`` file, a ``config.json``
    (with ``random_init``), or None for the embedded SmolLM2-135M-Instruct (converted once, cached).
    """
    from dualpath.model.config import LlamaModelConfig

    cfg = config or LlamaModelConfig()
    from dualpath.model.embedded import checkpoint_path

    p = checkpoint_path(path if path is not None else cfg.path)
    if not p.exists():
        raise ModelError(f"model path {p} does not exist")
    tokenizer = None
    spec: ModelSpec | DeepseekV3Spec
    fp8_block = (128, 128)
    if p.is_file() and p.suffix == ".gguf":
        if cfg.kv_format != "auto":
            raise ModelError(f"{p}: kv_format {cfg.kv_format!r} needs an MLA (DeepSeek-V2/V3) safetensors checkpoint")
        hf_cfg, tensors = read_gguf(p)
        spec = ModelSpec.from_hf_config(hf_cfg, dtype=cfg.dtype, max_context=cfg.max_context)
        weights_id = f"random:{cfg.seed}" if cfg.random_init else files_identity([p])
        model_tensors: Mapping[str, torch.Tensor] | None = None if cfg.random_init else tensors
    else:
        cfg_path = p if p.is_file() else p / "config.json"
        spec = load_spec(cfg_path, dtype=cfg.dtype, kv_format=cfg.kv_format, max_context=cfg.max_context)
        from dualpath.model.spec_common import read_hf_config

        hf_config = read_hf_config(cfg_path)[0]
        fp8_block = fp8_block_size(hf_config)
        if not cfg.random_init:  # (random weights have no quantization to read)
            check_quantization(hf_config, str(cfg_path))
        if cfg.random_init:
            model_tensors, weights_id = None, f"random:{cfg.seed}"
        else:
            files = weight_files(p if p.is_dir() else p.parent)
            model_tensors = read_weights_dir(p if p.is_dir() else p.parent)
            weights_id = files_identity(files)
    from dataclasses import replace

    spec = replace(spec, weights_id=weights_id)
    model = build_model(spec, model_tensors, seed=cfg.seed, device=device, backend=cfg.attention_backend,
                        source=str(p), fp8_block=fp8_block)
    if hasattr(model, "prefill_form"):  # MLA
        model.prefill_form = cfg.mla_prefill
    if with_tokenizer:
        tokenizer = load_tokenizer(p if p.is_dir() or p.suffix == ".gguf" else p.parent)
    return model, tokenizer
