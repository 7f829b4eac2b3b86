"""Every architecture this project runs, against transformers on the same random weights: logits, greedy ids, speed.

For each family a random checkpoint is built and written by transformers itself (weights widened so that every one
matters), then read by :func:`dualpath.model.loader.load_model`. The script prefills a prompt over a paged KV pool,
decodes greedily one token per step through the paged decode path (what ``dualpath generate`` runs), and compares
with transformers' own forward (logits at every prompt position) and ``generate`` (greedy, its own KV cache):

* ``max_abs_logit_diff``: prompt logits, ours vs transformers (fp32);
* ``greedy_equal`` / ``first_divergence``: the generated ids;
* ``ours_tok_s`` / ``hf_tok_s`` and ``speed_ratio`` (ours / transformers): end-to-end generation on this machine,
  both timed in the same process, alternating, median of ``--repeats``.

Nothing downloads. Run: ``python benchmarks/model_families.py [--families gpt2,phi] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

V = 512
BASE = {"vocab_size": V, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 4, "max_position_embeddings": 512, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": None}
GPT2 = {"vocab_size": V, "n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 512, "bos_token_id": None,
        "eos_token_id": None}
#: family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", BASE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", BASE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(BASE, sliding_window=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(BASE, head_dim=32, sliding_window=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", BASE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(GPT2, rotary_dim=16)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(GPT2, rotary_dim=16)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                {"vocab_size": V, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 512,
                 "attention_types": [[["global", "local"], 2]], "window_size": 16, "bos_token_id": None,
                 "eos_token_id": None}),
    "opt_350m_style": ("OPTConfig", "OPTForCausalLM", dict(BASE, ffn_dim=256, num_key_value_heads=None,
                                                           do_layer_norm_before=False, word_embed_proj_dim=64)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT2),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(BASE, num_key_value_heads=None)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(BASE, ffn_dim=256, num_key_value_heads=None)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(BASE, qk_layernorm=True)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(BASE, qk_layernorm=True)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(BASE, sliding_window=16)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(BASE, use_qk_norm=True, logit_scale=1.0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(BASE, sliding_window=16, logit_scale=1.0)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(BASE, ffn_hidden_size=256, new_decoder_architecture=True, num_kv_heads=2)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(BASE, head_dim=32)),
    "bloom": ("BloomConfig", "BloomForCausalLM", {k: v for k, v in GPT2.items() if k != "n_positions"}),
    "mpt": ("MptConfig", "MptForCausalLM", {"vocab_size": V, "d_model": 128, "n_heads": 4, "n_layers": 4,
                                            "max_seq_len": 512, "bos_token_id": None, "eos_token_id": None,
                                            "pad_token_id": None}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(BASE, head_dim=32)),
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(BASE, head_dim=32)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", BASE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", BASE),
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM",
                    dict(BASE, sliding_window=16, layer_rope_theta=[10000.0, 50000.0, 0.0, 50000.0])),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(BASE, clip_qkv=8.0)),
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(BASE, head_dim=32)),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(BASE, head_dim=32, num_key_value_heads=2)),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM",
                         dict(BASE, head_dim=32, rope_parameters={"rope_type": "dynamic", "alpha": 50.0,
                                                                  "factor": 1.0, "rope_theta": 10000.0})),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM",
                   dict(BASE, head_dim=32, rope_parameters={
                       "type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "llama_4_scaling_beta": 0.1})),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(BASE, head_dim=32)),
    "jais2": ("Jais2Config", "Jais2ForCausalLM", dict(BASE, head_dim=32)),
    "cwm": ("CwmConfig", "CwmForCausalLM", dict(BASE, head_dim=32, sliding_window=16, bos_token_id=1)),
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(BASE, head_dim=32, sliding_window=16)),
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(BASE, num_key_value_heads=4)),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(BASE, intermediate_size=64, intermediate_size_mlp=256, num_local_experts=4,
                         num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=32, attention_chunk_size=32)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(BASE, intermediate_size=64, num_local_experts=4, shared_intermediate_size=128,
                              embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5,
                              logits_scaling=2.0)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(BASE, intermediate_size=64, num_local_experts=4, shared_intermediate_size=128,
                            embedding_multiplier=2.0, attention_multiplier=0.1, residual_multiplier=0.5,
                            logits_scaling=2.0, sliding_window=16, layer_rope_theta=[10000.0, 0.0, 10000.0, 10000.0])),
    # GLM-4.5's MoE block under other attentions; ERNIE's and Hunyuan's fp32 routers; Trinity's gated attention;
    # K-EXAONE; Mellum's RoPE base per layer type; FlexOlmo; HyperCLOVA X's Peri-LN; Youtu-LLM's MLA with dense MLPs
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(BASE, head_dim=32, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                   topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.0)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(BASE, moe_num_experts=8, moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(BASE, head_dim=32, intermediate_size=64, num_experts=8, moe_topk=2)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   dict({k: v for k, v in BASE.items() if k != "intermediate_size"}, head_dim=32,
                        moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(BASE, intermediate_size=64, num_experts=8, num_experts_per_tok=2)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(BASE, head_dim=32, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                   num_shared_experts=1, sliding_window=16, global_attn_every_n_layers=2, mup_enabled=True)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   dict(BASE, head_dim=32, sliding_window=16, moe_intermediate_size=64, num_experts=8,
                        num_experts_per_tok=2)),
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM",
              dict(BASE, head_dim=32, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                   num_shared_experts=1)),
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             {"vocab_size": V, "d_model": 128, "n_heads": 4, "n_layers": 4, "max_seq_len": 512,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
              "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 8, "moe_top_k": 2}}),
    "flint": ("FlintConfig", "FlintForCausalLM",
              dict(BASE, head_dim=32, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                   shared_expert_intermediate_size=96, sliding_window=16)),
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM",
                 dict({k: v for k, v in BASE.items() if k != "intermediate_size"}, head_dim=32,
                      moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=96, sliding_window=16, norm_topk_prob=True)),
    "mellum": ("MellumConfig", "MellumForCausalLM",
               dict(BASE, head_dim=32, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)),
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM",
                    dict(BASE, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=0.5)),
    "youtu": ("YoutuConfig", "YoutuForCausalLM",
              dict(BASE, num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                   v_head_dim=32, q_lora_rank=48)),
    # A.X-K1: DeepSeek-V3's MLA and grouped sigmoid router (a dense layer 0), an RMSNorm on each MoE output
    "axk1": ("AXK1Config", "AXK1ForCausalLM",
             dict(BASE, num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, q_lora_rank=48, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=2, topk_group=1, mlp_layer_types=["dense"] + ["sparse"] * 3)),
    # Qwen3-VL-MoE's language model (the vision tower is built by transformers, not loaded here; text prompts)
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
                     {"text_config": dict(BASE, head_dim=32, moe_intermediate_size=64, num_experts=8,
                                          num_experts_per_tok=2),
                      "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                        "out_hidden_size": 128, "deepstack_visual_indexes": [0]}}),
    # ERNIE 4.5 VL's language model: its text experts (the vision ones and their router are built, not loaded)
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeConfig", "Ernie4_5_VLMoeForConditionalGeneration",
                        {"text_config": dict(BASE, moe_intermediate_size=[64, 32], moe_num_experts=8, moe_k=2,
                                             moe_num_shared_experts=1,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [6, 6, 4]}),
                         "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2}}),
    # Command A+: Cohere 2's parallel block over dense prefix layers and softmax-routed experts with a shared one
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    dict(BASE, head_dim=32, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                         num_shared_experts=1, prefix_dense_intermediate_size=128, first_k_dense_replace=1,
                         sliding_window=16, logit_scale=1.0)),
    # Aria's language model: Llama attention over softmax top-k experts (stored x @ w) and a shared MLP
    "aria_text": ("AriaTextConfig", "AriaTextForCausalLM",
                  dict(BASE, intermediate_size=64, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1)),
    # Phi-4-multimodal's Phi-3 decoder (partial RoPE; its image and audio embedders built, not loaded)
    "phi4_multimodal": ("Phi4MultimodalConfig", "Phi4MultimodalForCausalLM",
                        dict(BASE, partial_rotary_factor=0.75,
                             vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
                             audio_config={"hidden_size": 32, "intermediate_size": 64, "num_blocks": 1,
                                           "num_attention_heads": 2})),
    # BitNet b1.58 (unquantized): sub-norms before o_proj and down_proj, ReLU-squared GLU
    "bitnet": ("BitNetConfig", "BitNetForCausalLM", BASE),
    # GPT-NeoX-Japanese: no biases but the last layer's output projection's
    "gpt_neox_japanese": ("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM",
                          {"vocab_size": V, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                           "intermediate_multiple_size": 2, "max_position_embeddings": 512, "bos_token_id": None,
                           "eos_token_id": None}),
    # DiffLlama: differential attention (two value halves per head)
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", dict(BASE, num_attention_heads=8, num_key_value_heads=4,
                                                                   head_dim=16)),
    # Persimmon: fused per-head q/k/v, shared q/k LayerNorms, half-head RoPE, ReLU-squared MLP
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(BASE)),
    # CTRL: its sinusoids after scaled embeddings, a biased LM head over tied embeddings
    "ctrl": ("CTRLConfig", "CTRLLMHeadModel",
             {"vocab_size": V, "n_embd": 128, "n_layer": 4, "n_head": 4, "dff": 256, "n_positions": 512}),
    # GPT-1 (post-norm blocks), BioGPT and XGLM (fairseq's decoder: scaled embeddings, learned or sinusoidal positions)
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", dict(GPT2, afn="gelu")),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(BASE, pad_token_id=1)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM",
             {"vocab_size": V, "d_model": 128, "num_layers": 4, "attention_heads": 4, "ffn_dim": 256,
              "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": None}),
    # ModernBERT decoder (Ettin): normed embeddings, global / local layers, GLU MLP, ModernBERT's prediction head
    "modernbert_decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM",
                           dict(BASE, local_attention=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                cls_token_id=2, sep_token_id=1)),
    # Gemma 4 (E2B-like): wider full layers with keys as values, shared-KV layers, per-layer embeddings, a MoE block
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",
               dict(BASE, num_hidden_layers=6, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                    attention_k_eq_v=True, sliding_window=16, hidden_size_per_layer_input=16,
                    layer_types=["sliding_attention", "full_attention"] * 3,
                    vocab_size_per_layer_input=V, num_kv_shared_layers=2, use_double_wide_mlp=True,
                    enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=64,
                    final_logit_softcapping=30.0)),
    # MiMo-V2-Flash: sliding layers with twice the KV heads and sinks, values narrower than keys, grouped router
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
                      dict(BASE, num_attention_heads=8, head_dim=48, v_head_dim=32, sliding_window=16,
                           moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                           topk_group=1)),
    # Gemma 3n (E2B-like): AltUp's four streams, Laurel, sparse gates, per-layer embeddings, shared-KV layers
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM",
                dict(BASE, num_hidden_layers=6, head_dim=32, sliding_window=16, hidden_size_per_layer_input=16,
                     vocab_size_per_layer_input=V, num_kv_shared_layers=2, laurel_rank=16,
                     activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
                     layer_types=["sliding_attention", "full_attention"] * 3)),
    # Laguna: query heads per layer, softplus-gated attention output, soft-capped sigmoid router, shared expert
    "laguna": ("LagunaConfig", "LagunaForCausalLM",
               dict(BASE, head_dim=32, num_attention_heads_per_layer=[4, 8, 2, 4], sliding_window=16,
                    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                    shared_expert_intermediate_size=64, moe_router_logit_softcapping=3.0)),
    # JetMoE: attention experts (per-slot queries over shared keys and values) and GLU MLP experts
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM",
               {"vocab_size": V, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 4,
                "num_key_value_heads": 2, "kv_channels": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
                "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": None}),
    # Gemma 4 31B-like: dense, full layers twice as wide
    "gemma4_dense": ("Gemma4TextConfig", "Gemma4ForCausalLM",
                     dict(BASE, head_dim=32, global_head_dim=64, sliding_window=16, hidden_size_per_layer_input=0)),
}


def _hf_model(family: str) -> Any:
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = {k: v for k, v in kw.items() if v is not None or k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**cfg)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or ".ln_" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(4.0)
    return hf


def _ours_generate(model: Any, prompt: list[int], n: int) -> list[int]:
    from dualpath.model import KVPool, SeqBatch

    bt = 16
    total = len(prompt) + n
    pool = KVPool(model.spec.kv_spec(), num_blocks=-(-total // bt), block_tokens=bt)
    table = pool.allocate(pool.blocks_for_tokens(total))
    out = [int(model(SeqBatch.build([prompt], [0], [table], bt), pool.layers).argmax(-1)[0])]
    tables = torch.tensor([table], dtype=torch.int32)
    pos = len(prompt)
    while len(out) < n:
        logits = model.decode_step(torch.tensor([out[-1]]), torch.tensor([pos]), tables, pool.layers)
        out.append(int(logits.argmax(-1)[0]))
        pos += 1
    return out


def run_family(family: str, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    hf = _hf_model(family)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(LlamaModelConfig(path=d, attention_backend="torch"), with_tokenizer=False)[0]
    prompt = torch.randint(0, V, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    from dualpath.model import KVPool, SeqBatch

    pool = KVPool(ours.spec.kv_spec(), num_blocks=-(-prompt_len // 16), block_tokens=16)
    got = ours(SeqBatch.build([prompt], [0], [pool.allocate(-(-prompt_len // 16))], 16), pool.layers,
               all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    diff = float((got - ref).abs().max())

    def hf_generate() -> list[int]:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        return [int(x) for x in ids[0, prompt_len:]]

    ours_ids, hf_ids = _ours_generate(ours, prompt, new_tokens), hf_generate()  # (warm-up as well)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ours_generate(ours, prompt, new_tokens)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_generate()
        t_hf.append(time.perf_counter() - t0)
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, hf_ids, strict=True)) if a != b), None)
    ours_tok_s = new_tokens / statistics.median(t_ours)
    hf_tok_s = new_tokens / statistics.median(t_hf)
    return {"family": family, "architecture": ours.spec.architecture, "max_abs_logit_diff": diff,
            "logit_scale": float(ref.abs().max()), "greedy_equal": first is None, "first_divergence": first,
            "ours_tok_s": round(ours_tok_s, 1), "hf_tok_s": round(hf_tok_s, 1),
            "speed_ratio": round(ours_tok_s / hf_tok_s, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for family in args.families.split(","):
        if family not in FAMILIES:
            parser.error(f"unknown family {family!r}; expected some of {', '.join(FAMILIES)}")
        r = run_family(family, args.prompt_len, args.new_tokens, args.repeats)
        rows.append(r)
        print(f"{family:12s} max|dlogit| {r['max_abs_logit_diff']:.2e} (logits up to {r['logit_scale']:5.1f})  "
              f"greedy {'equal' if r['greedy_equal'] else 'DIVERGES at ' + str(r['first_divergence']):9s}  "
              f"{r['ours_tok_s']:7.1f} vs {r['hf_tok_s']:7.1f} tok/s  ratio {r['speed_ratio']:.2f}", flush=True)
    bad = [r["family"] for r in rows if not r["greedy_equal"] or r["max_abs_logit_diff"] > 1e-3]
    summary = {"families": len(rows), "all_equal": not bad, "mismatched": bad,
               "speed_ratio_median": statistics.median(r["speed_ratio"] for r in rows), "rows": rows,
               "command": "python benchmarks/model_families.py " + " ".join(argv or sys.argv[1:])}
    print(f"{len(rows)} families, {'all equal to transformers' if not bad else 'MISMATCHED: ' + ', '.join(bad)}; "
          f"median speed ours / transformers {summary['speed_ratio_median']:.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
