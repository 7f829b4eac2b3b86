"""Kimi Linear (``KimiLinearForCausalLM``: DeepSeek-V3's MLA without RoPE in some layers, Kimi Delta Attention in the
others, DeepSeek's MoE) against transformers on the same random weights, saved by transformers: logits at every
prefill and decode step over one pool of widened latent rows and KDA state pages, batched sequences with different
cached prefixes, both MLA prefill forms, Triton, bf16, a hit that continues from a stored state, our
save_pretrained read back by transformers, the released checkpoints' config form, and a two-turn session through
the emulated cluster on every read path."""

from __future__ import annotations

import json
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

from dualpath.errors import ModelError
from dualpath.kv.layout import KVLayout
from dualpath.model.kimi_linear import KimiLinearModel, KimiLinearSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "KimiLinearForCausalLM"):
    pytest.skip("no Kimi Linear in this transformers", allow_module_level=True)

VOCAB = 97
TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_experts": 8, "num_experts_per_token": 2,
    "num_shared_experts": 1, "num_expert_group": 2, "topk_group": 1, "routed_scaling_factor": 1.8,
    "linear_head_dim": 8, "linear_num_heads": 4, "layer_types": TYPES,
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "model_max_length": 256,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(RecurrentCheckpoints):
    """Routers' correction biases live too (transformers starts them at zero)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 11)
        with torch.no_grad():
            for n, b in hf.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "no_q_lora": ("KimiLinearConfig", "KimiLinearForCausalLM", CONFIG),
    "q_lora": ("KimiLinearConfig", "KimiLinearForCausalLM",
               {**CONFIG, "q_lora_rank": 24, "linear_conv_kernel_dim": 3, "num_shared_experts": 0,
                "layer_types": ["full_attention", "linear_attention", "linear_attention", "full_attention"]}),
})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_both_mla_prefill_forms_over_widened_rows(form, tmp_path_factory):
    d, hf = _CKPTS.get("no_q_lora", tmp_path_factory)
    ours = load_checkpoint(d)
    ours.prefill_form = form
    check_two_chunks_against_hf(ours, hf, sum(random_turns(VOCAB, 5), []), cut=9)


def test_a_long_segment_runs_in_short_closed_forms(tmp_path_factory):
    """In 64-token blocks a 45-token prompt is one segment of the scan, which the KDA layers run as closed forms of
    at most ``KDA_SEGMENT`` tokens, the state carried between them; then a 2-token chunk over it."""
    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch
    from dualpath.model.kimi_linear import KDA_SEGMENT

    d, hf = _CKPTS.get("no_q_lora", tmp_path_factory)
    ours = load_checkpoint(d)
    seq = sum(random_turns(VOCAB, 8, lens=(20, 15, 12)), [])
    assert 2 * KDA_SEGMENT < 45 < 64
    pool = KVPool(paged_kv_spec(ours.spec, 64), num_blocks=2, block_tokens=64)
    table = pool.allocate(1)
    got = torch.cat([ours(SeqBatch.build([seq[:45]], [0], [table], 64), pool.layers, all_positions=True),
                     ours(SeqBatch.build([seq[45:]], [45], [table], 64), pool.layers, all_positions=True)])
    torch.testing.assert_close(got, hf_logits(hf, seq), atol=2e-4, rtol=1e-4)


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("no_q_lora", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_pages_hold_latent_rows_widened_for_the_block_size(tmp_path_factory):
    d, _ = _CKPTS.get("no_q_lora", tmp_path_factory)
    spec = load_spec(d)
    assert isinstance(spec, KimiLinearSpec) and spec.layer_types == tuple(TYPES)
    state = 4 * (3 * 4 * 8 * 3 + 4 * 8 * 8)  # fp32 conv inputs (kernel - 1 of q, k, v) and the 4 heads' 8 x 8 matrices
    assert spec.state_bytes == state
    for bt in (1, 4, 16, 64):
        kv = spec.paged_kv_spec(bt)
        assert kv.attention == "mla" and kv.state_pages and kv.latent_dim == 32 + 8 and kv.rope_dim == 8
        page = KVLayout(kv, bt).page_shape
        assert page[0] == bt and page[1] >= 40 and bt * page[1] * 4 >= state
        assert page[1] == 40 or bt * (page[1] - 1) * 4 < state  # (no wider than it must be)
    assert spec.paged_kv_spec(64).extra_bytes == 0  # (64 latent rows already hold the state)
    assert spec.paged_kv_spec(4).fingerprint() != spec.paged_kv_spec(16).fingerprint()


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert spec.architecture == "kimi_linear" and (spec.q_lora_rank is None) == (family == "no_q_lora")
    assert not spec.rope_interleave and spec.softmax_scale == (16 + 8) ** -0.5
    assert [spec.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    assert isinstance(ours, KimiLinearModel)
    check_save_reads_back(ours, tmp_path, transformers.KimiLinearForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d)  # (our save_pretrained writes the names transformers writes)


def test_the_released_config_form_reads_as_transformers_reads_it(tmp_path):
    """Moonshot's config.json: the linear layers' keys in ``linear_attn_config`` (layers numbered from 1),
    ``first_k_dense_replace``, ``mla_use_nope`` and the router's activation."""
    cfg = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "mlp_layer_types", "linear_head_dim",
                                                        "linear_num_heads")}
    cfg.update(architectures=["KimiLinearForCausalLM"], model_type="kimi_linear", first_k_dense_replace=1,
               mla_use_nope=True, moe_router_activation_func="sigmoid", rope_theta=10000.0, rope_scaling=None,
               linear_attn_config={"full_attn_layers": [2], "kda_layers": [1, 3, 4], "head_dim": 8, "num_heads": 4,
                                   "short_conv_kernel_size": 4})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert list(spec.layer_types) == theirs.layer_types == TYPES
    assert [spec.is_moe_layer(i) for i in range(4)] == [t == "sparse" for t in theirs.mlp_layer_types]
    assert (spec.lin_heads, spec.lin_dim, spec.conv_kernel) == (theirs.linear_num_heads, theirs.linear_head_dim,
                                                                theirs.linear_conv_kernel_dim)
    same = load_spec({"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", **CONFIG})
    assert spec == same


