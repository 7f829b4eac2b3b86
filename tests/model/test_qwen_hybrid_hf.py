"""Qwen3.5, Qwen3.5-MoE and Qwen3-Next (hybrid: Gated DeltaNet linear attention and gated full attention) against
transformers on the same random weights, saved by transformers. Their linear layers keep a recurrent state in state
pages (the state after the last token written in each block): logits at every prefill and decode step over the paged
pool, batched sequences with different cached prefixes, a hit that starts from a stored Full Block's page, bf16,
our save_pretrained read back by transformers, the image-text checkpoint's language model, and a two-turn session
through the emulated cluster on every read path."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_paged_paths_against_hf,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)

from dualpath.engine.model_api import paged_kv_spec
from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import build_model
from dualpath.model.qwen_hybrid import HybridSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5ForCausalLM") or not hasattr(transformers, "Qwen3NextForCausalLM"):
    pytest.skip("no Qwen3.5 / Qwen3-Next in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 256,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]}
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48}



_CKPTS = RecurrentCheckpoints({
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", CONFIG),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", {**CONFIG, **MOE, "mlp_only_layers": [1]}),
    # (a zero-width shared expert: transformers builds it anyway, with empty tensors)
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", {**CONFIG, **MOE, "shared_expert_intermediate_size": 0}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)




def test_a_hit_starts_from_the_stored_full_blocks_state(tmp_path_factory):
    """Full Blocks copied from another sequence (a storage hit) carry the state at their end; zeroed, they do not."""
    d, hf = _CKPTS.get("qwen3_next", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_blocks_longer_than_a_segment(tmp_path_factory):
    """128-token blocks: a 150-token prompt in two chunks runs in segments of at most 64 tokens inside a block and
    gives transformers' logits; then decode steps go on from the partial block's page."""
    d, hf = _CKPTS.get("qwen3_5", tmp_path_factory)
    ours = load_checkpoint(d)
    seq = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    pool = KVPool(paged_kv_spec(ours.spec, 128), num_blocks=3, block_tokens=128)
    table = pool.allocate(2)
    got = torch.cat([ours(SeqBatch.build([seq[:100]], [0], [table], 128), pool.layers, all_positions=True),
                     ours(SeqBatch.build([seq[100:140]], [100], [table], 128), pool.layers, all_positions=True)])
    for p in range(140, 150):
        got = torch.cat([got, ours.decode_step(torch.tensor([seq[p]]), torch.tensor([p]),
                                               torch.tensor([table], dtype=torch.int32), pool.layers)])
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


def test_state_pages_are_sized_for_the_block(ckpt):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, HybridSpec)
    state = 4 * ((2 * 2 * 8 + 4 * 12) * 3 + 4 * 8 * 12)
    assert spec.state_bytes == state
    for bt in (1, 4, 16, 64):
        kv = paged_kv_spec(spec, bt)
        assert kv.state_pages and kv.head_dim == 16
        assert kv.n_kv_heads == max(2, math.ceil(state / (2 * 16 * 4 * bt)))
        assert kv.bytes_per_token_layer * bt >= state
    assert paged_kv_spec(spec, 4).fingerprint() != paged_kv_spec(spec, 64).fingerprint()
    ours = load_checkpoint(d)
    pool = KVPool(paged_kv_spec(spec, 64), num_blocks=2, block_tokens=4)  # pages sized for 64, used with 4
    with pytest.raises(ModelError, match="cannot hold a linear-attention state"):
        ours(SeqBatch.build([[1, 2, 3]], [0], [[0]], 4), pool.layers)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert spec.layer_types == tuple(CONFIG["layer_types"])
    assert spec.rope_by_type == {"full_attention": (hf.config.rope_parameters["rope_theta"], 0.25)}
    assert (spec.lin_k_heads, spec.lin_v_heads, spec.lin_k_dim, spec.lin_v_dim, spec.conv_kernel) == (2, 4, 8, 12, 4)
    assert spec.moe_layers == {"qwen3_5": (), "qwen3_next": (0, 2, 3), "qwen3_5_moe": (0, 1, 2, 3)}[family]
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    cls = {"qwen3_5": transformers.Qwen3_5ForCausalLM, "qwen3_next": transformers.Qwen3NextForCausalLM,
           "qwen3_5_moe": transformers.Qwen3_5MoeForCausalLM}[family]
    check_save_reads_back(ours, tmp_path, cls, sum(random_turns(VOCAB, 7), []))


def test_the_multi_token_prediction_head_is_left_out(tmp_path_factory, tmp_path):
    """Hub checkpoints carry an ``mtp.*`` head that transformers does not load; neither do we."""
    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("qwen3_next", tmp_path_factory)
    tensors = load_file(str(d / "model.safetensors"))
    tensors.update({"mtp.fc.weight": torch.zeros(64, 128), "mtp.layers.0.input_layernorm.weight": torch.zeros(64)})
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("qwen3_5", tmp_path_factory)
    hf = transformers.Qwen3_5ForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


_VISION = {
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration",
                {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                 "patch_size": 4, "temporal_patch_size": 1, "spatial_merge_size": 1, "num_position_embeddings": 16}),
    "minicpmv4_6": ("MiniCPMV4_6Config", "MiniCPMV4_6ForConditionalGeneration",
                    {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "image_size": 16, "patch_size": 4, "insert_layer_id": 0}),
}


@pytest.mark.parametrize("family", list(_VISION))
def test_image_text_checkpoint_runs_its_language_model(tmp_path, family):
    """``Qwen3_5ForConditionalGeneration`` and MiniCPM-V 4.6 (on Qwen3.5): the language model (tower not loaded)
    gives transformers' logits on text."""
    cfg_cls, model_cls, vision = _VISION[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"no {model_cls} in this transformers")
    text = {**CONFIG, "model_type": "qwen3_5_text"}
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(text_config=text, vision_config=vision)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "A_log" not in n and "dt_bias" not in n:
                p.add_(0.05 * torch.randn_like(p)) if n.endswith("norm.weight") else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert spec.architecture == "qwen3_5_text"
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 2), []), cut=9)


