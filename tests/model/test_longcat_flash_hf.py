"""LongCat-Flash (``LongcatFlashForCausalLM``, model_type ``longcat_flash``): two MLA sublayers per layer (each with
its own latent rows: twice the config's ``num_layers`` KV layers), the shortcut MoE that reads the first sublayer's
normed state and joins the residual after the second, zero-computation (identity) experts in the router's choice,
and the MLA LoRA scalings. Against transformers' own model on random weights it wrote."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_save_reads_back,
    cluster_read_paths,
    hf_logits,
    load_checkpoint,
    routing_margins,
    widen_mla_moe,
)
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.longcat_flash import LongcatFlashSpec
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LongcatFlashForCausalLM"):
    pytest.skip("this transformers has no LongCat-Flash", allow_module_level=True)

VOCAB = 97
ROUTED, ZERO = 6, 4
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "ffn_hidden_size": 96, "expert_ffn_hidden_size": 32, "num_layers": 2,
    "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "head_dim": 8, "v_head_dim": 16, "n_routed_experts": ROUTED, "zero_expert_num": ZERO, "moe_topk": 3,
    "routed_scaling_factor": 1.5, "max_position_embeddings": 256, "rope_parameters": {"rope_type": "default",
                                                                                      "rope_theta": 10000.0},
    "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    hf = widen_mla_moe(transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**CONFIG)).eval())
    d = tmp_path_factory.mktemp("longcat_flash")
    hf.save_pretrained(d)
    return d, hf


def _turns(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lens]


def _picks(hf: Any, seq: list[int]) -> torch.Tensor:
    """The experts transformers' routers pick for ``seq`` ([layers, tokens, k])."""
    picked: list[torch.Tensor] = []
    hooks = [layer.mlp.router.register_forward_hook(lambda m, a, out: picked.append(out[2]))
             for layer in hf.model.layers]
    try:
        hf_logits(hf, seq)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picked)


def test_spec_reads_the_config_as_transformers_does(ckpt):
    d, hf = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, LongcatFlashSpec) and spec.architecture == "longcat_flash"
    assert spec.n_layers == hf.config.num_hidden_layers == 4 and spec.kv_spec().n_layers == 4
    assert (spec.n_routed_experts, spec.zero_experts, spec.num_experts_per_tok) == (ROUTED, ZERO, 3)
    assert spec.mla_lora_scales == pytest.approx(((64 / 24) ** 0.5, (64 / 32) ** 0.5))
    assert load_spec(spec.to_hf_config(), dtype="float32") == spec
    # transformers' attribute map (num_local_experts, num_experts_per_tok, intermediate_size, moe_intermediate_size)
    # and num_hidden_layers (halved by its setter); with no RoPE base, its default 1e7
    aliased = {"architectures": ["LongcatFlashForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 5,
               "intermediate_size": 40, "moe_intermediate_size": 24, "num_hidden_layers": 6}
    theirs = transformers.LongcatFlashConfig(**{k: v for k, v in aliased.items() if k != "architectures"})
    ours = load_spec(aliased)
    assert (ours.n_routed_experts, ours.num_experts_per_tok, ours.intermediate_size, ours.moe_intermediate_size,
            ours.n_layers) == (theirs.n_routed_experts, theirs.moe_topk, theirs.ffn_hidden_size,
                               theirs.expert_ffn_hidden_size, theirs.num_hidden_layers)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 1e7
    assert ours.fingerprint() != load_spec({**aliased, "zero_expert_num": 255}).fingerprint()


def test_the_fixture_routes_to_zero_experts(ckpt):
    """Every layer's router picks a zero (identity) expert for some tokens and a routed one for others, so the
    logits below check both kinds."""
    _, hf = ckpt
    picks = _picks(hf, _turns(0, (23,))[0])
    for layer in picks:
        assert bool((layer >= ROUTED).any()) and bool((layer < ROUTED).any())


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(load_checkpoint(d), hf, _turns(0, (11, 5, 7)), 7, 4)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) == 21 and ids == ref_ids


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_batched_sequences_and_decode_equal_transformers(ckpt, form):
    d, hf = ckpt
    model = load_checkpoint(d)
    model.prefill_form = form
    check_batched_against_hf(model, hf, _turns(3, (23, 14)), cuts=(12, 9))


