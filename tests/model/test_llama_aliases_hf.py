"""Checkpoints transformers runs as Llama under other names: EXAONE 3 / 3.5 (``ExaoneForCausalLM``: GPT-2-like
tensor names ``transformer.h.N.attn.attention.q_proj`` and config keys ``num_layers``, ``layer_norm_epsilon``,
``activation_function``) and InternLM3 (``InternLM3ForCausalLM``: ``qkv_bias`` / ``bias``). Each is read as the Llama
it is, from what transformers' ``save_pretrained`` writes and from the hub's own spellings, and gives transformers'
logits; disagreeing keys are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import hf_logits

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")

BASE = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "num_hidden_layers": 2, "bos_token_id": None,
        "eos_token_id": None, "pad_token_id": None}
#: the hub's spellings of each family's config (what the checkpoints on the hub carry)
HUB = {"exaone": ("ExaoneForCausalLM", {"num_hidden_layers": "num_layers", "rms_norm_eps": "layer_norm_epsilon",
                                         "hidden_act": "activation_function"}),
       "internlm3": ("InternLM3ForCausalLM", {"attention_bias": "qkv_bias", "mlp_bias": "bias"})}


def _checkpoint(family: str, d) -> torch.nn.Module:
    cls = {"exaone": "ExaoneConfig", "internlm3": "InternLM3Config"}[family]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**BASE)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in n else p.mul_(6.0)
    hf.save_pretrained(d)
    return hf


def _logits(d, seq: list[int]) -> torch.Tensor:
    model = load_model(LlamaModelConfig(path=str(d), attention_backend="torch"), with_tokenizer=False)[0]
    assert model.spec.architecture == "llama"
    pool = KVPool(model.spec.kv_spec(), num_blocks=16, block_tokens=4)
    table = pool.allocate(16)
    return torch.cat([model(SeqBatch.build([seq[:9]], [0], [table], 4), pool.layers, all_positions=True),
                      model(SeqBatch.build([seq[9:]], [9], [table], 4), pool.layers, all_positions=True)])


@pytest.mark.parametrize("family", list(HUB))
def test_read_as_llama_equals_transformers(family, tmp_path):
    hf = _checkpoint(family, tmp_path)
    seq = torch.randint(0, 97, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, seq)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(_logits(tmp_path, seq), ref, atol=2e-4, rtol=1e-4)
    # the hub's spellings: the family's own architecture name and config keys
    arch, keys = HUB[family]
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = [arch]
    for ours, theirs in keys.items():
        if ours in cfg:
            cfg[theirs] = cfg.pop(ours)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(_logits(tmp_path, seq), ref, atol=2e-4, rtol=1e-4)
    if family == "exaone":  # (its tensors were written under EXAONE's own names)
        from safetensors.torch import load_file

        assert any(".attn.attention.q_proj." in k for k in load_file(str(tmp_path / "model.safetensors")))


def test_disagreeing_keys_are_read_as_transformers_reads_them():
    """EXAONE's alias (``num_layers``) beside the key it names is the one read, as transformers' ExaoneConfig sets
    it; InternLM3's two bias switches must agree (it runs as Llama, one bias setting)."""
    spec = ModelSpec.from_hf_config(dict(BASE, architectures=["ExaoneForCausalLM"], model_type="exaone", num_layers=3))
    assert spec.n_layers == 3
    if hasattr(transformers, "ExaoneConfig"):
        assert transformers.ExaoneConfig.from_dict(dict(BASE, num_layers=3)).num_hidden_layers == 3
    with pytest.raises(ModelError, match="qkv_bias and bias must be equal"):
        ModelSpec.from_hf_config(dict(BASE, architectures=["InternLM3ForCausalLM"], model_type="internlm3",
                                      qkv_bias=True, bias=False))
