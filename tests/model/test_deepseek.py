"""Our DeepSeek-V3 (MLA over paged latent KV, DeepSeekMoE) against transformers' DeepseekV3ForCausalLM on the same
random weights: logits at every step of several turns that reuse the paged latent prefix, and greedy ids."""

from __future__ import annotations

import json

import pytest
import torch

from dualpath.engine.model_api import paged_kv_spec
from dualpath.errors import ModelError
from dualpath.model import KVPool, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model
from dualpath.model.spec import DeepseekV3Spec, load_spec

transformers = pytest.importorskip("transformers")

VOCAB = 97
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "max_position_embeddings": 256, "rope_parameters": YARN,
        "num_mtp_layers": 0, "rms_norm_eps": 1e-6}
CONFIGS = {
    # 1 dense + 2 MoE layers, YaRN with an mscale attention factor, interleaved RoPE
    "q-lora": dict(BASE, q_lora_rank=24),
    # no q-LoRA, plain RoPE halves, no top-k renormalization
    "no-q-lora": dict(BASE, q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def _hf_checkpoint(name: str, directory, seed: int = 0, decisive: bool = False):
    """``decisive``: router correction biases 1.0 apart (sigmoid scores lie in (0, 1)), so the same experts win on
    every token and no near-tie can flip between two bf16 implementations; the gate weights stay data-dependent."""
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**CONFIGS[name])).eval()
    with torch.no_grad():  # HF inits small weights, zero router bias, unit norms: widen them so all matter
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(6.0)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randperm(b.numel()).to(b.dtype) if decisive else 0.1 * torch.randn_like(b))
    hf.save_pretrained(directory, max_shard_size="100KB")  # sharded, straight from transformers
    return hf


# Weight seeds. Under bf16 an MoE router can flip between two near-tied experts; it does so on *both* sides
# (transformers' bf16 and ours stray equally from the fp32 logits then), and where a near-tie falls depends on the
# CPU's bf16 arithmetic (a seed without one on an AVX2 machine had one on an AVX512-BF16 machine). So the bf16
# comparison runs on "decisive" checkpoints (see _hf_checkpoint) and data-dependent routing is checked in fp32,
# which agrees for any seed.
SEEDS = {"q-lora": 0, "no-q-lora": 1}


_DIRS: dict[str, object] = {}


def _ckpt_dir(name: str, factory, decisive: bool = False):
    key = f"{name}-decisive" if decisive else name
    if key not in _DIRS:
        d = factory.mktemp(key)
        _hf_checkpoint(name, d, SEEDS[name], decisive=decisive)
        _DIRS[key] = d
    return _DIRS[key]


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    return request.param, _ckpt_dir(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    return _ckpt_dir("q-lora", tmp_path_factory)


@pytest.fixture(scope="module")
def no_qlora(tmp_path_factory):
    return _ckpt_dir("no-q-lora", tmp_path_factory)


def _turns(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (11, 5, 7)]


def _run(ckpt_dir, dtype: str, backend: str = "torch", gen_per_turn: int = 8, block_tokens: int = 4,
         teacher: bool = False, form: str = "auto"):
    """Three turns: each prefills its new user tokens over the paged prefix, then decodes greedily. Returns our
    and transformers' logits at every step and both greedy id streams (transformers fed its own ids; with
    ``teacher`` both are fed transformers' ids). ``form``: our prefill attention form (``auto`` takes the
    decompressed form for the first turn and the absorbed one for the later, shorter appends, see
    ``test_auto_prefill_form_follows_the_flops``)."""
    ours, _ = load_model(LlamaModelConfig(path=str(ckpt_dir), dtype=dtype, attention_backend=backend,
                                          mla_prefill=form), with_tokenizer=False)
    assert ours.prefill_form == form
    tdt = getattr(torch, dtype)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt_dir), dtype=tdt).eval()
    return paged_turns(ours, hf, _turns(), gen_per_turn, block_tokens, teacher=teacher)


