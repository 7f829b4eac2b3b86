"""OLMo (1), Helium, ERNIE 4.5 (dense and MoE), Hunyuan (dense and MoE), Ministral 3, Apertus, Jais 2, Cwm, VaultGemma and NanoChat against transformers on the same random weights, saved by
transformers' own ``save_pretrained``: logits at every prefill and greedy decode step of several turns over our
paged KV, batched sequences, the Triton kernels, bf16, our own ``save_pretrained`` read back by transformers, and
the configs we refuse (:mod:`dualpath.model.llama_variants`).

What each adds to the Llama path: OLMo's LayerNorms have neither weight nor bias and q/k/v are clipped; Helium and
ERNIE 4.5 turn interleaved RoPE pairs of the whole head (read by permuting q/k rows at load), Helium with q/k/v
biases but none on o and a biased gated MLP, ERNIE with biases on every projection (its MoE: an fp32 router
choosing by scores plus a correction bias, weighting by the scores alone); Hunyuan norms each head's query
and key after RoPE, with its fixed NTK-alpha RoPE base; Ministral 3 scales each query by its position; Apertus's MLP activation (xIELU) has learned parameters; Jais 2 has biased LayerNorms and a biased ReLU-squared MLP; Cwm slides three
layers of four; VaultGemma
is Gemma 2's attention in a Llama-shaped block; NanoChat's norms have no weights, its RoPE turns the other
way (read by swapping the halves of each head's q/k rows), its MLP is ReLU squared and its logits soft-capped."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_read_paths,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "num_hidden_layers": 3, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # weightless LayerNorms, q/k/v clipped, q/k/v/o biases
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(BASE, clip_qkv=1.5, attention_bias=True)),
    # interleaved RoPE over the whole head, q/k/v biases (none on o), a biased gated MLP
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(BASE, head_dim=16, attention_bias=True, mlp_bias=True,
                                                         rms_norm_eps=1e-6)),
    # interleaved RoPE over the whole head, biases on every projection, tied embeddings (its default)
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(BASE, head_dim=16, use_bias=True)),
    # ERNIE 4.5's attention over MoE layers 1 and 3 (moe_layer_interval 2; layers 0 and 2 dense): an fp32 softmax
    # router picking 2 of 4 experts by scores plus its correction bias, a biased shared expert, a biased LM head
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(BASE, num_hidden_layers=4, use_bias=True, moe_num_experts=4, moe_k=2,
                          moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_interval=2)),
    # per-head q/k RMSNorms after RoPE, NTK-alpha RoPE (labelled dynamic), q/k/v/o biases
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM",
                         dict(BASE, head_dim=16, attention_bias=True,
                              rope_parameters={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0,
                                               "rope_theta": 10000.0})),
    # Hunyuan dense's attention over MoE in every layer: an fp32 softmax router picking 2 of 4 experts (moe_topk
    # given per layer), renormalized, plus an ungated shared MLP
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       dict(BASE, head_dim=16, intermediate_size=32, num_experts=4, moe_topk=[2, 2, 2],
                            attention_bias=True, rope_parameters={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0,
                                                                  "rope_theta": 10000.0})),
    # Mistral's window with YaRN, and queries scaled by position past every 8 tokens (Llama 4's scaling)
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM",
                   dict(BASE, head_dim=16, sliding_window=6, rope_parameters={
                       "type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 8,
                       "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "llama_4_scaling_beta": 0.5})),
    # per-head q/k norms, a plain MLP with xIELU (learned per layer), Llama 3's RoPE (ApertusConfig's default)
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(BASE, head_dim=16)),
    # LayerNorms with biases, a biased ReLU-squared MLP, q/k/v/o biases (Jais2Config's defaults)
    "jais2": ("Jais2Config", "Jais2ForCausalLM", dict(BASE, layer_norm_eps=1e-4)),
    # Llama 3's RoPE; layer 0 attends fully, layers 1 and 2 slide over 5 tokens (CwmConfig's default pattern)
    "cwm": ("CwmConfig", "CwmForCausalLM",
            dict(BASE, head_dim=16, sliding_window=5, bos_token_id=1, rope_parameters={
                "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 16})),
    # Gemma 2's attention (scores scaled by query_pre_attn_scalar and soft-capped, every other layer sliding over 5)
    # and final soft cap, in a block with only the input and pre-MLP norms
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM",
                   dict(BASE, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=3.0,
                        final_logit_softcapping=4.0)),
    # weightless RMSNorms (on the embeddings too, and per head after RoPE), RoPE turning the other way, a
    # ReLU-squared MLP, q/k/v/o biases, final logits soft-capped
    "nanochat": ("NanoChatConfig", "NanoChatForCausalLM", dict(BASE, attention_bias=True,
                                                               final_logit_softcapping=4.0)),
    # RMSNorms over the attention's output and the MLP's product (before o_proj / down_proj), ReLU-squared GLU
    "bitnet": ("BitNetConfig", "BitNetForCausalLM", dict(BASE)),
    # differential attention: two value halves per head, lambda per layer, a weightless RMS norm; q/k/v/o biases
    "diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM",
                  dict(BASE, num_attention_heads=8, num_key_value_heads=4, head_dim=16, attention_bias=True)),
}
_CKPTS = Checkpoints(FAMILIES)
ckpt = _CKPTS.fixture()


_load = load_checkpoint


def _turns(seed: int = 0) -> list[list[int]]:
    return random_turns(VOCAB, seed)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(_load(d), hf, _turns())


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


def test_triton_backend_equals_transformers(ckpt):
    _, d, hf = ckpt
    check_two_chunks_against_hf(_load(d, "triton"), hf, sum(_turns(3), []))


def test_spec_follows_transformers(ckpt):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == family
    assert spec.tie_embeddings == bool(hf.config.tie_word_embeddings)
    assert spec.o_bias == (hf.model.layers[0].self_attn.o_proj.bias is not None)
    mlp = hf.model.layers[0].mlp
    mlp = getattr(mlp, "shared_mlp", mlp)  # (Hunyuan MoE: every layer's MoE, with its shared MLP)
    up = getattr(mlp, "up_proj", None) or mlp.fc1
    assert spec.mlp_bias == (up.bias is not None)
    if family == "olmo":
        assert spec.clip_qkv == 1.5 and not list(_load(d).model.layers[0].input_layernorm.parameters())
    if family == "ministral3":
        assert spec.query_scale_beta == 0.5 and spec.rope_type == "yarn" and spec.layer_window(0) == 6
    if family == "apertus":
        assert spec.activation == "xielu" and spec.qk_norm and spec.rope_type == "llama3"
    if family == "jais2":
        assert spec.activation == "relu2" and spec.mlp_bias and spec.attention_bias and spec.rms_eps == 1e-4
    if family == "cwm":
        assert [spec.layer_window(i) for i in range(3)] == [None, 5, 5] and spec.rope_type == "llama3"
    if family == "vaultgemma":
        assert [spec.layer_window(i) for i in range(3)] == [5, None, 5] and not spec.sandwich_norms
    if family == "diffllama":  # (its pages: keys padded, value pairs)
        assert (spec.kv_spec().n_kv_heads, spec.kv_spec().head_dim) == (4, 32) and spec.o_bias
    if family == "bitnet":
        assert spec.activation == "relu2" and hasattr(_load(d).model.layers[0].self_attn, "attn_sub_norm")
    if family == "nanochat":
        assert spec.final_logit_softcapping == 4.0 and spec.activation == "relu2" and not spec.gated_mlp
    if family == "hunyuan_v1_moe":
        assert spec.n_experts == 4 and spec.n_experts_per_tok == 2 and spec.shared_expert_intermediate_size == 32
    if family in ("hunyuan_v1_dense", "hunyuan_v1_moe"):
        assert spec.rope_scaling == {"rope_type": "ntk_alpha", "alpha": 50.0} and spec.qk_norm_after_rope
    if family == "ernie4_5_moe":
        sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
        assert sparse == [1, 3] and [i for i in range(spec.n_layers) if spec.is_moe_layer(i)] == sparse
        assert spec.moe_norm_min == 1e-12 and spec.lm_head_bias and spec.n_experts == 4
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_bf16_teacher_forced_logits(ckpt):
    family, d, _ = ckpt
    hf = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ours = _load(d, dtype="bfloat16")
    got, ref = bf16_teacher_forced(ours, hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())
    if family in ("ernie4_5_moe", "hunyuan_v1_moe"):  # their routers' weights stay fp32 in a bf16 model, in both
        gate = hf.model.layers[1].mlp.gate
        assert getattr(gate, "wg", gate).weight.dtype == torch.float32
        assert ours.model.layers[1].mlp.gate.weight.dtype == torch.float32
        assert ours.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_save_pretrained_reads_back_in_transformers(family, tmp_path):
    cfg_cls, model_cls, kw = FAMILIES[family]
    hf_cfg = getattr(transformers, cfg_cls)(**kw).to_dict()
    ours = build_model(ModelSpec.from_hf_config(hf_cfg), None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, getattr(transformers, model_cls), sum(_turns(7), []))


def test_ernie_moe_without_correction_bias_and_with_mtp_tensors(tmp_path_factory, tmp_path):
    """An ERNIE 4.5 MoE checkpoint trained without the aux-free bias (no ``moe_statics``) and shipping its
    multi-token-prediction block loads as transformers loads it: zero biases, the MTP tensors left out."""
    import shutil

    from hf_random import hf_logits
    from safetensors.torch import load_file, save_file

    from dualpath.model import KVPool, SeqBatch

    src, _ = _CKPTS.get("ernie4_5_moe", tmp_path_factory)
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "moe_statics" not in k}
    tensors["model.mtp_block.0.input_layernorm.weight"] = torch.ones(64)
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours = _load(d)
    assert not ours.model.layers[1].mlp.moe_statics.e_score_correction_bias.any()
    hf = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(str(d)).eval()
    seq = sum(_turns(7), [])
    pool = KVPool(ours.spec.kv_spec(), num_blocks=16, block_tokens=4)
    got = ours(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


def test_llama_mlp_bias_against_transformers(tmp_path):
    """Llama's ``mlp_bias`` (refused before): biases on the gated MLP's three projections."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(BASE, mlp_bias=True))).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert ours.spec.mlp_bias and ours.spec.to_hf_config()["mlp_bias"] is True
    seq = sum(_turns(4), [])
    check_two_chunks_against_hf(ours, hf, seq, cut=len(seq))


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("family", ["ministral3", "helium"])
async def test_cluster_read_paths_same_tokens(family, tmp_path_factory):
    """A two-turn session through the emulated cluster (Ministral 3: queries scaled by position, YaRN, a window;
    Helium: permuted q/k rows): PE, DE, split and recompute reads give transformers' greedy tokens."""
    d, hf = _CKPTS.get(family, tmp_path_factory)
    first = _turns(9)[0] + _turns(9)[1]
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off"), hf, first, [5, 17, 33, 2, 71, 64, 9],
                             min_hit=16)


