"""Gemma 4's text model (``Gemma4ForCausalLM``, ``Gemma4UnifiedForCausalLM``, and the image-text checkpoints serving
them) against transformers on the same random weights, saved by transformers: full layers with their own head width
and KV heads (keys as values), shared-KV layers, per-layer embeddings, the MoE block beside the MLP, double-wide MLPs,
a RoPE per layer type (proportional on the full layers) and sliding windows; and its configs read as transformers
reads them (``global_head_dim`` and its 512 default, ``per_layer_config``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_paged_paths_against_hf,
    check_save_reads_back,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4ForCausalLM"):
    pytest.skip("no Gemma 4 in this transformers", allow_module_level=True)

VOCAB = 101
_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
          "full_attention"]
#: every mechanism at once: the last two layers share the KV of layers 3 (sliding) and 2 (full)
FULL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
        "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 5, "layer_types": _TYPES,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": VOCAB, "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
        "moe_intermediate_size": 24, "final_logit_softcapping": 30.0, "max_position_embeddings": 256}
#: the dense pattern (31B-like): full layers twice as wide with as many KV heads (pages sized for them, the sliding
#: layers' rows a strided view of their front half), no per-layer embeddings
DENSE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
         "sliding_window": 6, "layer_types": _TYPES[1:5], "hidden_size_per_layer_input": 0,
         "max_position_embeddings": 256}


class _Gemma4Checkpoints(Checkpoints):
    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        with torch.no_grad():  # (widened weights, but each layer's output scalar near 1, not 6)
            for layer in hf.model.layers:
                layer.layer_scalar.copy_(1.0 + 0.1 * torch.randn(1))
        return hf


_CKPTS = _Gemma4Checkpoints({"full": ("Gemma4TextConfig", "Gemma4ForCausalLM", FULL),
                             "dense": ("Gemma4TextConfig", "Gemma4ForCausalLM", DENSE)})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_pages_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "gemma4_text"
    if family == "full":
        assert spec.layer_kv == ((2, 16), (2, 16), (1, 32), (2, 16), (2, 16), (1, 32))
        assert [spec.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]
        assert [spec.mlp_width(i) for i in range(6)] == [48] * 4 + [96] * 2
    else:
        assert spec.layer_kv == ((2, 16), (2, 32), (2, 16), (2, 32))
        kv = spec.kv_spec()
        assert (kv.n_kv_heads, kv.head_dim) == (2, 32)  # (one page shape: the widest layer's)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Gemma4ForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_a_shared_layer_pages_hold_its_source_layers_keys_and_values(tmp_path_factory):
    """The shared layers write the KV they read into their own pages: layer 4's pages equal layer 3's, layer 5's
    layer 2's, so a prefix read from storage serves every layer."""
    from dualpath.model import SeqBatch

    d, _ = _CKPTS.get("full", tmp_path_factory)
    ours = load_checkpoint(d)
    pool = KVPool(ours.spec.kv_spec(), num_blocks=6, block_tokens=4)
    table = pool.allocate(6)
    ours(SeqBatch.build([random_turns(VOCAB, 4)[0]], [0], [table], 4), pool.layers)
    assert pool.layer(3)[table].abs().max() > 0
    torch.testing.assert_close(pool.layer(4), pool.layer(3), atol=0, rtol=0)
    torch.testing.assert_close(pool.layer(5), pool.layer(2), atol=0, rtol=0)
    assert not torch.equal(pool.layer(2), pool.layer(3))


def test_bf16_teacher_forced_logits(ckpt):
    """Our bf16 logits are as close to transformers' fp32 ones as transformers' own bf16 logits are (on the tokens
    whose router logits do not nearly tie). This model's bf16 rounding alone moves logits by up to a sixth of
    their range (six layers of widened random weights, each renormed), on both implementations alike."""
    family, d, hf32 = ckpt
    hf = transformers.Gemma4ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    fp32 = hf_logits(hf32, seq)
    rows = torch.ones(len(seq), dtype=torch.bool)
    if family == "full":
        rows = routing_margins(hf32, seq, 2, lambda layer: layer.router.proj) > 0.05
        assert int(rows.sum()) >= len(seq) // 2
    check_bf16_as_close_as_transformers(got, ref, fp32, rows)