def paged_turns(ours, hf, turns: list[list[int]], gen_per_turn: int, block_tokens: int, *, teacher: bool = False):
    """Each of ``turns`` prefills its user tokens over the paged (latent) prefix, then decodes greedily. Returns
    our and transformers' (its own DynamicCache, fed its own ids) logits at every step and both id streams.
    ``teacher``: we are fed transformers' ids too (a near-tie between two tokens, which bf16 rounding may break
    either way, then cannot make the two runs compare different texts).
    (Also used for the Llama-path MoE families: their KV spec comes from ``ours.spec``.)"""
    kv_spec = (ours.kv_spec if hasattr(ours, "kv_spec") and not hasattr(ours.spec, "paged_kv_spec")
               else paged_kv_spec(ours.spec, block_tokens))  # (Kimi Linear: pages sized for the block)
    pool = KVPool(kv_spec, num_blocks=48, block_tokens=block_tokens)
    table = pool.allocate(48)[::-1]  # physical blocks in reverse: the block table matters
    cache = transformers.DynamicCache(config=hf.config)
    ours_logits, ref_logits, ours_ids, ref_ids = [], [], [], []
    pos = 0
    for user in turns:
        chunk, ref_chunk = user, user
        for step in range(gen_per_turn + 1):
            lo = ours(SeqBatch.build([chunk], [pos], [table], block_tokens), pool.layers)[0]
            with torch.no_grad():
                ro = hf(torch.tensor([ref_chunk]), cache=cache, use_cache=True).logits[0, -1].float()
            pos += len(chunk)
            ours_logits.append(lo)
            ref_logits.append(ro)
            if step < gen_per_turn:
                ours_ids.append(int(lo.argmax()))
                ref_ids.append(int(ro.argmax()))
                chunk, ref_chunk = [ref_ids[-1] if teacher else ours_ids[-1]], [ref_ids[-1]]
            # the last step fed the last generated token, so the next turn starts with its user tokens
    return torch.stack(ours_logits), torch.stack(ref_logits), ours_ids, ref_ids


@pytest.mark.parametrize("form", ["auto", "absorbed", "decompressed"])
def test_fp32_multi_turn_logits_and_greedy(ckpt, form):
    name, d = ckpt
    ours, ref, ids, ref_ids = _run(d, "float32", form=form)
    assert ref.abs().max() > 1.0  # logits of a meaningful size
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert len(ids) >= 20 and ids == ref_ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_multi_turn_logits_and_greedy(name, tmp_path_factory):
    """bf16 on both sides: logits within 6% of the logit range at every step, greedy ids equal (on decisive
    checkpoints: an MoE router can flip on a near-tie between experts under bf16 rounding, on either side)."""
    d = _ckpt_dir(name, tmp_path_factory, decisive=True)
    ours, ref, ids, ref_ids = _run(d, "bfloat16", teacher=True)
    tol = 0.06 * float(ref.abs().max())
    assert float((ours - ref).abs().max()) < tol
    # greedy: our pick is transformers' pick, or a token transformers itself scores within bf16 noise of it
    # (a near-tie that rounding breaks either way; found on an AVX512-BF16 CPU, not on an AVX2 one)
    gen = [i for i in range(len(ref)) if (i % 9) != 8]  # the steps whose pick was generated (not a turn's last)
    picks = [(ids[k], ref_ids[k], float(ref[i, ids[k]]), float(ref[i].max())) for k, i in enumerate(gen)]
    assert len(ids) >= 20 and all(a == b or top - got < 0.02 * top for a, b, got, top in picks), picks
    assert sum(a == b for a, b, _, _ in picks) >= len(picks) - 2


def test_spec_reads_the_checkpoint(ckpt):
    name, d = ckpt
    spec = load_spec(d)
    assert isinstance(spec, DeepseekV3Spec)
    cfg = CONFIGS[name]
    assert spec.q_lora_rank == cfg["q_lora_rank"] and spec.first_k_dense_replace == 1
    assert [spec.is_moe_layer(i) for i in range(3)] == [False, True, True]
    ks = spec.kv_spec()
    assert ks.attention == "mla" and ks.latent_dim == 32 + 8 and ks.bytes_per_token_layer == 40 * 4
    if name == "q-lora":  # softmax scale carries mscale(factor, mscale_all_dim)^2
        m = 0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1.0
        assert spec.softmax_scale == pytest.approx(24 ** -0.5 * m * m)


