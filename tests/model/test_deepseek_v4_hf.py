"""DeepSeek-V4 (``DeepseekV4ForCausalLM``: sliding, compressed-sparse and heavily-compressed attention over one shared
key/value head with sinks, hyper-connections, hash-routed and sqrt-softplus-routed experts) against transformers on
the same random weights, saved by transformers: logits at every prefill chunk and decode step over paged rows (the
compressed entries written in their windows' last rows), batched sequences with different cached prefixes, 64-token
blocks, bf16, the released checkpoints' names and config keys, our save_pretrained read back by transformers, and a
two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_long_segments,
    check_save_reads_back,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.deepseek_v4 import CSA, HCA, SLIDING, DeepseekV4Spec, tensors_in
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4ForCausalLM"):
    pytest.skip("no DeepSeek-V4 in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "moe_intermediate_size": 16, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "q_lora_rank": 16, "num_experts_per_tok": 2,
    "n_routed_experts": 4, "layer_types": [SLIDING, CSA, HCA, CSA], "compress_rates": {CSA: 4, HCA: 8},
    "hc_mult": 2, "hc_sinkhorn_iters": 5, "sliding_window": 6, "o_groups": 2, "o_lora_rank": 8, "index_n_heads": 4,
    "index_head_dim": 8, "index_topk": 3, "partial_rotary_factor": 0.5, "max_position_embeddings": 512,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """Weights where every part matters: transformers starts sinks, position biases and the hyper-connections' biases
    at zero, their scales at one and the hash tables at expert 0; here they are random (each token's hash experts
    distinct), matrices N(0, 0.1), norms 1 + N(0, 0.1). The indexers have 4 heads or more: with fewer, a score is
    exactly 0 (every head's ReLU at 0) often enough that two entries tie at the top-k boundary, where torch.topk's
    choice is its own (transformers' full forward and its cached chunks disagree there too)."""

    def model(self, family: str, seed: int = 0) -> Any:
        cfg_cls, model_cls, kw = self.families[family]
        torch.manual_seed(seed)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        n_exp, k = hf.config.n_routed_experts, hf.config.num_experts_per_tok
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif n.endswith(("sinks", "position_bias", ".base", "hc_base")):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif n.endswith("scale"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            for n, b in hf.named_buffers():
                if n.endswith("tid2eid"):
                    b.copy_(torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(b.shape[0])]))
                elif n.endswith("e_score_correction_bias"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "flash": ("DeepseekV4Config", "DeepseekV4ForCausalLM", CONFIG),
    "variant": ("DeepseekV4Config", "DeepseekV4ForCausalLM",
                {**CONFIG, "layer_types": [HCA, CSA, SLIDING, HCA], "compress_rates": {CSA: 2, HCA: 4},
                 "mlp_layer_types": ["moe", "hash_moe", "moe", "moe"], "hc_mult": 3, "hc_sinkhorn_iters": 3,
                 "sliding_window": 5, "o_groups": 4, "index_topk": 2, "index_head_dim": 12, "index_n_heads": 6,
                 "scoring_func": "sigmoid", "n_routed_experts": 6, "num_experts_per_tok": 3,
                 "routed_scaling_factor": 2.0, "swiglu_limit": 0.3, "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1}}),
})
ckpt = _CKPTS.fixture()


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)
    seq = sum(random_turns(VOCAB, 3, lens=(11, 9, 10)), [])
    for cut in (5, 13, 16):  # (a prefix ending inside a window, and on a window's last token)
        check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=cut)


def test_query_tiles_give_the_same_logits(tmp_path_factory, monkeypatch):
    """A prefill attends in tiles of queries, each over its own band of the window: with 5-query tiles (tiles
    that start and end inside windows and blocks) every logit row still equals transformers'."""
    from dualpath.model import deepseek_v4

    monkeypatch.setattr(deepseek_v4, "_TILE", 5)
    d, hf = _CKPTS.get("flash", tmp_path_factory)
    check_long_segments(load_checkpoint(d), hf, VOCAB)
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3, lens=(11, 9, 10)), []), cut=7)


def test_the_compressed_entries_and_the_indexer_choose_what_is_attended(tmp_path_factory):
    """The checkpoint's own logits differ once a query may see every closed entry (no indexer choice), and once the
    entries are zeroed: the comparisons above hold only with both right."""
    d, hf = _CKPTS.get("flash", tmp_path_factory)
    seq = sum(random_turns(VOCAB, 3, lens=(11, 9, 10)), [])
    ref = hf_logits(hf, seq)
    check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=len(seq))
    wide = load_checkpoint(d)
    wide.spec = dataclasses.replace(wide.spec, index_topk=64)
    with pytest.raises(AssertionError):
        check_two_chunks_against_hf(wide, hf, seq, cut=len(seq))
    zeroed = load_checkpoint(d)
    for layer in zeroed.model.layers:
        if layer.self_attn.compressor is not None:
            torch.nn.init.zeros_(layer.self_attn.compressor.kv_proj.weight)
    with pytest.raises(AssertionError):
        check_two_chunks_against_hf(zeroed, hf, seq, cut=len(seq))
    assert ref.abs().max() > 1.0


def test_spec_pages_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, DeepseekV4Spec) and spec.architecture == "deepseek_v4"
    if family == "flash":  # (CSA rows: key/value 16, 2 x 32 compressor, 16 entry, 2 x 16 indexer, 8 entry: 136)
        assert spec.mlp_layer_types == ("hash_moe",) * 3 + ("moe",) and spec.rope_dim == 8
        assert spec.page_heads == 5 and spec.kv_spec().bytes_per_token_layer == 5 * 2 * 16 * 4
        assert spec.row_parts(2) == {"kv": (0, 16), "ckv": (16, 32), "cgate": (32, 48), "entry": (48, 64)}
    else:
        assert spec.compress_scaling is not None and spec.compress_scaling["attention_factor"] == 1.0
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.DeepseekV4ForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"head.weight"} if spec.tie_embeddings else set())


