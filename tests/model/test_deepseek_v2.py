"""DeepSeek-V2 checkpoints (MLA + DeepSeekMoE with V2's softmax router) on the DeepSeek-V3 code paths, against
transformers' own DeepseekV2ForCausalLM on the same random weights: logits at every step of several turns over the
paged latent prefix, greedy ids equal to ``generate``, the emulated cluster's read paths, and the config keys."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, read_weights_dir
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 2,
        "num_experts_per_tok": 3, "first_k_dense_replace": 1, "norm_topk_prob": False,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
CONFIGS: dict[str, dict[str, Any]] = {
    # V2-Lite's shape: no q-LoRA, plain top-k over softmax scores, no scaling; YaRN with mscale = mscale_all_dim
    "v2-lite": dict(BASE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1}),
    # V2's shape: q-LoRA, group-limited greedy (4 groups of 2, best 2 groups), V2's routed_scaling_factor 16;
    # YaRN with an attention factor (mscale != mscale_all_dim)
    "v2": dict(BASE, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=16.0,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.9,
                                "mscale_all_dim": 0.8, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1}),
}
_DIRS: dict[str, object] = {}


def _ckpt_dir(name: str, factory):
    """A checkpoint saved by transformers (sharded, packed experts) with widened random weights."""
    if name not in _DIRS:
        d = factory.mktemp(name)
        torch.manual_seed(0)
        hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**CONFIGS[name])).eval()
        with torch.no_grad():  # HF inits small weights and unit norms: widen them so every part matters
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight"):
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.mul_(6.0)
        hf.save_pretrained(d, max_shard_size="100KB")
        _DIRS[name] = d
    return _DIRS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    return request.param, _ckpt_dir(request.param, tmp_path_factory)


def _hf(d):
    return transformers.DeepseekV2ForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _turns(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]


def _run(model, hf, gen_per_turn: int = 7, block_tokens: int = 4):
    """Three turns over the paged latent prefix, ours and transformers' (see test_deepseek.paged_turns)."""
    return paged_turns(model, hf, _turns(), gen_per_turn, block_tokens)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    name, d = ckpt
    model, _ = load_model(LlamaModelConfig(path=str(d), dtype="float32", attention_backend="torch"),
                          with_tokenizer=False)
    assert model.spec.architecture == "deepseek_v2" and model.spec.topk_method == CONFIGS[name]["topk_method"]
    ours, ref, ids, ref_ids = _run(model, _hf(d))
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)  # the V3 tests' fp32 tolerance
    assert len(ids) >= 20 and ids == ref_ids


def test_router_variant_is_what_matches(ckpt):
    """The same weights under a neighbouring router (plain greedy instead of group-limited, or another scaling; V3's
    sigmoid scores with a renormalized top-k) move the logits far outside the tolerance: the comparisons in this
    file see the router variant."""
    name, d = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec)
    tensors = read_weights_dir(d)
    ids = _turns()[0] + _turns()[1]
    with torch.no_grad():
        ref = _hf(d)(torch.tensor([ids])).logits[0].float()

    def logits(s: DeepseekV3Spec) -> torch.Tensor:
        extra = {f"model.layers.{i}.mlp.gate.e_score_correction_bias": torch.zeros(8)
                 for i in (1, 2) if s.model_type == "deepseek_v3"}
        m = build_model(s, {**tensors, **extra}, backend="torch")
        pool = KVPool(m.kv_spec, num_blocks=8, block_tokens=4)
        return m(SeqBatch.build([ids], [0], [pool.allocate(4)], 4), pool.layers, all_positions=True)

    torch.testing.assert_close(logits(spec), ref, atol=2e-4, rtol=1e-4)
    other = replace(spec, topk_method="greedy") if spec.topk_method != "greedy" else replace(
        spec, routed_scaling_factor=2.0)
    assert float((logits(other) - ref).abs().max()) > 0.05
    assert float((logits(replace(spec, model_type="deepseek_v3", topk_method="noaux_tc", norm_topk_prob=True,
                                 n_group=2, topk_group=2)) - ref).abs().max()) > 0.05


