"""PhiMoE (``PhimoeForCausalLM``: Phi-3.5-MoE) beyond ``test_more_families_hf.py``: four experts under the
sparsemixer router with a wide mask (``router_jitter_noise`` 0.3, so the weights are softmaxes over several
experts, not 1), and LongRoPE with PhiMoE's own cos/sin scales (``short_mscale``), each against transformers on
random weights it wrote, in fp32; and the configs we refuse, each naming its key."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import (
    Checkpoints,
    check_batched_against_hf,
    check_turns_against_hf,
    hf_logits,
    load_checkpoint,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.moe import sparsemixer_top2
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 3, "num_local_experts": 4, "attention_bias": True,
        "lm_head_bias": True, "router_jitter_noise": 0.3, "pad_token_id": None, "bos_token_id": None,
        "eos_token_id": None}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)],
            "short_mscale": 1.25, "long_mscale": 1.5}
CKPTS = Checkpoints({
    "wide": ("PhimoeConfig", "PhimoeForCausalLM", dict(BASE, max_position_embeddings=256)),
    "longrope": ("PhimoeConfig", "PhimoeForCausalLM", dict(BASE, max_position_embeddings=256,
                                                          rope_parameters=LONGROPE)),
})
ckpt = CKPTS.fixture()


def _turns(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, _turns())


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    g = torch.Generator().manual_seed(3)
    check_batched_against_hf(load_checkpoint(d), hf, [torch.randint(0, VOCAB, (n,), generator=g).tolist()
                                                      for n in (23, 14)], cuts=(12, 9))


def test_the_wide_mask_weighs_several_experts(ckpt):
    """The router's weights here are softmaxes over more than one expert for some tokens (so the comparisons above
    check the mask), and a narrow mask moves the logits."""
    family, d, hf = ckpt
    if family != "wide":
        pytest.skip("one checkpoint is enough")
    model = load_checkpoint(d)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    _, w = sparsemixer_top2(model.model.layers[0].mlp.gate(x), 0.3)
    assert bool((w < 0.999).any()) and bool((w > 0.999).any())
    seq = sum(_turns(2), [])
    wide = hf_logits(hf, seq)
    for layer in model.model.layers:
        layer.mlp.jitter_eps = 1e-6
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    narrow = model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
    assert float((narrow - wide).abs().max()) > 1e-2


def test_longrope_reads_its_mscales_and_caps_the_context(ckpt):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "phimoe" and spec.lm_head_bias and spec.o_bias
    assert spec.router_jitter_eps == 0.3 and spec.n_experts == 4 and spec.n_experts_per_tok == 2
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    if family == "longrope":
        assert spec.rope_type == "longrope" and spec.rope_long is False and spec.context_limit == 64
        assert (spec.rope_scaling or {})["short_mscale"] == 1.25


@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 3, "num_experts_per_tok"),
    ("router_jitter_noise", "x", "router_jitter_noise"),
    ("router_jitter_noise", 1.5, "router_jitter_noise"),
])
def test_bad_configs_name_the_key(key, value, needle):
    cfg = dict(BASE, model_type="phimoe", max_position_embeddings=256, **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)


def test_saved_config_reads_back_in_transformers(ckpt, tmp_path):
    from dualpath.model.loader import save_pretrained

    family, d, hf = ckpt
    save_pretrained(load_checkpoint(d), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["PhimoeForCausalLM"] and saved["lm_head_bias"] is True
    hf2 = transformers.PhimoeForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    seq = sum(_turns(4), [])
    torch.testing.assert_close(hf_logits(hf2, seq), hf_logits(hf, seq), atol=1e-5, rtol=1e-5)
