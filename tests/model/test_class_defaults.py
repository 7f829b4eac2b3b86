"""Config keys a checkpoint leaves out read as transformers' config classes fill them: the table
(``dualpath.model.class_defaults``) is the installed transformers', and for every registry type read here a config that
keeps only its sizes (and special tokens) reads to the spec of the config transformers builds from it.

Run as a script, this file prints the table module from the installed transformers:
``python tests/model/test_class_defaults.py > src/dualpath/model/class_defaults.py``."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from typing import Any

import pytest
import torch

from dualpath.model.class_defaults import CLASS_DEFAULTS, NEVER_TIED, TIE_BY_TEXT, TIE_FROM_TEXT
from dualpath.model.hf_config import with_class_defaults
from dualpath.model.spec import load_spec

#: the keys whose class defaults are read (behaviour, not sizes: a size a config leaves out stays an error)
FILL_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
             "max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers",
             "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
             "rope_interleave", "q_lora_rank", "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor",
             "n_group", "topk_group", "norm_topk_prob", "scoring_func", "topk_method", "index_topk", "index_head_dim",
             "index_n_heads", "embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier",
             "decoder_sparse_step", "moe_layer_freq", "first_k_dense_replace", "logit_scale", "use_qk_norm",
             "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar")
#: other sizes, to tell a default derived from the sizes (left out of the table) from a fixed one
_SMALL = {"vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 96}


def derive(cls: Any) -> dict[str, Any]:
    """The table's entry for a config class: each key of :data:`FILL_KEYS` that is a field of the class whose default
    (not null) its instances keep, at the default sizes and at others (a value derived from other keys is not its
    default: ModernBERT's window from ``local_attention``); the RoPE base of a default RoPE that is one dict (and the whole dict where it is more
    than a base); the count of leading dense layers of a default ``mlp_layer_types`` (the legacy
    ``first_k_dense_replace`` it is derived from)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cls().to_dict()
        try:
            b = cls(**_SMALL).to_dict()
        except Exception:  # (a class whose checks reject other sizes: its defaults as they are)
            b = a
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {k: a[k] for k in FILL_KEYS if a.get(k) is not None and a[k] == b.get(k) == fields.get(k, a)}
    ra, rb = a.get("rope_parameters"), b.get("rope_parameters")
    if isinstance(ra, dict) and not any(isinstance(v, dict) for v in ra.values()) and ra == rb \
            and ra.get("rope_theta") is not None:
        out["rope_theta"] = ra["rope_theta"]
        if set(ra) - {"rope_theta", "rope_type"} or ra.get("rope_type", "default") != "default":
            out["rope_parameters"] = ra
    la, lb = a.get("mlp_layer_types"), b.get("mlp_layer_types")
    if isinstance(la, list) and isinstance(lb, list) and "first_k_dense_replace" not in out:
        k = next((i for i, t in enumerate(la) if t != "dense"), len(la))
        if k < len(la) and all(t == "sparse" for t in la[k:]) and lb == ["dense"] * min(k, 3) + ["sparse"] * (3 - min(k, 3)):
            out["first_k_dense_replace"] = k
    return out


def _registry_types() -> list[tuple[str, str]]:
    """(model_type, architecture) of both registries (a type in both, e.g. Llama 4, twice)."""
    from transformers.models.auto import modeling_auto

    return [(model_type, arch)
            for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                            modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
            for model_type, arch in mapping.items()]


def _read_types(arches: dict[str, str] | None = None) -> list[str]:
    """Every registry type whose default config we read, with its text and thinker configs' types (``arches``, when
    given, collects the architectures read, each with its model type)."""
    from transformers import AutoConfig

    from dualpath.errors import ModelError

    types: dict[str, None] = {}
    for model_type, arch in _registry_types():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = AutoConfig.for_model(model_type)
            load_spec({**cfg.to_dict(), "architectures": [arch]})
        except (ModelError, Exception):  # (refused, or transformers cannot build its own default)
            continue
        types[model_type] = None
        if arches is not None:
            arches[arch] = model_type
        for sub in ("text_config", "thinker_config"):
            obj = getattr(cfg, sub, None)
            if obj is not None and not isinstance(obj, dict):
                types[obj.model_type] = None
                inner = getattr(obj, "text_config", None)
                if inner is not None and not isinstance(inner, dict):
                    types[inner.model_type] = None
    return list(types)


