"""Inkling (``InklingForCausalLM``: relative logit biases instead of RoPE, short convolutions on keys, values and
both halves' outputs, full and sliding layers with their own heads, an fp32 sigmoid router whose shared experts are
its sink) against transformers on the same random weights, saved by transformers: logits at every prefill chunk and
decode step over pages holding KV rows and four convolution states, batched sequences with different cached prefixes,
64-token blocks and query tiles, bf16, a hit from a stored Full Block's page (and not once its states are zeroed),
our save_pretrained read back by transformers, the image-text checkpoint's language model under its own names, and a
two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
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
from dualpath.model.inkling import InklingSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "InklingForCausalLM"):
    pytest.skip("no Inkling in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "swa_num_attention_heads": 2, "swa_num_key_value_heads": 1,
    "swa_head_dim": 12, "sliding_window_size": 6, "d_rel": 4, "rel_extent": 10, "conv_kernel_size": 3,
    "intermediate_size": 24, "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "log_scaling_n_floor": 4,
    "layer_types": ["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"], "logits_mup_width_multiplier": 0.5,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """Weights where every part matters (transformers starts the global scales at one and the correction bias at
    zero): matrices N(0, 0.2), convolutions N(0, 0.3), the relative logit banks N(0, 1)."""

    def model(self, family: str, seed: int = 0) -> Any:
        cfg_cls, model_cls, kw = self.families[family]
        torch.manual_seed(seed)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                elif "global_scale" in n:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                elif "sconv" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif n.endswith("rel_logits_proj.proj"):
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            for n, b in hf.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.copy_(0.1 * torch.randn(b.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "inkling": ("InklingTextConfig", "InklingForCausalLM", CONFIG),
    "variant": ("InklingTextConfig", "InklingForCausalLM",
                {**CONFIG, "layer_types": None, "num_hidden_layers": 6, "mlp_layer_types": None,
                 "log_scaling_n_floor": None, "n_shared_experts": 2, "num_experts_per_tok": 1, "conv_kernel_size": 2,
                 "unpadded_vocab_size": 90, "swa_head_dim": 8, "swa_num_attention_heads": 4}),
})
ckpt = _CKPTS.fixture()


def test_fp32_turns_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)
    check_two_chunks_against_hf(load_checkpoint(d), hf, sum(random_turns(VOCAB, 3), []), cut=6)


def test_query_tiles_give_the_same_logits(tmp_path_factory, monkeypatch):
    from dualpath.model import inkling

    monkeypatch.setattr(inkling, "_TILE", 5)
    d, hf = _CKPTS.get("inkling", tmp_path_factory)
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_a_hit_continues_from_the_stored_convolution_states(tmp_path_factory):
    d, hf = _CKPTS.get("inkling", tmp_path_factory)
    ours = load_checkpoint(d)
    spec = ours.spec
    d_max = max(spec.head_dim, spec.swa_head_dim)
    rows = 4 * 2 * -(-spec.kv_width // d_max) * d_max  # (a 4-token page's KV rows; the states follow them)
    check_hit_from_stored_state(ours, hf, VOCAB, state_part=lambda page: page.flatten()[rows:])


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, InklingSpec) and spec.architecture == "inkling_text"
    if family == "variant":  # (transformers' default patterns: full every sixth layer, every MLP sparse)
        assert spec.layer_types == ("hybrid_sliding",) * 5 + ("hybrid",) and spec.mlp_types == ("sparse",) * 6
        assert spec.unpadded_vocab == 90
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.InklingForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d)


def _interleaved(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``gate_0 .. gate_{I-1}, up_0 .. up_{I-1}`` along ``dim`` as the released checkpoints' ``gate_0, up_0, ...``."""
    shape = list(t.shape)
    shape[dim:dim + 1] = [2, shape[dim] // 2]
    return t.reshape(shape).transpose(dim, dim + 1).reshape(t.shape).contiguous()


def test_the_released_image_text_names(tmp_path_factory, tmp_path):
    """The released image-text checkpoint's layout, written here from the text checkpoint (``model.llm.*``, ``wq_du``
    ..., gate and up rows interleaved in ``w13``, a vision tensor beside): the text model's logits. (The next test
    has transformers write it, where scipy is installed.)"""
    import json

    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("inkling", tmp_path_factory)
    names = {"self_attn.q_proj.": "attn.wq_du.", "self_attn.k_proj.": "attn.wk_dv.", "self_attn.v_proj.": "attn.wv_dv.",
             "self_attn.r_proj.": "attn.wr_du.", "self_attn.o_proj.": "attn.wo_ud.", "self_attn.q_norm.": "attn.q_norm.",
             "self_attn.k_norm.": "attn.k_norm.", "self_attn.k_sconv.conv1d.": "attn.k_sconv.",
             "self_attn.v_sconv.conv1d.": "attn.v_sconv.", "self_attn.rel_logits_proj.": "attn.rel_logits_proj.",
             "attn_sconv.conv1d.": "attn_sconv.", "mlp_sconv.conv1d.": "mlp_sconv.",
             "post_attention_layernorm.": "mlp_norm.", "input_layernorm.": "attn_norm.",
             "mlp.gate.e_score_correction_bias": "mlp.gate.bias", "mlp.experts.down_proj": "mlp.experts.w2_weight",
             "mlp.down_proj.weight": "mlp.w2_md.weight", "mlp.shared_experts.down_proj": "mlp.shared_experts.shared_w2_weight"}
    text = load_file(str(d / "model.safetensors"))
    hub: dict[str, torch.Tensor] = {"model.visual.final_norm.weight": torch.ones(4)}
    top = {"model.embed_tokens.weight": "model.llm.embed.weight", "lm_head.weight": "model.llm.unembed.weight",
           "model.embed_tokens.embed_norm.weight": "model.llm.embed_norm.weight", "model.norm.weight": "model.llm.norm.weight"}
    for k, v in text.items():
        if k in top:
            hub[top[k]] = v
            continue
        k = "model.llm." + k[len("model."):]
        if k.endswith("mlp.experts.gate_up_proj"):
            hub[k.replace("gate_up_proj", "w13_weight")] = _interleaved(v, 1)
        elif k.endswith("mlp.shared_experts.gate_proj"):
            up = text["model." + k[len("model.llm."):].replace("gate_proj", "up_proj")]
            hub[k.replace("gate_proj", "shared_w13_weight")] = _interleaved(torch.cat((v, up), dim=1), 1)
        elif k.endswith("mlp.gate_proj.weight"):
            up = text["model." + k[len("model.llm."):].replace("gate_proj", "up_proj")]
            hub[k.replace("gate_proj.weight", "w13_dn.weight")] = _interleaved(torch.cat((v, up), dim=0), 0)
        elif not k.endswith(("up_proj", "up_proj.weight")):
            for ours, theirs in names.items():
                k = k.replace(ours, theirs)
            hub[k] = v
    save_file(hub, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InklingForConditionalGeneration"], "model_type": "inkling_mm_model",
        "text_config": {**CONFIG, "model_type": "inkling_text"}}))
    assert load_spec(tmp_path) == load_spec(d)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []), cut=6)


