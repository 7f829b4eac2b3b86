"""Sliding-window attention against transformers, past the window: every family that has one (and Gemma 3, whose
sliding layers also have their own RoPE base), on random weights
saved by transformers' own ``save_pretrained``, over paged KV across several turns (prefills that start inside
and outside the window, greedy decode steps), with which layers slide read from each family's config as
transformers reads it (every layer; ``layer_types``; ``max_window_layers``; Qwen2-MoE's odd layers), and the
cases where a ``sliding_window`` key must be ignored (Llama, ``use_sliding_window: false``)."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
from hf_random import Checkpoints, check_batched_against_hf, cluster_read_paths
from test_deepseek import paged_turns

from dualpath.model import ModelSpec
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 97
W = 6  # tokens: far below every sequence below (turns of 11 + 5 + 7 user tokens and 4 generated each)
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "bos_token_id": 1, "eos_token_id": 2, "sliding_window": W}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", BASE),  # every layer
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(BASE, pad_token_id=0, partial_rotary_factor=0.5)),  # every layer
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(BASE, num_local_experts=4)),  # every layer
    # max_window_layers 1: layer 0 full, layer 1 slides (transformers' default layer_types)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, use_sliding_window=True, max_window_layers=1)),
    # explicit layer_types: layer 0 slides, layer 1 full
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(BASE, use_sliding_window=True, head_dim=24,
                                                      layer_types=["sliding_attention", "full_attention"])),
    # three layers, the default: odd-numbered ones (0, 2) below max_window_layers slide
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(BASE, **MOE, num_hidden_layers=3, num_experts=4,
                                                                shared_expert_intermediate_size=48,
                                                                use_sliding_window=True, max_window_layers=3)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(BASE, **MOE, num_experts=4, use_sliding_window=True)),
    # layer 0 slides, layer 1 full (Gemma2Config's default alternation), soft caps on
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(BASE, hidden_size=48, head_dim=32, query_pre_attn_scalar=20,
                                                       attn_logit_softcapping=4.0, final_logit_softcapping=3.0)),
    # Gemma 3: q/k norms, layers 1 and 3 full with linear RoPE scaling (x2, base 5e4), layers 0 and 2 sliding with
    # their own base (100: far from the full layers'), no soft caps
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        BASE, hidden_size=48, head_dim=16, num_hidden_layers=4, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}
SLIDING = {"mistral": [0, 1], "phi3": [0, 1], "mixtral": [0, 1], "qwen2": [1], "qwen3": [0], "qwen2_moe": [0, 2],
           "qwen3_moe": [0, 1], "gemma2": [0], "gemma3": [0, 2]}

_CKPTS = Checkpoints(FAMILIES)
ckpt = _CKPTS.fixture()


def _load(d, backend: Literal["torch", "triton"] = "torch"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend), with_tokenizer=False)[0]


def _turns() -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]


def test_layers_that_slide_follow_transformers(ckpt):
    family, d, hf = ckpt
    model = _load(d)
    got = [i for i in range(model.spec.n_layers) if model.spec.layer_window(i) is not None]
    assert got == SLIDING[family]
    for i, layer in enumerate(hf.model.layers):
        # the families with layer_types window the layers it names; the others (Mistral, Phi-3, Mixtral,
        # Qwen3-MoE) pass config.sliding_window to every layer's attention
        types = getattr(hf.config, "layer_types", None)
        hf_window = hf.config.sliding_window if types is None or types[i] == "sliding_attention" else None
        assert getattr(layer.self_attn, "sliding_window", hf_window) == hf_window
        assert model.windows[i] == (hf_window or None) == (W if i in SLIDING[family] else None), (family, i)
    assert model.spec.max_position == 256  # the window no longer caps the context
    assert ModelSpec.from_hf_config(model.spec.to_hf_config()) == model.spec


def test_multi_turn_past_the_window_matches_transformers(ckpt):
    """Three turns (38 tokens, six windows) prefilled over the paged prefix and decoded greedily: every logit and
    every id equal transformers' with its own cache."""
    family, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, _turns(), 4, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids


