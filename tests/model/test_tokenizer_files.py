"""Checkpoints whose tokenizer is only its model file, as older repos ship them: a SentencePiece ``tokenizer.model``
(with or without a ``tokenizer_config.json``) and a tiktoken BPE ``tokenizer.model`` (Llama 3's original format).
Each is read through transformers and must encode as the tokenizer's own library does (SentencePiece, tiktoken:
independent references), and load beside the model."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model, load_tokenizer

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
tiktoken = pytest.importorskip("tiktoken")

TEXT = "the quick brown fox jumps over the lazy dog"
#: tiktoken's cl100k-style split pattern
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _checkpoint(d: Path, vocab: int) -> None:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"{TEXT} {i} times, and then some other words" for i in range(500)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=80,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return d / "tokenizer.model"


@pytest.mark.parametrize("with_config", [False, True])
def test_a_sentencepiece_only_tokenizer_encodes_as_sentencepiece(tmp_path, sentencepiece_model, with_config):
    """Only ``tokenizer.model`` beside the weights (the class from config.json), or with a tokenizer config that
    names LlamaTokenizer: the ids are SentencePiece's own; decoding gives the text back."""
    _checkpoint(tmp_path, 96)
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    if with_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "legacy": False}))
    tok = load_tokenizer(tmp_path)
    assert tok is not None
    want = spm.SentencePieceProcessor(model_file=str(sentencepiece_model)).encode(TEXT)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == want
    assert tok.decode(want) == TEXT
    _, tok2 = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"))[:2]
    assert tok2 is not None and tok2(TEXT, add_special_tokens=False)["input_ids"] == want


def test_a_tiktoken_tokenizer_model_encodes_as_tiktoken(tmp_path):
    """A ``tokenizer.model`` of base64 tokens and ranks (tiktoken's BPE file, as Meta ships Llama 3): the ids are
    tiktoken's own."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"th", b"the", b" the", b" q", b"ui", b"ck", b"fo", b" fox", b"ow", b" l"):
        ranks[merge] = len(ranks)
    (tmp_path / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    _checkpoint(tmp_path, 272)
    tok = load_tokenizer(tmp_path)
    assert tok is not None
    want = tiktoken.Encoding("test", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={}).encode(TEXT)
    assert any(i >= 256 for i in want)  # (merges applied, not bytes alone)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == want
    assert tok.decode(want) == TEXT


def test_a_directory_without_tokenizer_files_has_none(tmp_path):
    _checkpoint(tmp_path, 96)
    assert load_tokenizer(tmp_path) is None
