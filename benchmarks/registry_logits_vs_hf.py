"""Every model type of transformers' causal-LM and image-text registries that runs here, shrunk and compared with
transformers' logits.

``hf_registry_coverage.py`` checks that a spec is built from each type's default config; the tests and
``random_configs_vs_hf.py`` compare logits for the families they name. This sweeps the rest: each type's default
config (``AutoConfig.for_model``) is shrunk by one generic rule (widths, layer counts, heads, experts, vocabulary and
the per-layer lists cut to the new layer count, in its own config's key names and in every sub-config), built by
transformers with its weights widened so that every one matters (matrices x3, norms and biases moved off their
init), written by its ``save_pretrained`` and read by :func:`dualpath.model.loader.load_model`; a 17-token prompt is
prefilled over paged KV in two chunks, then one decode step, and both compared with transformers' forward (its
language model's where that forward cannot run on text alone: :func:`reference_logits`). A composite type that a
causal-LM class is registered for with its text config (Qwen 3.5) runs as its image-text class.

A row is ``ok`` within 1e-3 of the logit range, ``mismatch`` otherwise; ``shrink refused`` when transformers (or
our reader) refuses the shrunk config (a family whose keys the generic rule does not fit; the family's own tests
cover it), ``load failed`` when transformers built and saved a model we cannot read, ``transformers cannot read its
save`` when transformers' own ``from_pretrained`` misses weights of what it wrote too (ShieldGemma 2 as the
image-text class). Nothing downloads. Run:
``python benchmarks/registry_logits_vs_hf.py [--types llama,gpt2] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

V = 97
#: the generic shrink: each key, wherever a config (or sub-config) has it, set to this value
_SIZES: dict[str, int] = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "embed_dim": 64, "dim": 64, "model_dim": 64,
    "intermediate_size": 96, "ffn_dim": 96, "n_inner": 96, "ffn_hidden_size": 96, "dim_ff": 96,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "attention_heads": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 96, "encoder_layers": 1,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16,
    "vocab_size": V, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "seq_length": 128,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 48,
    "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2,
    "sliding_window": 6, "window_size": 6, "attention_window_size": 6,
    # (a sub-config's width where it meets the text model: the connector's output, the adapter's input)
    "out_hidden_size": 64, "text_hidden_size": 64, "adapter_out_dim": 64,
    # (Gemma 3n's / Gemma 4's per-layer embeddings: 262,144 x 256 per layer otherwise, 200M parameters at 3 layers;
    # LongCat-Flash's expert width)
    "vocab_size_per_layer_input": V, "hidden_size_per_layer_input": 16, "expert_ffn_hidden_size": 32,
}
#: a per-layer override's sizes (``per_layer_config``): kept apart from the base sizes, so an override still differs
_LAYER_SIZES: dict[str, int] = {"num_attention_heads": 2, "num_key_value_heads": 1, "kv_lora_rank": 48,
                                "qk_nope_head_dim": 24, "head_dim": 32}
#: the special token ids moved into the new vocabulary (to their index here: ids 0-4, below every prompt id) when
#: past it (image and other marker ids are kept: a text prompt never holds them)
_SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "layers")
_LAYERS = 3
#: text models whose M-RoPE sections the class defaults when the config names none (set to the new head here),
#: with their number of sections
_MROPE_TYPES = {"qwen2_vl_text": 3, "qwen2_5_vl_text": 3, "glm4v_text": 3, "glm4v_moe_text": 3, "glm_ocr_text": 3,
                "paddleocr_vl_text": 3, "qwen2_5_omni_text": 3, "ernie4_5_vl_moe_text": 3, "hunyuan_vl_text": 4}


def shrink(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every size of :data:`_SIZES` set, layer counts set to :data:`_LAYERS` and each list as long as
    the old layer count cut to the new one; the special token ids past the new vocabulary dropped; applied to every
    sub-config (``text_config``, ``vision_config``, ...)."""
    out = dict(cfg)
    old = next((out[k] for k in _LAYER_KEYS if isinstance(out.get(k), int) and not isinstance(out.get(k), bool)), None)
    for key in _LAYER_KEYS:
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = _LAYERS
    for key, value in list(out.items()):
        if key in ("id2label", "label2id") or not isinstance(key, str):
            continue
        if isinstance(value, dict):
            out[key] = shrink(value)
        elif key in _SIZES and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, _SIZES[key]) if key in ("sliding_window", "window_size") else _SIZES[key]
        elif isinstance(value, list) and old is not None and len(value) == old and old != _LAYERS:
            out[key] = value[-_LAYERS:]  # (the last layers: a pattern ending in a full layer keeps it)
            if key in _SIZES and all(isinstance(v, int) for v in value):  # (Gemma 3n's per-layer widths)
                out[key] = [_SIZES[key]] * _LAYERS
        elif key in _SPECIAL and isinstance(value, int) and value >= V:  # (a small id: some classes need an int)
            out[key] = _SPECIAL.index(key)
        elif key in _SPECIAL and isinstance(value, list):
            out[key] = [v for v in value if isinstance(v, int) and v < V] or None
    if isinstance(out.get("num_attention_heads"), int) and isinstance(out.get("num_key_value_heads"), int):
        out["num_key_value_heads"] = min(out["num_key_value_heads"], out["num_attention_heads"])
    if isinstance(out.get("kv_lora_rank"), int):  # (MLA: its latent and head widths, RoPE part of the head;
        rope_dim = 8 if cfg.get("qk_rope_head_dim") != 0 else 0  # a NoPE one stays NoPE: GLM-5-Next's DSA layers)
        out.update(kv_lora_rank=32, qk_rope_head_dim=rope_dim, qk_nope_head_dim=16, v_head_dim=16, head_dim=rope_dim)
        if isinstance(out.get("num_key_value_heads"), int):  # (every head reads the latent)
            out["num_key_value_heads"] = out.get("num_attention_heads", 4)
        if isinstance(out.get("q_lora_rank"), int):
            out["q_lora_rank"] = 24
        if "qk_head_dim" in out:
            out["qk_head_dim"] = 16 + rope_dim
        for key, value in (("index_head_dim", 16), ("index_n_heads", 16), ("index_topk", 8)):
            if key in out:
                out[key] = value
    if isinstance(out.get("hybrid_layer_ids"), list) and isinstance(out.get("layers_block_type"), list):  # (Zamba2)
        out["hybrid_layer_ids"] = [i for i, t in enumerate(out["layers_block_type"]) if t == "hybrid"]
    if isinstance(out.get("first_k_dense_replace"), int):  # (one dense layer first, as the layer list says)
        out["first_k_dense_replace"] = 1
        if isinstance(out.get("mlp_layer_types"), list):
            out["mlp_layer_types"] = ["dense"] + ["sparse"] * (_LAYERS - 1)
    for group in ("n_group", "num_expert_group"):  # (groups of the 4 experts)
        if isinstance(out.get(group), int) and out[group] > 1:
            out.update({group: 2, "topk_group": 1})
    if "head_dim" in out and out["head_dim"] is None and isinstance(out.get("num_attention_heads"), int):
        out["head_dim"] = 16  # (a class that derives no head width from a null one: HunYuan, Ministral)
    if "num_experts_per_tok" in out and out["num_experts_per_tok"] is None and "n_routed_experts" in out:
        out["num_experts_per_tok"] = 2  # (DeepSeek-V2's class default, null, which its own router cannot take)
    if "num_key_value_heads" in out and out["num_key_value_heads"] is None and "num_attention_heads" in out:
        out["num_key_value_heads"] = 2  # (Nemotron's class default, null, which its own attention cannot take)
    for key in ("rope_parameters", "rope_scaling"):  # (M-RoPE sections: half the new rotated width)
        rope = out.get(key)
        if isinstance(rope, dict) and (isinstance(rope.get("mrope_section"), list) and rope["mrope_section"]
                                       or out.get("model_type") in _MROPE_TYPES):
            n = len(rope.get("mrope_section") or [0] * _MROPE_TYPES[out["model_type"]])
            half = int(int(out.get("head_dim") or 16) * rope.get("partial_rotary_factor", 1.0)) // 2
            sections = [half - (n - 1) * (half // n)] + [half // n] * (n - 1)
            if out.get("model_type") == "ernie4_5_vl_moe_text":  # (ERNIE: height and width alike, time the rest)
                sections = [(half - half // 4) // 2] * 2 + [half - 2 * ((half - half // 4) // 2)]
            out[key] = {**rope, "mrope_section": sections}
    if isinstance(out.get("moe_layers"), list) and old is not None:  # (layer indices: those left, else the last)
        out["moe_layers"] = [i for i in out["moe_layers"] if isinstance(i, int) and i < _LAYERS] or [_LAYERS - 1]
    if isinstance(out.get("rotary_dim"), int) and out["rotary_dim"] > 16:  # (within the new head)
        out["rotary_dim"] = 8
    if isinstance(out.get("per_layer_config"), dict) and old is not None:  # (the overrides of the layers left: the
        out["per_layer_config"] = {  # last ones, as the per-layer lists keep them, renumbered and shrunk)
            str(int(k) - (old - _LAYERS)).zfill(len(str(k))): _layer_override(v)
            for k, v in cfg["per_layer_config"].items()
            if str(k).isdigit() and old - _LAYERS <= int(k) < old and isinstance(v, dict)}
        nope = [v["qk_nope_head_dim"] for v in out["per_layer_config"].values() if "qk_nope_head_dim" in v]
        if str(out.get("model_type")).startswith("dots3_note") and nope:  # (its class: the sliding layers' head
            out["head_dim"] = nope[0] + out["qk_rope_head_dim"]  # is their own nope + RoPE widths)
    if isinstance(out.get("kv_source_layers"), list) and old is not None:  # (layer indices, renumbered as the
        out["kv_source_layers"] = [i - (old - _LAYERS) for i in out["kv_source_layers"]]  # layers are)
    if isinstance(out.get("rope_scaling_layers"), list) and cfg.get("rope_scaling_layers") == list(range(old or 0)):
        out["rope_scaling_layers"] = list(range(_LAYERS))  # (Molmo 2: every layer, as before)
    if isinstance(out.get("vision_feature_layer"), list):  # (layers of the shrunk vision tower: the last, then up)
        out["vision_feature_layer"] = [_LAYERS - 1 - i for i in range(len(out["vision_feature_layer"]))]
    if isinstance(out.get("codebook_dim"), int) and "hidden_size" in out:  # (WavTokenizer: no projection around
        out["codebook_dim"] = out["hidden_size"]  # its quantizer)
    if all(isinstance(out.get(k), int) for k in ("n_input_layers", "n_recurrent_layers", "n_output_layers")):
        # (Dory: the 3 layers, one of each stage; its config lists attention and MLP as blocks, two per layer)
        blocks = "mlp" in (cfg.get("layer_types") or [])
        out.update(dict.fromkeys(("n_input_layers", "n_recurrent_layers", "n_output_layers"), 1 + blocks),
                   num_hidden_layers=_LAYERS * (1 + blocks))
        if blocks:
            out["layer_types"] = cfg["layer_types"][-2 * _LAYERS:]
    for key in ("adapter_in_dim", "adapter_input_size"):  # (dots.3-note's adapters read their own tower's width)
        if isinstance(out.get(key), int) and isinstance(out.get("hidden_size"), int):
            out[key] = out["hidden_size"]
    if all(isinstance(out.get(k), int) for k in ("image_token_offset", "audio_token_offset")):
        # (Apertus 1.5: image then audio codebooks, 8 ids each, at the top of the new vocabulary)
        for sub in ("vision_config", "audio_config"):
            if isinstance(out.get(sub), dict) and "codebook_size" in out[sub]:
                out[sub] = {**out[sub], "codebook_size": 8}
        out.update(image_token_offset=V - 16, audio_token_offset=V - 8)
    if "vocabulary_map" in out and not out["vocabulary_map"]:  # (Chameleon's and Emu3's image-token names: two
        out["vocabulary_map"] = {  # image tokens, the image placeholder and Emu3's end-of-line, at the vocabulary's top)
            "IMGIMGBA": V - 6, "IMGIMGBB": V - 5, "<|visual token 000000|>": V - 6, "<|visual token 000001|>": V - 5,
            "<image>": V - 2, "<|extra_200|>": V - 1}
    if isinstance(out.get("attn_config"), dict) and "rope_theta" not in out["attn_config"]:  # (DBRX's attention
        theta = (out.get("rope_parameters") or {}).get("rope_theta", 10000.0)  # reads its base there, as released
        out["attn_config"] = {**out["attn_config"], "rope_theta": theta}  # configs write it; to_dict drops it;
        if out["attn_config"].get("clip_qkv") is None:  # its forward clamps to clip_qkv, which must be set: 8 as
            out["attn_config"]["clip_qkv"] = 8.0  # released)
    if "deepstack_layer_map" in out and out["deepstack_layer_map"] is None:  # (Granite 4 Vision: the last vision
        out.update(deepstack_layer_map=[[-1, 0]], spatial_target_layers=[0, 1, 2, 2],  # layer into the first text
                   downsample_rate=out.get("downsample_rate") or "1/4")  # layer, its 4 spatial groups into the 3)
    if out.get("model_type") == "zaya":  # (its class routes each token to one expert only)
        out["num_experts_per_tok"] = 1
    if isinstance(out.get("indexer_types"), list) and old is not None and isinstance(cfg.get("indexer_types"), list):
        out["indexer_types"] = cfg["indexer_types"][:_LAYERS]  # (the first layer selects, the others may share)
    if isinstance(out.get("v_head_dim"), int) and "kv_lora_rank" not in out and out["v_head_dim"] > 16:
        out["v_head_dim"] = 16
    if out.get("model_type") == "deepseek_v4":  # (one shared key/value head)
        out["num_key_value_heads"] = 1
    if isinstance(out.get("attention_hidden_size"), int):  # (Zamba's shared block reads [hidden, embeddings])
        out["attention_hidden_size"] = 128 if str(out.get("model_type")).startswith("zamba") else 64
    if isinstance(out.get("mamba_d_head"), int):  # (Mamba-2 heads of 16 filling mamba_expand x hidden)
        out.update(mamba_n_heads=int(out.get("mamba_expand", 2)) * 64 // 16, mamba_d_head=16, mamba_n_groups=1,
                   mamba_d_state=16, mamba_chunk_size=8)
        if isinstance(out.get("mamba_d_ssm"), int):  # (Falcon-H1 names the inner width the heads fill)
            out["mamba_d_ssm"] = out["mamba_n_heads"] * 16
    if out.get("model_type") == "mamba2":
        out.update(num_heads=int(out.get("expand", 2)) * 64 // 16, head_dim=16, n_groups=1, state_size=16,
                   chunk_size=8)
    if isinstance(out.get("num_kv_shared_layers"), int):  # (Gemma 3n: the last layer reads an earlier one's KV)
        out["num_kv_shared_layers"] = 1
        if isinstance(out.get("layer_types"), list):  # (of a kind an earlier layer writes)
            out["layer_types"] = ["sliding_attention", "full_attention", "full_attention"]
    if isinstance(out.get("index_kpool"), int):  # (GLM-5.3-Flash: pools of 4, a top-k of two pools)
        out.update(index_kpool=4, index_topk=8)
    if isinstance(out.get("attention_types"), list):  # (GPT-Neo: global, local, global)
        out.update(attention_types=[[["global", "local"], 1], [["global"], 1]],
                   attention_layers=["global", "local", "global"])
    if isinstance(out.get("num_layers_per_stack"), int):  # (HRM-Text: 1 layer x 1 H-cycle x (2 L-cycles + 1))
        out.update(num_layers_per_stack=1, H_cycles=1, L_cycles=2, L_bp_cycles=[2])
    if out.get("model_type") == "lfm2_moe" and out.get("layer_types") is None:  # (its class leaves them null)
        out["layer_types"] = ["conv", "full_attention", "conv"]
    if out.get("model_type") == "step3p5" and out.get("sliding_window") is None:  # (its default names no window,
        out.update(sliding_window=6,  # which transformers' masks need; a sliding layer between full ones)
                   layer_types=["full_attention", "sliding_attention", "full_attention"])
    rope = out.get("rope_parameters")
    if isinstance(out.get("kv_lora_rank"), int) and isinstance(rope, dict) and rope.get("partial_rotary_factor"):
        out["head_dim"] = int(out["qk_rope_head_dim"] / rope["partial_rotary_factor"])  # (Mistral 4: RoPE part)
    plc, kinds = out.get("per_layer_config"), out.get("layer_types")
    if isinstance(plc, dict) and plc and isinstance(kinds, list):  # (every layer of a kind takes that kind's
        width = len(next(iter(plc)))  # override: Gemma 4 asks its full layers to agree)
        for kind in set(kinds):
            over = next((plc[k] for k in plc if int(k) < len(kinds) and kinds[int(k)] == kind), None)
            plc.update({str(i).zfill(width): over for i, t in enumerate(kinds) if t == kind and over is not None})
    if out.get("model_type") == "zamba":  # (two hybrid layers: its class ties the second's shared block to the
        out["layers_block_type"] = ["linear_attention", "hybrid", "hybrid"]  # first's, and refuses one alone)
    if out.get("model_type") == "zamba2":  # (widths its class derives from the sizes: derived again)
        for key in ("attention_head_dim", "mamba_headdim", "kv_channels", "num_query_groups"):
            out.pop(key, None)
    return out


def _layer_override(over: dict[str, Any]) -> dict[str, Any]:
    """One ``per_layer_config`` entry with its sizes from :data:`_LAYER_SIZES` (equal head counts stay equal)."""
    out = {k: _LAYER_SIZES[k] if k in _LAYER_SIZES and isinstance(v, int) else v for k, v in over.items()}
    if over.get("num_key_value_heads") is not None and over.get("num_key_value_heads") == over.get("num_attention_heads"):
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def run(model_type: str, arch: str) -> dict[str, Any]:
    """One registry type, shrunk, against transformers."""
    import transformers
    from transformers import AutoConfig

    from dualpath.errors import ModelError
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    row: dict[str, Any] = {"model_type": model_type, "architecture": arch}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = AutoConfig.for_model(model_type).to_dict()
            kw = shrink({k: v for k, v in base.items() if k not in ("transformers_version", "architectures")})
            cfg = type(AutoConfig.for_model(model_type)).from_dict(kw)
            torch.manual_seed(0)
            hf = getattr(transformers, arch)(cfg).eval()
    except Exception as exc:
        return {**row, "status": "shrink refused", "detail": f"transformers: {type(exc).__name__}: {str(exc)[:200]}"}
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("A_log", "dt_bias", "recurrent_param", "dt_proj_bias")):
                continue
            p.add_(0.1 * torch.randn_like(p)) if ("norm" in n.lower() or n.endswith("bias")) else p.mul_(3.0)
    seq = torch.randint(5, V, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as d:
        try:
            hf.save_pretrained(d)
        except Exception as exc:
            return {**row, "status": "shrink refused", "detail": f"save: {type(exc).__name__}: {str(exc)[:200]}"}
        try:
            ours = load_model(LlamaModelConfig(path=d, attention_backend="torch", time_model="off"),
                              with_tokenizer=False)[0]
        except Exception as exc:
            status = "load failed" if "does not match the model config" in str(exc) or not isinstance(
                exc, ModelError) else "shrink refused"
            if status == "load failed":  # (does transformers read back what it wrote?)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, info = getattr(transformers, arch).from_pretrained(d, output_loading_info=True)
                if info["missing_keys"]:
                    status = "transformers cannot read its save"
            return {**row, "status": status, "detail": f"ours: {type(exc).__name__}: {str(exc)[:300]}"}
    try:
        with torch.no_grad():
            ref = reference_logits(hf, seq)
    except Exception as exc:
        return {**row, "status": "shrink refused", "detail": f"transformers forward: {type(exc).__name__}: {str(exc)[:200]}"}
    return {**row, **compare(ours, ref, seq), "family": type(ours.spec).__name__ + ":" + ours.spec.architecture}


def reference_logits(hf: Any, seq: list[int]) -> torch.Tensor:
    """Transformers' logits over ``seq``, by the model's own forward; where that forward cannot run on text alone,
    by what a text prompt reaches: BLIP-2 / InstructBLIP's forward needs an image (their language model is run, as
    it is on a prompt with no image), Llama 4's image-text forward builds its output from a field its text model
    does not return (its text model is run, as that forward runs it on a prompt with no image)."""
    ids = torch.tensor([seq])
    try:
        return hf(ids, use_cache=False).logits[0].float()
    except (TypeError, AttributeError) as exc:
        if not ("required positional argument" in str(exc) or "image_outputs" in str(exc)) or not hasattr(
                hf, "language_model"):
            raise
        return hf.language_model(input_ids=ids, use_cache=False).logits[0].float()


def compare(ours: Any, ref: torch.Tensor, seq: list[int]) -> dict[str, Any]:
    """Our model's logits over ``seq`` (two prefill chunks over paged KV, then a decode step) against transformers'
    ``ref``: ``status`` ok within 1e-3 of the logit range, else mismatch."""
    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    with torch.no_grad():
        got = torch.cat([ours(SeqBatch.build([seq[:9]], [0], [table], 4), pool.layers, all_positions=True),
                         ours(SeqBatch.build([seq[9:16]], [9], [table], 4), pool.layers, all_positions=True),
                         ours.decode_step(torch.tensor([seq[16]]), torch.tensor([16]),
                                          torch.tensor([table], dtype=torch.int32), pool.layers)])
    if got.shape[-1] > ref.shape[-1]:  # (a head narrower than the embedding: our ids past it are -inf)
        if not torch.isinf(got[:, ref.shape[-1]:]).all():
            return {"status": "mismatch", "detail": "ids past the LM head are live"}
        got = got[:, : ref.shape[-1]]
    if got.shape != ref.shape:
        return {"status": "mismatch", "detail": f"logits shaped {tuple(got.shape)}, transformers' {tuple(ref.shape)}"}
    err, top = float((got - ref).abs().max()), float(ref.abs().max())
    return {"status": "ok" if err < 1e-3 * max(1.0, top) else "mismatch", "max_abs_logit_diff": err,
            "logit_scale": top}


def _takes_own_config(model_type: str, arch: str) -> bool:
    """Whether ``arch`` is built from ``model_type``'s own config class (a causal-LM class registered for a
    composite type, such as Qwen 3.5's, takes the text config: the image-text class is the one to run)."""
    import transformers
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = type(AutoConfig.for_model(model_type))
    return getattr(getattr(transformers, arch, None), "config_class", own) is own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every registry type that runs)")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_registry_coverage import classify

    runs: dict[str, str] = {}
    for reg in classify()["registries"].values():
        for r in reg["runs"]:
            if r["model_type"] not in runs or not _takes_own_config(r["model_type"], runs[r["model_type"]]):
                runs[r["model_type"]] = r["architecture"]
    types = args.types.split(",") if args.types else sorted(runs)
    rows = []
    for t in types:
        row = run(t, runs[t])
        rows.append(row)
        extra = f" {row['max_abs_logit_diff']:.2e}" if "max_abs_logit_diff" in row else f" {row.get('detail', '')[:150]}"
        print(f"{t:28s} {row['status']}{extra}", flush=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{len(rows)} types: {counts}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"counts": counts, "rows": rows}, indent=2, default=str))
    return 1 if counts.get("mismatch") or counts.get("load failed") else 0


if __name__ == "__main__":
    sys.exit(main())
