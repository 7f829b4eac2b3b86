"""GIT (``GitForCausalLM``) on text: BERT's post-LayerNorm blocks made causal, learned absolute positions behind an
embedding LayerNorm, a biased LM head tied or not; against transformers on random weights it wrote (a small image
encoder beside them, left out here)."""

from __future__ import annotations

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
    widen_language_model,
)

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.git import GitSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GitForCausalLM"):
    pytest.skip("no GIT in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
    "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
    "vision_config": {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 16, "patch_size": 8}}
#: the released configs' settings (GELU, an untied head) and a tied head with tanh GELU
VARIANTS: dict[str, dict[str, Any]] = {
    "untied": {},
    "tied_gelu_new": {"tie_word_embeddings": True, "hidden_act": "gelu_new"},
}


def _checkpoint(factory: Any, name: str, extra: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' model, its decoder's LayerNorms and biases N(0, 0.2) about their init, other weights x3."""
    torch.manual_seed(0)
    hf = widen_language_model(transformers.GitForCausalLM(transformers.GitConfig(**CONFIG, **extra)).eval(),
                              moved=("LayerNorm",), skip=("git.image_encoder.", "git.visual_projection."))
    d = factory.mktemp(f"git_{name}")
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d, hf = _checkpoint(tmp_path_factory, request.param, VARIANTS[request.param])
    return request.param, d, hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "base", {})


def test_spec_reads_each_variant(variant):
    name, d, hf = variant
    spec = load_spec(d)
    assert isinstance(spec, GitSpec) and spec.architecture == "git"
    assert (spec.n_heads, spec.head_dim, spec.intermediate_size, spec.rms_eps) == (4, 8, 48, 1e-12)
    assert spec.tie_embeddings == VARIANTS[name].get("tie_word_embeddings", False) and spec.lm_head_bias
    assert spec.act == VARIANTS[name].get("hidden_act", "gelu")
    assert load_spec(spec.to_hf_config()) == spec


def test_each_variant_equals_transformers(variant):
    """Chunked prefills and greedy decode over the paged pool, then two sequences batched over different cached
    prefixes: every logit row and greedy id is transformers'."""
    _, d, hf = variant
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))


def test_the_triton_kernels(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_a_position_past_the_table_is_refused(ckpt):
    """GIT's positions are a learned table of max_position_embeddings rows: a token past it is an error naming the
    limit, never a wrapped or clamped row."""
    d, _ = ckpt
    ours = load_checkpoint(d)
    pool = KVPool(ours.spec.kv_spec(), num_blocks=20, block_tokens=4)
    with pytest.raises(ModelError, match="position 64 is past GIT's 64 learned positions"):
        ours(SeqBatch.build([[5]], [64], [pool.allocate(17)], 4), pool.layers)


def test_save_reads_back_in_transformers(variant, tmp_path):
    """Our save_pretrained writes the decoder under GIT's names (tied or not), which transformers loads to the same
    logits (its placeholder image encoder the only thing missing)."""
    _, d, _ = variant

    class _Loader:
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> tuple[Any, Any]:
            hf, info = transformers.GitForCausalLM.from_pretrained(path, **kwargs)
            missing = info["missing_keys"]
            assert missing and all(k.startswith(("git.image_encoder.", "git.visual_projection.")) for k in missing)
            return hf, {"missing_keys": [], "unexpected_keys": info["unexpected_keys"]}

    check_save_reads_back(load_checkpoint(d), tmp_path, _Loader, random_turns(VOCAB, 7, (15,))[0])


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.GitForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_act", "tanh", "hidden_act 'tanh' unsupported"),
    ("hidden_size", 30, r"hidden_size \(30\) must be a multiple of num_attention_heads"),
    ("position_embedding_type", "relative_key", "position_embedding_type 'relative_key' unsupported"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    cfg = load_spec(ckpt[0]).to_hf_config()
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, key: value})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