def test_the_head_is_its_own_whatever_tie_word_embeddings_says(tmp_path):
    """transformers ties nothing for Kimi Linear: with ``tie_word_embeddings: true`` it still reads ``lm_head``."""
    hf = _Checkpoints({"tied": ("KimiLinearConfig", "KimiLinearForCausalLM",
                                {**CONFIG, "tie_word_embeddings": True})}).model("tied")
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    assert not load_spec(tmp_path).tie_embeddings
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 6), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("no_q_lora", tmp_path_factory)
    hf = transformers.KimiLinearForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    assert hf.model.layers[0].self_attn.forget_gate.dt_bias.dtype == torch.float32
    ours = load_checkpoint(d, dtype="bfloat16")
    assert ours.model.layers[0].self_attn.dt_bias.dtype == torch.float32
    check_bf16_kda_layer(ours, hf)
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=_decisive_routing(hf32, seq))


def _names(d: Any) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


def check_bf16_kda_layer(ours: Any, hf: Any) -> None:
    """The first KDA layer in bf16, on one bf16 input, against transformers' (no cache, one 23-token prefill): the
    decay equal bit for bit and the output within one bf16 step of its scale (the same roundings, in the same
    places: a convolution output or a decay left unrounded moves it by several)."""
    from dualpath.engine.model_api import paged_kv_spec
    from dualpath.model import KVPool, SeqBatch

    layer = ours.spec.layer_types.index("linear_attention")
    x = torch.randn(1, 23, ours.spec.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    theirs = hf.model.layers[layer].self_attn
    pool = KVPool(paged_kv_spec(ours.spec, 4), num_blocks=8, block_tokens=4)
    batch = SeqBatch.build([list(range(23))], [0], [pool.allocate(8)], 4)
    mine = ours.model.layers[layer].self_attn
    with torch.no_grad():
        ref = theirs(x)
        got = mine(x[0], batch, pool.layers[layer])
        assert torch.equal(mine.decay(x[0]), theirs.forget_gate(x)[0].float())
    ref = (ref[0] if isinstance(ref, tuple) else ref)[0].float()
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(got.float(), ref, atol=0.01 * float(ref.abs().max()) / 1.5, rtol=0)


def _decisive_routing(hf: Any, seq: list[int]) -> torch.Tensor:
    """The tokens whose routed experts every MoE layer picks by a clear margin, which bf16 rounding cannot flip:
    the group (the two of the config's ``n_group = 2``, each scored by its two best choices) and, in it, the two
    experts (sigmoid scores plus correction biases: 2nd and 3rd best at least 0.02 apart)."""
    gaps: list[torch.Tensor] = []

    def hook(module: Any, args: Any, out: Any) -> None:
        logits = out[0] if isinstance(out, tuple) else out
        choice = logits.float().reshape(-1, logits.shape[-1]).sigmoid() + module.e_score_correction_bias.float()
        groups = choice.view(choice.shape[0], 2, -1).topk(2, dim=-1).values.sum(-1)
        best = choice.view(choice.shape[0], 2, -1).gather(1, groups.argmax(-1)[:, None, None].expand(-1, 1, 4))[:, 0]
        top = best.topk(3, dim=-1).values
        gaps.append(torch.minimum(top[:, 1] - top[:, 2], (groups[:, 0] - groups[:, 1]).abs()))

    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    try:
        hf_logits(hf, seq)
    finally:
        for h in hooks:
            h.remove()
    rows = torch.stack(gaps).min(dim=0).values > 0.02
    assert int(rows.sum()) >= len(seq) // 3  # (enough rows left to compare)
    return rows


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", **CONFIG}
    for change, match in (({"mla_use_nope": False}, "mla_use_nope"),
                          ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func"),
                          ({"layer_types": TYPES[:3]}, "layer_types"),
                          ({"layer_types": None, "linear_attn_config": {"full_attn_layers": [0], "kda_layers": [1]}},
                           "full_attn_layers"),
                          ({"linear_num_heads": 0}, "linear_num_heads"),
                          ({"hidden_act": "tanh"}, "hidden_act")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})
    with pytest.raises(ModelError, match="KV format"):
        load_spec(base, kv_format="fp8")


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("no_q_lora", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
