"""An image-text checkpoint's chat template kept for its processor (``chat_template.json``, ``processor_config.json``)
rather than in the tokenizer's config: transformers' ``AutoTokenizer`` does not read it, so the chat endpoints would
find no template; the loader gives it to the tokenizer. A tokenizer's own template wins; a broken file is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dualpath.errors import ModelError
from dualpath.model.loader import load_tokenizer

pytest.importorskip("transformers")

PROC = "PROC:{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """The embedded SmolLM2 tokenizer saved without any chat template."""
    from dualpath import load_tokenizer as embedded

    d = tmp_path_factory.mktemp("tok")
    embedded().save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _copy(bare: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(bare, d)
    return d


def _render(tok) -> str:
    return str(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False))


def test_without_any_template_there_is_none(bare, tmp_path):
    assert not getattr(load_tokenizer(_copy(bare, tmp_path)), "chat_template", None)


@pytest.mark.parametrize("name,body", [
    ("chat_template.json", {"chat_template": PROC}),
    ("processor_config.json", {"chat_template": PROC, "processor_class": "LlavaProcessor"}),
])
def test_a_processors_template_is_the_tokenizers(bare, tmp_path, name, body):
    d = _copy(bare, tmp_path)
    (d / name).write_text(json.dumps(body))
    assert _render(load_tokenizer(d)) == "PROC:[user] hi"


def test_the_tokenizers_own_template_wins_and_a_broken_file_is_named(bare, tmp_path):
    d = _copy(bare, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "OWN {{ messages[0]['content'] }}"}))
    (d / "chat_template.json").write_text(json.dumps({"chat_template": PROC}))
    assert _render(load_tokenizer(d)) == "OWN hi"
    e = _copy(bare, tmp_path / "e")
    (e / "chat_template.json").write_text("{not json")
    with pytest.raises(ModelError, match="chat_template.json: not valid JSON"):
        load_tokenizer(e)
    (e / "chat_template.json").write_text(json.dumps({"chat_template": 7}))
    with pytest.raises(ModelError, match="chat_template must be a string"):
        load_tokenizer(e)
