"""MiniMax-M3's language model (``MiniMaxM3SparseForConditionalGeneration``'s ``minimax_m3_vl_text``, and the text
model ``MiniMaxM3VLForCausalLM``): Gemma-normed GQA with partial RoPE, block-sparse layers whose indexer keeps each
query's best key blocks per indexer head (its key in the page row after the KV heads), clamped SwiGLUs, a sigmoid
router with a correction bias and a shared expert; against transformers on random weights it wrote. Blocks of 4
keys, 2 kept: from the ninth token on the selection decides the logits."""

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
    check_save_reads_back,
    check_text_config_refused,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.model import KVPool, SeqBatch
from dualpath.model.minimax_m3 import MiniMaxM3Model, MiniMaxM3Spec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MiniMaxM3SparseForConditionalGeneration"):
    pytest.skip("no MiniMax-M3 in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rotary_dim": 8,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "num_local_experts": 4, "num_experts_per_tok": 2, "dense_intermediate_size": 48, "shared_intermediate_size": 24,
    "routed_scaling_factor": 1.5, "swiglu_limit": 2.0, "index_n_heads": 2, "index_head_dim": 16,
    "index_block_size": 4, "index_topk_blocks": 2, "index_local_blocks": 1,
    "layer_types": ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "max_position_embeddings": 256,
    "bos_token_id": None, "eos_token_id": None}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}




def _widen(lm: Any) -> None:
    """Norms N(0, 0.3) around Gemma's ``1 + weight``, other weights x4, live correction biases."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "norm" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4.0)
        for n, b in lm.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.MiniMaxM3SparseForConditionalGeneration(
        transformers.MiniMaxM3VLConfig(text_config=TEXT, vision_config=VISION)).eval()
    _widen(hf.model.language_model)
    with torch.no_grad():
        hf.lm_head.weight.mul_(3.0)
    d = tmp_path_factory.mktemp("minimax_m3")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, MiniMaxM3Spec) and spec.architecture == "minimax_m3_vl_text"
    assert spec.sparse_layers == (1, 2) and spec.dense_layers == (0,) and spec.rotary_dim == 8
    assert (spec.moe_width, spec.shared_width, spec.intermediate_size) == (32, 24, 48)
    assert spec.kv_spec().n_kv_heads == 2 + 1  # (a token's 16-value indexer key in one more head's K and V)
    assert load_spec(spec.to_hf_config()) == spec
    # RoPE turns head_dim x partial_rotary_factor dims (in rope_parameters or at the top level), as transformers'
    # model does; the config's rotary_dim is read by neither
    cfg = json.loads((d / "config.json").read_text())["text_config"]
    for rope in ({"rope_parameters": None, "partial_rotary_factor": 0.25, "rotary_dim": 64},
                 {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rotary_dim": 8}):
        theirs = transformers.MiniMaxM3VLTextConfig(**{**cfg, **rope})
        ours = load_spec({"architectures": ["MiniMaxM3VLForCausalLM"], **cfg, **rope})
        assert ours.rotary_dim == int(16 * theirs.rope_parameters.get("partial_rotary_factor", 1.0)), rope
    # the legacy keys MiniMaxM3VLTextConfig reads: sparse_attention_config, moe_layer_freq, num_experts
    legacy = {k: v for k, v in TEXT.items() if not k.startswith("index_") and k not in ("layer_types",
                                                                                         "mlp_layer_types")}
    legacy.update(sparse_attention_config={"sparse_num_index_heads": 2, "sparse_index_dim": 16,
                                           "sparse_block_size": 4, "sparse_topk_blocks": 3, "sparse_local_block": 2,
                                           "sparse_attention_freq": [0, 1, 0, 1]}, moe_layer_freq=[0, 0, 1, 1])
    theirs = transformers.MiniMaxM3VLTextConfig(**legacy)
    ours = load_spec({"architectures": ["MiniMaxM3VLForCausalLM"], **legacy})
    assert [i in ours.sparse_layers for i in range(4)] == [t == "minimax_m3_sparse" for t in theirs.layer_types]
    assert [i in ours.dense_layers for i in range(4)] == [t == "dense" for t in theirs.mlp_layer_types]
    assert (ours.idx_topk, ours.idx_local, ours.idx_block) == (theirs.index_topk_blocks, theirs.index_local_blocks,
                                                               theirs.index_block_size)


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_the_block_selection_matters(ckpt, monkeypatch):
    """Every visible block instead of the kept ones moves the logits from the ninth token on (three complete
    blocks, two kept), not before; so does one selection for every head instead of one per indexer head."""
    d, hf = ckpt
    seq = sum(random_turns(VOCAB, 4), [])
    ref = hf_logits(hf, seq)

    def run() -> torch.Tensor:
        model = load_checkpoint(d)
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    torch.testing.assert_close(run(), ref, atol=2e-4, rtol=1e-4)
    real = MiniMaxM3Model._blocks_kept

    def every_block(self, iq, ikeys, visible, qp, blocks):
        kept = real(self, iq, ikeys, visible, qp, blocks)
        return torch.ones_like(kept)

    def first_head(self, iq, ikeys, visible, qp, blocks):
        kept = real(self, iq, ikeys, visible, qp, blocks)
        return kept[:1].expand_as(kept)

    monkeypatch.setattr(MiniMaxM3Model, "_blocks_kept", every_block)
    moved = run()
    assert torch.allclose(moved[:8], ref[:8], atol=2e-4) and float((moved[8:] - ref[8:]).abs().max()) > 0.05
    monkeypatch.setattr(MiniMaxM3Model, "_blocks_kept", first_head)
    assert float((run()[8:] - ref[8:]).abs().max()) > 0.05


def test_save_reads_back_as_the_text_model(ckpt, tmp_path):
    """Our save_pretrained writes the text model (``MiniMaxM3VLForCausalLM``: packed experts, fused MLPs), which
    transformers loads with nothing missing to the same logits; the text model's own checkpoint loads too."""
    d, _ = ckpt
    ours = load_checkpoint(d)
    check_save_reads_back(ours, tmp_path / "ours", transformers.MiniMaxM3VLForCausalLM,
                          random_turns(VOCAB, 7, (19,))[0])
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["MiniMaxM3VLForCausalLM"]
    text = transformers.MiniMaxM3VLForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    text.save_pretrained(tmp_path / "theirs")
    check_two_chunks_against_hf(load_checkpoint(tmp_path / "theirs"), text, random_turns(VOCAB, 8, (17,))[0], cut=9)


def test_bf16_teacher_forced_logits(ckpt):
    """In bf16: as close to the fp32 logits as transformers' own bf16 forward, over the tokens no layer routes
    within 5% of a tie."""
    d, hf32 = ckpt
    ours = load_checkpoint(d, dtype="bfloat16")
    hf = transformers.MiniMaxM3SparseForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1},
     "partial_rotary_factor"),
    ("index_n_heads", 3, "multiple of index_n_heads"),
    ("index_topk_blocks", 0, "index_topk_blocks"),
    ("layer_types", ["full_attention", "sliding_attention", "full_attention", "full_attention"], "layer_types"),
    ("mlp_layer_types", ["dense", "sparse"], "mlp_layer_types"),
    ("swiglu_limit", 0.0, "swiglu_limit"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "only 'default'"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
