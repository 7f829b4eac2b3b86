"""Apertus 1.5 against transformers on the same random weights, saved by transformers: Apertus with a vocabulary
that also holds visual and audio codes and an LM head pruned to the text prefix of it (``output_vocab_size``).
Our logits keep the vocabulary's width with -inf past the head's rows, so no sampler can pick an id the head
does not have, and equal transformers' rows elsewhere, at every prefill and decode step; our
``save_pretrained`` writes a checkpoint transformers reads back with the pruned head."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    WidenedLogits,
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.engine.sampling import SamplingParams, filtered_probs
from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Apertus1p5TextForCausalLM"):
    pytest.skip("no Apertus 1.5 in this transformers", allow_module_level=True)

VOCAB, HEAD = 97, 80
CFG = {"vocab_size": VOCAB, "output_vocab_size": HEAD, "hidden_size": 64, "intermediate_size": 96,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "num_hidden_layers": 3,
       "head_dim": 16, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
_CKPTS = Checkpoints({"apertus1p5_text": ("Apertus1p5TextConfig", "Apertus1p5TextForCausalLM", CFG)})
ckpt = _CKPTS.fixture()


def _widened(hf: Any) -> WidenedLogits:
    return WidenedLogits(hf, VOCAB)


def _read_back(hf: Any) -> None:
    assert type(hf).__name__ == "Apertus1p5TextForCausalLM" and hf.lm_head.weight.shape[0] == HEAD


def test_logits_equal_transformers_and_the_pruned_ids_are_never_picked(ckpt):
    _, d, hf = ckpt
    ours = load_checkpoint(d)
    assert ours.spec.output_vocab_size == HEAD and tuple(ours.lm_head.weight.shape) == (HEAD, 64)
    check_turns_against_hf(ours, _widened(hf), random_turns(HEAD, 0))
    check_batched_against_hf(ours, _widened(hf), two_sequences(VOCAB))
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    logits = ours(SeqBatch.build([list(range(90, 97))], [0], [pool.allocate(8)], 4), pool.layers)[0]
    assert logits.shape == (VOCAB,) and torch.isinf(logits[HEAD:]).all() and torch.isfinite(logits[:HEAD]).all()
    probs = filtered_probs(logits, SamplingParams(temperature=2.0))
    assert float(probs[HEAD:].sum()) == 0.0 and abs(float(probs.sum()) - 1.0) < 1e-5


def test_spec_and_our_save_pretrained_read_back_in_transformers(ckpt, tmp_path):
    _, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "apertus" and spec.output_vocab_size == HEAD
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert spec.to_dict()["output_vocab_size"] == HEAD
    assert "output_vocab_size" not in load_spec({**CFG, "architectures": ["ApertusForCausalLM"],
                                                 "output_vocab_size": None}).to_dict()
    check_save_reads_back(load_checkpoint(d), tmp_path, WidenedLogits.loader(VOCAB, _read_back), random_turns(HEAD, 7)[0])


def test_the_text_configs_and_bad_heads():
    """An unpruned head (output_vocab_size equal to the vocabulary) is Apertus; the image-text checkpoint's text
    config is read with Apertus 1.5's vocabulary by default; a head wider than the vocabulary or tied to the
    embeddings is refused by name."""
    full = load_spec({**CFG, "architectures": ["Apertus1p5TextForCausalLM"], "output_vocab_size": VOCAB})
    assert isinstance(full, ModelSpec) and full.output_vocab_size is None
    text = {k: v for k, v in CFG.items() if k != "vocab_size"}
    mm = load_spec({"architectures": ["Apertus1p5ForConditionalGeneration"], "model_type": "apertus1p5",
                    "text_config": {**text, "output_vocab_size": 131072}})
    assert isinstance(mm, ModelSpec) and (mm.vocab_size, mm.output_vocab_size) == (266752, 131072)
    for bad in ({"output_vocab_size": VOCAB + 1}, {"output_vocab_size": HEAD, "tie_word_embeddings": True},
                {"output_vocab_size": 0}):
        with pytest.raises(ModelError, match="output_vocab_size"):
            load_spec({**CFG, "architectures": ["Apertus1p5TextForCausalLM"], **bad})


def test_the_image_text_checkpoint_serves_its_language_model(tmp_path):
    """Apertus 1.5's image-text checkpoint, as transformers writes it: its language model under
    ``model.language_model.`` (the vision and audio tokenizers beside it are not loaded) with the pruned head."""
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    text = {k: v for k, v in CFG.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    vision = {"codebook_size": 8, "embed_dim": 8, "latent_channels": 32, "base_channels": 32,
              "channel_multiplier": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16}
    audio = {"codebook_size": 8, "codebook_dim": 32, "hidden_size": 32, "num_filters": 4, "upsampling_ratios": [2, 2],
             "num_lstm_layers": 1}
    cfg = transformers.Apertus1p5Config(text_config=text, vision_config=vision, audio_config=audio, image_token_id=73,
                                        audio_token_id=74, image_token_offset=80, audio_token_offset=88)
    torch.manual_seed(5)
    hf = transformers.Apertus1p5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert (ours.spec.architecture, ours.spec.output_vocab_size) == ("apertus", HEAD)
    check_batched_against_hf(ours, _widened(hf), two_sequences(VOCAB))
