"""MiniCPM3 (``MiniCPM3ForCausalLM``: DeepSeek-V2's MLA over a paged latent cache with plain RoPE halves, a dense
SwiGLU MLP, MiniCPM's embedding / residual / logit scalings; LongRoPE within its original context) against
transformers on random weights transformers wrote."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import check_save_reads_back, check_turns_against_hf, load_checkpoint, random_turns

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MiniCPM3ForCausalLM"):
    pytest.skip("this transformers has no MiniCPM3", allow_module_level=True)

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "q_lora_rank": 24, "max_position_embeddings": 256, "scale_emb": 12,
        "scale_depth": 1.4, "dim_model_base": 16}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0]}
CONFIGS = {
    "q-lora": BASE,
    # no q-LoRA, MiniCPM3-4B's LongRoPE (its short factors: the context stops at the original one)
    "longrope": dict(BASE, q_lora_rank=None, rope_parameters=LONGROPE),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.MiniCPM3ForCausalLM(transformers.MiniCPM3Config(**CONFIGS[request.param])).eval()
    with torch.no_grad():  # widen the norms around one; the weights (init 0.1 here) times two
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(2.0)
    d = tmp_path_factory.mktemp(f"minicpm3-{request.param}")
    hf.save_pretrained(d)
    return d, hf


def test_reads_as_mla_with_minicpm_scalings(ckpt):
    d, _ = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "minicpm3"
    assert not any(spec.is_moe_layer(i) for i in range(3)) and not spec.rope_interleave and spec.tie_embeddings
    assert spec.scale_emb == 12 and spec.logits_scaling == 4.0
    assert spec.residual_scale == pytest.approx(1.4 / 3 ** 0.5)
    assert spec.v_head_dim == 16  # hidden_size / heads, transformers' default


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_save_reads_back_in_transformers(ckpt, tmp_path):
    d, _ = ckpt
    check_save_reads_back(load_checkpoint(d), tmp_path, transformers.MiniCPM3ForCausalLM,
                          random_turns(VOCAB, seed=3, lens=(17,))[0])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["MiniCPM3ForCausalLM"] and saved["scale_emb"] == 12


def test_deepseek_specs_keep_their_keys():
    """MiniCPM3's fields stay out of every other MLA model's dict (so their block keys do not change)."""
    spec = DeepseekV3Spec(vocab_size=10, hidden_size=8, intermediate_size=8, moe_intermediate_size=0, n_layers=1,
                          n_heads=1, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2,
                          first_k_dense_replace=1)
    assert not {"scale_emb", "residual_scale", "logits_scaling"} & set(spec.to_dict())
    with pytest.raises(ModelError, match="MiniCPM3's"):
        DeepseekV3Spec(**{**spec.__dict__, "weights_id": "", "scale_emb": 2.0})


def test_longrope_past_its_original_context_is_refused(ckpt, tmp_path):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = dict(LONGROPE, original_max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="original_max_position_embeddings"):
        load_spec(tmp_path / "config.json")


def test_triton_kernels_agree_with_transformers(ckpt):
    """The MLA Triton kernels (the interpreter on CPU) under MiniCPM3's scalings: a prompt in two chunks."""
    from hf_random import check_two_chunks_against_hf

    d, hf = ckpt
    check_two_chunks_against_hf(load_checkpoint(d, backend="triton"), hf, random_turns(VOCAB, seed=5, lens=(21,))[0])
