"""Hy4 (``HYV4ForCausalLM``, model_type ``hy_v4``): GLM-5's sparse MLA (an indexer rotating the tail of each head,
"shared" layers reusing the last selection) with a sink per head and a sigmoid gate per output channel, under
hyper-connections (``hc_mult`` residual streams, fp32 pre / post gates, a collapsing head), and clamped-SwiGLU routed
experts. Against transformers' own model on random weights it wrote (the released tensor names): ``index_topk`` is
8, so past the first tokens the selection decides the logits, on full and shared layers alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    cluster_read_paths,
    dense_on_shared,
    hf_logits,
    load_checkpoint,
    routing_margins,
    widen_mla_moe,
)
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "HYV4ForCausalLM"):
    pytest.skip("this transformers has no Hy4", allow_module_level=True)

VOCAB = 97
#: 5 layers: transformers' default patterns (a dense first layer; indexers on layers 0, 1 and every fourth after)
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 5, "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "routed_scaling_factor": 2.5, "index_topk": 8, "index_n_heads": 16, "index_head_dim": 16, "hc_mult": 3,
    "hc_magnitude": 1.5, "hc_eps": 0.05, "swiglu_limit": 0.7, "max_position_embeddings": 256, "pad_token_id": None,
    "bos_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' model widened (:func:`widen_mla_moe`), and the parameters its init leaves inert drawn: sinks
    N(0, 1), the hyper-connections' biases N(0, 1) and scales 0.5 + N(0, 0.2); the head x3 (logits of a visible
    size)."""
    torch.manual_seed(0)
    hf = widen_mla_moe(transformers.HYV4ForCausalLM(transformers.HYV4Config(**CONFIG)).eval())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("sinks", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith(("_hc.scale", "hc_scale")):
                p.copy_(0.5 + 0.2 * torch.randn(p.shape, generator=g))
            elif n == "lm_head.weight":
                p.mul_(3.0)
    d = tmp_path_factory.mktemp("hy_v4")
    hf.save_pretrained(d)
    return d, hf


def _turns(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lens]


def test_spec_reads_transformers_defaults(ckpt):
    d, hf = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "hy_v4" and spec.has_dsa
    assert [spec.has_indexer(i) for i in range(5)] == [layer.self_attn.indexer is not None for layer in hf.model.layers]
    assert spec.index_shared_layers == (2, 3, 4) and spec.index_rope_tail and not spec.rope_interleave
    assert [spec.is_moe_layer(i) for i in range(5)] == [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert (spec.hc_mult, spec.hc_magnitude, spec.swiglu_limit, spec.rms_eps) == (3, 1.5, 0.7, 1e-5)
    assert DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32") == spec
    other = DeepseekV3Spec.from_hf_config({**spec.to_hf_config(), "architectures": ["GlmMoeDsaForCausalLM"],
                                           "model_type": "glm_moe_dsa", "hc_mult": None, "swiglu_limit": None,
                                           "hc_magnitude": None, "hc_eps": None}, dtype="float32")
    assert other.fingerprint() != spec.fingerprint()


def test_default_patterns_read_as_transformers_reads_them():
    """Without ``indexer_types`` / ``mlp_layer_types`` (and with ``num_local_experts`` naming the experts): the
    indexers and dense layers transformers' config derives, for several depths."""
    base = {k: v for k, v in CONFIG.items() if k != "n_routed_experts"}
    for n in (1, 2, 6, 10):
        theirs = transformers.HYV4Config(**{**base, "num_hidden_layers": n, "num_local_experts": 8})
        spec = DeepseekV3Spec.from_hf_config({"architectures": ["HYV4ForCausalLM"], "model_type": "hy_v4", **base,
                                              "num_hidden_layers": n, "num_local_experts": 8})
        assert [spec.has_indexer(i) for i in range(n)] == [k == "full" for k in theirs.indexer_types], n
        assert [spec.is_moe_layer(i) for i in range(n)] == [k == "sparse" for k in theirs.mlp_layer_types], n
        assert spec.n_routed_experts == theirs.n_routed_experts == 8


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(load_checkpoint(d), hf, _turns(0, (11, 5, 7)), 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) == 21 and ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    d, hf = ckpt
    check_batched_against_hf(load_checkpoint(d), hf, _turns(3, (23, 14)), cuts=(12, 9))


def test_sinks_and_the_shared_selection_matter(ckpt):
    """Past index_topk: with the sinks at -inf (none) the logits move, and so they do when a shared layer attends to
    every visible key instead of the reused selection; before index_topk keys the latter changes nothing."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = _turns(8, (30,))[0]

    def logits() -> torch.Tensor:
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    want = logits()
    model._sparse_attention = dense_on_shared(model._sparse_attention)
    try:
        moved = logits()
    finally:
        del model._sparse_attention
    assert torch.allclose(moved[:8], want[:8], atol=1e-5) and float((moved[8:] - want[8:]).abs().max()) > 1e-2
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
    assert float((logits() - want).abs().max()) > 1e-2


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained: the released names transformers writes (experts packed, ``hc_pre.*``,
    ``learnable_sink_param``, ``linear_gate``), read by transformers to the same logits."""
    from safetensors.torch import load_file

    d, _ = ckpt
    model = load_checkpoint(d)
    save_pretrained(model, tmp_path)
    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(load_file(str(d / "model.safetensors")))
    hf2, info = transformers.HYV4ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["indexer_types"] == ["full", "full", "shared", "shared", "shared"]
    seq = _turns(4, (21,))[0]
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    ours = model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(ours, hf_logits(hf2.eval(), seq), atol=2e-4, rtol=1e-4)


def test_bf16_teacher_forced_logits(ckpt):
    """In bf16 (the hyper-connections, sinks, router and indexer weights in fp32, as transformers keeps them): as
    close to the fp32 logits as transformers' own bf16 forward, over the tokens whose experts no layer picks within
    5% of a tie (there bf16 rounding alone flips the pick on either side)."""
    d, hf32 = ckpt
    ours = load_checkpoint(d, dtype="bfloat16")
    assert ours.model.layers[1].attn_hc.fn.dtype == torch.float32 and ours.model.hc_head.hc_fn.dtype == torch.float32
    assert ours.model.layers[1].self_attn.sinks.dtype == torch.float32
    assert ours.model.layers[1].self_attn.q_b_proj.weight.dtype == torch.bfloat16
    hf = transformers.HYV4ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = _turns(5, (25,))[0]
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("indexer_types", ["shared", "full", "full", "full", "full"], "first layer must be 'full'"),
    ("indexer_types", ["full", "shared"], "indexer_types"),
    ("hc_mult", 0, "hc_mult"),
    ("hc_magnitude", "big", "hc_magnitude"),
    ("swiglu_limit", 0.0, "swiglu_limit"),
    ("mlp_layer_types", ["sparse", "dense", "sparse", "sparse", "sparse"], "mlp_layer_types"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match=needle):
        DeepseekV3Spec.from_hf_config({**cfg, key: value})


@pytest.mark.anyio
async def test_cluster_every_read_path_past_index_topk(ckpt):
    d, hf = ckpt
    first, second = _turns(5, (23, 7))
    await cluster_read_paths(LlamaModelConfig(path=str(d), dtype="float32", time_model="off"), hf, first, second, 24)


def test_the_image_text_checkpoints_language_model(ckpt, tmp_path):
    """A ``HYV4VLForConditionalGeneration`` checkpoint written by transformers (the released layout: the language
    model under ``model.``, the vision tower under ``vit.``) serves its language model, which differs from Hy4's
    text model on the same weights (RoPE over interleaved pairs, in the indexer too; M-RoPE; latent norms at
    ``rms_norm_eps``): the VL model's own logits on a text prompt."""
    d, hf = ckpt
    text = {**CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
    mm = transformers.HYV4VLForConditionalGeneration(transformers.HYV4VLConfig(
        text_config=text, vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                         "num_hidden_layers": 1, "out_hidden_size": 64})).eval()
    with torch.no_grad():
        missing = mm.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}, strict=False)
        assert not missing.missing_keys and not missing.unexpected_keys
        mm.lm_head.weight.copy_(hf.lm_head.weight)
    mm.save_pretrained(tmp_path)
    spec = load_spec(tmp_path, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "hy_v4_vl_text"
    assert spec.latent_norm_eps == 1e-5 and spec.rope_interleave and spec.index_rope_interleave
    assert spec == DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32")
    seq = _turns(6, (21,))[0]
    with torch.no_grad():
        want = mm(input_ids=torch.tensor([seq])).logits[0].float()
    assert float((want - hf_logits(hf, seq)).abs().max()) > 1e-2
    model = load_checkpoint(tmp_path)
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    table = pool.allocate(8)
    got = torch.cat([model(SeqBatch.build([seq[:9]], [0], [table], 4), pool.layers, all_positions=True),
                     model(SeqBatch.build([seq[9:]], [9], [table], 4), pool.layers, all_positions=True)])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
