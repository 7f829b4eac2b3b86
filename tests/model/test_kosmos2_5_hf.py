"""Kosmos-2.5 (``Kosmos2_5ForConditionalGeneration``) on text: fairseq's decoder with sinusoidal positions counted
from the padding id, the text segment's embedding, pre-LayerNorm blocks with a LayerNorm inside the MLP and a head
tied by the text config; against transformers on random weights it wrote (a small vision tower beside them, left
out here)."""

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
from dualpath.model.kosmos2_5 import Kosmos25Spec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Kosmos2_5ForConditionalGeneration"):
    pytest.skip("no Kosmos-2.5 in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {"vocab_size": VOCAB, "embed_dim": 32, "layers": 2, "ffn_dim": 48, "attention_heads": 4,
                        "max_position_embeddings": 128}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "head_dim": 8, "patch_embed_hidden_size": 12}
#: the variants: the released config (padding id 1, GELU, scaled embeddings, a tied head), and one with another
#: padding id (the positions' origin), tanh GELU, unscaled embeddings and an untied head
VARIANTS: dict[str, dict[str, Any]] = {
    "released": {},
    "pad5_untied": {"pad_token_id": 5, "activation_function": "gelu_new", "scale_embedding": False,
                    "tie_word_embeddings": False},
}


def _checkpoint(factory: Any, name: str, text: dict[str, Any]) -> tuple[Any, Any]:
    """transformers' model, its language model's norms, biases and segment embedding N(0, 0.2) about their init,
    other weights x3."""
    torch.manual_seed(0)
    cfg = transformers.Kosmos2_5Config(text_config={**TEXT, **text}, vision_config=VISION, latent_query_num=2)
    hf = widen_language_model(transformers.Kosmos2_5ForConditionalGeneration(cfg).eval(),
                              moved=("norm", "segment_emb"), only=("text_model.",))
    d = factory.mktemp(f"kosmos2_5_{name}")
    hf.save_pretrained(d)
    return d, hf


def _pad(name: str) -> int:
    return int(VARIANTS[name].get("pad_token_id", 1))


def _no_pad(seqs: list[list[int]], pad: int) -> list[list[int]]:
    """The sequences with the padding id replaced (transformers' positions after one depend on the forward)."""
    return [[t if t != pad else pad + 1 for t in s] for s in seqs]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    d, hf = _checkpoint(tmp_path_factory, request.param, VARIANTS[request.param])
    return request.param, d, hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "base", {})


def test_spec_reads_each_variant(variant):
    name, d, _ = variant
    spec = load_spec(d)
    assert isinstance(spec, Kosmos25Spec) and spec.architecture == "kosmos2_5_text"
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.intermediate_size) == (4, 4, 8, 48)
    assert spec.pad_token_id == _pad(name) and spec.position_offset == _pad(name) + 1
    assert spec.tie_embeddings == VARIANTS[name].get("tie_word_embeddings", True)
    assert load_spec(spec.to_hf_config()) == spec
    text = spec.to_hf_config()["text_config"]  # (the text config alone, under its attribute_map's names too)
    assert load_spec(text) == spec
    aliased = {**{k: v for k, v in text.items() if k not in ("embed_dim", "layers", "attention_heads")},
               "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "architectures": [
                   "Kosmos2_5ForConditionalGeneration"]}
    assert load_spec(aliased) == spec


def test_each_variant_equals_transformers(variant):
    """Chunked prefills and greedy decode over the paged pool, then two sequences batched over different cached
    prefixes: every logit row and greedy id is transformers'."""
    name, d, hf = variant
    check_turns_against_hf(load_checkpoint(d), hf, _no_pad(random_turns(VOCAB, 0), _pad(name)))
    check_batched_against_hf(load_checkpoint(d), hf, _no_pad(two_sequences(VOCAB), _pad(name)))


def test_the_triton_kernels(ckpt):
    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, _no_pad([sum(random_turns(VOCAB, 3), [])], 1)[0])


def _decode(ours: Any, prompt: list[int], steps: list[int]) -> torch.Tensor:
    pool = KVPool(ours.spec.kv_spec(), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    rows = [ours(SeqBatch.build([prompt], [0], [table], 4), pool.layers)]
    for i, t in enumerate(steps):
        rows.append(ours.decode_step(torch.tensor([t]), torch.tensor([len(prompt) + i]),
                                     torch.tensor([table], dtype=torch.int32), pool.layers))
    return torch.cat(rows)


def test_a_generated_padding_id_reads_the_zero_row(ckpt):
    """A padding id fed back in decode (a model may generate it) reads the zero position row, and the tokens after
    it their own positions: transformers' cached decode, step by step."""
    d, hf = ckpt
    prompt, steps = [0, 5, 9, 44, 12, 7, 30], [1, 17, 1, 1, 60]
    got = _decode(load_checkpoint(d), prompt, steps)
    cache = transformers.DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        ref = [hf(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True).logits[0, -1]]
        for t in steps:
            ref.append(hf(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
    torch.testing.assert_close(got, torch.stack(ref), atol=2e-4, rtol=1e-4)


def test_a_padding_id_in_a_prompt_does_not_depend_on_chunking(ckpt):
    """A padding id inside a prompt: its row is zero and the others keep their positions, so any cut of the prompt
    gives the same logits; up to the padding id (and with it last in a forward) they are transformers'."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    seq = [0, 5, 9, 44, 1, 12, 7, 30, 1, 61, 3]
    whole = _prefill_chunks(ours, seq, [len(seq)])
    for cuts in ([4, 7], [5, 6], [1, 3, 3, 4]):
        torch.testing.assert_close(_prefill_chunks(ours, seq, cuts), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole[:5], hf_logits(hf, seq[:5]), atol=2e-4, rtol=1e-4)


def _prefill_chunks(ours: Any, seq: list[int], cuts: list[int]) -> torch.Tensor:
    pool = KVPool(ours.spec.kv_spec(), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    out, start = [], 0
    for n in cuts:
        out.append(ours(SeqBatch.build([seq[start:start + n]], [start], [table], 4), pool.layers, all_positions=True))
        start += n
    return torch.cat(out)


def test_save_reads_back_in_transformers(variant, tmp_path):
    """Our save_pretrained writes the language model under the image-text checkpoint's names (tied or not), which
    transformers loads to the same logits (its placeholder vision tower the only thing missing)."""
    name, d, _ = variant
    ours = load_checkpoint(d)

    class _Loader:
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> tuple[Any, Any]:
            hf, info = transformers.Kosmos2_5ForConditionalGeneration.from_pretrained(path, **kwargs)
            missing = info["missing_keys"]
            assert missing and all(k.startswith(("vision_model.", "image_to_text_projection.")) for k in missing)
            assert hf.config.text_config.pad_token_id == _pad(name)
            return hf, {"missing_keys": [], "unexpected_keys": info["unexpected_keys"]}

    check_save_reads_back(ours, tmp_path, _Loader, _no_pad(random_turns(VOCAB, 7, (15,)), _pad(name))[0])


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.Kosmos2_5ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = _no_pad([sum(random_turns(VOCAB, 5), [])], 1)[0]
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


@pytest.mark.parametrize("key,value,needle", [
    ("pad_token_id", None, "pad_token_id is null"),
    ("activation_function", "tanh", "activation_function 'tanh' unsupported"),
    ("embed_dim", 30, r"embed_dim \(30\) must be a multiple of attention_heads"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    cfg = load_spec(ckpt[0]).to_hf_config()
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, "text_config": {**cfg["text_config"], key: value}})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
