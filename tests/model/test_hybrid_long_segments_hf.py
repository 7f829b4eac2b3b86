"""Every hybrid family over 64-token blocks: the other tests run 4-token blocks, whose scan segments never pass 4
tokens; here one prefill segment is 45 tokens long (a whole closed form for Gated DeltaNet, Mamba-2 and lightning
attention, several for KDA, a 45-step scan for Mamba), then a chunk and a decode step continue from its state, and
every logit row equals transformers' full forward on the family's first test checkpoint."""

from __future__ import annotations

import importlib

import pytest
from hf_random import check_long_segments, load_checkpoint

MODULES = ("test_qwen_hybrid_hf", "test_olmo_hybrid_hf", "test_granite_hybrid_hf", "test_bamba_hf",
           "test_nemotron_h_hf", "test_mamba2_hf", "test_mamba1_hf", "test_jamba_hf", "test_falcon_h1_hf",
           "test_minimax_hf", "test_lfm2_hf", "test_lfm3_hf", "test_lara_mini_hf", "test_kimi_linear_hf",
           "test_bailing_hybrid_hf", "test_recurrent_gemma_hf", "test_zamba2_hf")


@pytest.mark.parametrize("module", MODULES)
def test_a_45_token_segment_then_a_chunk_and_a_step(module, tmp_path_factory):
    mod = importlib.import_module(module)  # (skips where this transformers lacks the family)
    family = next(iter(mod._CKPTS.families))
    d, hf = mod._CKPTS.get(family, tmp_path_factory)
    check_long_segments(load_checkpoint(d), hf, mod.VOCAB)
