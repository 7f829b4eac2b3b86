"""GLM-5.3-Flash's language model (``Glm5NextForConditionalGeneration``'s ``glm5_next_text``: Kimi Delta Attention
layers with a bounded fp32 decay, MLA layers with no RoPE under a pooled sparse selection, DeepSeek-V4's
hyper-connections, clamped SwiGLUs) against transformers' image-text model on random weights it wrote: logits at every
prefill chunk and decode step over pages holding latent rows, indexer rows and KDA states, batched sequences, 64-token
blocks, a hit from a stored Full Block's page, the pooled selection and its reuse on shared layers shown to matter,
our save_pretrained read back by transformers, bf16, and a two-turn session through the emulated cluster.
``index_topk`` is 8 over pools of 4: from the twelfth token on the selection decides the logits."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    LanguageModelView,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_long_segments,
    check_text_config_refused,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    dense_on_shared,
    hf_logits,
    keep_recurrent_state,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.engine.model_api import paged_kv_spec
from dualpath.model import KVPool, SeqBatch
from dualpath.model.kimi_linear import KimiLinearSpec
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Glm5NextForConditionalGeneration"):
    pytest.skip("no GLM-5.3-Flash in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 0, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "index_topk": 8, "index_head_dim": 16, "index_n_heads": 16,
    "linear_head_dim": 8, "linear_num_heads": 4, "linear_conv_kernel_dim": 3, "hc_mult": 3,
    "hc_sinkhorn_iters": 5, "index_kpool": 4, "swiglu_limit": 0.7,
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    "layer_types": ["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
    "indexer_types": ["full", "full", "shared", "full"], "max_position_embeddings": 256, "pad_token_id": None,
    "bos_token_id": None, "eos_token_id": None}
VISION: dict[str, Any] = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 64}




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' image-text model, its language model widened (norms around one, weights x6, the routers'
    correction biases, the pooling positions and the hyper-connections' biases live; decays that keep the KDA
    state), written by its save_pretrained."""
    torch.manual_seed(0)
    hf = transformers.Glm5NextForConditionalGeneration(
        transformers.Glm5NextConfig(text_config=TEXT, vision_config=VISION)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "visual" in n:
                continue
            if n.endswith(("norm.weight", "bias")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith(("_hc.base", "index_kpool_compress_ape")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.mul_(6.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    keep_recurrent_state(hf)
    d = tmp_path_factory.mktemp("glm5_next")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, KimiLinearSpec) and spec.architecture == "glm5_next_text"
    assert spec.layer_types == ("linear_attention", "full_attention", "full_attention", "linear_attention")
    assert spec.index_shared_layers == (2,) and [spec.has_indexer(i) for i in range(4)] == [False, True, False, False]
    assert (spec.qk_rope_head_dim, spec.index_kpool, spec.hc_mult, spec.hc_iters) == (0, 4, 3, 5)
    assert spec.gate_lower_bound == -5.0 and spec.latent_norm_eps == spec.rms_eps == 1e-5
    assert load_spec(spec.to_hf_config()) == spec


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []), cut=7)
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_a_hit_continues_from_the_stored_state(ckpt):
    d, hf = ckpt
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_the_pooled_selection_and_its_reuse_matter(ckpt, monkeypatch):
    """Every visible key instead of the pooled selection (on the full layer, or only on the shared one) gives other
    logits from the twelfth token on (three closed pools, two kept), and the same before it."""
    from dualpath.model import deepseek

    d, hf = ckpt
    seq = sum(random_turns(VOCAB, 3), [])
    ref = hf_logits(hf, seq)

    def run(model: Any) -> torch.Tensor:
        pool = KVPool(paged_kv_spec(model.spec, 4), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    torch.testing.assert_close(run(load_checkpoint(d)), ref, atol=2e-4, rtol=1e-4)
    real = deepseek.pooled_selection

    def dense(q, w, rows, ape, qpos, topk, kpool):
        return torch.arange(rows.shape[0])[None, :] <= qpos[:, None]

    monkeypatch.setattr(deepseek, "pooled_selection", dense)
    moved = run(load_checkpoint(d))
    assert torch.allclose(moved[:11], ref[:11], atol=2e-4) and float((moved[11:] - ref[11:]).abs().max()) > 0.05
    monkeypatch.setattr(deepseek, "pooled_selection", real)
    model = load_checkpoint(d)
    model._sparse_attention = dense_on_shared(model._sparse_attention)
    assert float((run(model)[11:] - ref[11:]).abs().max()) > 0.05


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the image-text checkpoint's language model (its names, config): transformers'
    model loads it (only its vision tower missing) to the same logits."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Glm5NextForConditionalGeneration"] and load_spec(tmp_path) == ours.spec
    hf2, info = transformers.Glm5NextForConditionalGeneration.from_pretrained(
        str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] and all(".visual." in k or "vision" in k for k in info["missing_keys"]), info
    assert not info["unexpected_keys"], info
    seq = sum(random_turns(VOCAB, 7), [])
    check_two_chunks_against_hf(ours, hf2.eval(), seq, cut=len(seq))


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.Glm5NextForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("qk_rope_head_dim", 8, "qk_rope_head_dim"),
    ("index_kpool_always_select_tail", False, "index_kpool_always_select_tail"),
    ("linear_lower_bound", 1.0, "linear_lower_bound"),
    ("indexer_types", ["full", "shared", "full", "full"], "indexer_types"),
    ("swiglu_limit", 0.0, "swiglu_limit"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
