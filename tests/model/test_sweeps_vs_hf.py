"""The registry sweeps of ``benchmarks/`` (``registry_logits_vs_hf.py``, ``config_keys_vs_hf.py``) kept running: a
shrunk Qwen2 and Gemma 3 text model equal transformers' logits, and every key of a shrunk Qwen2 config moved one at a
time is either read (our logits then equal transformers') or ignored by both; the keys sweep on one key per code path
(a gate activation other than the default, ``mlp_bias``); and config-level checks over every swept type (head tying,
transformers 4 configs, the compute dtype, the config we write read back)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import config_keys_vs_hf  # noqa: E402
import registry_logits_vs_hf  # noqa: E402

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "registry_logits_vs_hf.json"
#: every type the logits sweep passes (``benchmarks/results/registry_logits_vs_hf.json``)
_OK = [(r["model_type"], r["architecture"]) for r in json.loads(_RESULTS.read_text())["rows"] if r["status"] == "ok"]


def _shrunk(model_type: str) -> tuple:
    """``model_type``'s default config object and its config shrunk by the logits sweep's rule."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    return base, registry_logits_vs_hf.shrink({k: v for k, v in base.to_dict().items()
                                               if k not in ("transformers_version", "architectures")})


@pytest.mark.parametrize("model_type,arch", _OK)
def test_the_head_is_tied_as_transformers_ties_it(model_type, arch):
    """For every type the logits sweep passes, its shrunk config with ``tie_word_embeddings`` true, false or left
    out (at the top and in its text config, each combination): our spec ties the LM head to the embeddings exactly
    when transformers' model does, read from the raw config and from transformers' save of it. Found by it: Llama 4
    and BLIP-2 (their text config decides), GLM-5.3-Flash (its top-level key does), Muse Spark (never)."""
    import transformers

    from dualpath.model.noinit import skip_default_init
    from dualpath.model.spec import load_spec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, kw = _shrunk(model_type)
        if isinstance(kw.get("vision_config"), dict) and isinstance(kw["vision_config"].get("depth"), int):
            kw["vision_config"]["depth"] = 1  # (a vision tower's blocks play no part in tying the LM head)
        composite, checked = isinstance(kw.get("text_config"), dict), 0
        for outer in (True, False, None):
            for inner in (True, False, None) if composite else (None,):
                raw = {k: v for k, v in kw.items() if k != "tie_word_embeddings"}
                if composite:
                    raw["text_config"] = {k: v for k, v in kw["text_config"].items() if k != "tie_word_embeddings"}
                    if inner is not None:
                        raw["text_config"]["tie_word_embeddings"] = inner
                if outer is not None:
                    raw["tie_word_embeddings"] = outer
                try:
                    cfg = type(base).from_dict(dict(raw))
                except Exception:  # (a combination transformers refuses: DBRX ties nothing, by validation)
                    continue
                checked += 1
                try:
                    # (torch's fills only cost time on the meta device; unlike transformers' ``no_init_weights``
                    # this leaves ``init_weights`` alone, which is where a model ties its head)
                    with torch.device("meta"), skip_default_init():
                        model = getattr(transformers, arch)(cfg)
                except ModuleNotFoundError as exc:  # (a class that needs a package not installed: Inkling, scipy)
                    pytest.skip(f"transformers' {arch} needs {exc.name}")
                theirs = model.get_output_embeddings().weight is model.get_input_embeddings().weight
                assert load_spec({**raw, "architectures": [arch]}).tie_embeddings == theirs, (outer, inner)
                assert load_spec({**cfg.to_dict(), "architectures": [arch]}).tie_embeddings == theirs, (outer, inner)
    assert checked >= 2


@pytest.mark.parametrize("model_type,arch", [("qwen2", "Qwen2ForCausalLM"), ("gemma3_text", "Gemma3ForCausalLM")])
def test_the_logits_sweep_on_two_types(model_type, arch):
    row = registry_logits_vs_hf.run(model_type, arch)
    assert row["status"] == "ok" and row["max_abs_logit_diff"] < 1e-3 * max(1.0, row["logit_scale"])


