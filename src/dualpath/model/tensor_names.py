"""Checkpoint tensor names per family: how a checkpoint's tensors become this project's (at load) and back (at
save, so transformers reads what ``save_pretrained`` writes). Fused projections split (Phi-3's ``qkv_proj`` and
``gate_up_proj``, GLM's ``gate_up_proj``, CodeGen's ``qkv_proj``), packed experts split (transformers' packed
``gate_up_proj``, Granite's ``input_linear``), the hub's Mixtral expert names, GLM's interleaved RoPE rows
permuted, and the parts of image-text and multi-token-prediction checkpoints that are not the decoder left out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from dualpath.errors import ModelError
from dualpath.model.mla_spec import DeepseekV3Spec
from dualpath.model.quant import _dequantized
from dualpath.model.spec import GROUP_ROUTER_ARCHS, ModelSpec

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


#: Sarvam-MoE's released names in a block -> GLM-4.5's (transformers' conversion of ``sarvam_moe``)
_SARVAM_NAMES = ((".attention.dense.", ".self_attn.o_proj."), (".attention.query_layernorm.", ".self_attn.q_norm."),
                 (".attention.key_layernorm.", ".self_attn.k_norm."),
                 (".mlp.gate.expert_bias", ".mlp.gate.e_score_correction_bias"))


def sarvam_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
                   source: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """A Sarvam-MoE checkpoint's released names (``model.word_embeddings``, ``attention.query_key_value`` fused
    ``[q | k | v]``, ``attention.dense``, ``query_layernorm`` / ``key_layernorm``, ``mlp.gate.expert_bias``) as
    GLM-4.5's, as transformers reads them; a checkpoint without them unchanged."""
    if "model.word_embeddings.weight" not in tensors and not any(".attention.query_key_value." in k for k in tensors):
        return tensors
    sizes = [spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("model.word_embeddings."):
            name = "model.embed_tokens." + name[len("model.word_embeddings."):]
        if ".attention.query_key_value." in name:
            if t.shape[0] != sum(sizes):
                raise ModelError(f"{source}: {name} has {t.shape[0]} rows, expected {sum(sizes)} (q, k, v: "
                                 f"{' + '.join(map(str, sizes))})")
            stem, kind = name.split(".attention.query_key_value.")
            for part, rows in zip(("q", "k", "v"), torch.split(t, sizes, dim=0), strict=True):
                out[f"{stem}.self_attn.{part}_proj.{kind}"] = rows
            continue
        for old, new in _SARVAM_NAMES:
            if old in name:
                name = name.replace(old, new)
                break
        out[name] = t
    return out


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


def deepseek_tensors(spec: DeepseekV3Spec, tensors: Mapping[str, torch.Tensor],
                     source: str = "checkpoint", fp8_block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 / V2 checkpoint tensors in this model's names: FP8 blocks dequantized, packed experts split,
    multi-token-prediction layers (``model.layers.{n >= num_hidden_layers}``) dropped, and the empty shared-expert
    tensors transformers' DeepseekV2 writes when ``n_shared_experts`` is 0 dropped. A.X-K1: ``post_mlp_layernorm`` on
    the decoder layer (or under ``mlp.``) kept for the MoE layers only, and missing correction biases zeros."""
    out: dict[str, torch.Tensor] = {}
    if spec.has_dsa:
        _check_indexer(spec, tensors, source)
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= spec.n_layers:
            continue
        if spec.post_moe_norm and name.endswith("post_mlp_layernorm.weight") and len(parts) > 3 \
                and parts[2].isdigit():
            if spec.is_moe_layer(int(parts[2])):  # (on the layer, as the released checkpoints and transformers store it)
                out[f"model.layers.{parts[2]}.post_mlp_layernorm.weight"] = t
            continue
        if spec.n_shared_experts == 0 and ".mlp.shared_experts." in name and t.numel() == 0:
            continue
        if name.endswith("weight_scale_inv"):
            continue
        t = _dequantized(name, t, tensors, source, fp8_block)
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    if spec.post_moe_norm:  # A.X-K1's released checkpoints route without correction biases: zeros, as transformers
        for layer in range(spec.n_layers):
            bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
            if spec.is_moe_layer(layer) and bias not in out:
                out[bias] = torch.zeros(spec.n_routed_experts)
    return out


def _check_indexer(spec: DeepseekV3Spec, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every layer of a DeepSeek-V3.2 checkpoint has its lightning indexer, shaped as the config says."""
    h, d = spec.index_n_heads, spec.index_head_dim
    # (Mistral Large 4's indexer queries come from the hidden state: its attention has no query LoRA)
    shapes = {"wq_b.weight": (h * d, spec.q_lora_rank or spec.hidden_size), "wk.weight": (d, spec.hidden_size), "k_norm.weight": (d,),
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


#: GraniteMoE's hub names -> transformers 5's (GraniteMoeSWA checkpoints have only these)
_GRANITE_MOE_V5_NAMES = {".block_sparse_moe.input_linear.weight": ".block_sparse_moe.experts.gate_up_proj",
                         ".block_sparse_moe.output_linear.weight": ".block_sparse_moe.experts.down_proj",
                         ".block_sparse_moe.router.layer.weight": ".block_sparse_moe.router.weight"}


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
#: Flint's and Kolibri 1's tensor names -> ours (the sinks; Kolibri 1's router bias, GLM-4's output norms and its
#: shared experts under Qwen2-MoE's name)
_FLINT_NAMES = {".self_attn.softmax_offset": ".self_attn.sinks"}
_KOLIBRI1_NAMES = {".moe.router.expert_bias": ".mlp.gate.e_score_correction_bias",
                   ".post_attn_norm.": ".post_self_attn_layernorm.", ".post_ffn_norm.": ".post_mlp_layernorm.",
                   ".mlp.shared_experts.": ".mlp.shared_expert."}
#: Hy3 (hy_v3) tensor names -> ours: Trinity's for the router and its bias, its own for the shared experts
_HY_V3_NAMES = {".mlp.expert_bias": ".mlp.gate.e_score_correction_bias", ".mlp.router.gate.": ".mlp.gate.",
                ".mlp.shared_mlp.": ".mlp.shared_experts."}
#: each family's own tensor names -> ours, renamed both ways by moe_tensors / tensors_out
_RENAMED = {"afmoe": _AFMOE_NAMES, "hy_v3": _HY_V3_NAMES, "flint": _FLINT_NAMES, "kolibri1": _KOLIBRI1_NAMES,
            "cohere2_moe": {".mlp.shared_experts.": ".mlp.shared_expert."},
            "aria_text": {".mlp.shared_experts.": ".mlp.shared_expert.", ".mlp.router.": ".mlp.gate."}}
#: Aria's experts as its checkpoints store them (``x @ w``: ``fc1 [E, H, 2I]``, gate columns then up; ``fc2 [E, I,
#: H]``; transformers keeps the same layout in memory under its packed names) -> transformers' packed ``w @ x`` names
_ARIA_EXPERTS = {".mlp.experts.fc1.weight": ".mlp.experts.gate_up_proj", ".mlp.experts.fc2.weight": ".mlp.experts.down_proj",
                 ".mlp.experts.gate_up_proj": ".mlp.experts.gate_up_proj",
                 ".mlp.experts.down_proj": ".mlp.experts.down_proj"}


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
        if spec.architecture in ("granitemoe", "granitemoeshared", "granitemoe_swa") \
                and _granite_moe_in(name, t, out, source):
            continue
        for theirs, ours in _RENAMED.get(spec.architecture, {}).items():  # each family's own names (Trinity, Hy3, ...)
            name = name.replace(theirs, ours)
        if spec.architecture in ("minimax_m2", "exaone_moe", "hy_v3") and name.endswith(("mlp.e_score_correction_bias",
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
        if spec.architecture == "qwen3_moe":
            t = _qwen3_vl_moe_experts(spec, name, t)
        if spec.architecture == "aria_text":
            for theirs, ours in _ARIA_EXPERTS.items():
                if name.endswith(theirs) and t.dim() == 3:
                    name, t = name[: -len(theirs)] + ours, t.transpose(1, 2)
                    break
        if not _split_packed_experts(name, t, out, source):
            out[name] = t
    return out


def _qwen3_vl_moe_experts(spec: ModelSpec, name: str, t: torch.Tensor) -> torch.Tensor:
    """A packed expert tensor in Qwen3-VL-MoE's hub layout (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``:
    ``x @ w``) as transformers' in-memory one (``[E, 2I, H]``, ``[E, H, I]``); as transformers does, it is
    transposed only when its shape is not already the in-memory one (so a square ``H == 2I`` reads as saved by
    transformers). Any other tensor unchanged."""
    e, h, i = spec.n_experts, spec.hidden_size, spec.moe_intermediate_size
    if name.endswith(".mlp.experts.gate_up_proj"):
        want = (e, 2 * i, h)
    elif name.endswith(".mlp.experts.down_proj"):
        want = (e, h, i)
    else:
        return t
    if t.dim() == 3 and tuple(t.shape) != want and tuple(t.shape) == (e, want[2], want[1]):
        return t.transpose(1, 2)
    return t


#: where image-text checkpoints keep the language model (transformers >= 4.52 and <= 4.51; Idefics 2 / 3 and
#: SmolVLM: ``model.text_model.``; Qwen Omni: ``thinker.``; Emu3: ``text_model.``), and the vision parts a text
#: model leaves
_GEMMA3_LM_PREFIXES = (("model.language_model.lm_head.", "lm_head."),  # (HyperCLOVA X Vision's untied head)
                       ("model.language_model.", "model."), ("language_model.model.", "model."),
                       ("language_model.lm_head.", "lm_head."), ("model.text_model.", "model."),
                       ("thinker.model.", "model."), ("thinker.lm_head.", "lm_head."),
                       ("text_model.model.", "model."), ("text_model.lm_head.", "lm_head."))
_GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.", "visual.", "model.visual.", "vision_model.",
                           "model.vision_model.", "audio_tower.", "model.audio_tower.", "mlp_AR.", "vit.",
                           "resampler_model.", "model.resampler_model.", "model.embed_tokens_extend.")


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


#: Qianfan-OCR's language-model layers as transformers 5 writes them
_QIANFAN_LAYERS = (("model.encoder.layers.", "model.layers."),)


def gemma3_language_tensors(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """An image-text checkpoint's language-model tensors under its text architecture's names (every image-text
    family :func:`dualpath.model.hf_config.text_model_config` reads); a text checkpoint's tensors unchanged. Where
    the language model sits under its own prefix (:data:`_GEMMA3_LM_PREFIXES`), only it and the LM head are kept:
    whatever else the checkpoint holds (vision tower, projector, Janus' image-generation head) is left out. Older
    checkpoints that keep it at the text model's names (Qwen2-VL as transformers 4 wrote it) lose their vision
    parts by name (:data:`_GEMMA3_VISION_PREFIXES`). Qianfan-OCR's decoder layers may sit at ``encoder.layers``
    (transformers 5 writes its vision tower's renaming back onto the language model too, and reads either)."""
    lm = tuple(p for p, _ in _GEMMA3_LM_PREFIXES)
    if any(k.startswith(lm) for k in tensors):
        return {_renamed(_renamed(name, _GEMMA3_LM_PREFIXES), _QIANFAN_LAYERS): t for name, t in tensors.items()
                if name.startswith((*lm, "lm_head."))}
    if not any(k.startswith(_GEMMA3_VISION_PREFIXES) for k in tensors):
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


#: NVIDIA Cosmos 3's unified checkpoints: the generator (image / video diffusion) tower's parameters interleaved
#: with the reasoner's (its MoT attention and MLP "moe_gen" copies, cross-modal projections) and its sound / action
#: towers, which transformers does not load either (its ``_keys_to_ignore_on_load_unexpected``)
_COSMOS3_UNLOADED = re.compile(
    r"(\.add_[qkv]_proj\.|\.to_add_out\.|\.norm_added_[qk]\.|\.k_norm_und_for_gen\.|moe_gen|"
    r"^(model\.language_model\.)?(proj_(in|out)|time_embedder|audio_proj_(in|out)|action_proj_(in|out))\.|"
    r"^(model\.language_model\.)?(audio|action)_modality_embed$)")
_COSMOS3_ARCHS = ("Cosmos3OmniForConditionalGeneration", "Cosmos3EdgeForConditionalGeneration")


#: Cosmos 3's reasoner as its checkpoints name it (Diffusers-style attention) -> the text model's names
_COSMOS3_NAMES = ((".self_attn.to_q.", ".self_attn.q_proj."), (".self_attn.to_k.", ".self_attn.k_proj."),
                  (".self_attn.to_v.", ".self_attn.v_proj."), (".self_attn.to_out.", ".self_attn.o_proj."),
                  (".self_attn.norm_q.", ".self_attn.q_norm."), (".self_attn.norm_k.", ".self_attn.k_norm."),
                  (".mlp.fc1.", ".mlp.up_proj."), (".mlp.fc2.", ".mlp.down_proj."))


def cosmos3_language_tensors(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
                             ) -> Mapping[str, torch.Tensor]:
    """A Cosmos 3 checkpoint's reasoner (its language model) under the text model's names: at the top level
    (``embed_tokens.``, ``layers.``, ``norm.``, as its checkpoints keep it) or under ``model.language_model.``, its
    Diffusers-style attention names read as ours, Cosmos 3 Edge's MLP ``fc1`` / ``fc2`` as the ReLU-squared MLP it
    runs as (Arcee's ``up_proj`` / ``down_proj``); the vision tower and the generator, sound and action towers
    (:data:`_COSMOS3_UNLOADED`) left out, as transformers leaves them. Any other checkpoint's tensors unchanged."""
    archs = hf_config.get("architectures") or []
    if not any(a in _COSMOS3_ARCHS for a in archs):
        return tensors
    out = {}
    for name, t in tensors.items():
        if _COSMOS3_UNLOADED.search(name):
            continue
        if name.startswith(("embed_tokens.", "layers.", "norm.")):
            name = "model." + name
        elif name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        elif not name.startswith("lm_head."):
            continue  # (the vision tower and its projector)
        for theirs, ours in _COSMOS3_NAMES:
            name = name.replace(theirs, ours)
        out[name] = t
    return out


#: Kimi K2.5's vision parts, left out of its language model
_KIMI_VISION_PREFIXES = ("vision_tower.", "mm_projector.", "model.vision_tower.", "model.mm_projector.",
                         "vit.")  # (Hy4-VL's tower, under its released name)


def mla_language_tensors(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A Kimi K2.5 checkpoint's language-model tensors under DeepSeek-V3's names: ``language_model.model.`` (and
    ``model.language_model.``) -> ``model.``, its decoder layers as ``model.layers.`` (transformers writes them as
    ``blocks``), ``language_model.lm_head.`` -> ``lm_head.``; the vision tower and projector left out. A text
    checkpoint's tensors unchanged."""
    if not any(k.startswith(("language_model.", "model.language_model.", "vit.")) for k in tensors):
        return tensors
    return _language_model(tensors, _KIMI_VISION_PREFIXES, (("model.blocks.", "model.layers."),))


def gpt_oss_tensors(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A gpt-oss checkpoint's tensors with its MXFP4 experts (``*_blocks`` / ``*_scales``, as OpenAI publishes
    them) dequantized to the dense parameters; a dense checkpoint's unchanged."""
    if not any(name.endswith(("_blocks", "_scales")) for name in tensors):
        return tensors
    from dualpath.model.mxfp4 import gpt_oss_dense_experts

    return gpt_oss_dense_experts(dict(tensors), spec.torch_dtype)


def tensors_out(spec: ModelSpec | DeepseekV3Spec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensor names -> the checkpoint's, as transformers reads them (what ``save_pretrained`` writes): the
    inverse of the readers above for every family that names its tensors otherwise."""
    from dualpath.model import llama_variants as lv

    arch = getattr(spec, "architecture", "")
    out = tensors
    if arch in ("mixtral", "phimoe"):
        out = {_mixtral_hub_name(k): v for k, v in out.items()}
    if arch == "minimax_m2":  # Mixtral's hub names, the bias on the block
        out = {_mixtral_hub_name(k.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias")): v
               for k, v in out.items()}
    if arch == "exaone_moe":  # (the bias on the block, as K-EXAONE stores it)
        out = {k.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"): v for k, v in out.items()}
    if arch in ("granitemoe", "granitemoeshared"):
        out = _granite_moe_hub_tensors(out)
    elif arch == "granitemoe_swa":  # (transformers' own names: no hub ones)
        out = _suffixes_renamed(_granite_moe_hub_tensors(out), _GRANITE_MOE_V5_NAMES)
    for theirs, ours in _RENAMED.get(arch, {}).items():
        out = {k.replace(ours, theirs): v for k, v in out.items()}
    if getattr(spec, "peri_norms", None):
        out = _suffixes_renamed(out, {ours: theirs for theirs, ours in _PERI_NAMES.items()})
    if arch == "mistral4":  # (transformers reads Mistral 4's experts packed only)
        out = _packed_experts(out)
    if arch in ("hy_v4", "hy_v4_vl_text"):  # (experts packed; the released names, as transformers writes them)
        from dualpath.model.hy_v4 import tensors_out as hy_v4_out

        out = hy_v4_out(out)
    if arch == "mistral_large4_text":  # (the released names, experts one by one, as transformers writes them)
        from dualpath.model.mistral_large4 import tensors_out as mistral_large4_out

        out = mistral_large4_out(out)
    if arch == "longcat_flash":  # (the zero experts' unused gate / up projections, which transformers reads)
        from dualpath.model.longcat_flash import tensors_out as longcat_out

        out = longcat_out(spec, out)  # type: ignore[arg-type]
    if arch == "modernbert-decoder":  # (its embeddings', final norm's, prediction head's and decoder's names)
        from dualpath.model.modernbert_decoder import tensors_out as modernbert_out

        out = modernbert_out(out)
    if arch in ("kimi_linear", "bailing_hybrid"):  # (Kimi's Mixtral-named MoE blocks; Bailing's names)
        from dualpath.model.kimi_linear import tensors_out as kimi_linear_out

        out = kimi_linear_out(spec, out)  # type: ignore[arg-type]
    if arch == "glm5_next_text":  # (Kimi Linear's KDA names; the image-text checkpoint's language model)
        from dualpath.model.glm5_next import tensors_out as glm5_next_out
        from dualpath.model.kimi_linear import tensors_out as kda_out

        out = glm5_next_out(kda_out(spec, out))  # type: ignore[arg-type]
    if arch == "rwkv":  # (its rwkv.* and head names)
        from dualpath.model.rwkv import tensors_out as rwkv_out

        out = rwkv_out(out)
    if arch == "zamba":  # (its final_layernorm)
        from dualpath.model.zamba import tensors_out as zamba_out

        out = zamba_out(out)
    if arch == "zamba2":  # (its final_layernorm)
        from dualpath.model.zamba2 import tensors_out as zamba2_out

        out = zamba2_out(spec, out)  # type: ignore[arg-type]
    if arch == "dory":  # (its backbone / embeddings / g_proj names)
        from dualpath.model.dory import tensors_out as dory_out

        out = dory_out(out)
    if arch == "deepseek_v4":  # (the released checkpoints' names, as transformers writes them)
        from dualpath.model.deepseek_v4 import tensors_out as deepseek_v4_out

        out = deepseek_v4_out(out)
    if arch == "recurrent_gemma":  # (its final_norm)
        from dualpath.model.recurrent_gemma import tensors_out as recurrent_gemma_out

        out = recurrent_gemma_out(out)
    if arch == "lara_mini":  # (its fused in_proj, out_norm, packed experts)
        from dualpath.model.lara_mini import tensors_out as lara_mini_out

        out = lara_mini_out(out)
    if arch == "olmo_hybrid":  # (its linear layers' separate projections)
        from dualpath.model.olmo_hybrid import tensors_out as olmo_hybrid_out

        out = olmo_hybrid_out(spec, out)  # type: ignore[arg-type]
    if arch == "minimax":  # (transformers' saved decay buffers)
        from dualpath.model.minimax import tensors_out as minimax_out

        out = minimax_out(spec, out)  # type: ignore[arg-type]
    if arch == "falcon_h1":  # (its final_layernorm)
        from dualpath.model.falcon_h1 import tensors_out as falcon_h1_out

        out = falcon_h1_out(out)
    if arch == "jamba":  # (its final_layernorm)
        from dualpath.model.jamba import tensors_out as jamba_out

        out = jamba_out(out)
    if arch == "bamba":  # (its final_layernorm)
        from dualpath.model.granite_hybrid import tensors_out as granite_hybrid_out

        out = granite_hybrid_out(spec, out)  # type: ignore[arg-type]
    if arch in ("nemotron_h", "mamba2", "mamba", "falcon_mamba"):  # (their backbone.* names)
        from dualpath.model.nemotron_h import tensors_out as nemotron_h_out

        out = nemotron_h_out(out)
    if arch in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):  # (Qwen3-Next's packed projections)
        from dualpath.model.qwen_hybrid import tensors_out as hybrid_out

        out = hybrid_out(spec, out)  # type: ignore[arg-type]
    if arch == "qwen4_exp_text":  # (the n-gram tables' shards and hash buffers)
        from dualpath.model.qwen4_exp import tensors_out as qwen4_exp_out

        out = qwen4_exp_out(spec, out)  # type: ignore[arg-type]
    if arch in ("muse_glimmer_text", "muse_spark_text"):  # (the image-text model's names: model.language_model.)
        from dualpath.model.muse_glimmer import tensors_out as muse_glimmer_out

        out = muse_glimmer_out(out)
    if arch == "deepseek_ocr2_text":  # (the image-text model's in-memory names: language_model, experts packed)
        from dualpath.model.deepseek_ocr2 import tensors_out as deepseek_ocr2_out

        out = deepseek_ocr2_out(out)
    if arch == "git":  # (BERT's names under git.*; the head is output.*)
        from dualpath.model import git

        return git.tensors_out(out)
    if arch == "kosmos2_5_text":  # (the image-text model's text_model.*, its final norm model.layer_norm)
        from dualpath.model import kosmos2_5

        return kosmos2_5.tensors_out(out)
    if arch == "molmo2_text":  # (the released layout, fused att_proj / ff_proj, as transformers writes it)
        from dualpath.model import molmo2

        return molmo2.tensors_out(cast(molmo2.Molmo2Spec, spec), out)
    if arch == "hrm_text":  # (the released fused gqkv_proj / gate_up_proj)
        from dualpath.model.hrm_text import tensors_out as hrm_text_out

        out = hrm_text_out(out)
    if arch == "step3p5":  # (the released layout: experts stacked, moe.* and share_expert.*)
        from dualpath.model.step3p7 import tensors_out as step3p7_out

        out = step3p7_out(out)
    if arch == "minimax_m3_vl_text":  # (the text model's names: experts packed)
        from dualpath.model.minimax_m3 import tensors_out as minimax_m3_out

        out = minimax_m3_out(out)
    if arch == "laguna":  # (the hub's shared-expert and correction-bias names)
        from dualpath.model.laguna import tensors_out as laguna_out

        out = laguna_out(out)
    if arch == "mimo_v2_flash":  # (the hub's name of its sliding layers' sinks)
        out = {k.replace(".self_attn.sinks", ".self_attn.attention_sink_bias"): v for k, v in out.items()}
    if arch == "aria_text":  # (its checkpoints' x @ w experts)
        out = {k.replace(".mlp.experts.gate_up_proj", ".mlp.experts.fc1.weight")
               .replace(".mlp.experts.down_proj", ".mlp.experts.fc2.weight"): v.transpose(1, 2).contiguous()
               if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) else v
               for k, v in _packed_experts(out).items()}
    if arch == "phi3":
        out = _fuse_phi3(out)
    if arch in ("glm", "glm4"):
        out = _glm_hub_tensors(spec, out)  # type: ignore[arg-type]
    if getattr(spec, "layer_norm", False):  # GPT-2, GPT-NeoX, Phi, StableLM, StarCoder 2: their own names
        from dualpath.model.layernorm_family import tensors_out as layernorm_tensors_out

        out = layernorm_tensors_out(spec, out)  # type: ignore[arg-type]
    if arch in lv.VARIANT_ARCHS:  # the one-twist Llamas and Llama 4
        out = lv.tensors_out(spec, out)  # type: ignore[arg-type]
    return out
