"""RecurrentGemma (``RecurrentGemmaForCausalLM``: Griffin's RG-LRU recurrent blocks beside local attention) against
transformers on the same random weights, saved by transformers: logits of chunked prefills and decode steps over state
pages (against transformers' full forward: its cached prefill of a later chunk restarts the convolution), batched
sequences with different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained
read back by transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.recurrent_gemma import RecurrentGemmaSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "RecurrentGemmaForCausalLM"):
    pytest.skip("no RecurrentGemma in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "attention_window_size": 6, "conv1d_width": 4,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """Recurrences that remember: ``recurrent_param`` in [-5, -2], so ``a = exp(-8 r softplus(p))`` stays near 1
    (the widening x6 would make every step forget)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("rg_lru.recurrent_param"):
                    p.copy_(torch.empty(p.shape).uniform_(-5.0, -2.0, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "griffin": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", CONFIG),
    "variant": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                {**CONFIG, "block_types": ["attention", "recurrent"], "num_key_value_heads": 1, "lru_width": 48,
                 "attention_bias": True, "conv1d_width": 3, "logits_soft_cap": 10.0, "tie_word_embeddings": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.25}}),
})
ckpt = _CKPTS.fixture()


def test_fp32_logits_chunks_batches_and_triton(ckpt):
    _, d, hf = ckpt
    seq = sum(random_turns(VOCAB, 3), [])  # (23 positions: past the 6-token window)
    check_two_chunks_against_hf(load_checkpoint(d), hf, seq)
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, seq, cut=6)
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("griffin", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, RecurrentGemmaSpec) and spec.architecture == "recurrent_gemma"
    if family == "griffin":  # (RecurrentGemmaConfig's block pattern, repeated; lru_width = hidden_size)
        assert spec.layer_types == ("recurrent", "recurrent", "attention", "recurrent") and spec.lru_width == 32
        assert spec.intermediate_size == 24 and spec.partial_rotary == 0.5
    assert [spec.layer_window(i) for i in range(4)] == [6 if t == "attention" else None for t in spec.layer_types]
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.RecurrentGemmaForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("griffin", tmp_path_factory)
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_a_head_dim_of_its_own_is_read_as_transformers_reads_it(tmp_path):
    """``head_dim`` sizes the attention heads (transformers reads it; ``hidden / heads`` only when left out), here
    twice that; our save_pretrained writes it back."""
    hf = _Checkpoints({"wide": ("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM",
                                {**CONFIG, "head_dim": 16})}).model("wide")
    assert hf.config.head_dim == 16
    hf.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.head_dim == 16 and load_spec(spec.to_hf_config()) == spec
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma", **CONFIG}
    for change, match in (({"block_types": ["recurrent", "mlp"]}, "block_types"),
                          ({"lru_width": 30}, "lru_width"),
                          ({"hidden_activation": "tanh"}, "hidden_activation 'tanh'"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
                           "rope_parameters")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("griffin", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
