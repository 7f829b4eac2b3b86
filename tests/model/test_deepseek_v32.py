"""DeepSeek-V3.2 checkpoints (the paper's model: V3's MLA and MoE plus DeepSeek Sparse Attention), against
transformers' own DeepseekV32ForCausalLM on the same random weights. ``index_topk`` is 8 here, so every sequence
soon holds more keys than a query attends to: the lightning indexer's selection (its keys kept in the KV rows)
decides the logits at every step, turn after turn, batched, through ``generate``, through the emulated cluster's
read paths (the keys travel with the KV) and with FP8 latent rows; a checkpoint without its indexer is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import cluster_read_paths
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):  # pragma: no cover - transformers before V3.2
    pytest.skip("this transformers has no DeepseekV32ForCausalLM", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
    "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "index_topk": 8, "index_n_heads": 16, "index_head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint saved by transformers (sharded, packed experts) with widened random weights, and its model."""
    return _checkpoint(tmp_path_factory.mktemp("v32"), CONFIG)


def _checkpoint(d, config):
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**config)).eval()
    with torch.no_grad():  # HF inits small weights, unit norms and a zero correction bias: widen them
        for n, p in hf.named_parameters():
            if n.endswith(("norm.weight", "norm.bias")):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(6.0)
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(CONFIG["n_routed_experts"]))
    hf.save_pretrained(d, max_shard_size="100KB")
    return d, hf


@pytest.mark.parametrize("heads", [1, 2])
def test_tied_scores_keep_the_keys_transformers_keeps(tmp_path, heads):
    """With one or two indexer heads the ReLU zeroes every head's term of many keys, so scores tie at the
    ``index_topk``-th place all the time: the keys kept are still transformers' (its ``topk`` over the same rows),
    turn after turn of chunks and decode steps."""
    from hf_random import load_checkpoint

    d, hf = _checkpoint(tmp_path, {**CONFIG, "index_n_heads": heads})
    g = torch.Generator().manual_seed(0)
    turns = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]
    ours, ref, ids, ref_ids = paged_turns(load_checkpoint(d), hf, turns, 7, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids


def test_spec_reads_v32_and_keeps_the_indexer_key_in_the_kv_rows(ckpt):
    d, _ = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "deepseek_v32"
    assert (spec.index_topk, spec.index_n_heads, spec.index_head_dim) == (8, 16, 16)
    assert spec.max_position == 256 and spec.scoring_func == "sigmoid" and spec.first_k_dense_replace == 1
    ks = spec.kv_spec()  # latent 32 + rope 8, then the 16-value indexer key
    assert ks.row_elems == 56 and ks.bytes_per_token_layer == 56 * 4 and ks.extra_bytes == 64
    fp8 = load_spec({**json.loads((d / "config.json").read_text()), "kv_lora_rank": 128}, dtype="bfloat16",
                    kv_format="fp8").kv_spec()
    assert fp8.latent_format == "fp8" and fp8.extra_bytes == 32 and fp8.bytes_per_token_layer == 128 + 4 + 16 + 32
    assert DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32") == spec
    v3 = DeepseekV3Spec.from_hf_config({**spec.to_hf_config(), "architectures": ["DeepseekV3ForCausalLM"],
                                        "model_type": "deepseek_v3"}, dtype="float32")
    assert "index_topk" not in v3.to_dict() and v3.fingerprint() != spec.fingerprint()
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match="mlp_layer_types.*first_k_dense_replace=1"):
        DeepseekV3Spec.from_hf_config({**cfg, "mlp_layer_types": ["sparse", "dense", "sparse"]})
    # an indexer narrower than the RoPE part it rotates: transformers fails at the first forward ("split_with_sizes
    # [64, -48]"); it loaded here and failed the first turn inside the engine (an outside audit)
    with pytest.raises(ModelError, match=r"index_head_dim 4 is narrower than the qk_rope_head_dim \(8\)"):
        DeepseekV3Spec.from_hf_config({**cfg, "index_head_dim": 4})


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    """Three turns over the paged latent prefix (44 tokens, five times index_topk), each step's logits against
    transformers' with its own indexed cache."""
    d, hf = ckpt
    model, _ = load_model(LlamaModelConfig(path=str(d), dtype="float32", attention_backend="torch"),
                          with_tokenizer=False)
    g = torch.Generator().manual_seed(0)
    turns = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]
    ours, ref, ids, ref_ids = paged_turns(model, hf, turns, 7, 4)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) == 21 and ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    """Two sequences with different cached prefixes in one prefill batch, then two batched decode steps, all past
    index_topk: every logit row equals transformers' full recompute of that sequence."""
    from hf_random import check_batched_against_hf

    d, hf = ckpt
    model, _ = load_model(LlamaModelConfig(path=str(d), dtype="float32", attention_backend="torch"),
                          with_tokenizer=False)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (23, 14)]
    check_batched_against_hf(model, hf, seqs, cuts=(12, 9))