def test_the_image_text_checkpoints_language_model(tmp_path_factory, tmp_path):
    """An ``InklingForConditionalGeneration`` checkpoint (written by transformers: the released names,
    ``model.llm.*``, gate and up rows interleaved) serves its language model: the text model's logits on the same
    weights."""
    pytest.importorskip("scipy")  # (transformers' Inkling image-text model imports it)
    d, hf = _CKPTS.get("inkling", tmp_path_factory)
    cfg = transformers.InklingConfig(
        text_config=dict(CONFIG),
        vision_config={"text_hidden_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": 4},
        audio_config={"text_hidden_size": 32})
    mm = transformers.InklingForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        missing = mm.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in hf.state_dict().items() if k.startswith("model.")}, strict=False)
        assert not missing.missing_keys
        mm.lm_head.weight.copy_(hf.lm_head.weight)
    mm.save_pretrained(tmp_path)
    spec = load_spec(tmp_path)
    assert isinstance(spec, InklingSpec) and spec == load_spec(d)
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []), cut=6)


def test_default_patterns_and_older_keys_read_as_transformers_reads_them():
    """Without ``layer_types`` / ``mlp_layer_types``: transformers' defaults, ``local_layer_ids`` and
    ``dense_mlp_idx``; ``dense_intermediate_size`` (then ``intermediate_size`` is the experts' width)."""
    base = {k: v for k, v in CONFIG.items() if k not in ("layer_types", "mlp_layer_types")}
    for extra in ({"num_hidden_layers": 13}, {"local_layer_ids": [0, 2]}, {"dense_mlp_idx": 2},
                  {"dense_intermediate_size": 40, "intermediate_size": 20}):
        cfg = {**base, **extra}
        theirs = transformers.InklingTextConfig(**dict(cfg))
        spec = load_spec({"architectures": ["InklingForCausalLM"], "model_type": "inkling_text", **cfg})
        assert list(spec.layer_types) == list(theirs.layer_types), extra
        assert list(spec.mlp_types) == list(theirs.mlp_layer_types), extra
        assert (spec.intermediate_size, spec.expert_width) == (theirs.intermediate_size,
                                                                theirs.moe_intermediate_size), extra


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("inkling", tmp_path_factory)
    hf = transformers.InklingForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["InklingForCausalLM"], "model_type": "inkling_text", **CONFIG}
    for change, match in (({"layer_types": ["hybrid", "full_attention"] * 2}, "layer_types"),
                          ({"mlp_layer_types": ["dense", "moe", "sparse", "sparse"]}, "mlp_layer_types"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"swa_num_key_value_heads": 3}, "swa_num_key_value_heads"),
                          ({"n_shared_experts": 0}, "n_shared_experts"),
                          ({"unpadded_vocab_size": 200}, "unpadded_vocab_size")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("inkling", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
