"""The LayerNorm decoders: GPT-2, GPT-Neo, GPT-J, GPT-NeoX (Pythia), GPTBigCode (StarCoder 1, SantaCoder), OPT, Phi (phi-1,
phi-1.5, phi-2), StableLM, StarCoder 2, Cohere (Command R, Aya; Cohere 2: Command R7B, Command A), Falcon
(RoPE checkpoints: falcon-7b/40b/180b, Falcon 2), Nemotron (Nemotron-3/4, Minitron), Bloom, MPT, Persimmon (and Fuyu's
language model), GPT-NeoX-Japanese (GPT-NeoX's fused q/k/v, no biases but its last layer's output projection's),
OpenAI GPT (GPT-1), BioGPT, XGLM and CTRL.

They share the Llama path's paged attention and layer-wise forward (:class:`dualpath.model.llama.LlamaModel`) and
differ from Llama in the same few places, each a :class:`~dualpath.model.spec.ModelSpec` field or property:

* ``nn.LayerNorm`` (with a bias) instead of RMSNorm, ``eps`` from ``layer_norm_epsilon`` / ``layer_norm_eps`` /
  ``norm_epsilon``; Cohere's LayerNorm has no bias and runs in fp32; Nemotron's scales by ``1 + weight``;
* a plain MLP ``down(act(up(x)))`` with biases (GPT-2, GPT-J, GPT-NeoX, GPTBigCode, Phi; StarCoder 2 with
  ``use_bias``, OPT with ``enable_bias``, Nemotron with ``mlp_bias``; Nemotron's activation is ``relu2``, ReLU squared), the activation named by ``activation`` (StableLM keeps Llama's SwiGLU);
* a parallel residual (``parallel_residual``): GPT-NeoX and Falcon's new decoder ``x + attn(ln1(x)) + mlp(ln2(x))``;
  GPT-J, Phi, Cohere, Falcon 7B, and StableLM with ``use_parallel_residual``, ``x + attn(ln(x)) + mlp(ln(x))`` with one norm (Cohere's MLP is
  SwiGLU);
* RoPE on ``partial_rotary_factor`` of each head (GPT-J ``rotary_dim``, GPT-NeoX 0.25, Phi 0.5, StableLM 0.25);
  GPT-J and Cohere rotate interleaved pairs ``(2i, 2i + 1)``, which is our half-split rotation after permuting the
  rotated rows of ``q_proj`` and ``k_proj`` (even dims first, then odd; scores are unchanged by a permutation
  applied to both queries and keys; Cohere's q/k norms' weights and any q/k biases are permuted alike), so the
  permutation is done once at load and undone at save; Cohere 2 rotates only in its sliding layers
  (``layer_types``, by default three of four over a 4,096-token window) and none at all without a window;
* no RoPE in GPT-2, GPT-Neo, GPTBigCode and OPT, which add learned absolute position embeddings (``wpe``; OPT's
  table is indexed at position + 2); GPT-Neo does not scale its scores and alternates global layers with local ones
  over ``window_size`` keys (``attention_types``); GPT-2 may scale layer
  ``l``'s scores by ``1 / (l + 1)`` (``scale_attn_by_inverse_layer_idx``); GPTBigCode attends with one key/value
  head (``multi_query``) or one per head;
* LayerNorms on each head's query and key (``qk_layernorm``): Phi and Persimmon one LayerNorm shared by every head
  (with a bias),
  StableLM one per head (no bias);
* Bloom and MPT have no position embedding at all: ALiBi, a bias ``slope[h] * (key position - query position)`` on
  every score (:func:`alibi_slopes`, as each computes them; the paged attention kernels take the slopes); Bloom adds a
  LayerNorm on the word embeddings (``word_embeddings_layernorm``); MPT's LayerNorms and projections have no bias,
  its fused ``Wqkv`` is ``[q, k, v]``, and ``clip_qkv`` clamps it;
* Phi's and GPT-J's LM heads have a bias; Cohere's logits are multiplied by ``logit_scale``;
* Falcon's fused ``query_key_value``: ``[kv_heads, q_per_kv + 2, head_dim]`` rows in its new decoder
  (``falcon_layout`` ``new2`` / ``new1``: two norms or one), ``[q heads, k, v]`` with ``multi_query``, per head
  otherwise (``old``); with ``alibi`` (falcon-rw) ALiBi replaces RoPE as transformers' Falcon computes it: Bloom's
  slopes times the key position, rounded to bfloat16, added to the scores before their scale (``alibi_bf16``);
* OPT: queries scaled before the scores (as OPT computes them), embeddings of ``word_embed_proj_dim`` projected in
  and out of the hidden size (``project_in`` / ``project_out``) where it differs, and OPT-350m's post-LayerNorm
  blocks (``do_layer_norm_before: false``: ``ln(x + attn(x))``, ``ln(h + mlp(h))``, no final norm); OpenAI GPT's
  blocks are those, over GPT-2's tensors;
* BioGPT and XGLM (fairseq's decoder): token embeddings times ``sqrt(hidden_size)`` (``scale_embedding``) before the
  positions are added, from row 2 of a learned table (BioGPT) or of fairseq's sinusoids (XGLM, a buffer); CTRL
  likewise, with its own sinusoids from row 0, a ReLU MLP and a biased LM head over the tied embeddings.

This module reads each family's ``config.json`` into the keys :meth:`ModelSpec.from_hf_config` reads
(:func:`normalize_config`, with the config classes' defaults), writes it back (:func:`hf_config`), and renames
checkpoint tensors to ours (:func:`tensors_in`: GPT-2's ``Conv1D`` weights transposed and its fused ``c_attn``
split; GPTBigCode's ``c_attn`` split (``[q, k, v]`` with one key/value head, else per head); GPT-NeoX's fused
``query_key_value``, interleaved per head, split; GPT-J's rotated q/k rows permuted; StableLM's per-head norms
stacked) and
back (:func:`tensors_out`). Buffers some checkpoints carry (causal masks ``attn.bias``, ``masked_bias``,
``rotary_emb.inv_freq``) are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from dualpath.errors import ModelError

if TYPE_CHECKING:
    from dualpath.model.spec import ModelSpec

#: Hugging Face architecture -> ours
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "gpt_neox", "PhiForCausalLM": "phi",
                 "StableLmForCausalLM": "stablelm", "Starcoder2ForCausalLM": "starcoder2",
                 "GPTJForCausalLM": "gptj", "GPTBigCodeForCausalLM": "gpt_bigcode", "OPTForCausalLM": "opt",
                 "CohereForCausalLM": "cohere", "Cohere2ForCausalLM": "cohere2", "FalconForCausalLM": "falcon",
                 "NemotronForCausalLM": "nemotron", "BloomForCausalLM": "bloom", "GPTNeoForCausalLM": "gpt_neo",
                 "MptForCausalLM": "mpt", "Cohere2MoeForCausalLM": "cohere2_moe", "OpenAIGPTLMHeadModel": "openai-gpt",
                 "BioGptForCausalLM": "biogpt", "XGLMForCausalLM": "xglm", "PersimmonForCausalLM": "persimmon",
                 "GPTNeoXJapaneseForCausalLM": "gpt_neox_japanese", "CTRLLMHeadModel": "ctrl",
                 "CohereCompassForCausalLM": "cohere_compass_text"}
#: the families with GPT-2's config keys (``n_embd``, ``n_layer``, ...) and learned or no positions
GPT2_KEYS = ("gpt2", "gptj", "gpt_bigcode")
#: the families whose positions are ALiBi biases (no RoPE, no position embedding)
ALIBI = ("bloom", "mpt")
#: the families with learned absolute positions and no RoPE
LEARNED_POSITIONS = ("gpt2", "gpt_bigcode", "opt", "gpt_neo", "openai-gpt", "biogpt", "xglm", "ctrl")
#: of those, the families whose position table is sinusoids (a buffer, not a weight): XGLM's (fairseq's), CTRL's
SINUSOIDAL = ("xglm", "ctrl")
#: where each family's position table starts (OPT, BioGPT and XGLM keep two rows before position 0)
POSITION_OFFSET = {"opt": 2, "biogpt": 2, "xglm": 2}
#: the families whose token embeddings are scaled (by sqrt(hidden_size): BioGPT's and XGLM's with
#: ``scale_embedding``, CTRL's always) before the positions are added
SCALED_EMBEDDINGS = ("biogpt", "xglm", "ctrl")
#: the families whose RoPE turns interleaved pairs (read by permuting q/k rows: see the module docstring)
INTERLEAVED_ROPE = ("gptj", "cohere", "cohere2", "cohere2_moe")
#: Cohere's families: a bias-free LayerNorm in fp32 (Command A+'s MoE: or an RMSNorm), a SwiGLU MLP, logits times
#: logit_scale
COHERE = ("cohere", "cohere2", "cohere2_moe", "cohere_compass_text")
HF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
#: the families whose transformers attention sizes a head as ``hidden_size // num_attention_heads`` whatever the
#: config says, and those with no grouped keys and values at all (a ``num_key_value_heads`` key is not theirs)
_HEAD_FROM_HIDDEN = ("gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "mpt", "stablelm",
                     "falcon", "openai-gpt", "biogpt", "xglm", "persimmon", "gpt_neox_japanese", "ctrl",
                     "cohere_compass_text")
_ALL_HEADS_KV = ("gpt_neox", "gpt_neo", "opt", "bloom", "mpt", "openai-gpt", "biogpt", "xglm", "persimmon",
                 "gpt_neox_japanese", "ctrl")
#: OpenAI GPT's ``afn`` -> the activation its MLP runs (its "gelu" is GELU's tanh approximation)
_OPENAI_GPT_ACT = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}
LN_ARCHS = tuple(ARCHITECTURES.values())
#: a config's activation name -> the one the MLP runs (``gelu_tanh``: GELU's tanh approximation, which
#: ``gelu_new``, ``gelu_fast`` and ``gelu_pytorch_tanh`` all compute)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu", "quick_gelu": "quick_gelu", "relu2": "relu2"}
#: the config classes' defaults that decide the architecture (their sizes are required, as for every family)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
             "tie_word_embeddings": True},
    "gptj": {"n_positions": 2048, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "rotary_dim": 64,
             "tie_word_embeddings": False},
    "gpt_bigcode": {"n_positions": 1024, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_pytorch_tanh",
                    "multi_query": True, "tie_word_embeddings": True},
    "gpt_neox": {"max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
                 "use_parallel_residual": True, "attention_bias": True, "tie_word_embeddings": False},
    "phi": {"max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "hidden_act": "gelu_new",
            "qk_layernorm": False, "tie_word_embeddings": False},
    "stablelm": {"max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "hidden_act": "silu",
                 "use_parallel_residual": False, "use_qkv_bias": False, "qk_layernorm": False,
                 "tie_word_embeddings": False},
    "starcoder2": {"max_position_embeddings": 4096, "norm_epsilon": 1e-5, "hidden_act": "gelu_pytorch_tanh",
                   "use_bias": True, "tie_word_embeddings": True},
    "cohere": {"max_position_embeddings": 8192, "layer_norm_eps": 1e-5, "hidden_act": "silu", "logit_scale": 0.0625,
               "use_qk_norm": False, "attention_bias": False, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "cohere2": {"max_position_embeddings": 8192, "layer_norm_eps": 1e-5, "hidden_act": "silu", "logit_scale": 0.0625,
                "attention_bias": False, "tie_word_embeddings": True, "rope_theta": 10000.0, "sliding_window": 4096},
    # CohereCompassTextConfig's: Cohere 2's block with RoPE per layer type (half-split), every layer full by default,
    # no logit scale
    "cohere_compass_text": {"max_position_embeddings": 8192, "layer_norm_eps": 1e-5, "hidden_act": "silu",
                            "logit_scale": None, "attention_bias": False, "tie_word_embeddings": True,
                            "sliding_window": 4096},
    # Cohere2MoeConfig's (Command A+): Cohere 2's, with head_dim 128, experts and dense prefix layers
    "cohere2_moe": {"max_position_embeddings": 8192, "layer_norm_eps": 1e-5, "hidden_act": "silu",
                    "logit_scale": 0.0625, "attention_bias": False, "tie_word_embeddings": True, "rope_theta": 10000.0,
                    "sliding_window": 4096, "head_dim": 128, "num_experts": 8, "num_experts_per_tok": 2,
                    "num_shared_experts": 0, "shared_expert_combination_strategy": "average",
                    "expert_selection_fn": "softmax", "norm_topk_prob": True, "prefix_dense_sliding_window_pattern": 1,
                    "sliding_window_pattern": 4},
    "falcon": {"max_position_embeddings": 2048, "layer_norm_epsilon": 1e-5, "activation": "gelu", "alibi": False,
               "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "bias": False,
               "tie_word_embeddings": True},
    "gpt_neo": {"max_position_embeddings": 2048, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                "window_size": 256, "tie_word_embeddings": True},
    "mpt": {"max_seq_len": 2048, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "bloom": {"layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False,
              "tie_word_embeddings": True},
    "nemotron": {"max_position_embeddings": 4096, "norm_eps": 1e-5, "hidden_act": "relu2", "attention_bias": False,
                 "mlp_bias": False, "tie_word_embeddings": False},
    "gpt_neox_japanese": {"max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
                          "intermediate_multiple_size": 4, "tie_word_embeddings": True, "use_parallel_residual": False},
    "persimmon": {"max_position_embeddings": 16384, "layer_norm_eps": 1e-5, "hidden_act": "relu2",
                  "qk_layernorm": True, "tie_word_embeddings": False, "use_parallel_residual": False},
    "ctrl": {"n_positions": 256, "layer_norm_epsilon": 1e-6, "tie_word_embeddings": True},
    "openai-gpt": {"n_positions": 512, "afn": "gelu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
    "biogpt": {"max_position_embeddings": 1024, "hidden_act": "gelu", "scale_embedding": True,
               "tie_word_embeddings": True},
    "xglm": {"max_position_embeddings": 2048, "activation_function": "gelu", "scale_embedding": True,
             "tie_word_embeddings": True},
    "opt": {"max_position_embeddings": 2048, "activation_function": "relu", "do_layer_norm_before": True,
            "_remove_final_layer_norm": False, "enable_bias": True, "layer_norm_elementwise_affine": True,
            "tie_word_embeddings": True},
}
_PARTIAL_DEFAULT = {"gpt_neox": 0.25, "phi": 0.5, "stablelm": 0.25, "nemotron": 0.5, "persimmon": 0.5}


def _flag(cfg: dict[str, Any], key: str, where: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise ModelError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _partial(arch: str, cfg: dict[str, Any], where: str) -> float:
    """``partial_rotary_factor`` where the family's config class finds it: ``rope_parameters`` (transformers 5),
    the top level, GPT-NeoX's legacy ``rotary_pct``, else the class default."""
    value: Any = cfg.get("partial_rotary_factor",
                         cfg.get("rotary_pct") if arch in ("gpt_neox", "gpt_neox_japanese") else None)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        value = params["partial_rotary_factor"]
    if value is None:
        value = _PARTIAL_DEFAULT.get(arch, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ModelError(f"{where}: partial_rotary_factor must be a number in (0, 1], got {value!r}")
    return float(value)


def _gptj_partial(cfg: dict[str, Any], where: str) -> float:
    """GPT-J's ``rotary_dim`` (None: the whole head) as a fraction of the head, checked to give it back exactly."""
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
        return 1.0  # (ModelSpec reports the sizes)
    head_dim, rot = hidden // heads, cfg.get("rotary_dim")
    if rot is None:
        return 1.0
    if isinstance(rot, bool) or not isinstance(rot, int) or not 0 < rot <= head_dim or rot % 2:
        raise ModelError(f"{where}: rotary_dim must be an even integer in [2, {head_dim}] (the head), got {rot!r}")
    factor = rot / head_dim
    if int(head_dim * factor) != rot:  # pragma: no cover - float rounding of an odd ratio
        raise ModelError(f"{where}: rotary_dim {rot} of a {head_dim}-dim head is not representable")
    return factor


def _falcon_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Falcon's keys (and the RefinedWeb spellings ``n_embed``, ``n_layer``, ``n_head``, ``n_head_kv``) in ours,
    with its layout (:data:`falcon_layout` values)."""
    out: dict[str, Any] = {}
    for theirs, ours in (("n_embed", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
                         ("n_head_kv", "num_kv_heads")):
        if theirs in cfg and ours not in cfg:
            out[ours] = cfg[theirs]
    c = {**cfg, **out}
    for key in ("alibi", "new_decoder_architecture", "multi_query", "parallel_attn", "bias"):
        _flag(c, key, where)
    heads = c.get("num_attention_heads")
    n_ln = c.get("num_ln_in_parallel_attn")
    if n_ln not in (None, 1, 2) or isinstance(n_ln, bool):
        raise ModelError(f"{where}: num_ln_in_parallel_attn must be 1, 2 or null, got {n_ln!r}")
    if c["new_decoder_architecture"]:
        if not c["parallel_attn"]:
            raise ModelError(f"{where}: new_decoder_architecture needs parallel_attn=true (as Falcon's blocks are built)")
        kv, layout = c.get("num_kv_heads") or heads, f"new{n_ln or 2}"
    elif n_ln == 2 and c["parallel_attn"]:
        raise ModelError(f"{where}: num_ln_in_parallel_attn=2 needs new_decoder_architecture=true (Falcon runs its two "
                         "norms only there)")
    if not c["new_decoder_architecture"]:
        kv, layout = (1 if c["multi_query"] else heads), "old"
    hidden = c.get("hidden_size")
    act = c["activation"]
    return {**out, "num_key_value_heads": kv, "_falcon_layout": layout, "_falcon_alibi": c["alibi"] or None,
            "attention_bias": c["bias"],
            "rms_norm_eps": c["layer_norm_epsilon"], "hidden_act": act,
            "intermediate_size": c.get("ffn_hidden_size") or (4 * hidden if isinstance(hidden, int) else None)}


def _fairseq_like_config(arch: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """OpenAI GPT's, BioGPT's and XGLM's keys in ours, as transformers builds them: every head its own key and value,
    biased projections, an MLP of 4 x ``n_embd`` (OpenAI GPT) or ``intermediate_size`` / ``ffn_dim``; BioGPT's and
    XGLM's LayerNorms with nn.LayerNorm's default epsilon (1e-5: BioGPT's ``layer_norm_eps`` is never read)."""
    names = {"openai-gpt": (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                            ("n_head", "num_attention_heads"), ("n_positions", "max_position_embeddings"),
                            ("layer_norm_epsilon", "rms_norm_eps")),
             "xglm": (("d_model", "hidden_size"), ("num_layers", "num_hidden_layers"),
                      ("attention_heads", "num_attention_heads"), ("ffn_dim", "intermediate_size"),
                      ("activation_function", "hidden_act")),
             "ctrl": (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
                      ("n_positions", "max_position_embeddings"), ("dff", "intermediate_size"),
                      ("layer_norm_epsilon", "rms_norm_eps"))}.get(arch, ())
    out = {ours: cfg[theirs] for theirs, ours in names if theirs in cfg}
    c = {**cfg, **out}
    if arch == "openai-gpt":
        afn = c.get("afn")
        if afn not in _OPENAI_GPT_ACT:
            raise ModelError(f"{where}: afn {afn!r} unsupported; expected one of {sorted(_OPENAI_GPT_ACT)}")
        hidden = c.get("hidden_size")
        out.update(hidden_act=_OPENAI_GPT_ACT[afn], intermediate_size=4 * hidden if isinstance(hidden, int) else None)
    elif arch == "ctrl":  # (its blocks' LayerNorms have epsilon 1e-6 whatever the config says; the final one its)
        eps = c.get("rms_norm_eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ModelError(f"{where}: layer_norm_epsilon must be a positive number, got {eps!r}")
        out.update(hidden_act="relu", rms_norm_eps=1e-6)
        if eps != 1e-6:
            out["_final_norm_eps"] = float(eps)
    else:
        out["rms_norm_eps"] = 1e-5
    if arch == "xglm":  # (its cross-attention's tensors are left out at load: a causal LM never runs them)
        _flag({"add_cross_attention": False, **c}, "add_cross_attention", where)
    return {**out, "num_key_value_heads": c.get("num_attention_heads"), "attention_bias": True}


def _mpt_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """MPT's keys (``d_model``, ``n_heads``, ``n_layers``, ``max_seq_len``, ``attn_config``) in ours, as
    transformers' MPT runs them: ALiBi with ``alibi_bias_max`` 8, an MLP of 4 x ``d_model`` (transformers ignores
    ``expansion_ratio``), exact GELU, no biases, ``clip_qkv``; what it cannot run is refused by name."""
    out: dict[str, Any] = {}
    for theirs, ours in (("d_model", "hidden_size"), ("n_heads", "num_attention_heads"),
                         ("n_layers", "num_hidden_layers"), ("max_seq_len", "max_position_embeddings")):
        if theirs in cfg:
            out[ours] = cfg[theirs]
    attn = cfg.get("attn_config") or {}
    if not isinstance(attn, dict):
        raise ModelError(f"{where}: attn_config must be an object, got {attn!r}")
    checks = {"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "prefix_lm": False, "softmax_scale": None,
              "attn_type": "multihead_attention", "attn_uses_sequence_id": False}
    for key, want in checks.items():
        if attn.get(key, want) != want:
            raise ModelError(f"{where}: attn_config.{key}={attn[key]!r} is unsupported (supported: {want!r})")
    clip = attn.get("clip_qkv")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ModelError(f"{where}: attn_config.clip_qkv must be a positive number or null, got {clip!r}")
    hidden = out.get("hidden_size", cfg.get("hidden_size"))
    heads = out.get("num_attention_heads", cfg.get("num_attention_heads"))
    return {**out, "rms_norm_eps": cfg["layer_norm_epsilon"], "hidden_act": "gelu", "attention_bias": False,
            "num_key_value_heads": heads, "clip_qkv": None if clip is None else float(clip),
            "intermediate_size": 4 * hidden if isinstance(hidden, int) else None}


def _gpt_neo_layers(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """GPT-Neo's global and local layers as GPTNeoConfig reads them: ``attention_layers`` where a config gives it
    (it is set after the class expands ``attention_types``, so it wins), else ``attention_types``
    (``[[["global", "local"], 12]]``: the list repeated); local layers attend over ``window_size`` keys."""
    n = cfg.get("num_hidden_layers")
    layers = cfg.get("attention_layers")
    types = cfg.get("attention_types")
    if types is not None and layers is None:
        try:
            layers = [t for kinds, times in types for _ in range(int(times)) for t in kinds]
        except (TypeError, ValueError):
            raise ModelError(f"{where}: attention_types must be [[[kinds...], times], ...], got {types!r}") from None
    if layers is None:
        layers = ["global"] * (n if isinstance(n, int) else 0)
    if not isinstance(layers, list) or len(layers) != n or any(t not in ("global", "local") for t in layers):
        raise ModelError(f"{where}: attention_types must give 'global' or 'local' for each of the {n} layers, got "
                         f"{layers!r}")
    window = cfg.get("window_size")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ModelError(f"{where}: window_size must be a positive integer, got {window!r}")
    full = tuple(i for i, t in enumerate(layers) if t == "global")
    return {"_windows": (None, ()) if len(full) == len(layers) else (window, full)}


def _cohere2_layers(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Cohere 2's layers as Cohere2Config reads them: ``layer_types``, or every ``sliding_window_pattern``-th (4th)
    layer full; RoPE in the sliding layers only (``nope_layers``: the full ones, or all without a window)."""
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) and not isinstance(n, bool) else 0
    types = cfg.get("layer_types")
    if types is None:
        pattern = cfg.get("sliding_window_pattern", 4)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ModelError(f"{where}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if (not isinstance(types, list) or len(types) != n
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ModelError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention' for each of the {n} "
                         f"layers, got {types!r}")
    window = cfg.get("sliding_window")
    if window is None:
        return {"_windows": (None, ()), "_nope_layers": tuple(range(n))}
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ModelError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    return {"_windows": (window, full), "_nope_layers": full}


def _compass_layers(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Cohere Compass's layers as CohereCompassTextConfig reads them: ``layer_types`` (default: every layer full),
    the sliding ones over ``sliding_window``; ``rope_parameters`` keyed by layer type, None for a type without RoPE
    (``nope_layers``). One RoPE is read for the layers that rotate (types with different ones are refused); its
    M-RoPE sections are the plain RoPE over text, where a token's three position ids are equal."""
    n = cfg.get("num_hidden_layers")
    n = n if isinstance(n, int) and not isinstance(n, bool) else 0
    types = cfg.get("layer_types")
    types = ["full_attention"] * n if types is None else types
    if (not isinstance(types, list) or len(types) != n
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ModelError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention' for each of the {n} "
                         f"layers, got {types!r}")
    params = cfg.get("rope_parameters")
    missing = sorted({t for t in types if not isinstance(params, dict) or t not in params})
    if missing:
        raise ModelError(f"{where}: rope_parameters must hold each layer type's RoPE (an object, or null for none), "
                         f"missing {missing} (as transformers' CohereCompass model needs them)")
    assert isinstance(params, dict)
    used = {t: params[t] for t in set(types)}
    roped = []
    for t, p in sorted(used.items()):
        if p is not None and not isinstance(p, dict):
            raise ModelError(f"{where}: rope_parameters.{t} must be an object or null, got {p!r}")
        if p is not None:
            roped.append({k: v for k, v in p.items() if k not in ("mrope_section", "mrope_interleaved")})
    if any(r != roped[0] for r in roped):
        raise ModelError(f"{where}: rope_parameters differ between layer types {sorted(used)}; one RoPE for the "
                         "layers that rotate is read here")
    nope = tuple(i for i, t in enumerate(types) if used[t] is None)
    window = cfg.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ModelError(f"{where}: sliding_window must be a positive integer for sliding layers, got {window!r}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    return {"_windows": (window, full) if sliding else (None, ()), "_nope_layers": nope,
            "rope_parameters": roped[0] if roped else {"rope_type": "default", "rope_theta": 10000.0}}


def _int_key(cfg: dict[str, Any], key: str, where: str, low: int = 1) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ModelError(f"{where}: {key} must be an integer >= {low}, got {v!r}")
    return v


def _cohere2_moe(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Command A+'s layers as Cohere2MoeConfig reads them: ``layer_types`` (else the first ``first_k_dense_replace``
    layers full every ``prefix_dense_sliding_window_pattern``-th, the rest every ``sliding_window_pattern``-th),
    ``mlp_layer_types`` (else those first layers dense); RoPE on the sliding layers, and on the dense layers when
    the prefix pattern is 1 (transformers' ``force_rope``). Its MoE: the top ``num_experts_per_tok`` of
    ``num_experts`` by router logit, weighted by their softmax (or, with ``expert_selection_fn: sigmoid``, their
    sigmoid, renormalized with ``norm_topk_prob``); experts ``intermediate_size`` wide, ``num_shared_experts``
    shared ones in one MLP, summed or averaged with the routed output; dense layers
    ``prefix_dense_intermediate_size`` wide (else ``intermediate_size``). Returns the config's updates, with the
    spec fields under ``_moe``."""
    n = _int_key(cfg, "num_hidden_layers", where)
    k = cfg.get("first_k_dense_replace", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ModelError(f"{where}: first_k_dense_replace must be an integer in [0, {n}], got {k!r}")
    prefix = _int_key(cfg, "prefix_dense_sliding_window_pattern", where)
    types = cfg.get("layer_types")
    if types is None:
        pattern = _int_key(cfg, "sliding_window_pattern", where)
        types = ["sliding_attention" if (i + 1) % prefix else "full_attention" for i in range(k)] + \
                ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n - k)]
    kinds = cfg.get("mlp_layer_types")
    if kinds is None:
        kinds = ["dense" if i < k else "sparse" for i in range(n)]
    if (not isinstance(types, list) or len(types) != n
            or any(t not in ("sliding_attention", "full_attention") for t in types)):
        raise ModelError(f"{where}: layer_types must list 'sliding_attention' / 'full_attention' for each of the {n} "
                         f"layers, got {types!r}")
    if not isinstance(kinds, list) or len(kinds) != n or any(t not in ("dense", "sparse") for t in kinds):
        raise ModelError(f"{where}: mlp_layer_types must list 'dense' / 'sparse' for each of the {n} layers, got "
                         f"{kinds!r}")
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ModelError(f"{where}: sliding_window must be a positive integer or null, got {window!r}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    rope = {i for i, t in enumerate(types) if window is not None and t == "sliding_attention"}
    if prefix == 1:
        rope |= {i for i, t in enumerate(kinds) if t == "dense"}
    select = cfg.get("expert_selection_fn")
    if select not in ("softmax", "sigmoid"):
        raise ModelError(f"{where}: expert_selection_fn must be 'softmax' or 'sigmoid', got {select!r}")
    mix = cfg.get("shared_expert_combination_strategy")
    if mix not in ("sum", "average"):
        raise ModelError(f"{where}: shared_expert_combination_strategy must be 'sum' or 'average', got {mix!r}")
    width = _int_key(cfg, "intermediate_size", where)
    dense = cfg.get("prefix_dense_intermediate_size")
    dense = width if dense is None else _int_key(cfg, "prefix_dense_intermediate_size", where)
    shared = _int_key(cfg, "num_shared_experts", where, low=0)
    norm = cfg.get("norm_topk_prob")
    if not isinstance(norm, bool):
        raise ModelError(f"{where}: norm_topk_prob must be true or false, got {norm!r}")
    return {"_windows": (None, ()) if window is None else (window, full),
            "_nope_layers": tuple(i for i in range(n) if i not in rope), "intermediate_size": dense,
            "_moe": {"n_experts": _int_key(cfg, "num_experts", where),
                     "n_experts_per_tok": _int_key(cfg, "num_experts_per_tok", where),
                     "moe_intermediate_size": width, "shared_expert_intermediate_size": width * shared,
                     "norm_topk_prob": norm or select == "softmax", "decoder_sparse_step": 1,
                     "mlp_only_layers": tuple(i for i, t in enumerate(kinds) if t == "dense"),
                     "expert_selection": select, "shared_expert_average": mix == "average",
                     "rms_norms": bool(cfg.pop("_rms"))}}


def _cohere2_moe_out(spec: ModelSpec) -> dict[str, Any]:
    """:func:`_cohere2_moe`'s inverse: Cohere2MoeConfig's keys for ``spec`` (its dense full-attention layers rotate
    all or none: that is the prefix pattern's 1 or not)."""
    dense = [i for i in range(spec.n_layers) if not spec.is_moe_layer(i)]
    full_dense = {i for i in dense if spec.layer_window(i) is None}
    roped = {i for i in full_dense if i not in spec.nope_layers}
    if roped and roped != full_dense:
        raise ModelError("cohere2_moe: its dense full-attention layers must all rotate or none (the prefix pattern)")
    shared = spec.shared_expert_intermediate_size // spec.moe_intermediate_size
    norm = {"rms_norm_eps": spec.rms_eps} if spec.rms_norms else {"layer_norm_eps": spec.rms_eps,
                                                                 "rms_norm_eps": None}
    return {"head_dim": spec.head_dim, "intermediate_size": spec.moe_intermediate_size,
            "prefix_dense_intermediate_size": spec.intermediate_size, "num_experts": spec.n_experts,
            "num_experts_per_tok": spec.n_experts_per_tok, "num_shared_experts": shared,
            "shared_expert_combination_strategy": "average" if spec.shared_expert_average else "sum",
            "expert_selection_fn": spec.expert_selection, "norm_topk_prob": spec.norm_topk_prob,
            "mlp_layer_types": ["dense" if i in dense else "sparse" for i in range(spec.n_layers)],
            "prefix_dense_sliding_window_pattern": 1 if roped or not full_dense else 2, **norm}


def normalize_config(arch: str, cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """A LayerNorm family's config in the keys :meth:`ModelSpec.from_hf_config` reads, plus ``ln_fields`` (the
    spec fields of this module's families). Bad values raise :class:`ModelError` naming the key."""
    out = {**_DEFAULTS[arch], **{k: v for k, v in cfg.items() if v is not None or k in ("sliding_window",
                                                                                         "rotary_dim")}}
    if arch in _HEAD_FROM_HIDDEN:  # (their attention's head is hidden_size // heads: a stray head_dim key is unread)
        out.pop("head_dim", None)
    if arch in _ALL_HEADS_KV:  # (and every head has its own keys and values)
        out.pop("num_key_value_heads", None)
    unscaled = False  # GPT-2's and GPTBigCode's scale_attn_weights false
    if arch in GPT2_KEYS:
        for theirs, ours in (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                             ("n_head", "num_attention_heads"), ("n_positions", "max_position_embeddings"),
                             ("layer_norm_epsilon", "rms_norm_eps"), ("activation_function", "hidden_act")):
            if theirs in out:
                out[ours] = out[theirs]
        _flag({"add_cross_attention": False, **out}, "add_cross_attention", where)  # (its tensors left out at load)
        if arch != "gptj":  # (GPT-J always scales; transformers does not read the key there)
            unscaled = not _flag({"scale_attn_weights": True, **out}, "scale_attn_weights", where)
        hidden = out.get("hidden_size")
        out["intermediate_size"] = out.get("n_inner") or (4 * hidden if isinstance(hidden, int) else None)
        out["num_key_value_heads"] = out.get("num_attention_heads")
        if arch == "gpt_bigcode" and _flag(out, "multi_query", where):
            out["num_key_value_heads"] = 1
        out["attention_bias"] = arch != "gptj"
        if arch == "gptj":
            out["partial_rotary_factor"] = _gptj_partial(out, where)
        scale_by_layer = out.get("scale_attn_by_inverse_layer_idx", False) if arch == "gpt2" else False
        if not isinstance(scale_by_layer, bool):
            raise ModelError(f"{where}: scale_attn_by_inverse_layer_idx must be true or false, got {scale_by_layer!r}")
    elif arch in ("openai-gpt", "biogpt", "xglm", "ctrl"):
        scale_by_layer = False
        out.update(_fairseq_like_config(arch, out, where))
    elif arch == "falcon":
        scale_by_layer = False
        out.update(_falcon_config(out, where))
    elif arch == "gpt_neo":
        scale_by_layer = False
        for theirs, ours in (("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads")):
            if theirs in out and ours not in cfg:
                out[ours] = out[theirs]
        hidden = out.get("hidden_size")
        out.update(rms_norm_eps=out["layer_norm_epsilon"], hidden_act=out["activation_function"], attention_bias=False,
                   num_key_value_heads=out.get("num_attention_heads"),
                   intermediate_size=out.get("intermediate_size") or (4 * hidden if isinstance(hidden, int) else None),
                   **_gpt_neo_layers(out, where))
    elif arch == "mpt":
        scale_by_layer = False
        out.update(_mpt_config(out, where))
    elif arch == "bloom":
        scale_by_layer = False
        if _flag(out, "apply_residual_connection_post_layernorm", where):  # (each residual: the norm's output)
            out["_norm_residual"] = True
        for theirs, ours in (("n_embed", "hidden_size"), ("n_layer", "num_hidden_layers"),
                             ("n_head", "num_attention_heads")):
            if theirs in out and ours not in cfg:
                out[ours] = out[theirs]
        hidden = out.get("hidden_size")
        out.update(rms_norm_eps=out["layer_norm_epsilon"], hidden_act="gelu_new", attention_bias=True,
                   num_key_value_heads=out.get("num_attention_heads"),
                   intermediate_size=4 * hidden if isinstance(hidden, int) else None,
                   max_position_embeddings=out.get("max_position_embeddings") or out.get("seq_length") or 2048)
    elif arch == "opt":
        scale_by_layer = False
        out.update(rms_norm_eps=1e-5, hidden_act=out["activation_function"],  # (nn.LayerNorm's default eps)
                   intermediate_size=out.get("ffn_dim"), num_key_value_heads=out.get("num_attention_heads"),
                   attention_bias=_flag(out, "enable_bias", where))
        _flag(out, "layer_norm_elementwise_affine", where)
        _flag(out, "do_layer_norm_before", where)
        _flag(out, "_remove_final_layer_norm", where)
        proj = out.get("word_embed_proj_dim", out.get("hidden_size"))
        if isinstance(proj, bool) or not isinstance(proj, int) or proj <= 0:
            raise ModelError(f"{where}: word_embed_proj_dim must be a positive integer, got {proj!r}")
    else:
        scale_by_layer = False
        eps_key = {"starcoder2": "norm_epsilon", "nemotron": "norm_eps"}.get(arch, "layer_norm_eps")
        if arch == "cohere2_moe":  # (RMSNorms instead of LayerNorms when it names their epsilon)
            out["_rms"] = out.get("rms_norm_eps") is not None
            eps_key = "rms_norm_eps" if out["_rms"] else eps_key
        out["rms_norm_eps"] = out[eps_key]
    eps = out["rms_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ModelError(f"{where}: the LayerNorm epsilon must be a positive number, got {eps!r}")
    act = out.get("hidden_act")
    if act not in ACTIVATIONS:
        key = next((k for k in ("activation_function", "afn", "hidden_act") if k in cfg), "hidden_act")
        raise ModelError(f"{where}: activation {act!r} ({key}) unsupported; expected one of {sorted(ACTIVATIONS)}")
    if arch == "gpt_neox":
        params = out.get("rope_parameters")
        if "rotary_emb_base" in out and not (isinstance(params, dict) and "rope_theta" in params):
            out.setdefault("rope_theta", out["rotary_emb_base"])
        out["attention_bias"] = _flag(out, "attention_bias", where)
    elif arch in ("phi", "persimmon"):
        out["attention_bias"] = True
    elif arch == "gpt_neox_japanese":  # (no biases but the last layer's output projection's)
        mult, hidden = out.get("intermediate_multiple_size"), out.get("hidden_size")
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
            raise ModelError(f"{where}: intermediate_multiple_size must be a positive number, got {mult!r}")
        params = out.get("rope_parameters")
        if "rotary_emb_base" in out and not (isinstance(params, dict) and "rope_theta" in params):
            out.setdefault("rope_theta", out["rotary_emb_base"])
        out.update(attention_bias=False, intermediate_size=int(hidden * mult) if isinstance(hidden, int) else None)
    elif arch == "stablelm":
        out["attention_bias"] = _flag(out, "use_qkv_bias", where)
    elif arch == "starcoder2":
        out["attention_bias"] = _flag(out, "use_bias", where)
    elif arch == "nemotron":
        out["attention_bias"] = _flag(out, "attention_bias", where)
        if _flag(out, "mlp_bias", where) != out["attention_bias"]:  # (the MLP's own, where it differs)
            out["_mlp_has_bias"] = out["mlp_bias"]
    elif arch in COHERE:
        out["attention_bias"] = _flag(out, "attention_bias", where)
        if arch == "cohere_compass_text" and out.get("logit_scale") is None:
            out["logit_scale"] = 1.0  # (None: logits as they are)
        scale = out.get("logit_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ModelError(f"{where}: logit_scale must be a positive number, got {scale!r}")
        if arch == "cohere2":
            out.update(_cohere2_layers(out, where))
        elif arch == "cohere2_moe":
            out.update(_cohere2_moe(out, where))
        elif arch == "cohere_compass_text":
            out.update(_compass_layers(out, where))
    if arch not in (*GPT2_KEYS, "opt", "falcon", "bloom", "gpt_neo", "mpt", "openai-gpt", "biogpt", "xglm", "ctrl"):
        out["partial_rotary_factor"] = _partial(arch, out, where)
        for key in ("rope_parameters", "rope_scaling"):  # (read above; not a RoPE scaling parameter)
            if isinstance(out.get(key), dict):
                out[key] = {k: v for k, v in out[key].items() if k != "partial_rotary_factor"}
    parallel = {"gpt2": False, "gpt_bigcode": False, "gptj": True, "phi": True, "starcoder2": False,
                "openai-gpt": False, "biogpt": False, "xglm": False, "ctrl": False,
                "opt": False, "cohere": True, "cohere2": True, "cohere2_moe": True, "cohere_compass_text": True,
                "nemotron": False, "bloom": False,
                "gpt_neo": False, "mpt": False}.get(arch)
    if arch == "falcon":
        parallel = out["parallel_attn"]
    if parallel is None:
        parallel = _flag(out, "use_parallel_residual", where)
    qk = _flag(out, "qk_layernorm", where) if arch in ("phi", "stablelm", "persimmon") else False
    if arch == "cohere":
        qk = _flag(out, "use_qk_norm", where)
    out["ln_fields"] = {"activation": ACTIVATIONS[act], "parallel_residual": parallel, "qk_layernorm": qk,
                        "scale_attn_by_layer": scale_by_layer}
    if unscaled:  # GPT-2's and GPTBigCode's scale_attn_weights false: scores not divided by sqrt(head_dim)
        out["ln_fields"]["attention_multiplier"] = 1.0
    if "_final_norm_eps" in out:  # CTRL's final norm, the one that reads layer_norm_epsilon
        out["ln_fields"]["final_norm_eps"] = out.pop("_final_norm_eps")
    if out.pop("_norm_residual", False):
        out["ln_fields"]["norm_residual"] = True
    if "_mlp_has_bias" in out:
        out["ln_fields"]["mlp_has_bias"] = out.pop("_mlp_has_bias")
    if arch in COHERE:
        out["ln_fields"]["logit_scale"] = float(out["logit_scale"])
    if arch == "cohere2_moe":
        out["ln_fields"].update(out.pop("_moe"))
    if arch == "falcon":
        out["ln_fields"]["falcon_layout"] = out.pop("_falcon_layout")
        out["ln_fields"]["falcon_alibi"] = out.pop("_falcon_alibi")
    if arch == "openai-gpt":  # (each residual sum normed, no final norm)
        out["ln_fields"]["post_layer_norm"] = True
    if arch in SCALED_EMBEDDINGS and (arch == "ctrl" or _flag(out, "scale_embedding", where)):
        hidden = out.get("hidden_size")
        out["ln_fields"]["embedding_multiplier"] = float(hidden) ** 0.5 if isinstance(hidden, int) else None
    if arch == "opt":
        proj = out.get("word_embed_proj_dim", out.get("hidden_size"))
        out["ln_fields"].update(post_layer_norm=not out["do_layer_norm_before"],
                                embed_proj_dim=None if proj == out.get("hidden_size") else proj)
        if not out["layer_norm_elementwise_affine"]:  # (every LayerNorm without weight and bias)
            out["ln_fields"]["plain_norms"] = True
        if out["do_layer_norm_before"] and out["_remove_final_layer_norm"]:  # (pre-norm blocks, no final norm)
            out["ln_fields"]["no_final_norm"] = True
    out.pop("mlp_bias", None)  # (not a key of these families; their own switch decides the MLP's biases)
    return out


def hf_activation(activation: str | None) -> str:
    """transformers' ``hidden_act`` name of an :data:`ACTIVATIONS` value (GELU-tanh as ``gelu_pytorch_tanh``; None,
    a gated MLP's default, as ``silu``)."""
    if activation is None:
        return "silu"
    return {"gelu_tanh": "gelu_pytorch_tanh"}.get(activation, activation)


def gate_activation(cfg: Mapping[str, Any], where: str, key: str = "hidden_act",
                    default: str = "silu") -> str | None:
    """The :data:`ACTIVATIONS` value of an MLP's (and its experts') ``key`` (transformers applies ``ACT2FN[key]``);
    None where it is the family's ``default`` (SiLU: a gated MLP's), as where the key is absent."""
    act = cfg.get(key)
    if act is None:
        return None
    if act not in ACTIVATIONS:
        raise ModelError(f"{where}: {key} {act!r} unsupported; expected one of {sorted(ACTIVATIONS)}")
    return None if ACTIVATIONS[act] == ACTIVATIONS[default] else ACTIVATIONS[act]


def hf_config(spec: ModelSpec, base: dict[str, Any]) -> dict[str, Any]:
    """The family's own ``config.json`` for ``spec`` (``base``: the Llama-style keys every spec writes)."""
    arch = spec.architecture
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh" if arch in ("starcoder2", "gpt_bigcode") else "gelu_new",
           "relu": "relu", "silu": "silu", "quick_gelu": "quick_gelu", "relu2": "relu2"}[str(spec.activation)]
    out: dict[str, Any]
    common: dict[str, Any] = {k: base[k] for k in ("vocab_size", "tie_word_embeddings", "torch_dtype") if k in base}
    common.update({k: base[k] for k in ("bos_token_id", "eos_token_id") if k in base})
    common.update(architectures=[HF_ARCH[arch]], model_type=arch, pad_token_id=None)
    if arch in GPT2_KEYS:
        out = {**common, "n_embd": spec.hidden_size, "n_layer": spec.n_layers, "n_head": spec.n_heads,
               "n_inner": spec.intermediate_size, "n_positions": spec.max_position,
               "layer_norm_epsilon": spec.rms_eps, "activation_function": act,
               "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
        if arch == "gpt2":
            out.update(scale_attn_by_inverse_layer_idx=bool(spec.scale_attn_by_layer),
                       scale_attn_weights=spec.attention_multiplier is None)
        elif arch == "gptj":
            out["rotary_dim"] = spec.rotary_dim
        else:
            out.update(multi_query=spec.n_kv_heads == 1 < spec.n_heads, scale_attn_weights=spec.attention_multiplier is None)
        return out
    if arch == "openai-gpt":
        afn = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}.get(str(spec.activation))
        if afn is None or spec.intermediate_size != 4 * spec.hidden_size:
            raise ModelError(f"openai-gpt: its MLP is 4 x n_embd wide with gelu (tanh), relu or silu, got "
                             f"{spec.intermediate_size} and {spec.activation}")
        return {**common, "n_embd": spec.hidden_size, "n_layer": spec.n_layers, "n_head": spec.n_heads,
                "n_positions": spec.max_position, "afn": afn, "layer_norm_epsilon": spec.rms_eps,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    if arch == "ctrl":
        return {**common, "n_embd": spec.hidden_size, "n_layer": spec.n_layers, "n_head": spec.n_heads,
                "n_positions": spec.max_position, "dff": spec.intermediate_size,
                "layer_norm_epsilon": spec.final_norm_eps or spec.rms_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0}
    if arch in ("biogpt", "xglm"):
        if spec.rms_eps != 1e-5:
            raise ModelError(f"{arch}: its LayerNorms use epsilon 1e-5, got {spec.rms_eps}")
        scaled = {"scale_embedding": spec.embedding_multiplier is not None}
        if arch == "biogpt":
            return {**common, **scaled, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                    "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
                    "max_position_embeddings": spec.max_position, "hidden_act": act, "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}
        return {**common, **scaled, "d_model": spec.hidden_size, "ffn_dim": spec.intermediate_size,
                "num_layers": spec.n_layers, "attention_heads": spec.n_heads,
                "max_position_embeddings": spec.max_position, "activation_function": act, "dropout": 0.0,
                "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0}
    if arch == "mpt":
        return {**common, "d_model": spec.hidden_size, "n_heads": spec.n_heads, "n_layers": spec.n_layers,
                "expansion_ratio": spec.intermediate_size // spec.hidden_size, "max_seq_len": spec.max_position,
                "layer_norm_epsilon": spec.rms_eps, "no_bias": True, "resid_pdrop": 0, "emb_pdrop": 0,
                "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": spec.clip_qkv, "qk_ln": False,
                                "softmax_scale": None, "prefix_lm": False, "attn_type": "multihead_attention",
                                "attn_pdrop": 0}}
    if arch == "gpt_neo":
        return {**common, "hidden_size": spec.hidden_size, "num_layers": spec.n_layers, "num_heads": spec.n_heads,
                "intermediate_size": spec.intermediate_size, "max_position_embeddings": spec.max_position,
                "layer_norm_epsilon": spec.rms_eps, "activation_function": act,
                "window_size": spec.sliding_window or 256,
                "attention_types": [[["global" if spec.layer_window(i) is None else "local"], 1]
                                    for i in range(spec.n_layers)],
                "embed_dropout": 0.0, "attention_dropout": 0.0, "resid_dropout": 0.0}
    if arch == "bloom":
        return {**common, "hidden_size": spec.hidden_size, "n_layer": spec.n_layers, "n_head": spec.n_heads,
                "layer_norm_epsilon": spec.rms_eps,
                "apply_residual_connection_post_layernorm": bool(spec.norm_residual),
                "seq_length": spec.max_position, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if arch == "nemotron":
        return {**common, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
                "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
                "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
                "max_position_embeddings": spec.max_position, "hidden_act": act, "norm_eps": spec.rms_eps,
                "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias, "attention_dropout": 0.0,
                "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta,
                                    "partial_rotary_factor": spec.partial_rotary_factor}}
    if arch in COHERE:
        out = {**common, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
               "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
               "num_key_value_heads": spec.n_kv_heads, "max_position_embeddings": spec.max_position,
               "hidden_act": act, "layer_norm_eps": spec.rms_eps, "logit_scale": spec.logit_scale,
               "attention_bias": spec.attention_bias, "attention_dropout": 0.0,
               "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta}}
        if arch == "cohere":
            out["use_qk_norm"] = spec.qk_layernorm
        elif arch == "cohere_compass_text":  # (RoPE keyed by layer type; null for a type that does not rotate)
            types = ["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                     for i in range(spec.n_layers)]
            rope = out.pop("rope_parameters")
            by_type: dict[str, Any] = {}
            for i, t in enumerate(types):
                if by_type.setdefault(t, None if i in spec.nope_layers else rope) != (None if i in spec.nope_layers
                                                                                      else rope):
                    raise ModelError(f"cohere_compass_text: the {t} layers must all rotate or none")
            out.update(sliding_window=spec.sliding_window or 4096, layer_types=types, rope_parameters=by_type,
                       head_dim=spec.head_dim)
        else:
            out.update(sliding_window=spec.sliding_window,
                       layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                    for i in range(spec.n_layers)])
        if arch == "cohere2_moe":
            out.update(_cohere2_moe_out(spec))
        return out
    if arch == "falcon":
        new = str(spec.falcon_layout).startswith("new")
        return {**common, "hidden_size": spec.hidden_size, "num_hidden_layers": spec.n_layers,
                "num_attention_heads": spec.n_heads, "num_kv_heads": spec.n_kv_heads,
                "ffn_hidden_size": spec.intermediate_size, "max_position_embeddings": spec.max_position,
                "activation": act, "layer_norm_epsilon": spec.rms_eps, "bias": spec.attention_bias, "alibi": spec.alibi,
                "new_decoder_architecture": new, "multi_query": not new and spec.n_kv_heads == 1 < spec.n_heads,
                "parallel_attn": spec.parallel_residual,
                "num_ln_in_parallel_attn": int(str(spec.falcon_layout)[3]) if new else None,
                "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta},
                "hidden_dropout": 0.0, "attention_dropout": 0.0}
    if arch == "opt":
        return {**common, "hidden_size": spec.hidden_size, "ffn_dim": spec.intermediate_size,
                "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
                "max_position_embeddings": spec.max_position, "activation_function": act,
                "word_embed_proj_dim": spec.embed_proj_dim or spec.hidden_size,
                "do_layer_norm_before": not spec.post_layer_norm, "enable_bias": spec.attention_bias,
                "_remove_final_layer_norm": bool(spec.no_final_norm),
                "layer_norm_elementwise_affine": not spec.plain_norms, "dropout": 0.0,
                "attention_dropout": 0.0}
    out = {**common, "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
           "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
           "max_position_embeddings": spec.max_position, "hidden_act": act,
           "rope_parameters": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta,
                               "partial_rotary_factor": spec.partial_rotary_factor}}
    if arch not in ("gpt_neox", "persimmon", "gpt_neox_japanese"):
        out["num_key_value_heads"] = spec.n_kv_heads
    if arch == "persimmon":
        out.update(layer_norm_eps=spec.rms_eps, qk_layernorm=spec.qk_layernorm, hidden_dropout=0.0,
                   attention_dropout=0.0)
    elif arch == "gpt_neox_japanese":
        if spec.intermediate_size % spec.hidden_size:  # (GPTNeoXJapaneseConfig's multiple is an integer)
            raise ModelError("gpt_neox_japanese: intermediate_size must be a whole multiple of hidden_size "
                             f"(intermediate_multiple_size), got {spec.intermediate_size} / {spec.hidden_size}")
        mult = spec.intermediate_size // spec.hidden_size
        del out["intermediate_size"]
        out.update(layer_norm_eps=spec.rms_eps, intermediate_multiple_size=mult, hidden_dropout=0.0,
                   attention_dropout=0.0)
    elif arch == "gpt_neox":
        out.update(layer_norm_eps=spec.rms_eps, use_parallel_residual=spec.parallel_residual,
                   attention_bias=spec.attention_bias, hidden_dropout=0.0, attention_dropout=0.0)
    elif arch == "phi":
        out.update(layer_norm_eps=spec.rms_eps, qk_layernorm=spec.qk_layernorm, resid_pdrop=0.0, embd_pdrop=0.0)
    elif arch == "stablelm":
        out.update(layer_norm_eps=spec.rms_eps, qk_layernorm=spec.qk_layernorm, use_qkv_bias=spec.attention_bias,
                   use_parallel_residual=spec.parallel_residual, hidden_dropout=0.0)
    else:
        out.update(norm_epsilon=spec.rms_eps, use_bias=spec.attention_bias, sliding_window=spec.sliding_window,
                   residual_dropout=0.0, embedding_dropout=0.0)
        del out["rope_parameters"]["partial_rotary_factor"]
    return out


# --- tensors ---------------------------------------------------------------------------------------------------

#: GPT-2's, GPTBigCode's and XGLM's cross-attention (``add_cross_attention``): run only with an encoder's states,
#: which a causal LM never has (transformers' forward skips them then), so their tensors are left out at load
_CROSS_ATTENTION = re.compile(r"\.(crossattention|ln_cross_attn|encoder_attn|encoder_attn_layer_norm)\.")
#: checkpoint buffers that are not weights (causal masks, RoPE tables, XGLM's sinusoids, position ids)
_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias|"
                      r"rotary_emb\.inv_freq|embed_positions\.weights|position_ids|transformer\.pos_encoding)$")
#: per family: (theirs, ours) name patterns, applied in order to every tensor name
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [(r"^(transformer\.)?wte\.", "model.embed_tokens."), (r"^(transformer\.)?wpe\.", "model.embed_positions."),
             (r"^(transformer\.)?ln_f\.", "model.norm."), (r"^(transformer\.)?h\.(\d+)\.", r"model.layers.\2."),
             (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
             (r"\.attn\.c_proj\.", ".self_attn.o_proj."), (r"\.mlp\.c_fc\.", ".mlp.up_proj."),
             (r"\.mlp\.c_proj\.", ".mlp.down_proj.")],
    "gpt_neox": [(r"^gpt_neox\.embed_in\.", "model.embed_tokens."), (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
                 (r"^gpt_neox\.layers\.", "model.layers."), (r"^embed_out\.", "lm_head."),
                 (r"\.attention\.dense\.", ".self_attn.o_proj."), (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."),
                 (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")],
    "phi": [(r"^model\.final_layernorm\.", "model.norm."), (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
            (r"\.mlp\.fc1\.", ".mlp.up_proj."), (r"\.mlp\.fc2\.", ".mlp.down_proj."),
            (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."), (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm.")],
    "stablelm": [],
    "starcoder2": [(r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj.")],
    "gptj": [(r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.ln_f\.", "model.norm."),
             (r"^transformer\.h\.(\d+)\.", r"model.layers.\1."), (r"\.ln_1\.", ".input_layernorm."),
             (r"\.attn\.([qkv])_proj\.", r".self_attn.\1_proj."), (r"\.attn\.out_proj\.", ".self_attn.o_proj."),
             (r"\.mlp\.fc_in\.", ".mlp.up_proj."), (r"\.mlp\.fc_out\.", ".mlp.down_proj.")],
}
_RENAMES["gpt_bigcode"] = _RENAMES["gpt2"]
_RENAMES["opt"] = [(r"^(model\.)?decoder\.final_layer_norm\.", "model.norm."), (r"^(model\.)?decoder\.", "model."),
                   (r"\.self_attn_layer_norm\.", ".input_layernorm."),
                   (r"(\.layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
                   (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"\.fc1\.", ".mlp.up_proj."),
                   (r"\.fc2\.", ".mlp.down_proj.")]
#: ours -> theirs, for writing a checkpoint (the first spelling of each family's names)
_OUT_RENAMES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.embed_positions\.", "transformer.wpe."),
             (r"^model\.norm\.", "transformer.ln_f."), (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
             (r"\.input_layernorm\.", ".ln_1."), (r"\.post_attention_layernorm\.", ".ln_2."),
             (r"\.self_attn\.o_proj\.", ".attn.c_proj."), (r"\.mlp\.up_proj\.", ".mlp.c_fc."),
             (r"\.mlp\.down_proj\.", ".mlp.c_proj.")],
    "gpt_neox": [(r"^model\.embed_tokens\.", "gpt_neox.embed_in."), (r"^model\.norm\.", "gpt_neox.final_layer_norm."),
                 (r"^model\.layers\.", "gpt_neox.layers."), (r"^lm_head\.", "embed_out."),
                 (r"\.self_attn\.o_proj\.", ".attention.dense."), (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."),
                 (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h.")],
    "phi": [(r"^model\.norm\.", "model.final_layernorm."), (r"\.self_attn\.o_proj\.", ".self_attn.dense."),
            (r"\.mlp\.up_proj\.", ".mlp.fc1."), (r"\.mlp\.down_proj\.", ".mlp.fc2."),
            (r"\.self_attn\.q_norm\.", ".self_attn.q_layernorm."), (r"\.self_attn\.k_norm\.", ".self_attn.k_layernorm.")],
    "stablelm": [],
    "starcoder2": [(r"\.mlp\.up_proj\.", ".mlp.c_fc."), (r"\.mlp\.down_proj\.", ".mlp.c_proj.")],
    "gptj": [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.norm\.", "transformer.ln_f."),
             (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."), (r"\.input_layernorm\.", ".ln_1."),
             (r"\.self_attn\.([qkv])_proj\.", r".attn.\1_proj."), (r"\.self_attn\.o_proj\.", ".attn.out_proj."),
             (r"\.mlp\.up_proj\.", ".mlp.fc_in."), (r"\.mlp\.down_proj\.", ".mlp.fc_out.")],
}
_OUT_RENAMES["gpt_bigcode"] = _OUT_RENAMES["gpt2"]
_OUT_RENAMES["opt"] = [(r"^model\.norm\.", "model.decoder.final_layer_norm."),
                       (r"^model\.(?!decoder\.)", "model.decoder."),
                       (r"\.input_layernorm\.", ".self_attn_layer_norm."),
                       (r"\.post_attention_layernorm\.", ".final_layer_norm."),
                       (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."), (r"\.mlp\.up_proj\.", ".fc1."),
                       (r"\.mlp\.down_proj\.", ".fc2.")]
_RENAMES["falcon"] = [(r"^transformer\.word_embeddings\.", "model.embed_tokens."), (r"^transformer\.ln_f\.", "model.norm."),
                      (r"^transformer\.h\.(\d+)\.", r"model.layers.\1."), (r"\.ln_attn\.", ".input_layernorm."),
                      (r"\.ln_mlp\.", ".post_attention_layernorm."), (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
                      (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")]
_OUT_RENAMES["falcon"] = [(r"^model\.embed_tokens\.", "transformer.word_embeddings."), (r"^model\.norm\.", "transformer.ln_f."),
                          (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
                          (r"\.self_attn\.o_proj\.", ".self_attention.dense."), (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."),
                          (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h.")]
_RENAMES["mpt"] = [(r"^transformer\.wte\.", "model.embed_tokens."), (r"^transformer\.norm_f\.", "model.norm."),
                   (r"^transformer\.blocks\.", "model.layers."), (r"\.norm_1\.", ".input_layernorm."),
                   (r"\.norm_2\.", ".post_attention_layernorm."), (r"\.attn\.out_proj\.", ".self_attn.o_proj."),
                   (r"\.ffn\.", ".mlp.")]
_OUT_RENAMES["mpt"] = [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.norm\.", "transformer.norm_f."),
                       (r"^model\.layers\.", "transformer.blocks."), (r"\.input_layernorm\.", ".norm_1."),
                       (r"\.post_attention_layernorm\.", ".norm_2."), (r"\.self_attn\.o_proj\.", ".attn.out_proj."),
                       (r"\.mlp\.", ".ffn.")]
_RENAMES["gpt_neo"] = [(r"^(transformer\.)?wte\.", "model.embed_tokens."), (r"^(transformer\.)?wpe\.", "model.embed_positions."),
                       (r"^(transformer\.)?ln_f\.", "model.norm."), (r"^(transformer\.)?h\.(\d+)\.", r"model.layers.\2."),
                       (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
                       (r"\.attn\.attention\.out_proj\.", ".self_attn.o_proj."), (r"\.attn\.attention\.", ".self_attn."),
                       (r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj.")]
_OUT_RENAMES["gpt_neo"] = [(r"^model\.embed_tokens\.", "transformer.wte."), (r"^model\.embed_positions\.", "transformer.wpe."),
                           (r"^model\.norm\.", "transformer.ln_f."), (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
                           (r"\.input_layernorm\.", ".ln_1."), (r"\.post_attention_layernorm\.", ".ln_2."),
                           (r"\.self_attn\.o_proj\.", ".attn.attention.out_proj."), (r"\.self_attn\.", ".attn.attention."),
                           (r"\.mlp\.up_proj\.", ".mlp.c_fc."), (r"\.mlp\.down_proj\.", ".mlp.c_proj.")]

#: Persimmon (and Fuyu's language model): GPT-NeoX's fused per-head q/k/v under Llama-like names
_RENAMES["persimmon"] = [(r"^model\.final_layernorm\.", "model.norm."), (r"\.self_attn\.dense\.", ".self_attn.o_proj."),
                         (r"\.self_attn\.q_layernorm\.", ".self_attn.q_norm."),
                         (r"\.self_attn\.k_layernorm\.", ".self_attn.k_norm."),
                         (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")]
_OUT_RENAMES["persimmon"] = [(r"^model\.norm\.", "model.final_layernorm."), (r"\.self_attn\.o_proj\.", ".self_attn.dense."),
                             (r"\.self_attn\.q_norm\.", ".self_attn.q_layernorm."),
                             (r"\.self_attn\.k_norm\.", ".self_attn.k_layernorm."),
                             (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."), (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h.")]
_RENAMES["gpt_neox_japanese"] = [(r"^gpt_neox_japanese\.embed_in\.", "model.embed_tokens."),
                                 (r"^gpt_neox_japanese\.final_layer_norm\.", "model.norm."),
                                 (r"^gpt_neox_japanese\.layers\.", "model.layers."), (r"^embed_out\.", "lm_head."),
                                 (r"\.attention\.dense_bias$", ".self_attn.o_proj.bias"),
                                 (r"\.attention\.dense\.", ".self_attn.o_proj."),
                                 (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."),
                                 (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")]
_OUT_RENAMES["gpt_neox_japanese"] = [(r"^model\.embed_tokens\.", "gpt_neox_japanese.embed_in."),
                                     (r"^model\.norm\.", "gpt_neox_japanese.final_layer_norm."),
                                     (r"^model\.layers\.", "gpt_neox_japanese.layers."), (r"^lm_head\.", "embed_out."),
                                     (r"\.self_attn\.o_proj\.bias$", ".attention.dense_bias"),
                                     (r"\.self_attn\.o_proj\.", ".attention.dense."),
                                     (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."),
                                     (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h.")]
_RENAMES["ctrl"] = [(r"^transformer\.w\.", "model.embed_tokens."), (r"^transformer\.layernorm\.", "model.norm."),
                    (r"^transformer\.h\.(\d+)\.", r"model.layers.\1."), (r"\.multi_head_attention\.W([qkv])\.", r".self_attn.\1_proj."),
                    (r"\.multi_head_attention\.dense\.", ".self_attn.o_proj."), (r"\.ffn\.0\.", ".mlp.up_proj."),
                    (r"\.ffn\.2\.", ".mlp.down_proj."), (r"\.layernorm1\.", ".input_layernorm."),
                    (r"\.layernorm2\.", ".post_attention_layernorm.")]
_OUT_RENAMES["ctrl"] = [(r"^model\.embed_tokens\.", "transformer.w."), (r"^model\.norm\.", "transformer.layernorm."),
                        (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
                        (r"\.self_attn\.([qkv])_proj\.", r".multi_head_attention.W\1."),
                        (r"\.self_attn\.o_proj\.", ".multi_head_attention.dense."), (r"\.mlp\.up_proj\.", ".ffn.0."),
                        (r"\.mlp\.down_proj\.", ".ffn.2."), (r"\.input_layernorm\.", ".layernorm1."),
                        (r"\.post_attention_layernorm\.", ".layernorm2.")]
_RENAMES["openai-gpt"] = [(r"^(transformer\.)?tokens_embed\.", "model.embed_tokens."),
                          (r"^(transformer\.)?positions_embed\.", "model.embed_positions."),
                          (r"^(transformer\.)?h\.(\d+)\.", r"model.layers.\2."), (r"\.ln_1\.", ".input_layernorm."),
                          (r"\.ln_2\.", ".post_attention_layernorm."), (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
                          (r"\.mlp\.c_fc\.", ".mlp.up_proj."), (r"\.mlp\.c_proj\.", ".mlp.down_proj.")]
_OUT_RENAMES["openai-gpt"] = [(r"^model\.embed_tokens\.", "transformer.tokens_embed."),
                              (r"^model\.embed_positions\.", "transformer.positions_embed."),
                              (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."), (r"\.input_layernorm\.", ".ln_1."),
                              (r"\.post_attention_layernorm\.", ".ln_2."), (r"\.self_attn\.o_proj\.", ".attn.c_proj."),
                              (r"\.mlp\.up_proj\.", ".mlp.c_fc."), (r"\.mlp\.down_proj\.", ".mlp.c_proj.")]
#: BioGPT's and XGLM's fairseq names (BioGPT under ``biogpt.`` with its ``output_projection`` head)
_FAIRSEQ_LAYERS = [(r"\.self_attn_layer_norm\.", ".input_layernorm."),
                   (r"(\.layers\.\d+)\.final_layer_norm\.", r"\1.post_attention_layernorm."),
                   (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."), (r"(\.layers\.\d+)\.fc1\.", r"\1.mlp.up_proj."),
                   (r"(\.layers\.\d+)\.fc2\.", r"\1.mlp.down_proj.")]
_FAIRSEQ_LAYERS_OUT = [(r"\.input_layernorm\.", ".self_attn_layer_norm."),
                       (r"\.post_attention_layernorm\.", ".final_layer_norm."),
                       (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."), (r"\.mlp\.up_proj\.", ".fc1."),
                       (r"\.mlp\.down_proj\.", ".fc2.")]
_RENAMES["biogpt"] = [(r"^biogpt\.layer_norm\.", "model.norm."), (r"^biogpt\.", "model."),
                      (r"^output_projection\.", "lm_head."), *_FAIRSEQ_LAYERS]
_OUT_RENAMES["biogpt"] = [(r"^model\.norm\.", "biogpt.layer_norm."), (r"^model\.", "biogpt."),
                          (r"^lm_head\.", "output_projection."), *_FAIRSEQ_LAYERS_OUT]
_RENAMES["xglm"] = [(r"^model\.layer_norm\.", "model.norm."), *_FAIRSEQ_LAYERS]
_OUT_RENAMES["xglm"] = [(r"^model\.norm\.", "model.layer_norm."), *_FAIRSEQ_LAYERS_OUT]
_RENAMES["bloom"] = [(r"^(transformer\.)?word_embeddings_layernorm\.", "model.embed_norm."),
                     (r"^(transformer\.)?word_embeddings\.", "model.embed_tokens."),
                     (r"^(transformer\.)?ln_f\.", "model.norm."), (r"^(transformer\.)?h\.(\d+)\.", r"model.layers.\2."),
                     (r"\.self_attention\.dense\.", ".self_attn.o_proj."),
                     (r"\.mlp\.dense_h_to_4h\.", ".mlp.up_proj."), (r"\.mlp\.dense_4h_to_h\.", ".mlp.down_proj.")]
_OUT_RENAMES["bloom"] = [(r"^model\.embed_norm\.", "transformer.word_embeddings_layernorm."),
                         (r"^model\.embed_tokens\.", "transformer.word_embeddings."), (r"^model\.norm\.", "transformer.ln_f."),
                         (r"^model\.layers\.(\d+)\.", r"transformer.h.\1."),
                         (r"\.self_attn\.o_proj\.", ".self_attention.dense."),
                         (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."), (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h.")]
for _arch in (*COHERE, "nemotron"):  # (their tensors have Llama's names)
    _RENAMES[_arch] = _OUT_RENAMES[_arch] = []
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
#: the q/k tensors whose rows (or norm dims) an interleaved RoPE's permutation reorders (GPT-J's ``attn.``, ours
#: and Cohere's ``self_attn.``)
_QK_ROTATED = re.compile(r"\.(attn|self_attn)\.[qk]_(proj\.weight|proj\.bias|norm\.weight)$")
_PER_HEAD_NORM = re.compile(r"^(.*\.self_attn\.)([qk])_layernorm\.norms\.(\d+)\.weight$")


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def _split_gpt2_qkv(spec: ModelSpec, name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """GPT-2's ``c_attn`` (``Conv1D``: weight ``[hidden, 3 hidden]``, transposed here; bias ``[3 hidden]``), or
    GPTBigCode's with one key/value head (rows ``[hidden, head_dim, head_dim]``) -> our ``q_proj``, ``k_proj``,
    ``v_proj``: the rows in that order. (GPTBigCode with a key/value per head interleaves them as GPT-NeoX does.)"""
    prefix, kind = name.rsplit(".attn.c_attn.", 1)
    if spec.architecture == "gpt_bigcode" and spec.n_kv_heads == spec.n_heads > 1:
        _split_per_head(spec, name, t, f"{prefix}.self_attn", out)
        return
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    if t.shape[0] != q + 2 * kv:
        raise ModelError(f"tensor {name!r} has {t.shape[0]} rows, the config implies {q + 2 * kv}")
    for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv], dim=0), strict=True):
        out[f"{prefix}.self_attn.{part}.{kind}"] = chunk.contiguous()


def _split_per_head(spec: ModelSpec, name: str, t: torch.Tensor, attn: str, out: dict[str, torch.Tensor]) -> None:
    """A fused q/k/v whose rows are ``[heads, 3, head_dim]`` (each head's query, key and value together: GPT-NeoX's
    ``query_key_value``, GPTBigCode's ``c_attn`` without ``multi_query``) -> our ``q_proj``, ``k_proj``,
    ``v_proj`` (rows ``[heads, head_dim]`` each) under ``attn``."""
    kind = name.rsplit(".", 1)[1]
    h, d = spec.n_heads, spec.head_dim
    if t.shape[0] != 3 * h * d:
        raise ModelError(f"tensor {name!r} has {t.shape[0]} rows, the config implies {3 * h * d}")
    parts = t.reshape(h, 3, d, *t.shape[1:])
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{attn}.{part}.{kind}"] = parts[:, i].reshape(h * d, *t.shape[1:]).contiguous()


def _head_order(spec: ModelSpec, inverse: bool = False) -> torch.Tensor:
    """The order of one head's dims that turns interleaved RoPE pairs into our half-split ones (the rotated dims:
    even ones, then odd ones; the rest in place), or with ``inverse`` its inverse."""
    d, r = spec.head_dim, spec.rotary_dim
    head = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, d)])
    return torch.argsort(head) if inverse else head


def _falcon_groups(spec: ModelSpec) -> bool:
    """Whether Falcon's fused q/k/v is grouped ``[kv_heads, q_per_kv + 2, head_dim]`` (its new decoder, or one key/
    value head: ``[q heads..., k, v]`` is that with one group) rather than per head ``[heads, 3, head_dim]``."""
    return str(spec.falcon_layout).startswith("new") or spec.n_kv_heads == 1


def _split_falcon_qkv(spec: ModelSpec, name: str, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """Falcon's ``query_key_value`` -> our ``q_proj``, ``k_proj``, ``v_proj`` (see :func:`_falcon_groups`)."""
    attn = name.rsplit(".self_attention.", 1)[0] + ".self_attn"
    if not _falcon_groups(spec):
        _split_per_head(spec, name, t, attn, out)
        return
    kind = name.rsplit(".", 1)[1]
    g, per, d = spec.n_kv_heads, spec.n_heads // spec.n_kv_heads, spec.head_dim
    if t.shape[0] != g * (per + 2) * d:
        raise ModelError(f"tensor {name!r} has {t.shape[0]} rows, the config implies {g * (per + 2) * d}")
    rows = t.reshape(g, per + 2, d, *t.shape[1:])
    out[f"{attn}.q_proj.{kind}"] = rows[:, :per].reshape(g * per * d, *t.shape[1:]).contiguous()
    out[f"{attn}.k_proj.{kind}"] = rows[:, per].reshape(g * d, *t.shape[1:]).contiguous()
    out[f"{attn}.v_proj.{kind}"] = rows[:, per + 1].reshape(g * d, *t.shape[1:]).contiguous()


def _rotary_order(spec: ModelSpec, heads: int, inverse: bool = False) -> torch.Tensor:
    """GPT-J, Cohere, GLM: the row order of a q/k projection of ``heads`` heads that turns its interleaved RoPE pairs
    into our half-split ones (:func:`_head_order` per head), or its inverse."""
    head = _head_order(spec, inverse)
    return torch.cat([head + i * spec.head_dim for i in range(heads)])


def interleaved_to_half(spec: ModelSpec, name: str, t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """A q/k projection's rows (weight or bias) or q/k norm weights ``[heads, head_dim]`` of a model whose RoPE turns
    interleaved pairs (GPT-J, Cohere, GLM) in our half-split order (``inverse``: back)."""
    if name.endswith("_norm.weight"):
        return t[..., _head_order(spec, inverse)].contiguous()
    heads = spec.n_heads if ".q_proj." in name else spec.n_kv_heads
    return t[_rotary_order(spec, heads, inverse)].contiguous()


def tensors_in(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LayerNorm family's checkpoint tensors in our names (see the module docstring)."""
    arch = spec.architecture
    out: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if _BUFFERS.search(name) or (arch in ("gpt2", "gpt_bigcode", "xglm") and _CROSS_ATTENTION.search(name)):
            continue
        if arch in ("gpt2", "openai-gpt") and _CONV1D.search(name):
            t = t.t()
        if arch in INTERLEAVED_ROPE and _QK_ROTATED.search(name):
            t = interleaved_to_half(spec, name, t)
        if arch == "stablelm" and (m := _PER_HEAD_NORM.match(name)):
            heads.setdefault(f"{m[1]}{m[2]}_norm.weight", {})[int(m[3])] = t
            continue
        new = _rename(name, _RENAMES[arch])
        if arch in ("gpt2", "gpt_bigcode", "openai-gpt") and ".attn.c_attn." in new:
            _split_gpt2_qkv(spec, new, t, out)
        elif arch == "falcon" and ".self_attention.query_key_value." in new:
            _split_falcon_qkv(spec, new, t, out)
        elif arch == "mpt" and ".attn.Wqkv." in new:  # [q, k, v] rows, each of hidden_size
            attn = new.rsplit(".attn.Wqkv.", 1)[0] + ".self_attn"
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0), strict=True):
                out[f"{attn}.{part}.{new.rsplit('.', 1)[1]}"] = chunk.contiguous()
        elif arch == "bloom" and ".self_attention.query_key_value." in new:
            _split_per_head(spec, new, t, new.rsplit(".self_attention.", 1)[0] + ".self_attn", out)
        elif arch in ("gpt_neox", "gpt_neox_japanese") and ".attention.query_key_value." in new:
            _split_per_head(spec, new, t, new.rsplit(".attention.", 1)[0] + ".self_attn", out)
        elif arch == "persimmon" and ".self_attn.query_key_value." in new:
            _split_per_head(spec, new, t, new.rsplit(".self_attn.", 1)[0] + ".self_attn", out)
        else:
            out[new.replace(".attention.", ".self_attn.") if arch in ("gpt_neox", "gpt_neox_japanese") else new] = t
    for name, per_head in heads.items():
        if sorted(per_head) != list(range(len(per_head))):
            raise ModelError(f"{name}: per-head norms {sorted(per_head)} are not 0..{len(per_head) - 1}")
        out[name] = torch.stack([per_head[i] for i in range(len(per_head))])
    return out


def tensors_out(spec: ModelSpec, ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors in the family's checkpoint names (the inverse of :func:`tensors_in`)."""
    arch = spec.architecture
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in ours.items():
        m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if arch in ("gpt2", "gpt_neox", "gpt_bigcode", "falcon", "bloom", "mpt", "openai-gpt", "persimmon",
                    "gpt_neox_japanese") and m:
            fused.setdefault(f"{m[1]}|{m[3]}", {})[m[2]] = t
            continue
        if arch in INTERLEAVED_ROPE and _QK_ROTATED.search(name):
            t = interleaved_to_half(spec, name, t, inverse=True)
        if arch == "stablelm" and re.search(r"\.self_attn\.[qk]_norm\.weight$", name):
            stem = name[: -len("_norm.weight")]
            for h in range(t.shape[0]):
                out[f"{stem}_layernorm.norms.{h}.weight"] = t[h].contiguous()
            continue
        new = _rename(name, _OUT_RENAMES[arch])
        if arch == "falcon" and spec.falcon_layout == "new2":  # its two norms' own names
            new = new.replace(".input_layernorm.", ".ln_attn.").replace(".post_attention_layernorm.", ".ln_mlp.")
        if arch in ("gpt_neox", "gpt_neox_japanese"):
            new = new.replace(".self_attn.", ".attention.")
        if arch in ("gpt2", "openai-gpt") and _CONV1D.search(new):
            t = t.t().contiguous()
        out[new] = t
    for key, parts in fused.items():
        layer, kind = key.split("|")
        q, k, v = parts["q"], parts["k"], parts["v"]
        if arch == "mpt":
            out[_rename(f"{layer}.attn.Wqkv.{kind}", _OUT_RENAMES[arch])] = torch.cat([q, k, v]).contiguous()
        elif arch == "falcon" and _falcon_groups(spec):
            g, d = spec.n_kv_heads, spec.head_dim
            w = torch.cat([q.reshape(g, -1, d, *q.shape[1:]), k.reshape(g, 1, d, *k.shape[1:]),
                           v.reshape(g, 1, d, *v.shape[1:])], dim=1).reshape(-1, *q.shape[1:])
            out[_rename(f"{layer}.self_attention.query_key_value.{kind}", _OUT_RENAMES[arch])] = w.contiguous()
        elif arch == "gpt_bigcode" and spec.n_kv_heads == 1 < spec.n_heads:
            out[_rename(f"{layer}.attn.c_attn.{kind}", _OUT_RENAMES[arch])] = torch.cat([q, k, v]).contiguous()
        elif arch in ("gpt2", "openai-gpt"):
            w = torch.cat([q, k, v])
            out[_rename(f"{layer}.attn.c_attn.{kind}", _OUT_RENAMES[arch])] = w.t().contiguous() if kind == "weight" else w
        else:
            h, d = spec.n_heads, spec.head_dim
            w = torch.stack([x.reshape(h, d, *x.shape[1:]) for x in (q, k, v)], dim=1).reshape(3 * h * d, *q.shape[1:])
            fused_name = {"gpt_bigcode": "attn.c_attn", "falcon": "self_attention.query_key_value",
                          "bloom": "self_attention.query_key_value",
                          "persimmon": "self_attn.query_key_value"}.get(
                arch, "attention.query_key_value")
            out[_rename(f"{layer}.{fused_name}.{kind}", _OUT_RENAMES[arch])] = w.contiguous()
    return out


def alibi_slopes(n_heads: int, arch: str = "bloom") -> torch.Tensor:
    """ALiBi's per-head slopes (fp32) as each family computes them. Bloom: ``2 ** (-8 / n)`` to the powers
    ``1 .. n`` for the largest power of two ``n <= n_heads``, then the odd powers of ``2 ** (-4 / n)`` for the
    remaining heads; Falcon: Bloom's rounded to bfloat16 (as its ALiBi is built: the kernels' ``alibi_bf16``).
    MPT (``alibi_bias_max`` 8): ``2 ** -(8 i / m)`` for ``i = 1 .. m``, ``m`` the power of two at or above
    ``n_heads``, the odd-indexed ones first then the even ones, the first ``n_heads``."""
    import math

    if arch == "mpt":
        m = 2 ** math.ceil(math.log2(n_heads))
        slopes = 1.0 / torch.pow(2, torch.arange(1, m + 1, dtype=torch.int64).float() * (8 / m))
        if m != n_heads:
            slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
        return slopes

    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != n_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        rest = min(closest, n_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2, dtype=torch.int32))])
    if arch == "falcon":
        slopes = slopes.bfloat16().float()
    return slopes


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation function for an :data:`ACTIVATIONS` value."""
    import torch.nn.functional as F

    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu2":
        return lambda x: torch.square(F.relu(x))
    raise ModelError(f"activation {name!r} unsupported; expected one of {sorted(set(ACTIVATIONS.values()))}")