def test_generate_past_index_topk_and_a_checkpoint_without_its_indexer(ckpt, tmp_path):
    from dualpath.cli import main
    from dualpath.model.loader import read_weights_dir

    d, hf = ckpt
    prompt = [5, 17, 33, 2, 90, 61, 7, 44, 12, 9, 70, 3, 28]
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                 "--ignore-eos", "--device", "cpu", "--json", str(out)]) == 0
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 13:]
    assert json.loads(out.read_text())["runs"][0]["generated_ids"] == want.tolist()
    from safetensors.torch import save_file

    stripped = tmp_path / "no-indexer"
    stripped.mkdir()
    (stripped / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in read_weights_dir(d).items() if "indexer.wk." not in k},
              str(stripped / "model.safetensors"))
    with pytest.raises(ModelError, match=r"DeepSeek-V3.2 tensor 'model\.layers\.0\.self_attn\.indexer\.wk\.weight' "
                                         "is missing"):
        load_model(LlamaModelConfig(path=str(stripped)), with_tokenizer=False)


def test_the_selection_decides_the_logits(ckpt):
    """The comparisons above would catch an indexer that is ignored: attending to every key instead of the selection
    moves the logits past index_topk."""
    from dualpath.model import KVPool, SeqBatch

    d, _ = ckpt
    model, _ = load_model(LlamaModelConfig(path=str(d), dtype="float32", attention_backend="torch"),
                          with_tokenizer=False)
    seq = torch.randint(2, VOCAB, (30,), generator=torch.Generator().manual_seed(8)).tolist()

    def logits() -> torch.Tensor:
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        return model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers, all_positions=True)

    want = logits()
    object.__setattr__(model.spec, "index_topk", 10_000)  # every key selected: dense MLA
    try:
        dense = logits()
    finally:
        object.__setattr__(model.spec, "index_topk", 8)
    assert torch.allclose(dense[:8], want[:8], atol=1e-5)  # within index_topk keys: the same
    assert float((dense[8:] - want[8:]).abs().max()) > 1e-2


def test_fp8_latent_rows_carry_the_indexer_key(tmp_path_factory):
    """With FP8 latent rows (kv_lora_rank 128 here) each row's indexer key follows in bfloat16: the keys stored
    equal the fp32 rows' keys to bfloat16 rounding, and the model runs past index_topk (within it, with every key
    selected, its logits stay close to transformers': the latent's FP8 rounding is the difference)."""
    from hf_random import hf_logits

    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.deepseek import _index_keys

    d, hf = _checkpoint(tmp_path_factory.mktemp("v32fp8"), {**CONFIG, "kv_lora_rank": 128})
    seq = torch.randint(2, VOCAB, (26,), generator=torch.Generator().manual_seed(9)).tolist()
    keys, logits = {}, {}
    for fmt in ("auto", "fp8"):
        model, _ = load_model(LlamaModelConfig(path=str(d), dtype="float32", kv_format=fmt, attention_backend="torch"),
                              with_tokenizer=False)
        pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
        table = pool.allocate(7)
        logits[fmt] = model(SeqBatch.build([seq], [0], [table], 4), pool.layers, all_positions=True)
        keys[fmt] = _index_keys(pool.layer(0), model._latent_width, torch.float32)[table].reshape(28, -1)[:26].float()
    assert keys["fp8"].dtype == torch.float32 and keys["auto"].abs().max() > 0.5
    torch.testing.assert_close(keys["fp8"], keys["auto"], atol=1e-2, rtol=1e-2)
    assert torch.isfinite(logits["fp8"]).all()
    ref = hf_logits(hf, seq)
    assert float((logits["fp8"][:8] - ref[:8]).abs().max()) < 0.1 * float(ref.abs().max())


@pytest.mark.anyio
async def test_cluster_every_read_path_past_index_topk(ckpt):
    """DeepSeek-V3.2 through the emulated cluster: the second turn's hit KV (with its indexer keys, several times
    index_topk) is read on the PE, on the DE and forwarded layer by layer, split, or recomputed; every path gives
    transformers' greedy tokens (teacher-forced over the whole session)."""
    d, hf = ckpt
    g = torch.Generator().manual_seed(5)
    first = torch.randint(2, VOCAB, (23,), generator=g).tolist()
    second = torch.randint(2, VOCAB, (7,), generator=g).tolist()
    await cluster_read_paths(LlamaModelConfig(path=str(d), dtype="float32", time_model="off"), hf, first, second,
                             3 * CONFIG["index_topk"])
