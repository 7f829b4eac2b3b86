"""``add_special_tokens`` (vLLM's request field): the tokenizer's own special tokens (a BOS its post-processor adds)
are added to a completions prompt by default and not with ``false``; a chat prompt, whose template writes its own,
gets them only with ``true``. The tokenizer is a tiny real one (the ``tokenizers`` library) whose post-processor
adds ``<s>``; the reference is its own ``encode``."""

from __future__ import annotations

from typing import Any

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from dualpath.http.app import Server  # noqa: E402
from dualpath.http.backend import Backend  # noqa: E402
from dualpath.http.config import HttpConfig  # noqa: E402
from dualpath.http.schemas import ChatCompletionRequest, CompletionRequest  # noqa: E402


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "hello": 2, "world": 3, "user": 4, ":": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    out.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    return out


class _Backend(Backend):
    def __init__(self, tok: Any) -> None:
        super().__init__()
        self.tokenizer, self.vocab_size, self.max_context = tok, 6, 64


def test_completions_add_them_by_default_chat_only_when_asked() -> None:
    tok = _tokenizer()
    server = Server(_Backend(tok), HttpConfig(port=0))
    assert tok.encode("hello world") == [1, 2, 3]  # (the reference: the post-processor adds <s>)
    assert server.completion_prompts(CompletionRequest(prompt="hello world")) == [[1, 2, 3]]
    assert server.completion_prompts(CompletionRequest(prompt="hello world", add_special_tokens=False)) == [[2, 3]]
    msgs = [{"role": "user", "content": "hello world"}]
    assert server.chat_prompt(ChatCompletionRequest(messages=msgs)) == [4, 5, 2, 3]
    assert server.chat_prompt(ChatCompletionRequest(messages=msgs, add_special_tokens=True)) == [1, 4, 5, 2, 3]
