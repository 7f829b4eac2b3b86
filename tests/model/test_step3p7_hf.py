"""Step 3.7's language model (``Step3p7ForConditionalGeneration``, text config ``step3p5``): Gemma-normed GQA whose
sliding layers have their own query-head count and RoPE (partial on the full layers), scores scaled by
``query_pre_attn_scalar``, a sigmoid gate per head, clamped SwiGLUs per layer, a sigmoid-routed MoE with a shared
expert; against transformers' image-text model on random weights it wrote (the released tensor layout). Windows of
6 keys: from the seventh token on the window decides the logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    LanguageModelView,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_text_config_refused,
    check_turns_against_hf,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.model import KVPool, SeqBatch
from dualpath.model.loader import save_pretrained
from dualpath.model.spec import load_spec
from dualpath.model.step3p7 import Step3p7Spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Step3p7ForConditionalGeneration"):
    pytest.skip("no Step 3.7 in this transformers", allow_module_level=True)

VOCAB = 97
TEXT: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_sliding_attention_heads": 2, "sliding_window": 6,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "moe_intermediate_size": 16, "share_expert_dim": 24,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_router_scaling_factor": 1.5,
    "swiglu_limits": [0, 0, 0, 1.0], "swiglu_limits_shared": [1.5, 0, 0, 1.5], "query_pre_attn_scalar": 20,
    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                                           "partial_rotary_factor": 0.5}},
    "max_position_embeddings": 256, "pad_token_id": 0}
VISION: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformers' image-text model, its language model's norms N(0, 0.3) (Gemma's ``1 + weight``), other weights
    x4, live correction biases; the head x3."""
    torch.manual_seed(0)
    hf = transformers.Step3p7ForConditionalGeneration(
        transformers.Step3p7Config(text_config=TEXT, vision_config=VISION)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.model.language_model.named_parameters():
            if "norm" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
        hf.lm_head.weight.mul_(3.0)
    d = tmp_path_factory.mktemp("step3p7")
    hf.save_pretrained(d)
    return d, hf


def test_spec_reads_the_image_text_config(ckpt):
    d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, Step3p7Spec) and spec.architecture == "step3p5"
    assert spec.layer_heads == (2, 4, 2, 4) and spec.dense_layers == (0,) and spec.sliding_window == 6
    assert spec.rope_by_type == {"sliding_attention": (10000.0, 1.0), "full_attention": (500000.0, 0.5)}
    assert spec.expert_limits == (0, 0, 0, 1.0) and spec.shared_limits == (1.5, 0, 0, 1.5)
    assert load_spec(spec.to_hf_config()) == spec
    # the image-text model ties its head by its own config (no key: untied), never by the text config's
    tied = {"architectures": ["Step3p7ForConditionalGeneration"], "text_config": {**TEXT, "tie_word_embeddings": True}}
    built = transformers.Step3p7ForConditionalGeneration(transformers.Step3p7Config(
        text_config={**TEXT, "tie_word_embeddings": True}, vision_config=VISION))
    assert load_spec(tied).tie_embeddings is False
    assert built.lm_head.weight is not built.model.language_model.embed_tokens.weight
    # the legacy keys Step3p7TextConfig reads: per-layer RoPE lists, moe_layers_enum, attention_other_setting, MTP
    legacy = {k: v for k, v in TEXT.items() if k not in ("rope_parameters", "mlp_layer_types",
                                                         "num_sliding_attention_heads")}
    legacy.update(rope_theta=[1e4, 5e5, 1e4, 5e5, 5e5], partial_rotary_factors=[1.0, 0.5, 1.0, 0.5, 0.5],
                  moe_layers_enum="2,3", attention_other_setting={"num_attention_heads": 2},
                  num_nextn_predict_layers=1, layer_types=TEXT["layer_types"] + ["full_attention"],
                  swiglu_limits=[0, 0, 0, 1.0, 0], swiglu_limits_shared=[1.5, 0, 0, 1.5, 0])
    theirs = transformers.Step3p7TextConfig(**legacy)
    ours = load_spec({"architectures": ["Step3p7ForConditionalGeneration"], "text_config": legacy})
    assert [i in ours.dense_layers for i in range(4)] == [t == "dense" for t in theirs.mlp_layer_types]
    assert ours.layer_types == tuple(theirs.layer_types) and ours.mtp_layers == 1
    assert ours.layer_heads == (2, 4, 2, 4) and ours.expert_limits == (0, 0, 0, 1.0)
    assert {t: (p["rope_theta"], p.get("partial_rotary_factor", 1.0)) for t, p in theirs.rope_parameters.items()} \
        == ours.rope_by_type
    # a per_layer_config that is given is every override there is: the sliding head count builds one only when it is
    # left out (transformers' model then has 4 heads in every layer; the count was read over it before)
    given = {**TEXT, "per_layer_config": {"2": {"num_attention_heads": 2}}}
    theirs_heads = [a.num_attention_heads if hasattr(a, "num_attention_heads") else a.q_proj.out_features // 16
                    for a in (layer.self_attn for layer in transformers.Step3p7ForConditionalGeneration(
                        transformers.Step3p7Config(text_config=given, vision_config=VISION)).model.language_model.layers)]
    assert load_spec({"architectures": ["Step3p7ForConditionalGeneration"], "text_config": given}).layer_heads \
        == tuple(theirs_heads) == (4, 4, 2, 4)


