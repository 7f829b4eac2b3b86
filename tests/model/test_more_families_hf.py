"""OLMo 2, OLMo 3, OLMoE, EXAONE 4, SmolLM3, Ministral, Seed-OSS, Granite, Arcee, GLM, GLM-4, GLM-4.5, dots.llm1, Solar
Open, FlexOlmo, Trinity (afmoe), K-EXAONE, Mellum and HyperCLOVA X against transformers on the same random weights, saved by transformers' own
``save_pretrained``: logits at every prefill and greedy decode step of several turns over our paged KV, batched
sequences, bf16, our own ``save_pretrained`` read back by transformers, and the configs we refuse.

What each family adds to the Llama path: OLMo 2 norms each block's output instead of its input and normalises the
whole q / k projections (fp32-scaled norms); OLMoE keeps pre-norm blocks with whole-projection q/k norms, clips
q/k/v and routes every layer to softmax experts; EXAONE 4 has OLMo 2's blocks with per-head q/k norms, sliding layers
and full layers without RoPE; Seed-OSS switches o_proj's bias apart from q/k/v's; OLMo 3 adds sliding layers (three of four) with their own RoPE base;
SmolLM3 leaves RoPE out of every fourth layer (NoPE), optionally sliding there; Ministral is Mistral with sliding
and full layers as ``layer_types`` says; Granite scales embeddings, scores,
residual branches and logits; GLM fuses gate/up, biases q/k/v and turns interleaved RoPE pairs on half of each head,
GLM-4 adds norms on the attention's and MLP's outputs; Arcee's MLP is ReLU squared, not gated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    cluster_read_paths,
    hf_logits,
    random_turns,
    two_sequences,
)
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "num_hidden_layers": 4}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(BASE, attention_bias=True, rope_theta=5000.0)),
    # layers 0-2 slide over 5 tokens with base 10,000; layer 3 attends fully with YaRN x2 over base 500,000
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
              dict(BASE, sliding_window=5, rope_parameters={
                  "full_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 500000.0,
                                     "original_max_position_embeddings": 128},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # layer 3 has no RoPE and slides over 5 tokens; q/k/v/o biases; tied embeddings (SmolLM3Config's default)
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM",
                dict(BASE, use_sliding_window=True, sliding_window=5, attention_bias=True, pad_token_id=None,
                     bos_token_id=None, eos_token_id=None)),
    # layers 0 and 2 slide over 5 tokens, 1 and 3 attend fully
    "ministral": ("MinistralConfig", "MinistralForCausalLM",
                  dict(BASE, sliding_window=5, head_dim=16, layer_types=["sliding_attention", "full_attention"] * 2)),
    # OLMo's whole-projection q/k norms (Llama-style pre-norm blocks), q/k/v clipped, a softmax router (top 2 of 4,
    # not renormalized) in every layer
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(BASE, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=32,
                   clip_qkv=1.5, pad_token_id=None, eos_token_id=None)),
    # OLMo 2's output norms with per-head q/k norms; layers 0-2 slide over 5 tokens with RoPE, layer 3 attends
    # fully without RoPE (sliding_window_pattern 4)
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(BASE, sliding_window=5, head_dim=16, bos_token_id=None,
                                                            eos_token_id=None)),
    # q/k/v biases with o_proj's switched on apart (attention_out_bias)
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM",
                 dict(BASE, head_dim=16, attention_out_bias=True, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)),
    # half-head RoPE, q/k norms, q/k/v biases, a dense first layer, then DeepSeek-V3's MoE (grouped sigmoid router
    # with a correction bias, a scaling factor, a shared expert); test_glm4_moe_hf.py has its own checks
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(BASE, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                      routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, num_nextn_predict_layers=0)),
    # dots.llm1: Qwen3's attention (per-head q/k norms, biases on q/k/v/o) with layer 2 sliding over 5 tokens
    # (max_window_layers), over GLM-4.5's MoE blocks after one dense layer; top-k weights not renormalized. Four
    # experts in two groups (the router picks a group, then both its experts): with more, bf16 rounding flips
    # near-tie picks on either side; glm4_moe routes among eight in fp32 through the same block
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(BASE, num_hidden_layers=3, head_dim=16, moe_intermediate_size=32, n_routed_experts=4,
                   num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=2,
                   routed_scaling_factor=2.5, attention_bias=True, sliding_window=5, max_window_layers=2)),
    # Solar Open: Llama's attention with q/k/v biases, GLM-4.5's MoE block in every layer (2 of 4 experts in one
    # group, its default; a shared expert; scaling); no dense width in its config. (Two groups flip a near-tie
    # group choice in bf16 here on either side; glm4_moe routes by groups)
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   dict({k: v for k, v in BASE.items() if k != "intermediate_size"}, num_hidden_layers=3, head_dim=16,
                        moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                        n_shared_experts=1, routed_scaling_factor=2.0, attention_bias=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Trinity (afmoe): per-head q/k norms, layers 0 and 2 slide over 5 tokens with RoPE, 1 and 3 attend fully
    # without, the attention's output gated, Gemma 2's four norms (plain), muP's embedding scale, a dense layer 0,
    # then GLM-4.5's MoE block in one group (2 of 4 experts, a shared one, route_scale 2)
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                   num_shared_experts=1, num_dense_layers=1, route_scale=2.0, global_attn_every_n_layers=2,
                   sliding_window=5, mup_enabled=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    # K-EXAONE (exaone_moe): EXAONE 4's attention (layers 0-2 slide over 5 tokens with RoPE, layer 3 attends fully
    # without) in pre-norm blocks; a dense layer 0 (first_k_dense_replace), then GLM-4.5's MoE block (2 of 8 experts
    # in one group, a shared one, factor 2.5)
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   dict(BASE, head_dim=16, sliding_window=5, moe_intermediate_size=32, num_experts=8,
                        num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=1, pad_token_id=None,
                        bos_token_id=None, eos_token_id=None)),
    # Hy3 (hy_v3): Qwen3's attention (per-head q/k norms), a dense layer 0 (mlp_layer_types' default), then GLM-4.5's
    # MoE block in one group (2 of 8 experts, a shared one, router_scaling_factor 2.5), saved under Hy3's own names
    "hy_v3": ("HYV3Config", "HYV3ForCausalLM",
              dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                   num_shared_experts=1, router_scaling_factor=2.5)),
    # Flint: Qwen3-MoE's attention with fp32-scaled q/k norms and attention sinks, RoPE on the sliding layer (2, over
    # 5 tokens) only; layers 0-1 dense (mlp_only_layers' default), then an fp32 sigmoid router (2 of 4: with 8, bf16
    # rounding flips a near-tie pick (logit gap 0.006) on either side) and an ungated shared expert
    "flint": ("FlintConfig", "FlintForCausalLM",
              dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                   shared_expert_intermediate_size=48, sliding_window=5, pad_token_id=None, bos_token_id=None,
                   eos_token_id=None)),
    # Kolibri 1: EXAONE 4's attention (layers 0, 1, 3 slide over 5 tokens with RoPE, layer 2 attends fully without)
    # in GLM-4's blocks (norms on the attention's and the MLP's outputs); every layer a sigmoid router choosing by
    # logits plus a correction bias (2 of 8, renormalized) and an ungated shared expert
    "kolibri1": ("Kolibri1Config", "Kolibri1ForCausalLM",
                 dict({k: v for k, v in BASE.items() if k != "intermediate_size"}, head_dim=16, moe_intermediate_size=32,
                      num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48, sliding_window=5,
                      norm_topk_prob=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    # DBRX: its nested config; bias-free LayerNorms, a fused Wqkv clipped at 1.5, GQA; in every layer a softmax
    # router (2 of 4 experts, renormalized) over its fused w1/v1/w2 experts
    "dbrx": ("DbrxConfig", "DbrxForCausalLM",
             {"vocab_size": VOCAB, "d_model": 64, "n_heads": 4, "n_layers": 4, "max_seq_len": 256,
              "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 1.5},
              "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}}),
    # Mellum: Qwen3-MoE's attention and router; layers 0 and 2 slide over 5 tokens with base 10,000, 1 and 3 attend
    # fully with base 500,000 (rope_parameters per layer type); layer 1 dense (mlp_layer_types); 2 of 4 experts
    "mellum": ("MellumConfig", "MellumForCausalLM",
               dict(BASE, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                    sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2,
                    mlp_layer_types=["sparse", "dense", "sparse", "sparse"], attention_bias=True,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                    pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    # HyperCLOVA X: Granite's scalings with the logits multiplied, the default attention_multiplier (head_dim ** -0.5)
    # and Peri-LN (norms on the attention's and the MLP's outputs, then scaled and added)
    "hyperclovax": ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM",
                    dict(BASE, embedding_multiplier=3.0, residual_multiplier=0.6, logits_scaling=0.5,
                         attention_bias=True, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    # FlexOlmo: OLMo 2's blocks (output norms, whole-projection q/k norms) with OLMoE's softmax router, every layer
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(BASE, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, intermediate_size=32,
                       attention_bias=True, pad_token_id=None, eos_token_id=None)),
    # MiniMax-M2: OLMo 2's q/k RMSNorms over whole projections, RoPE on rotary_dim of each head, then GLM-4.5's
    # sigmoid router with a correction bias (on the block) in one group, Mixtral's hub expert names; every layer MoE
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   dict(BASE, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                        rotary_dim=8, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    # PhiMoE (Phi-3.5-MoE): biased LayerNorms, q/k/v/o biases, a biased LM head, Mixtral's experts under the
    # sparsemixer top-2 router. Its picks and mask are discrete steps that bf16 rounding flips at near-ties (on
    # either side), so here two experts (both always picked) with a narrow mask (each weight 1) keep the bf16
    # comparison exact in kind; test_phimoe_hf.py routes among four with a wide mask in fp32
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               dict(BASE, intermediate_size=32, num_local_experts=2, attention_bias=True, lm_head_bias=True,
                    router_jitter_noise=1e-4, pad_token_id=None, bos_token_id=None, eos_token_id=None)),
    # q/k/v biases, fused gate_up_proj, interleaved RoPE on half of each head (read by permuting q/k rows)
    "glm": ("GlmConfig", "GlmForCausalLM", dict(BASE, head_dim=16, pad_token_id=None, eos_token_id=None)),
    # GLM's layers plus RMSNorms on the attention's and the MLP's outputs
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(BASE, head_dim=16, pad_token_id=None, eos_token_id=None)),
    # Llama with a ReLU-squared MLP (not gated)
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(BASE, head_dim=16, pad_token_id=None, bos_token_id=None,
                                                      eos_token_id=None)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(BASE, embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.6,
                     logits_scaling=2.5, attention_bias=True)),
    # GraniteSWA (granite-swash): Granite's scalings; layer 0 attends fully (every 4th, by default), 1-3 slide over 5
    # tokens; a RoPE base per layer: 10,000 on the full layer, 50,000 on the sliding ones, none on layer 2; gpt-oss's
    # attention sinks (made random below); tied embeddings by default
    "granite_swa": ("GraniteSWAConfig", "GraniteSWAForCausalLM",
                    dict(BASE, embedding_multiplier=3.0, attention_multiplier=0.3, residual_multiplier=0.6,
                         logits_scaling=2.5, attention_bias=True, sliding_window=5,
                         layer_rope_theta=[10000.0, 50000.0, 0.0, 50000.0], pad_token_id=None, bos_token_id=None,
                         eos_token_id=None)),
    # GraniteMoeSWA: the same attention over GraniteMoeShared's experts (2 of 4, softmax of the top-k logits) and an
    # ungated shared expert; layers 0 and 2 attend fully here (layer_types), layer 1 has no RoPE
    "granitemoe_swa": ("GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM",
                       dict(BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                            shared_intermediate_size=48, embedding_multiplier=2.0, attention_multiplier=0.25,
                            residual_multiplier=0.5, logits_scaling=1.5, sliding_window=5,
                            layer_types=["full_attention", "sliding_attention"] * 2,
                            layer_rope_theta=[20000.0, 0.0, 20000.0, 20000.0], pad_token_id=None, bos_token_id=None,
                            eos_token_id=None)),
}

class _Families(Checkpoints):
    """Widened like every family's random checkpoint; a router's correction biases (GLM-4.5, MiniMax-M2) and the
    attention sinks (GraniteSWA; zeros as transformers makes them) made to matter."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in hf.model.layers if hasattr(hf, "model") else hf.transformer.blocks:  # (DBRX's)
                sinks = getattr(getattr(layer, "self_attn", None), "sinks", None)
                if sinks is not None:
                    sinks.copy_(torch.randn(sinks.shape, generator=g))
                mlp = getattr(layer, "mlp", None)  # (GraniteMoE's block is block_sparse_moe)
                bias = getattr(getattr(mlp, "gate", None), "e_score_correction_bias", None)
                if bias is None:  # (MiniMax-M2 keeps it on the MoE block)
                    bias = getattr(mlp, "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(0.2 * torch.randn(bias.shape, generator=g))
        return hf


_CKPTS = _Families(FAMILIES)
ckpt = _CKPTS.fixture()


def _load(d, backend: Literal["auto", "torch", "triton"] = "torch",
          dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend, dtype=dtype), with_tokenizer=False)[0]


