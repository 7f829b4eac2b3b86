"""Mixtral, Qwen2-MoE and Qwen3-MoE (softmax-router MoE on the Llama path) against transformers on the same random
weights, saved by transformers' own ``save_pretrained``: logits at every prefill and greedy decode step of several
turns over our paged KV, batched sequences, transformers' packed in-memory expert layout, our own
``save_pretrained`` read back by transformers, and the errors of checkpoints we cannot run."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
import torch
from hf_random import Checkpoints, bf16_teacher_forced, check_batched_against_hf, random_turns, two_sequences
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "num_experts_per_tok": 2}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # MoE in every layer, top-2 of 4 renormalized, no window
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(BASE, num_hidden_layers=2, num_local_experts=4, sliding_window=None, rope_theta=1e6)),
    # q/k/v bias, a gated shared expert, no renormalization, layer 1 dense by mlp_only_layers
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(BASE, num_hidden_layers=3, num_experts=8, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
    # q/k norm, attention bias (o_proj biased too), renormalized, sparse every 2nd layer (1 and 3)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(BASE, num_hidden_layers=4, num_experts=8, moe_intermediate_size=32, head_dim=24,
                       norm_topk_prob=True, decoder_sparse_step=2, attention_bias=True)),
}
SPARSE_LAYERS = {"mixtral": [True, True], "qwen2_moe": [True, False, True], "qwen3_moe": [False, True, False, True]}


_CKPTS = Checkpoints(FAMILIES)  # written in the hub's per-expert layout; widened, so routing matters
_hf_model = _CKPTS.model
_ckpt = _CKPTS.get
ckpt = _CKPTS.fixture()  # (family, directory, transformers' model) for every family


def _load(d, backend: Literal["auto", "torch", "triton"] = "torch"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend), with_tokenizer=False)[0]


def _turns(seed: int = 0) -> list[list[int]]:
    return random_turns(VOCAB, seed)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    family, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, _turns(), 7, 4)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


def test_bf16_teacher_forced_logits(ckpt):
    """bf16 on both sides (router logits in bf16, softmax in fp32, as transformers runs it): a chunked prefill, then
    teacher-forced decode steps over the paged KV; every row within 3% of the logit range of transformers' bf16
    forward of the whole sequence (teacher-forced: a near-tie between two greedy ids cannot fork the runs)."""
    family, d, _ = ckpt
    ours = load_model(LlamaModelConfig(path=str(d), dtype="bfloat16"), with_tokenizer=False)[0]
    hf = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got, ref = bf16_teacher_forced(ours, hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_spec_and_sparse_layers_follow_transformers(ckpt):
    """Which layers are sparse (mlp_only_layers, decoder_sparse_step) and the MoE fields, against the module types
    transformers built from the same config."""
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == family and spec.is_moe
    hf_sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert hf_sparse == SPARSE_LAYERS[family]
    assert [spec.is_moe_layer(i) for i in range(spec.n_layers)] == hf_sparse
    assert spec.n_experts_per_tok == 2 and spec.n_experts == (4 if family == "mixtral" else 8)
    assert spec.norm_topk_prob == (family != "qwen2_moe")
    assert spec.attention_bias == (family != "mixtral") and spec.qk_norm == (family == "qwen3_moe")
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    other = ModelSpec.from_hf_config(dict(spec.to_hf_config(), num_experts_per_tok=1))
    assert spec.fingerprint() != other.fingerprint()  # the routing is part of the block-key namespace


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    """Two sequences with different cached prefixes in one prefill batch (their tokens routed together), then two
    batched decode steps: every logit row equals transformers' full recompute of that sequence."""
    family, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