def test_turns_batches_and_the_triton_kernels_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_two_chunks_against_hf(load_checkpoint(d, "triton"), hf, sum(random_turns(VOCAB, 3), []))


def test_the_clamps_and_gates_act(ckpt):
    """The fixture's clamps bind (some gate or up value past its bound in the clamped layers) and its gates are not
    all open, so the logits above check them."""
    d, _ = ckpt
    model = load_checkpoint(d)
    seq = sum(random_turns(VOCAB, 4), [])
    seen: dict[str, float] = {}
    mlp = model.model.layers[3].mlp.shared_experts
    gate_hook = mlp.gate_proj.register_forward_hook(
        lambda m, a, out: seen.__setitem__("gate", float(torch.nn.functional.silu(out).max())))
    g_hook = model.model.layers[1].self_attn.g_proj.register_forward_hook(
        lambda m, a, out: seen.__setitem__("g", float(torch.sigmoid(out).min())))
    try:
        pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
        model(SeqBatch.build([seq], [0], [pool.allocate(16)], 4), pool.layers)
    finally:
        gate_hook.remove()
        g_hook.remove()
    assert seen["gate"] > 1.5 and seen["g"] < 0.5


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    """Our save_pretrained writes the released layout (experts stacked per projection, ``moe.router_bias``,
    ``share_expert``) and the image-text config; transformers loads it (only its vision parts missing) to the same
    logits. transformers' in-memory names (packed experts) and a checkpoint with a multi-token-prediction layer
    load too."""
    from safetensors.torch import load_file, save_file

    d, hf = ckpt
    ours = load_checkpoint(d)
    save_pretrained(ours, tmp_path / "ours")
    theirs = {k for k in load_file(str(d / "model.safetensors")) if not k.startswith(("vision_model.",
                                                                                       "vit_large_projector."))}
    assert sorted(load_file(str(tmp_path / "ours" / "model.safetensors"))) == sorted(theirs)
    cfg = transformers.Step3p7Config.from_pretrained(str(tmp_path / "ours"))
    cfg.vision_config = hf.config.vision_config  # (ours names no vision tower: a small one to build)
    hf2, info = transformers.Step3p7ForConditionalGeneration.from_pretrained(
        str(tmp_path / "ours"), config=cfg, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] and all("vision" in k or "projector" in k for k in info["missing_keys"]), info
    assert not info["unexpected_keys"], info
    seq = random_turns(VOCAB, 7, (15,))[0]
    check_two_chunks_against_hf(ours, hf2.eval(), seq, cut=15)
    memory = {k: v.contiguous() for k, v in hf.state_dict().items()}
    memory["model.language_model.layers.4.self_attn.q_proj.weight"] = torch.zeros(64, 64)  # (an MTP layer)
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "config.json").write_text((d / "config.json").read_text())
    save_file(memory, str(tmp_path / "mem" / "model.safetensors"))
    check_two_chunks_against_hf(load_checkpoint(tmp_path / "mem"), hf, seq, cut=15)


def test_bf16_teacher_forced_logits(ckpt):
    """In bf16: as close to the fp32 logits as transformers' own bf16 forward, over the tokens no layer routes
    within 5% of a tie."""
    d, hf32 = ckpt
    ours = load_checkpoint(d, dtype="bfloat16")
    hf = transformers.Step3p7ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(ours, hf, seq)
    rows = routing_margins(LanguageModelView(hf32), seq, 2, lambda layer: getattr(layer.mlp, "gate", None)) > 0.05
    assert int(rows.sum()) >= len(seq) // 3
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq), rows=rows)


@pytest.mark.parametrize("key,value,needle", [
    ("use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("gating", "per-token", "gating"),
    ("per_layer_config", {"0": {"num_attention_heads": 3}}, "multiple of num_key_value_heads"),
    ("swiglu_limits", [0, 0, -1.0, 0], "swiglu_limits"),
    ("swiglu_limits_shared", [0, 0], "swiglu_limits_shared"),
    ("rope_parameters", {"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1e4}}, "only a 'default' RoPE"),
    ("per_layer_config", {"1": {"head_dim": 8}}, "per_layer_config"),
])
def test_bad_configs_name_the_key(ckpt, key, value, needle):
    check_text_config_refused(ckpt[0], key, value, needle)


@pytest.mark.anyio
async def test_cluster_every_read_path(ckpt):
    d, hf = ckpt
    await cluster_two_turns(d, hf, VOCAB)