def tie_from_text(cls: Any) -> bool:
    """Whether a composite config class ties the embeddings when its text config says so although its own
    ``tie_word_embeddings`` is false (transformers 5's forward of pre-v5 saves: Llava, Qwen2-VL, GLM-4.1V, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = cls().get_text_config()
        if text is None or text is cls():
            return False
        try:
            cfg = cls(tie_word_embeddings=False, text_config={"model_type": text.model_type, "tie_word_embeddings": True})
        except Exception:  # (a class that cannot take a text config this way)
            return False
    return bool(cfg.tie_word_embeddings)


def head_owners(arch: str, model_type: str) -> list[str] | None:
    """The modules of transformers' ``arch`` (built on the meta device from ``model_type``'s default config) that
    tie its LM head: each a model that holds the head and declares tied weights ('' the model itself; an inner
    name, such as Llama 4's ``language_model``, a model built from the text config, which alone decides). None: the
    class has no head to tie, or transformers cannot build its own default (DBRX's)."""
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = getattr(transformers, arch)(AutoConfig.for_model(model_type))
        except Exception:
            return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    owners = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and module._tied_weights_keys:
            try:
                if module.get_output_embeddings() is head:
                    owners.append(name)
            except (AttributeError, NotImplementedError):
                continue
    return owners


def never_tied(arch: str, model_type: str) -> bool:
    """Whether nothing in transformers' model class ties its head (an empty or absent ``_tied_weights_keys``
    wherever the head is held): the head is its own whatever the config says."""
    return head_owners(arch, model_type) == []


def tied_by_text(arch: str, model_type: str) -> bool:
    """Whether ``arch`` ties its head only through an inner model built from its text config (Llama 4's, BLIP-2's
    ``language_model``): the text config's ``tie_word_embeddings`` decides, the outer one has no say."""
    owners = head_owners(arch, model_type)
    return bool(owners) and "" not in owners


def test_the_table_is_the_installed_transformers():
    pytest.importorskip("transformers")
    from transformers import CONFIG_MAPPING

    checked = 0
    for model_type, defaults in CLASS_DEFAULTS.items():
        assert model_type in CONFIG_MAPPING, model_type
        assert derive(CONFIG_MAPPING[model_type]) == defaults, model_type
        checked += 1
    assert checked >= 200
    assert {"mistral", "qwen2", "glm4", "mixtral", "deepseek_v3", "qwen2_vl_text"} <= set(CLASS_DEFAULTS)
    for model_type in TIE_FROM_TEXT:
        assert tie_from_text(CONFIG_MAPPING[model_type]), model_type
    assert {mt for mt in CLASS_DEFAULTS if tie_from_text(CONFIG_MAPPING[mt])} <= TIE_FROM_TEXT  # (none missing)
    assert {"llava", "qwen2_vl", "glm4v"} <= set(TIE_FROM_TEXT) and "gemma3" not in TIE_FROM_TEXT
    registry = {arch: model_type for model_type, arch in _registry_types()}
    for arch in NEVER_TIED:
        assert never_tied(arch, registry[arch]), arch
    for arch in TIE_BY_TEXT:
        assert tied_by_text(arch, registry[arch]), arch
    assert {"Cosmos3EdgeForConditionalGeneration", "MuseSparkForConditionalGeneration"} <= NEVER_TIED
    assert {"Llama4ForConditionalGeneration", "Blip2ForConditionalGeneration"} <= TIE_BY_TEXT


#: the sizes a config keeps (with its special tokens and model_type); every other key is left out
_SIZE_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "d_model", "num_layers", "n_positions",
              "ffn_dim", "num_heads", "dff", "n_heads", "n_layers", "attention_heads", "expansion_ratio", "num_experts",
              "n_routed_experts", "num_local_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
              "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "index_head_dim", "index_n_heads",
              "model_type"}
#: types whose layer pattern is a list the class checks against the layer count (GPT-Neo's attention_types)
_NOT_SIZES_ONLY = {"gpt_neo"}


def _sizes_only(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k in _SIZE_KEYS or k.endswith(("token_id", "token_ids", "token_index"))}
    for sub in ("text_config", "thinker_config"):
        if isinstance(cfg.get(sub), dict):
            out[sub] = _sizes_only(cfg[sub])
    return out


def test_a_config_that_keeps_only_its_sizes_reads_as_transformers_builds_it():
    """Every registry type read here: its default config cut to its sizes and special tokens (its text config too)
    reads to the same spec as the full config transformers builds from that cut one. 61 of 226 read differently or
    were refused before the class defaults (Mistral's 4,096-token window, GLM-4's epsilon, Mixtral's and Qwen2-VL's RoPE base,
    DeepSeek-V3.2's indexer, GLM-4.7-Flash's routing, Granite-Docling's multipliers, ...)."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    from dualpath.errors import ModelError

    checked, bad = 0, []
    for model_type, arch in _registry_types():
        if model_type in _NOT_SIZES_ONLY:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = {**AutoConfig.for_model(model_type).to_dict(), "architectures": [arch]}
            load_spec(full)
        except (ModelError, Exception):
            continue
        cut = {**_sizes_only(full), "architectures": [arch]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = AutoConfig.for_model(model_type, **{k: v for k, v in cut.items() if k != "model_type"})
        ref = load_spec({**built.to_dict(), "architectures": [arch]})
        if load_spec(cut) != ref:
            bad.append((model_type, arch))
        checked += 1
    assert not bad
    assert checked >= 200


def test_a_mistral_config_without_a_window_slides_over_4096_tokens_and_null_turns_it_off():
    base = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 97, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    spec = load_spec(base)
    assert spec.sliding_window == 4096 and spec.rms_eps == 1e-6 and spec.max_position == 131072
    assert load_spec({**base, "sliding_window": None}).sliding_window is None
    assert load_spec({**base, "sliding_window": 7}).sliding_window == 7


def test_the_rope_base_comes_from_the_class_unless_the_config_names_one():
    mixtral = {"model_type": "mixtral", "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "num_local_experts": 4}
    assert with_class_defaults(mixtral)["rope_theta"] == 1e6
    assert with_class_defaults({**mixtral, "rope_theta": 5.0})["rope_theta"] == 5.0
    assert "rope_theta" not in with_class_defaults({**mixtral, "rope_parameters": {"rope_theta": 7.0}})
    scaled = with_class_defaults({**mixtral, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert scaled["rope_theta"] == 1e6 and "rope_parameters" not in scaled
    # a class whose default RoPE is scaled (Mistral 4: YaRN) gives the whole RoPE only to a config naming none
    m4 = with_class_defaults({"model_type": "mistral4"})
    assert m4["rope_parameters"]["rope_type"] == "yarn" and m4["rope_parameters"]["factor"] == 128.0
    assert "rope_parameters" not in with_class_defaults({"model_type": "mistral4", "rope_theta": 3.0})


def test_a_glm4_config_without_an_epsilon_and_a_config_without_a_model_type():
    glm4 = {"model_type": "glm4", "architectures": ["Glm4ForCausalLM"], "vocab_size": 97, "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
    assert load_spec(glm4).rms_eps == 1.5625e-07
    plain = {k: v for k, v in glm4.items() if k != "model_type"}
    assert with_class_defaults(plain) == plain


def test_deepseek_style_classes_give_their_leading_dense_layers():
    cfg = with_class_defaults({"model_type": "glm4_moe_lite"})
    assert cfg["first_k_dense_replace"] == 1 and cfg["routed_scaling_factor"] == 1.8 and cfg["norm_topk_prob"] is True
    assert "first_k_dense_replace" not in with_class_defaults({"model_type": "glm4_moe_lite",
                                                               "mlp_layer_types": ["sparse"]})


@pytest.mark.parametrize("model_type,arch", [
    ("llava", "LlavaForConditionalGeneration"), ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("gemma3", "Gemma3ForConditionalGeneration"), ("mistral3", "Mistral3ForConditionalGeneration"),
    ("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration")])
def test_an_image_text_checkpoint_ties_its_head_as_transformers_ties_it(model_type, arch):
    """The outer and the text config's ``tie_word_embeddings`` in every combination (each true, false or left out):
    our spec ties the head exactly when transformers' model does. Llava and Qwen2-VL tie when either says so, Gemma 3
    and Mistral 3 by the outer key alone (its class default when left out; Gemma 3's text key was read before the
    outer one), Cosmos3 Edge never (it was read as tied when the outer key said so)."""
    pytest.importorskip("transformers")
    import transformers
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_type = AutoConfig.for_model(model_type).get_text_config().model_type
        for outer in (True, False, None):
            for inner in (True, False, None):
                text = {"model_type": text_type, "vocab_size": 97, "hidden_size": 64, "intermediate_size": 96,
                        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128}
                if inner is not None:
                    text["tie_word_embeddings"] = inner
                raw = {"model_type": model_type, "architectures": [arch], "text_config": text}
                if outer is not None:
                    raw["tie_word_embeddings"] = outer
                cfg = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k not in (
                    "model_type", "architectures")})
                with torch.device("meta"):
                    model = getattr(transformers, arch)(cfg)
                theirs = model.get_output_embeddings().weight is model.get_input_embeddings().weight
                assert load_spec(raw).tie_embeddings == theirs, (outer, inner)
                assert load_spec({**cfg.to_dict(), "architectures": [arch]}).tie_embeddings == theirs, (outer, inner)


def _module_source(table: dict[str, dict[str, Any]], tie_text: list[str], untied: list[str],
                   by_text: list[str]) -> str:
    head = sys.modules["dualpath.model.class_defaults"].__doc__ or ""
    lines = [f'"""{head}"""', "", "from __future__ import annotations", "", "from typing import Any", "",
             "#: model_type -> {key: its config class's default}", "CLASS_DEFAULTS: dict[str, dict[str, Any]] = {"]
    lines += [f"    {mt!r}: {table[mt]!r},".replace("'", '"') for mt in sorted(table)]
    lines += ["}", "#: composite model types whose config ties the embeddings when its text config does, whatever its own",
              "#: ``tie_word_embeddings`` says (transformers 5 forwards pre-v5 saves' text-level key)",
              f"TIE_FROM_TEXT: frozenset[str] = frozenset({sorted(tie_text)!r})".replace("'", '"'),
              "#: architectures whose model class ties nothing (its head is its own whatever the config says)",
              f"NEVER_TIED: frozenset[str] = frozenset({sorted(untied)!r})".replace("'", '"'),
              "#: architectures whose head is tied by an inner model built from the text config (its",
              "#: ``language_model``): the text config's ``tie_word_embeddings`` decides, the outer one has no say",
              f"TIE_BY_TEXT: frozenset[str] = frozenset({sorted(by_text)!r})".replace("'", '"')]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from transformers import CONFIG_MAPPING

    arches: dict[str, str] = {}
    read = _read_types(arches)
    print(_module_source({mt: d for mt in read if (d := derive(CONFIG_MAPPING[mt]))},
                         [mt for mt in read if tie_from_text(CONFIG_MAPPING[mt])],
                         [a for a, mt in arches.items() if never_tied(a, mt)],
                         [a for a, mt in arches.items() if tied_by_text(a, mt)]), end="")
