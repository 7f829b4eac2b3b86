"""Phi-3, Gemma and Gemma 2 on the Llama path against transformers on the same random weights, saved by transformers' own
``save_pretrained``: logits at every prefill and greedy decode step of several turns over our paged KV (torch and
Triton backends), batched sequences, our own ``save_pretrained`` read back by transformers, the specs of the
published configs, and the errors of checkpoints we cannot run.

Phi-3: fused ``qkv_proj`` / ``gate_up_proj``, ``partial_rotary_factor`` (only the leading dims of each head rotated),
a sliding window. Gemma: RMSNorm by ``1 + weight``, embeddings times ``sqrt(hidden)``, tanh-GELU GeGLU, an explicit
``head_dim`` unlike ``hidden / heads``, tied embeddings, q/k/v/o biases. Gemma 2 adds soft-capped attention scores
(torch and Triton kernels) and logits, ``query_pre_attn_scalar``, norms around attention output and MLP, and
alternating sliding-window layers."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

import pytest
import torch
from hf_random import Checkpoints, check_batched_against_hf, hf_logits, random_turns, two_sequences
from test_deepseek import paged_turns

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained
from dualpath.model.spec import load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # half of each 16-dim head rotated, a 96-token window, untied head
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(BASE, partial_rotary_factor=0.5, sliding_window=96,
                                                   rope_theta=500.0)),
    # full RoPE on an explicit head_dim of 24 (hidden / heads is 16), tied embeddings
    "phi3_tied": ("Phi3Config", "Phi3ForCausalLM", dict(BASE, head_dim=24, tie_word_embeddings=True)),
    # hidden 48 (sqrt is not a float32-exact integer), head_dim 32 (not 48 / 4), one KV head, q/k/v/o biases, tied,
    # the legacy hidden_act "gelu" (the tanh GELU)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(BASE, hidden_size=48, head_dim=32, num_key_value_heads=1,
                                                     attention_bias=True, hidden_act="gelu")),
    # query_pre_attn_scalar 20 (not head_dim 32), caps small enough to bite at these scales, layer 0 sliding with a
    # 64-token window, layer 1 full
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(BASE, hidden_size=48, head_dim=32, query_pre_attn_scalar=20,
                                                       attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
                                                       sliding_window=64)),
}


_CKPTS = Checkpoints(FAMILIES)  # (Gemma's zero-init norms are widened around 0 too)
_hf_model = _CKPTS.model
_ckpt = _CKPTS.get
ckpt = _CKPTS.fixture()  # (family, directory, transformers' model) for every family


def _load(d, backend: Literal["auto", "torch", "triton"] = "torch",
          dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
    return load_model(LlamaModelConfig(path=str(d), attention_backend=backend, dtype=dtype),
                      with_tokenizer=False)[0]


def _turns(seed: int = 0) -> list[list[int]]:
    return random_turns(VOCAB, seed)


def test_fp32_multi_turn_logits_and_greedy(ckpt):
    family, d, hf = ckpt
    ours, ref, ids, ref_ids = paged_turns(_load(d), hf, _turns(), 7, 4)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


@pytest.mark.parametrize("family", ["phi3", "gemma", "gemma2"])
def test_triton_backend(family, tmp_path_factory):
    """The Triton paged-attention kernels (interpreter on CPU): partial RoPE'd keys, Gemma's 32-dim heads of one KV
    head, Gemma 2's soft-capped scores, still transformers' logits and greedy ids."""
    d, hf = _ckpt(family, tmp_path_factory)
    ours, ref, ids, ref_ids = paged_turns(_load(d, "triton"), hf, _turns()[:2], 2, 4)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids


def test_batched_sequences_and_decode_equal_transformers(ckpt):
    """Two sequences with different cached prefixes in one prefill batch, then two batched decode steps: every
    logit row equals transformers' full recompute of that sequence."""
    family, d, hf = ckpt
    check_batched_against_hf(_load(d), hf, two_sequences(VOCAB))


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_bf16_rounds_as_transformers(family, tmp_path_factory):
    """bf16 on both sides: Gemma's norms (scaled by ``1 + weight`` in fp32, rounded once), its embedding scale
    (``sqrt(hidden)`` rounded to bf16 first), its GeGLU and (Gemma 2) the final soft cap in bf16 give bit-identical
    outputs to transformers' modules and to its zero-layer forward; the whole forward stays within bf16 noise (2% of
    the logit range) of transformers'."""
    d, _ = _ckpt(family, tmp_path_factory)
    ours = _load(d, dtype="bfloat16")
    hf = getattr(transformers, FAMILIES[family][1]).from_pretrained(str(d), dtype=torch.bfloat16).eval()
    seq = sum(_turns(5), [])
    pool = KVPool(ours.spec.kv_spec(), num_blocks=8, block_tokens=4)
    batch = SeqBatch.build([seq], [0], [pool.allocate(8)], 4)
    norms = ["norm", "layers.0.input_layernorm", "layers.1.post_attention_layernorm", "layers.0.mlp"]
    if family == "gemma2":
        norms += ["layers.0.pre_feedforward_layernorm", "layers.1.post_feedforward_layernorm"]
    with torch.no_grad():
        state = ours.prefill_begin(batch)
        assert torch.equal(state.hidden, hf.model.embed_tokens(torch.tensor(seq)))
        x = state.hidden * 3.0 + 0.5
        for name in norms:
            assert torch.equal(ours.model.get_submodule(name)(x), hf.model.get_submodule(name)(x)), name
    got = ours(batch, pool.layers, all_positions=True)
    ref = hf_logits(hf, seq)
    assert float((got - ref).abs().max()) < 0.02 * float(ref.abs().max())
    state.next_layer = ours.spec.n_layers  # embeddings straight to the head: final norm, lm_head, soft cap
    hf.config.num_hidden_layers = 0
    assert torch.equal(ours.prefill_end(state, all_positions=True), hf_logits(hf, seq))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_paged_attention_kernels(dtype):
    """Both backends' soft-capped paged attention against transformers' own Gemma 2 eager attention (scores
    ``cap * tanh(scale * q.k / cap)``, then the causal mask, softmax in fp32) over the same keys: decode split over
    several partitions, prefill over a cached prefix with tiles that span pages."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from dualpath.kernels import paged_decode_attention, paged_prefill_attention

    g = torch.Generator().manual_seed(0)
    nb, bt, hkv, hq, d, cap, scale = 12, 4, 2, 4, 24, 4.0, 0.3
    kv = (3 * torch.randn(nb, bt, 2, hkv, d, generator=g)).to(dtype)
    tables = torch.stack([torch.randperm(nb, generator=g)[:6], torch.randperm(nb, generator=g)[:6]]).int()
    lens, starts = torch.tensor([21, 9], dtype=torch.int32), torch.tensor([14, 6], dtype=torch.int32)
    cu = torch.tensor([0, 7, 10], dtype=torch.int32)
    q = (3 * torch.randn(10, hq, d, generator=g)).to(dtype)

    class Mod(torch.nn.Module):
        num_key_value_groups = hq // hkv

    def reference(b: int, rows: torch.Tensor) -> torch.Tensor:
        n = int(lens[b])
        keys = kv[tables[b].long()].reshape(-1, 2, hkv, d)[:n].float()
        qpos = torch.arange(n - rows.shape[0], n)
        mask = torch.where(torch.arange(n)[None, :] <= qpos[:, None], 0.0, float("-inf"))
        out, _ = eager_attention_forward(Mod().eval(), rows.float().transpose(0, 1)[None],
                                         keys[:, 0].transpose(0, 1)[None], keys[:, 1].transpose(0, 1)[None],
                                         mask[None, None], scaling=scale, softcap=cap)
        return out[0]

    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (3e-2, 2e-2)
    for backend in ("torch", "triton"):
        pre = paged_prefill_attention(q, kv, tables, cu, lens, starts, scale, backend=backend, softcap=cap)
        dec = paged_decode_attention(q[[6, 9]], kv, tables, lens, scale, backend=backend, softcap=cap)
        for b, (lo, hi) in enumerate(((0, 7), (7, 10))):
            want = reference(b, q[lo:hi])
            torch.testing.assert_close(pre[lo:hi].float(), want, atol=atol, rtol=rtol)
            torch.testing.assert_close(dec[b].float(), want[-1], atol=atol, rtol=rtol)
        plain = paged_decode_attention(q[[6, 9]], kv, tables, lens, scale, backend=backend)
        assert float((plain.float() - dec.float()).abs().max()) > 0.1  # the cap changes the result


def test_specs_follow_transformers(ckpt):
    """What the spec reads (rotary dims, head_dim, tying, window, biases) against the modules transformers built,
    and the spec's round trip through ``to_hf_config``."""
    family, d, hf = ckpt
    spec = load_spec(d)
    assert isinstance(spec, ModelSpec) and spec.architecture == family.removesuffix("_tied")
    rot = hf.model.rotary_emb.inv_freq.numel() * 2
    assert spec.rotary_dim == rot and spec.head_dim == hf.model.layers[0].self_attn.head_dim
    assert spec.tie_embeddings == (family != "phi3")
    assert spec.o_bias == (family == "gemma") == (hf.model.layers[0].self_attn.o_proj.bias is not None)
    assert spec.rms_eps == hf.config.rms_norm_eps
    if family == "phi3":
        assert (spec.rotary_dim, spec.sliding_window, spec.max_position) == (8, 96, 256)
    attn = hf.model.layers[0].self_attn
    assert spec.attn_scale == pytest.approx(attn.scaling, rel=1e-12)
    if family == "gemma2":
        assert (spec.sliding_window, spec.max_position) == (64, 256) and attn.sliding_window == 64
        assert spec.full_attention_layers == (1,) and hf.model.layers[1].self_attn.sliding_window is None
        assert spec.attn_logit_softcapping == attn.attn_logit_softcapping == 4.0
        assert spec.final_logit_softcapping == hf.config.final_logit_softcapping == 3.0
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert "partial_rotary_factor" in spec.to_dict() or spec.partial_rotary_factor == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_save_pretrained_is_read_by_transformers(family, tmp_path):
    """A seeded random model of each family (``--random-init``) saved by us (Phi-3 with fused ``qkv_proj`` and
    ``gate_up_proj``) loads in transformers to the same logits, and back into ours to the same parameters."""
    from safetensors.torch import load_file

    spec = ModelSpec.from_hf_config(dict(FAMILIES[family][2], architectures=[FAMILIES[family][1]]))
    model = build_model(spec, None, seed=3)
    save_pretrained(model, tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    fused = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"}
    assert (fused <= names) == family.startswith("phi3")
    assert ("lm_head.weight" in names) == (family == "phi3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILIES[family][1]
    ids = _turns()[0]
    pool = KVPool(spec.kv_spec(), num_blocks=4, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    back = _load(tmp_path)
    assert back.spec == spec
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(back.named_parameters())[name]), name


def test_gemma2_with_only_full_layers_and_no_attention_cap(tmp_path):
    """Gemma 2 whose ``layer_types`` are all full (its ``sliding_window`` of 16 then applies nowhere) and whose
    attention soft cap is off: 37 tokens, saved by us, equal transformers' logits."""
    kw = dict(FAMILIES["gemma2"][2], architectures=["Gemma2ForCausalLM"], sliding_window=16,
              layer_types=["full_attention"] * 2, attn_logit_softcapping=None)
    spec = ModelSpec.from_hf_config(kw)
    assert spec.sliding_window is None and spec.max_position == 256 and spec.attn_logit_softcapping is None
    model = build_model(spec, None, seed=1)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert hf.config.layer_types == ["full_attention"] * 2 and hf.config.attn_logit_softcapping is None
    ids = list(range(3, 40))
    pool = KVPool(spec.kv_spec(), num_blocks=12, block_tokens=4)
    got = model(SeqBatch.build([ids], [0], [pool.allocate(10)], 4), pool.layers, all_positions=True)
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-5, rtol=1e-4)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_spec_identity():
    """The new fields are part of the block-key namespace; a dense Llama's dict (and so its namespace) is
    unchanged by them."""
    phi = ModelSpec.from_hf_config(dict(FAMILIES["phi3"][2], architectures=["Phi3ForCausalLM"]))
    full = ModelSpec.from_hf_config(dict(FAMILIES["phi3"][2], architectures=["Phi3ForCausalLM"],
                                         partial_rotary_factor=1.0))
    assert phi.fingerprint() != full.fingerprint() and "partial_rotary_factor" not in full.to_dict()
    llama = ModelSpec.from_hf_config(dict(BASE, architectures=["LlamaForCausalLM"]))
    assert "partial_rotary_factor" not in llama.to_dict()
    gemma_kw = dict(BASE, architectures=["GemmaForCausalLM"], head_dim=16, tie_word_embeddings=False)
    gemma = ModelSpec.from_hf_config(gemma_kw)
    assert gemma.fingerprint() != ModelSpec.from_hf_config(dict(gemma_kw, architectures=["LlamaForCausalLM"])).fingerprint()


def test_reads_hub_style_configs():
    """The keys of published configs at their real sizes: Phi-3-mini-4k (every layer slides over 2047), Phi-4-mini
    (partial RoPE 0.75 of 128 dims; LongRoPE), Gemma-2B / 7B (head_dim 256,
    hidden_act "gelu" with hidden_activation "gelu_pytorch_tanh", GemmaConfig's defaults)."""
    phi3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072,
            "intermediate_size": 8192, "max_position_embeddings": 4096, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32064}
    spec = load_spec(phi3)
    assert isinstance(spec, ModelSpec) and spec.architecture == "phi3" and spec.max_position == 4096
    assert spec.sliding_window == 2047 and spec.full_attention_layers == ()
    assert spec.rotary_dim == spec.head_dim == 96 and not spec.attention_bias
    phi4 = dict(phi3, hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
                max_position_embeddings=131072, sliding_window=262144, tie_word_embeddings=True, vocab_size=200064,
                rope_scaling={"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48})
    spec = load_spec(phi4)  # LongRoPE: its short factors, capped at the original 4,096 (test_phi3_longrope_hf)
    assert isinstance(spec, ModelSpec) and spec.rope_long is False and spec.context_limit == 4096
    spec = load_spec(dict(phi4, rope_scaling=None))
    assert isinstance(spec, ModelSpec) and (spec.head_dim, spec.rotary_dim) == (128, 96) and spec.tie_embeddings
    gemma = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "bos_token_id": 2, "eos_token_id": 1,
             "head_dim": 256, "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048,
             "intermediate_size": 16384, "max_position_embeddings": 8192, "num_attention_heads": 8,
             "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
             "rope_theta": 10000.0, "torch_dtype": "bfloat16", "vocab_size": 256000}
    spec = load_spec(gemma)
    assert isinstance(spec, ModelSpec) and spec.gemma_style and spec.tie_embeddings and spec.head_dim == 256
    assert spec.kv_spec().bytes_per_token_layer == 2 * 1 * 256 * 2
    seven = {k: v for k, v in gemma.items() if k not in ("head_dim", "num_key_value_heads", "hidden_activation")}
    spec = load_spec(dict(seven, hidden_size=3072, num_attention_heads=16, intermediate_size=24576))
    assert isinstance(spec, ModelSpec)  # GemmaConfig's defaults: head_dim 256 (not 3072 / 16), 16 KV heads
    assert (spec.head_dim, spec.n_kv_heads, spec.max_position) == (256, 16, 8192)
    assert spec.to_hf_config()["hidden_act"] == "gelu_pytorch_tanh"
    gemma2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
              "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 26,
              "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
              "sliding_window": 4096, "torch_dtype": "float32", "vocab_size": 256000}
    spec = load_spec(gemma2)  # gemma-2-2b: every other layer slides over 4096 tokens; the context is 8192
    assert isinstance(spec, ModelSpec) and spec.sandwich_norms and spec.max_position == 8192
    assert spec.full_attention_layers == tuple(range(1, 26, 2))
    assert spec.attn_scale == 256 ** -0.5 and spec.final_logit_softcapping == 30.0
    spec = load_spec(dict(gemma2, query_pre_attn_scalar=224))
    assert isinstance(spec, ModelSpec) and spec.attn_scale == 224 ** -0.5  # as gemma-2-27b


