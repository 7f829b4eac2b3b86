"""gpt-oss (``GptOssForCausalLM``) against transformers on the same random weights, saved by transformers' own
``save_pretrained``: attention sinks, alternating sliding windows, YaRN RoPE (``truncate: false``), the biased
router and the clamped-SwiGLU packed experts, over our paged KV turn after turn, batched, in bf16, read back by
transformers from our ``save_pretrained``, and the errors of configs we cannot run."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    cluster_read_paths,
    random_turns,
    two_sequences,
)
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
#: 3 layers (sliding, full, sliding) with a 5-token window, 4 experts (top 2) whose SwiGLU clamp bites (limit 0.6),
#: GptOssConfig's default RoPE (YaRN x32 over 4,096 positions, truncate false)
CONFIG: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 5,
                          "num_local_experts": 4, "num_experts_per_tok": 2, "swiglu_limit": 0.6,
                          "max_position_embeddings": 256}


class _GptOss(Checkpoints):
    """Widened like every family's random checkpoint, with sinks of the scores' order (so that they matter)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.sinks.copy_(2.0 * torch.randn(layer.self_attn.sinks.shape, generator=g))
        return hf


_CKPTS = _GptOss({"gpt_oss": ("GptOssConfig", "GptOssForCausalLM", CONFIG)})
ckpt = _CKPTS.fixture()


def _load(d, backend: Literal["auto", "torch", "triton"] = "torch",
          dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend, dtype=dtype), with_tokenizer=False)[0]


def _turns(seed: int = 0, sizes: tuple[int, ...] = (11, 5, 7)) -> list[list[int]]:
    return random_turns(VOCAB, seed, sizes)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_multi_turn_logits_and_greedy(ckpt, backend):
    """Three turns (prefill chunks over a paged prefix longer than the window, then greedy decode steps): logits at
    every step and the generated ids equal transformers' with its own cache."""
    _, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d, backend), hf, _turns(), 7, 4)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


def test_sinks_window_and_clamp_each_matter(ckpt):
    """The comparison above would catch a dropped mechanism: zeroing the sinks, widening the window or lifting the
    clamp each moves our logits away from transformers'."""
    _, d, hf = ckpt
    seq = sum(_turns(3), [])
    want = _logits(_load(d), seq)
    from hf_random import hf_logits

    torch.testing.assert_close(want, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)
    for change in ("sinks", "window", "clamp"):
        model = _load(d)
        if change == "sinks":
            for layer in model.model.layers:
                layer.self_attn.sinks.data.fill_(-1e4)
        elif change == "window":
            model.windows = [None] * len(model.windows)
        else:
            for layer in model.model.layers:
                layer.mlp.experts.limit = 1e4
        assert float((_logits(model, seq) - want).abs().max()) > 1e-2, change


def _logits(model, seq: list[int]) -> torch.Tensor:
    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)


def test_spec_follows_transformers(ckpt):
    """Layer types, window, sinks, biases, experts and RoPE as transformers read the same config; the spec survives
    our config round trip and the clamp is part of the block-key namespace."""
    _, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "gpt_oss" and spec.attention_sinks and spec.is_moe
    assert [spec.layer_window(i) for i in range(3)] == [
        5 if t == "sliding_attention" else None for t in hf.config.layer_types] == [5, None, 5]
    assert spec.attention_bias and spec.o_bias and spec.n_experts == 4 and spec.n_experts_per_tok == 2
    assert spec.rope_type == "yarn" and spec.rope_scaling is not None and spec.rope_scaling["truncate"] is False
    assert spec.rope_theta == 150000.0 and spec.swiglu_limit == 0.6 and spec.swiglu_alpha == pytest.approx(1.702)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    other = ModelSpec.from_hf_config(dict(spec.to_hf_config(), swiglu_limit=7.0))
    assert spec.fingerprint() != other.fingerprint()


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    """Two sequences with different cached prefixes in one prefill batch (their tokens routed together), then two
    batched decode steps: every logit row equals transformers' full recompute of that sequence."""
    _, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


def test_bf16_teacher_forced_logits(ckpt):
    """bf16 on both sides (transformers keeps the norms in fp32, and softmaxes router and attention in bf16): a
    chunked prefill, then teacher-forced decode steps over the paged KV; every row within 3% of the logit range."""
    _, d, _ = ckpt
    hf = transformers.GptOssForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got, ref = bf16_teacher_forced(_load(d, dtype="bfloat16"), hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_our_save_pretrained_reads_back_in_transformers(tmp_path):
    """A seeded random gpt-oss of ours, saved by our ``save_pretrained``: transformers loads it (no missing or
    unexpected tensors) and computes our logits."""
    spec = ModelSpec.from_hf_config(dict(CONFIG, model_type="gpt_oss", architectures=["GptOssForCausalLM"]))
    ours = build_model(spec, None, seed=3, backend="torch")
    save_pretrained(ours, tmp_path)
    hf, info = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    seq = sum(_turns(7), [])
    from hf_random import hf_logits

    torch.testing.assert_close(_logits(ours, seq), hf_logits(hf.eval(), seq), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("key,value,needle", [
    ("swiglu_limit", -1.0, "swiglu_limit"),
    ("swiglu_alpha", "x", "swiglu_alpha"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("sliding_window", 0, "sliding_window"),
    ("layer_types", ["full_attention"], "layer_types"),
])
def test_bad_configs_name_the_key(key, value, needle):
    cfg = dict(CONFIG, model_type="gpt_oss", architectures=["GptOssForCausalLM"], **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)


@pytest.mark.anyio
async def test_cluster_every_read_path_gives_transformers_tokens(tmp_path_factory):
    """gpt-oss through the emulated cluster: the second turn's hit KV (several windows long) is read on the PE, on
    the DE and forwarded layer by layer, split, or recomputed; every path gives transformers' greedy tokens."""
    d, hf = _CKPTS.get("gpt_oss", tmp_path_factory)
    first = sum(_turns(), [])  # 23 tokens: six blocks of 4 with the first reply, four windows of 5
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off"), hf, first, [5, 17, 33, 2, 71, 64, 9],
                             4 * CONFIG["sliding_window"])