def _turns(seed: int = 0) -> list[list[int]]:
    return random_turns(VOCAB, seed)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    """Three turns (prefill chunks over a paged prefix, then greedy decode steps): logits at every step and the ids
    equal transformers' with its own cache."""
    _, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, _turns(), 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


def test_triton_backend_equals_transformers(ckpt):
    """The Triton kernels (interpreted on CPU) over the same turns: NoPE, windows and Granite's score scale reach
    them as the torch backend sees them."""
    _, d, hf = ckpt
    seq = sum(_turns(3), [])
    model = _load(d, "triton")
    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    got = torch.cat([model(SeqBatch.build([seq[:13]], [0], [table], 4), pool.layers, all_positions=True),
                     model(SeqBatch.build([seq[13:]], [13], [table], 4), pool.layers, all_positions=True)])
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


def test_spec_follows_transformers(ckpt):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == family
    types = getattr(hf.config, "layer_types", None) or ["full_attention"] * spec.n_layers
    window = getattr(hf.config, "sliding_window", None)
    want = [window if t == "sliding_attention" and (family != "smollm3" or hf.config.use_sliding_window) else None
            for t in types]
    assert [spec.layer_window(i) for i in range(spec.n_layers)] == want
    assert spec.tie_embeddings == bool(hf.config.tie_word_embeddings)
    if family == "smollm3":
        assert list(spec.nope_layers) == [i for i, f in enumerate(hf.config.no_rope_layers) if not f] == [3]
    if family == "exaone4":
        assert want == [5, 5, 5, None] and list(spec.nope_layers) == [3] and spec.qk_norm and spec.post_norms
    if family == "olmo3":
        assert want == [5, 5, 5, None] and spec.rope_local_theta == 10000.0 and spec.rope_type == "yarn"
    if family == "granite":
        assert spec.attn_scale == 0.3 and spec.logits_scaling == 2.5
    if family == "granite_swa":  # windows by layer_types' default; one base per kind of layer, layer 2 without
        assert want == [None, 5, 5, 5] and spec.rope_theta == 10000.0 and spec.rope_local_theta == 50000.0
        assert list(spec.nope_layers) == [2] and spec.attention_sinks and spec.tie_embeddings
    if family == "granitemoe_swa":  # one base for both kinds of layer: no local one
        assert want == [None, 5, None, 5] and spec.rope_theta == 20000.0 and spec.rope_local_theta is None
        assert list(spec.nope_layers) == [1] and spec.attention_sinks and spec.shared_expert_intermediate_size == 48
    if family == "hyperclovax":  # Peri-LN by default; scores scaled by head_dim ** -0.5 unless the config says
        assert spec.peri_norms and spec.sandwich_norms and spec.attn_scale == 16 ** -0.5 and spec.logits_scaling == 0.5
    if family == "mellum":  # two RoPE bases by layer type; the dense layer where mlp_layer_types says
        assert want == [5, None, 5, None] and spec.rope_theta == 500000.0 and spec.rope_local_theta == 10000.0
        assert [spec.is_moe_layer(i) for i in range(4)] == [True, False, True, True]
    if family == "exaone_moe":  # EXAONE 4's windows and NoPE full layer, pre-norm blocks, dense layer 0
        assert want == [5, 5, 5, None] and list(spec.nope_layers) == [3] and spec.qk_norm and not spec.post_norms
        assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    if family == "hy_v3":  # q/k norms, its RoPE base by default, dense layer 0, one group, the factor
        assert spec.qk_norm and spec.rope_theta == 11158840.0 and spec.routed_scaling_factor == 2.5
        assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, True, True] and spec.n_group == 1
        assert spec.shared_expert_intermediate_size == 32
    if family == "flint":  # RoPE on its sliding layer only, sinks, dense layers 0-1, fp32-scaled norms
        assert want == [None, None, 5, None] and list(spec.nope_layers) == [0, 1, 3] and spec.attention_sinks
        assert [spec.is_moe_layer(i) for i in range(4)] == [False, False, True, True] and spec.fp32_norm_scale
    if family == "kolibri1":  # EXAONE 4's NoPE full layer, GLM-4's norms, every layer routed, no dense width
        assert want == [5, 5, None, 5] and list(spec.nope_layers) == [2] and spec.glm4_norms and spec.qk_norm
        assert all(spec.is_moe_layer(i) for i in range(4)) and spec.intermediate_size == 32
    if family == "dbrx":  # its nested config read as Llama's keys; every layer routed
        assert (spec.hidden_size, spec.n_kv_heads, spec.head_dim, spec.clip_qkv) == (64, 2, 16, 1.5)
        assert all(spec.is_moe_layer(i) for i in range(4)) and spec.n_experts == 4 and spec.norm_topk_prob
    if family == "afmoe":  # RoPE on the sliding layers only; muP's sqrt(64); dense layer 0
        assert want == [5, None, 5, None] and list(spec.nope_layers) == [1, 3] and spec.embedding_multiplier == 8.0
        assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, True, True] and spec.attn_output_gate
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_bf16_teacher_forced_logits(ckpt):
    family, d, _ = ckpt
    hf = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ours = _load(d, dtype="bfloat16")
    got, ref = bf16_teacher_forced(ours, hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())
    if family in ("glm4_moe", "dots1", "solar_open", "exaone_moe", "hy_v3", "flint"):  # routers kept fp32 in bf16
        assert hf.model.layers[-1].mlp.gate.weight.dtype == torch.float32
        assert ours.model.layers[-1].mlp.gate.weight.dtype == torch.float32


