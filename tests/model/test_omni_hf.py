"""Qwen Omni checkpoints served as their thinker's language model (text in, text out): Qwen3-Omni-MoE (a Qwen3-MoE
language model) and Qwen2.5-Omni (Qwen2), against transformers' own thinker on the same random weights, written by
transformers. The thinker alone keeps its language model at the text model's names beside its audio and vision
towers; the whole model keeps the thinker under ``thinker.`` beside the talker and the vocoder, and its config
nests the thinker's (``thinker_config``). Neither the towers, the talker nor the vocoder is loaded."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import Checkpoints, check_batched_against_hf, hf_logits

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 16}
#: a small tower: these keys, where the family's audio or vision config has them
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "depth": 1,
         "num_heads": 2, "embed_dim": 32, "out_hidden_size": 64, "d_model": 32, "encoder_layers": 1,
         "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "output_dim": 64, "num_mel_bins": 16,
         "downsample_hidden_size": 16}
#: family -> (the thinker's model_type, its architecture, the whole model's architecture, our text architecture,
#: its text config's extra keys)
FAMILIES: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {
    "qwen3_omni_moe": ("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration",
                       "Qwen3OmniMoeForConditionalGeneration", "qwen3_moe",
                       {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                        "norm_topk_prob": True, "rope_parameters": dict(_MROPE, mrope_interleaved=True)}),
    "qwen2_5_omni": ("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration",
                     "Qwen2_5OmniForConditionalGeneration", "qwen2", {"rope_parameters": _MROPE}),
}


def _kwargs(family: str) -> tuple[str, dict[str, Any]]:
    """The thinker's config class name and keyword arguments: transformers' defaults with a small language model
    (the default layer types dropped: they list the default's layer count) and small towers."""
    model_type, _, _, _, extra = FAMILIES[family]
    cfg = transformers.AutoConfig.for_model(model_type)
    d = cfg.to_dict()
    text = {k: v for k, v in d["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text.update(TEXT, **extra)
    kw: dict[str, Any] = {"text_config": text}
    for tower in ("vision_config", "audio_config"):
        sub = d.get(tower)
        if isinstance(sub, dict):
            kw[tower] = {**sub, **{k: v for k, v in SMALL.items() if k in sub}}
            if "deepstack_visual_indexes" in sub:
                kw[tower]["deepstack_visual_indexes"] = [0]
            if "fullatt_block_indexes" in sub:
                kw[tower]["fullatt_block_indexes"] = [0]
    for i, key in enumerate(("audio_token_id", "image_token_id", "video_token_id", "audio_token_index",
                             "image_token_index", "video_token_index")):
        if key in d:
            kw[key] = VOCAB - 1 - i % 3
    return type(cfg).__name__, kw


_CKPTS = Checkpoints({f: (_kwargs(f)[0], FAMILIES[f][1], _kwargs(f)[1]) for f in FAMILIES
                      if hasattr(transformers, FAMILIES[f][1])})
ckpt = _CKPTS.fixture()


def _load(d):
    return load_model(LlamaModelConfig(path=str(d), time_model="off"), with_tokenizer=False)[0]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB - 6, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_thinker_logits_equal_transformers(ckpt):
    """The thinker alone: batched prefill over paged KV with cached prefixes, then decode steps, equal
    transformers' thinker on the same text; the towers are not loaded."""
    family, d, hf = ckpt
    ours = _load(d)
    assert ours.spec.architecture == FAMILIES[family][3]
    state = hf.state_dict()
    towers = sum(t.numel() for n, t in state.items() if "audio_tower." in n or "visual." in n)
    assert towers > 0 and sum(p.numel() for p in ours.parameters()) <= sum(t.numel() for t in state.values()) - towers
    check_batched_against_hf(ours, hf, [_ids(20, 1), _ids(14, 2)])


def test_the_whole_model_serves_its_thinker(ckpt, tmp_path):
    """The whole Omni model's layout (the thinker's tensors under ``thinker.``, a talker beside them, the
    thinker's config as ``thinker_config``) loads the same language model; without a thinker_config it is
    refused by name."""
    from safetensors.torch import load_file, save_file

    family, d, hf = ckpt
    thinker_cfg = json.loads((d / "config.json").read_text())
    whole = {"architectures": [FAMILIES[family][2]], "model_type": family, "thinker_config": thinker_cfg,
             "talker_config": {"model_type": f"{family}_talker"}, "enable_audio_output": True}
    tensors = {f"thinker.{k}": v for k, v in load_file(str(d / "model.safetensors")).items()}
    tensors["talker.model.layers.0.mlp.gate_proj.weight"] = torch.ones(8, 8)
    tensors["code2wav.decoder.0.conv.weight"] = torch.ones(4, 4, 3)
    out = tmp_path / "whole"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(whole))
    ours = _load(out)
    seq = _ids(19, 4)
    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(5)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)
    spec = load_spec(whole)
    assert isinstance(spec, ModelSpec) and spec.hidden_size == 64 and spec.rope_scaling is None
    with pytest.raises(ModelError, match="thinker_config must be an object"):
        load_spec({k: v for k, v in whole.items() if k != "thinker_config"})
