"""Zamba2 (``Zamba2ForCausalLM``: Mamba-2 blocks, and shared transformer blocks on ``[hidden, embeddings]`` taking turns
over the hybrid layers, each invocation with its own adapters) against transformers on the same random weights, saved
by transformers: logits at every prefill and decode step over pages holding KV rows and a Mamba state, batched
sequences with different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained
read back by transformers (each shared block stored once), and a two-turn session through the emulated cluster."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_paged_paths_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec
from dualpath.model.zamba2 import Zamba2Spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Zamba2ForCausalLM"):
    pytest.skip("no Zamba2 in this transformers", allow_module_level=True)

VOCAB = 97
KINDS = ["mamba", "hybrid", "mamba", "hybrid", "hybrid", "mamba"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 6, "layers_block_type": KINDS,
    "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "n_mamba_heads": 4, "mamba_ngroups": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_mem_blocks": 2, "use_shared_attention_adapter": True,
    "adapter_rank": 4, "intermediate_size": 48, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
GQA_ROPE: dict[str, Any] = {
    **CONFIG, "use_shared_attention_adapter": False, "num_key_value_heads": 2, "num_mem_blocks": 1,
    "use_mem_rope": True, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}, "add_bias_linear": True,
    "mamba_ngroups": 2, "tie_word_embeddings": False}
_CKPTS = RecurrentCheckpoints({
    "adapters": ("Zamba2Config", "Zamba2ForCausalLM", CONFIG),
    "gqa_rope": ("Zamba2Config", "Zamba2ForCausalLM", GQA_ROPE),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_a_prefill_clamps_dt_at_time_step_min_and_a_decode_step_does_not(tmp_path):
    """With ``time_step_min`` above most of ``dt``, as transformers runs Zamba2: its chunked prefill clamps ``dt``,
    its single-token step does not (so a step differs from the full forward's row); every logit equals its own."""
    hf = RecurrentCheckpoints({"clamped": ("Zamba2Config", "Zamba2ForCausalLM",
                                           {**CONFIG, "time_step_min": 0.4})}).model("clamped")
    hf.save_pretrained(tmp_path)
    assert load_spec(tmp_path).dt_min == 0.4
    check_turns_against_hf(load_checkpoint(tmp_path), hf, random_turns(VOCAB, 0))
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []))


def test_an_attention_head_dim_of_its_own_is_read_as_transformers_reads_it(tmp_path):
    """``attention_head_dim`` sizes the shared block's heads (transformers reads it; it derives ``2 x hidden / heads``
    only when the key is left out), here half that, without adapters (with them it is refused: transformers fails);
    our save_pretrained writes it back."""
    hf = RecurrentCheckpoints({"narrow": ("Zamba2Config", "Zamba2ForCausalLM",
                                          {**CONFIG, "attention_head_dim": 8,
                                           "use_shared_attention_adapter": False})}).model("narrow")
    assert hf.config.attention_head_dim == 8
    hf.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.head_dim == 8 and load_spec(spec.to_hf_config()) == spec
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []))


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("adapters", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_shared_blocks_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Zamba2Spec) and spec.layer_types == tuple(KINDS) and spec.head_dim == 16
    ours = load_checkpoint(d)
    blocks = [ours.model.layers[i].shared_transformer for i in spec.hybrid_layers]
    if family == "adapters":  # (two shared blocks take turns, A B A: transformers stores A once)
        assert blocks[0] is blocks[2] and blocks[0] is not blocks[1]
    else:  # (one block: transformers 5.24 does not tie it and stores each layer's copy; each is read)
        assert len({id(b) for b in blocks}) == 3
    assert load_spec(spec.to_hf_config()) == spec
    fresh = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(fresh, tmp_path, transformers.Zamba2ForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("adapters", tmp_path_factory)
    hf = transformers.Zamba2ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["Zamba2ForCausalLM"], "model_type": "zamba2", **CONFIG}
    for change, match in (({"num_key_value_heads": 2}, "use_shared_attention_adapter"),
                          ({"layers_block_type": ["mamba", "attention"] * 3}, "layers_block_type"),
                          ({"layers_block_type": ["mamba", "hybrid"] * 4}, "num_hidden_layers"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"use_long_context": "yes"}, "use_long_context"),
                          ({"n_mamba_heads": 3}, "n_mamba_heads"),
                          ({"attention_hidden_size": 2 * CONFIG["hidden_size"] + 8}, "attention_hidden_size"),
                          ({"mamba_headdim": 8}, "mamba_headdim"),
                          ({"attention_head_dim": 8}, "attention_head_dim")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


def test_use_long_context_is_read_as_transformers_reads_it():
    """transformers' Zamba2 runs ``use_long_context`` as a 16K context at the config's RoPE base as written (the base
    it saves is the rescaled one a long context runs at), so its spec is that of the same config at 16K."""
    base = {"architectures": ["Zamba2ForCausalLM"], "model_type": "zamba2", **GQA_ROPE}
    spec = load_spec({**base, "use_long_context": True})
    hf = transformers.Zamba2Config(**{**GQA_ROPE, "use_long_context": True})
    assert spec.max_position == hf.max_position_embeddings == 16384
    assert hf.rope_parameters["rope_theta"] == 5000.0
    assert spec == load_spec({**base, "max_position_embeddings": 16384})
    assert spec != load_spec(base)


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("adapters", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
