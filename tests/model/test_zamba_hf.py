"""Zamba v1 (``ZambaForCausalLM``: multi-head Mamba-1 blocks and one shared transformer block on ``[hidden,
embeddings]`` in the hybrid layers) against transformers on the same random weights, saved by transformers: logits of
chunked prefills and decode steps over pages holding KV rows and a Mamba state (against transformers' full forward:
its cached prefill of a later chunk restarts the scan), batched sequences with different cached prefixes, 64-token
blocks, bf16, a hit from a stored Full Block's page, our save_pretrained read back by transformers (the shared block
stored once), and a two-turn session through the emulated cluster on every read path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_random import (
    RecurrentCheckpoints,
    bf16_teacher_forced,
    check_batched_against_hf,
    check_bf16_as_close_as_transformers,
    check_hit_from_stored_state,
    check_long_segments,
    check_save_reads_back,
    check_two_chunks_against_hf,
    cluster_two_turns,
    hf_logits,
    load_checkpoint,
    random_turns,
    two_sequences,
)
from test_kimi_linear_hf import _names

from dualpath.errors import ModelError
from dualpath.model.loader import build_model
from dualpath.model.spec import load_spec
from dualpath.model.zamba import ZambaSpec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ZambaForCausalLM"):
    pytest.skip("no Zamba in this transformers", allow_module_level=True)

VOCAB = 97
KINDS = ["mamba", "hybrid", "mamba", "hybrid", "hybrid"]
CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 5,
    "num_attention_heads": 4, "num_key_value_heads": 2, "n_mamba_heads": 2, "mamba_d_state": 8,
    "layers_block_type": KINDS, "use_mamba_kernels": False, "pad_token_id": None, "bos_token_id": None,
    "eos_token_id": None}


class _Checkpoints(RecurrentCheckpoints):
    """Time steps that keep the scan's state for several tokens: each head's ``dt_proj_bias`` around -1 (the
    widening x6 would make it forget at once)."""

    def model(self, family: str, seed: int = 0) -> Any:
        hf = super().model(family, seed)
        g = torch.Generator().manual_seed(seed + 3)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("dt_proj_bias"):
                    p.copy_(torch.randn(p.shape, generator=g) - 1.0)
        return hf


_CKPTS = _Checkpoints({
    "zamba": ("ZambaConfig", "ZambaForCausalLM", CONFIG),
    "variant": ("ZambaConfig", "ZambaForCausalLM",
                {**CONFIG, "layers_block_type": ["hybrid", "mamba", "mamba", "hybrid", "mamba"], "n_mamba_heads": 4,
                 "num_key_value_heads": 4, "attention_head_dim": 8, "mamba_d_conv": 3, "mamba_dt_rank": 3,
                 "mamba_conv_bias": False, "mamba_proj_bias": True, "tie_word_embeddings": False}),
})
ckpt = _CKPTS.fixture()


def test_fp32_chunks_batches_and_64_token_blocks(ckpt):
    _, d, hf = ckpt
    seq = sum(random_turns(VOCAB, 3), [])
    for cut in (6, 13):
        check_two_chunks_against_hf(load_checkpoint(d), hf, seq, cut=cut)
    check_batched_against_hf(load_checkpoint(d), hf, two_sequences(VOCAB))
    check_long_segments(load_checkpoint(d), hf, VOCAB)


def test_a_hit_continues_from_the_stored_state(tmp_path_factory):
    d, hf = _CKPTS.get("zamba", tmp_path_factory)
    check_hit_from_stored_state(load_checkpoint(d), hf, VOCAB)


def test_spec_the_shared_block_and_our_save_pretrained(ckpt, tmp_path):
    family, d, _ = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ZambaSpec) and spec.architecture == "zamba"
    if family == "zamba":  # (ZambaConfig's derived sizes: heads 2 x hidden / heads wide, dt rank ceil(hidden / 16))
        assert spec.layer_types == tuple(KINDS) and spec.head_dim == 16 and spec.dt_rank == 2
    ours = load_checkpoint(d)
    blocks = {id(ours.model.layers[i].shared_transf) for i in spec.hybrid_layers}
    # (transformers ties the hybrid layers' blocks, storing one, only under tie_word_embeddings; else each its own)
    assert len(blocks) == (1 if spec.tie_embeddings else len(spec.hybrid_layers))
    assert load_spec(spec.to_hf_config()) == spec
    fresh = build_model(spec, None, seed=3, backend="torch")
    check_save_reads_back(fresh, tmp_path, transformers.ZambaForCausalLM, sum(random_turns(VOCAB, 7), []))
    assert _names(tmp_path) == _names(d) - ({"lm_head.weight"} if spec.tie_embeddings else set())


def test_a_checkpoint_storing_a_later_layers_block_gives_that_layer_its_own(tmp_path_factory, tmp_path):
    """A copy of the shared block under a later hybrid layer (changed, so that it matters) is that layer's own; the
    third hybrid layer still shares the first's."""
    import shutil

    from safetensors.torch import load_file, save_file

    d, hf = _CKPTS.get("zamba", tmp_path_factory)
    tensors = load_file(str(d / "model.safetensors"))
    first = "model.layers.1.shared_transf."
    copies = {k.replace(first, "model.layers.3.shared_transf."): v * 1.5 for k, v in tensors.items()
              if k.startswith(first)}
    save_file({**tensors, **copies}, str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    ours = load_checkpoint(tmp_path)
    layers = ours.model.layers
    assert layers[3].shared_transf is not layers[1].shared_transf and layers[4].shared_transf is layers[1].shared_transf
    assert torch.equal(layers[3].shared_transf.self_attn.q_proj.weight, copies[
        "model.layers.3.shared_transf.self_attn.q_proj.weight"])
    theirs = transformers.ZambaForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():  # (transformers' own model with that layer's block changed the same way)
        theirs.model.layers[3].shared_transf = type(theirs.model.layers[1].shared_transf)(theirs.config)
        theirs.model.layers[3].shared_transf.load_state_dict(
            {k[len("model.layers.3.shared_transf."):]: v for k, v in copies.items()})
    assert hf is not theirs
    check_two_chunks_against_hf(ours, theirs.eval(), sum(random_turns(VOCAB, 3), []))


def test_bf16_teacher_forced_logits(tmp_path_factory):
    d, hf32 = _CKPTS.get("zamba", tmp_path_factory)
    hf = transformers.ZambaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(random_turns(VOCAB, 5), [])
    got, ref = bf16_teacher_forced(load_checkpoint(d, dtype="bfloat16"), hf, seq)
    check_bf16_as_close_as_transformers(got, ref, hf_logits(hf32, seq))


def test_the_default_layer_pattern_is_transformers():
    cfg = {k: v for k, v in CONFIG.items() if k != "layers_block_type"}
    for n, period, offset in ((9, 6, 4), (12, 3, 1)):
        theirs = transformers.ZambaConfig(**{**cfg, "num_hidden_layers": n, "attn_layer_period": period,
                                             "attn_layer_offset": offset})
        spec = load_spec({"architectures": ["ZambaForCausalLM"], **theirs.to_dict()})
        kinds = ["hybrid" if k == "hybrid" else "mamba" for k in theirs.layers_block_type]
        assert list(spec.layer_types) == kinds and "hybrid" in kinds
        ours = load_spec({"architectures": ["ZambaForCausalLM"], **{**cfg, "num_hidden_layers": n,
                                                                    "attn_layer_period": period,
                                                                    "attn_layer_offset": offset}})
        assert ours.layer_types == spec.layer_types


def test_configs_it_cannot_run_are_refused_by_key():
    base = {"architectures": ["ZambaForCausalLM"], "model_type": "zamba", **CONFIG}
    for change, match in (({"layers_block_type": ["mamba", "attention"] * 2 + ["mamba"]}, "layers_block_type"),
                          ({"layers_block_type": ["mamba", "hybrid"] * 3}, "num_hidden_layers"),
                          ({"hidden_act": "tanh"}, "hidden_act 'tanh'"),
                          ({"hidden_mamba_act": "tanh"}, "hidden_mamba_act 'tanh'"),
                          ({"attention_hidden_size": 48}, "attention_hidden_size"),
                          ({"n_mamba_heads": 3}, "n_mamba_heads")):
        with pytest.raises(ModelError, match=match):
            load_spec({**base, **change})


@pytest.mark.slow
@pytest.mark.anyio
async def test_cluster_read_paths_same_tokens(tmp_path_factory):
    d, hf = _CKPTS.get("zamba", tmp_path_factory)
    await cluster_two_turns(d, hf, VOCAB)