def test_the_keys_sweep_on_qwen2():
    row = config_keys_vs_hf.run("qwen2", "Qwen2ForCausalLM")
    assert row["status"] == "ok" and not row["misread"] and not row["ignored"]
    assert row["keys"]["read"] >= 5  # (epsilon, RoPE base, activation, ...)
    assert row["keys"]["refused_by_us"] == 0  # (a GELU-gated MLP runs too, as transformers runs it)


def test_a_misread_key_is_reported(monkeypatch):
    """The keys sweep fails a key our loader gets wrong and only that one: here the model is built with the original
    RMSNorm epsilon whatever the config says (moved x1e6: x1.7 would move no logit by 1e-3)."""
    import dataclasses

    import dualpath.model.loader as loader_module

    real = loader_module.load_spec

    def stuck(config, *args, **kwargs):
        return dataclasses.replace(real(config, *args, **kwargs), rms_eps=1e-6)

    monkeypatch.setattr(loader_module, "load_spec", stuck)
    row = config_keys_vs_hf.run("qwen2", "Qwen2ForCausalLM")
    assert [m["key"] for m in row["misread"]] == ["rms_norm_eps"]


def test_a_key_moved_too_little_to_tell_is_unverified_not_read(monkeypatch):
    """A move whose effect on transformers' logits is within the 1e-3-of-range tolerance cannot tell a key read from
    a key recorded and not applied: with the epsilon stuck at its original value and moved only x3, the stuck
    reader passes the tolerance, and the sweep lists the key as unverified instead of read."""
    import dataclasses

    import dualpath.model.loader as loader_module

    real, moved = loader_module.load_spec, config_keys_vs_hf._moved

    def stuck(config, *args, **kwargs):
        return dataclasses.replace(real(config, *args, **kwargs), rms_eps=1e-6)

    monkeypatch.setattr(loader_module, "load_spec", stuck)
    monkeypatch.setattr(config_keys_vs_hf, "_moved",
                        lambda value, key="": value * 3 if key == "rms_norm_eps" else moved(value, key))
    row = config_keys_vs_hf.run("qwen2", "Qwen2ForCausalLM", only={"rms_norm_eps"})
    assert not row["read"] and not row["misread"], row
    assert [m["key"] for m in row["unverified"]] == ["rms_norm_eps"], row


def test_an_ignored_key_that_adds_parameters_is_reported(monkeypatch):
    """A key that adds parameters transformers initialises to zeros or ones (``mlp_bias``: zero biases) moves no
    logit at that initialisation: the sweep perturbs such parameters, so a reader that ignores the key is caught.
    Here the spec is read without the MLP biases whatever the config says."""
    import dataclasses

    import dualpath.model.loader as loader_module
    import dualpath.model.spec as spec_module

    real = loader_module.load_spec

    def unbiased(config, *args, **kwargs):
        return dataclasses.replace(real(config, *args, **kwargs), mlp_has_bias=None)

    monkeypatch.setattr(loader_module, "load_spec", unbiased)
    monkeypatch.setattr(spec_module, "load_spec", unbiased)
    row = config_keys_vs_hf.run("llama", "LlamaForCausalLM", only={"mlp_bias"})
    assert [m["key"] for m in row["ignored"]] == ["mlp_bias"] and not row["read"]


def test_the_shrink_keeps_the_per_layer_overrides_of_the_layers_left():
    """A ``per_layer_config`` is cut as the per-layer lists are (the last layers, renumbered), its sizes kept apart
    from the base ones, and every layer of a kind given that kind's override: Gemma 4's full layers keep a head
    wider than its sliding ones, as in the released configs."""
    from transformers import AutoConfig

    base = AutoConfig.for_model("gemma4_text").to_dict()
    out = registry_logits_vs_hf.shrink(base)
    kinds = out["layer_types"]
    assert len(kinds) == 3 and "full_attention" in kinds and "sliding_attention" in kinds
    over = {int(k): v for k, v in out["per_layer_config"].items()}
    assert sorted(over) == [i for i, t in enumerate(kinds) if t == "full_attention"]
    assert all(v["head_dim"] != out["head_dim"] for v in over.values())


