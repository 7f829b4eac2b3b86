"""DeepSeek-V3.2 checkpoints (the paper's model: V3's MLA and MoE plus the DSA lightning indexer), against
transformers' own DeepseekV32ForCausalLM on the same random weights. Within ``index_topk`` tokens the indexer
selects every key, so the attention is V3's dense MLA and the logits must match at every step; past it the context
is refused (sparse selection is not implemented), and a checkpoint without its indexer is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
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
    "routed_scaling_factor": 2.5, "index_topk": 64, "index_n_heads": 2, "index_head_dim": 16,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint saved by transformers (sharded, packed experts) with widened random weights, and its model."""
    d = tmp_path_factory.mktemp("v32")
    torch.manual_seed(0)
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config(**CONFIG)).eval()
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


def test_spec_reads_v32_and_caps_the_context_at_index_topk(ckpt):
    d, _ = ckpt
    spec = load_spec(d, dtype="float32")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "deepseek_v32"
    assert (spec.index_topk, spec.index_n_heads, spec.index_head_dim) == (64, 2, 16)
    assert spec.max_position == 64 and spec.scoring_func == "sigmoid" and spec.first_k_dense_replace == 1
    assert DeepseekV3Spec.from_hf_config(spec.to_hf_config(), dtype="float32") == spec
    v3 = DeepseekV3Spec.from_hf_config({**spec.to_hf_config(), "architectures": ["DeepseekV3ForCausalLM"],
                                        "model_type": "deepseek_v3"}, dtype="float32")
    assert "index_topk" not in v3.to_dict() and v3.fingerprint() != spec.fingerprint()
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ModelError, match="mlp_layer_types.*first_k_dense_replace=1"):
        DeepseekV3Spec.from_hf_config({**cfg, "mlp_layer_types": ["sparse", "dense", "sparse"]})


def test_multi_turn_logits_and_greedy_equal_transformers(ckpt):
    """Three turns over the paged latent prefix (44 tokens, within index_topk), each step's logits against
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


def test_generate_refuses_a_prompt_beyond_index_topk_and_a_checkpoint_without_its_indexer(ckpt, tmp_path, capsys):
    from dualpath.cli import main
    from dualpath.model.loader import read_weights_dir

    d, hf = ckpt
    prompt = [5, 17, 33, 2, 90, 61, 7]
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                 "--ignore-eos", "--device", "cpu", "--json", str(out)]) == 0
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 7:]
    assert json.loads(out.read_text())["runs"][0]["generated_ids"] == want.tolist()
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(["5"] * 60), "--max-new-tokens", "12",
                 "--pool-tokens", "128", "--device", "cpu"]) == 2
    assert "72 tokens exceeds the DeepSeek-V3.2 checkpoint's index_topk of 64" in capsys.readouterr().err
    from dualpath.engine.model_api import LlamaAdapter

    model, _ = load_model(LlamaModelConfig(path=str(d)), with_tokenizer=False)
    with pytest.raises(ModelError, match=r"model\.max_context=128 exceeds the DeepSeek-V3\.2 checkpoint's index_topk"):
        LlamaAdapter(model, 16, 128)
    from safetensors.torch import save_file

    stripped = tmp_path / "no-indexer"
    stripped.mkdir()
    (stripped / "config.json").write_text((d / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in read_weights_dir(d).items() if "indexer.wk." not in k},
              str(stripped / "model.safetensors"))
    with pytest.raises(ModelError, match=r"DeepSeek-V3.2 tensor 'model\.layers\.0\.self_attn\.indexer\.wk\.weight' "
                                         "is missing"):
        load_model(LlamaModelConfig(path=str(stripped)), with_tokenizer=False)
