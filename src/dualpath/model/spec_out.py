"""A :class:`~dualpath.model.spec.ModelSpec` written back as the ``config.json`` each family's transformers config
class reads (what ``save_pretrained`` writes, and what :meth:`~dualpath.model.spec.ModelSpec.from_hf_config` reads
back to the same spec): the common keys, then each family's own, in the names its checkpoints use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dualpath.errors import ModelError
from dualpath.model import layernorm_family as lnf
from dualpath.model import llama_variants as lv
from dualpath.model.archs import (
    _GRANITE_FIELDS,
    _HF_ARCH,
    GEMMA2_LIKE,
    GRANITE_ARCHS,
    GRANITE_SWA,
    MLP_BIAS_ARCHS,
    MOE_ARCHS,
    SIGMOID_ROUTER_ARCHS,
)
from dualpath.model.family_fields import _GROUP_MOE

if TYPE_CHECKING:
    from dualpath.model.spec import ModelSpec


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """A ``config.json`` dict that transformers (and ``ModelSpec.from_hf_config``) read back to ``spec``."""
    arch = _HF_ARCH[spec.architecture]
    mistral = spec.architecture == "llama" and spec.sliding_window is not None  # Llama has no window
    cfg: dict[str, Any] = {
        "architectures": ["MistralForCausalLM" if mistral else arch],
        "model_type": "mistral" if mistral else spec.architecture,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "max_position_embeddings": spec.max_position,
        "tie_word_embeddings": spec.tie_embeddings,
        # (a dense gated MLP's other activation, by transformers' name)
        "hidden_act": lnf.hf_activation(spec.activation)
        if spec.activation is not None and spec.gated_mlp and not spec.layer_norm else "silu",
        "torch_dtype": spec.dtype,
    }
    if spec.architecture in ("llama", "diffllama", "qwen3", "qwen3_moe", "gemma", *GEMMA2_LIKE, "olmo2", "olmo3",
                             "smollm3", "granite", "hyperclovax", "granite_swa"):
        cfg["attention_bias"] = spec.attention_bias
    if spec.architecture == "mellum":  # MellumConfig's keys (no decoder_sparse_step / mlp_only_layers)
        cfg.update(num_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                   attention_bias=spec.attention_bias,
                   mlp_layer_types=["sparse" if spec.is_moe_layer(i) else "dense" for i in range(spec.n_layers)])
    if spec.architecture in ("olmo3", "mellum"):
        cfg["rope_parameters"] = {
            "full_attention": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": spec.rope_local_theta or spec.rope_theta}}
        del cfg["rope_theta"], cfg["rope_scaling"]
        cfg.update(sliding_window=spec.sliding_window or spec.max_position,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
    if spec.architecture == "smollm3":
        # (SmolLM3Config's default pad_token_id, 128004, is its embedding's padding_idx: out of a smaller vocab)
        cfg.update(no_rope_layers=[int(i not in spec.nope_layers) for i in range(spec.n_layers)],
                   use_sliding_window=spec.sliding_window is not None, pad_token_id=None,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
    if spec.architecture in ("granite", "hyperclovax", "granite_swa"):
        cfg.update({key: getattr(spec, key) for key in _GRANITE_FIELDS})
        if spec.architecture == "hyperclovax":
            cfg.update(use_post_norm=bool(spec.peri_norms), head_dim=spec.head_dim)
    elif spec.architecture in GRANITE_ARCHS:  # the MoE ones: experts intermediate_size wide, every layer
        cfg.update({key: getattr(spec, key) for key in _GRANITE_FIELDS}, attention_bias=spec.attention_bias,
                   num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   intermediate_size=spec.moe_intermediate_size)
        if spec.architecture in ("granitemoeshared", "granitemoe_swa"):
            cfg["shared_intermediate_size"] = spec.shared_expert_intermediate_size
    if spec.architecture in GRANITE_SWA:
        local = spec.rope_local_theta or spec.rope_theta
        cfg.update(sliding_window=spec.sliding_window or spec.max_position,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)],
                   layer_rope_theta=[0.0 if i in spec.nope_layers else
                                     spec.rope_theta if spec.layer_window(i) is None else local
                                     for i in range(spec.n_layers)])
    if spec.architecture in _GROUP_MOE:  # GLM-4.5's MoE block under each family's keys
        g = _GROUP_MOE[spec.architecture]
        cfg.update({g.experts: spec.n_experts, "num_experts_per_tok": spec.n_experts_per_tok,
                    "moe_intermediate_size": spec.moe_intermediate_size,
                    g.shared: spec.shared_expert_intermediate_size // spec.moe_intermediate_size,
                    g.factor: spec.routed_scaling_factor, "attention_bias": spec.attention_bias})
        if not g.fixed:
            cfg.update(norm_topk_prob=spec.norm_topk_prob, n_group=spec.n_group, topk_group=spec.topk_group)
        if g.dense:
            cfg[g.dense] = len(spec.mlp_only_layers)
        if spec.architecture in ("dots1", "afmoe"):  # (Trinity's full layers are its layers without RoPE)
            full = [i in spec.nope_layers if spec.architecture == "afmoe" else spec.layer_window(i) is None
                    for i in range(spec.n_layers)]
            cfg.update(sliding_window=spec.sliding_window,
                       layer_types=["full_attention" if f else "sliding_attention" for f in full])
    if spec.architecture == "glm4_moe":
        cfg.update(use_qk_norm=bool(spec.use_qk_norm), partial_rotary_factor=spec.partial_rotary_factor,
                   num_nextn_predict_layers=0, num_mtp_layers=0)
    if spec.architecture == "afmoe":  # (muP's embedding scale is sqrt(hidden_size): a switch in its config)
        cfg["mup_enabled"] = spec.embedding_multiplier is not None
    if spec.architecture == "solar_open":  # no dense width in SolarOpenConfig
        cfg.pop("intermediate_size")
        cfg["rope_parameters"] = {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta,
                                  "partial_rotary_factor": spec.partial_rotary_factor}
        del cfg["rope_theta"], cfg["rope_scaling"]
    if spec.architecture == "minimax_m2":  # as its checkpoints write it (MiniMaxM2Config reads rotary_dim)
        cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   intermediate_size=spec.moe_intermediate_size, rotary_dim=spec.rotary_dim, use_qk_norm=True,
                   qk_norm_type="per_layer", scoring_func="sigmoid", use_routing_bias=True, pad_token_id=None,
                   bos_token_id=None, eos_token_id=None)
    if spec.architecture == "seed_oss":
        cfg.update(attention_bias=spec.attention_bias, attention_out_bias=spec.o_proj_bias,
                   pad_token_id=None, attention_dropout=0.0, residual_dropout=0.0)
    if spec.architecture in ("exaone_moe", "hy_v3"):  # (transformers follows mlp_layer_types over first_k_dense_replace)
        cfg["mlp_layer_types"] = ["dense" if i in spec.mlp_only_layers else "sparse" for i in range(spec.n_layers)]
    if spec.architecture in ("exaone4", "exaone_moe"):
        cfg.update(sliding_window=spec.sliding_window,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
        if spec.sliding_window is None:
            cfg["sliding_window_pattern"] = 0
    if spec.architecture == "ministral":
        cfg.update(sliding_window=spec.sliding_window,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
    if spec.architecture == "gemma3":
        cfg["model_type"] = "gemma3_text"
        cfg["rope_parameters"] = {
            "full_attention": {**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": spec.rope_local_theta or spec.rope_theta}}
        del cfg["rope_theta"], cfg["rope_scaling"]
    if spec.architecture in GEMMA2_LIKE:
        act = lnf.hf_activation(spec.activation or "gelu_tanh")
        cfg.update(hidden_act=act, hidden_activation=act, query_pre_attn_scalar=spec.query_pre_attn_scalar,
                   attn_logit_softcapping=spec.attn_logit_softcapping,
                   final_logit_softcapping=spec.final_logit_softcapping, sliding_window=spec.sliding_window)
        if spec.sliding_window is None:  # every layer full (the default alternates sliding ones); transformers
            # builds the sliding mask regardless, so it still needs a window
            cfg.update(layer_types=["full_attention"] * spec.n_layers, sliding_window=spec.max_position)
    if spec.architecture == "gemma":  # hidden_act for transformers 5, hidden_activation for 4.x
        act = lnf.hf_activation(spec.activation or "gelu_tanh")
        cfg.update(hidden_act=act, hidden_activation=act)
    if spec.architecture == "arcee":
        cfg.update(attention_bias=spec.attention_bias, pad_token_id=None, hidden_act=lnf.hf_activation(spec.activation))
    if spec.architecture in ("glm", "glm4"):
        cfg.update(attention_bias=spec.attention_bias, pad_token_id=None,
                   rope_parameters={**(spec.rope_scaling or {"rope_type": "default"}), "rope_theta": spec.rope_theta,
                                    "partial_rotary_factor": spec.partial_rotary_factor})
        del cfg["rope_theta"], cfg["rope_scaling"]
    if spec.architecture == "phimoe":
        cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   intermediate_size=spec.moe_intermediate_size, router_jitter_noise=spec.router_jitter_eps,
                   lm_head_bias=bool(spec.head_bias), attention_bias=spec.attention_bias, pad_token_id=None,
                   bos_token_id=None, eos_token_id=None)
        if spec.rope_type == "longrope":
            cfg["original_max_position_embeddings"] = (spec.rope_scaling or {})["original_max_position_embeddings"]
    if spec.architecture == "phi3":
        # Phi3Config's default pad_token_id (32000) is the padding_idx of its embedding: out of a smaller vocab
        cfg.update(partial_rotary_factor=spec.partial_rotary_factor, pad_token_id=None)
        if spec.rope_type == "longrope":  # Phi3Config reads this top-level key before the RoPE dict's
            cfg["original_max_position_embeddings"] = (spec.rope_scaling or {})["original_max_position_embeddings"]
    if spec.architecture in MLP_BIAS_ARCHS and not mistral:
        cfg["mlp_bias"] = bool(spec.mlp_has_bias)
    if spec.architecture == "qwen2_moe":
        cfg["qkv_bias"] = spec.attention_bias
    if spec.architecture == "gpt_oss":
        cfg.update(attention_bias=spec.attention_bias, num_local_experts=spec.n_experts,
                   num_experts_per_tok=spec.n_experts_per_tok, intermediate_size=spec.moe_intermediate_size,
                   swiglu_limit=spec.swiglu_limit, swiglu_alpha=spec.swiglu_alpha,
                   rope_parameters={**(spec.rope_scaling or {"rope_type": "default"}),
                                    "rope_theta": spec.rope_theta},
                   sliding_window=spec.sliding_window,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
        del cfg["rope_theta"], cfg["rope_scaling"]
    if spec.architecture == "mixtral":
        cfg.update(num_local_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   intermediate_size=spec.moe_intermediate_size, router_jitter_noise=0.0)
    elif spec.architecture in ("olmoe", "flex_olmo"):
        cfg.update(num_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                   attention_bias=spec.attention_bias, pad_token_id=None)
        if spec.architecture == "olmoe":
            cfg["clip_qkv"] = spec.clip_qkv
    elif spec.architecture == "aria_text":  # (AriaTextConfig: the experts' width is intermediate_size)
        if spec.shared_expert_intermediate_size % spec.moe_intermediate_size or spec.mlp_only_layers \
                or spec.decoder_sparse_step != 1 or spec.intermediate_size != spec.moe_intermediate_size:
            raise ModelError("aria_text: every layer has experts intermediate_size wide and n x that shared")
        cfg.update(moe_num_experts=spec.n_experts, moe_topk=spec.n_experts_per_tok,
                   moe_num_shared_experts=spec.shared_expert_intermediate_size // spec.moe_intermediate_size,
                   attention_bias=spec.attention_bias)
    elif spec.architecture in MOE_ARCHS and spec.architecture not in (*GRANITE_ARCHS, "mellum"):
        cfg.update(num_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_per_tok,
                   moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=spec.norm_topk_prob,
                   decoder_sparse_step=spec.decoder_sparse_step, mlp_only_layers=list(spec.mlp_only_layers))
        if spec.architecture == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = spec.shared_expert_intermediate_size
    if spec.architecture in SIGMOID_ROUTER_ARCHS:  # Flint, Kolibri 1: their layer types always written
        cfg.update(shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
                   sliding_window=spec.sliding_window,
                   layer_types=["full_attention" if spec.layer_window(i) is None else "sliding_attention"
                                for i in range(spec.n_layers)])
        if spec.architecture == "kolibri1":  # (no dense width, no dense layers in Kolibri1Config)
            for key in ("intermediate_size", "decoder_sparse_step", "mlp_only_layers"):
                del cfg[key]
        else:
            cfg["attention_bias"] = spec.attention_bias
    if spec.sliding_window is not None:
        cfg["sliding_window"] = spec.sliding_window
        types = ["full_attention" if i in spec.full_attention_layers else "sliding_attention"
                 for i in range(spec.n_layers)]
        if spec.architecture in GEMMA2_LIKE:
            cfg["layer_types"] = types
        elif spec.architecture in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
            cfg.update(use_sliding_window=True, max_window_layers=0)
            if spec.architecture != "qwen3_moe":
                cfg["layer_types"] = types
    if spec.bos_token_id is not None:
        cfg["bos_token_id"] = spec.bos_token_id
    if spec.eos_token_id is not None:
        cfg["eos_token_id"] = spec.eos_token_id
    if spec.layer_norm:
        return lnf.hf_config(spec, cfg)
    if spec.architecture in lv.VARIANT_ARCHS:
        return lv.hf_config(spec, cfg)
    return cfg
