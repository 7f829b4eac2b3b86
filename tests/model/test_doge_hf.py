"""Doge (``DogeForCausalLM``: dynamic mask attention, a bias per key and KV head from its value heads and, past
``keep_window_size`` visible keys, only the keys with the largest biases; learned residual scales; CDMoE's
product-key experts) against transformers on the same random weights, saved by transformers: logits at every
prefill chunk and decode step over pages holding KV rows and the keys' biases, batched sequences, 64-token blocks,
query tiles, a sliding window, bf16, the selection and the stored biases shown to matter, the MoE against
transformers' token-by-token generation, our save_pretrained read back, and a two-turn session through the cluster."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
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
from dualpath.model.doge import DogeSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DogeForCausalLM"):
    pytest.skip("no Doge in this transformers", allow_module_level=True)

VOCAB = 97
#: a 6-key window: past the sixth token every query keeps its six largest biases
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "keep_window_size": 6, "max_position_embeddings": 256,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
SLIDING: dict[str, Any] = {**CONFIG, "sliding_window": 9, "keep_window_size": 5, "num_key_value_heads": 4,
                           "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}
MOE: dict[str, Any] = {**CONFIG, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 3}


class _Checkpoints(Checkpoints):
    """:class:`Checkpoints`, each KV head's ``A`` N(0, 0.3) (transformers' zeros make every bias 1; a large ``A``
    under- or overflows many biases to the same value, and the keys kept among equal biases are the top-k's
    choice) and the residual scales 1 + N(0, 0.2)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith(".A"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif n.endswith("_residual"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({"doge": ("DogeConfig", "DogeForCausalLM", CONFIG),
                       "sliding": ("DogeConfig", "DogeForCausalLM", SLIDING)})
_MOE = _Checkpoints({"moe": ("DogeConfig", "DogeForCausalLM", MOE)})
ckpt = _CKPTS.fixture()


def _distinct(seed: int, n: int) -> list[int]:
    """``n`` distinct random ids: no two keys share a first-layer bias."""
    return torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    """Against transformers' cached turns and full forwards. Under a sliding window its cache keeps the window only,
    so its cached decode ranks shorter rows of biases than its full forward, and where biases tie (copies of one
    token, in the first layer) the two keep different keys: that family is checked on prompts of distinct ids, in
    chunks and decode steps over 4- and 64-token blocks, against the full forward."""
    family, d, hf = ckpt
    if family != "sliding":
        check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
        check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
        check_long_segments(load_checkpoint(d), hf, VOCAB)
        check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []), cut=7)
        return
    seq = _distinct(0, 48)
    ref = hf_logits(hf, seq)
    for bt, cuts in ((4, (11, 16)), (64, (45, 47))):
        ours = load_checkpoint(d)
        pool = KVPool(paged_kv_spec(ours.spec, bt), num_blocks=16, block_tokens=bt)
        table = pool.allocate(16)[::-1]
        rows = [ours(SeqBatch.build([seq[:cuts[0]]], [0], [table], bt), pool.layers, all_positions=True),
                ours(SeqBatch.build([seq[cuts[0]:cuts[1]]], [cuts[0]], [table], bt), pool.layers, all_positions=True)]
        rows += [ours.decode_step(torch.tensor([seq[p]]), torch.tensor([p]), torch.tensor([table], dtype=torch.int32),
                                  pool.layers, block_tokens=bt) for p in range(cuts[1], len(seq))]
        torch.testing.assert_close(torch.cat(rows), ref, atol=2e-4, rtol=1e-4)


def test_query_tiles_give_the_same_logits(tmp_path_factory, monkeypatch):
    from dualpath.model import doge

    monkeypatch.setattr(doge, "_TILE", 5)
    d, hf = _CKPTS.get("doge", tmp_path_factory)
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_the_key_selection_and_the_stored_biases_matter(tmp_path_factory, monkeypatch):
    """A window past the sequence (every visible key kept) gives other logits; so does a cached prefix whose
    stored biases are zeroed (the keys and values left as they are)."""
    d, hf = _CKPTS.get("doge", tmp_path_factory)
    seq = sum(random_turns(VOCAB, 3), [])
    ref = hf_logits(hf, seq)
    ours = load_checkpoint(d)
    monkeypatch.setattr(ours, "spec", DogeSpec(**{**ours.spec.__dict__, "keep_window": 64}))
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    assert float((got - ref).abs().max()) > 0.05
    ours = load_checkpoint(d)
    spec = ours.spec
    pool = KVPool(paged_kv_spec(spec, 4), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    ours(SeqBatch.build([seq[:12]], [0], [table], 4), pool.layers)
    got = ours(SeqBatch.build([seq[12:]], [12], [table], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, ref[12:], atol=2e-4, rtol=1e-4)
    for layer in pool.layers:
        layer[table[:3], :, :, spec.n_kv_heads:] = 0
    got = ours(SeqBatch.build([seq[12:]], [12], [table], 4), pool.layers, all_positions=True)
    assert float((got - ref[12:]).abs().max()) > 0.05


def test_the_moe_routes_each_token_as_transformers_generates(tmp_path_factory):
    """CDMoE: our logits over chunked prefills and decode steps equal transformers' fed one token at a time (its
    generation); its multi-token forward mixes the router's logits across tokens, and differs."""
    d, hf = _MOE.get("moe", tmp_path_factory)
    seq = sum(random_turns(VOCAB, 3), [])
    cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        stepwise = torch.cat([hf(torch.tensor([[t]]), cache=cache, use_cache=True).logits[0].float() for t in seq])
    ours = load_checkpoint(d)
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    got = torch.cat([ours(SeqBatch.build([seq[:9]], [0], [table], 4), pool.layers, all_positions=True),
                     ours(SeqBatch.build([seq[9:20]], [9], [table], 4), pool.layers, all_positions=True)]
                    + [ours.decode_step(torch.tensor([seq[p]]), torch.tensor([p]),
                                        torch.tensor([table], dtype=torch.int32), pool.layers)
                       for p in range(20, len(seq))])
    assert stepwise.abs().max() > 1.0
    torch.testing.assert_close(got, stepwise, atol=2e-4, rtol=1e-4)
    assert float((hf_logits(hf, seq) - stepwise).abs().max()) > 0.05


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, DogeSpec) and spec.architecture == "doge"
    assert (spec.window, spec.keep_window) == ((9, 5) if family == "sliding" else (None, 6))
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.DogeForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d)


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("doge", tmp_path_factory)
    hf = transformers.DogeForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["DogeForCausalLM"], "model_type": "doge", **CONFIG}
    for change, match in (({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters"),
                          ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
                           "partial_rotary_factor"),
                          ({"hidden_size": 30}, "hidden_size"),
                          ({"is_moe": True, "num_experts": 16, "num_experts_per_tok": 17}, "num_experts_per_tok")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("doge", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
