"""Kimi K2.5 (``Kimi_K25ForConditionalGeneration``: a vision tower and projector over a DeepSeek-V3 language model)
served as text: its language model against transformers' image-text model, text-only, on random weights
transformers wrote; the hub's own layout (remote-code architecture name, ``language_model.model.layers``) too."""

from __future__ import annotations

import json

import pytest
import torch
from hf_random import check_turns_against_hf, load_checkpoint, random_turns, widen_mla_moe

from dualpath.errors import ModelError
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Kimi_K25ForConditionalGeneration"):
    pytest.skip("this transformers has no Kimi K2.5", allow_module_level=True)

VOCAB = 97
TEXT = {"model_type": "kimi_k2", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 256, "q_lora_rank": 24}
VISION = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "pos_emb_height": 4, "pos_emb_width": 4}


@pytest.fixture(scope="module", params=["untied", "tied"])
def ckpt(request, tmp_path_factory):
    cfg = transformers.Kimi_K25Config(text_config=dict(TEXT), vision_config=VISION, projection_hidden_size=32,
                                      tie_word_embeddings=request.param == "tied")
    torch.manual_seed(0)
    hf = transformers.Kimi_K25ForConditionalGeneration(cfg).eval()
    widen_mla_moe(hf)
    d = tmp_path_factory.mktemp(f"kimi_k25-{request.param}")
    hf.save_pretrained(d)
    return request.param, d, hf


def test_reads_its_language_model_as_deepseek_v3(ckpt):
    tie, d, _ = ckpt
    spec = load_spec(d / "config.json")
    assert isinstance(spec, DeepseekV3Spec) and spec.architecture == "deepseek_v3"
    assert spec.n_layers == 3 and spec.first_k_dense_replace == 1 and spec.tie_embeddings == (tie == "tied")


def test_text_turns_equal_transformers_image_text_model(ckpt):
    _, d, hf = ckpt
    check_turns_against_hf(load_checkpoint(d), hf, random_turns(VOCAB))


def test_the_hub_layout_reads_the_same(ckpt, tmp_path):
    """The hub's remote-code name and tensor names (``language_model.model.layers``, as DeepSeek-V3 has them)."""
    from safetensors.torch import load_file, save_file

    _, d, hf = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(d / "model.safetensors"))
    save_file({k.replace("language_model.model.blocks.", "language_model.model.layers."): v.contiguous()
               for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    check_turns_against_hf(load_checkpoint(tmp_path), hf, random_turns(VOCAB, seed=1))


def test_a_language_model_that_is_not_deepseek_is_refused(ckpt, tmp_path):
    _, d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["model_type"] = "qwen3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="text_config.model_type"):
        load_spec(tmp_path / "config.json")


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``pack-quantized`` layout, written out bit by bit (independently of the loader): each
    row's symmetric int4 values plus 8, value ``i`` at bits ``4i .. 4i+3`` of the row's little-endian int32 stream."""
    rows, cols = q.shape
    u = (q.to(torch.int64) + 8).tolist()
    words = []
    for row in u:
        row = row + [0] * (-len(row) % 8)
        packed = []
        for j in range(0, len(row), 8):
            w = sum(v << (4 * k) for k, v in enumerate(row[j:j + 8]))
            packed.append(w - (1 << 32) if w >= 1 << 31 else w)
        words.append(packed)
    return torch.tensor(words, dtype=torch.int32)


def test_int4_pack_quantized_experts_load_dequantized(ckpt, tmp_path):
    """Kimi's published weights keep the routed experts in INT4 (compressed-tensors ``pack-quantized``, symmetric,
    one scale per group of inputs): stored so, they load as value x scale, and the model computes exactly what the
    same checkpoint with those dequantized weights in plain float computes. A zero point that fits no group of its weight is refused, naming it."""
    from safetensors.torch import load_file, save_file

    from dualpath.model import KVPool, SeqBatch

    tie, d, _ = ckpt
    if tie == "tied":
        pytest.skip("one checkpoint is enough")
    tensors = load_file(str(d / "model.safetensors"))
    packed, plain = dict(tensors), dict(tensors)
    g = torch.Generator().manual_seed(2)
    names = [n for n in tensors if ".mlp.experts." in n and n.endswith(("gate_proj.weight", "down_proj.weight"))]
    assert names
    for name in names:
        w = tensors[name]
        scale = (w.abs().reshape(w.shape[0], -1, 16).amax(-1) / 7 + 1e-3) * (1 + 0.1 * torch.rand(1, generator=g))
        q = torch.clamp(torch.round(w / scale.repeat_interleave(16, dim=1)), -8, 7).to(torch.int8)
        base = name[: -len(".weight")]
        del packed[name]
        packed.update({f"{base}.weight_packed": _pack_int4(q), f"{base}.weight_scale": scale.to(torch.bfloat16),
                       f"{base}.weight_shape": torch.tensor(list(w.shape))})
        plain[name] = q.float() * scale.to(torch.bfloat16).float().repeat_interleave(16, dim=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 16,
                                "strategy": "group"}}}}
    outs = {}
    for kind, ts in (("packed", packed), ("plain", plain)):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / kind / "model.safetensors"))
        model = load_checkpoint(tmp_path / kind)
        pool = KVPool(model.kv_spec, num_blocks=8, block_tokens=4)
        seq = random_turns(VOCAB, seed=5, lens=(21,))[0]
        outs[kind] = model(SeqBatch.build([seq], [0], [pool.allocate(8)], 4), pool.layers, all_positions=True)
    assert torch.equal(outs["packed"], outs["plain"])
    zp = dict(packed, **{names[0][: -len(".weight")] + ".weight_zero_point": torch.zeros(3, 5, dtype=torch.int32)})
    save_file({k: v.contiguous() for k, v in zp.items()}, str(tmp_path / "packed" / "model.safetensors"))
    with pytest.raises(ModelError, match=r"weight_zero_point \(3, 5\) torch.int32 does not fit"):
        load_checkpoint(tmp_path / "packed")
