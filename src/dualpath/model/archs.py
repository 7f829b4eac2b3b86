"""The architectures :class:`dualpath.model.spec.ModelSpec` reads (Hugging Face class name -> our name, and back),
the groups of them that share a mechanism, and the families refused on purpose, with the reason.

Adding a family starts here: its class name in :data:`ARCHITECTURES` and :data:`_HF_ARCH`, and its name in the
groups whose mechanisms it uses.
"""

from __future__ import annotations

from typing import Any

from dualpath.model import layernorm_family as lnf
from dualpath.model import llama_variants as lv

#: Qwen's hybrid decoders (dualpath.model.qwen_hybrid): our name -> the Hugging Face class
HYBRID_HF_ARCH = {"qwen3_5_text": "Qwen3_5ForCausalLM", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
                  "qwen3_next": "Qwen3NextForCausalLM"}
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GptOssForCausalLM": "gpt_oss",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    "SmolLM3ForCausalLM": "smollm3",
    "GraniteForCausalLM": "granite",
    "GraniteMoeForCausalLM": "granitemoe",
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
    "GraniteSWAForCausalLM": "granite_swa",
    "GraniteMoeSWAForCausalLM": "granitemoe_swa",
    "MinistralForCausalLM": "ministral",
    "Glm4MoeForCausalLM": "glm4_moe",
    "Dots1ForCausalLM": "dots1",
    "SolarOpenForCausalLM": "solar_open",
    "AfmoeForCausalLM": "afmoe",
    "ExaoneMoeForCausalLM": "exaone_moe",
    "HYV3ForCausalLM": "hy_v3",
    "FlintForCausalLM": "flint",
    "Kolibri1ForCausalLM": "kolibri1",
    "MellumForCausalLM": "mellum",
    "HyperCLOVAXForCausalLM": "hyperclovax",
    "FlexOlmoForCausalLM": "flex_olmo",
    "MiniMaxM2ForCausalLM": "minimax_m2",
    "PhimoeForCausalLM": "phimoe",
    "OlmoeForCausalLM": "olmoe",
    "Exaone4ForCausalLM": "exaone4",
    "SeedOssForCausalLM": "seed_oss",
    "GlmForCausalLM": "glm",
    "ArceeForCausalLM": "arcee",
    "Glm4ForCausalLM": "glm4",
    "AriaTextForCausalLM": "aria_text",
    "DiffLlamaForCausalLM": "diffllama",  # (dualpath.model.diffllama)
    "JetMoeForCausalLM": "jetmoe",  # (dualpath.model.jetmoe)
    "Gemma4ForCausalLM": "gemma4_text",  # (dualpath.model.gemma4)
    "Gemma4UnifiedForCausalLM": "gemma4_text",
    "Gemma3nForCausalLM": "gemma3n_text",  # (dualpath.model.gemma3n)
    "MiMoV2FlashForCausalLM": "mimo_v2_flash",  # (dualpath.model.mimo_v2)
    "LagunaForCausalLM": "laguna",  # (dualpath.model.laguna)
    "MiniMaxM3VLForCausalLM": "minimax_m3_vl_text",  # (dualpath.model.minimax_m3)
    "Step3p7ForConditionalGeneration": "step3p5",  # (dualpath.model.step3p7: its language model)
    "HrmTextForCausalLM": "hrm_text",  # (dualpath.model.hrm_text)
    "DeepseekOcr2ForConditionalGeneration": "deepseek_ocr2_text",  # (dualpath.model.deepseek_ocr2)
    "MuseGlimmerForConditionalGeneration": "muse_glimmer_text",  # (dualpath.model.muse_glimmer)
    "MuseSparkForConditionalGeneration": "muse_spark_text",  # (dualpath.model.muse_glimmer: its MoE variant)
    "ChameleonForConditionalGeneration": "chameleon",  # (dualpath.model.chameleon)
    "Molmo2ForConditionalGeneration": "molmo2_text",  # (dualpath.model.molmo2: its language model)
    "Kosmos2_5ForConditionalGeneration": "kosmos2_5_text",  # (dualpath.model.kosmos2_5: its language model)
    "GitForCausalLM": "git",  # (dualpath.model.git: its text decoder)
    "BeamForCausalLM": "beam",  # (dualpath.model.beam)
    "ModernBertDecoderForCausalLM": "modernbert-decoder",  # (dualpath.model.modernbert_decoder)
    **{hf: ours for ours, hf in HYBRID_HF_ARCH.items()},  # Qwen3.5, Qwen3.5-MoE, Qwen3-Next (dualpath.model.qwen_hybrid)
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",  # (dualpath.model.granite_hybrid)
    "BambaForCausalLM": "bamba",
    "NemotronHForCausalLM": "nemotron_h",  # (dualpath.model.nemotron_h)
    "Mamba2ForCausalLM": "mamba2",
    "MambaForCausalLM": "mamba",  # (dualpath.model.mamba1)
    "FalconMambaForCausalLM": "falcon_mamba",
    "JambaForCausalLM": "jamba",  # (dualpath.model.jamba)
    "OlmoHybridForCausalLM": "olmo_hybrid",  # (dualpath.model.olmo_hybrid)
    "FalconH1ForCausalLM": "falcon_h1",  # (dualpath.model.falcon_h1)
    "MiniMaxForCausalLM": "minimax",  # (dualpath.model.minimax)
    "Lfm2ForCausalLM": "lfm2",  # (dualpath.model.lfm2)
    "Lfm2MoeForCausalLM": "lfm2_moe",
    "Lfm3ForCausalLM": "lfm3",
    "LaraMiniForCausalLM": "lara_mini",  # (dualpath.model.lara_mini)
    "RecurrentGemmaForCausalLM": "recurrent_gemma",  # (dualpath.model.recurrent_gemma)
    "Zamba2ForCausalLM": "zamba2",  # (dualpath.model.zamba2)
    "DeepseekV4ForCausalLM": "deepseek_v4",  # (dualpath.model.deepseek_v4)
    "ZambaForCausalLM": "zamba",  # (dualpath.model.zamba)
    "RwkvForCausalLM": "rwkv",  # (dualpath.model.rwkv)
    "ZayaForCausalLM": "zaya",  # (dualpath.model.zaya)
    "InklingForCausalLM": "inkling_text",  # (dualpath.model.inkling)
    "DoryForCausalLM": "dory",  # (dualpath.model.dory)
    "Qwen4ExpForCausalLM": "qwen4_exp_text",  # (dualpath.model.qwen4_exp)
    "DogeForCausalLM": "doge",  # (dualpath.model.doge)
    **lnf.ARCHITECTURES,  # GPT-2, GPT-NeoX, Phi, StableLM, StarCoder 2 (dualpath.model.layernorm_family)
    **lv.ARCHITECTURES,  # the one-twist Llamas and Llama 4 (dualpath.model.llama_variants)
}
_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "gemma3": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "olmo3": "Olmo3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
            "granitemoe": "GraniteMoeForCausalLM", "granitemoeshared": "GraniteMoeSharedForCausalLM",
            "granite_swa": "GraniteSWAForCausalLM", "granitemoe_swa": "GraniteMoeSWAForCausalLM",
            "ministral": "MinistralForCausalLM", "glm4_moe": "Glm4MoeForCausalLM", "dots1": "Dots1ForCausalLM",
            "solar_open": "SolarOpenForCausalLM", "flex_olmo": "FlexOlmoForCausalLM", "afmoe": "AfmoeForCausalLM",
            "exaone_moe": "ExaoneMoeForCausalLM", "mellum": "MellumForCausalLM", "hy_v3": "HYV3ForCausalLM",
            "flint": "FlintForCausalLM", "kolibri1": "Kolibri1ForCausalLM", "aria_text": "AriaTextForCausalLM",
            "gemma4_text": "Gemma4ForCausalLM", "mimo_v2_flash": "MiMoV2FlashForCausalLM",
            "gemma3n_text": "Gemma3nForCausalLM", "laguna": "LagunaForCausalLM", "minimax_m3_vl_text": "MiniMaxM3VLForCausalLM",
            "step3p5": "Step3p7ForConditionalGeneration", "hrm_text": "HrmTextForCausalLM",
            "deepseek_ocr2_text": "DeepseekOcr2ForConditionalGeneration",
            "muse_glimmer_text": "MuseGlimmerForConditionalGeneration",
            "muse_spark_text": "MuseSparkForConditionalGeneration",
            "chameleon": "ChameleonForConditionalGeneration", "molmo2_text": "Molmo2ForConditionalGeneration",
            "kosmos2_5_text": "Kosmos2_5ForConditionalGeneration", "git": "GitForCausalLM",
            "beam": "BeamForCausalLM", "diffllama": "DiffLlamaForCausalLM",
            "jetmoe": "JetMoeForCausalLM",
            "modernbert-decoder": "ModernBertDecoderForCausalLM",
            "hyperclovax": "HyperCLOVAXForCausalLM",
            "minimax_m2": "MiniMaxM2ForCausalLM", "phimoe": "PhimoeForCausalLM", "olmoe": "OlmoeForCausalLM", "exaone4": "Exaone4ForCausalLM",
            "seed_oss": "SeedOssForCausalLM", "glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "arcee": "ArceeForCausalLM",
            **lnf.HF_ARCH, **lv.HF_ARCH, **HYBRID_HF_ARCH,
            "granitemoehybrid": "GraniteMoeHybridForCausalLM", "bamba": "BambaForCausalLM", "nemotron_h": "NemotronHForCausalLM", "mamba2": "Mamba2ForCausalLM", "mamba": "MambaForCausalLM",
            "falcon_mamba": "FalconMambaForCausalLM", "jamba": "JambaForCausalLM",
            "olmo_hybrid": "OlmoHybridForCausalLM", "falcon_h1": "FalconH1ForCausalLM",
            "minimax": "MiniMaxForCausalLM",
            "lfm2": "Lfm2ForCausalLM", "lfm2_moe": "Lfm2MoeForCausalLM", "lfm3": "Lfm3ForCausalLM",
            "lara_mini": "LaraMiniForCausalLM", "recurrent_gemma": "RecurrentGemmaForCausalLM",
            "zamba2": "Zamba2ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM",
            "zamba": "ZambaForCausalLM", "rwkv": "RwkvForCausalLM",
            "zaya": "ZayaForCausalLM", "inkling_text": "InklingForCausalLM",
            "dory": "DoryForCausalLM", "qwen4_exp_text": "Qwen4ExpForCausalLM", "doge": "DogeForCausalLM"}
