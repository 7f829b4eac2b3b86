"""Dory (``DoryForCausalLM``: an nGPT decoder on the unit sphere whose middle layers run several loops) against
transformers on the same random weights, saved by transformers: logits at every prefill chunk and decode step over
paged KV (a layer of pages per layer pass, transformers' per-loop cache), batched sequences with different cached
prefixes, Triton, 64-token blocks, bf16, our save_pretrained read back by transformers, the released two-block
layout, and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    Checkpoints,
    bf16_teacher_forced,
    check_bf16_as_close_as_transformers,
    check_long_segments,
    check_paged_paths_against_hf,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.dory import DorySpec, tensors_in
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DoryForCausalLM"):
    pytest.skip("no Dory in this transformers", allow_module_level=True)

VOCAB = 97
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 5, "n_input_layers": 1,
    "n_output_layers": 1, "n_recurrent_loops": 3,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}


class _Checkpoints(Checkpoints):
    """Weights where every part matters: the nGPT scales (``sqk``, ``s_gate``, ``lambda_*``, ``logit_scale``, which
    transformers starts at ``initializer_range``, and ``suv_*``, at one) drawn around them; matrices N(0, 0.2)."""

    def model(self, family: str, seed: int = 0) -> Any:
        cfg_cls, model_cls, kw = self.families[family]
        torch.manual_seed(seed)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        init = hf.config.initializer_range
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("logit_scale"):
                    p.copy_(init * (4 + torch.randn(p.shape, generator=g)))
                elif n.endswith(("sqk", "s_gate", "lambda_1", "lambda_2")):
                    p.copy_(init * (1 + 0.3 * torch.randn(p.shape, generator=g)))
                elif ".suv_" in n:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        return hf


_CKPTS = _Checkpoints({
    "dory": ("DoryConfig", "DoryForCausalLM", CONFIG),
    "variant": ("DoryConfig", "DoryForCausalLM",
                {**CONFIG, "n_recurrent_loops": 1, "n_input_layers": 2, "n_output_layers": 0, "layer_types": None,
                 "num_key_value_heads": 4, "tie_word_embeddings": True,
                 "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1e5}}}),
})
ckpt = _CKPTS.fixture()


def test_fp32_paged_paths_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    check_paged_paths_against_hf(d, hf, VOCAB)
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_spec_passes_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, DorySpec) and spec.architecture == "dory"
    if family == "dory":  # (one input layer, three recurrent layers three times, one output layer)
        assert spec.passes == (0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4) and spec.n_layers == 11
        assert spec.kv_spec().n_layers == 11 and spec.layer_window(4) is None and spec.layer_window(5) == 5
    else:
        assert spec.passes == tuple(range(5)) and spec.module_types[3] == "full_attention"
    assert load_spec(spec.to_hf_config()) == spec
    ours = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(ours, tmp_path, transformers.DoryForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_the_released_two_block_layout(tmp_path_factory, tmp_path):
    """The released layout (each layer stored as an attention block ``layers.{2i}.mixer`` and an MLP block
    ``layers.{2i+1}.mixer``, ``attn_alpha`` / ``mlp_alpha``, the layer counts doubled, ``mlp`` entries in
    ``layer_types``), as transformers reads it: the same logits."""
    import json

    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("dory", tmp_path_factory)
    hub = {}
    for k, v in load_file(str(d / "model.safetensors")).items():
        parts = k.split(".")
        if parts[:2] == ["backbone", "layers"]:
            i, rest = int(parts[2]), parts[3:]
            if rest[0] in ("lambda_1", "lambda_2"):
                k = f"backbone.layers.{2 * i}.{'attn_alpha' if rest[0] == 'lambda_1' else 'mlp_alpha'}"
            else:
                k = f"backbone.layers.{2 * i + (rest[0] == 'mlp')}.mixer." + ".".join(rest[1:])
        hub[k] = v
    save_file(hub, str(tmp_path / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 10 and "mlp" in cfg["layer_types"]  # (transformers writes the doubled counts)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert set(tensors_in(hub)) == set(tensors_in(load_file(str(d / "model.safetensors"))))
    check_two_chunks_against_hf(load_checkpoint(tmp_path), hf, sum(random_turns(VOCAB, 3), []), cut=6)


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("dory", tmp_path_factory)
    hf = transformers.DoryForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["DoryForCausalLM"], "model_type": "dory", **CONFIG}
    for change, match in (({"recurrent_kv_cache_mode": "last_loop"}, "recurrent_kv_cache_mode"),
                          ({"n_input_layers": 3, "n_output_layers": 2}, "n_input_layers"),
                          ({"n_recurrent_layers": 2}, "n_recurrent_layers"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"layer_types": ["sliding_attention", "chunked_attention"] * 2 + ["full_attention"]},
                           "layer_types")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("dory", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
