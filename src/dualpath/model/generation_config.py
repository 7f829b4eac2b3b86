"""What a checkpoint says about generating with it: its end-of-sequence ids and its sampling defaults.

A Hugging Face checkpoint directory may carry ``generation_config.json`` (``eos_token_id``: one id or a list;
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``max_new_tokens``) and always carries ``config.json``, whose
``eos_token_id`` (or its ``text_config``'s, for multimodal wrappers) is the fallback. Chat models list their
end-of-turn tokens there (Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, GLM-4's ``<|user|>``, Llama 3's
``<|eot_id|>``), which a tokenizer's single ``eos_token`` does not name; a checkpoint with no tokenizer at all
still has them. The serving layer and ``dualpath generate`` stop on their union with the tokenizer's
(:func:`stop_ids_of`); the serving layer, as vLLM does by default, uses the sampling values as the defaults of a request that gives none.
``do_sample`` is not read (vLLM does not either): a request's own ``temperature`` decides.

A file that is not JSON, or a value of the wrong type or range, is a :class:`~dualpath.errors.ModelError` naming
the file and the key; a missing file, or a key that is absent or ``null``, is simply not a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualpath.errors import ModelError

#: the sampling keys read, with their valid range (the same as :class:`dualpath.engine.sampling.SamplingParams`)
_RANGES: dict[str, tuple[float, float, bool]] = {  # key -> (low, high, low is open)
    "temperature": (0.0, 100.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "repetition_penalty": (0.0, 10.0, True),
}
#: at most this many end-of-sequence ids (the control protocol's bound on a request's stop ids is 256)
MAX_EOS_IDS = 128


@dataclass(frozen=True)
class GenerationDefaults:
    """A checkpoint's end-of-sequence ids and sampling defaults (None: the checkpoint sets none)."""

    eos_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None  # the answer's length when a request gives none

    def sampling(self) -> dict[str, float | int]:
        """The sampling defaults the checkpoint sets, by name (vLLM's names)."""
        out: dict[str, float | int] = {}
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        return out


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return obj


def _eos(obj: dict[str, Any], path: Path, key: str = "eos_token_id") -> tuple[int, ...] | None:
    v = obj.get(key)
    if v is None:
        return None
    items = v if isinstance(v, list) else [v]
    if len(items) > MAX_EOS_IDS or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                           for x in items):
        raise ModelError(f"{path}: {key} must be a token id >= 0 or a list of at most {MAX_EOS_IDS} of them, "
                         f"got {v!r}")
    return tuple(sorted(set(items)))


def _number(obj: dict[str, Any], key: str, path: Path) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    lo, hi, open_lo = _RANGES[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo or v > hi or (open_lo and v == lo):
        lo_s = f"({lo:g}" if open_lo else f"[{lo:g}"
        raise ModelError(f"{path}: {key} must be a number in {lo_s}, {hi:g}], got {v!r}")
    return float(v)


def read_generation_defaults(checkpoint: str | Path) -> GenerationDefaults:
    """The :class:`GenerationDefaults` of a checkpoint directory (or of the directory of its ``config.json``);
    empty for a GGUF file (its tokenizer carries its end-of-sequence id) or a path without these files."""
    p = Path(checkpoint)
    if p.is_file():
        if p.name != "config.json":
            return GenerationDefaults()
        p = p.parent
    gen_path, cfg_path = p / "generation_config.json", p / "config.json"
    gen = _load(gen_path)
    eos: tuple[int, ...] | None = None
    if gen is not None:
        eos = _eos(gen, gen_path)
    if eos is None:
        cfg = _load(cfg_path)
        if cfg is not None:
            eos = _eos(cfg, cfg_path)
            text = cfg.get("text_config")
            if eos is None and isinstance(text, dict):
                eos = _eos(text, cfg_path, "eos_token_id")
    if gen is None:
        return GenerationDefaults(eos_ids=eos or ())
    top_k = gen.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ModelError(f"{gen_path}: top_k must be an integer >= 0, got {top_k!r}")
    values = {key: _number(gen, key, gen_path) for key in _RANGES}
    new = gen.get("max_new_tokens")
    if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < 1):
        raise ModelError(f"{gen_path}: max_new_tokens must be an integer >= 1, got {new!r}")
    return GenerationDefaults(eos_ids=eos or (), top_k=top_k, max_new_tokens=new, **values)


def stop_ids_of(tokenizer: Any, eos_ids: tuple[int, ...] = ()) -> tuple[int, ...]:
    """End-of-sequence ids: ``eos_ids`` (the checkpoint's, from its ``generation_config.json`` or ``config.json``:
    :mod:`dualpath.model.generation_config`), a tokenizer's eos token, and the end-of-turn tokens of the families
    that have them when present (``<|im_end|>``, Llama 3's ``<|eot_id|>`` and ``<|eom_id|>`` (after a tool call),
    gpt-oss's ``<|return|>`` and ``<|call|>``), as their generation configs list them."""
    ids: set[int] = set(eos_ids)
    if tokenizer is None:
        return tuple(sorted(ids))
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(x) for x in eos)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|return|>", "<|call|>"):
        if name in vocab:
            ids.add(int(vocab[name]))
    return tuple(sorted(ids))
