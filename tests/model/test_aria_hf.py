"""Aria's language model (``AriaTextForCausalLM``, and ``AriaForConditionalGeneration`` serving it) against
transformers on the same random weights, saved by transformers: Llama's attention over MoE in every layer, the top-k
experts by router logit weighted by their softmax, plus a shared MLP (``moe_num_shared_experts`` x
``intermediate_size``) summed with them. Its checkpoints store the experts as ``x @ w`` (``experts.fc1 [E, H,
2I]``, ``experts.fc2 [E, I, H]``), which our ``save_pretrained`` writes back."""

from __future__ import annotations

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_paged_paths_against_hf,
    check_save_reads_back,
    load_checkpoint,
    random_turns,
    routing_margins,
    two_sequences,
)

from dualpath.errors import ModelError
from dualpath.model import ModelSpec
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "AriaTextForCausalLM"):
    pytest.skip("no Aria in this transformers", allow_module_level=True)

VOCAB = 97
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "moe_num_experts": 4,
        "moe_topk": 2, "moe_num_shared_experts": 2, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
_CKPTS = Checkpoints({"aria_text": ("AriaTextConfig", "AriaTextForCausalLM", TEXT)})
ckpt = _CKPTS.fixture()


def test_fp32_multi_turn_logits_batches_and_triton(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)


def test_spec_and_our_save_pretrained(ckpt, tmp_path):
    _, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == "aria_text"
    assert (spec.n_experts, spec.n_experts_per_tok, spec.moe_intermediate_size,
            spec.shared_expert_intermediate_size) == (4, 2, 32, 64)
    assert all(spec.is_moe_layer(i) for i in range(3))
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.AriaTextForCausalLM, sum(random_turns(VOCAB, 7), []))


def test_bf16_teacher_forced_logits(ckpt):
    """bf16 on both sides, within 3% of the logit range on the tokens whose router logits do not nearly tie."""
    _, d, hf32 = ckpt
    hf = transformers.AriaTextForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    rows = routing_margins(hf32, seq, 2, lambda layer: layer.mlp.router) > 0.05
    assert int(rows.sum()) >= len(seq) // 2
    assert float((got - ref).abs().max(dim=1).values[rows].max()) < 0.03 * float(ref.abs().max())


def test_the_image_text_checkpoint_serves_its_language_model(tmp_path):
    """``AriaForConditionalGeneration`` as transformers writes it (``language_model.model.``, the vision tower and
    cross-attention projector beside it)."""
    from dualpath.model.config import LlamaModelConfig
    from dualpath.model.loader import load_model

    vision = dict(transformers.AriaConfig().to_dict()["vision_config"], hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.AriaConfig(text_config=TEXT, vision_config=vision, projector_patch_to_query_dict={4: 4},
                                  image_token_id=VOCAB - 1)
    torch.manual_seed(2)
    hf = transformers.AriaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name else p.mul_(4.0)
    hf.save_pretrained(tmp_path)
    ours = load_model(LlamaModelConfig(path=str(tmp_path), time_model="off"), with_tokenizer=False)[0]
    assert ours.spec.architecture == "aria_text"
    check_batched_against_hf(ours, hf, two_sequences(VOCAB))


def test_an_activation_we_do_not_run_is_refused_by_name():
    with pytest.raises(ModelError, match="hidden_act 'tanh'"):
        load_spec({"architectures": ["AriaTextForCausalLM"], **TEXT, "hidden_act": "tanh"})