def _v4_style(cfg: dict) -> dict:
    """``cfg`` as transformers 4 wrote it: ``rope_parameters`` as a top-level ``rope_theta`` (and
    ``partial_rotary_factor``) plus ``rope_scaling`` (null for the default RoPE), ``dtype`` as ``torch_dtype``; in
    every sub-config. A RoPE per layer type has no v4 form and is kept."""
    out: dict = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and key.endswith("_config"):
            out[key] = _v4_style(value)
        elif key == "rope_parameters" and isinstance(value, dict) and not any(
                isinstance(v, dict) for v in value.values()):
            rope = dict(value)
            for moved in ("rope_theta", "partial_rotary_factor"):
                if moved in rope:
                    out[moved] = rope.pop(moved)
            kind = rope.get("rope_type", "default")
            out["rope_scaling"] = None if set(rope) <= {"rope_type"} and kind == "default" else {**rope, "type": kind}
        elif key == "dtype":
            out["torch_dtype"] = value
        else:
            out[key] = value
    return out


def test_a_transformers_4_config_reads_as_its_transformers_5_form():
    """Every type the logits sweep passes, its shrunk config saved by transformers 5 and rewritten as transformers 4
    wrote it (:func:`_v4_style`, which transformers 5 converts back on reading, a leftover ``type`` key aside): our
    spec of both is the same."""

    from dualpath.model.spec import load_spec

    moved = 0
    for model_type, arch in _OK:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, kw = _shrunk(model_type)
            cfg = type(base).from_dict({**kw, "dtype": "float32"}).to_dict()
        old = _v4_style(cfg)
        moved += json.dumps(old).count('"rope_parameters"') < json.dumps(cfg).count('"rope_parameters"')
        assert load_spec({**old, "architectures": [arch]}) == load_spec({**cfg, "architectures": [arch]}), model_type
    assert moved > 150  # (most types' RoPE, at the top or in the text config, had a v4 form)


def test_the_dtype_a_config_names_is_the_compute_dtype():
    """Every type the logits sweep passes, its shrunk config saved by transformers 5 with ``dtype`` bfloat16 or
    float16: our spec computes in it, and in a composite config whose text config names none (transformers 5 writes
    a sub-config's unset dtype as null) also when only the text config names it. Found by it: ten image-text readers
    (Gemma 3, Kimi K2.5, Step 3.7, Mistral Large 4, ...) took a null text-level dtype over the outer one and computed
    in float32."""

    from dualpath.model.spec import load_spec

    composites = 0
    for model_type, arch in _OK:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, kw = _shrunk(model_type)
            for dtype in ("bfloat16", "float16"):
                cfg = type(base).from_dict({**kw, "dtype": dtype}).to_dict()
                assert load_spec({**cfg, "architectures": [arch]}).dtype == dtype, (model_type, dtype)
                if isinstance(cfg.get("text_config"), dict):
                    composites += 1
                    inner = {**cfg, "dtype": None, "text_config": {**cfg["text_config"], "dtype": dtype}}
                    assert load_spec({**inner, "architectures": [arch]}).dtype == dtype, (model_type, dtype, "text")
    assert composites > 100


#: special-token fields: a config we write leaves out those the spec has none of, and transformers' class fills its own
_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def test_the_config_we_write_reads_back_to_the_same_spec():
    """Every type the logits sweep passes: the ``config.json`` our ``save_pretrained`` writes for its spec
    (``to_hf_config``) reads back to the same spec, by our reader and through transformers' config class (its
    ``to_dict`` read by ours; special tokens aside). Found by it: Mamba's inner width written as a truncated
    ``expand`` (an inner width that is no multiple of the hidden size read back narrower) and Hy4-VL's M-RoPE
    sections left to its class default, which transformers refuses below 64 rotated dims. Muse Spark is left out:
    its class checks the audio tower's width, which a text-only config cannot give at a shrunk size."""
    import copy
    import dataclasses

    from transformers import CONFIG_MAPPING

    from dualpath.model.spec import load_spec

    checked = 0
    for model_type, arch in _OK:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base, kw = _shrunk(model_type)
            spec = load_spec({**type(base).from_dict(kw).to_dict(), "architectures": [arch]})
            out = spec.to_hf_config()
            assert load_spec(copy.deepcopy(out)) == spec, model_type
            if model_type == "muse_spark":
                continue
            theirs = CONFIG_MAPPING[out["model_type"]].from_dict(
                {k: v for k, v in copy.deepcopy(out).items() if k != "architectures"}).to_dict()
            again = load_spec({**theirs, "architectures": out["architectures"]})
        same = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in _TOKEN_FIELDS}
        assert {f: getattr(again, f) for f in same} == same, model_type
        checked += 1
    assert checked > 200