def test_config_defaults_as_transformers_reads_them(tmp_path):
    small = {k: v for k, v in CONFIG.items() if k != "layer_types"}
    cfg = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **small, "num_hidden_layers": 6,
           "full_attention_interval": 3, **MOE, "decoder_sparse_step": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert spec.layer_types == tuple(hf.layer_types)
    assert spec.moe_layers == (1, 3, 5) and spec.moe_renormalize is True


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}}, "only a 'default' RoPE"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types must name"),
    ({"linear_num_value_heads": 3}, "multiple of linear_num_key_heads"),
    ({"linear_key_head_dim": 0}, "linear_key_head_dim"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_next"])
async def test_cluster_read_paths_same_tokens(tmp_path_factory, family):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens (the state travels in whole pages from storage, DE to PE and PE to DE)."""
    d, hf = _CKPTS.get(family, tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)


@pytest.mark.anyio
@pytest.mark.parametrize("read_path", ["pe", "de"])
async def test_chunked_prefill_equals_unchunked(tmp_path_factory, read_path):
    """The runtime PE's chunked prefill under the compute quota (chunks of 10 tokens over 16-token blocks: a chunk
    ends inside a block, its state kept in the page the next chunk starts from) gives the unchunked run's tokens
    and logits, on both read paths."""
    import math
    import os

    import anyio

    from dualpath.cluster import Cluster
    from dualpath.config import DualPathConfig
    from dualpath.engine.model_api import LlamaAdapter
    from dualpath.engine.timemodel import LayerTimeModel
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    d, _ = _CKPTS.get("qwen3_next", tmp_path_factory)
    first = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(7)).tolist()
    second = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(8)).tolist()
    runs = {}
    for chunked in (False, True):
        cfg = DualPathConfig()
        mc = cfg.model = LlamaModelConfig(path=str(d))
        c = cfg.cluster
        c.block_tokens, c.snic_gbps, c.cnic_gbps, c.host_buffer_bytes = 16, None, None, 64 << 20
        c.kv_pool_tokens, c.deadline_s, c.prefill_max_batch_tokens, c.keep_logits = 512, 30.0, 512, True
        c.layers_ahead = 1  # (layers share scratch slots: later chunks must restore their pages)
        c.devices = os.environ.get("DUALPATH_TEST_DEVICES", "cpu")
        c.prefill_quota_s = 4 * 10.5 if chunked else None
        tm = LayerTimeModel(a=0.0, b=1.0, e=0.0, d=0.0, n_layers=4)

        def build(device: torch.device, mc: Any = mc, tm: Any = tm) -> LlamaAdapter:
            return LlamaAdapter(load_model(mc, device, with_tokenizer=False)[0], 16, time_model=tm)

        async with Cluster(cfg, model=build) as cl:
            with anyio.fail_after(120):
                r1 = await cl.run_turn("s", first, 4, path="recompute")
                r2 = await cl.run_turn("s", first + r1.token_ids + second, 5, path=read_path)
            runs[chunked] = (r1, r2, cl.pes[0].chunks)
    for a, b in zip(runs[True][:2], runs[False][:2], strict=True):
        assert a.token_ids == b.token_ids and a.hit_tokens == b.hit_tokens
        for x, y in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    r1, r2 = runs[True][:2]
    assert r2.hit_tokens == 32
    assert runs[True][2] == sum(math.ceil((r.prompt_tokens - r.hit_tokens) / 10) for r in (r1, r2)) >= 6