def test_reads_a_deepseek_v3_style_config():
    """The keys of DeepSeek-V3's own config.json (legacy ``rope_scaling`` with ``type``, FP8 quantization_config,
    MTP layer count, 128 KV heads) at tiny sizes, plus its real KV sizes: 576 bf16 values, 656 FP8 bytes."""
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
           "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
           "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
           "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
           "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
           "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
           "rms_norm_eps": 1e-06, "rope_theta": 10000, "torch_dtype": "bfloat16",
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096, "type": "yarn"},
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]}}
    spec = load_spec(cfg)
    assert isinstance(spec, DeepseekV3Spec) and spec.rope_type == "yarn" and spec.dtype == "bfloat16"
    assert spec.kv_spec().bytes_per_token_layer == 576 * 2
    assert load_spec(cfg, kv_format="fp8").kv_spec().bytes_per_token_layer == 656
    assert spec.mha_equivalent_bytes_per_token_layer() == 128 * (192 + 128) * 2  # 81,920 B: 71x the latent
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert spec.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


def test_bad_configs_name_the_key(tmp_path):
    cfg = dict(CONFIGS["q-lora"], architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    cfg.pop("num_mtp_layers")
    for key, value, needle in (("n_group", 3, "n_group"), ("topk_group", 9, "topk_group"),
                               ("scoring_func", "softmax", "scoring_func"), ("kv_lora_rank", None, "kv_lora_rank")):
        bad = dict(cfg, **{key: value})
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=needle):
            load_spec(tmp_path)
    with pytest.raises(ModelError, match="fp8"):
        load_spec(dict(cfg), kv_format="fp8")  # kv_lora_rank 32 is not a multiple of 128


