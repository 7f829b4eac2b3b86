"""The ModernBERT decoder (``ModernBertDecoderForCausalLM``: the Ettin decoders) against transformers on the same
random weights, saved by transformers: normed embeddings, no norm before the first layer's attention, bias-free
LayerNorms, global and local layers (``local_attention // 2`` tokens) with a RoPE base each, a GLU MLP (``Wi`` /
``Wo``), and its prediction head before a biased decoder tied to the embeddings."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_paged_paths_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    cluster_two_turns,
    load_checkpoint,
    random_turns,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ModernBertDecoderForCausalLM"):
    pytest.skip("no ModernBERT decoder in this transformers", allow_module_level=True)

VOCAB = 101
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
    "num_attention_heads": 4, "local_attention": 10, "max_position_embeddings": 256, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2, "cls_token_id": 2, "sep_token_id": 1}
#: the other switches: biased norms, projections and prediction head, GELU's tanh form, an untied decoder
BIASED = dict(CONFIG, norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False, global_attn_every_n_layers=2)
_CKPTS = Checkpoints({"modernbert-decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", CONFIG),
                      "biased": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", BIASED)})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "modernbert-decoder"
    assert spec.sliding_window == 5 and spec.layer_types == tuple(hf.config.layer_types)
    assert [spec.layer_window(i) for i in range(4)] == [None if t == "full_attention" else 5
                                                        for t in hf.config.layer_types]
    assert spec.tie_embeddings == (family != "biased")
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.ModernBertDecoderForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(ckpt):
    _, d, _ = ckpt
    hf = transformers.ModernBertDecoderForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, sum(random_turns(VOCAB, 5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


def test_hub_configs_read_as_transformers_reads_them(tmp_path):
    """The hub's older keys: ``global_attn_every_n_layers`` for the layer pattern, ``global_rope_theta`` /
    ``local_rope_theta`` for the RoPE bases; the window is half of ``local_attention``."""
    cfg = {"architectures": ["ModernBertDecoderForCausalLM"], "model_type": "modernbert-decoder", **CONFIG,
           "num_hidden_layers": 7, "global_attn_every_n_layers": 3, "global_rope_theta": 50000.0,
           "local_rope_theta": 2000.0, "local_attention": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    spec = load_spec(tmp_path)
    assert spec.layer_types == tuple(hf.layer_types) and spec.sliding_window == hf.sliding_window == 16
    assert spec.rope_by_type == {t: p["rope_theta"] for t, p in hf.rope_parameters.items()}
    assert spec.rope_by_type == {"full_attention": 50000.0, "sliding_attention": 2000.0}


def test_a_saved_sliding_window_over_local_attention(tmp_path_factory):
    """transformers derives the window from ``local_attention`` (half of it), then sets a saved ``sliding_window``
    key over it: a config whose two disagree attends over the saved window, here and there."""
    cfg = transformers.ModernBertDecoderConfig.from_dict({**CONFIG, "sliding_window": 3})
    assert cfg.sliding_window == 3 and cfg.local_attention == 10
    torch.manual_seed(0)
    hf = transformers.ModernBertDecoderForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if ("norm" in n or n.endswith("bias")) else p.mul_(6.0)
    d = tmp_path_factory.mktemp("modernbert_window")
    hf.save_pretrained(d)
    assert load_spec(d).sliding_window == 3
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB, 0))


@pytest.mark.parametrize("change, match", [
    ({"hidden_activation": "tanh"}, "hidden_activation 'tanh' unsupported"),
    ({"local_attention": None}, "local_attention must be an integer >= 2"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "only a 'default' RoPE"),
    ({"norm_bias": "no"}, "norm_bias must be true or false"),
    ({"layer_types": ["full_attention"]}, "layer_types must name"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, match):
    with pytest.raises(ModelError, match=match):
        load_spec({"architectures": ["ModernBertDecoderForCausalLM"], **CONFIG, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    """A two-turn session through the emulated cluster: PE, DE, split and recompute reads give transformers'
    greedy tokens."""
    d, hf = _CKPTS.get("modernbert-decoder", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
