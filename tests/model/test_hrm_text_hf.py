"""HRM-Text (``HrmTextForCausalLM``): a low-level and a high-level stack looped in cycles (``H_cycles`` x
(``L_cycles`` L passes, then one H pass)), each stack invocation with its own keys and values (a layer of the paged
pool), gated multi-head attention, weightless norms, scaled embeddings; against transformers on random weights it
wrote (its fused ``gqkv_proj`` / ``gate_up_proj``)."""

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
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.hrm_text import HrmTextSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "HrmTextForCausalLM"):
    pytest.skip("no HRM-Text in this transformers", allow_module_level=True)

VOCAB = 97
#: two layers per stack, two H cycles of two L passes: 12 pool layers
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "head_dim": 8, "H_cycles": 2, "L_cycles": 2, "max_position_embeddings": 128, "initializer_range": 0.1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' model (its embeddings x10 by ``embedding_scale``), ``z_L_init`` N(0, 1) (its init is 0)."""
    torch.manual_seed(0)
    hf = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(**CONFIG)).eval()
    with torch.no_grad():
        hf.model.z_L_init.copy_(torch.randn(hf.model.z_L_init.shape, generator=torch.Generator().manual_seed(1)))
    d = tmp_path_factory.mktemp("hrm_text")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_config_as_transformers_does(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, HrmTextSpec) and spec.architecture == "hrm_text"
    assert (spec.n_layers, spec.per_stack) == (hf.config.num_hidden_layers, hf.config.num_layers_per_stack) == (12, 2)
    assert spec.embedding_scale == pytest.approx(10.0)
    assert [spec.invocation(i)[0] for i in range(12)] == [False] * 4 + [True] * 2 + [False] * 4 + [True] * 2
    assert load_spec(spec.to_hf_config()) == spec
    assert json.loads((d / "config.json").read_text())["num_layers_per_stack"] == 2


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_each_invocation_keeps_its_own_keys(ckpt):
    """The same module's layer in different invocations stores different keys (its inputs differ by cycle), so a
    cached prefix needs every invocation's pages: each is a layer of the pool."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = random_turns(VOCAB, 5, (13,))[0]
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    table = pool.allocate(8)
    model(SeqBatch.build([seq], [0], [table], 4), pool.layers)
    keys = [layer[table].reshape(-1, *layer.shape[2:])[: len(seq), 0] for layer in pool.layers]
    for a, b in ((0, 2), (0, 6), (4, 10)):  # (L layer 0 in two passes and two cycles; H layer 0 in two cycles)
        assert float((keys[a] - keys[b]).abs().max()) > 1e-3


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the fused released layout, loaded by transformers with nothing missing to the
    same logits."""
    from safetensors.torch import load_file

    d, _ = ckpt
    ours = load_checkpoint(d)
    check_save_reads_back(ours, tmp_path, transformers.HrmTextForCausalLM, random_turns(VOCAB, 7, (15,))[0])
    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(load_file(str(d / "model.safetensors")))


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.HrmTextForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", 10, "num_hidden_layers .* must be num_layers_per_stack x H_cycles x"),
    ("L_cycles", -1, "L_cycles"),
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "only 'default'"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, key: value})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
