"""Mistral Large 4's language model (``MistralLarge4ForConditionalGeneration``'s ``mistral_large4_text``: MLA without
a query LoRA under DeepSeek Sparse Attention, position-scaled queries, NoPE layers, layers sharing an earlier layer's
latent KV, LeRoPE over YaRN, Mistral 4's softmax router, soft-capped logits) against transformers' image-text model on
random weights it wrote (the released tensor names): logits at every prefill chunk and decode step over the paged pool,
batched sequences, the Triton kernels, bf16, our save_pretrained read back, every cluster read path. ``index_topk``
is 6: from the seventh token on the selection decides the logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    LanguageModelView,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_text_config_refused,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    dense_on_shared,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
    widen_mla_moe,
)

from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import save_pretrained
from dualpath.model.mistral_large4 import MistralLarge4Spec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MistralLarge4ForConditionalGeneration"):
    pytest.skip("no Mistral Large 4 in this transformers", allow_module_level=True)

VOCAB = 97
#: six layers: NoPE layers 3 and 4 (4 sharing 3's latent), layer 2 sharing layer 1's, shared indexers on 2 and 4
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "routed_scaling_factor": 1.5,
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 8, "index_topk": 6,
    "index_head_dim": 16, "index_n_heads": 16, "kv_source_layers": [0, 1, 1, 3, 3, 5],
    "no_rope_layers": [1, 1, 1, 0, 0, 1], "indexer_types": ["full", "full", "shared", "full", "shared", "full"],
    "max_position_embeddings": 256, "final_logit_softcapping": 30.0,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
                        "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0},
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "head_dim": 8}




def _checkpoint(d: Any, text: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' image-text model, its language model widened (:func:`widen_mla_moe`) and the parameters its init
    leaves inert drawn: the query scalings (scale N(0, 0.3), bias 1 + N(0, 0.3)) and LeRoPE's alpha N(0, 0.3); the
    head x3; written by its save_pretrained into ``d``."""
    torch.manual_seed(0)
    hf = transformers.MistralLarge4ForConditionalGeneration(
        transformers.MistralLarge4Config(text_config=text, vision_config=VISION)).eval()
    widen_mla_moe(hf.model.language_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.model.language_model.named_parameters():
            if n.endswith(("softmax_scaling.scale", "rotary_emb.alpha")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("softmax_scaling.bias"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        hf.lm_head.weight.mul_(3.0)
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("mistral_large4"), TEXT)


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, MistralLarge4Spec) and spec.architecture == "mistral_large4_text" and spec.has_dsa
    assert spec.nope_layers == (3, 4) and spec.kv_sources == (0, 1, 1, 3, 3, 5)
    assert spec.index_shared_layers == (2, 4) and spec.q_lora_rank is None and spec.final_softcap == 30.0
    assert [spec.is_kv_source(i) for i in range(6)] == [m == "store" for m in hf.config.text_config.kv_sharing_modes]
    assert load_spec(spec.to_hf_config()) == spec


def test_default_patterns_read_as_transformers_reads_them():
    """With no per-layer lists: NoPE every fourth layer, each layer its own latent, every indexer full, the first
    layer dense, YaRN with LeRoPE; as MistralLarge4TextConfig derives them, for several depths."""
    base = {k: v for k, v in TEXT.items() if k not in ("kv_source_layers", "no_rope_layers", "indexer_types",
                                                       "rope_parameters")}
    for n in (1, 4, 9):
        theirs = transformers.MistralLarge4TextConfig(**{**base, "num_hidden_layers": n})
        spec = load_spec({"architectures": ["MistralLarge4ForConditionalGeneration"],
                          "text_config": {**base, "num_hidden_layers": n}})
        assert [int(spec.rope_layer(i)) for i in range(n)] == theirs.no_rope_layers, n
        assert list(spec.kv_sources) == theirs.kv_source_layers and spec.index_shared_layers == ()
        assert [i >= spec.first_k_dense_replace for i in range(n)] == [k == "sparse" for k in theirs.mlp_layer_types]
        assert spec.rope_scaling is not None and spec.rope_scaling["factor"] == theirs.rope_parameters["factor"]


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, random_turns(VOCAB, 3, (5,))[0])


