"""GGUF checkpoints (llama.cpp's single-file format: the embedded SmolLM2 ships as one) read into a Hugging Face
``config.json`` and this project's tensor names: Llama, Qwen2 and Qwen3, unquantized or dequantized by the
``gguf`` package, Llama 3's RoPE factors recovered from ``rope_freqs``, and llama.cpp's q/k row permutation undone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return None


_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _llama3_from_rope_freqs(factors: Any, head_dim: int, theta: float, old_ctx: int, where: Path) -> dict[str, Any]:
    """The ``llama3`` rope_scaling whose per-frequency divisors equal llama.cpp's ``rope_freqs`` tensor: the
    factor is the largest divisor, low/high frequency factors Llama 3's published 1 and 4; checked, not assumed."""
    from dualpath.model.rope import rope_frequencies

    if factors.shape != (head_dim // 2,) or not (factors > 0).all():
        raise ModelError(f"{where}: rope_freqs.weight has shape {tuple(factors.shape)}, expected ({head_dim // 2},) "
                         "positive factors")
    rs = {"rope_type": "llama3", "factor": float(f"{factors.max():.7g}"), "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": old_ctx}
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ours, _ = rope_frequencies(head_dim, theta, rs, old_ctx)
    want = base / torch.from_numpy(factors)
    if not torch.allclose(ours.to(torch.float64), want, rtol=1e-5, atol=0.0):
        raise ModelError(f"{where}: rope_freqs.weight is not Llama 3's RoPE scaling (factor {rs['factor']}, "
                         f"low 1, high 4, original context {old_ctx}); this RoPE variant is unsupported")
    return rs


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to Hugging Face's half split)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Hugging Face config dict and dequantized fp32 tensors (HF names) from a llama/qwen2/qwen3 GGUF file.
    Llama 3's RoPE scaling, which llama.cpp bakes into a ``rope_freqs`` tensor, is read back as ``llama3``
    ``rope_scaling`` only when that tensor equals what those parameters give (otherwise an error)."""
    import gguf
    import numpy as np

    p = Path(path)
    try:
        reader = gguf.GGUFReader(str(p))
    except FileNotFoundError:
        raise ModelError(f"GGUF file {p} not found") from None
    except Exception as exc:
        raise ModelError(f"{p}: not a readable GGUF file ({exc})") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ModelError(f"{p}: unsupported GGUF architecture {arch!r}; expected one of {sorted(_GGUF_ARCHS)}")

    def need(key: str) -> Any:
        v = field(f"{arch}.{key}")
        if v is None:
            raise ModelError(f"{p}: GGUF metadata is missing {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv", n_heads))
    tokens = field("tokenizer.ggml.tokens")
    vocab = int(field(f"{arch}.vocab_size", 0) or (len(tokens) if tokens else 0))
    head_dim = int(field(f"{arch}.attention.key_length", 0) or field(f"{arch}.rope.dimension_count", 0)
                   or hidden // n_heads)
    names = {t.name for t in reader.tensors}
    cfg: dict[str, Any] = {
        "architectures": [_GGUF_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        # GGUF stores float32: round back to the decimal a config.json would hold
        "rms_norm_eps": float(f"{field(f'{arch}.attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
        "rope_theta": float(f"{field(f'{arch}.rope.freq_base', 10000.0):.7g}"),
        "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "torch_dtype": "float32",
    }
    scaling = field(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(field(f"{arch}.rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": int(field(f"{arch}.rope.scaling.original_context_length", 0)
                                                    or cfg["max_position_embeddings"]),
        }
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        cfg["rope_scaling"] = _llama3_from_rope_freqs(
            np.array(gguf.quants.dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).reshape(-1),
            head_dim, cfg["rope_theta"], int(field(f"{arch}.rope.scaling.original_context_length", 0) or 8192), p)
    for key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        v = field(key)
        if v is not None:
            cfg[hf] = int(v)

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf_name = _gguf_name(t.name)
        if hf_name is None:
            raise ModelError(f"{p}: unexpected GGUF tensor {t.name!r}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{p}: tensor {t.name}: quantization {t.tensor_type.name} unsupported") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32))
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            w = _unpermute(w, n_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            w = _unpermute(w, n_kv)
        tensors[hf_name] = w
    return cfg, tensors