def test_packed_expert_layout_loads_the_same(ckpt, tmp_path):
    """transformers' in-memory state dict (packed ``mlp.experts.gate_up_proj`` / ``down_proj``, Mixtral's MoE
    under ``mlp``) written as the checkpoint loads into the same model as the hub layout."""
    from safetensors.torch import save_file

    family, d, hf = ckpt
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)  # the packed layout, as transformers holds it
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    packed, hub = _load(tmp_path), _load(d)
    for name, p in hub.named_parameters():
        assert torch.equal(p, dict(packed.named_parameters())[name]), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_save_pretrained_is_read_by_transformers(family, tmp_path):
    """A seeded random model of each family (``--random-init``) saved by us loads in transformers (hub names:
    Mixtral's ``block_sparse_moe.experts.{i}.w1``) to the same logits."""
    spec = ModelSpec.from_hf_config(dict(FAMILIES[family][2], architectures=[FAMILIES[family][1]]))
    model = build_model(spec, None, seed=3)
    with torch.no_grad():  # a decisive router
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(20.0)
    save_pretrained(model, tmp_path)
    if family == "mixtral":
        names = json.loads((tmp_path / "config.json").read_text())
        assert names["num_local_experts"] == 4
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = _turns()[0]
    pool = KVPool(spec.kv_spec(), num_blocks=4, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_triton_backend_in_a_moe_model(tmp_path_factory):
    """The Triton paged-attention kernels (interpreter on CPU) under a MoE model: still transformers' logits."""
    d, hf = _ckpt("qwen2_moe", tmp_path_factory)
    ours, ref, ids, ref_ids = paged_turns(_load(d, "triton"), hf, _turns()[:2], 2, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids


def test_checkpoints_we_cannot_run_name_the_tensor_or_field(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = _ckpt("qwen2_moe", tmp_path_factory)
    cfg = json.loads((d / "config.json").read_text())
    # a Qwen2-MoE file without its shared expert: the missing tensors are named
    tensors = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if ".shared_expert" not in k}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"missing \d+ tensor\(s\): model\.layers\.0\.mlp\.shared_expert"):
        _load(tmp_path)
    # ... or a config that says so
    with pytest.raises(ModelError, match="shared_expert_intermediate_size"):
        load_spec(dict(cfg, shared_expert_intermediate_size=0))
    for key, value in (("num_experts_per_tok", 9), ("num_experts", None), ("decoder_sparse_step", 0),
                       ("mlp_only_layers", "1"), ("moe_intermediate_size", 2.5)):
        with pytest.raises(ModelError, match=key):
            load_spec(dict(cfg, **{key: value}))
    mixtral = json.loads((_ckpt("mixtral", tmp_path_factory)[0] / "config.json").read_text())
    with pytest.raises(ModelError, match="num_local_experts"):
        load_spec({k: v for k, v in mixtral.items() if k != "num_local_experts"})
    # a packed expert tensor of the wrong rank
    bad = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(8, 64)}
    spec = load_spec(cfg)
    assert isinstance(spec, ModelSpec)
    with pytest.raises(ModelError, match="gate_up_proj"):
        build_model(spec, bad)


def test_llama_attention_bias_biases_o_proj(tmp_path):
    """transformers' Llama gives o_proj a bias with ``attention_bias`` (Mistral and Qwen2 never do): such a
    checkpoint loads and matches."""
    torch.manual_seed(0)
    kw = {k: v for k, v in BASE.items() if k != "num_experts_per_tok"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, num_hidden_layers=2, attention_bias=True)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert ours.spec.o_bias
    ids = _turns()[0]
    pool = KVPool(ours.spec.kv_spec(), num_blocks=4, block_tokens=4)
    got = ours(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_reads_hub_style_configs():
    """The keys of the published configs (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B) at their real sizes."""
    mixtral = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
               "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
               "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
               "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000}
    spec = load_spec(mixtral)
    assert isinstance(spec, ModelSpec) and spec.architecture == "mixtral" and spec.dtype == "bfloat16"
    assert (spec.n_experts, spec.n_experts_per_tok, spec.moe_intermediate_size) == (8, 2, 14336)
    assert spec.norm_topk_prob and not spec.attention_bias and spec.sliding_window is None
    assert spec.kv_spec().bytes_per_token_layer == 2 * 8 * 128 * 2
    windowed = load_spec(dict(mixtral, sliding_window=4096))
    assert isinstance(windowed, ModelSpec) and windowed.max_position == 32768 and windowed.layer_window(31) == 4096
    qwen2 = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "decoder_sparse_step": 1,
             "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 8192,
             "max_window_layers": 21, "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
             "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
             "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "shared_expert_intermediate_size": 5632,
             "sliding_window": 32768, "use_sliding_window": False, "vocab_size": 151936, "torch_dtype": "bfloat16"}
    spec = load_spec(qwen2)
    assert isinstance(spec, ModelSpec) and spec.attention_bias and not spec.o_bias
    assert spec.shared_expert_intermediate_size == 5632 and spec.sliding_window is None and spec.max_position == 8192
    assert all(spec.is_moe_layer(i) for i in range(24)) and not spec.norm_topk_prob
    qwen3 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
             "decoder_sparse_step": 1, "head_dim": 128, "hidden_size": 2048, "intermediate_size": 6144,
             "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
             "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
             "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
             "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False, "vocab_size": 151936}
    spec = load_spec(qwen3)
    assert isinstance(spec, ModelSpec) and spec.qk_norm and spec.head_dim == 128 and spec.n_experts == 128
    assert spec.kv_spec().bytes_per_token_layer == 2 * 4 * 128 * 4  # float32 unless the config names a dtype
