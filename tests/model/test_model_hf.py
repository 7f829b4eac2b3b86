"""Our Llama/Mistral/Qwen2/Qwen3 over paged KV against Hugging Face transformers (full recompute) on the same random weights."""

from __future__ import annotations

import pytest
import torch

from dualpath.kernels import gather_layer_blocks, scatter_layer_blocks
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")

BASE = {"vocab_size": 211, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}

CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(BASE, rope_theta=10000.0)),
    "llama-tied-mha": (transformers.LlamaConfig, dict(BASE, num_key_value_heads=4, tie_word_embeddings=True,
                                                      head_dim=32)),
    "llama3-rope": (transformers.LlamaConfig, dict(BASE, num_attention_heads=8, num_key_value_heads=1, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # dynamic NTK: transformers' base is only rescaled past max_position_embeddings, which is also our context limit
    "llama-dynamic": (transformers.LlamaConfig, dict(BASE, max_position_embeddings=128,
                                                     rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "qwen2": (transformers.Qwen2Config, dict(BASE, rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2-yarn": (transformers.Qwen2Config, dict(BASE, rope_theta=1000000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3": (transformers.Qwen3Config, dict(BASE, rope_theta=1000000.0, head_dim=24, tie_word_embeddings=True)),
    "mistral-window": (transformers.MistralConfig, dict(BASE, sliding_window=128)),
}
_MODELS = {transformers.LlamaConfig: transformers.LlamaForCausalLM, transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
           transformers.Qwen3Config: transformers.Qwen3ForCausalLM, transformers.MistralConfig: transformers.MistralForCausalLM}


def _hf_model(name: str, seed: int = 0):
    cls, kw = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = cls(**kw)
    model = _MODELS[cls](cfg)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: perturb so they are exercised
        for n, p in model.named_parameters():
            if n.endswith("bias") or n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, max_shard_size="200KB" if request.param == "llama" else "50GB")  # one sharded case
    ours, _ = load_model(LlamaModelConfig(path=str(d)), with_tokenizer=False)
    return request.param, hf, ours


def test_multi_turn_reuses_paged_prefix(pair):
    name, hf, ours = pair
    bt = 16
    pool = KVPool(ours.spec.kv_spec(), num_blocks=40, block_tokens=bt)
    gen = torch.Generator().manual_seed(1)
    vocab = ours.spec.vocab_size
    seqs: list[list[int]] = [[], []]
    tables: list[list[int]] = [[], []]
    turns = [(13, 19), (7, 1), (33, 5), (1, 16)]  # (new tokens of seq 0, of seq 1) per turn
    for turn, lens in enumerate(turns):
        starts = [len(s) for s in seqs]
        new = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]
        for b in range(2):
            need = pool.blocks_for_tokens(starts[b] + lens[b]) - len(tables[b])
            tables[b] += pool.allocate(need)
        batch = SeqBatch.build(new, starts, tables, bt)
        logits = ours(batch, pool.layers, all_positions=True)
        for b in range(2):
            seqs[b] += new[b]
            ref = _hf_logits(hf, seqs[b])[starts[b]:]
            got = logits[int(batch.cu_seqlens_q[b]): int(batch.cu_seqlens_q[b + 1])]
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4, msg=f"{name} turn {turn} seq {b}")
        # three batched decode steps after each turn
        for _ in range(3):
            nxt = [int(_hf_logits(hf, s)[-1].argmax()) for s in seqs]
            pos = [len(s) for s in seqs]
            for b in range(2):
                need = pool.blocks_for_tokens(pos[b] + 1) - len(tables[b])
                tables[b] += pool.allocate(need)
            width = max(len(t) for t in tables)
            bt_tensor = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
            dl = ours.decode_step(torch.tensor(nxt), torch.tensor(pos), bt_tensor, pool.layers)
            for b in range(2):
                seqs[b].append(nxt[b])
                torch.testing.assert_close(dl[b], _hf_logits(hf, seqs[b])[-1], atol=2e-4, rtol=1e-4)


def test_layerwise_prefill_with_one_layer_at_a_time(pair):
    """The prefill engine's pattern: per layer, scatter the prefix's Layer Blocks from Full Block buffers into a
    layer-only KV tensor, run the layer, gather the new blocks back; equals the whole-pool forward."""
    name, hf, ours = pair
    bt = 16
    spec = ours.spec
    pool = KVPool(spec.kv_spec(), num_blocks=8, block_tokens=bt)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, spec.vocab_size, (32,), generator=gen).tolist()
    new = torch.randint(0, spec.vocab_size, (21,), generator=gen).tolist()
    table = pool.allocate(4)
    ours(SeqBatch.build([prefix], [0], [table[:2]], bt), pool.layers)
    full = pool.layout.alloc_full_blocks(2)
    pool.read_full_blocks(table[:2], full)  # the "stored" Full Blocks of the prefix

    want = ours(SeqBatch.build([new], [32], [table], bt), pool.layers)

    pe_table = [5, 2, 7, 0]  # the PE's own physical blocks
    state = ours.prefill_begin(SeqBatch.build([new], [32], [pe_table], bt))
    out_full = pool.layout.alloc_full_blocks(4)
    for layer in range(spec.n_layers):
        kv = torch.full((8, bt, 2, spec.n_kv_heads, spec.head_dim), float("nan"))
        scatter_layer_blocks(full[:, layer : layer + 1], kv, torch.tensor(pe_table[:2]))
        ours.prefill_layer(layer, state, kv)
        gather_layer_blocks(kv, torch.tensor(pe_table), out_full[:, layer : layer + 1])
    got = ours.prefill_end(state)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref = pool.layout.alloc_full_blocks(4)
    pool.read_full_blocks(table, ref)
    used = (32 + 21) * pool.layout.bytes_per_token_layer
    for layer in range(spec.n_layers):
        a = out_full[:, layer].reshape(-1)[:used]
        b = ref[:, layer].reshape(-1)[:used]
        assert torch.equal(a, b), f"layer {layer} KV bytes differ"