def test_the_image_text_checkpoint_serves_its_language_model(tmp_path):
    """``Gemma4ForConditionalGeneration`` as transformers writes it (``model.language_model.``, the vision tower and
    its embedder beside it), with a time model calibrated on it."""
    vision = dict(transformers.Gemma4VisionConfig().to_dict(), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    cfg = transformers.Gemma4Config(text_config=FULL, vision_config=vision, audio_config=None)
    torch.manual_seed(2)
    hf = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)[0]
    assert ours.spec.architecture == "gemma4_text" and ours.spec.ple_size == 8
    check_batched_against_hf(ours, hf, two_sequences(VOCAB))


def test_the_unified_text_model(tmp_path):
    """``Gemma4UnifiedForCausalLM``: Gemma 4 without per-layer embeddings or MoE, its own defaults (a 1024-token
    window, 262,144 positions)."""
    kw = {k: v for k, v in FULL.items() if k not in ("hidden_size_per_layer_input", "vocab_size_per_layer_input",
                                                     "enable_moe_block", "num_experts", "top_k_experts",
                                                     "moe_intermediate_size", "sliding_window",
                                                     "max_position_embeddings")}
    torch.manual_seed(4)
    hf = transformers.Gemma4UnifiedForCausalLM(transformers.Gemma4UnifiedTextConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(tmp_path)
    assert (ours.spec.ple_size, ours.spec.moe_experts, ours.spec.sliding_window, ours.spec.max_position) == (
        0, 0, 1024, 262144)
    check_batched_against_hf(ours, hf, two_sequences(VOCAB))


@pytest.mark.parametrize("extra", [
    {},  # global_head_dim's default (512), whatever head_dim is
    {"global_head_dim": 32, "num_global_key_value_heads": 1},  # ignored heads: attention_k_eq_v is false
    {"global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True},
    {"per_layer_config": {"1": {"head_dim": 24, "num_key_value_heads": 1}, "3": {"num_key_value_heads": 4,
                                                                               "head_dim": 24}}},
    {"layer_types": ["sliding_attention"] * 4},  # (the last layer forced to full attention)
    {"hidden_size_per_layer_input": 0},  # (0: no per-layer embeddings; absent: 256 of them)
])
def test_per_layer_kv_shapes_as_transformers_reads_them(extra, tmp_path):
    """Each layer's (KV heads, head_dim) is what transformers' heterogeneous config gives it, from a config.json
    written by hand as hub checkpoints write theirs."""
    cfg = {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", **DENSE, **extra}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    want = tuple((hf.per_layer_config[i].num_key_value_heads, hf.per_layer_config[i].head_dim) for i in range(4))
    spec = load_spec(tmp_path)
    assert spec.layer_kv == want and spec.layer_types == tuple(hf.layer_types)
    assert spec.ple_size == (hf.hidden_size_per_layer_input or 0)


@pytest.mark.parametrize("change, match", [
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention 'all'"),
    ({"per_layer_config": {"1": {"intermediate_size": 8}}}, r"per_layer_config\['1'\] overrides \['intermediate_size'\]"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "yarn", "factor": 2.0},
                          "full_attention": {"rope_type": "default"}}}, "rope_type 'yarn' unsupported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "rope_parameters.sliding_attention"),
    ({"num_kv_shared_layers": 4}, r"num_kv_shared_layers must be in \[0, 3\]"),
    ({"num_kv_shared_layers": 3, "layer_types": ["full_attention", "sliding_attention", "full_attention",
                                                 "full_attention"]}, "no earlier non-shared sliding_attention"),
    ({"hidden_activation": "tanh"}, "hidden_activation 'tanh'"),
    # (transformers builds one RoPE table per layer type: it fails on these too)
    ({"per_layer_config": {"0": {"head_dim": 8}}}, r"sliding_attention layers have different head_dim \[8, 16\]"),
    ({"per_layer_config": {"1": {"num_key_value_heads": 3}}}, "divide num_attention_heads"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["Gemma4ForCausalLM"], **DENSE, **change})


def test_the_assistant_models_are_refused_with_the_reason():
    for arch, model_type in (("Gemma4AssistantForCausalLM", "gemma4_assistant"),
                             ("Gemma4UnifiedAssistantForCausalLM", "gemma4_unified_assistant")):
        with pytest.raises(ModelError, match="draft model"):
            load_spec({"architectures": [arch], "model_type": model_type})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster (every Gemma 4 mechanism, shared-KV layers' pages read back
    from storage): PE, DE, split and recompute reads give transformers' greedy tokens."""
    d, hf = _CKPTS.get("full", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