def test_each_sublayer_keeps_its_own_latent_rows(ckpt):
    """A sequence's rows in KV layer 2i (layer i's first attention) and 2i + 1 (its second) differ: each sublayer
    stores its own latent (a hit read from storage carries both)."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = _turns(5, (17,))[0]
    pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
    table = pool.allocate(8)
    model(SeqBatch.build([seq], [0], [table], 4), pool.layers)
    rows = [layer[table].reshape(-1, layer.shape[-1])[: len(seq)] for layer in pool.layers]
    assert all(float(r.abs().max()) > 0 for r in rows)
    assert all(float((rows[2 * i] - rows[2 * i + 1]).abs().max()) > 1e-2 for i in range(2))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained: transformers' names (the zero experts' unused projections written as zeros, which its
    packed experts read), loaded by transformers with nothing missing, to the same logits."""
    from safetensors.torch import load_file

    d, _ = ckpt
    model = load_checkpoint(d)
    check_save_reads_back(model, tmp_path, transformers.LongcatFlashForCausalLM, _turns(4, (19,))[0])
    assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(load_file(str(d / "model.safetensors")))


def test_released_layouts_load(ckpt, tmp_path):
    """The hub checkpoint's layout: routed experts only (no zero-expert tensors) and multi-token-prediction layers
    under ``model.mtp.``; and transformers' in-memory packed experts. Both load to the same logits."""
    from safetensors.torch import load_file, save_file

    d, hf = ckpt
    tensors = load_file(str(d / "model.safetensors"))
    released = {k: v for k, v in tensors.items()
                if not any(f".mlp.experts.{e}." in k for e in range(ROUTED, ROUTED + ZERO))}
    released["model.mtp.layers.0.eh_proj.weight"] = torch.zeros(64, 128)
    seq = _turns(6, (15,))[0]
    want = hf_logits(hf, seq)
    packed = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in packed)
    for i, layout in enumerate((released, packed)):
        out = tmp_path / str(i)
        out.mkdir()
        (out / "config.json").write_text((d / "config.json").read_text())
        save_file(layout, str(out / "model.safetensors"))
        model = load_checkpoint(out)
        pool = KVPool(model.spec.kv_spec(), num_blocks=8, block_tokens=4)
        got = model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_bf16_teacher_forced_logits(ckpt):
    """In bf16 (the routers in fp32, as transformers keeps them): as close to the fp32 logits as transformers' own
    bf16 forward, over the tokens no layer routes within 5% of a tie."""
    d, hf32 = ckpt
    ours = load_checkpoint(d, dtype="bfloat16")
    assert ours.model.layers[0].mlp.router.classifier.weight.dtype == torch.float32
    assert ours.model.layers[0].self_attn[1].q_b_proj.weight.dtype == torch.bfloat16
    hf = transformers.LongcatFlashForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = _turns(5, (25,))[0]
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(hf32, seq, 3, lambda layer: layer.mlp.router) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("head_dim", 16, "head_dim .* must equal qk_rope_head_dim"),
    ("qk_head_dim", 30, "qk_head_dim"),
    ("router_bias", True, "router_bias"),
    ("zero_expert_type", "zero", "zero_expert_type"),
    ("mla_scale_q_lora", False, "mla_scale_q_lora"),
    ("hidden_act", "tanh", "hidden_act 'tanh'"),
    ("moe_topk", 11, "moe_topk"),
    ("num_layers", 0, "num_layers"),
    ("zero_expert_num", -1, "zero_expert_num"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match=needle):
        load_spec({**cfg, key: value})


def test_odd_num_hidden_layers_is_refused():
    with pytest.raises(ModelError, match="num_hidden_layers must be even"):
        load_spec({"architectures": ["LongcatFlashForCausalLM"], "num_hidden_layers": 5})


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    first, second = _turns(5, (23, 7))
    await cluster_read_paths(LlamaModelConfig(path=str(d), dtype="float32", time_model="off"), hf, first, second, 24)
