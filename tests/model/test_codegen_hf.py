"""CodeGen (``CodeGenForCausalLM``, Salesforce's codegen-350M-mono and kin) is GPT-J with one fused ``qkv_proj``
whose rows come in 4 groups of ``[q, v, k]``: read as GPT-J with that tensor split at load, it gives transformers'
logits and greedy ids over our paged KV (both attention backends), and our ``save_pretrained`` writes the same model
as a GPT-J checkpoint that transformers reads to the same logits."""

from __future__ import annotations

import pytest
from hf_random import (
    Checkpoints,
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
CFG = {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 3, "n_head": 8, "rotary_dim": 4, "n_positions": 256,
       "n_ctx": 256, "bos_token_id": None, "eos_token_id": None}
_CKPTS = Checkpoints({"codegen": ("CodeGenConfig", "CodeGenForCausalLM", CFG)})
ckpt = _CKPTS.fixture()


def test_logits_and_greedy_equal_transformers(ckpt):
    _, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "gptj" and spec.rotary_dim == 4
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))
    check_batched_against_hf(load_checkpoint(d), hf, [random_turns(VOCAB, 1)[0], random_turns(VOCAB, 2)[1]])
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_saved_as_gptj_reads_back_in_transformers(ckpt, tmp_path):
    _, d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.GPTJForCausalLM,
                          sum(random_turns(VOCAB, 7), []))


def test_bad_config_names_the_key():
    with pytest.raises(ModelError, match="n_head"):
        ModelSpec.from_hf_config({**CFG, "n_head": 6, "architectures": ["CodeGenForCausalLM"]})