def _assert_logits_equal(ours: Any, hf: Any) -> None:
    """Our prefill logits at every position of one sequence equal transformers' (fp32)."""
    seq = sum(_turns(7), [])
    pool = KVPool(ours.spec.kv_spec(), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf.eval(), seq), atol=2e-4, rtol=1e-4)


def _edited_checkpoint(family: str, tmp_path_factory: Any, tmp_path: Any, edit: Callable[[dict[str, Any]], None]) -> Any:
    """A copy of ``family``'s checkpoint whose tensors ``edit`` changed in place; returns its directory."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, _ = _CKPTS.get(family, tmp_path_factory)
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_save_pretrained_reads_back_in_transformers(family, tmp_path):
    cfg_cls, model_cls, kw = FAMILIES[family]
    hf_cfg = getattr(transformers, cfg_cls)(**kw).to_dict()
    ours = build_model(ModelSpec.from_hf_config(hf_cfg), None, seed=3, backend="torch")
    save_pretrained(ours, tmp_path)
    hf, info = getattr(transformers, model_cls).from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_logits_equal(ours, hf)


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("family", ["afmoe", "exaone_moe"])
async def test_cluster_read_paths_same_tokens(family, tmp_path_factory):
    """A two-turn session through the emulated cluster (Trinity: the gated attention output, NoPE full layers,
    windows, GLM-4.5's MoE; K-EXAONE: windows and NoPE in pre-norm blocks): PE, DE, split and recompute reads give
    transformers' greedy tokens."""
    d, hf = _CKPTS.get(family, tmp_path_factory)
    first = _turns(9)[0] + _turns(9)[1]
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off"), hf, first, [5, 17, 33, 2, 71, 64, 9],
                             min_hit=16)