#: Gemma 2's attention and logit settings (part of the spec's identity only when set)
_GEMMA2_FIELDS = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
#: Gemma 2's attention, scalings and soft caps: Gemma 2, Gemma 3 and VaultGemma (Gemma 2's layers with only the
#: input and pre-MLP norms, a Llama-shaped block)
GEMMA2_LIKE = ("gemma2", "gemma3", "vaultgemma")
#: the softmax-router MoE architectures (their MoE fields are part of the spec's identity)
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "granitemoe_swa", "phimoe", "flex_olmo",
             "mellum", "flint", "kolibri1", "aria_text")
#: Qwen3-MoE's experts under an fp32 sigmoid router (the top k by logit, plus Kolibri 1's correction bias; weights
#: the sigmoid of those logits, renormalized with ``norm_topk_prob``) and an ungated shared expert: Flint, Kolibri 1
SIGMOID_ROUTER_ARCHS = ("flint", "kolibri1")
#: Granite's scalings and its MoE versions (GraniteMoE: Mixtral's experts under a top-k-then-softmax router; Shared:
#: plus an ungated shared expert)
GRANITE_ARCHS = ("granite", "granitemoe", "granitemoeshared", "granitemoe_swa")
#: granite-swash (GraniteSWA, GraniteMoeSWA): Granite's blocks with sliding layers, gpt-oss's attention sinks and a
#: RoPE base per layer
GRANITE_SWA = ("granite_swa", "granitemoe_swa")
#: every architecture with Granite's four scalings: Granite's, HyperCLOVA X's (its logits multiplied, not divided) and
#: granite-swash's
GRANITE_SCALED = (*GRANITE_ARCHS, "hyperclovax", "granite_swa")
#: the families whose dense MLP (and shared experts: Aria, Hy3) takes ``mlp_bias`` as transformers builds it
#: (biases on its projections; routed experts never); the Llama variants read theirs in ``llama_variants``
MLP_BIAS_ARCHS = ("llama", "granite", "granite_swa", "hyperclovax", "seed_oss", "smollm3", "arcee", "aria_text", "hy_v3")
#: every architecture with routed experts: the softmax-router ones and gpt-oss (its own router and experts)
ALL_MOE_ARCHS = (*MOE_ARCHS, "gpt_oss", "glm4_moe", "dots1", "solar_open", "afmoe", "exaone_moe", "hy_v3", "minimax_m2", "llama4_text",
                 "ernie4_5_moe", "dbrx",
                 "hunyuan_v1_moe", "cohere2_moe")
