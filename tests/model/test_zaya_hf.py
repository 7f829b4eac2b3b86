"""ZAYA1 (``ZayaForCausalLM``: compressed convolutional attention, an MLP router carrying its state across layers with
a skip class, an fp32 residual stream with learned scalings) against transformers on the same random weights, saved by
transformers: logits at every prefill chunk and decode step over pages holding KV rows and each layer's convolution
state, batched sequences with different cached prefixes, 64-token blocks, bf16, a hit from a stored Full Block's page
(and not once its state is zeroed), our save_pretrained read back by transformers, and a two-turn session through the
emulated cluster on every read path."""

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
    check_turns_against_hf,
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
from dualpath.model.spec import load_spec
from dualpath.model.zaya import ZayaSpec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ZayaForCausalLM"):
    pytest.skip("no ZAYA in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4,
    "num_experts_per_tok": 1, "router_hidden_size": 16, "layer_types": ["hybrid", "hybrid_sliding"] * 2,
    "sliding_window": 5, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """Weights where every part matters: transformers starts the key scales (``temp``) at zero, the residual and
    router scales at one and the balancing biases at zero (the skip class at -1); here they are random, matrices and
    biases N(0, 0.2)."""

    def model(self, family: str, seed: int = 0) -> Any:
        cfg_cls, model_cls, kw = self.families[family]
        torch.manual_seed(seed)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight") or "scale" in n:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif n.endswith("temp"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            for n, b in hf.named_buffers():
                if n.endswith("balancing_biases"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "zaya": ("ZayaConfig", "ZayaForCausalLM", CONFIG),
    "variant": ("ZayaConfig", "ZayaForCausalLM",
                {**CONFIG, "cca_time0": 3, "cca_time1": 1, "num_key_value_heads": 1, "head_dim": 12,
                 "attention_bias": True, "lm_head_bias": True, "tie_word_embeddings": False, "layer_types": None,
                 "rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 1e4,
                                                "partial_rotary_factor": 1.0}}}),
})
ckpt = _CKPTS.fixture()


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)
    seq = sum(random_turns(VOCAB, 3), [])
    check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=6)


def test_a_hit_continues_from_the_stored_convolution_state(tmp_path_factory):
    d, hf = _CKPTS.get("zaya", tmp_path_factory)
    ours = load_checkpoint(d)
    spec = ours.spec
    rows = 4 * 2 * spec.n_kv_heads * spec.head_dim  # (a 4-token page's KV rows; the state follows them)
    check_hit_from_stored_state(ours, hf, VOCAB, state_part=lambda page: page.flatten()[rows:])


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ZayaSpec) and spec.architecture == "zaya"
    if family == "zaya":
        assert [spec.layer_window(i) for i in range(4)] == [None, 5, None, 5] and spec.conv_taps == 2
        assert spec.rope_by_type == {"hybrid": (5e6, 0.5), "hybrid_sliding": (1e4, 0.5)}
    else:
        assert spec.layer_types == ("hybrid",) * 4 and spec.lm_head_bias and spec.conv_taps == 2
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.ZayaForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_the_hubs_nested_rope_with_a_stray_rope_type_reads(tmp_path_factory):
    d, _ = _CKPTS.get("zaya", tmp_path_factory)
    import json

    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {**cfg["rope_parameters"], "rope_type": "default"}
    assert load_spec(cfg) == load_spec(d)


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("zaya", tmp_path_factory)
    hf = transformers.ZayaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["ZayaForCausalLM"], "model_type": "zaya", **CONFIG}
    for change, match in (({"layer_types": ["hybrid", "full_attention"] * 2}, "layer_types"),
                          ({"sliding_window": None}, "sliding_window"),
                          ({"head_dim": 7}, "head_dim"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"rope_parameters": {"hybrid": {"rope_type": "yarn", "factor": 2.0},
                                                "hybrid_sliding": {"rope_type": "default"}}}, "rope_parameters"),
                          ({"num_experts_per_tok": 5}, "num_experts_per_tok")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("zaya", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