def test_hyperclovax_without_peri_norms_is_granite_with_logits_multiplied(tmp_path):
    """``use_post_norm: false``: Granite's block (no norms on the sublayers' outputs), the logits still multiplied."""
    cfg_cls, model_cls, kw = FAMILIES["hyperclovax"]
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**dict(kw, use_post_norm=False))).eval()
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert ours.spec.peri_norms is False and not ours.spec.sandwich_norms
    _assert_logits_equal(ours, hf)


def test_exaone_moe_leaves_its_mtp_block_out(tmp_path_factory, tmp_path):
    """K-EXAONE ships a multi-token-prediction block (``mtp.*``) that is not a decoder layer: left out at load, as
    transformers does, and the logits are its."""
    def edit(tensors: dict[str, Any]) -> None:
        tensors["mtp.layers.0.input_layernorm.weight"] = torch.ones(64)
        tensors["mtp.fc.weight"] = torch.zeros(64, 128)

    d = _edited_checkpoint("exaone_moe", tmp_path_factory, tmp_path, edit)
    _assert_logits_equal(_load(d), _CKPTS.get("exaone_moe", tmp_path_factory)[1])


def test_hy_v3_reads_transformers_names_and_leaves_its_mtp_layer_out(tmp_path_factory, tmp_path):
    """Hy3's checkpoints name its router, bias and shared experts otherwise than transformers' modules do; both
    spellings read alike. Its multi-token-prediction layer (``model.layers.<num_hidden_layers>``) is not a decoder
    layer: left out at load, as transformers does."""
    def edit(tensors: dict[str, Any]) -> None:
        assert "model.layers.1.mlp.expert_bias" in tensors and "model.layers.1.mlp.router.gate.weight" in tensors
        renames = {".mlp.router.gate.": ".mlp.gate.", ".mlp.expert_bias": ".mlp.e_score_correction_bias",
                   ".mlp.shared_mlp.": ".mlp.shared_experts."}
        for old, new in renames.items():  # (layer 2 in transformers' in-memory names)
            for name in [n for n in tensors if n.startswith("model.layers.2.") and old in n]:
                tensors[name.replace(old, new)] = tensors.pop(name)
        tensors["model.layers.4.input_layernorm.weight"] = torch.ones(64)
        tensors["model.layers.4.mlp.router.gate.weight"] = torch.zeros(8, 64)

    d = _edited_checkpoint("hy_v3", tmp_path_factory, tmp_path, edit)
    _assert_logits_equal(_load(d), _CKPTS.get("hy_v3", tmp_path_factory)[1])


