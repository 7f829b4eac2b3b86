"""OLMo Hybrid (``OlmoHybridForCausalLM``: Gated DeltaNet layers from separate projections, beta doubled, and OLMo 2's
post-norm attention layers) against transformers on the same random weights, saved by transformers: logits at every
prefill and decode step over state pages, batched sequences with different cached prefixes, Triton, bf16, our
save_pretrained read back by transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_paged_paths_against_hf,
    check_save_reads_back,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "OlmoHybridForCausalLM"):
    pytest.skip("no OLMo Hybrid in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_key_head_dim": 8, "linear_value_head_dim": 12, "max_position_embeddings": 256,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": None}, "bos_token_id": None, "eos_token_id": None,
    "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "nope": ("OlmoHybridConfig", "OlmoHybridForCausalLM", CONFIG),
    "rope": ("OlmoHybridConfig", "OlmoHybridForCausalLM",
             {**CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
              "linear_allow_neg_eigval": False}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "olmo_hybrid" and bool(spec.rope_by_type) == (family == "rope")
    assert spec.neg_eigval == (family == "nope")
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.OlmoHybridForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("nope", tmp_path_factory)
    hf = transformers.OlmoHybridForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("keys, rope", [({"rope_parameters": None}, 10000.0), ({"rope_theta": None}, None),
                                        ({}, 10000.0), ({"rope_theta": 5000.0}, 5000.0),
                                        ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, None)])
def test_rope_or_none_as_transformers_reads_it(tmp_path, keys, rope):
    import json

    cfg = {"architectures": ["OlmoHybridForCausalLM"], "model_type": "olmo_hybrid",
           **{k: v for k, v in CONFIG.items() if k != "rope_parameters"}, **keys}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert transformers.AutoConfig.from_pretrained(str(tmp_path)).rope_parameters["rope_theta"] == rope
    assert load_spec(tmp_path).rope_by_type == ({"full_attention": (rope, 1.0)} if rope else {})


def test_configs_it_cannot_run_are_refused_by_key():
    for change, match in (({"hidden_act": "tanh"}, "hidden_act"), ({"linear_num_value_heads": 3}, "multiple of"),
                          ({"layer_types": ["linear_attention"] * 3}, "layer_types")):
        with pytest.raises(ModelError, match=match):
            load_spec({"architectures": ["OlmoHybridForCausalLM"], "model_type": "olmo_hybrid", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("nope", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