#: one type per code path that applies a config's activation to an MLP's or its experts' gate (the key moved: SiLU
#: <-> tanh GELU, ReLU squared -> SiLU), each run by transformers with ``ACT2FN[key]``: the generic MoE block (routed
#: and gated shared experts, Aria's SiLU-routed ones), GLM-4.5's DeepSeek-V3 block, Llama 4's, DeepSeek-V3's own
#: reader, the LayerNorm families' SwiGLU, Gemma 2's GeGLU, and the families with their own MLPs or experts (Zamba's
#: GELU, Nemotron-H's ReLU-squared and RecurrentGemma's tanh-GELU defaults among them)
_GATE_ACTIVATIONS = [("mixtral", "hidden_act"), ("qwen2_moe", "hidden_act"), ("aria_text", "hidden_act"),
                     ("glm4_moe", "hidden_act"), ("llama4_text", "hidden_act"), ("deepseek_v3", "hidden_act"),
                     ("stablelm", "hidden_act"), ("cohere2", "hidden_act"), ("gemma2", "hidden_activation"),
                     ("gemma", "hidden_act"),
                     ("jetmoe", "activation_function"), ("chameleon", "hidden_act"), ("hrm_text", "hidden_act"),
                     ("laguna", "hidden_act"), ("mimo_v2_flash", "hidden_act"), ("beam", "hidden_act"),
                     ("longcat_flash", "hidden_act"), ("mistral_large4", "text_config.hidden_act"), ("hy_v4", "hidden_act"),
                     ("dots3_note_text", "hidden_act"), ("molmo2", "text_config.hidden_act"),
                     ("muse_glimmer", "text_config.hidden_activation"), ("minimax", "hidden_act"),
                     ("zaya", "hidden_act"), ("dory", "hidden_act"), ("deepseek_v4", "hidden_act"),
                     ("doge", "hidden_act"), ("inkling_text", "hidden_act"), ("zamba", "hidden_act"),
                     ("zamba2", "hidden_act"), ("nemotron_h", "mlp_hidden_act"),
                     ("recurrent_gemma", "hidden_activation"), ("gemma4_text", "hidden_activation"),
                     ("gemma3n_text", "hidden_activation"),
                     # the recurrent mixers' convolutions (their gates stay SiLU, as transformers runs them)
                     ("mamba", "hidden_act"), ("mamba2", "hidden_act"), ("bamba", "hidden_act"),
                     ("qwen3_next", "hidden_act"), ("kimi_linear", "hidden_act"), ("zamba", "hidden_mamba_act"),
                     ("nemotron_h", "mamba_hidden_act"),
                     # GLM-5.3-Flash: its KDA convolutions and clamped dense MLPs / shared experts (routed: SiLU)
                     ("glm5_next", "text_config.hidden_act")]


def _read_and_written_back(model_type: str, key: str) -> object:
    """The keys sweep on ``key`` alone: the moved key must be read with our logits equal to transformers'; returns
    our spec of the moved config, after checking that the config it writes reads back to the same spec."""
    import copy

    from dualpath.model.spec import load_spec

    arch = dict(_OK)[model_type]
    row = config_keys_vs_hf.run(model_type, arch, only={key})
    if row["status"] == "skipped" and "ModuleNotFoundError" in row.get("detail", ""):
        pytest.skip(row["detail"])
    assert row["read"] == [key], row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base, kw = _shrunk(model_type)
        *path, last = key.split(".")
        level = kw
        for part in path:
            level = level[part]
        level[last] = config_keys_vs_hf._moved(level[last], last)
        spec = load_spec({**type(base).from_dict(kw).to_dict(), "architectures": [arch]})
    assert load_spec(copy.deepcopy(spec.to_hf_config())) == spec
    return spec