@pytest.mark.parametrize("model_type,key,value,needle", [
    ("granite", "logits_scaling", 0, "logits_scaling"),
    ("granite", "residual_multiplier", "x", "residual_multiplier"),
    ("granite", "mlp_bias", "yes", "mlp_bias must be true or false"),
    ("granite_swa", "layer_rope_theta", [10000.0, 0.0], "layer_rope_theta must list"),
    ("granite_swa", "layer_rope_theta", [10000.0, -1.0, 0.0, 0.0], "layer_rope_theta must list"),
    ("granite_swa", "layer_rope_theta", [10000.0, 20000.0, 30000.0, 20000.0], "one RoPE base for the full layers"),
    ("granite_swa", "sliding_window", None, "sliding_window is null"),
    ("smollm3", "no_rope_layers", [1, 0], "no_rope_layers"),
    ("smollm3", "no_rope_layer_interval", 0, "no_rope_layer_interval"),
    ("olmo3", "rope_parameters", {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}, "sliding_attention"),
    ("olmo3", "layer_types", ["sliding_attention"], "layer_types"),
    ("exaone4", "sliding_window_pattern", "LXG", "sliding_window_pattern"),
    ("exaone4", "layer_types", "LLLG", "layer_types"),
    ("olmoe", "clip_qkv", -1.0, "clip_qkv"),
    ("dots1", "n_routed_experts", None, "n_routed_experts"),
    ("solar_open", "rope_parameters", {"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("solar_open", "routed_scaling_factor", -1.0, "routed_scaling_factor"),
    ("afmoe", "route_scale", 0, "route_scale"),
    ("mellum", "mlp_layer_types", ["sparse", "moe", "sparse", "sparse"], "mlp_layer_types"),
    ("hyperclovax", "use_post_norm", "yes", "use_post_norm"),
    ("hyperclovax", "logits_scaling", 0, "logits_scaling"),
    ("mellum", "rope_parameters", {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}, "sliding"),
    ("exaone_moe", "mlp_layer_types", ["sparse", "moe", "sparse", "sparse"], "mlp_layer_types"),
    ("hy_v3", "mlp_layer_types", ["dense", "sparse", "dense"], "mlp_layer_types"),
    ("hy_v3", "router_scaling_factor", 0, "router_scaling_factor"),
    ("flint", "layer_types", ["full_attention"] * 3, "layer_types"),
    ("flint", "mlp_only_layers", "0,1", "mlp_only_layers"),
    ("kolibri1", "sliding_window", None, "sliding_window is null"),
    ("flint", "sliding_window", None, "sliding_window is null"),
    ("kolibri1", "layer_types", ["full_attention", "global", "full_attention", "full_attention"], "layer_types"),
    ("afmoe", "global_attn_every_n_layers", 0, "global_attn_every_n_layers"),
    ("afmoe", "mup_enabled", "yes", "mup_enabled"),
    ("dots1", "max_window_layers", "x", "max_window_layers"),
])
def test_bad_configs_name_the_key(model_type, key, value, needle):
    cfg = dict(BASE, model_type=model_type, **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)


@pytest.mark.parametrize("change,needle", [
    ({"ffn_config": {"moe_normalize_expert_weights": 2.0}}, "moe_normalize_expert_weights"),
    ({"ffn_config": {"ffn_act_fn": {"name": "tanh"}}}, "ffn_act_fn"),
    ({"attn_config": "x"}, "attn_config must be an object"),
    ({"attn_config": {"kv_n_heads": 0}}, "attn_config.kv_n_heads"),
    ({"n_layers": "4"}, "n_layers"),
])
def test_dbrx_bad_configs_name_the_key(change, needle):
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config({"architectures": ["DbrxForCausalLM"], "model_type": "dbrx", **change})


def test_dbrx_rope_base_from_rope_parameters_else_attn_config():
    """transformers 5 writes ``rope_parameters`` (and runs that base); an older DBRX config names its base only under
    ``attn_config.rope_theta`` (databricks/dbrx-instruct: 500,000), which is read then. Without either: 10,000. Unset
    ``moe_normalize_expert_weights`` (null) keeps the top-k weights unnormalized."""
    base = {"architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "d_model": 64, "n_heads": 4, "n_layers": 2}
    old = ModelSpec.from_hf_config(dict(base, attn_config={"rope_theta": 500000.0}))
    assert old.rope_theta == 500000.0
    new = ModelSpec.from_hf_config(dict(base, attn_config={"rope_theta": 500000.0},
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    assert new.rope_theta == 10000.0 and ModelSpec.from_hf_config(base).rope_theta == 10000.0
    assert not ModelSpec.from_hf_config(dict(base, ffn_config={"moe_normalize_expert_weights": None})).norm_topk_prob


def test_dbrx_with_unnormalized_expert_weights_equals_transformers(tmp_path):
    """``moe_normalize_expert_weights: null``: the top-k softmax weights as they are (they sum below 1)."""
    cfg_cls, model_cls, kw = FAMILIES["dbrx"]
    kw = dict(kw, ffn_config={**kw["ffn_config"], "moe_normalize_expert_weights": None})
    hf = Checkpoints({"dbrx": (cfg_cls, model_cls, kw)}).model("dbrx")
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert not ours.spec.norm_topk_prob
    _assert_logits_equal(ours, hf)


def test_dbrx_with_gelu_gated_experts_equals_transformers(tmp_path):
    """``ffn_config.ffn_act_fn`` names the experts' gate activation (transformers: ``ACT2FN[name]``); it is read
    into the spec, written back by ``to_hf_config``, and the logits equal transformers'."""
    cfg_cls, model_cls, kw = FAMILIES["dbrx"]
    kw = dict(kw, ffn_config={**kw["ffn_config"], "ffn_act_fn": {"name": "gelu"}})
    hf = Checkpoints({"dbrx": (cfg_cls, model_cls, kw)}).model("dbrx")
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert ours.spec.activation == "gelu"
    assert ours.spec.to_hf_config()["ffn_config"]["ffn_act_fn"] == {"name": "gelu"}
    _assert_logits_equal(ours, hf)


def test_granite_swa_second_rope_base_under_a_scaled_rope_is_refused():
    """transformers scales each of GraniteSWA's RoPE bases; ours turns the sliding layers' base unscaled, so a
    second base under a scaled RoPE is refused, and one base under it is read."""
    cfg = dict(FAMILIES["granite_swa"][2], model_type="granite_swa",
               rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ModelError, match="layer_rope_theta gives the sliding layers their own base"):
        ModelSpec.from_hf_config(cfg)
    spec = ModelSpec.from_hf_config(dict(cfg, layer_rope_theta=[10000.0, 10000.0, 0.0, 10000.0]))
    assert spec.rope_type == "linear" and spec.rope_local_theta is None and spec.nope_layers == (2,)