#: GLM-4.5's DeepSeek-V3 router (sigmoid scores, a correction bias for the choice, groups, a scaling factor)
_GROUP_ROUTER_FIELDS = ("n_group", "topk_group", "routed_scaling_factor")
#: the architectures routing by it: GLM-4.5, dots.llm1 (GLM-4.5's MoE under Qwen3's attention), Solar Open (under
#: Llama's, every layer), Trinity (afmoe: one group), K-EXAONE (exaone_moe), Hy3 (hy_v3: one group, under Qwen3's
#: attention), and MiniMax-M2 (one group, factor 1, no shared expert)
GROUP_ROUTER_ARCHS = ("glm4_moe", "dots1", "solar_open", "afmoe", "exaone_moe", "hy_v3", "minimax_m2")
#: gpt-oss's clamped SwiGLU (GptOssConfig's defaults): ``swiglu_limit``, ``swiglu_alpha``
_GPT_OSS_FIELDS = ("swiglu_limit", "swiglu_alpha")
#: Granite's scalings (GraniteConfig): embeddings times ``embedding_multiplier``, attention scores times
#: ``attention_multiplier`` (instead of ``head_dim ** -0.5``), each block's output times ``residual_multiplier``,
#: logits divided by ``logits_scaling``
_GRANITE_FIELDS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")
#: OLMo 2 and 3: RMSNorms over the whole q / k projections, and norms on each block's output instead of its input
_OLMO_ARCHS = ("olmo2", "olmo3", "flex_olmo")
_MOE_FIELDS = ("n_experts", "n_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "ntk_alpha")


_NO_KV = ("its recurrent state layers (this family's linear attention / state space / recurrence) are not "
          "implemented; the hybrids that run keep such a state in state pages (docs/models.md)")
#: families refused on purpose, by model_type, with the reason (docs/models.md, "Refused, by name")
_REFUSED = {
    **dict.fromkeys(("xlstm",
                     # image-text checkpoints whose language model is one of them (Nemotron-H Omni, LFM3)
                     "nemotron_h_omni",
                     # short-convolution / linear-attention state: Inkling 2, GLM-5.3-Flash (KDA with hyper-connections)
                     "inkling2", "inkling2_text", "inkling2_loop",
                     "inkling2_loop_text"), _NO_KV),
    "diffusion_gemma": "a diffusion language model (it denoises blocks of tokens attending both ways), not an "
                       "autoregressive decoder",
    **dict.fromkeys(("gemma4_assistant", "gemma4_unified_assistant"),
                    "a draft model that attends with its target model's keys and values, not a model on its own"),
    "mllama": "its cross-attention layers attend to the image's states between self-attention layers; not "
              "implemented",
    **dict.fromkeys(("idefics", "evolla"),
                    "its cross-attention layers attend to another modality's states (images, proteins) between "
                    "self-attention layers; not implemented"),
    **dict.fromkeys(("florence2", "pix2struct", "t5gemma2", "udop", "vision-encoder-decoder", "pp_formulanet",
                     "blip"),
                    "an encoder-decoder model (its decoder cross-attends to an encoder's states), not a decoder-only "
                    "LLM"),
    **dict.fromkeys(("musicgen", "musicgen_melody", "moshi", "moss_transcribe_diarize"),
                    "an audio model (parallel codebook streams, or speech in, text out through an audio encoder), "
                    "not a text decoder"),
    "blt": "a byte-level model whose local encoder and decoder cross-attend to patch states between a global "
           "transformer; its per-token state is not one KV row per layer; not implemented",
    "reformer": "LSH and chunked local attention over reversible layers: no per-token KV cache to store or move",
    "xlnet": "a permutation language model (two-stream attention with relative positions and a memory), not a causal "
             "decoder with a KV cache",
    "unlimited_ocr": "its attention keeps the whole prompt (image and text) plus a window of the tokens generated "
                     "since, a mask that depends on where the prompt ended; not implemented",
    "kosmos-2": "a grounded image-text model that has no text-only mode: transformers' forward requires the image "
                "(pixel_values or image_embeds, placed by image_embeds_position_mask), and requests here carry text",
    "cpmant": "its input attends both ways (transformers builds CPM-Ant's mask with every token as context, so a "
              "token's keys and values change as the sequence grows): no KV cache to keep or move, and transformers' "
              "own cached decode fails",
    "pi0": "a robot action policy (flow-matching action expert beside a vision-language prefix), not a text decoder",
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart", "mvp",
                     "prophetnet", "trocr", "whisper", "bert", "bert-generation", "roberta", "roberta-prelayernorm",
                     "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "electra", "ernie", "rembert",
                     "roc_bert", "roformer", "megatron-bert", "big_bird", "bigbird_pegasus", "xmod", "xlm"),
                    "an encoder's or an encoder-decoder's model (its causal-LM head decodes with bidirectional or "
                    "cross attention to an encoder), not a decoder-only LLM"),
}


def refusal_reason(archs: list[str], model_type: Any) -> str | None:
    """Why a family is refused on purpose (:data:`_REFUSED`), from its model_type or, without one, its architecture's
    name: the model_type's letters and digits followed by a head's name, nothing between (``Mamba2ForCausalLM`` is
    ``mamba2``'s; ``Ernie4_5_VLMoeForConditionalGeneration`` is not ``ernie``'s)."""
    if model_type in _REFUSED:
        return _REFUSED[str(model_type)]
    names = {_letters(a) for a in archs}
    for mt, why in _REFUSED.items():
        key = _letters(mt)
        if any(n == key + head for n in names for head in _HEADS):
            return why
    return None


_HEADS = ("forcausallm", "forconditionalgeneration", "lmheadmodel")


def _letters(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())
