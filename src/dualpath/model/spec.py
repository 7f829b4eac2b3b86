"""The architecture of a Llama-family decoder, read from a Hugging Face ``config.json`` (or GGUF metadata).

Supported: ``LlamaForCausalLM`` (model_type ``llama``), ``MistralForCausalLM`` (``mistral``, read as Llama),
``Qwen2ForCausalLM`` (``qwen2``) and ``Qwen3ForCausalLM`` (``qwen3``): RMSNorm, RoPE (``default``, ``linear``,
``dynamic``, ``llama3``, ``yarn``), grouped-query attention, SwiGLU MLP, optional q/k/v bias (always on for Qwen2; Llama and
Qwen3 then bias ``o_proj`` too), Qwen3's per-head q/k RMSNorm, optional tied embeddings. And their softmax-router
mixture-of-experts relatives, with the same attention: ``MixtralForCausalLM`` (``mixtral``: Mistral attention, MoE
in every layer, top-k weights renormalized), ``Qwen2MoeForCausalLM`` (``qwen2_moe``: Qwen2 attention with
``qkv_bias``, plus a shared expert gated by ``sigmoid(shared_expert_gate(x))``) and ``Qwen3MoeForCausalLM``
(``qwen3_moe``: Qwen3 attention, no shared expert); the Qwen pair renormalize only with ``norm_topk_prob`` and use
a dense MLP in ``mlp_only_layers`` and in layers off ``decoder_sparse_step``. ``GraniteMoeForCausalLM``
(``granitemoe``) and ``GraniteMoeSharedForCausalLM`` (``granitemoeshared``) are Granite's scalings over Mixtral's
experts, routed by the softmax of the top-k logits; Shared adds an ungated shared expert
(``shared_intermediate_size``). ``Llama4ForCausalLM`` (``llama4_text``) is read by :mod:`dualpath.model.llama4`.

Three more dense families run on the same path: ``Phi3ForCausalLM`` (``phi3``: fused ``qkv_proj`` and
``gate_up_proj`` checkpoint tensors, split at load time and fused again by our ``save_pretrained``; no biases;
``partial_rotary_factor`` rotates only the first ``int(head_dim * factor)`` dims of each head, as Phi-4-mini does;
``default`` RoPE or LongRoPE (``longrope``, and ``su`` / ``yarn`` read as it, as Phi3Config reads them: Phi-3.5-mini,
Phi-3-mini-128k, Phi-4-mini), whose factor set is fixed per deployment (:func:`dualpath.model.rope.rope_long_for`: the short factors
with the context capped at ``original_max_position_embeddings`` unless ``max_context`` asks for more, then the long
factors at every position) so that a stored prefix's KV never depends on the forward that computed it) and
``GemmaForCausalLM`` (``gemma``: RMSNorm scaling by ``1 + weight`` in fp32, embeddings times ``sqrt(hidden_size)``
rounded to the compute dtype, GeGLU with the tanh GELU, an explicit ``head_dim`` (256 unless the config says
otherwise), tied embeddings by default, ``attention_bias`` on q/k/v and o). ``Gemma2ForCausalLM`` (``gemma2``) adds
to Gemma: attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
(``attn_logit_softcapping * tanh(s / cap)``, in every attention backend), final logits soft-capped
(``final_logit_softcapping``), an RMSNorm on the attention output and around the MLP (``post_attention_layernorm``,
``pre_feedforward_layernorm``, ``post_feedforward_layernorm``), ``hidden_activation`` (not ``hidden_act``), and
sliding-window layers in ``layer_types``. ``Gemma3ForCausalLM`` (``gemma3``, model_type ``gemma3_text``: Gemma 3's
text models) is Gemma 2 with a Gemma-style RMSNorm on each head's query and key (before RoPE), no soft caps by
default, five sliding layers to one full (``sliding_window_pattern`` 6, or ``layer_types``) and two RoPEs: the
full layers' (``rope_theta``, default 1e6, with ``rope_scaling``) and the sliding layers' (``rope_local_base_freq``,
default 1e4, no scaling), or ``rope_parameters`` per layer type as transformers 5 writes them. Gemma 3's image-text
checkpoints (``Gemma3ForConditionalGeneration``: gemma-3-4b/12b/27b) are read as their text model
(:func:`dualpath.model.hf_config.gemma3_text_config`; the loader takes the language model's tensors and leaves the vision tower). So are
the image-text checkpoints of Mistral 3 (Mistral Small 3.1 / 3.2), Llava, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
Qwen3-VL-MoE (:func:`dualpath.model.hf_config.text_model_config`: over text, M-RoPE is plain RoPE; Qwen3-VL-MoE runs
as ``qwen3_moe``, always renormalized, its experts read in the hub's ``x @ w`` layout or transformers' own), and those
of the families whose language model is a text model here (LLaVA-NeXT, InternVL, Idefics 3, SmolVLM, Aya Vision,
Janus, ...: ``hf_config._IMAGE_TEXT_ARCHS``).
``GptOssForCausalLM`` (``gpt_oss``) is a MoE on the Llama attention path with q/k/v/o biases, a learned sink
logit per query head in each softmax's denominator (:attr:`ModelSpec.attention_sinks`), alternating sliding and
full layers (``layer_types``; GptOssConfig's defaults: even layers slide over 128 tokens), YaRN RoPE (base
150,000, factor 32 over 4,096 positions, ``truncate: false``), a biased router softmaxing its top-k logits and
packed experts with a clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``; :mod:`dualpath.model.gpt_oss`).
``ArceeForCausalLM`` (``arcee``: AFM) is Llama with a ReLU-squared MLP ``down(relu(up(x)) ** 2)`` (not gated).
``GlmForCausalLM`` (``glm``: GLM-4-9B) and ``Glm4ForCausalLM`` (``glm4``: GLM-4-0414, GLM-Z1) are Llama with q/k/v
biases, a fused ``gate_up_proj`` (split at load), RoPE on half of each head turning interleaved pairs (read as ours by
permuting the q/k rows at load) and, for ``glm4``, RMSNorms on the attention's and the MLP's outputs
(``post_self_attn_layernorm``, ``post_mlp_layernorm``).
``Glm4MoeForCausalLM`` (``glm4_moe``: GLM-4.5 / 4.6) has grouped-query attention with q/k/v biases (none on
``o_proj``), RoPE on ``partial_rotary_factor`` (0.5) of each head, optional per-head q/k RMSNorms
(``use_qk_norm``), ``first_k_dense_replace`` dense layers, then DeepSeek-V3's MoE: sigmoid scores with a
correction bias choosing the top ``num_experts_per_tok`` within the best ``topk_group`` of ``n_group`` groups,
renormalized (``norm_topk_prob``) and scaled by ``routed_scaling_factor``, plus ``n_shared_experts`` shared
experts; its multi-token-prediction layers are not decoder layers and are left out at load.
``SolarOpenForCausalLM`` (``solar_open``: Upstage's Solar Open) is Llama's attention (q/k/v biases with
``attention_bias``, none on ``o_proj``; RoPE over whole heads) over
GLM-4.5's MoE block in every layer; its config has no ``intermediate_size`` (no dense layer).
``FlexOlmoForCausalLM`` (``flex_olmo``: FlexOlmo) is OLMo 2's blocks (output norms, whole-projection q/k norms)
with OLMoE's softmax router over ``num_experts`` experts ``intermediate_size`` wide in every layer.
``AfmoeForCausalLM`` (``afmoe``: Arcee's Trinity) has per-head q/k RMSNorms, RoPE on its sliding layers only
(``layer_types``, else every ``global_attn_every_n_layers``-th layer full), the attention's output gated by
``sigmoid(gate_proj(x))`` before ``o_proj``, Gemma 2's four norms per block (``pre_mlp_layernorm`` /
``post_mlp_layernorm`` read as ``pre_/post_feedforward_layernorm``), muP's embedding scale ``sqrt(hidden_size)`` with
``mup_enabled``, and after ``num_dense_layers`` dense layers GLM-4.5's MoE block in one group (sigmoid scores, the
``expert_bias`` choosing, weights renormalized times ``route_scale``, shared experts).
``ExaoneMoeForCausalLM`` (``exaone_moe``: K-EXAONE) is EXAONE 4's attention (per-head q/k norms, sliding layers by
``sliding_window_pattern`` or ``layer_types``, no RoPE in the full layers when it has a window) in pre-norm blocks,
over GLM-4.5's MoE block after the dense layers ``mlp_layer_types`` (or ``first_k_dense_replace``) names; its
multi-token-prediction tensors (``mtp.*``) are left out at load.
``HYV3ForCausalLM`` (``hy_v3``: Tencent's Hy3) is Qwen3's attention (per-head q/k norms before RoPE, base 11,158,840
by default) over GLM-4.5's MoE block in one group (sigmoid scores, the correction bias choosing, weights
renormalized times ``router_scaling_factor``, ``num_shared_experts`` shared experts) after the dense layers
``mlp_layer_types`` names (layer 0 by default); its checkpoints name the router ``mlp.router.gate``, the bias
``mlp.expert_bias`` and the shared experts ``mlp.shared_mlp``, and its multi-token-prediction layers (past
``num_hidden_layers``) are left out at load.
``FlintForCausalLM`` (``flint``) is Qwen3-MoE's attention with gpt-oss's attention sinks (``self_attn.softmax_offset``
in its checkpoints) and fp32-scaled RMSNorms, RoPE on the sliding layers only (``layer_types``, or every fourth from
layer 1, the first two and the last full), dense ``mlp_only_layers``, then an fp32 sigmoid router (the top k by
logit, weighted by their sigmoid, renormalized with ``norm_topk_prob``) with an ungated shared expert.
``Kolibri1ForCausalLM`` (``kolibri1``) is EXAONE 4's attention (per-head q/k norms, every fifth layer full and without
RoPE) in GLM-4's blocks (``post_attn_norm`` / ``post_ffn_norm`` on the attention's and the MLP's outputs), every layer
routed like Flint's but choosing by logit plus a correction bias (``moe.router.expert_bias``), with an ungated shared
expert (``mlp.shared_experts``).
``MellumForCausalLM`` (``mellum``: JetBrains' Mellum MoE) is Qwen3-MoE (per-head q/k norms, the softmax router) with
sliding layers by ``layer_types`` (a 1,024-token window), a RoPE base per layer type (``rope_parameters``: 500,000 on
full layers, 10,000 on sliding ones by default) and dense layers where ``mlp_layer_types`` says ``dense``; its
multi-token-prediction tensors (``mtp.*``) are left out at load.
``HyperCLOVAXForCausalLM`` (``hyperclovax``: HyperCLOVA X SEED) is Granite's scalings with the logits multiplied (not
divided) by ``logits_scaling``, scores scaled by ``attention_multiplier`` (default ``head_dim ** -0.5``) and, with
``use_post_norm`` (the default), Peri-LN: RMSNorms on the attention's and the MLP's outputs before each is scaled and
added (read as Gemma 2's four norms: ``post_norm1`` / ``post_attention_layernorm`` / ``post_norm2`` are our
``post_attention_layernorm`` / ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``).
``Dots1ForCausalLM`` (``dots1``: rednote's dots.llm1) is Qwen3's attention (per-head q/k RMSNorms, RoPE on the whole
head, ``attention_bias`` on q/k/v/o, sliding layers as ``layer_types`` or ``max_window_layers`` say) over GLM-4.5's
MoE blocks (DeepSeek-V3's grouped sigmoid router with a correction bias, ``n_shared_experts`` shared experts, the
first ``first_k_dense_replace`` layers dense; Dots1Config's defaults: none dense, top-k weights not renormalized).
``PhimoeForCausalLM`` (``phimoe``: Phi-3.5-MoE) is Mixtral with biased LayerNorms, q/k/v/o biases, an LM head with
``lm_head_bias``, LongRoPE as Phi-3's but with its own cos/sin scales (``short_mscale`` / ``long_mscale``), and the
sparsemixer router (:func:`dualpath.model.moe.sparsemixer_top2`: exactly two experts, each weighted by a softmax
over the experts within ``2 * router_jitter_noise`` of it).
``MiniMaxM2ForCausalLM`` (``minimax_m2``: MiniMax-M2 / M2.1 / M2.5) has grouped-query attention with RMSNorms over
the whole q and k projections (``qk_norm_type: per_layer``), RoPE on ``rotary_dim`` of each head, and in every
layer GLM-4.5's router in one group (sigmoid scores, the correction bias choosing the top ``num_experts_per_tok``,
renormalized, no scaling) over ``num_local_experts`` experts ``intermediate_size`` wide, no shared expert; the hub's
``block_sparse_moe`` names (Mixtral's ``w1``/``w3``/``w2``, the bias on the block) or transformers' packed ones.
``OlmoeForCausalLM`` (``olmoe``) is a softmax-router MoE (Qwen2-MoE's router, ``num_experts`` of
``intermediate_size`` in every layer, renormalized only with ``norm_topk_prob``) with Llama's pre-norm blocks,
RMSNorms over the whole q and k projections and, with ``clip_qkv``, q/k/v clamped to ``+-clip_qkv``.
``Exaone4ForCausalLM`` (``exaone4``) has OLMo 2's output norms, per-head q/k RMSNorms, sliding layers by
``sliding_window_pattern`` (every 4th layer full, or a string like ``"LLLG"``) and, when it has a window, no RoPE
in its full layers. ``SeedOssForCausalLM`` (``seed_oss``) is Llama with q/k/v biases and ``o_proj``'s bias
switched apart (``attention_out_bias``).
Five more dense families: ``MinistralForCausalLM`` (``ministral``: Mistral's attention, sliding and full
layers as ``layer_types`` says, every layer sliding over 4,096 tokens by default), ``Olmo2ForCausalLM``
(``olmo2``: no norm on a block's input, ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on its outputs, RMSNorms over the whole q and k projections, norms scaled in
fp32), ``Olmo3ForCausalLM`` (``olmo3``: OLMo 2 with three sliding layers of four by default and their own plain
RoPE, ``rope_parameters.sliding_attention``, base 500,000 unless it names one), ``SmolLM3ForCausalLM``
(``smollm3``: no RoPE in the layers ``no_rope_layers`` marks 0, by default every fourth; with
``use_sliding_window`` those layers slide; tied embeddings by default) and ``GraniteForCausalLM`` (``granite``:
embeddings times ``embedding_multiplier``, scores times ``attention_multiplier``, each block's output times
``residual_multiplier``, logits divided by ``logits_scaling``). ``GraniteSWAForCausalLM`` (``granite_swa``: IBM's
granite-swash) is Granite with sliding layers by ``layer_types`` (every fourth layer full by default, 128-token
windows), gpt-oss's attention sinks, and a RoPE base per layer (``layer_rope_theta``; 0: no RoPE), read as one base
for the full layers and one for the sliding ones (``rope_local_theta``); ``GraniteMoeSWAForCausalLM``
(``granitemoe_swa``) is the same attention over GraniteMoE-Shared's experts.
Fifteen LayerNorm families run on the same path (:mod:`dualpath.model.layernorm_family`: their config keys, defaults
and tensor names): ``GPT2LMHeadModel`` (``gpt2``: learned positions, no RoPE, fused ``Conv1D`` q/k/v,
``scale_attn_by_inverse_layer_idx``), ``GPTBigCodeForCausalLM`` (``gpt_bigcode``: StarCoder 1, SantaCoder; GPT-2's
block with one key/value head under ``multi_query``), ``GPTJForCausalLM`` (``gptj``: interleaved RoPE on
``rotary_dim``, read as ours by permuting q/k rows at load; one norm feeding a parallel attention and MLP),
``CohereForCausalLM`` / ``Cohere2ForCausalLM`` (``cohere``, ``cohere2``: bias-free fp32 LayerNorm, one norm feeding a
parallel attention and SwiGLU MLP, interleaved RoPE read by the q/k row permutation, optional per-head q/k norms,
logits times ``logit_scale``; Cohere 2 slides three layers of four and rotates only there), ``FalconForCausalLM`` (``falcon``: RoPE checkpoints, its three fused q/k/v layouts, parallel blocks behind one
norm or two; ALiBi refused), ``NemotronForCausalLM`` (``nemotron``: LayerNorm scaling by ``1 + weight``, a ReLU-squared MLP, RoPE on half of
each head), ``GPTNeoForCausalLM`` (``gpt_neo``: GPT-2's block with unscaled scores and local layers over ``window_size`` keys),
``MptForCausalLM`` (``mpt``: ALiBi with MPT's slopes, bias-free LayerNorms and projections, fused ``[q, k, v]``,
``clip_qkv``), ``BloomForCausalLM`` (``bloom``: ALiBi score biases instead of positions, a LayerNorm on the word embeddings, the
per-head fused q/k/v), ``OPTForCausalLM`` (``opt``: learned positions at an offset of 2, queries scaled first, ``word_embed_proj_dim``
projections, OPT-350m's post-LayerNorm blocks), ``GPTNeoXForCausalLM`` (``gpt_neox``, Pythia: fused per-head q/k/v, partial
RoPE, a two-norm parallel residual), ``PhiForCausalLM`` (``phi``: one norm feeding a parallel attention and MLP,
partial RoPE, optional q/k LayerNorms, a biased LM head), ``StableLmForCausalLM`` (``stablelm``: SwiGLU, partial
RoPE, optional per-head q/k LayerNorms and parallel block) and ``Starcoder2ForCausalLM`` (``starcoder2``: biased
GELU MLP, optional window over every layer). Ten Llamas with one twist each are read by
:mod:`dualpath.model.llama_variants`: ``OlmoForCausalLM`` (``olmo``: weightless LayerNorms, ``clip_qkv``),
``HeliumForCausalLM`` (``helium``) and ``Ernie4_5ForCausalLM`` (``ernie4_5``): interleaved RoPE over the whole head,
biased gated MLPs; ``HunYuanDenseV1ForCausalLM`` (``hunyuan_v1_dense``: q/k norms after RoPE, a fixed NTK-alpha
RoPE base, ``ntk_alpha``); ``Ministral3ForCausalLM`` (``ministral3``: queries scaled by position,
``query_scale_beta``); ``CwmForCausalLM`` (``cwm``: sliding layers by ``layer_types``); ``Jais2ForCausalLM`` (``jais2``: biased LayerNorms,
a biased ReLU-squared MLP); ``ApertusForCausalLM`` (``apertus``: q/k norms, the xIELU activation);
``VaultGemmaForCausalLM`` (``vaultgemma``: Gemma 2 without its post-attention and post-MLP
norms); ``NanoChatForCausalLM`` (``nanochat``: weightless RMSNorms, reversed RoPE, ReLU-squared MLP,
soft-capped logits). Llama's own ``mlp_bias`` is read too (``mlp_has_bias``).

A sliding attention window is applied exactly as transformers applies it, per layer: a query at position ``p``
attends to the keys at ``p - window + 1 .. p`` (``sliding_window``; the KV of every position is still kept, so a
prefix stays reusable). Which layers slide follows each family: every layer for Mistral (``MistralForCausalLM``;
a ``LlamaForCausalLM`` ignores a ``sliding_window`` key, as transformers does), Mixtral, Phi-3 and Qwen3-MoE;
``layer_types`` (or, without it, transformers' default: Qwen2/Qwen3 from ``max_window_layers`` up, Qwen2-MoE odd
layers below it, Gemma 2 every other layer) for Qwen2, Qwen3, Qwen2-MoE and Gemma 2, only with
``use_sliding_window`` for the Qwen families. The layers that do not slide are ``full_attention_layers``.
Anything else raises :class:`~dualpath.errors.ModelError` naming the key at fault.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dualpath.errors import ModelError
from dualpath.kv.layout import KVSpec
from dualpath.model import layernorm_family as lnf
from dualpath.model import llama_variants as lv
from dualpath.model.archs import (
    _GEMMA2_FIELDS,
    _GPT_OSS_FIELDS,
    _GRANITE_FIELDS,
    _GROUP_ROUTER_FIELDS,
    _HF_ARCH,
    _MOE_FIELDS,
    _OLMO_ARCHS,
    ALL_MOE_ARCHS,
    ARCHITECTURES,
    GEMMA2_LIKE,
    GRANITE_SCALED,
    GRANITE_SWA,
    GROUP_ROUTER_ARCHS,
    MLP_BIAS_ARCHS,
    ROPE_TYPES,
    refusal_reason,
)
from dualpath.model.family_fields import (
    _KV_HEADS,
    _MAX_POSITION,
    _MODEL_TYPES,
    _ROPE_THETA,
    _check_gemma,
    _check_gemma2,
    _gemma2_fields,
    _gemma3_rope,
    _gpt_oss_defaults,
    _gpt_oss_fields,
    _granite_fields,
    _granite_swa_rope,
    _layer_windows,
    _minimax_rotary,
    _moe_fields,
    _nope_layers,
    _olmo3_rope,
    _partial_rotary,
    _phi3_rope,
)
from dualpath.model.hf_config import (
    canonical_keys,
    codegen_config,
    llama_alias_config,
    sarvam_config,
    text_model_config,
)
from dualpath.model.mla_spec import _DEEPSEEK_ARCH, DeepseekV3Spec, mla_text_config
from dualpath.model.rope import rope_frequencies as rope_frequencies
from dualpath.model.rope import rope_inv_freq as rope_inv_freq
from dualpath.model.rope import rope_long_for
from dualpath.model.spec_common import _DTYPES, _SpecCommon, parse_rope, read_hf_config


@dataclass(frozen=True)
class ModelSpec(_SpecCommon):
    """Shapes and hyper-parameters of one decoder. ``dtype`` is the compute and KV dtype name."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    sliding_window: int | None = None  # the checkpoint's attention window (None: no layer slides) ...
    full_attention_layers: tuple[int, ...] = ()  # ... except in these layers (Gemma 2, Qwen layer_types)
    partial_rotary_factor: float = 1.0  # phi3: RoPE rotates the first int(head_dim * factor) dims of each head
    rope_local_theta: float | None = None  # gemma3: the sliding layers' RoPE base (default RoPE; None: one RoPE)
    # gemma2: scores scaled by query_pre_attn_scalar ** -0.5 (else head_dim ** -0.5), soft caps (None: off)
    query_pre_attn_scalar: float | None = None
    # ministral3: each query times 1 + beta * log(1 + floor(position / original_max_position_embeddings)) (Llama 4's
    # attention scaling; llama_4_scaling_beta); None: none
    query_scale_beta: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # mixture of experts (mixtral, qwen2_moe, qwen3_moe); n_experts 0 for the dense architectures
    n_experts: int = 0
    n_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    norm_topk_prob: bool = False              # renormalize the top-k weights to sum 1 (always for Mixtral)
    decoder_sparse_step: int = 1              # layer l is sparse when (l + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()     # ... and it is not listed here
    # gpt-oss's experts: gate clamped above at swiglu_limit, up clamped to +-limit, glu = gate * sigmoid(alpha * gate)
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    # phimoe: its sparsemixer router's mask threshold (router_jitter_noise) and its LM head's bias; None elsewhere
    router_jitter_eps: float | None = None
    head_bias: bool | None = None
    # glm4_moe: DeepSeek-V3's router over n_group groups, the best topk_group of them, weights times the factor
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float | None = None
    use_qk_norm: bool | None = None  # glm4_moe: per-head q/k RMSNorms (before RoPE) when true; llama4_text: see below
    # llama4_text: its RoPE layers' chunk (attention_chunk_size: each query sees its own chunk's keys) and its
    # NoPE layers' query temperature (floor_scale, attn_scale); None for every other architecture
    attention_chunk: int | None = None
    nope_temperature: tuple[float, float] | None = None
    clip_qkv: float | None = None  # olmoe: q, k and v clamped to +-clip_qkv after the q/k norms (None: off)
    o_proj_bias: bool | None = None  # seed_oss: o_proj's bias (attention_out_bias), apart from q/k/v's
    # biases on the MLP's projections (Llama's, Helium's and Jais 2's mlp_bias, ERNIE 4.5's use_bias); None: none
    mlp_has_bias: bool | None = None
    nope_layers: tuple[int, ...] = ()  # smollm3: layers whose queries and keys get no RoPE
    # granite: see _GRANITE_FIELDS (None: off)
    embedding_multiplier: float | None = None
    attention_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    # the LayerNorm families (gpt2, gpt_neox, phi, stablelm, starcoder2; None for every other): the MLP's
    # activation (dualpath.model.layernorm_family.ACTIVATIONS values), a parallel residual, LayerNorms on each
    # head's query and key, GPT-2's scores scaled by 1 / (layer + 1)
    activation: str | None = None
    parallel_residual: bool | None = None
    qk_layernorm: bool | None = None
    scale_attn_by_layer: bool | None = None
    # OPT (None for every other): post-LayerNorm blocks (do_layer_norm_before false), and the embeddings' width
    # where it differs from hidden_size (word_embed_proj_dim: projected in and out)
    post_layer_norm: bool | None = None
    # OPT (None for every other): LayerNorms with neither weight nor bias (layer_norm_elementwise_affine false), and
    # pre-norm blocks without a final norm (_remove_final_layer_norm)
    plain_norms: bool | None = None
    no_final_norm: bool | None = None
    # Bloom (None for every other): apply_residual_connection_post_layernorm, each sublayer's residual the output of
    # the norm before it rather than its input
    norm_residual: bool | None = None
    # CTRL (None for every other, and where it is its blocks' 1e-6): the final LayerNorm's epsilon, the one norm that
    # reads layer_norm_epsilon
    final_norm_eps: float | None = None
    peri_norms: bool | None = None  # hyperclovax (None for every other): use_post_norm, Peri-LN (see sandwich_norms)
    embed_proj_dim: int | None = None
    logit_scale: float | None = None  # cohere, cohere2: logits multiplied by it (None: every other)
    # falcon: its fused q/k/v and norms (new2 / new1: the new decoder with two norms or one; old: falcon-7b's)
    falcon_layout: str | None = None
    # falcon (None for every other, and for Falcon with RoPE): ALiBi instead of RoPE (falcon-rw), its slopes divided
    # by sqrt(head_dim) as transformers adds them to the scaled scores
    falcon_alibi: bool | None = None
    # phi3 LongRoPE (rope_scaling type longrope): which factor set turns every position, chosen once per deployment
    # (see rope_long_for); None for every other RoPE
    rope_long: bool | None = None
    # ernie4_5_moe (None for every other): the floor of the top-k weights' sum it divides by (moe_norm_min); its
    # router also picks by softmax scores plus a correction bias (moe_statics), weighting by the scores alone
    moe_norm_min: float | None = None
    # apertus (Apertus 1.5; None for every other and for an unpruned head): the LM head's rows, a prefix of the
    # vocabulary (the multimodal token rows pruned); the ids past it are inputs only, never generated
    output_vocab_size: int | None = None
    # cohere2_moe (Command A+; None for every other): its router's weights (softmax or sigmoid of the top-k logits),
    # whether the shared experts' output is averaged with the routed one (else summed), and RMSNorms instead of
    # Cohere's LayerNorms
    expert_selection: str | None = None
    shared_expert_average: bool | None = None
    rms_norms: bool | None = None
    # the longest context this deployment serves (LlamaModelConfig.max_context; None: max_position); not part of
    # the architecture, so not in to_dict
    context_cap: int | None = field(default=None, compare=False)
    weights_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in _HF_ARCH:
            raise ModelError(f"unsupported architecture {self.architecture!r}; expected one of {sorted(_HF_ARCH)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ModelError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(
                f"model config: num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.dtype not in _DTYPES:
            raise ModelError(f"model dtype {self.dtype!r} unsupported; expected one of {sorted(_DTYPES)}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ModelError(f"model config: rope_scaling type {rope_type!r} unsupported; expected {ROPE_TYPES}")
        if rope_type not in ("default", "longrope", "ntk_alpha") and "factor" not in (self.rope_scaling or {}):
            raise ModelError(f"model config: rope_scaling of type {rope_type!r} needs a 'factor'")
        if rope_type == "ntk_alpha" and self.architecture not in ("hunyuan_v1_dense", "hunyuan_v1_moe"):
            raise ModelError(f"model config: an ntk_alpha RoPE is hunyuan_v1_dense's, got it for {self.architecture}")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in (self.rope_scaling or {}):
                    raise ModelError(f"model config: llama3 rope_scaling is missing {key!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(int(x) for x in self.mlp_only_layers))
        self._check_layernorm_family()
        cohere_moe = (self.expert_selection, self.shared_expert_average, self.rms_norms)
        if (self.architecture == "cohere2_moe") != (None not in cohere_moe) or (
                self.expert_selection not in (None, "softmax", "sigmoid")
                or any(v is not None and not isinstance(v, bool) for v in cohere_moe[1:])):
            raise ModelError(f"model config: expert_selection / shared_expert_average / rms_norms are cohere2_moe's "
                             f"and required there, got {cohere_moe!r} for {self.architecture}")
        if self.output_vocab_size is not None and (
                self.architecture not in ("apertus", "molmo2_text") or isinstance(self.output_vocab_size, bool)
                or not isinstance(self.output_vocab_size, int) or not 0 < self.output_vocab_size < self.vocab_size
                or self.tie_embeddings):
            raise ModelError(f"model config: output_vocab_size (a pruned LM head) is Apertus 1.5's and Molmo2's, below vocab_size "
                             f"({self.vocab_size}) and with untied embeddings; got {self.output_vocab_size!r} for "
                             f"{self.architecture} (tie_word_embeddings {self.tie_embeddings})")
        if self.partial_rotary_factor != 1.0:
            if self.architecture not in ("phi3", "glm4_moe", "minimax_m2", "gpt_neox", "phi", "stablelm", "gptj", "glm",
                                         "persimmon", "gpt_neox_japanese",
                                         "glm4", "nemotron", "minimax_m3_vl_text"):
                raise ModelError(f"model config: partial_rotary_factor is only supported for phi3, glm4_moe, "
                                 f"gpt_neox, gptj, phi and stablelm, got "
                                 f"{self.partial_rotary_factor} for {self.architecture}")
            rot = self.rotary_dim
            # (an odd count: transformers takes ceil(rot / 2) frequencies over rot and turns twice that many dims;
            # so does RoPE here, by the width of its tables. The families read by permuting q/k rows need it even)
            if not 0 < self.partial_rotary_factor <= 1 or rot <= 0 or (
                    rot % 2 and self.architecture in ("gptj", "glm", "glm4")):
                raise ModelError(f"model config: partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] "
                                 f"and rotate an even number of dims (head_dim {self.head_dim} gives {rot})")
        if self.architecture == "phi3" and (self.rope_type not in ("default", "longrope") or self.attention_bias):
            raise ModelError("model config: phi3 has no projection biases and supports 'default' and 'longrope' "
                             f"RoPE (got rope_scaling type {self.rope_type!r}, attention_bias {self.attention_bias})")
        self._check_longrope()
        cap = self.context_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ModelError(f"model config: max_context must be a positive integer or null, got {cap!r}")
        if self.architecture == "gemma" and self.sliding_window is not None:
            raise ModelError("model config: gemma has no sliding attention window (sliding_window must be null)")
        self._check_window()
        for name in _GEMMA2_FIELDS:
            value = getattr(self, name)
            if value is not None and self.architecture not in GEMMA2_LIKE and not (
                    name == "final_logit_softcapping" and self.architecture in ("nanochat", "gemma4_text", "gemma3n_text")):
                raise ModelError(f"model config: {name} is only supported for gemma2 and gemma3 (and nanochat's "
                                 f"final_logit_softcapping), got {value} for {self.architecture}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ModelError(f"model config: {name} must be a positive number or null, got {value!r}")
        if self.architecture in GEMMA2_LIKE and self.query_pre_attn_scalar is None:
            raise ModelError(f"model config: {self.architecture} needs query_pre_attn_scalar")
        if self.rope_local_theta is not None and (self.architecture not in ("gemma3", "olmo3", "mellum", *GRANITE_SWA,
                                                                            "molmo2_text")
                                                  or not self.rope_local_theta > 0):
            raise ModelError(f"model config: rope_local_theta is a positive base of gemma3's / olmo3's sliding layers "
                             f"(molmo2's unscaled ones), "
                             f"got {self.rope_local_theta} for {self.architecture}")
        for name in _GRANITE_FIELDS:
            value = getattr(self, name)
            if value is not None and self.architecture not in GRANITE_SCALED and not (
                    name == "embedding_multiplier" and self.architecture in ("afmoe", *lnf.SCALED_EMBEDDINGS)) and not (
                    name == "attention_multiplier" and value == 1.0 and self.architecture in ("gpt2", "gpt_bigcode")):
                # (Trinity's muP scale; BioGPT's and XGLM's sqrt(hidden_size), before the positions; GPT-2's and
                # GPTBigCode's scale_attn_weights false: unscaled scores)
                raise ModelError(f"model config: {name} is granite's, got {value} for {self.architecture}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ModelError(f"model config: {name} must be a positive number, got {value!r}")
        nope = tuple(sorted({int(x) for x in self.nope_layers}))
        if nope and (self.architecture not in ("smollm3", "exaone4", "exaone_moe", "cohere2", "cohere2_moe",
                                               "cohere_compass_text",
                                               "llama4_text", "afmoe",
                                               "flint", "kolibri1", *GRANITE_SWA)
                     or any(not 0 <= x < self.n_layers for x in nope)):
            raise ModelError(f"model config: nope_layers {list(nope)} must be smollm3 / exaone4 / cohere2 layers of "
                             f"0..{self.n_layers - 1}")
        object.__setattr__(self, "nope_layers", nope)
        if self.nope_temperature is not None:
            temp = tuple(float(x) for x in self.nope_temperature)
            if self.architecture != "llama4_text" or len(temp) != 2 or not temp[0] > 0:
                raise ModelError(f"model config: nope_temperature (floor_scale, attn_scale) is llama4_text's, got "
                                 f"{self.nope_temperature!r} for {self.architecture}")
            object.__setattr__(self, "nope_temperature", temp)
        if self.attention_chunk is not None and (self.architecture != "llama4_text" or self.attention_chunk < 1):
            raise ModelError(f"model config: attention_chunk (attention_chunk_size) is llama4_text's, a positive "
                             f"integer; got {self.attention_chunk!r} for {self.architecture}")
        for name in _GPT_OSS_FIELDS:
            value = getattr(self, name)
            if (value is None) != (self.architecture != "gpt_oss"):
                raise ModelError(f"model config: {name} is gpt_oss's and required there, got {value!r} for "
                                 f"{self.architecture}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ModelError(f"model config: {name} must be a positive number, got {value!r}")
        if self.clip_qkv is not None and (self.architecture not in ("olmoe", "mpt", "olmo", "dbrx")
                                          or isinstance(self.clip_qkv, bool)
                                          or not isinstance(self.clip_qkv, (int, float)) or not self.clip_qkv > 0):
            raise ModelError(f"model config: clip_qkv is olmo's, olmoe's, mpt's and dbrx's, a positive number or null; got "
                             f"{self.clip_qkv!r} for {self.architecture}")
        beta = self.query_scale_beta
        if beta is not None and (self.architecture != "ministral3" or isinstance(beta, bool)
                                 or not isinstance(beta, (int, float)) or not beta >= 0
                                 or "original_max_position_embeddings" not in (self.rope_scaling or {})):
            raise ModelError(f"model config: query_scale_beta (llama_4_scaling_beta) is ministral3's, a number >= 0 "
                             f"with a RoPE that names original_max_position_embeddings; got {beta!r} for "
                             f"{self.architecture}")
        nemotron_own = self.architecture == "nemotron" and self.mlp_has_bias is (not self.attention_bias)
        if self.mlp_has_bias is not None and not nemotron_own and (
                self.mlp_has_bias is not True or self.architecture not in (*MLP_BIAS_ARCHS, "helium", "ernie4_5",
                                                                          "jais2", "ernie4_5_moe", "cwm", "dory",
                                                                          "deepseek_v4")):
            raise ModelError(f"model config: mlp_has_bias (mlp_bias, use_bias) is true or null, and only for "
                             f"{', '.join(MLP_BIAS_ARCHS)}, helium, ernie4_5, jais2, cwm, dory and deepseek_v4 (Nemotron: the opposite "
                             f"of attention_bias, where its MLP's differs); got {self.mlp_has_bias!r} "
                             f"for {self.architecture}")
        if (self.o_proj_bias is None) != (self.architecture != "seed_oss"):
            raise ModelError(f"model config: o_proj_bias (attention_out_bias) is seed_oss's and required there, got "
                             f"{self.o_proj_bias!r} for {self.architecture}")
        for name in (*_GROUP_ROUTER_FIELDS, "use_qk_norm"):
            if name == "use_qk_norm" and self.architecture == "llama4_text":
                continue  # (Llama 4's: a weightless norm of q/k after RoPE on its RoPE layers)
            if (getattr(self, name) is None) != (self.architecture not in GROUP_ROUTER_ARCHS):
                raise ModelError(f"model config: {name} is glm4_moe's, dots1's and minimax_m2's and required there, got "
                                 f"{getattr(self, name)!r} for {self.architecture}")
        if self.architecture in ALL_MOE_ARCHS:
            self._check_moe()
        elif self.n_experts:
            raise ModelError(f"model config: architecture {self.architecture!r} has no experts (n_experts must be 0)")

    def _check_layernorm_family(self) -> None:
        """The LayerNorm families' fields: all set for them, none for any other architecture."""
        names = ("activation", "parallel_residual", "qk_layernorm", "scale_attn_by_layer")
        ln = self.architecture in lnf.LN_ARCHS
        for name in names:
            value = getattr(self, name)
            needed = ln or (name == "activation" and self.architecture in ("arcee", "nanochat", "jais2", "apertus",
                                                                          "bitnet"))
            # (a gated MLP's or experts' activation other than SiLU, or Gemma's other than tanh GELU: the
            # Llama-shaped families; gpt-oss's experts run their own clamped GLU)
            optional = (name == "activation" and not needed and self.gated_mlp and self.architecture != "gpt_oss")
            if (value is None and needed) or (value is not None and not needed and not optional):
                raise ModelError(f"model config: {name} is the LayerNorm families' ({', '.join(lnf.LN_ARCHS)}) and "
                                 f"required there, got {value!r} for {self.architecture}")
            if ln and name != "activation" and not isinstance(value, bool):
                raise ModelError(f"model config: {name} must be true or false, got {value!r}")
        if self.activation is not None and self.activation not in set(lnf.ACTIVATIONS.values()) and not (
                self.activation == "xielu" and self.architecture == "apertus"):
            raise ModelError(f"model config: activation {self.activation!r} unsupported; expected one of "
                             f"{sorted(set(lnf.ACTIVATIONS.values()))}")
        if not ln:
            return
        if self.activation not in set(lnf.ACTIVATIONS.values()):
            raise ModelError(f"model config: activation {self.activation!r} unsupported; expected one of "
                             f"{sorted(set(lnf.ACTIVATIONS.values()))}")
        fixed = {"mpt": (False, False), "gpt_neo": (False, False), "bloom": (False, False), "gpt2": (False, False), "phi": (True, None), "starcoder2": (False, False), "gpt_neox": (None, False),
                 "gptj": (True, False), "gpt_bigcode": (False, False), "opt": (False, False), "openai-gpt": (False, False), "persimmon": (False, None), "ctrl": (False, False),
                 "gpt_neox_japanese": (False, False),
                 "biogpt": (False, False), "xglm": (False, False), "cohere": (True, None),
                 "nemotron": (False, False),
                 "cohere2": (True, False), "cohere2_moe": (True, False), "cohere_compass_text": (True, False)}
        if (self.falcon_layout is None) == (self.architecture == "falcon") or self.falcon_layout not in (
                None, "new1", "new2", "old"):
            raise ModelError(f"model config: falcon_layout is falcon's (new1, new2 or old) and required there, got "
                             f"{self.falcon_layout!r} for {self.architecture}")
        if self.falcon_alibi not in (None, True) or (self.falcon_alibi and self.architecture != "falcon"):
            raise ModelError(f"model config: falcon_alibi is falcon's (true or null), got {self.falcon_alibi!r} for "
                             f"{self.architecture}")
        if self.falcon_layout in ("new1", "new2") and not self.parallel_residual:
            raise ModelError("model config: falcon's new decoder runs attention and MLP in parallel")
        if self.falcon_layout == "old" and self.n_kv_heads not in (1, self.n_heads):
            raise ModelError("model config: falcon-7b's layout attends with one key/value head or one per head")
        if (self.logit_scale is None) == (self.architecture in lnf.COHERE):
            raise ModelError(f"model config: logit_scale is cohere's and required there, got {self.logit_scale!r} for "
                             f"{self.architecture}")
        for name in ("plain_norms", "no_final_norm"):
            if getattr(self, name) not in (None, True) or (getattr(self, name) and self.architecture != "opt"):
                raise ModelError(f"model config: {name} is opt's (true or null), got {getattr(self, name)!r} for "
                                 f"{self.architecture}")
        if self.norm_residual not in (None, True) or (self.norm_residual and self.architecture != "bloom"):
            raise ModelError(f"model config: norm_residual is bloom's (true or null), got {self.norm_residual!r} for "
                             f"{self.architecture}")
        eps = self.final_norm_eps
        if eps is not None and (self.architecture != "ctrl" or isinstance(eps, bool)
                                or not isinstance(eps, (int, float)) or not eps > 0):
            raise ModelError(f"model config: final_norm_eps is ctrl's (a positive number or null), got {eps!r} for "
                             f"{self.architecture}")
        if self.no_final_norm and self.post_layer_norm:
            raise ModelError("model config: no_final_norm is for OPT's pre-norm blocks (post-norm ones have none)")
        if (self.post_layer_norm is None) == (self.architecture in ("opt", "openai-gpt")):
            raise ModelError(f"model config: post_layer_norm is opt's and required there, got "
                             f"{self.post_layer_norm!r} for {self.architecture}")
        e = self.embed_proj_dim
        if e is not None and (self.architecture != "opt" or isinstance(e, bool) or not isinstance(e, int) or e <= 0
                              or e == self.hidden_size):
            raise ModelError(f"model config: embed_proj_dim is opt's word_embed_proj_dim, a positive integer other "
                             f"than hidden_size, got {e!r} for {self.architecture}")
        par, qk = fixed.get(self.architecture, (None, None))
        if (par is not None and self.parallel_residual != par) or (qk is not None and self.qk_layernorm != qk):
            raise ModelError(f"model config: {self.architecture} has parallel_residual {par} and qk_layernorm {qk} "
                             f"(got {self.parallel_residual}, {self.qk_layernorm})")
        if self.scale_attn_by_layer and self.architecture != "gpt2":
            raise ModelError("model config: scale_attn_by_layer is GPT-2's (scale_attn_by_inverse_layer_idx)")
        if (self.learned_positions or self.alibi) and (self.partial_rotary_factor != 1.0
                                                       or self.rope_scaling is not None):
            raise ModelError(f"model config: {self.architecture} has learned positions, no RoPE (no "
                             "partial_rotary_factor or rope_scaling)")
        if self.architecture in ("gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "mpt", "openai-gpt", "biogpt",
                                 "xglm", "gpt_neox_japanese", "ctrl") and \
                self.n_kv_heads != self.n_heads:
            raise ModelError(f"model config: {self.architecture} attends with every head's own key and value "
                             "(n_kv_heads = n_heads)")
        if self.architecture == "gpt_bigcode" and self.n_kv_heads not in (1, self.n_heads):
            raise ModelError("model config: gpt_bigcode attends with one key/value head (multi_query) or one per head")
        if self.sliding_window is not None and self.architecture not in ("starcoder2", "cohere2", "cohere2_moe",
                                                                         "cohere_compass_text", "gpt_neo"):
            raise ModelError(f"model config: {self.architecture} has no sliding window")

    def _check_longrope(self) -> None:
        """A ``longrope`` RoPE (phi3 only): both factor lists, one number per rotated pair, and the chosen set."""
        if self.rope_type != "longrope":
            if self.rope_long is not None:
                raise ModelError(f"model config: rope_long is for a longrope RoPE, got {self.rope_long!r} with "
                                 f"rope_scaling type {self.rope_type!r}")
            return
        rs = self.rope_scaling or {}
        if self.architecture not in ("phi3", "phimoe"):
            raise ModelError(f"model config: rope_scaling type 'longrope' is phi3's and phimoe's, got it for "
                             f"{self.architecture}")
        pairs = (self.rotary_dim + 1) // 2  # (one frequency per rotated pair; an odd count rounds up)
        for key in ("short_factor", "long_factor"):
            f = rs.get(key)
            if (not isinstance(f, list) or len(f) != pairs
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f)):
                n = len(f) if isinstance(f, list) else type(f).__name__
                raise ModelError(f"model config: rope_scaling.{key} must be a list of {pairs} positive "
                                 f"numbers (one per rotated pair of the {self.rotary_dim} rotary dims), got {n}")
        orig = rs.get("original_max_position_embeddings")
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise ModelError(f"model config: original_max_position_embeddings must be a positive integer, got {orig!r}")
        for key in ("factor", "attention_factor", "short_mscale", "long_mscale"):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ModelError(f"model config: rope_scaling.{key} must be a positive number or null, got {v!r}")
        if not isinstance(self.rope_long, bool):
            raise ModelError(f"model config: a longrope spec needs rope_long true or false, got {self.rope_long!r}")

    @property
    def context_limit(self) -> int:
        """The longest sequence this spec serves, in tokens: ``max_position``, capped by ``context_cap`` and, for
        a LongRoPE model on its short factors, by ``original_max_position_embeddings`` (past it transformers would
        switch every position to the long factors, which KV already computed cannot follow)."""
        limit = self.max_position if self.context_cap is None else min(self.max_position, self.context_cap)
        if self.rope_long is False:
            limit = min(limit, int((self.rope_scaling or {})["original_max_position_embeddings"]))
        return limit

    def _check_window(self) -> None:
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise ModelError(f"model config: sliding_window must be a positive integer or null, got {w!r}")
        full = tuple(sorted({int(x) for x in self.full_attention_layers}))
        if any(not 0 <= x < self.n_layers for x in full):
            raise ModelError(f"model config: full_attention_layers {list(full)} must be layers of 0..{self.n_layers - 1}")
        if full and w is None:
            raise ModelError("model config: full_attention_layers without a sliding_window")
        if full and self.architecture in ("llama", "mixtral", "phi3", "qwen3_moe", "olmo2", *GRANITE_SCALED, "olmoe",
                                          "ministral3") and self.architecture not in GRANITE_SWA:
            raise ModelError(f"model config: {self.architecture} slides every layer or none (full_attention_layers "
                             f"{list(full)})")
        if len(full) == self.n_layers:  # no layer slides
            object.__setattr__(self, "sliding_window", None)
            full = ()
        if w is not None and self.architecture == "llama" and self.attention_bias:
            raise ModelError("model config: a sliding window is Mistral's, which has no attention_bias")
        object.__setattr__(self, "full_attention_layers", full)

    def local_rope_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` turns the local RoPE (``rope_local_theta``, plain) instead of the model's: the
        sliding layers of Gemma 3 and OLMo 3 (Molmo2: the layers outside ``rope_scaling_layers``)."""
        return self.layer_window(layer) is not None

    def layer_window(self, layer: int) -> int | None:
        """The sliding attention window of layer ``layer`` (None: it attends to every earlier position)."""
        if self.sliding_window is None or layer in self.full_attention_layers:
            return None
        return self.sliding_window

    def _check_moe(self) -> None:
        if self.n_experts <= 0:
            raise ModelError(f"model config: {self.architecture} needs a positive number of experts "
                             f"(num_local_experts / num_experts), got {self.n_experts}")
        if not 0 < self.n_experts_per_tok <= self.n_experts:
            raise ModelError(f"model config: num_experts_per_tok ({self.n_experts_per_tok}) must be in "
                             f"[1, {self.n_experts}]")
        if self.moe_intermediate_size <= 0:
            raise ModelError(f"model config: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step <= 0:
            raise ModelError(f"model config: decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        if self.shared_expert_intermediate_size < 0:
            raise ModelError("model config: shared_expert_intermediate_size must not be negative")
        if self.architecture == "qwen2_moe" and self.shared_expert_intermediate_size == 0:
            raise ModelError("model config: shared_expert_intermediate_size must be positive for qwen2_moe "
                             "(every Qwen2-MoE layer has a shared expert; a MoE without one is qwen3_moe)")
        if self.architecture not in ("qwen2_moe", "glm4_moe", "dots1", "solar_open", "afmoe", "exaone_moe", "hy_v3",
                                     "granitemoeshared", "flint", "kolibri1", "granitemoe_swa", "cohere2_moe",
                                     "aria_text",
                                     "llama4_text",
                                     "ernie4_5_moe", "hunyuan_v1_moe") and \
                self.shared_expert_intermediate_size:
            raise ModelError(f"model config: {self.architecture} has no shared expert "
                             f"(shared_expert_intermediate_size {self.shared_expert_intermediate_size})")
        if self.architecture == "minimax_m2" and (self.mlp_only_layers or self.shared_expert_intermediate_size
                                                  or self.n_group != 1 or self.use_qk_norm):
            raise ModelError("model config: minimax_m2 routes every layer over one group of experts, with no shared "
                             "expert (its q/k norms span whole projections: use_qk_norm false here)")
        if self.architecture in GROUP_ROUTER_ARCHS:
            assert self.n_group is not None and self.topk_group is not None
            if self.mlp_only_layers != tuple(range(len(self.mlp_only_layers))) and self.architecture not in (
                    "exaone_moe", "hy_v3"):  # (theirs: any layers, named by mlp_layer_types)
                raise ModelError(f"model config: {self.architecture}'s dense layers are its first first_k_dense_replace ones, "
                                 f"got {list(self.mlp_only_layers)}")
            if self.n_group <= 0 or self.n_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise ModelError(f"model config: n_group ({self.n_group}) must divide the {self.n_experts} experts and "
                                 f"topk_group ({self.topk_group}) be in [1, n_group]")
            if self.n_experts_per_tok > self.topk_group * (self.n_experts // self.n_group):
                raise ModelError(f"model config: num_experts_per_tok ({self.n_experts_per_tok}) exceeds the experts of "
                                 f"topk_group ({self.topk_group}) groups")
            if self.n_experts // self.n_group < 2:
                raise ModelError("model config: each expert group needs at least 2 experts (groups are ranked by "
                                 "their two best scores)")
            if self.shared_expert_intermediate_size % self.moe_intermediate_size:
                raise ModelError(f"model config: {self.architecture}'s shared experts are n_shared_experts x "
                                 "moe_intermediate_size wide")
        if (self.moe_norm_min is None) != (self.architecture != "ernie4_5_moe") or (
                self.moe_norm_min is not None and not self.moe_norm_min > 0):
            raise ModelError(f"model config: moe_norm_min is ernie4_5_moe's and a positive number there, got "
                             f"{self.moe_norm_min!r} for {self.architecture}")
        if (self.peri_norms is None) != (self.architecture != "hyperclovax"):
            raise ModelError(f"model config: peri_norms (use_post_norm) is hyperclovax's and required there, got "
                             f"{self.peri_norms!r} for {self.architecture}")
        phimoe = self.architecture == "phimoe"  # (ERNIE 4.5 MoE's LM head may have a bias too: use_bias)
        if ((self.router_jitter_eps is None) == phimoe or (phimoe and self.head_bias is None)
                or (self.head_bias is not None and self.architecture not in ("phimoe", "ernie4_5_moe"))):
            raise ModelError(f"model config: router_jitter_eps / head_bias (router_jitter_noise, lm_head_bias) are "
                             f"phimoe's and required there, got {self.router_jitter_eps!r} / {self.head_bias!r} for "
                             f"{self.architecture}")
        if self.architecture == "phimoe" and (self.n_experts_per_tok != 2 or self.n_experts < 2
                                              or not 0 <= float(self.router_jitter_eps or 0) < 1
                                              or self.decoder_sparse_step != 1 or self.mlp_only_layers):
            raise ModelError(f"model config: phimoe's sparsemixer routes every layer to exactly 2 of at least 2 "
                             f"experts with router_jitter_noise in [0, 1); got num_experts_per_tok "
                             f"{self.n_experts_per_tok}, {self.n_experts} experts, router_jitter_noise "
                             f"{self.router_jitter_eps}")
        if self.architecture == "gpt_oss" and (not self.norm_topk_prob or self.decoder_sparse_step != 1
                                               or self.mlp_only_layers):
            raise ModelError("model config: gpt_oss routes every layer (softmax over its top-k logits)")
        if self.architecture == "mixtral" and (not self.norm_topk_prob or self.decoder_sparse_step != 1
                                               or self.mlp_only_layers):
            raise ModelError("model config: mixtral routes every layer and renormalizes its top-k weights")

    # ------------------------------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def qk_norm(self) -> bool:
        """Qwen3 (and Qwen3-MoE), Gemma 3: an RMSNorm over each head's query and key (before RoPE)."""
        return self.architecture in ("qwen3", "qwen3_moe", "mellum", "gemma3", "exaone4", "exaone_moe", "hunyuan_v1_dense", "hunyuan_v1_moe",
                                     "nanochat", "hy_v3", "flint", "kolibri1",
                                     "apertus") or (bool(self.use_qk_norm) and self.architecture != "llama4_text")

    @property
    def rope_fp32(self) -> bool:
        """Llama 4 and ERNIE 4.5 rotate queries and keys in fp32 (tables and products), then round."""
        return self.architecture in ("llama4_text", "ernie4_5", "ernie4_5_moe")

    @property
    def l2_qk_norm(self) -> bool:
        """Llama 4: a weightless RMS norm of each head's query and key after RoPE, on its RoPE layers."""
        return self.architecture == "llama4_text" and bool(self.use_qk_norm)

    @property
    def qk_norm_after_rope(self) -> bool:
        """Hunyuan dense, NanoChat: their per-head q/k RMSNorms turn the rotated query and key (after RoPE, not
        before)."""
        return self.architecture in ("hunyuan_v1_dense", "hunyuan_v1_moe", "nanochat")

    @property
    def qk_norm_full(self) -> bool:
        """OLMo 2 and 3, OLMoE: an RMSNorm over the whole query and key projections (all heads at once, before
        RoPE)."""
        return self.architecture in (*_OLMO_ARCHS, "olmoe", "minimax_m2")

    @property
    def post_norms(self) -> bool:
        """OLMo 2 and 3, EXAONE 4: no norm on a block's input; ``post_attention_layernorm`` on the attention's
        output and ``post_feedforward_layernorm`` on the MLP's, before each is added to the residual."""
        return self.architecture in (*_OLMO_ARCHS, "exaone4")

    @property
    def glm4_norms(self) -> bool:
        """GLM-4, Kolibri 1: the input and pre-MLP norms of a Llama block, plus ``post_self_attn_layernorm`` on the
        attention's output and ``post_mlp_layernorm`` on the MLP's, before each is added to the residual."""
        return self.architecture in ("glm4", "kolibri1")

    @property
    def fp32_norm_scale(self) -> bool:
        """gpt-oss, OLMo 2 and 3: RMSNorm multiplies by its weight in fp32, then rounds (transformers' norms there)."""
        return self.architecture in ("gpt_oss", "helium", "flint", *_OLMO_ARCHS)

    @property
    def o_bias(self) -> bool:
        """Whether ``o_proj`` has a bias: transformers' Llama, Qwen3, Qwen3-MoE and Gemma give it one with
        ``attention_bias``; Mistral, Qwen2, Mixtral and Qwen2-MoE never do; Seed-OSS has its own switch."""
        if self.o_proj_bias is not None:
            return self.o_proj_bias
        if self.architecture in ("gpt2", "gpt_neo", "gpt_bigcode", "phi", "bloom", "openai-gpt", "biogpt", "xglm",
                                 "persimmon", "ctrl"):
            return True
        if self.architecture == "gptj":
            return False
        if self.architecture in ("gpt_neox", "starcoder2", "opt", "falcon", "nemotron", *lnf.COHERE):
            return self.attention_bias
        return self.attention_bias and self.architecture in ("llama", "diffllama", "arcee", "qwen3", "qwen3_moe", "gemma", "gemma2",
                                                             "vaultgemma",
                                                             "gemma3", "gpt_oss", "olmo2", "olmo3", "smollm3",
                                                             *GRANITE_SCALED, "olmoe", "olmo", "ernie4_5",
                                                             "hunyuan_v1_dense", "hunyuan_v1_moe", "nanochat", "jais2",
                                                             "apertus",
                                                             "llama4_text", "phimoe", "dots1", "ernie4_5_moe",
                                                             "flex_olmo", "afmoe", "mellum", "hy_v3", "flint",
                                                             "aria_text", "bitnet")

    @property
    def layer_norm(self) -> bool:
        """GPT-2, GPT-NeoX, Phi, StableLM, StarCoder 2: ``nn.LayerNorm`` (with a bias) instead of RMSNorm."""
        return self.architecture in lnf.LN_ARCHS

    @property
    def learned_positions(self) -> bool:
        """GPT-2, GPTBigCode: learned absolute position embeddings added to the token embeddings, and no RoPE."""
        return self.architecture in lnf.LEARNED_POSITIONS

    @property
    def alibi(self) -> bool:
        """Bloom, MPT, Falcon with ``alibi``: ALiBi score biases (:func:`dualpath.model.layernorm_family.alibi_slopes`),
        no RoPE, no position embedding (Bloom: a LayerNorm on the word embeddings)."""
        return self.architecture in lnf.ALIBI or bool(self.falcon_alibi)

    @property
    def gated_mlp(self) -> bool:
        """Whether the dense MLP is gated (SwiGLU / GeGLU) rather than ``down(act(up(x)))``."""
        if self.architecture in ("arcee", "nanochat", "jais2", "apertus"):  # ReLU-squared / xIELU MLP, not gated
            return False
        return not self.layer_norm or self.architecture in ("stablelm", *lnf.COHERE)

    @property
    def mlp_bias(self) -> bool:
        """Biases on the plain MLP's two projections: GPT-2, GPT-J, GPT-NeoX, GPTBigCode and Phi always,
        StarCoder 2 with ``use_bias``; ``mlp_has_bias`` where set (Nemotron's own setting)."""
        if self.mlp_has_bias is not None:
            return self.mlp_has_bias
        return self.architecture in ("gpt2", "gpt_neo", "gptj", "gpt_neox", "gpt_bigcode", "phi", "bloom",
                                     "openai-gpt", "biogpt", "xglm", "persimmon", "ctrl") or (
            self.architecture in ("starcoder2", "opt", "falcon", "nemotron") and self.attention_bias)

    @property
    def shared_norm_parallel(self) -> bool:
        """GPT-J, Phi, and StableLM with a parallel residual: attention and MLP read the same ``input_layernorm``
        output (no ``post_attention_layernorm``)."""
        if self.architecture == "falcon":  # falcon-7b's parallel block, or the new decoder with one norm
            return bool(self.parallel_residual) and self.falcon_layout != "new2"
        return self.architecture in ("phi", "gptj", *lnf.COHERE) or (self.architecture == "stablelm"
                                                                       and bool(self.parallel_residual))

    @property
    def lm_head_bias(self) -> bool:
        """Phi's and GPT-J's LM heads have a bias; PhiMoE's with ``lm_head_bias``."""
        return self.architecture in ("phi", "gptj", "ctrl") or bool(self.head_bias)

    @property
    def position_offset(self) -> int:
        """The row of the learned position table that position 0 reads (OPT: 2)."""
        return lnf.POSITION_OFFSET.get(self.architecture, 0)

    @property
    def scale_query_first(self) -> bool:
        """OPT multiplies its queries by the score scale before the scores (same values, its rounding)."""
        return self.architecture in ("opt", "xglm")

    def layer_attn_scale(self, layer: int) -> float:
        """Layer ``layer``'s score scale: :attr:`attn_scale`, divided by ``layer + 1`` for GPT-2's
        ``scale_attn_by_inverse_layer_idx``."""
        return self.attn_scale / (layer + 1) if self.scale_attn_by_layer else self.attn_scale

    @property
    def attention_sinks(self) -> bool:
        """gpt-oss, granite-swash and Flint: a learned logit per query head joins each softmax's denominator
        (``self_attn.sinks``; GraniteSWA writes it as the output scaled by ``sigmoid(logsumexp(scores) - sink)``)."""
        return self.architecture in ("gpt_oss", "flint", *GRANITE_SWA)

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that RoPE rotates: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def gemma_style(self) -> bool:
        """Gemma and Gemma 2: RMSNorm by ``1 + weight`` (in fp32), embeddings scaled by ``sqrt(hidden_size)``,
        GeGLU (tanh GELU)."""
        return self.architecture in ("gemma", *GEMMA2_LIKE)

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2: ``post_attention_layernorm`` on the attention output, ``pre_/post_feedforward_layernorm``
        around the MLP (Llama's ``post_attention_layernorm`` is the MLP's input norm)."""
        return self.architecture in ("gemma2", "gemma3", "afmoe") or bool(self.peri_norms)

    @property
    def attn_output_gate(self) -> bool:
        """Trinity (afmoe): the attention's output times ``sigmoid(gate_proj(x))`` (one gate per query channel,
        from the block's normed input) before ``o_proj``."""
        return self.architecture == "afmoe"

    @property
    def attn_scale(self) -> float:
        """The attention score scale: ``attention_multiplier`` (Granite), ``query_pre_attn_scalar ** -0.5``
        (Gemma 2), else ``head_dim ** -0.5``."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        if self.architecture == "gpt_neo":  # GPT-Neo does not scale its scores
            return 1.0
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` has the sparse MoE block (else the dense MLP of ``intermediate_size``), as
        transformers decides it: not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0``."""
        return (self.n_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def with_dtype(self, dtype: str) -> ModelSpec:
        return replace(self, dtype=dtype)

    def kv_spec(self) -> KVSpec:
        """The per-token per-layer KV layout: ``[2, n_kv_heads, head_dim]`` of ``dtype``."""
        return KVSpec.mha(self.n_layers, self.n_kv_heads, self.head_dim, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("weights_id")
        if not self.n_experts:  # dense: the dict (and so the block-key namespace) is as before MoE support
            for key in _MOE_FIELDS:
                d.pop(key)
        if self.partial_rotary_factor == 1.0:  # likewise as before Phi-3 support
            d.pop("partial_rotary_factor")
        if self.rope_local_theta is None:  # and before Gemma 3
            d.pop("rope_local_theta")
        if not self.full_attention_layers:  # and before per-layer windows
            d.pop("full_attention_layers")
        else:
            d["full_attention_layers"] = list(self.full_attention_layers)
        for key in (*_GEMMA2_FIELDS, *_GPT_OSS_FIELDS, *_GRANITE_FIELDS, *_GROUP_ROUTER_FIELDS, "use_qk_norm",
                    "router_jitter_eps", "head_bias",
                    "clip_qkv", "o_proj_bias", "activation", "parallel_residual", "qk_layernorm",
                    "scale_attn_by_layer", "post_layer_norm", "plain_norms", "no_final_norm", "norm_residual", "final_norm_eps", "peri_norms", "embed_proj_dim", "logit_scale",
                    "falcon_layout", "falcon_alibi",
                    "mlp_has_bias", "query_scale_beta", "attention_chunk", "nope_temperature", "moe_norm_min",
                    "output_vocab_size", "expert_selection", "shared_expert_average", "rms_norms"):
            if d[key] is None:
                d.pop(key)
        # (this for loop has never broken, so its else has always run: a dense spec's dict keeps "mlp_only_layers"
        # [] since Gemma 2 support; kept, as it is part of every stored fingerprint)
        else:
            d["mlp_only_layers"] = list(self.mlp_only_layers)
        d.pop("context_cap")
        if self.rope_long is None:  # and before LongRoPE
            d.pop("rope_long")
        if not self.nope_layers:  # and before SmolLM3
            d.pop("nope_layers")
        else:
            d["nope_layers"] = list(self.nope_layers)
        return d

    def fingerprint(self) -> str:
        """Stable hash of the architecture, dtype and weights identity: the namespace of block keys."""
        payload = json.dumps({"spec": self.to_dict(), "weights": self.weights_id}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (and :meth:`from_hf_config`) read back to this spec
        (:func:`dualpath.model.spec_out.hf_config`). A copy: nothing in it is shared with this spec (transformers'
        config classes change the RoPE dict they are given)."""
        import copy

        from dualpath.model.spec_out import hf_config

        return copy.deepcopy(hf_config(self))

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, dtype: str | None = None,
                       max_context: int | None = None) -> ModelSpec:
        """Read a Hugging Face config (a dict, a ``config.json`` path, or a directory holding one).
        ``max_context``: the longest context the deployment serves (:attr:`context_cap`; for a LongRoPE model
        it also picks the factor set, :func:`rope_long_for`)."""
        cfg, where = read_hf_config(config)
        cfg = text_model_config(sarvam_config(canonical_keys(cfg, where), where), where)
        cfg = llama_alias_config(cfg, where)
        cfg = codegen_config(cfg, where)

        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        arch: str | None = None
        for a in archs:
            if a in ARCHITECTURES:
                arch = ARCHITECTURES[a]
                break
        if arch is None and model_type in _MODEL_TYPES:
            arch = {"mistral": "llama", "gemma3_text": "gemma3", "gemma4_unified_text": "gemma4_text",
                    "kosmos_2_5_text_model": "kosmos2_5_text", "kosmos-2.5": "kosmos2_5_text",
                    "molmo2": "molmo2_text"}.get(str(model_type), str(model_type))
        if arch is None:
            why = refusal_reason(archs, model_type)
            raise ModelError(
                f"{where}: unsupported architecture {archs or model_type!r}{f' ({why})' if why else ''}; supported: "
                f"{sorted([*ARCHITECTURES, *_DEEPSEEK_ARCH])} (model_type "
                f"{', '.join(sorted({*_MODEL_TYPES, *_DEEPSEEK_ARCH.values()}))})"
            )

        if arch == "gemma4_text":  # (its own spec: per-layer KV shapes, shared KV, per-layer embeddings)
            from dualpath.model.gemma4 import spec_from_config

            return spec_from_config(cfg, where, dtype, max_context)
        if arch == "gemma3n_text":  # (Gemma 4's attention and per-layer embeddings, AltUp streams, Laurel)
            from dualpath.model import gemma3n

            return gemma3n.spec_from_config(cfg, where, dtype, max_context)
        if arch == "diffllama" and cls is ModelSpec:  # (Llama's keys; its KV pages hold value pairs)
            from dualpath.model.diffllama import DiffLlamaSpec

            return DiffLlamaSpec.from_hf_config(cfg, dtype=dtype, max_context=max_context)
        if arch == "jetmoe":  # (its own spec: attention and MLP experts)
            from dualpath.model import jetmoe

            return jetmoe.spec_from_config(cfg, where, dtype, max_context)
        if arch == "beam":  # (its own spec: NoPE full layers, gated attention, depth-scaled residuals, its MoE)
            from dualpath.model import beam

            return beam.spec_from_config(cfg, where, dtype, max_context)
        if arch in ("lfm2", "lfm2_moe"):  # (short-convolution layers: state pages)
            from dualpath.model import lfm2

            return lfm2.spec_from_config(cfg, where, dtype, max_context, arch)
        if arch == "doge":  # (dynamic mask attention: a bias per key in each row; learned residual scales; CDMoE)
            from dualpath.model import doge

            return doge.spec_from_config(cfg, where, dtype, max_context)
        if arch == "qwen4_exp_text":  # (Qwen3.5's layers under hyper-connections; QSA attention; n-gram embeddings)
            from dualpath.model import qwen4_exp

            return qwen4_exp.spec_from_config(cfg, where, dtype, max_context)
        if arch == "dory":  # (a looped nGPT decoder: a layer of pages per layer pass)
            from dualpath.model import dory

            return dory.spec_from_config(cfg, where, dtype, max_context)
        if arch == "inkling_text":  # (relative logits, short convolutions: their states after the KV rows)
            from dualpath.model import inkling

            return inkling.spec_from_config(cfg, where, dtype, max_context)
        if arch == "zaya":  # (compressed convolutional attention: a convolution state beside the KV rows)
            from dualpath.model import zaya

            return zaya.spec_from_config(cfg, where, dtype, max_context)
        if arch == "rwkv":  # (RWKV-4: token shifts and the WKV recurrence in state pages)
            from dualpath.model import rwkv

            return rwkv.spec_from_config(cfg, where, dtype, max_context)
        if arch == "zamba":  # (multi-head Mamba-1 blocks, one shared transformer block)
            from dualpath.model import zamba

            return zamba.spec_from_config(cfg, where, dtype, max_context)
        if arch == "zamba2":  # (Mamba-2 blocks, shared transformer blocks with adapters)
            from dualpath.model import zamba2

            return zamba2.spec_from_config(cfg, where, dtype, max_context)
        if arch == "deepseek_v4":  # (compressed attention, hyper-connections, hash-routed experts)
            from dualpath.model import deepseek_v4

            return deepseek_v4.spec_from_config(cfg, where, dtype, max_context)
        if arch == "recurrent_gemma":  # (RG-LRU recurrent blocks beside local attention)
            from dualpath.model import recurrent_gemma

            return recurrent_gemma.spec_from_config(cfg, where, dtype, max_context)
        if arch == "lara_mini":  # (Gated DeltaNet, sliding and NoPE full attention, MoE)
            from dualpath.model import lara_mini

            return lara_mini.spec_from_config(cfg, where, dtype, max_context)
        if arch == "lfm3":  # (LFM2's convolutions beside full and sliding attention)
            from dualpath.model import lfm2

            return lfm2.lfm3_spec_from_config(cfg, where, dtype, max_context)
        if arch == "minimax":  # (lightning attention layers: state pages)
            from dualpath.model import minimax

            return minimax.spec_from_config(cfg, where, dtype, max_context)
        if arch == "falcon_h1":  # (attention and Mamba-2 in every layer: KV rows and a state in each page)
            from dualpath.model import falcon_h1

            return falcon_h1.spec_from_config(cfg, where, dtype, max_context)
        if arch == "olmo_hybrid":  # (Gated DeltaNet layers: state pages)
            from dualpath.model import olmo_hybrid

            return olmo_hybrid.spec_from_config(cfg, where, dtype, max_context)
        if arch == "jamba":  # (selective-scan and attention layers: state pages)
            from dualpath.model import jamba

            return jamba.spec_from_config(cfg, where, dtype, max_context)
        if arch in ("mamba", "falcon_mamba"):  # (selective-scan blocks: state pages)
            from dualpath.model import mamba1

            return mamba1.spec_from_config(arch, cfg, where, dtype, max_context)
        if arch in ("nemotron_h", "mamba2"):  # (Mamba-2, attention, MLP and MoE blocks: state pages)
            from dualpath.model import nemotron_h

            read = nemotron_h.mamba2_spec if arch == "mamba2" else nemotron_h.spec_from_config
            return read(cfg, where, dtype, max_context)
        if arch in ("granitemoehybrid", "bamba"):  # (Mamba-2 layers: state pages)
            from dualpath.model import granite_hybrid

            return granite_hybrid.spec_from_config(cfg, where, dtype, max_context, arch)
        if arch in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):  # (linear-attention layers: state pages)
            from dualpath.model import qwen_hybrid

            return qwen_hybrid.spec_from_config(arch, cfg, where, dtype, max_context)
        if arch == "chameleon":  # (per-head q/k LayerNorms, swin norm, image tokens masked out of the logits)
            from dualpath.model import chameleon

            return chameleon.spec_from_config(cfg, where, dtype, max_context)
        if arch in ("muse_glimmer_text", "muse_spark_text"):  # (gated QK-normed attention; Spark: MoE, gates)
            from dualpath.model import muse_glimmer

            return muse_glimmer.spec_from_config(cfg, where, dtype, max_context, spark=arch == "muse_spark_text")
        if arch == "git":  # (BERT's post-LayerNorm blocks made causal, learned positions, a biased head)
            from dualpath.model import git

            return git.spec_from_config(cfg, where, dtype, max_context)
        if arch == "kosmos2_5_text":  # (fairseq's decoder: sinusoids from the padding id, a segment embedding)
            from dualpath.model import kosmos2_5

            return kosmos2_5.spec_from_config(cfg, where, dtype, max_context)
        if arch == "molmo2_text":  # (Qwen3's or OLMo's q/k norms, output norms, a RoPE per layer, a wider embedding)
            from dualpath.model import molmo2

            return molmo2.spec_from_config(cfg, where, dtype, max_context)
        if arch == "deepseek_ocr2_text":  # (DeepSeek-V2's decoder with Llama's attention)
            from dualpath.model import deepseek_ocr2

            return deepseek_ocr2.spec_from_config(cfg, where, dtype, max_context)
        if arch == "hrm_text":  # (its own spec: two stacks looped in cycles, each invocation a pool layer)
            from dualpath.model import hrm_text

            return hrm_text.spec_from_config(cfg, where, dtype, max_context)
        if arch == "step3p5":  # (Step 3.7's language model: gated GQA, heads and RoPE per layer type, clamped MoE)
            from dualpath.model import step3p7

            return step3p7.spec_from_config(cfg, where, dtype, max_context)
        if arch == "minimax_m3_vl_text":  # (its own spec: block-sparse layers, clamped SwiGLUs, its MoE)
            from dualpath.model import minimax_m3

            return minimax_m3.spec_from_config(cfg, where, dtype, max_context)
        if arch == "laguna":  # (its own spec: query heads per layer, gated attention, its MoE)
            from dualpath.model import laguna

            return laguna.spec_from_config(cfg, where, dtype, max_context)
        if arch == "mimo_v2_flash":  # (its own spec: KV heads by layer type, narrower values, sinks)
            from dualpath.model import mimo_v2

            return mimo_v2.spec_from_config(cfg, where, dtype, max_context)
        if arch == "modernbert-decoder":  # (its own spec: ModernBERT's norms, GLU, prediction head)
            from dualpath.model import modernbert_decoder

            return modernbert_decoder.spec_from_config(cfg, where, dtype, max_context)

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelError(f"{where}: missing required key {key!r}")
            return cfg[key]

        ln_fields: dict[str, Any] = {}
        if arch in lv.VARIANT_ARCHS:  # their own keys and defaults (dualpath.model.llama_variants)
            cfg, ln_fields = lv.normalize_config(arch, cfg, where)
        elif arch in MLP_BIAS_ARCHS and cfg.get("mlp_bias") not in (None, False):  # (their MLPs' three (Arcee:
            if cfg["mlp_bias"] is not True:  # two) projections biased, as transformers builds them)
                raise ModelError(f"{where}: mlp_bias must be true or false, got {cfg['mlp_bias']!r}")
            ln_fields = {"mlp_has_bias": True}
            cfg = {k: v for k, v in cfg.items() if k != "mlp_bias"}
        if arch in lnf.LN_ARCHS:  # their own keys and defaults, read into the ones below
            cfg = lnf.normalize_config(arch, cfg, where)
            ln_fields = cfg.pop("ln_fields")
        elif arch == "gemma":
            if (act := _check_gemma(cfg, where)) is not None:  # (another than GeGLU's tanh GELU)
                ln_fields = {**(ln_fields or {}), "activation": act}
        elif arch in GEMMA2_LIKE:
            if (act := _check_gemma2(cfg, where)) is not None:  # (another than GeGLU's tanh GELU)
                ln_fields = {**(ln_fields or {}), "activation": act}
        elif arch == "gpt_oss":
            cfg = _gpt_oss_defaults(cfg)
        elif arch == "arcee":  # ArceeConfig: a ReLU-squared MLP, not gated
            act = cfg.get("hidden_act", "relu2")
            if act not in lnf.ACTIVATIONS:
                raise ModelError(f"{where}: hidden_act {act!r} unsupported; expected one of {sorted(lnf.ACTIVATIONS)}")
            ln_fields = {**(ln_fields or {}), "activation": lnf.ACTIVATIONS[act]}
        elif (act := lnf.gate_activation(cfg, where)) is not None:  # (a gated MLP and its experts take any of the
            ln_fields = {**(ln_fields or {}), "activation": act}  # LayerNorm families' activations on the gate)
        if cfg.get("mlp_bias"):
            raise ModelError(f"{where}: mlp_bias=true is unsupported")
        window, full_layers = _layer_windows(arch, cfg, archs, model_type, where)
        hidden = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or _KV_HEADS.get(arch, n_heads))  # Gemma(2)Config's defaults
        head_dim = int(cfg.get("head_dim") or 0) or (128 if arch in ("seed_oss", "glm", "glm4", "solar_open", "afmoe",
                                                                     "mellum", "flint", "kolibri1")
                                                      and "head_dim" not in cfg
                                                      else hidden // n_heads)
        if arch in ("gemma", *GEMMA2_LIKE):  # Gemma(2/3)Config's head_dim defaults to 256, not hidden / heads
            head_dim = cfg.get("head_dim", 256)
            if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
                raise ModelError(f"{where}: head_dim must be a positive integer, got {head_dim!r}")
        rope_local: float | None = None
        if arch == "gemma3":
            rope_theta, rope_scaling, rope_local = _gemma3_rope(cfg, where)
        elif arch == "olmo3":
            rope_theta, rope_scaling, rope_local = _olmo3_rope(cfg, where)
        elif arch == "mellum":
            rope_theta, rope_scaling, rope_local = _olmo3_rope(cfg, where, local_theta=10000.0)
        elif arch in GRANITE_SWA:
            rope_theta, rope_scaling, rope_local = _granite_swa_rope(cfg, where, full_layers, window)
        else:
            rope_theta, rope_scaling = parse_rope({**cfg, "rope_theta": cfg.get("rope_theta", _ROPE_THETA.get(arch))},
                                                  where)
        partial = 1.0
        if arch in ("phi3", "phimoe"):
            partial, rope_scaling = _phi3_rope(cfg, where, rope_scaling)
        elif arch in ("glm4_moe", "glm", "glm4"):  # their config classes' default: RoPE on half of each head
            partial = _partial_rotary(cfg, where, 0.5)
        elif arch == "solar_open":  # (read so that a partial one is refused: transformers rotates whole heads there)
            partial = _partial_rotary(cfg, where, 1.0)
        elif arch == "minimax_m2":  # MiniMax-M2's checkpoints name the rotated dims rotary_dim
            partial = _partial_rotary(cfg, where, _minimax_rotary(cfg, where, head_dim))
        elif arch in lnf.LN_ARCHS:
            partial = float(cfg.get("partial_rotary_factor", 1.0))
        if dtype is None:
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
            if dtype not in _DTYPES:
                dtype = "float32"
        default_bias = arch in ("qwen2", "gpt_oss", "seed_oss", "glm", "glm4")  # Qwen2 always; their config classes default on
        bias = bool(cfg.get("attention_bias", default_bias)) or arch == "qwen2"
        if arch == "qwen2_moe":  # Qwen2-MoE names its q/k/v bias qkv_bias (on unless the config says otherwise)
            bias = bool(cfg.get("qkv_bias", True))
        elif arch in ("mixtral", "phi3", "ministral", "exaone4", "exaone_moe", "ministral3", "cwm", "kolibri1"):  # none
            bias = False
        elif arch in lnf.LN_ARCHS:
            bias = bool(cfg["attention_bias"])
        moe = _moe_fields(arch, cfg, where, need)
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=(int(need("intermediate_size")) if arch not in ("solar_open", "kolibri1")
                               else moe["moe_intermediate_size"]),  # (no dense width in their configs)
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5 if arch in ("phi3", "phimoe", "gpt_oss", "olmo2", "olmo3", "glm4_moe",
                                                                  "solar_open", "afmoe",
                                                                  "olmoe", "exaone4", "exaone_moe", "hy_v3",
                                                                  "granite_swa") else 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position=int(cfg.get("max_position_embeddings", _MAX_POSITION.get(arch, 2048))),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("gemma", *GEMMA2_LIKE, "smollm3",
                                                                         "granite_swa"))),
            attention_bias=bias,
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            sliding_window=window,
            full_attention_layers=full_layers,
            partial_rotary_factor=partial,
            rope_local_theta=rope_local,
            **moe,
            **_gemma2_fields(arch, cfg),
            **_gpt_oss_fields(arch, cfg, where),
            **_granite_fields(arch, cfg, where),
            nope_layers=_nope_layers(arch, cfg, where),
            clip_qkv=cfg.get("clip_qkv") if arch in ("olmoe", "mpt", "olmo", "dbrx") else None,
            o_proj_bias=bool(cfg.get("attention_out_bias", False)) if arch == "seed_oss" else None,
            rope_long=rope_long_for(rope_scaling, max_context),
            context_cap=max_context,
            **ln_fields,
        )


