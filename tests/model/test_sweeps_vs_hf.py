"""The registry sweeps of ``benchmarks/`` (``registry_logits_vs_hf.py``, ``config_keys_vs_hf.py``) on two types each,
so that they keep running: a shrunk Qwen2 and Gemma 3 text model equal transformers' logits, and every key of a
shrunk Qwen2 config moved one at a time is either read (our logits then equal transformers') or ignored by both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import config_keys_vs_hf  # noqa: E402
import registry_logits_vs_hf  # noqa: E402


@pytest.mark.parametrize("model_type,arch", [("qwen2", "Qwen2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")])
def test_the_logits_sweep_on_two_types(model_type, arch):
    row = registry_logits_vs_hf.run(model_type, arch)
    assert row["status"] == "ok" and row["max_abs_logit_diff"] < 1e-3 * max(1.0, row["logit_scale"])


def test_the_keys_sweep_on_qwen2():
    row = config_keys_vs_hf.run("qwen2", "Qwen2ForCausalLM")
    assert row["status"] == "ok" and not row["misread"] and not row["ignored"]
    assert row["keys"]["read"] >= 5  # (epsilon, RoPE base, activation, ...)


def test_a_misread_key_is_reported(monkeypatch):
    """The keys sweep fails a key our loader gets wrong and only that one: here the model is built with the original
    RMSNorm epsilon whatever the config says (moved x1e4: x1.7 would move no logit by 1e-3)."""
    import dataclasses

    import dualpath.model.loader as loader_module

    real = loader_module.load_spec

    def stuck(config, *args, **kwargs):
        return dataclasses.replace(real(config, *args, **kwargs), rms_eps=1e-6)

    monkeypatch.setattr(loader_module, "load_spec", stuck)
    row = config_keys_vs_hf.run("qwen2", "Qwen2ForCausalLM")
    assert [m["key"] for m in row["misread"]] == ["rms_norm_eps"]
