"""``dualpath generate``: greedy ids equal transformers' on the same checkpoint; bad input exits 2 with a message."""

from __future__ import annotations

import json

import pytest
import torch

from dualpath.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(d)
    return d, hf


def test_generate_matches_transformers(checkpoint, tmp_path, capsys):
    d, hf = checkpoint
    out = tmp_path / "gen.json"
    rc = main(["generate", "--model", str(d), "--prompt-ids", "5,17,33,2,90,61,7", "--max-new-tokens", "12",
               "--ignore-eos", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    ids = runs[0]["generated_ids"]
    want = hf.generate(torch.tensor([[5, 17, 33, 2, 90, 61, 7]]), max_new_tokens=12, min_new_tokens=12,
                       do_sample=False)[0, 7:].tolist()
    assert ids == want
    assert "generated ids: " + ",".join(map(str, want)) in capsys.readouterr().out


def test_generate_bad_input(checkpoint, capsys):
    d, _ = checkpoint
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,2,3", "--max-new-tokens", "70"]) == 2
    assert "exceeds the KV pool of 64 tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,x", "--max-new-tokens", "2"]) == 2
    assert "item 1 ('x') is not an integer" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,500", "--max-new-tokens", "2"]) == 2
    assert "500 is outside the vocabulary" in capsys.readouterr().err
    assert main(["generate", "--model", str(d / "missing"), "--prompt-ids", "1", "--max-new-tokens", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_generate_stops_at_the_generation_config_eos(checkpoint, tmp_path):
    """An end-of-sequence id that only ``generation_config.json`` names (a chat model's end-of-turn token) ends the
    generation there, as the HTTP front's answers end."""
    import shutil

    d, hf = checkpoint
    prompt = [5, 17, 33, 2, 90, 61, 7]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 7:].tolist()
    at = next((i for i in range(2, 12) if want[i] not in want[:i]), 0)  # (this tiny model repeats one id)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(d, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [want[at], 119]}))
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
                 "12", "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["generated_ids"] == want[: at + 1] != want
