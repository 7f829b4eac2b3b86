"""GGUF checkpoints (llama.cpp's single-file format: the embedded SmolLM2 ships as one) read into a Hugging Face
``config.json`` and Hugging Face tensor names, every tensor unquantized or dequantized by the ``gguf`` package.
Architectures (llama.cpp's names): ``llama`` (also Mistral's; Llama 3's RoPE factors recovered from ``rope_freqs``,
llama.cpp's q/k row permutation undone), ``qwen2``, ``qwen3``, ``qwen2moe`` and ``qwen3moe`` (stacked experts split
per expert; a shared expert and its gate), ``phi3`` (fused q/k/v and gate/up kept fused for Phi-3's loader;
LongRoPE from ``rope_factors_long`` / ``rope_factors_short``), ``gemma2`` and ``gemma3`` (the ``1 + weight`` norms
llama.cpp stores taken back to Gemma's ``weight``; soft caps, window and attention scale as llama.cpp reads them),
``olmo2``, ``granite`` (q/k permuted as Llama's; its four scalings), ``starcoder2``, ``nemotron`` (``1 + weight``
norms), ``stablelm`` (per-head q/k norms stacked ``[heads, dim]``), ``gpt2`` (``Conv1D`` weights stored
transposed), ``gemma`` (``1 + weight`` norms), ``smollm3`` (q/k permuted), Mixtral (a ``llama`` file with
``expert_count``: stacked experts, or one tensor per expert in older files), ``glm4moe`` (GLM-4.5: partial RoPE,
the sigmoid-routed MoE block, its multi-token-prediction blocks left out), ``gpt-oss`` (its experts packed back into
transformers' interleaved ``gate_up_proj``; sinks; YaRN as gpt-oss's config keeps it, untruncated), ``command-r``
and ``cohere2`` (Command R / R7B: their interleaved RoPE as transformers' checkpoints hold it, ``logit_scale``,
per-head q/k norms, Command R7B's window) and
``deepseek2`` (DeepSeek-V3, or V2
with its softmax router: MLA's ``kv_b_proj`` rebuilt from ``attn_k_b`` / ``attn_v_b`` or read whole, the widths from
``key_length_mla`` / ``value_length_mla`` where the file stores MLA absorbed, multi-token-prediction blocks left out,
YaRN's ``mscale_all_dim`` from its log multiplier).
What llama.cpp's converter writes is undone here as its reader (``llama-model.cpp``) reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualpath.errors import ModelError
from dualpath.model.gguf_tensors import hf_tensors

#: llama.cpp's architecture -> (Hugging Face architecture, model_type)
_GGUF_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
               "qwen3": ("Qwen3ForCausalLM", "qwen3"), "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
               "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"), "phi3": ("Phi3ForCausalLM", "phi3"),
               "gemma2": ("Gemma2ForCausalLM", "gemma2"), "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
               "olmo2": ("Olmo2ForCausalLM", "olmo2"), "granite": ("GraniteForCausalLM", "granite"),
               "starcoder2": ("Starcoder2ForCausalLM", "starcoder2"), "nemotron": ("NemotronForCausalLM", "nemotron"),
               "stablelm": ("StableLmForCausalLM", "stablelm"), "gpt2": ("GPT2LMHeadModel", "gpt2"),
               "gemma": ("GemmaForCausalLM", "gemma"), "smollm3": ("SmolLM3ForCausalLM", "smollm3"),
               "deepseek2": ("DeepseekV3ForCausalLM", "deepseek_v3"), "glm4moe": ("Glm4MoeForCausalLM", "glm4_moe"),
               "gpt-oss": ("GptOssForCausalLM", "gpt_oss"), "command-r": ("CohereForCausalLM", "cohere"),
               "cohere2": ("Cohere2ForCausalLM", "cohere2")}
#: architectures with LayerNorms (``attention.layer_norm_epsilon``) instead of RMSNorms
_LAYER_NORM = ("starcoder2", "nemotron", "stablelm", "gpt2", "command-r", "cohere2")
#: llama.cpp's layer counts of the Gemma 2 / 3 27B models, whose queries it scales by hidden / heads
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


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


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A Hugging Face config dict and dequantized tensors (HF names; each computed in fp32, then kept in ``dtype``,
    the model's, so that the host holds one tensor in fp32 at a time) from a GGUF file.
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
    if not isinstance(arch, str) or arch not in _GGUF_ARCHS:
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
    rope_dims = int(field(f"{arch}.rope.dimension_count", 0))
    partial = arch in ("phi3", "nemotron", "stablelm", "glm4moe")  # (rope.dimension_count: the rotary part)
    head_dim = int(field(f"{arch}.attention.key_length", 0) or (0 if partial else rope_dims) or hidden // n_heads)
    names = {t.name for t in reader.tensors}
    hf_arch, model_type = _GGUF_ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
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
    cfg.update(_arch_config(arch, field, need, cfg, rope_dims, p, names))
    by_name = {t.name: t for t in reader.tensors}

    def floats(name: str) -> list[float]:
        t = by_name[name]
        return [float(f"{x:.7g}") for x in np.array(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1)]

    if "rope_factors_long.weight" in by_name:  # (Phi-3's LongRoPE, as llama.cpp stores its factor lists)
        if "rope_factors_short.weight" not in by_name:
            raise ModelError(f"{p}: rope_factors_long.weight without rope_factors_short.weight")
        cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": floats("rope_factors_long.weight"),
                               "short_factor": floats("rope_factors_short.weight")}
        cfg["original_max_position_embeddings"] = int(need("rope.scaling.original_context_length"))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        cfg["rope_scaling"] = _llama3_from_rope_freqs(
            np.array(gguf.quants.dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).reshape(-1),
            head_dim, cfg["rope_theta"], int(field(f"{arch}.rope.scaling.original_context_length", 0) or 8192), p)
    for key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        v = field(key)
        if v is not None:
            cfg[hf] = int(v)

    return cfg, hf_tensors(reader, arch, cfg, n_heads, n_kv, dtype, p)


def _routed_moe(a: str, field: Any, need: Any) -> dict[str, Any]:
    """The sigmoid-routed MoE block's fields DeepSeek-V3 and GLM-4.5 share, from llama.cpp's metadata."""
    groups = int(field(f"{a}.expert_group_count", 1) or 1)
    return {"first_k_dense_replace": int(field(f"{a}.leading_dense_block_count", 0) or 0),
            "moe_intermediate_size": int(need("expert_feed_forward_length")),
            "n_routed_experts": int(need("expert_count")),
            "n_shared_experts": int(field(f"{a}.expert_shared_count", 0) or 0),
            "num_experts_per_tok": int(need("expert_used_count")),
            "routed_scaling_factor": float(f"{field(f'{a}.expert_weights_scale', 1.0):.7g}"),
            "norm_topk_prob": bool(field(f"{a}.expert_weights_norm", False)),
            "n_group": groups, "topk_group": int(field(f"{a}.expert_group_used_count", groups) or groups)}


def _glm4moe_config(field: Any, need: Any, cfg: dict[str, Any], rope_dims: int, names: set[str]) -> dict[str, Any]:
    """GLM-4.5's config from llama.cpp's ``glm4moe`` metadata: partial RoPE, optional q/k norms, the routed MoE
    block; its multi-token-prediction blocks (``nextn_predict_layers``) left out."""
    nextn = int(field("glm4moe.nextn_predict_layers", 0) or 0)
    out = {"num_hidden_layers": cfg["num_hidden_layers"] - nextn, "use_qk_norm": "blk.0.attn_q_norm.weight" in names,
           **_routed_moe("glm4moe", field, need)}
    if rope_dims and rope_dims != cfg["head_dim"]:
        out["partial_rotary_factor"] = rope_dims / cfg["head_dim"]
    return out


def _deepseek2_config(field: Any, need: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2 / V3's config from llama.cpp's ``deepseek2`` metadata: MLA's ranks and head widths (the
    ``key_length_mla`` / ``value_length_mla`` of files that store MLA in its absorbed form, else ``key_length`` /
    ``value_length``), the MoE block, and YaRN (its log multiplier is 0.1 x ``mscale_all_dim``)."""
    a = "deepseek2"
    rope = int(need("rope.dimension_count"))
    key = int(field(f"{a}.attention.key_length_mla", 0) or need("attention.key_length"))
    value = int(field(f"{a}.attention.value_length_mla", 0) or need("attention.value_length"))
    nextn = int(field(f"{a}.nextn_predict_layers", 0) or 0)
    sigmoid = int(field(f"{a}.expert_gating_func", 1) or 1) == 2  # (llama.cpp: 1 softmax, 2 sigmoid)
    q_lora = field(f"{a}.attention.q_lora_rank")
    out: dict[str, Any] = {
        "num_hidden_layers": cfg["num_hidden_layers"] - nextn, "num_key_value_heads": cfg["num_attention_heads"],
        "kv_lora_rank": int(need("attention.kv_lora_rank")), "q_lora_rank": int(q_lora) if q_lora else None,
        "qk_rope_head_dim": rope, "qk_nope_head_dim": key - rope, "v_head_dim": value, "head_dim": rope,
        **_routed_moe(a, field, need)}
    if not sigmoid:  # (DeepSeek-V2's softmax router)
        out.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", scoring_func="softmax",
                   topk_method="group_limited_greedy" if out["n_group"] > 1 else "greedy")
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("rope_type") == "yarn":
        mscale = float(f"{field(f'{a}.rope.scaling.yarn_log_multiplier', 0.0) / 0.1:.7g}")
        rs.update(type="yarn", mscale=mscale, mscale_all_dim=mscale, beta_fast=32, beta_slow=1)
    return out


