"""LFM3 (``Lfm3ForCausalLM``: LFM2's gated short convolutions beside full and sliding attention, a RoPE per attention
type (proportional for the full layers) in fp32, per-head output gates, sandwich norms) against transformers on the
same random weights, saved by transformers: logits at every prefill and decode step (past the sliding window), batched
sequences with different cached prefixes, Triton, bf16, a hit from a stored Full Block's page, our save_pretrained
read back by transformers, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    assert_same_bf16_rounding,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
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
from dualpath.model.lfm2 import Lfm2Spec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Lfm3ForCausalLM"):
    pytest.skip("no LFM3 in this transformers", allow_module_level=True)

VOCAB = 97
TYPES = ["conv", "sliding_attention", "full_attention", "conv", "sliding_attention"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "conv_L_cache": 3, "sliding_window": 6,
    "max_position_embeddings": 256, "layer_types": TYPES, "pad_token_id": None, "bos_token_id": None,
    "eos_token_id": None}
_CKPTS = Checkpoints({
    "gated": ("Lfm3Config", "Lfm3ForCausalLM", CONFIG),
    "plain": ("Lfm3Config", "Lfm3ForCausalLM",
              {**CONFIG, "use_sandwich_norm": False, "use_attention_gate": False, "attention_bias": True,
               "conv_bias": True, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                                      "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 20000.0}},
               "tie_word_embeddings": False}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))  # (32 positions: past the 6-token window)
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("gated", tmp_path_factory)
    ours = load_checkpoint(d)
    conv_layers = [i for i, kind in enumerate(TYPES) if kind == "conv"]
    assert ours.spec.layer_types == tuple(TYPES) and conv_layers
    check_hit_from_stored_state(ours, hf, VOCAB)


def test_spec_rope_per_type_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Lfm2Spec) and spec.architecture == "lfm3" and spec.window == 6
    assert [spec.layer_window(i) for i in range(5)] == [None, 6, None, None, 6]
    if family == "gated":  # (Lfm3Config's default RoPEs: proportional for the full layers)
        assert spec.proportional == ("full_attention",) and spec.sandwich and spec.attn_gate
        assert spec.rope_by_type == {"full_attention": (1e6, 0.5), "sliding_attention": (1e4, 1.0)}
    else:
        assert spec.proportional == () and not spec.sandwich and not spec.attn_gate
        assert spec.rope_by_type == {"full_attention": (5000.0, 1.0), "sliding_attention": (20000.0, 1.0)}
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Lfm3ForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_transformers_in_memory_gate_name_reads_too(tmp_path_factory, tmp_path):
    """A checkpoint written with transformers' in-memory name of the gate (``g_proj``, not the hub's
    ``gate_proj``) gives the same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("gated", tmp_path_factory)
    tensors = load_file(str(d / "model.safetensors"))
    renamed = {k.replace(".self_attn.gate_proj.", ".self_attn.g_proj."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    shutil.copy(d / "config.json", tmp_path / "config.json")
    save_file(renamed, str(tmp_path / "model.safetensors"))
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


@pytest.mark.parametrize("first", ["full_attention", "sliding_attention"])
def test_bf16_keys_round_as_transformers_does(tmp_path, first):
    """In bf16 the keys a prefill stores in the first layer (its input is the same on both sides) equal
    transformers' cached keys: the same norms, and RoPE (the full layers' proportional one, the sliding layers'
    default one) turned in fp32 before the rounding."""
    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.gemma4 import layer_view

    cfg = {**CONFIG, "layer_types": [first, "conv", "conv", "conv", "conv"], "sliding_window": 32}
    Checkpoints({"first": ("Lfm3Config", "Lfm3ForCausalLM", cfg)}).model("first").save_pretrained(tmp_path)
    hf = transformers.Lfm3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    ours = load_checkpoint(tmp_path, dtype="bfloat16")
    seq = list(range(3, 26))
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(torch.tensor([seq]), cache=cache, use_cache=True)
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=8, block_tokens=4)
    table = pool.allocate(6)
    ours(SeqBatch.build([seq], [0], [table], 4), pool.layers)
    keys = layer_view(pool.layers[0], 2, 8)[table][:, :, 0].reshape(-1, 2, 8)[:23]
    assert_same_bf16_rounding(keys, cache.layers[0].keys[0].transpose(0, 1))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("gated", tmp_path_factory)
    hf = transformers.Lfm3ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key(tmp_path):
    base = {"architectures": ["Lfm3ForCausalLM"], "model_type": "lfm3", **CONFIG}
    for change, match in (({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e4,
                                                                   "factor": 2.0}}}, "rope_parameters"),
                          ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters"),
                          ({"sliding_window": None}, "sliding_window"),
                          ({"layer_types": ["conv", "mamba", "conv", "conv", "conv"]}, "layer_types")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})
    (tmp_path / "config.json").write_text(json.dumps({**base, "sliding_window": None}))
    with pytest.raises(Exception):  # noqa: B017  (transformers cannot build it either)
        transformers.Lfm3ForCausalLM(transformers.AutoConfig.from_pretrained(str(tmp_path)))(torch.tensor([[1, 2]]))


def test_image_text_checkpoint_runs_its_language_model(tmp_path):
    if not hasattr(transformers, "Lfm3VlForConditionalGeneration"):
        pytest.skip("no LFM3-VL in this transformers")
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "patch_size": 4}
    torch.manual_seed(0)
    cfg = transformers.Lfm3VlConfig(text_config={**CONFIG, "model_type": "lfm3"}, vision_config=vision)
    hf = transformers.Lfm3VlForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.05 * torch.randn_like(p)) if "norm" in n else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    assert load_spec(tmp_path).architecture == "lfm3"
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 2), []), cut=9)


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("gated", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