def test_window_changes_the_result(ckpt):
    """The same weights without the window give other logits past it (so the comparisons above can fail)."""
    family, d, hf = ckpt
    model = _load(d)
    seq = [t for turn in _turns() for t in turn]
    model.windows = [None] * model.spec.n_layers
    ours, ref, _, _ = paged_turns(model, hf, [seq], 0, 4)
    assert float((ours - ref).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_batched_and_triton(family, tmp_path_factory):
    """Two sequences with different cached prefixes in one batch, then batched decode (the torch reference and
    the Triton kernels through the interpreter)."""
    d, hf = _CKPTS.get(family, tmp_path_factory)
    seqs = [_turns()[0] + _turns()[1], _turns()[2] + _turns()[0]]
    for backend in ("torch", "triton"):
        check_batched_against_hf(_load(d, backend), hf, seqs, cuts=(9, 3))


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "gemma3"])
def test_our_save_pretrained_keeps_the_window(family, tmp_path):
    """A random model saved by us loads in transformers with the same layers sliding and the same logits past the
    window (a windowed Llama-path spec is written as Mistral: transformers' Llama has no window)."""
    spec = ModelSpec.from_hf_config(dict(FAMILIES[family][2], architectures=[FAMILIES[family][1]]))
    model = build_model(spec, None, seed=2)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[family][1]
    ours, ref, ids, ref_ids = paged_turns(model, hf, _turns(), 2, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_windows_transformers_ignores_are_ignored():
    """A Llama config with a ``sliding_window`` key (transformers' Llama never slides), a Qwen config with
    ``use_sliding_window: false``, and a Mistral config with ``sliding_window: null`` have no window."""
    llama = ModelSpec.from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"]))
    qwen = ModelSpec.from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"], use_sliding_window=False))
    mistral = ModelSpec.from_hf_config(dict(BASE, architectures=["MistralForCausalLM"], sliding_window=None))
    for spec in (llama, qwen, mistral):
        assert spec.sliding_window is None and spec.max_position == 256
        assert all(spec.layer_window(i) is None for i in range(spec.n_layers))
    assert ModelSpec.from_hf_config(dict(BASE, model_type="mistral")).sliding_window == W  # no architectures key


def test_bad_window_configs_name_the_key():
    from dualpath.errors import ModelError

    with pytest.raises(ModelError, match="sliding_window must be a positive integer"):
        ModelSpec.from_hf_config(dict(BASE, architectures=["MistralForCausalLM"], sliding_window=0))
    with pytest.raises(ModelError, match="layer_types must list"):
        ModelSpec.from_hf_config(dict(FAMILIES["qwen3"][2], architectures=["Qwen3ForCausalLM"],
                                      layer_types=["sliding_attention"]))
    with pytest.raises(ModelError, match="max_window_layers must be an integer"):
        ModelSpec.from_hf_config(dict(BASE, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                      max_window_layers="all"))
    # (Qwen2-MoE: sliding layer types with use_sliding_window false slide over 0 tokens in transformers; Qwen2's
    # attend fully, as ours)
    moe = dict(BASE, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", use_sliding_window=False,
               layer_types=["sliding_attention"] + ["full_attention"] * (BASE["num_hidden_layers"] - 1),
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    with pytest.raises(ModelError, match="window of 0 tokens"):
        ModelSpec.from_hf_config(moe)
    assert ModelSpec.from_hf_config(dict(moe, architectures=["Qwen2ForCausalLM"], model_type="qwen2")).sliding_window is None


def test_gemma3_hub_config_reads_as_transformers_does():
    """gemma-3-1b's config.json as published (transformers 4.50 keys: ``sliding_window_pattern``,
    ``rope_local_base_freq``, ``rope_scaling``) and gemma-3-4b's text config (linear x8 on the full layers): which
    layers slide, both RoPE bases and the scaling, as transformers' Gemma3TextConfig reads them."""
    one_b = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
             "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
             "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
             "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
             "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
             "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144}
    for cfg in (one_b, dict(one_b, rope_scaling={"factor": 8.0, "rope_type": "linear"}, num_hidden_layers=34)):
        ref = transformers.Gemma3TextConfig.from_dict(dict(cfg))
        spec = ModelSpec.from_hf_config(cfg)
        full = [i for i, t in enumerate(ref.layer_types) if t == "full_attention"]
        assert spec.architecture == "gemma3" and list(spec.full_attention_layers) == full == list(
            range(5, cfg["num_hidden_layers"], 6))
        assert spec.sliding_window == ref.sliding_window == 512 and spec.max_position == 32768
        assert spec.rope_theta == ref.rope_parameters["full_attention"]["rope_theta"] == 1e6
        assert spec.rope_local_theta == ref.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
        assert (spec.rope_scaling or {}).get("factor") == ref.rope_parameters["full_attention"].get("factor")
        assert spec.attn_scale == 256 ** -0.5 and spec.final_logit_softcapping is None and spec.tie_embeddings
        assert spec.qk_norm and spec.sandwich_norms and spec.gemma_style
        assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    from dualpath.errors import ModelError

    with pytest.raises(ModelError, match="use_bidirectional_attention"):
        ModelSpec.from_hf_config(dict(one_b, use_bidirectional_attention=True))
    with pytest.raises(ModelError, match="only 'default' RoPE is supported for gemma3's sliding layers"):
        ModelSpec.from_hf_config(dict(one_b, rope_parameters={"full_attention": {"rope_theta": 1e6},
                                                              "sliding_attention": {"rope_type": "linear",
                                                                                    "factor": 2.0}}))


def test_gemma3_image_text_checkpoint_serves_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (a SigLIP tower, the projector, the language model) saved by
    transformers: its text model loads (the vision tensors left out) and equals transformers' image-text model on
    text, past the window; the other tensor layout (``model.language_model.*``) loads to the same weights."""
    from safetensors.torch import load_file, save_file

    text = dict(BASE, hidden_size=48, head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=20,
                sliding_window_pattern=3, pad_token_id=0)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 16, "patch_size": 8}
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=90, boi_token_index=91, eoi_token_index=92)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if n.endswith("norm.weight") else p.mul_(6.0)
    hf.save_pretrained(tmp_path / "a")
    model = _load(tmp_path / "a")
    assert model.spec.architecture == "gemma3" and model.spec.full_attention_layers == (2,)
    ours, ref, ids, ref_ids = paged_turns(model, hf, _turns(), 3, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in tensors)
    moved = {k.replace("language_model.model.", "model.language_model.", 1).replace("vision_tower.", "model.vision_tower.", 1)
             .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v for k, v in tensors.items()}
    (tmp_path / "b").mkdir()
    save_file(moved, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    again = _load(tmp_path / "b")
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(again.named_parameters())[name]), name


def test_gemma3_image_text_hub_config():
    """gemma-3-4b-it's config.json as published: a sparse ``text_config`` over Gemma3TextConfig's defaults."""
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
           "eos_token_id": [1, 106], "image_token_index": 262144, "mm_tokens_per_image": 256, "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "torch_dtype": "bfloat16",
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14, "vision_use_head": False}}
    ref = transformers.Gemma3Config.from_dict(dict(hub)).text_config
    spec = ModelSpec.from_hf_config(hub)
    assert spec.architecture == "gemma3" and spec.dtype == "bfloat16" and spec.eos_token_id == [1, 106]
    assert (spec.vocab_size, spec.hidden_size, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (
        ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.head_dim)
    assert spec.sliding_window == ref.sliding_window == 1024 and spec.max_position == ref.max_position_embeddings
    assert list(spec.full_attention_layers) == [i for i, t in enumerate(ref.layer_types) if t == "full_attention"]
    assert spec.rope_scaling == {"factor": 8.0, "rope_type": "linear"} and spec.rope_local_theta == 1e4


@pytest.mark.anyio
@pytest.mark.parametrize("family", ["mistral", "gemma3"])
async def test_cluster_every_path_past_the_window(family, tmp_path_factory):
    """A windowed checkpoint through the emulated cluster: the second turn's hit KV (far more than the window) is
    read on the PE, on the DE and forwarded layer by layer, split, or recomputed; every path gives transformers'
    greedy tokens (teacher-forced over the whole session)."""
    d, hf = _CKPTS.get(family, tmp_path_factory)
    first = _turns()[0] + _turns()[1] + _turns()[2]  # 23 tokens: 5 blocks of 4, four windows of 6
    await cluster_read_paths(LlamaModelConfig(path=str(d), time_model="off"), hf, first, [5, 17, 33, 2, 71, 64, 9],
                             4 * W)
