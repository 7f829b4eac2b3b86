"""Config keys under the other names transformers' config classes accept (their ``attribute_map``): the table
(``dualpath.model.attribute_maps``) is the installed transformers', and for every model type read here a config that
uses an alias instead of the key reads to the same spec, as transformers reads it."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from dualpath.errors import ModelError
from dualpath.model.attribute_maps import ATTRIBUTE_MAPS
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")


def _default(model_type: str) -> Any:
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoConfig.for_model(model_type)


def _objects(cfg: Any) -> list[Any]:
    out = [cfg]
    for key in ("text_config", "thinker_config"):
        sub = getattr(cfg, key, None)
        if sub is not None and not isinstance(sub, dict):
            out += _objects(sub)
    return out


def test_the_table_is_the_installed_transformers():
    from transformers import CONFIG_MAPPING

    checked = 0
    for model_type, aliases in ATTRIBUTE_MAPS.items():
        if model_type in CONFIG_MAPPING:
            assert dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}) == aliases, model_type
            checked += 1
    assert checked >= 60


def _registry_types() -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    out: dict[str, str] = {}
    for mapping in (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        for model_type, arch in mapping.items():
            out.setdefault(model_type, arch)
    return out


def test_an_alias_reads_as_the_key_it_names():
    """Each registry type read here whose config class (or its text config's) has aliases: its default config with
    one key moved to its alias is the same spec (Mixtral's ``num_experts``, GLM-4.7-Flash's ``head_dim`` for
    ``qk_rope_head_dim``, HunYuan-VL's ``org_vocab_size``, A.X's ``num_local_experts``, ...)."""
    checked = 0
    for model_type, arch in sorted(_registry_types().items()):
        try:
            cfg = _default(model_type)
        except Exception:  # (transformers cannot build its own default: hf_registry_coverage.py lists them)
            continue
        base = {**cfg.to_dict(), "architectures": [arch]}
        try:
            ref = load_spec(base)
        except ModelError:
            continue  # (a family refused, or a default config we do not run: hf_registry_coverage.py)
        for obj in _objects(cfg):
            for alias, key in ATTRIBUTE_MAPS.get(obj.model_type, {}).items():
                target = base if obj is cfg else base.get("text_config") or base.get("thinker_config")
                if not isinstance(target, dict) or key not in target or target.get("model_type") != obj.model_type:
                    continue
                moved = {k: v for k, v in target.items() if k != key} | {alias: target[key]}
                variant = moved if obj is cfg else {**base, ("text_config" if "text_config" in base
                                                             else "thinker_config"): moved}
                assert load_spec(variant) == ref, (model_type, alias)
                checked += 1
    assert checked >= 40


def test_an_alias_given_beside_its_key_is_the_one_read():
    """As transformers 5 reads a config giving both (its config classes set the attribute from the alias last,
    whatever the order): checked against Mixtral's config class."""
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 97, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2}
    assert load_spec({**{k: v for k, v in cfg.items() if k != "num_local_experts"}, "num_experts": 4}) == load_spec(cfg)
    both = {**cfg, "num_experts": 8}
    assert transformers.MixtralConfig.from_dict(both).num_local_experts == 8
    assert load_spec(both) == load_spec({**cfg, "num_local_experts": 8})
