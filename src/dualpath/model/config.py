"""Config of the model behind the engines (chosen by ``kind``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dualpath._configbase import Section


class LlamaModelConfig(Section):
    """A real decoder of any family :mod:`dualpath.model.spec` reads (Llama and its relatives, the MoE families,
    DeepSeek-V2/V3/V3.2 with MLA), chosen by the checkpoint's architecture. ``path``: a
    checkpoint directory (safetensors, or PyTorch ``.bin`` state dicts read with weights_only), a GGUF file, or None for the embedded SmolLM2-135M-Instruct. ``random_init``: build
    from ``path``'s config.json with seeded random weights. ``kv_format``: ``auto`` (KV in ``dtype``) or ``fp8``
    (DeepSeek-V2/V3 only: FlashMLA's FP8 latent rows, 656 bytes per token and layer for 512 + 64). ``max_context``:
    the longest context served (see its description; LongRoPE models depend on it)."""

    kind: Literal["llama"] = "llama"
    path: str | None = Field(default=None, description=(
        "a checkpoint directory (safetensors, or pytorch_model*.bin read with weights_only) or a .gguf file; "
        "None: the embedded SmolLM2-135M-Instruct"
    ))
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description=(
        "weights and activations (the KV in it too unless kv_format says otherwise)"
    ))
    random_init: bool = Field(default=False, description=(
        "build the architecture from path's config.json with seeded random weights (no weight files needed)"
    ))
    seed: int = Field(default=0, ge=0, description="seed of random_init's weights")
    attention_backend: Literal["auto", "torch", "triton"] = Field(default="auto", description=(
        "paged attention kernels: torch, triton, or auto (triton on a GPU, torch on a CPU)"
    ))
    kv_format: Literal["auto", "fp8"] = Field(default="auto", description=(
        "auto: KV in dtype; fp8: FlashMLA's FP8 latent rows (the DeepSeek-V2/V3 family only, with kv_lora_rank "
        "a multiple of 128: one scale per 128 latent values; 656 bytes per token and layer at 512 + 64)"
    ))
    mla_prefill: Literal["auto", "absorbed", "decompressed"] = Field(
        default="auto",
        description="MLA checkpoints (DeepSeek-V2/V3/V3.2, MiniCPM3, GLM-4.7-Flash, Kimi): prefill attention form. "
        "'absorbed': the latent kernels, as decode; 'decompressed': each sequence's latent expanded into per-head "
        "keys and values, then scaled_dot_product_attention (FlashAttention on a GPU); 'auto': the one with fewer "
        "FLOPs for the batch, absorbed where the expanded keys and values would not fit a bounded buffer",
    )
    max_context: int | None = Field(
        default=None, gt=0,
        description="the longest context (prompt + generated tokens) served; None: the checkpoint's "
        "max_position_embeddings. For a LongRoPE checkpoint (Phi-3.5, Phi-4-mini) it also picks the RoPE factors: "
        "up to original_max_position_embeddings (the default cap) the short ones, as transformers computes those "
        "lengths; above it the long ones for every position, as vLLM does",
    )
    time_model: Literal["auto", "off"] = Field(
        default="auto",
        description="forward-time model for the PE's compute quota and Algorithm 1's beta: 'auto' calibrates it "
        "from measured layer forwards on first use (cached per model and device); 'off' predicts no time",
    )
    time_model_budget_s: float = Field(default=2.0, gt=0, description="deadline of the time model's calibration")


class SyntheticModelConfig(Section):
    """A model that does not compute: a forward takes the time its FLOP count would take on ``device_tflops``,
    and KV bytes are real bytes of the right size. Lets I/O experiments exceed what the CPU could compute."""

    kind: Literal["synthetic"] = "synthetic"
    n_layers: int = Field(default=8, gt=0, description="layers (each streams one Layer Block per request)")
    n_kv_heads: int = Field(default=2, gt=0, description=(
        "KV heads per layer (KV bytes per token = 2 x layers x heads x head_dim x dtype size)"
    ))
    head_dim: int = Field(default=64, gt=0, description="width of each KV head")
    kv_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="bfloat16", description="element type of the KV bytes")
    linear_flops_per_token: float = Field(default=2.0e9, ge=0, description="2 x active params in layers")
    attn_flops_per_key_layer: float = Field(default=4 * 8 * 64, ge=0, description="4*H*d for GQA")
    device_tflops: float = Field(default=10.0, gt=0, description="effective compute rate for prefill")
    decode_step_s: float = Field(default=0.02, ge=0, description="time of one batched decode step")
    max_context: int = Field(default=65536, gt=0, description=(
        "the longest context (prompt + generated tokens) a turn may have"
    ))
    vocab_size: int = Field(default=32000, gt=0, description=(
        "token ids are below this (generated tokens are drawn from it)"
    ))


ModelConfig = Annotated[LlamaModelConfig | SyntheticModelConfig, Field(discriminator="kind")]
