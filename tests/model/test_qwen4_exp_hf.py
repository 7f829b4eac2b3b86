"""Qwen4-Exp (``Qwen4ExpForCausalLM``: Qwen3.5's Gated DeltaNet and gated attention layers under hyper-connections,
QSA block selection on the attention layers, hashed n-gram embeddings on some linear layers) against transformers on
the same random weights, saved by transformers: logits at every prefill chunk and decode step over pages holding KV
rows, raw indexer keys and the linear layers' states, batched sequences with different cached prefixes, 64-token
blocks and query tiles, end-of-sequence tokens inside and across chunks, bf16, a hit from a stored Full Block's page
(and not once its PLE state is zeroed), each mechanism shown to matter, our save_pretrained read back by
transformers, the image-text checkpoint's language model, and a two-turn session through the emulated cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
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

from dualpath.engine.model_api import paged_kv_spec
from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import build_model
from dualpath.model.qwen4_exp import Qwen4ExpSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen4ExpForCausalLM"):
    pytest.skip("no Qwen4-Exp in this transformers", allow_module_level=True)

VOCAB = 101
EOS = 5
#: indexer heads enough that a block's score (a sum of ReLUs over them) is never an exact zero: zeros tie, and
#: transformers and we may then keep different blocks
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "linear_conv_kernel_dim": 3, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "num_experts_per_tok": 2, "num_experts": 4, "hc_count": 3,
    "hc_lowrank": 8, "ple_layer_ids": [1, 3], "ple_embed_dim": 16, "ngram_size": 3, "heads_per_ngram": 2,
    "ngram_vocab_size_base": 40, "make_ngram_vocab_size_divisible_by": 8, "split_ngram_parts": 3,
    "indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
    "indexer_compress_ratio": 2, "eos_token_id": EOS, "pad_token_id": None, "bos_token_id": None,
    "layer_types": ["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
#: transformers' default layer pattern (attention every fourth layer), a sigmoid output gate, one PLE layer with a
#: 4-gram, two streams, a wider indexer head than the rotated part, a tied head
VARIANT: dict[str, Any] = {
    **CONFIG, "num_hidden_layers": 5, "layer_types": None, "output_gate_type": "sigmoid", "ple_layer_ids": [2],
    "ngram_size": 4, "heads_per_ngram": 1, "ple_embed_dim": 12, "ple_conv_kernel_size": 2, "hc_count": 2,
    "indexer_head_dim": 12, "indexer_budget": 6, "indexer_compress_ratio": 3, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}


class _Checkpoints(RecurrentCheckpoints):
    """:class:`RecurrentCheckpoints`, norms (each ``1 + weight``, zero in transformers' init) N(0, 0.2) and the PLE
    convolutions (zero there) N(0, 0.3), the head x3 (logits of a meaningful size)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n and n.endswith("weight") and p.dim() == 1:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                elif n.endswith("ple.conv1d.weight"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif n == "lm_head.weight":
                    p.mul_(3.0)
        return hf


_CKPTS = _Checkpoints({"qwen4": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", CONFIG),
                       "variant": ("Qwen4ExpTextConfig", "Qwen4ExpForCausalLM", VARIANT)})
ckpt = _CKPTS.fixture()


def _with_eos(seed: int, n: int = 40) -> list[int]:
    """Random ids with end-of-sequence tokens at 3, 4 (two in a row), 13 and 27."""
    seq = random_turns(VOCAB, seed, lens=(n,))[0]
    for i in (3, 4, 13, 27):
        seq[i] = EOS
    return seq


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []), cut=7)


def test_end_of_sequence_tokens_restart_the_ngrams(ckpt):
    """A sequence with end-of-sequence tokens (two in a row, one right after a chunk's cut, one in a decode step's
    history): transformers' logits, in one prefill and in chunks; and they matter (the same ids without them give
    other logits at the tokens after them)."""
    _, d, hf = ckpt
    seq = _with_eos(11)
    for cut in (len(seq), 4, 14):
        check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=cut)
    ours = load_checkpoint(d)
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    ours(SeqBatch.build([seq[:28]], [0], [table], 4), pool.layers)
    got = torch.cat([ours.decode_step(torch.tensor([seq[p]]), torch.tensor([p]),
                                      torch.tensor([table], dtype=torch.int32), pool.layers) for p in range(28, 31)])
    torch.testing.assert_close(got, hf_logits(hf, seq)[28:31], atol=2e-4, rtol=1e-4)
    other = list(seq)
    other[13] = 6
    assert float((hf_logits(hf, other)[14:16] - hf_logits(hf, seq)[14:16]).abs().max()) > 0.05