def test_generate_cli_matches_transformers_generate(ckpt, tmp_path):
    """``dualpath generate --model DIR``: transformers' ``generate`` greedy ids; latent bytes in the JSON."""
    from dualpath.cli import main

    name, d = ckpt
    prompt = [5, 17, 33, 2, 90, 61, 7]
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "20",
                 "--ignore-eos", "--device", "cpu", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    want = _hf(d).generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 7:]
    assert run["generated_ids"] == want.tolist()
    assert run["kv_bytes_per_token_layer"] == (32 + 8) * 4


def test_random_init_saves_a_v2_checkpoint_transformers_reads(tmp_path):
    """``to_hf_config`` + ``save_pretrained`` of a seeded random V2 model give a config.json that transformers
    builds a DeepseekV2ForCausalLM from, with the same logits."""
    from dualpath.model.loader import save_pretrained

    spec = DeepseekV3Spec(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          n_layers=3, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=16, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
                          num_experts_per_tok=2, n_group=8, topk_group=3, norm_topk_prob=False,
                          routed_scaling_factor=3.0, first_k_dense_replace=1, max_position=256,
                          model_type="deepseek_v2", topk_method="group_limited_greedy")
    model = build_model(spec, None, seed=5, backend="torch")
    assert not any(n.endswith("e_score_correction_bias") for n, _ in model.named_parameters())
    save_pretrained(model, tmp_path)
    assert load_spec(tmp_path) == spec
    hf = _hf(tmp_path)
    assert type(hf).__name__ == "DeepseekV2ForCausalLM"
    ids = _turns()[0]
    pool = KVPool(model.kv_spec, num_blocks=4, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


# The keys of DeepSeek-V2-Lite's published config.json at its real sizes (auto_map and the like left out)
V2_LITE: dict[str, Any] = {
           "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
           "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
           "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
           "ep_size": 1, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
           "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
           "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
           "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
           "use_cache": True, "pretraining_tp": 1, "tie_word_embeddings": False, "rope_theta": 10000,
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100000, "eos_token_id": 100001,
           "torch_dtype": "bfloat16"}


def test_reads_the_published_v2_configs():
    """V2-Lite's config.json (legacy ``rope_scaling`` with ``type``) and V2's routing keys: 576 bf16 latent values
    per token and layer (656 bytes as FP8 rows), the YaRN softmax scale."""
    spec = load_spec(V2_LITE)
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "deepseek_v2"
    assert (spec.topk_method, spec.scoring_func, spec.q_lora_rank, spec.norm_topk_prob) == ("greedy", "softmax",
                                                                                            None, False)
    assert spec.rope_type == "yarn" and spec.dtype == "bfloat16" and spec.rope_interleave
    assert [spec.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert spec.kv_spec().bytes_per_token_layer == 576 * 2
    assert load_spec(V2_LITE, kv_format="fp8").kv_spec().bytes_per_token_layer == 656
    m = 0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert spec.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    v2 = load_spec(dict(V2_LITE, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
                        n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3,
                        topk_method="group_limited_greedy", routed_scaling_factor=16.0))
    assert isinstance(v2, DeepseekV3Spec)
    assert (v2.topk_method, v2.n_group, v2.topk_group, v2.routed_scaling_factor) == ("group_limited_greedy", 8, 3,
                                                                                      16.0)
    assert v2.fingerprint() != replace(v2, model_type="deepseek_v3", topk_method="noaux_tc").fingerprint()


@pytest.mark.parametrize(("key", "value"), [
    ("topk_method", "noaux_tc"),        # transformers' V2 router has no such branch
    ("scoring_func", "sigmoid"),
    ("norm_topk_prob", True),           # transformers ignores it, DeepSeek's code renormalizes: refused
    ("moe_layer_freq", 2),
    ("rope_interleave", False),
    ("topk_group", 9),
])
def test_unsupported_values_name_the_key(key, value, tmp_path):
    cfg = dict(V2_LITE, topk_method="group_limited_greedy", n_group=8, topk_group=3)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    with pytest.raises(ModelError, match=key):
        load_spec(tmp_path)


@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A V2-Lite-shaped checkpoint through the emulated cluster (``load_model`` on the saved dir): the PE and DE
    read paths give the same tokens as transformers (teacher-forced), and links move latent-sized rows."""
    from test_deepseek_cluster import BT, FIRST, L, _session

    d = _ckpt_dir("v2-lite", tmp_path_factory)
    out = {p: await _session(d, p) for p in ("pe", "de")}
    assert out["pe"][0].token_ids == out["de"][0].token_ids and out["pe"][1].token_ids == out["de"][1].token_ids
    r1, r2, prompt, layer_bytes = out["de"]
    assert layer_bytes == (32 + 8) * 4
    hit = (len(FIRST) + 6) // BT * BT
    assert r2.hit_tokens == hit and r2.link_bytes["pe0.cnic.in"] == hit * L * layer_bytes
    ids = prompt + r2.token_ids
    with torch.no_grad():
        logits = _hf(d)(torch.tensor([ids[:-1]])).logits[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == r2.token_ids
    assert logits[len(FIRST) - 1: len(FIRST) + 5].argmax(-1).tolist() == r1.token_ids


def test_fp8_latent_kv(tmp_path_factory):
    """``kv_format fp8`` on a V2-Lite-shaped checkpoint (kv_lora_rank 128 -> 148-byte rows): teacher-forced on
    transformers' greedy ids, the V3 tests' stated FP8 tolerance (>= 80% equal argmax, mean logit error under 5%
    of the logit range)."""
    CONFIGS["fp8"] = dict(CONFIGS["v2-lite"], kv_lora_rank=128)
    try:
        d = _ckpt_dir("fp8", tmp_path_factory)
    finally:
        CONFIGS.pop("fp8")
    hf = _hf(d)
    spec = load_spec(d, dtype="float32", kv_format="fp8")
    model = build_model(spec, read_weights_dir(d), backend="torch")
    assert spec.kv_spec().bytes_per_token_layer == 128 + 4 + 2 * 8
    pool = KVPool(model.kv_spec, num_blocks=16, block_tokens=4)
    assert pool.data.dtype == torch.uint8
    ids = _turns()[0] + _turns()[1]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    table, outs = list(range(16)), []
    for pos in range(0, len(ids), 5):  # chunks of 5 over the growing FP8 prefix
        chunk = ids[pos:pos + 5]
        outs.append(model(SeqBatch.build([chunk], [pos], [table], 4), pool.layers, all_positions=True))
    ours = torch.cat(outs)
    assert float((ours.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.8
    assert float((ours - ref).abs().mean()) < 0.05 * float(ref.abs().max())
    assert not torch.allclose(ours, ref, atol=2e-4, rtol=1e-4)  # the rows really were FP8


def test_no_shared_experts_checkpoint(tmp_path):
    """transformers' DeepseekV2 always builds shared experts and saves empty ones when ``n_shared_experts`` is 0:
    they are dropped on load and the logits still match."""
    cfg = dict(CONFIGS["v2-lite"], n_shared_experts=0, num_hidden_layers=2)
    torch.manual_seed(1)
    hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**cfg)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(6.0)
    hf.save_pretrained(tmp_path)
    assert any(".shared_experts." in k and v.numel() == 0 for k, v in read_weights_dir(tmp_path).items())
    model, _ = load_model(LlamaModelConfig(path=str(tmp_path), attention_backend="torch"), with_tokenizer=False)
    ids = _turns()[0]
    pool = KVPool(model.kv_spec, num_blocks=4, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