@pytest.mark.parametrize("model_type,key,value,needle", [
    ("olmo", "clip_qkv", -1.0, "clip_qkv"),
    ("ernie4_5", "use_bias", "yes", "use_bias"),
    ("ernie4_5_moe", "moe_norm_min", 0, "moe_norm_min"),
    ("hunyuan_v1_moe", "moe_topk", [2, 1, 2], "moe_topk"),
    ("hunyuan_v1_moe", "num_experts", 0, "num_experts"),
    ("ernie4_5_moe", "moe_num_experts", [64, 64], "moe_num_experts"),
    ("ernie4_5_moe", "moe_layer_interval", 0, "moe_layer_interval"),
    ("helium", "mlp_bias", 1, "mlp_bias"),
    ("hunyuan_v1_dense", "rope_scaling", {"type": "linear", "factor": 2.0, "alpha": 3.0}, "alpha"),
    ("hunyuan_v1_dense", "rope_scaling", {"type": "dynamic", "alpha": -2.0}, "alpha"),
    ("qwen2", "rope_scaling", {"type": "ntk_alpha", "alpha": 3.0}, "ntk_alpha"),
    ("nanochat", "hidden_act", "swiglu", "hidden_act"),
    ("ministral3", "rope_parameters", {"type": "yarn", "factor": 2.0, "llama_4_scaling_beta": -1}, "llama_4_scaling_beta"),
    ("ministral3", "rope_parameters", {"type": "default", "llama_4_scaling_beta": 0.1}, "original_max_position"),
    ("nanochat", "final_logit_softcapping", -1.0, "final_logit_softcapping"),
])
def test_bad_configs_name_the_key(model_type, key, value, needle):
    cfg = dict(BASE, model_type=model_type, **{key: value})
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)


def test_bitnets_ternary_packed_checkpoints_are_refused_by_name():
    """BitNet b1.58's released checkpoints pack ternary weights (``quant_method: bitnet``): refused, named."""
    from dualpath.model.quant import check_quantization

    with pytest.raises(ModelError, match="quant_method 'bitnet' is not supported"):
        check_quantization({"quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"}},
                           "config.json")
