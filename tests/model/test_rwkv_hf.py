"""RWKV-4 (``RwkvForCausalLM``: token shifts and the WKV recurrence, no attention) against transformers on the same
random weights, saved by transformers: logits of chunked prefills and decode steps over state pages (against
transformers' full forward), batched sequences with different cached prefixes, 64-token blocks, bf16, a hit from a
stored Full Block's page, transformers' inference rescaling, our save_pretrained read back by transformers, and a
two-turn session through the emulated cluster on every read path."""

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
    check_long_segments,
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
from dualpath.model.rwkv import RwkvSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "RwkvForCausalLM"):
    pytest.skip("no RWKV in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 5, "intermediate_size": 48, "rescale_every": 2,
    "context_length": 256, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """A recurrence that remembers (``time_decay`` in [-3, 0]: ``w = -exp(.)`` in [-1, -0.05]), token shifts that
    matter (mixes in [0, 1]) and embeddings N(0, 1)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 5)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("time_decay"):
                    p.copy_(torch.empty(p.shape).uniform_(-3.0, 0.0, generator=g))
                elif n.endswith("time_first"):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif ".time_mix_" in n:
                    p.copy_(torch.rand(p.shape, generator=g))
                elif n.endswith("embeddings.weight"):  # (RWKV starts them tiny: logits of a meaningful size)
                    p.copy_(torch.randn(p.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "rwkv": ("RwkvConfig", "RwkvForCausalLM", CONFIG),
    "variant": ("RwkvConfig", "RwkvForCausalLM",
                {**CONFIG, "rescale_every": 0, "tie_word_embeddings": True,
                 "layer_norm_epsilon": 1e-4}),
})
ckpt = _CKPTS.fixture()


def test_fp32_chunks_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    seq = sum(random_turns(VOCAB, 3), [])
    for cut in (4, 13):
        check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=cut)
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("rwkv", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, RwkvSpec) and spec.architecture == "rwkv"
    if family == "rwkv":
        assert spec.attention_size == 32 and spec.rescale_every == 2 and spec.context_limit == 256
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.RwkvForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"head.weight"} if spec.tie_embeddings else set())


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("rwkv", tmp_path_factory)
    hf = transformers.RwkvForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["RwkvForCausalLM"], "model_type": "rwkv", **CONFIG}
    for change, match in (({"rescale_every": -1}, "rescale_every"),
                          ({"attention_hidden_size": 24}, "attention_hidden_size"),
                          ({"hidden_size": "32"}, "hidden_size")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("rwkv", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
