"""dots3-note's language model (``Dots3NoteForCausalLM``, and ``Dots3NoteForConditionalGeneration``'s): MLA layers of
three kinds (sparse with a lightning indexer, dense, sliding over 5 keys) with their own shapes (the sliding layers'
from ``per_layer_config``: fewer heads, other latent widths), LoRA-scaled latents, a normed RoPE key, per-head output
gates, a RoPE per layer type; against transformers on random weights it wrote. ``index_topk`` is 6."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
    widen_mla_moe,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.dots3_note import Dots3NoteSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Dots3NoteForCausalLM"):
    pytest.skip("no dots3-note in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_nope_head_dim": 8,
    "head_dim": 16, "index_topk": 6, "index_head_dim": 16, "index_n_heads": 16, "shared_experts_intermediate_size": 24,
    "layer_types": ["indexed_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "sliding_window": 5, "use_dsa": None,
    "max_position_embeddings": 256, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    "swa_num_attention_heads": 2, "swa_num_key_value_heads": 2, "swa_q_lora_rank": 12, "swa_kv_lora_rank": 20,
    "swa_head_dim": 20, "swa_qk_nope_head_dim": 12, "swa_v_head_dim": 8}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = widen_mla_moe(transformers.Dots3NoteForCausalLM(transformers.Dots3NoteTextConfig(**CONFIG)).eval())
    d = tmp_path_factory.mktemp("dots3_note")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_config_as_transformers_does(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Dots3NoteSpec) and spec.architecture == "dots3_note_text"
    assert spec.layer_types == ("indexed_attention", "sliding_attention", "full_attention", "sliding_attention")
    assert spec.layer_dims[1] == (2, 12, 20, 12, 8, 8) and spec.layer_dims[0] == (4, 24, 16, 8, 8, 16)
    assert [spec.has_indexer(i) for i in range(4)] == [True, False, False, False]
    assert spec.kv_spec().row_elems == 28 + 16  # (the widest latent, the sliding layers' 20 + 8, then the key)
    assert load_spec(spec.to_hf_config()) == spec
    # transformers' derivations: use_dsa turns full layers indexed; the default pattern; the swa_* shapes
    base = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "use_dsa")}
    for extra in ({"num_hidden_layers": 7}, {"num_hidden_layers": 6, "use_dsa": False},
                  {"num_hidden_layers": 5, "use_sliding_window": False}):
        theirs = transformers.Dots3NoteTextConfig(**{**base, "mlp_layer_types": None, **extra})
        ours = load_spec({"architectures": ["Dots3NoteForCausalLM"], **base, "mlp_layer_types": None, **extra})
        assert list(ours.layer_types) == theirs.layer_types, extra
        assert [i not in ours.dense_layers for i in range(theirs.num_hidden_layers)] == [
            t == "sparse" for t in theirs.mlp_layer_types]
        for i, t in enumerate(theirs.layer_types):
            lc = theirs.per_layer_config[i]
            assert ours.layer_dims[i] == (lc.num_attention_heads, lc.q_lora_rank, lc.kv_lora_rank,
                                          lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.v_head_dim), (extra, i, t)


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_the_window_and_the_selection_matter(ckpt):
    """Past 6 keys the indexed layer's selection decides the logits (every visible key instead moves them); past 5
    the sliding layers' window does."""
    d, hf = ckpt
    seq = sum(random_turns(VOCAB, 4), [])

    def run(model: Any) -> torch.Tensor:
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    want = run(load_checkpoint(d))
    torch.testing.assert_close(want, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)
    wide = load_checkpoint(d)
    object.__setattr__(wide.spec, "window", 64)
    moved = run(wide)
    assert torch.allclose(moved[:5], want[:5], atol=1e-5) and float((moved[5:] - want[5:]).abs().max()) > 1e-2
    dense = load_checkpoint(d)
    object.__setattr__(dense.spec, "index_topk", 64)
    moved = run(dense)
    assert torch.allclose(moved[:6], want[:6], atol=1e-5) and float((moved[6:] - want[6:]).abs().max()) > 1e-2


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.Dots3NoteForCausalLM,
                          random_turns(VOCAB, 7, (15,))[0])


def test_the_image_text_checkpoints_language_model(ckpt, tmp_path):
    """A ``Dots3NoteForConditionalGeneration`` checkpoint written by transformers (its language model under
    ``model.``, the towers under ``vision_encoder.`` / ``audio_encoder.``) serves its language model: the image-text
    model's own logits on a text prompt."""
    d, hf = ckpt
    text = json.loads((d / "config.json").read_text())
    for key in ("architectures", "transformers_version"):
        text.pop(key, None)
    mm = transformers.Dots3NoteForConditionalGeneration(transformers.Dots3NoteConfig(
        text_config=text,
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "mlp_layer_types": ["dense"], "adapter_in_dim": 16, "adapter_out_dim": 64},
        audio_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "adapter_input_size": 16, "adapter_out_dim": 64, "downsample_hidden_size": 8,
                      "feature_size": 16})).eval()
    with torch.no_grad():
        missing = mm.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}, strict=False)
        assert not missing.missing_keys and not missing.unexpected_keys
        mm.lm_head.weight.copy_(hf.lm_head.weight)
    mm.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert isinstance(spec, Dots3NoteSpec) and spec == load_spec(d)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), mm, random_turns(VOCAB, 6, (17,))[0], cut=9)


def test_bf16_teacher_forced_logits(tmp_path):
    """In bf16 (the router in fp32, as transformers keeps it): as close to the fp32 logits as transformers' own bf16
    forward over the tokens no layer routes within 5% of a tie; with ``index_topk`` past the sequence (in bf16 the
    selection's near-ties flip on either side; the fp32 tests check it)."""
    torch.manual_seed(0)
    hf32 = widen_mla_moe(transformers.Dots3NoteForCausalLM(
        transformers.Dots3NoteTextConfig(**{**CONFIG, "index_topk": 64})).eval())
    hf32.save_pretrained(tmp_path)
    hf = transformers.Dots3NoteForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    ours = load_checkpoint(tmp_path, dtype="bfloat16")
    assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("layer_types", ["indexed_attention", "linear_attention", "full_attention", "sliding_attention"], "layer_types"),
    ("per_layer_config", {"1": {"num_attention_heads": 2, "num_key_value_heads": 1}}, "num_key_value_heads must match"),
    ("per_layer_config", {"1": {"sliding_window": 3}}, "per_layer_config"),
    ("per_layer_config", {"1": {"qk_rope_head_dim": 4}, "3": {"qk_rope_head_dim": 8}}, "different widths"),
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("sliding_window", 0, "sliding_window"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, key: value})


def test_indexed_layers_of_other_shapes_are_refused(ckpt):
    """Indexed layers share one selection path and its shapes: one whose latent differs from the others' is
    refused by name."""
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(layer_types=["indexed_attention", "sliding_attention", "indexed_attention", "sliding_attention"],
               per_layer_config={**cfg["per_layer_config"], "2": {"kv_lora_rank": 32}})
    with pytest.raises(ModelError, match="indexed layer's shapes"):
        load_spec(cfg)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