def _arch_config(arch: str, field: Any, need: Any, cfg: dict[str, Any], rope_dims: int, p: Path,
                 names: set[str]) -> dict[str, Any]:
    """The config fields of one architecture beyond Llama's, as llama.cpp reads them from the metadata."""
    out: dict[str, Any] = {}
    if arch == "deepseek2":
        return _deepseek2_config(field, need, cfg)
    if arch == "glm4moe":
        return _glm4moe_config(field, need, cfg, rope_dims, names)
    if arch == "gpt-oss":  # (the experts' width is its intermediate size; YaRN as its config keeps it, untruncated)
        out = {"num_local_experts": int(need("expert_count")), "num_experts_per_tok": int(need("expert_used_count")),
               "intermediate_size": int(need("expert_feed_forward_length")),
               "sliding_window": int(need("attention.sliding_window"))}
        rs = cfg.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("rope_type") == "yarn":
            rs.update(beta_fast=32.0, beta_slow=1.0, truncate=False)
        return out
    if arch == "llama" and field(f"{arch}.expert_count"):  # (Mixtral)
        out.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                   num_local_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")))
    if arch in ("qwen2moe", "qwen3moe"):
        out.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(field(f"{arch}.expert_feed_forward_length", 0)
                                             or cfg["intermediate_size"]),
                   # (llama.cpp renormalizes Qwen3-MoE's top-k weights and not Qwen2-MoE's)
                   norm_topk_prob=bool(field(f"{arch}.expert_weights_norm", arch == "qwen3moe")),
                   decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "qwen2moe":
            out["shared_expert_intermediate_size"] = int(need("expert_shared_feed_forward_length"))
    elif arch == "phi3":
        if rope_dims and rope_dims != cfg["head_dim"]:
            out["partial_rotary_factor"] = rope_dims / cfg["head_dim"]
        window = field(f"{arch}.attention.sliding_window")
        out["sliding_window"] = int(window) if window else None
    elif arch in _LAYER_NORM:
        eps = float(f"{field(f'{arch}.attention.layer_norm_epsilon', 1e-5):.7g}")
        if rope_dims and rope_dims != cfg["head_dim"]:
            out["partial_rotary_factor"] = rope_dims / cfg["head_dim"]
        if arch == "starcoder2":
            out.update(norm_epsilon=eps, use_bias="blk.0.attn_q.bias" in names, sliding_window=None)
        elif arch == "nemotron":
            out["norm_eps"] = eps
        elif arch == "stablelm":
            out.update(layer_norm_eps=eps, use_qkv_bias="blk.0.attn_q.bias" in names,
                       qk_layernorm="blk.0.attn_q_norm.weight" in names,
                       use_parallel_residual="blk.0.ffn_norm.weight" not in names)
        elif arch in ("command-r", "cohere2"):  # (its interleaved RoPE stored as transformers' checkpoint has it)
            out.update(layer_norm_eps=eps, logit_scale=float(f"{field(f'{arch}.logit_scale', 0.0625):.7g}"))
            if arch == "command-r":
                out["use_qk_norm"] = "blk.0.attn_q_norm.weight" in names
            else:
                window = field(f"{arch}.attention.sliding_window")
                out["sliding_window"] = int(window) if window else None
        elif arch == "gpt2":
            out.update(n_embd=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                       n_positions=cfg["max_position_embeddings"], n_inner=cfg["intermediate_size"],
                       layer_norm_epsilon=eps)
    elif arch == "granite":
        for key, hf in (("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                        ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")):
            v = field(f"{arch}.{key}")
            if v is not None:
                out[hf] = float(f"{v:.7g}")
    elif arch in ("gemma2", "gemma3"):
        head_dim = cfg["head_dim"]
        big = cfg["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]  # (llama.cpp's 27B query scale)
        out["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"] if big else head_dim
        window = field(f"{arch}.attention.sliding_window")
        if window:
            out["sliding_window"] = int(window)
        for key in ("attn_logit_softcapping", "final_logit_softcapping") if arch == "gemma2" else ():
            v = field(f"{arch}.{key}")  # (absent: llama.cpp's defaults, Gemma 2's 50 and 30, as transformers')
            if v is not None:
                out[key] = float(f"{v:.7g}")
        if arch == "gemma3":
            out["rope_local_base_freq"] = float(f"{field(f'{arch}.rope.freq_base_swa', 10000.0):.7g}")
            pattern = field(f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, list):  # (one flag per layer: sliding or not)
                if len(pattern) != cfg["num_hidden_layers"]:
                    raise ModelError(f"{p}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                                     f"{cfg['num_hidden_layers']} layers")
                out["layer_types"] = ["sliding_attention" if f else "full_attention" for f in pattern]
            elif pattern is not None:
                out["sliding_window_pattern"] = int(pattern)
    return out