def test_query_tiles_give_the_same_logits(tmp_path_factory, monkeypatch):
    from dualpath.model import qwen4_exp

    monkeypatch.setattr(qwen4_exp, "_TILE", 5)
    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_the_block_selection_and_the_ngram_state_matter(tmp_path_factory, monkeypatch):
    """Every block visible to every query (a budget past the sequence), or the n-gram tables zeroed: other logits;
    transformers keeps fewer blocks than a query has closed (so the first test's equality checks the choice)."""
    from dualpath.model import qwen4_exp

    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    seq = sum(random_turns(VOCAB, 3), [])
    ref = hf_logits(hf, seq)
    ours = load_checkpoint(d)
    wide = qwen4_exp.Qwen4ExpSpec(**{**ours.spec.__dict__, "idx_budget": 64})
    monkeypatch.setattr(ours, "spec", wide)
    pool = KVPool(paged_kv_spec(wide, 4), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    assert float((got - ref).abs().max()) > 0.05
    assert len(seq) // CONFIG["indexer_compress_ratio"] > CONFIG["indexer_budget"] // CONFIG["indexer_compress_ratio"]
    ours = load_checkpoint(d)
    with torch.no_grad():
        for layer in ours.model.layers:
            if layer.ple is not None:
                layer.ple.ple_embedding.ngram_embedding.weight.zero_()
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    assert float((got - ref).abs().max()) > 0.05


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    """From a stored Full Block's page: transformers' logits; with only the page's PLE state (the convolution's
    inputs and the last token ids, after the Gated DeltaNet's state) zeroed, not."""
    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)
    ours = load_checkpoint(d)
    spec = ours.spec
    seq = sum(random_turns(VOCAB, 4), [])
    pool = KVPool(paged_kv_spec(spec, 4), num_blocks=32, block_tokens=4)
    first, second = pool.allocate(8), pool.allocate(8)
    ours(SeqBatch.build([seq[:12]], [0], [first], 4), pool.layers)
    for layer in pool.layers:
        layer[second[:3]] = layer[first[:3]]
    ref = hf_logits(hf, seq)[12:]
    got = ours(SeqBatch.build([seq[12:]], [12], [second], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    ple_bytes = 4 * (spec.hc * spec.hidden_size * spec.ple_state_len + spec.ngram - 1)
    for layer in spec.ple_layers:
        page = pool.layers[layer][second[2]]
        page.view(-1).view(torch.uint8)[spec.delta_bytes:spec.delta_bytes + ple_bytes].zero_()
    got = ours(SeqBatch.build([seq[12:]], [12], [second], 4), pool.layers, all_positions=True)
    assert float((got - ref).abs().max()) > 0.05


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Qwen4ExpSpec) and spec.architecture == "qwen4_exp_text"
    theirs = transformers.Qwen4ExpTextConfig(**(VARIANT if family == "variant" else CONFIG))
    assert [("full_attention" if t == "indexed_attention" else t) for t in theirs.layer_types] == \
        list(spec.layer_types)
    assert spec.ple_layers == tuple(i - 1 for i in theirs.ple_layer_ids)
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.Qwen4ExpForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d)


def test_released_layer_names_and_hash_buffers(tmp_path_factory, tmp_path):
    """The released config's ``full_attention`` (transformers reads it as ``indexed_attention``), packed experts and
    an ``mtp.*`` tensor: the same model; a checkpoint whose hash buffers differ from the config's is refused by
    name, as is one missing an n-gram shard."""
    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    tensors = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["layer_types"] = ["full_attention" if t == "indexed_attention" else t for t in cfg["layer_types"]]
    packed: dict[str, torch.Tensor] = {"mtp.fc.weight": torch.ones(2, 2)}
    for k, v in tensors.items():
        if ".mlp.experts." not in k:
            packed[k] = v
    for layer in range(CONFIG["num_hidden_layers"]):
        base = f"model.layers.{layer}.mlp.experts"
        packed[base + ".gate_up_proj"] = torch.stack([torch.cat((tensors[f"{base}.{e}.gate_proj.weight"],
                                                                 tensors[f"{base}.{e}.up_proj.weight"]))
                                                      for e in range(CONFIG["num_experts"])])
        packed[base + ".down_proj"] = torch.stack([tensors[f"{base}.{e}.down_proj.weight"]
                                                   for e in range(CONFIG["num_experts"])])
    save_file(packed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_spec(tmp_path) == load_spec(d)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []), cut=6)
    bad = dict(packed)
    key = "model.layers.2.ple.ple_embedding.layer_multipliers"
    bad[key] = bad[key] + 2
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="layer_multipliers"):
        load_checkpoint(tmp_path)
    del packed["model.layers.0.ple.ple_embedding.ngram_embedding.shard_1.weight"]
    save_file(packed, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="shard"):
        load_checkpoint(tmp_path)


def test_the_image_text_checkpoints_language_model(tmp_path_factory, tmp_path):
    """A ``Qwen4ExpForConditionalGeneration`` checkpoint written by transformers (``model.language_model.*``, a
    vision tower beside) serves its language model: the text model's logits on the same weights."""
    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    cfg = transformers.Qwen4ExpConfig(
        text_config=dict(CONFIG),
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32})
    mm = transformers.Qwen4ExpForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        missing = mm.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}, strict=False)
        assert not missing.missing_keys
        mm.lm_head.weight.copy_(hf.lm_head.weight)
    mm.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert isinstance(spec, Qwen4ExpSpec) and spec == load_spec(d)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []), cut=6)


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("qwen4", tmp_path_factory)
    hf = transformers.Qwen4ExpForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["Qwen4ExpForCausalLM"], "model_type": "qwen4_exp_text", **CONFIG}
    for change, match in (({"indexer_budget": None}, "indexer_budget"),
                          ({"indexer_kv_heads": 2}, "indexer_kv_heads"),
                          ({"indexer_budget": 5}, "indexer_budget"),
                          ({"indexer_head_dim": 4}, "indexer_head_dim"),
                          ({"ple_layer_ids": [2]}, "ple_layer_ids"),
                          ({"ple_embed_dim": 18}, "ple_embed_dim"),
                          ({"eos_token_id": None}, "eos_token_id"),
                          ({"output_gate_type": "gelu"}, "output_gate_type"),
                          ({"hc_count": 1}, "hc_count"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"layer_types": ["linear_attention", "sliding_attention"] * 2}, "layer_types")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("qwen4", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
