"""Cohere Compass's text decoder (``CohereCompassForCausalLM``, model_type ``cohere_compass_text``) against
transformers on the same random weights, saved by transformers: Cohere 2's parallel block (one bias-free fp32
LayerNorm feeding attention and MLP) with RoPE keyed by layer type (half-split, unlike Cohere 2's interleaved pairs;
null for a type that does not rotate), sliding layers, heads sized ``hidden / heads``, logits times ``logit_scale``
when set."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hf_random import (
    Checkpoints,
    check_paged_paths_against_hf,
    check_save_reads_back,
    cluster_two_turns,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "CohereCompassForCausalLM"):
    pytest.skip("no Cohere Compass in this transformers", allow_module_level=True)

VOCAB = 97
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {"sliding_attention": _ROPE, "full_attention": None}, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2}
_CKPTS = Checkpoints({
    "sliding_rope_full_nope": ("CohereCompassTextConfig", "CohereCompassForCausalLM", CONFIG),
    "all_full_scaled": ("CohereCompassTextConfig", "CohereCompassForCausalLM",
                        {**{k: v for k, v in CONFIG.items() if k != "layer_types"}, "logit_scale": 0.5,
                         "tie_word_embeddings": False,
                         "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5000.0}}}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    ours = load_checkpoint(d)
    spec = ours.spec
    if family == "sliding_rope_full_nope":
        assert spec.nope_layers == (1,) and [spec.layer_window(i) for i in range(3)] == [5, None, 5]
        assert spec.logit_scale == 1.0
    else:
        assert spec.nope_layers == () and spec.sliding_window is None and spec.logit_scale == 0.5
        assert spec.rope_theta == 5000.0
    check_save_reads_back(ours, tmp_path, transformers.CohereCompassForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_rope_per_layer_type_read_as_transformers_needs_it(tmp_path):
    """A layer type without its RoPE entry (transformers' model cannot be built then), and layer types rotating
    differently (one RoPE is read here), are refused by key."""
    base = {"architectures": ["CohereCompassForCausalLM"], "model_type": "cohere_compass_text", **CONFIG}
    for rope, match in (({"sliding_attention": _ROPE}, r"missing \['full_attention'\]"),
                        ({}, r"missing \['full_attention', 'sliding_attention'\]"),
                        ({"sliding_attention": _ROPE, "full_attention": {**_ROPE, "rope_theta": 1e6}},
                         "rope_parameters differ between layer types")):
        (tmp_path / "config.json").write_text(json.dumps({**base, "rope_parameters": rope}))
        with pytest.raises(ModelError, match=match):
            load_spec(tmp_path / "config.json")


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("sliding_rope_full_nope", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