def test_the_released_checkpoints_names_and_config_keys(tmp_path_factory, tmp_path):
    """The hub's layout: no ``model.`` prefix, ``embed`` / ``head`` / ``hc_head_fn``, the older config keys
    (``compress_ratios``, ``compress_rate_*``, ``num_hash_layers``, ``qk_rope_head_dim``) and an MTP layer."""
    d, hf = _CKPTS.get("flash", tmp_path_factory)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    hub = {}
    for k, v in tensors.items():
        k = k[len("model."):] if k.startswith("model.") else k
        k = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
             "hc_head.hc_scale": "hc_head_scale"}.get(k, k)
        hub[k] = v
    hub["mtp.0.attn.wkv.weight"] = torch.zeros(1)
    save_file(hub, str(tmp_path / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    for key in ("layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor", "rope_parameters"):
        cfg.pop(key)
    cfg.update(compress_ratios=[0, 4, 128, 4], compress_rate_hca=8, num_hash_layers=3, qk_rope_head_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_spec(tmp_path) == load_spec(d)
    theirs = transformers.DeepseekV4Config(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    assert list(theirs.layer_types) == list(load_spec(tmp_path).layer_types)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 4), []), cut=9)
    assert set(tensors_in(hub)) == set(tensors_in(tensors))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("flash", tmp_path_factory)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", **CONFIG}
    for change, match in (({"layer_types": [SLIDING, "full_attention", HCA, CSA]}, "layer_types"),
                          ({"mlp_layer_types": ["moe", "dense", "moe", "moe"]}, "mlp_layer_types"),
                          ({"num_key_value_heads": 2}, "num_key_value_heads"),
                          ({"o_groups": 3}, "o_groups"),
                          ({"scoring_func": "softmax"}, "scoring_func"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"compress_ratios": [0, 5, 128, 4], "layer_types": None}, "compress_ratios"),
                          ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "rope_parameters"),
                          ({"rope_parameters": {"main": {"rope_type": "default", "rope_theta": 1e4},
                                                "compress": {"rope_type": "default", "rope_theta": 1.6e5,
                                                             "partial_rotary_factor": 0.3}}},
                           "compress.partial_rotary_factor")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("flash", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)


def test_a_checkpoint_copy_with_the_wrong_shape_names_the_tensor(tmp_path_factory, tmp_path):
    d, _ = _CKPTS.get("flash", tmp_path_factory)
    shutil.copy(d / "config.json", tmp_path / "config.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["o_lora_rank"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="o_a_proj"):
        load_checkpoint(tmp_path)


def test_norms_and_hyper_connections_bit_for_bit_in_bf16():
    """The hyper-connections (both block weights and the head's collapse) and both norms on bf16 streams, against
    transformers' modules with the same fp32 parameters (an ``hc_eps`` large enough to matter): equal bit for bit."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as theirs

    from dualpath.model import deepseek_v4 as v4

    cfg = transformers.DeepseekV4Config(**{**CONFIG, "hc_mult": 3, "hc_eps": 0.05, "hc_sinkhorn_iters": 4})
    spec = load_spec({"architectures": ["DeepseekV4ForCausalLM"], **cfg.to_dict()})
    g = torch.Generator().manual_seed(0)
    streams = torch.randn(7, 3, 32, generator=g).to(torch.bfloat16)
    for ours, ref in ((v4.HyperConnection(spec), theirs.DeepseekV4HyperConnection(cfg)),
                      (v4.HyperHead(spec), theirs.DeepseekV4HyperHead(cfg))):
        with torch.no_grad():
            for (name, p), (their_name, q) in zip(sorted(ours.named_parameters()), sorted(ref.named_parameters()),
                                                  strict=True):
                assert name == their_name
                q.copy_(torch.randn(q.shape, generator=g))
                p.copy_(q)
        got, want = ours(streams), ref(streams[None])  # (theirs: [batch, seq, streams, hidden])
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b[0])
    x = torch.randn(5, 32, generator=g).to(torch.bfloat16)
    norm = theirs.DeepseekV4RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(32, generator=g))
    assert torch.equal(v4.rms_norm(x, norm.weight, 1e-6), norm(x))
    assert torch.equal(v4.rms_norm(x, None, 1e-6), theirs.DeepseekV4UnweightedRMSNorm(1e-6)(x))


def test_bf16_keeps_transformers_fp32_parameters(tmp_path_factory):
    """In a bf16 model, the parameters transformers keeps in fp32 (hyper-connections, sinks, position biases, norms,
    correction biases) are fp32 here too, and no other."""
    d, _ = _CKPTS.get("flash", tmp_path_factory)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    want = {n for n, p in [*hf.named_parameters(), *hf.named_buffers()] if p.dtype == torch.float32
            and "rotary_emb" not in n}
    ours = load_checkpoint(d, dtype="bfloat16")
    assert {n for n, p in ours.named_parameters() if p.dtype == torch.float32} == want


def test_a_flat_yarn_rope_without_attention_factor_is_read_as_transformers_reads_it(tmp_path_factory):
    d, _ = _CKPTS.get("variant", tmp_path_factory)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1}
    assert transformers.DeepseekV4Config(**json.loads(json.dumps(cfg))).rope_parameters["compress"][
        "attention_factor"] == 1.0
    assert load_spec(cfg) == load_spec(d)