@pytest.mark.parametrize("model_type,key", _GATE_ACTIVATIONS)
def test_a_gate_activation_other_than_the_default_is_run_as_transformers_runs_it(model_type, key):
    """The shrunk config with its activation swapped reads, and our logits (two prefill chunks and a decode step over
    paged KV) equal transformers'. These configs were refused before (the experts and these families' MLPs ran SiLU
    only). The config our spec writes names the same activation: it reads back to the same spec."""
    spec = _read_and_written_back(model_type, key)
    assert any(getattr(spec, name, None) is not None for name in ("activation", "mamba_act"))


@pytest.mark.parametrize("model_type", ["llama", "granite", "granite_swa", "hyperclovax", "seed_oss", "smollm3",
                                        "arcee", "cwm", "aria_text", "hy_v3"])
def test_mlp_bias_is_read_as_transformers_builds_it(model_type):
    """``mlp_bias: true`` biases the MLP's projections in these families' transformers classes (Aria's and Hy3's
    shared experts, not their routed ones): read (refused before, but for Llama), our logits equal, and written
    back."""
    assert _read_and_written_back(model_type, "mlp_bias").mlp_has_bias  # type: ignore[attr-defined]


@pytest.mark.parametrize("model_type,key,check", [
    ("falcon", "alibi", lambda s: s.falcon_alibi and s.alibi),
    ("gpt2", "scale_attn_weights", lambda s: s.attn_scale == 1.0),
    ("gpt_bigcode", "scale_attn_weights", lambda s: s.attn_scale == 1.0),
    ("nemotron", "mlp_bias", lambda s: s.mlp_bias and not s.attention_bias),
    ("nemotron", "attention_bias", lambda s: s.attention_bias and not s.mlp_bias),
    ("deepseek_v2", "mlp_bias", lambda s: s.mlp_bias),
    ("minicpm3", "mlp_bias", lambda s: s.mlp_bias),
    ("opt", "layer_norm_elementwise_affine", lambda s: s.plain_norms),
    ("opt", "_remove_final_layer_norm", lambda s: s.no_final_norm),
    ("blip-2", "text_config.layer_norm_elementwise_affine", lambda s: s.plain_norms),
    ("bloom", "apply_residual_connection_post_layernorm", lambda s: s.norm_residual),
    ("exaone_moe", "mlp_layer_types", lambda s: s.mlp_only_layers == (2,)),
    ("laguna", "gating", lambda s: not s.gate_per_head),
    ("ctrl", "layer_norm_epsilon", lambda s: s.final_norm_eps == pytest.approx(1.0) and s.rms_eps == 1e-6),
    ("dory", "attention_bias", lambda s: s.attention_bias),
    ("dory", "mlp_bias", lambda s: s.mlp_has_bias),
    ("deepseek_v4", "mlp_bias", lambda s: s.mlp_has_bias),
    ("cosmos3_edge", "text_config.mlp_bias", lambda s: s.mlp_has_bias),
])
def test_switches_refused_before_are_read_as_transformers_runs_them(model_type, key, check):
    """Switches these families' transformers classes run and we refused before: falcon-rw's ALiBi (in bfloat16, as
    Falcon computes it), GPT-2's and GPTBigCode's unscaled scores, Nemotron's MLP and attention biases set apart,
    DeepSeek-V2's and MiniCPM3's biased dense MLPs (and V2's shared experts; its routed ones stay unbiased), OPT's
    (and BLIP-2's OPT's) weightless LayerNorms and pre-norm blocks without a final norm, Bloom's residuals taken
    from its norms, K-EXAONE's dense layers wherever ``mlp_layer_types`` puts them, Laguna's ``gating: false``
    (per-element gates, as transformers builds them), CTRL's final norm epsilon (its blocks' stay 1e-6), Dory's
    attention and MLP biases, DeepSeek-V4's shared-expert biases, Cosmos3 Edge's MLP biases.
    Read, our logits equal transformers', and written back."""
    assert check(_read_and_written_back(model_type, key))
