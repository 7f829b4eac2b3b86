"""Chameleon (``ChameleonForConditionalGeneration``) on text: Llama's decoder with per-head LayerNorms (a weight and
bias per head) on queries and keys, the swin-norm variant (norms after each sublayer), and the ``IMGIMG*`` image
codes masked out of the logits; against transformers on random weights it wrote (the VQ tokenizer included)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model.chameleon import ChameleonSpec
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ChameleonForConditionalGeneration"):
    pytest.skip("no Chameleon in this transformers", allow_module_level=True)

VOCAB = 97
IMAGE_CODES = (90, 91, 92)
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": None,
    "vq_config": {"embed_dim": 8, "num_embeddings": 16, "latent_channels": 8, "resolution": 32, "base_channels": 32,
                  "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
    "vocabulary_map": {"<image>": 7, **{f"IMGIMG{c}": t for c, t in zip("ABC", IMAGE_CODES, strict=True)}}}


def _checkpoint(factory: Any, swin: bool) -> tuple[Any, Any]:
    """transformers' model, its language model's norms N(0, 0.2) about their init, other weights x3."""
    torch.manual_seed(0)
    hf = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(**CONFIG, swin_norm=swin)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.startswith("model.vqmodel."):
                continue
            if "norm" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(3.0)
    d = factory.mktemp(f"chameleon_swin{int(swin)}")
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, swin=False)


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    return _checkpoint(tmp_path_factory, swin=True)


def test_spec_reads_the_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ChameleonSpec) and spec.architecture == "chameleon"
    assert spec.image_tokens == IMAGE_CODES and not spec.swin_norm
    assert (spec.n_heads, spec.n_kv_heads, spec.head_dim) == (4, 2, 8)
    assert load_spec(spec.to_hf_config()) == spec


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_swin_norm_equals_transformers(swin):
    d, hf = swin
    assert load_spec(d).swin_norm
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []))


def test_image_codes_are_never_generated(ckpt):
    """The ``IMGIMG*`` codes get the dtype's minimum, as transformers gives them; every other id is live, the
    ``<image>`` marker included."""
    d, hf = ckpt
    seq = random_turns(VOCAB, 4, (9,))[0]
    got, ref = check_logits(load_checkpoint(d), seq), hf_logits(hf, seq)
    lowest = torch.finfo(torch.float32).min
    assert (got[:, list(IMAGE_CODES)] == lowest).all() and (ref[:, list(IMAGE_CODES)] == lowest).all()
    live = [t for t in range(VOCAB) if t not in IMAGE_CODES]
    assert (got[:, live] > -1e4).all()


def check_logits(ours: Any, seq: list[int]) -> torch.Tensor:
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    return ours(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the language model, which transformers loads (only the VQ tokenizer missing) to
    the same logits, the image codes still masked."""
    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path)
    cfg = transformers.ChameleonConfig.from_pretrained(str(tmp_path))
    cfg.vq_config = hf.config.vq_config  # (ours names no VQ tokenizer: the fixture's small one to build)
    hf2, info = transformers.ChameleonForConditionalGeneration.from_pretrained(
        str(tmp_path), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info
    assert info["missing_keys"] and all(k.startswith("model.vqmodel.") for k in info["missing_keys"]), info
    assert sorted(v for k, v in hf2.config.vocabulary_map.items() if k.startswith("IMGIMG")) == list(IMAGE_CODES)
    check_two_chunks_against_hf(ours, hf2.eval(), random_turns(VOCAB, 7, (15,))[0], cut=15)


def test_bf16_teacher_forced_logits(ckpt):
    d, hf32 = ckpt
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    live = [t for t in range(VOCAB) if t not in IMAGE_CODES]
    check_bf16_as_close_as_transformers(got[:, live], ref[:, live], hf_logits(hf32, seq)[:, live])


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("hidden_size", 30, "hidden_size .30. must be a multiple of num_attention_heads"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}, "rope_parameters"),
    ("vocabulary_map", {"IMGIMGA": 200}, "vocabulary_map names image tokens outside the vocabulary"),
    ("vocabulary_map", {"IMGIMGA": "ninety"}, "vocabulary_map must map token names to integer ids"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    spec = load_spec(ckpt[0]).to_hf_config()
    with pytest.raises(ModelError, match=needle):
        load_spec({**spec, key: value})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