@pytest.mark.parametrize("family", ["phi3", "gemma", "gemma2"])
def test_missing_keys_take_the_config_class_defaults(family):
    """A config.json without the optional keys reads as transformers' config class fills them in (Phi-3: eps 1e-5,
    4096 positions; Gemma: head_dim 256, 16 KV heads, tied, 8192 positions; Gemma 2: 4 KV heads, soft caps 50 and
    30, query_pre_attn_scalar 256, every other layer sliding over 4096 tokens)."""
    cfg_cls, arch, _ = FAMILIES[family]
    minimal = {"architectures": [arch], "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 16, "pad_token_id": 0}
    ref = getattr(transformers, cfg_cls).from_dict(dict(minimal))
    spec = load_spec(minimal)
    assert isinstance(spec, ModelSpec)
    assert spec.rms_eps == ref.rms_norm_eps
    assert spec.max_position == ref.max_position_embeddings
    assert spec.sliding_window == getattr(ref, "sliding_window", None)
    assert spec.tie_embeddings == ref.tie_word_embeddings and spec.n_kv_heads == ref.num_key_value_heads
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert spec.head_dim == head_dim and spec.rope_theta == ref.rope_parameters["rope_theta"]
    if family == "gemma2":
        assert (spec.query_pre_attn_scalar, spec.attn_logit_softcapping, spec.final_logit_softcapping) == (
            ref.query_pre_attn_scalar, ref.attn_logit_softcapping, ref.final_logit_softcapping)
        assert ref.layer_types[0] == "sliding_attention" and spec.sliding_window == ref.sliding_window == 4096
        uncapped = load_spec(dict(minimal, attn_logit_softcapping=None, final_logit_softcapping=None))
        assert isinstance(uncapped, ModelSpec) and uncapped.attn_logit_softcapping is None
        assert uncapped.fingerprint() != spec.fingerprint()


def test_checkpoints_we_cannot_run_name_the_key_or_tensor(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = _ckpt("phi3", tmp_path_factory)
    cfg = json.loads((d / "config.json").read_text())
    for rope, key, match in (
            ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4, "rope_theta": 1e4},
             "rope_parameters", r"rope_scaling.short_factor must be a list of 4"),  # 4 pairs of 8 rotated dims
            ({"type": "su", "short_factor": [1.0] * 4}, "rope_scaling", "missing 'long_factor'"),
            ({"type": "linear", "factor": 2.0}, "rope_scaling", "rope_scaling type 'linear' unsupported for phi3")):
        bad = dict(cfg, **{key: rope})
        if key == "rope_scaling":
            bad.pop("rope_parameters")
        with pytest.raises(ModelError, match=match):
            load_spec(bad)
    for value in (0.0, 1.5, "half"):  # no rotated dim, more than the head, not a number (an odd count runs:
        # test_config_edge_cases_hf)
        with pytest.raises(ModelError, match="partial_rotary_factor"):
            load_spec(dict(cfg, rope_parameters=dict(cfg["rope_parameters"], partial_rotary_factor=value)))
    # a fused qkv_proj of the wrong size is named
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][:-16]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight.*\(112, 64\).*\(128, 64\)"):
        _load(tmp_path)
    gemma = json.loads((_ckpt("gemma", tmp_path_factory)[0] / "config.json").read_text())
    with pytest.raises(ModelError, match="hidden_act 'tanh' unsupported for gemma"):
        load_spec(dict(gemma, hidden_act="tanh"))
    with pytest.raises(ModelError, match="hidden_activation 'gelu' disagrees"):
        load_spec(dict(gemma, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu"))
    with pytest.raises(ModelError, match="use_bidirectional_attention"):
        load_spec(dict(gemma, use_bidirectional_attention=True))
    with pytest.raises(ModelError, match="head_dim"):
        load_spec(dict(gemma, head_dim=None))
    with pytest.raises(ModelError, match="unsupported architecture.*GemmaForCausalLM.*Phi3ForCausalLM"):
        load_spec(dict(gemma, architectures=["Gemma3ForSomethingElse"], model_type="gemma3_other"))
    gemma2 = json.loads((_ckpt("gemma2", tmp_path_factory)[0] / "config.json").read_text())
    bad_values: list[tuple[str, Any]] = [("hidden_activation", "tanh"), ("layer_types", ["full_attention"]),
                                         ("attn_logit_softcapping", -1.0), ("query_pre_attn_scalar", None),
                                         ("sliding_window", 0)]
    for key, value in bad_values:
        with pytest.raises(ModelError, match=key):
            load_spec(dict(gemma2, **{key: value}))
    with pytest.raises(ModelError, match="final_logit_softcapping is only supported for gemma2 and gemma3"):
        replace(ModelSpec.from_hf_config(gemma), final_logit_softcapping=30.0)


@pytest.mark.anyio
async def test_phi3_serves_through_the_cluster(tmp_path_factory):
    """A Phi-3 checkpoint (partial RoPE, fused weights split at load) through the emulated cluster: the PE-read and
    DE-read paths give transformers' greedy tokens, and the hit moves as its KV bytes."""
    from test_deepseek_cluster import BT, FIRST, _session

    d, hf = _ckpt("phi3", tmp_path_factory)
    runs = {path: await _session(d, path) for path in ("pe", "de")}
    assert [r[0].token_ids for r in runs.values()] == [runs["de"][0].token_ids] * 2
    assert [r[1].token_ids for r in runs.values()] == [runs["de"][1].token_ids] * 2
    r1, r2, prompt, layer_bytes = runs["de"]
    assert layer_bytes == 2 * 2 * 16 * 4  # fp32 K and V of 2 KV heads of 16 dims
    hit = (len(FIRST) + 6) // BT * BT
    assert r2.hit_tokens == hit and r2.link_bytes["pe0.cnic.in"] == hit * 2 * layer_bytes
    logits = hf_logits(hf, (prompt + r2.token_ids)[:-1])
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == r2.token_ids
    assert logits[len(FIRST) - 1: len(FIRST) + 5].argmax(-1).tolist() == r1.token_ids