def load_spec(config: dict[str, Any] | str | Path, dtype: str | None = None,
              kv_format: str = "auto", max_context: int | None = None) -> ModelSpec | DeepseekV3Spec:
    """The spec of a checkpoint's architecture: :class:`DeepseekV3Spec` for ``DeepseekV3ForCausalLM`` and
    ``DeepseekV2ForCausalLM``, :class:`ModelSpec` for the Llama family. ``kv_format``: ``auto`` (the compute
    dtype) or ``fp8`` (MLA only). ``max_context``: the longest context served (``context_cap``; None: the
    checkpoint's ``max_position_embeddings``)."""
    cfg, where = read_hf_config(config)
    cfg = mla_text_config(sarvam_config(canonical_keys(cfg, where), where), where)
    archs = cfg.get("architectures") or []
    if "KimiLinearForCausalLM" in archs or (not archs and cfg.get("model_type") == "kimi_linear"):
        from dualpath.model import kimi_linear  # (MLA and KDA layers: state pages in latent rows)

        return kimi_linear.spec_from_config(cfg, where, dtype, kv_format, max_context)
    if "Glm5NextForConditionalGeneration" in archs or (not archs and cfg.get("model_type") in ("glm5_next",
                                                                                              "glm5_next_text")):
        from dualpath.model import glm5_next  # (KDA and pooled-selection MLA under hyper-connections)

        text = glm5_next.text_config(cfg, where) if "text_config" in cfg else cfg
        return glm5_next.spec_from_config(text, where, dtype, kv_format, max_context)
    if "MistralLarge4ForConditionalGeneration" in archs or (not archs and cfg.get("model_type") in (
            "mistral_large4", "mistral_large4_text")):
        from dualpath.model import mistral_large4  # (DSA MLA, no query LoRA, NoPE and latent-sharing layers)

        return mistral_large4.spec_from_config(cfg, where, dtype, kv_format, max_context)
    if any(a in ("Dots3NoteForCausalLM", "Dots3NoteForConditionalGeneration") for a in archs) or (
            not archs and cfg.get("model_type") in ("dots3_note", "dots3_note_text")):
        from dualpath.model import dots3_note  # (MLA layers of three kinds and their own shapes)

        return dots3_note.spec_from_config(cfg, where, dtype, kv_format, max_context)
    if "Step3p7ForConditionalGeneration" in archs or (not archs and cfg.get("model_type") in ("step3p7", "step3p5")):
        from dualpath.model import step3p7  # (gated GQA with per-layer-type heads and RoPE, clamped MoE)

        if kv_format != "auto":
            raise ModelError(f"{where}: KV format {kv_format!r} needs an MLA (DeepSeek-V2/V3) model")
        return step3p7.spec_from_config(cfg, where, dtype, max_context)
    if "LongcatFlashForCausalLM" in archs or (not archs and cfg.get("model_type") == "longcat_flash"):
        from dualpath.model import longcat_flash  # (two MLA sublayers per layer, zero experts)

        return longcat_flash.spec_from_config(cfg, where, dtype, kv_format, max_context)
    if "BailingHybridForCausalLM" in archs or (not archs and cfg.get("model_type") == "bailing_hybrid"):
        from dualpath.model import kimi_linear  # (Kimi Linear's layers, RoPE'd and gated MLA)

        return kimi_linear.bailing_spec_from_config(cfg, where, dtype, kv_format, max_context)
    if any(a in _DEEPSEEK_ARCH for a in archs) or (not archs and cfg.get("model_type") in (*_DEEPSEEK_ARCH.values(),
                                                                                           "hy_v4_vl_text")):
        return DeepseekV3Spec.from_hf_config(cfg, dtype=dtype, kv_format=kv_format, where=where,
                                             max_context=max_context)
    if kv_format != "auto":
        raise ModelError(f"{where}: KV format {kv_format!r} needs an MLA (DeepSeek-V2/V3) model")
    return ModelSpec.from_hf_config(cfg, dtype=dtype, max_context=max_context)


