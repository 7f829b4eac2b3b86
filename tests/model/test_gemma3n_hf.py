"""Gemma 3n's text model (``Gemma3nForCausalLM``, and ``Gemma3nForConditionalGeneration`` serving it) against
transformers on the same random weights, saved by transformers: AltUp's four streams (predict, correct, the scaled
per-layer input added to the inactive ones, projected back and averaged at the end), Laurel's low-rank residual,
per-layer MLP widths with the Gaussian top-k gate sparsity, per-layer embeddings (ids past their table read row 0),
shared-KV layers, per-head q/k/v norms and a RoPE base per layer type."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma3nForCausalLM"):
    pytest.skip("no Gemma 3n in this transformers", allow_module_level=True)

VOCAB = 101
_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
          "full_attention"]
#: the per-layer embeddings' table is smaller than the vocabulary (as the hub's: the soft tokens past it read row 0);
#: two sparse layers; the last two layers share layers 3's and 2's keys and values
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "vocab_size_per_layer_input": 96, "hidden_size": 64, "hidden_size_per_layer_input": 8,
    "intermediate_size": [96, 80, 96, 64, 96, 96], "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 5, "layer_types": _TYPES, "num_kv_shared_layers": 2,
    "laurel_rank": 8, "activation_sparsity_pattern": [0.95, 0.9, 0.0, 0.0, 0.0, 0.0], "max_position_embeddings": 256}


class _Gemma3nCheckpoints(Checkpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        with torch.no_grad():  # (widened, but AltUp's output scale near 1: transformers starts it at zero)
            for layer in hf.model.layers:
                layer.altup.correct_output_scale.copy_(1.0 + 0.1 * torch.randn(64))
        return hf


_CKPTS = _Gemma3nCheckpoints({"gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM", CONFIG)})


def _ids_past_the_table(seqs: list[list[int]]) -> bool:
    return any(t >= 96 for s in seqs for t in s)


def test_fp32_multi_turn_logits_batches_and_triton(tmp_path_factory):
    d, hf = _CKPTS.get("gemma3n", tmp_path_factory)
    turns = random_turns(VOCAB, 0)
    check_turns_against_hf(load_checkpoint(d), hf, turns)
    seqs = two_sequences(VOCAB) + [[97, 98, 99, 100, 3, 5]]
    assert _ids_past_the_table(seqs)
    check_batched_against_hf(load_checkpoint(d), hf, seqs[:2])
    check_two_chunks_against_hf(load_checkpoint(d), hf, seqs[2] + sum(random_turns(VOCAB, 3), []), cut=5)
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_spec_and_our_save_pretrained(tmp_path_factory, tmp_path):
    d, _ = _CKPTS.get("gemma3n", tmp_path_factory)
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "gemma3n_text"
    assert spec.intermediate_sizes == (96, 80, 96, 64, 96, 96) and spec.sparsity[:2] == (0.95, 0.9)
    assert [spec.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Gemma3nForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    """Our bf16 logits are as close to transformers' fp32 ones as transformers' own bf16 logits are."""
    d, hf32 = _CKPTS.get("gemma3n", tmp_path_factory)
    hf = transformers.Gemma3nForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    fp32 = hf_logits(hf32, seq)
    check_bf16_as_close_as_transformers(got, ref, fp32)


def test_the_image_text_checkpoint_serves_its_language_model(tmp_path_factory, tmp_path):
    """``Gemma3nForConditionalGeneration``'s layout (``model.language_model.``, its vision and audio towers and
    embedders beside it) and config (transformers' Gemma3nConfig). Its vision tower is a timm model, so the
    checkpoint is written here from transformers' text model (the reference) under those names."""
    from safetensors.torch import save_file

    d, hf = _CKPTS.get("gemma3n", tmp_path_factory)
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v.contiguous()
             for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["model.vision_tower.timm_model.stem.weight"] = torch.zeros(4, 3)
    state["model.embed_vision.embedding_projection.weight"] = torch.zeros(64, 4)
    state["model.audio_tower.subsample_conv_projection.weight"] = torch.zeros(4, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    top = transformers.Gemma3nConfig(text_config=json.loads((d / "config.json").read_text())).to_dict()
    top["architectures"] = ["Gemma3nForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(top))
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert ours.spec.architecture == "gemma3n_text" and ours.spec.ple_vocab == 96
    check_batched_against_hf(ours, hf, two_sequences(VOCAB))


@pytest.mark.parametrize("change, match", [
    ({"hidden_activation": "tanh"}, "hidden_activation 'tanh'"),
    ({"intermediate_size": [96, 96]}, "intermediate_size must be an integer or one per layer"),
    ({"activation_sparsity_pattern": [0.5]}, "activation_sparsity_pattern must give a number for each"),
    ({"activation_sparsity_pattern": [1.0, 0, 0, 0, 0, 0]}, r"one value in \[0, 1\) per layer"),
    ({"altup_active_idx": 4}, "altup_active_idx"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "rope_type 'yarn' unsupported"),
    ({"num_kv_shared_layers": 6}, r"num_kv_shared_layers must be in \[0, 5\]"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["Gemma3nForCausalLM"], **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster (AltUp, shared-KV layers' pages read back from storage):
    PE, DE, split and recompute reads give transformers' greedy tokens."""
    d, hf = _CKPTS.get("gemma3n", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