def test_shared_latents_and_selection_matter(ckpt):
    """Past index_topk: a shared layer attending to every visible key instead of the reused selection moves the
    logits; so does a layer that shares a latent computing none (zeros in its rows); and every row a sharing layer
    holds equals its source's."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = random_turns(VOCAB, 8, (20,))[0]

    def logits() -> tuple[torch.Tensor, KVPool, list[int]]:
        pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
        table = pool.allocate(8)
        return model(SeqBatch.build([seq], [0], [table], 4), pool.layers, all_positions=True), pool, table

    want, pool, table = logits()
    width = model.spec.latent_dim
    rows = [layer[table].reshape(-1, layer.shape[-1])[: len(seq), :width] for layer in pool.layers]
    assert torch.equal(rows[2], rows[1]) and torch.equal(rows[4], rows[3]) and not torch.equal(rows[1], rows[0])
    assert float(rows[3][:, model.spec.kv_lora_rank:].abs().max()) == 0  # (a NoPE layer's RoPE slot)
    model._sparse_attention = dense_on_shared(model._sparse_attention)
    try:
        moved = logits()[0]
    finally:
        del model._sparse_attention
    assert torch.allclose(moved[:6], want[:6], atol=1e-5) and float((moved[6:] - want[6:]).abs().max()) > 1e-2


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the released names (experts one by one, ``ssmax_scaling``, ``lerope.alpha``) and
    the image-text config; transformers loads it (only the vision tower and projector missing) to the same
    logits."""
    from safetensors.torch import load_file

    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    theirs = {k for k in load_file(str(d / "model.safetensors"))
              if not k.startswith(("vision_encoder.", "patch_merger.", "pre_mm_projector_norm.",
                                   "vision_language_adapter."))}
    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(theirs)
    cfg = transformers.MistralLarge4Config.from_pretrained(str(tmp_path))
    cfg.vision_config = hf.config.vision_config  # (ours names no vision tower: a small one to build)
    hf2, info = transformers.MistralLarge4ForConditionalGeneration.from_pretrained(
        str(tmp_path), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] and all("vision" in k or "projector" in k for k in info["missing_keys"]), info
    assert not info["unexpected_keys"], info
    check_two_chunks_against_hf(ours, hf2.eval(), random_turns(VOCAB, 7, (15,))[0], cut=15)


def test_bf16_teacher_forced_logits(tmp_path):
    """In bf16 (router, LeRoPE and the indexer's head weights in fp32, as transformers keeps them): as close to the
    fp32 logits as transformers' own bf16 forward, over the tokens no layer routes within 5% of a tie. With
    ``index_topk`` past the sequence: in bf16 the selection's near-ties flip on either side (transformers' own bf16
    logits then move by up to the logits' whole range), and the fp32 tests above check the selection."""
    d, hf32 = _checkpoint(tmp_path, {**TEXT, "index_topk": 64})
    ours = load_checkpoint(d, dtype="bfloat16")
    assert ours.model.rotary_emb.alpha.dtype == torch.float32
    assert ours.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    hf = transformers.MistralLarge4ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("kv_source_layers", [0, 1, 1, 3, 3, 0], "latest earlier source of its kind, layer 1"),
    ("kv_source_layers", [0, 1, 1, 3, 3], "kv_source_layers must list an integer for each of the 6 layers"),
    ("kv_source_layers", [0, 0, 1, 3, 3, 5], "an earlier layer that keeps its own"),
    ("kv_source_layers", [0, 1, 1, 1, 3, 5], "not the same kind"),
    ("no_rope_layers", [1, 1, 1, 2, 0, 1], "no_rope_layers"),
    ("mlp_layer_types", ["sparse", "dense", "sparse", "sparse", "sparse", "sparse"], "mlp_layer_types"),
    ("indexer_types", ["shared", "full", "full", "full", "full", "full"], "first layer must be 'full'"),
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("final_logit_softcapping", -1.0, "final_logit_softcapping"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
