"""GraniteMoE and GraniteMoE-Shared (Granite's scalings over Mixtral's experts, a router that takes the softmax of
its top-k logits; Shared adds an ungated shared expert) against transformers on the same random weights: logits at
every prefill and greedy decode step of several turns over our paged KV, batched sequences, both tensor layouts
(the hub's ``block_sparse_moe.input_linear`` / ``output_linear`` / ``router.layer`` and transformers' packed
in-memory one), bf16, our own ``save_pretrained`` read back by transformers, and bad configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_save_reads_back,
    check_turns_against_hf,
    load_checkpoint,
    random_turns,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "num_hidden_layers": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "embedding_multiplier": 3.0, "attention_multiplier": 0.3,
        "residual_multiplier": 0.6, "logits_scaling": 2.5, "attention_bias": True, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", BASE),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(BASE, shared_intermediate_size=48)),
}
_CKPTS = Checkpoints(FAMILIES)
ckpt = _CKPTS.fixture()


def _load(d, dtype: str = "float32"):
    return load_checkpoint(d, dtype=dtype)


def _turns(seed: int = 0) -> list[list[int]]:
    return random_turns(VOCAB, seed)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(_load(d), hf, _turns())


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    _, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


def test_spec_follows_transformers(ckpt):
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == family and spec.is_moe
    assert (spec.n_experts, spec.n_experts_per_tok, spec.moe_intermediate_size) == (4, 2, 32)
    assert spec.shared_expert_intermediate_size == (48 if family == "granitemoeshared" else 0)
    assert spec.attn_scale == 0.3 and spec.logits_scaling == 2.5 and spec.o_bias
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_both_tensor_layouts_load_the_same(ckpt, tmp_path):
    """The hub's names and transformers' in-memory packed names (either may be on disk) give one model."""
    from safetensors.torch import load_file, save_file

    family, d, hf = ckpt
    on_disk = load_file(str(d / "model.safetensors"))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    # one of the two is what transformers wrote; write the other
    other = sd if any(".input_linear." in k for k in on_disk) else _hub_names(sd)
    assert set(other) != set(on_disk)
    save_file(other, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    a, b = _load(tmp_path), _load(d)
    for name, p in b.named_parameters():
        assert torch.equal(p, dict(a.named_parameters())[name]), name


def _hub_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.replace(".block_sparse_moe.experts.gate_up_proj", ".block_sparse_moe.input_linear.weight")
        k = k.replace(".block_sparse_moe.experts.down_proj", ".block_sparse_moe.output_linear.weight")
        out[k.replace(".block_sparse_moe.router.weight", ".block_sparse_moe.router.layer.weight")] = v
    return out


def test_bf16_teacher_forced_logits(ckpt):
    family, d, _ = ckpt
    hf = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    got, ref = bf16_teacher_forced(_load(d, "bfloat16"), hf, sum(_turns(5), []))
    assert float((got - ref).abs().max()) < 0.03 * float(ref.abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_save_pretrained_reads_back_in_transformers(family, tmp_path):
    cfg_cls, model_cls, kw = FAMILIES[family]
    ours = build_model(ModelSpec.from_hf_config(getattr(transformers, cfg_cls)(**kw).to_dict()), None, seed=3,
                       backend="torch")
    with torch.no_grad():  # a decisive router
        for n, p in ours.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(20.0)
    check_save_reads_back(ours, tmp_path, getattr(transformers, model_cls), sum(_turns(7), []))


@pytest.mark.parametrize("model_type,key,value,needle", [
    ("granitemoe", "num_local_experts", "8", "num_local_experts"),
    ("granitemoe", "num_experts_per_tok", 9, "num_experts_per_tok"),
    ("granitemoe", "residual_multiplier", 0, "residual_multiplier"),
    ("granitemoeshared", "shared_intermediate_size", -4, "shared_expert_intermediate_size"),
])
def test_bad_configs_name_the_key(model_type, key, value, needle):
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(dict(BASE, model_type=model_type, **{key: value}))
