"""The model behind the engines: a real Llama-family decoder over paged KV (:mod:`.llama`: Llama, Mistral, Qwen2/3, Phi-3, Gemma, Gemma 2; also Mixtral, Qwen2-MoE, Qwen3-MoE, sharing :mod:`.moe`'s expert loop), a DeepSeek-V3
decoder (MLA + MoE) over paged latent KV (:mod:`.deepseek`), their architectures (:mod:`.spec`), loaders (:mod:`.loader`: safetensors, PyTorch ``.bin``, GGUF, random init; :mod:`.embedded`: SmolLM2), and the
paged KV pool (:mod:`.kv_pool`). Heavy modules are imported on first attribute access."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "dualpath.model.spec",
    "DeepseekV3Spec": "dualpath.model.mla_spec",
    "DeepseekV3Model": "dualpath.model.deepseek",
    "load_spec": "dualpath.model.spec",
    "LlamaModel": "dualpath.model.llama",
    "SeqBatch": "dualpath.model.llama",
    "ForwardState": "dualpath.model.llama",
    "PrefillState": "dualpath.model.llama",
    "KVPool": "dualpath.model.kv_pool",
    "load_model": "dualpath.model.loader",
    "build_model": "dualpath.model.loader",
    "save_pretrained": "dualpath.model.loader",
    "embedded_model_path": "dualpath.model.embedded",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dualpath.model' has no attribute {name!r}")
