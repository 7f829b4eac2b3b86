"""What the spec of every architecture shares: reading a checkpoint's ``config.json``, its RoPE fields, its dtype.

:class:`dualpath.model.spec.ModelSpec` (the Llama family and its relatives) and
:class:`dualpath.model.mla_spec.DeepseekV3Spec` (the MLA decoders) both build on these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cfg_int(cfg: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> int:
    """``cfg[key]``, an integer >= ``minimum`` (not a bool), or a :class:`ModelError` naming the key."""
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ModelError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def cfg_num(cfg: Mapping[str, Any], key: str, where: str, positive: bool = True) -> float:
    """``cfg[key]``, a number > 0 (``positive``) or >= 0, or a :class:`ModelError` naming the key."""
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0):
        raise ModelError(f"{where}: {key} must be a {'positive number' if positive else 'number >= 0'}, got {v!r}")
    return float(v)


def cfg_bool(cfg: Mapping[str, Any], key: str, where: str) -> bool:
    """``cfg[key]``, true or false, or a :class:`ModelError` naming the key."""
    v = cfg.get(key)
    if not isinstance(v, bool):
        raise ModelError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def cfg_kinds(cfg: Mapping[str, Any], key: str, n: int, allowed: tuple[str, ...], where: str,
              default: list[str]) -> list[str]:
    """``cfg[key]`` (``default`` when absent or null): one of ``allowed`` for each of the ``n`` layers (a config's
    ``layer_types`` / ``mlp_layer_types``), or a :class:`ModelError` naming the key."""
    kinds = cfg.get(key)
    kinds = default if kinds is None else kinds
    if not isinstance(kinds, list) or len(kinds) != n or any(k not in allowed for k in kinds):
        raise ModelError(f"{where}: {key} must name {' or '.join(repr(a) for a in allowed)} for each of the {n} "
                         f"layers, got {kinds!r}")
    return kinds


def config_dtype(cfg: Mapping[str, Any], dtype: str | None) -> str:
    """The compute dtype: ``dtype`` when given, else the config's (``torch_dtype`` / ``dtype``), float32 when it names
    none this project runs."""
    if dtype is not None:
        return dtype
    named = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return named if named in _DTYPES else "float32"


def inherit_outer(out: dict[str, Any], text: Mapping[str, Any], cfg: Mapping[str, Any],
                  keys: tuple[str, ...] = ("torch_dtype", "dtype")) -> dict[str, Any]:
    """``out`` (an image-text checkpoint's language-model config, read from its ``text`` config) given each of
    ``keys`` that ``text`` leaves out or null from the outer ``cfg``, where such keys live (the dtype, the special
    tokens); transformers 5 writes a sub-config's unset dtype as null."""
    for key in keys:
        if text.get(key) is None and key in cfg:
            out[key] = cfg[key]
    return out


class _SpecCommon:
    """What every architecture's spec derives the same way from its ``dtype`` and ``rope_scaling`` fields."""

    dtype: str
    rope_scaling: dict[str, Any] | None

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return str(rs.get("rope_type", rs.get("type", "default")))


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _special_float(obj: dict[str, Any]) -> Any:
    """transformers 5 writes a float JSON cannot hold as ``{"__float__": "Infinity"}`` (Granite 4's
    ``time_step_limit``): read back as the float."""
    if len(obj) == 1 and isinstance(obj.get("__float__"), str) and obj["__float__"] in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[obj["__float__"]]
    return obj


def read_hf_config(config: dict[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """A config dict and a name for messages, from a dict, a ``config.json`` path or a directory holding one."""
    if isinstance(config, dict):
        return config, "config"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text(), object_hook=_special_float)
    except FileNotFoundError:
        raise ModelError(f"model config {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return cfg, str(path)


def parse_rope(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling or None)`` from a config's ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling``; yarn/llama3 get ``original_max_position_embeddings`` filled in."""
    rope_params = cfg.get("rope_parameters")
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    if isinstance(rope_params, dict):  # transformers >= 5 writes rope_parameters
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if isinstance(rope_scaling, dict):
        rope_scaling = dict(rope_scaling)
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        rope_scaling.pop("type", None)
        rope_scaling["rope_type"] = kind
        if kind == "default":
            rope_scaling = None
        elif kind in ("llama3", "yarn"):
            rope_scaling.setdefault("original_max_position_embeddings",
                                    cfg.get("original_max_position_embeddings")
                                    or cfg.get("max_position_embeddings", 2048))
    elif rope_scaling is not None:
        raise ModelError(f"{where}: rope_scaling must be an object or null")
    return float(rope_theta if rope_theta is not None else 10000.0), rope_scaling


def context_note(spec: Any) -> str:
    """What sets ``spec.context_limit``, for an error that names the knob to turn."""
    orig = (spec.rope_scaling or {}).get("original_max_position_embeddings")
    if getattr(spec, "rope_long", None) is False and spec.context_limit == orig:
        return (f"a LongRoPE model on its short RoPE factors serves up to original_max_position_embeddings={orig}; "
                "set model.max_context (dualpath generate --max-context) higher to serve longer contexts with its "
                "long factors, at every position")
    if spec.context_cap is not None and spec.context_limit == spec.context_cap:
        return f"model.max_context={spec.context_cap}"
    return f"max_position_embeddings={spec.max_position}"
