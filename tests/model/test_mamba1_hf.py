"""Mamba (``MambaForCausalLM``) and Falcon-Mamba (``FalconMambaForCausalLM``: B, C and dt RMS-normalized) against
transformers on the same random weights, saved by transformers: logits at every prefill and decode step over state
pages (against transformers' full forward: its cached prefill of a later chunk starts from a zero state), batched
sequences with different cached prefixes, bf16, our save_pretrained read back by transformers, and a two-turn session
through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MambaForCausalLM") or not hasattr(transformers, "FalconMambaForCausalLM"):
    pytest.skip("no Mamba in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3, "state_size": 8, "expand": 2, "conv_kernel": 4,
    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}



_CKPTS = RecurrentCheckpoints({
    "mamba": ("MambaConfig", "MambaForCausalLM", CONFIG),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM",
                     {**CONFIG, "tie_word_embeddings": False, "use_bias": True, "time_step_rank": 3}),
})
ckpt = _CKPTS.fixture()


def test_fp32_logits_chunks_and_batches(ckpt):
    _, d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == family and spec.inner == 64
    assert spec.dt_rank == (2 if family == "mamba" else 3)  # ("auto": ceil(hidden / 16))
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    cls = transformers.MambaForCausalLM if family == "mamba" else transformers.FalconMambaForCausalLM
    check_save_reads_back(ours, tmp_path, cls, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("falcon_mamba", tmp_path_factory)
    hf = transformers.FalconMambaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    with pytest.raises(ModelError, match="hidden_act"):
        load_spec({"architectures": ["MambaForCausalLM"], "model_type": "mamba", **CONFIG, "hidden_act": "tanh"})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("mamba", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