def test_loads_packed_experts_fp8_weights_and_skips_mtp(qlora, tmp_path):
    """A checkpoint with transformers' packed expert tensors, one block-scaled FP8 weight and a trailing MTP layer
    loads into the same model (logits equal to the plain checkpoint's within the FP8 weight error)."""
    from safetensors.torch import load_file, save_file

    from dualpath.model.loader import read_weights_dir

    d = qlora
    sd = read_weights_dir(d)
    out = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            continue
        out[k] = v
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts."
        gate = torch.stack([sd[f"{p}{e}.gate_proj.weight"] for e in range(8)])
        up = torch.stack([sd[f"{p}{e}.up_proj.weight"] for e in range(8)])
        out[p + "gate_up_proj"] = torch.cat((gate, up), dim=1)
        out[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(8)])
    w = sd["model.layers.0.mlp.up_proj.weight"]  # [96, 64]: one 128x128 block
    scale = w.abs().amax() / 448.0
    out["model.layers.0.mlp.up_proj.weight"] = (w / scale).to(torch.float8_e4m3fn)
    out["model.layers.0.mlp.up_proj.weight_scale_inv"] = scale.reshape(1, 1).float()
    out["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)  # an MTP layer: ignored
    cfg = json.loads((d / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "model.safetensors"))
    assert load_file(str(tmp_path / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    a, _ = load_model(LlamaModelConfig(path=str(d)), with_tokenizer=False)
    b, _ = load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    ids = _turns()[0]
    outs = []
    for m in (a, b):
        pool = KVPool(m.kv_spec, num_blocks=4, block_tokens=4)
        outs.append(m(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True))
    torch.testing.assert_close(outs[1], outs[0], atol=0.15, rtol=0.05)
    assert not torch.equal(outs[1], outs[0])  # the FP8 weight really was used


def test_fp8_blocks_follow_quantization_config_weight_block_size(qlora, tmp_path):
    """``quantization_config.weight_block_size`` (here 16x16, partial edge tiles) sets the FP8 tiles: the model
    equals one loaded from the same weights dequantized in pure torch; scales of the wrong shape name the tensor."""
    from safetensors.torch import save_file

    from dualpath.model.loader import read_weights_dir

    sd = read_weights_dir(qlora)
    fp8, deq = dict(sd), dict(sd)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # [40, 64]: 3x4 tiles, the last row partial
    w = sd[name]
    scale = torch.stack([torch.stack([w[i:i + 16, j:j + 16].abs().amax() / 448.0 for j in range(0, 64, 16)])
                         for i in range(0, 40, 16)])
    s = torch.zeros_like(w)
    for i in range(3):
        for j in range(4):
            s[i * 16:(i + 1) * 16, j * 16:(j + 1) * 16] = scale[i, j]
    w8 = (w / s).to(torch.float8_e4m3fn)
    fp8[name], fp8[name + "_scale_inv"] = w8, scale.float()
    deq[name] = w8.float() * s
    cfg = json.loads((qlora / "config.json").read_text())
    dirs = {}
    for tag, tensors, c in (("fp8", fp8, dict(cfg, quantization_config={
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]})),
                            ("deq", deq, cfg)):
        d = tmp_path / tag
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        dirs[tag] = d
    a, _ = load_model(LlamaModelConfig(path=str(dirs["deq"])), with_tokenizer=False)
    b, _ = load_model(LlamaModelConfig(path=str(dirs["fp8"])), with_tokenizer=False)
    ids = _turns()[0]
    outs = []
    for m in (a, b):
        pool = KVPool(m.kv_spec, num_blocks=4, block_tokens=4)
        outs.append(m(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    c = json.loads((dirs["fp8"] / "config.json").read_text())
    c["quantization_config"]["weight_block_size"] = [128, 128]
    (dirs["fp8"] / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelError, match="kv_a_proj_with_mqa.*weight_block_size"):
        load_model(LlamaModelConfig(path=str(dirs["fp8"])), with_tokenizer=False)


def test_triton_kernels_in_the_model(qlora):
    """The same multi-turn run through the Triton latent kernels (interpreter on CPU): still transformers' logits."""
    d = qlora
    ours, ref, ids, ref_ids = _run(d, "float32", backend="triton", gen_per_turn=2)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert ids == ref_ids


def test_auto_prefill_form_follows_the_flops(no_qlora):
    """``auto`` decompresses where that takes fewer FLOPs (long appends), keeps the absorbed form for short appends
    over a long prefix and for decode, and never expands more than ``decompress_max_bytes`` of keys and values."""
    model, _ = load_model(LlamaModelConfig(path=str(no_qlora)), with_tokenizer=False)

    def batch(new: int, start: int) -> SeqBatch:
        return SeqBatch.build([[1] * new], [start], [list(range(64))], 4)

    assert model.prefill_form == "auto"
    assert model._decompress(batch(64, 0))  # a whole prompt
    assert model._decompress(batch(32, 160))  # a long append
    assert not model._decompress(batch(2, 200))  # a short append over a long prefix: absorbed
    model.decompress_max_bytes = 200 * 4 * (16 + 8 + 16) * 4 - 1  # 200 tokens' keys and values, fp32: too much
    assert not model._decompress(batch(64, 136)) and model._decompress(batch(64, 0))
    model.prefill_form = "decompressed"
    assert model._decompress(batch(2, 200))
    model.prefill_form = "absorbed"
    assert not model._decompress(batch(64, 0))


@pytest.mark.parametrize("form", ["absorbed", "decompressed"])
def test_fp8_latent_kv_both_prefill_forms(form, tmp_path):
    """The FP8 latent run below, the prefill in each form: the decompressed one dequantizes the rows it expands."""
    test_fp8_latent_kv_model("torch", tmp_path, form)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_fp8_latent_kv_model(backend, tmp_path, form="auto"):
    """FP8 latent KV (kv_lora_rank 128 -> 148-byte rows) with fp32 compute against transformers' fp32 logits
    (teacher-forced): FP8 is lossy, so the stated tolerance is >= 80% equal argmax and a mean logit error under
    5% of the logit range."""
    from dualpath.model.loader import build_model, read_weights_dir

    CONFIGS["fp8"] = dict(BASE, q_lora_rank=24, kv_lora_rank=128)
    try:
        _hf_checkpoint("fp8", tmp_path, 0)
    finally:
        CONFIGS.pop("fp8")
    _, ref, _, ref_ids = _run(tmp_path, "float32", gen_per_turn=4)
    spec = load_spec(tmp_path, dtype="float32", kv_format="fp8")
    model = build_model(spec, read_weights_dir(tmp_path), backend=backend)
    model.prefill_form = form
    assert model.kv_spec.bytes_per_token_layer == 128 + 4 + 2 * 8
    pool = KVPool(model.kv_spec, num_blocks=32, block_tokens=4)
    assert pool.data.dtype == torch.uint8
    table, pos, outs, k = list(range(32)), 0, [], 0
    for user in _turns():  # teacher-forced with transformers' greedy ids
        for chunk in [user] + [[t] for t in ref_ids[k : k + 4]]:
            outs.append(model(SeqBatch.build([chunk], [pos], [table], 4), pool.layers)[0])
            pos += len(chunk)
        k += 4
    ours = torch.stack(outs)
    assert float((ours.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.8
    assert float((ours - ref).abs().mean()) < 0.05 * float(ref.abs().max())


def test_generate_cli_json_and_latent_bytes(qlora, tmp_path, capsys):
    """``dualpath generate --model DIR`` on a DeepSeek-V3 checkpoint: transformers' greedy ids, and the JSON keeps
    the latent bytes per token and layer against the MHA-equivalent K/V bytes."""
    from dualpath.cli import main

    d = qlora
    prompt = [5, 17, 33, 2, 90, 61, 7]
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "20",
                 "--ignore-eos", "--device", "cpu", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 7:].tolist()
    assert run["generated_ids"] == want
    assert run["kv_bytes_per_token_layer"] == (32 + 8) * 4
    assert run["mha_equivalent_bytes_per_token_layer"] == 4 * (24 + 16) * 4  # heads x (qk + v) x fp32
    assert "MHA-equivalent" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,2", "--kv-format", "fp8", "--device", "cpu"]) == 2


def test_batched_prefill_and_decode_equal_single_sequences(no_qlora):
    """Two sequences with different cached prefixes in one prefill batch, then one batched decode step, give the
    logits each gets alone (per-sequence block tables, lengths and causal limits are kept apart)."""
    d = no_qlora
    model, _ = load_model(LlamaModelConfig(path=str(d)), with_tokenizer=False)
    bt = 4
    a, b = _turns(3)[0], _turns(4)[1]

    def fresh():
        pool = KVPool(model.kv_spec, num_blocks=16, block_tokens=bt)
        return pool, pool.allocate(8)[::-1], pool.allocate(8)

    pool, ta, tb = fresh()
    model(SeqBatch.build([a[:7], b[:2]], [0, 0], [ta, tb], bt), pool.layers)          # the cached prefixes
    both = model(SeqBatch.build([a[7:], b[2:]], [7, 2], [ta, tb], bt), pool.layers)  # a prefill batch over them
    step = model.decode_step(torch.tensor([3, 4]), torch.tensor([len(a), len(b)]),
                             torch.tensor([ta, tb], dtype=torch.int32), pool.layers)
    for i, (seq, cut) in enumerate(((a, 7), (b, 2))):
        pool, t, _ = fresh()
        model(SeqBatch.build([seq[:cut]], [0], [t], bt), pool.layers)
        alone = model(SeqBatch.build([seq[cut:]], [cut], [t], bt), pool.layers)[0]
        torch.testing.assert_close(both[i], alone, atol=1e-5, rtol=1e-5)
        one = model.decode_step(torch.tensor([3 + i]), torch.tensor([len(seq)]), torch.tensor([t], dtype=torch.int32),
                                pool.layers)[0]
        torch.testing.assert_close(step[i], one, atol=1e-5, rtol=1e-5)


def test_random_init_saves_a_checkpoint_transformers_reads(tmp_path):
    """``to_hf_config`` + :func:`save_pretrained` of a seeded random model (what ``--random-init`` builds) give a
    checkpoint transformers loads to the same logits (router bias and fp32 router included)."""
    from dualpath.model.loader import build_model, save_pretrained

    spec = DeepseekV3Spec(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                          n_layers=3, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=16, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
                          num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                          first_k_dense_replace=1, rope_scaling={k: v for k, v in YARN.items() if k != "rope_theta"},
                          max_position=256)
    model = build_model(spec, None, seed=3)
    save_pretrained(model, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = _turns()[0]
    pool = KVPool(model.kv_spec, num_blocks=4, block_tokens=4)
    ours = model(SeqBatch.build([ids], [0], [pool.allocate(3)], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
