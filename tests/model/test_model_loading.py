"""Loaders and bad input: config parsing errors, checkpoint/config mismatches, GGUF reading (against an
independent llama.cpp-style writer), the KV pool's capacity error, and the generate command's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dualpath.errors import ModelError
from dualpath.model import KVPool, ModelSpec, SeqBatch
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import build_model, load_model, save_pretrained

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
       "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128}


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelError, match="unsupported architecture.*xLSTM"):  # (a recurrent model: no KV)
        ModelSpec.from_hf_config({**CFG, "architectures": ["xLSTMForCausalLM"], "model_type": "xlstm"})
    bad = dict(CFG)
    del bad["hidden_size"]
    with pytest.raises(ModelError, match="missing required key 'hidden_size'"):
        ModelSpec.from_hf_config(bad)
    with pytest.raises(ModelError, match="not a multiple"):
        ModelSpec.from_hf_config({**CFG, "num_key_value_heads": 3})
    with pytest.raises(ModelError, match="rope_scaling type 'ntk-by-parts'"):
        ModelSpec.from_hf_config({**CFG, "rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}})
    with pytest.raises(ModelError, match="rope_scaling of type 'dynamic' needs a 'factor'"):
        ModelSpec.from_hf_config({**CFG, "rope_scaling": {"type": "dynamic"}})
    with pytest.raises(ModelError, match="llama3 rope_scaling is missing 'low_freq_factor'"):
        ModelSpec.from_hf_config({**CFG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        ModelSpec.from_hf_config(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        ModelSpec.from_hf_config(tmp_path / "nope")


def test_spec_roundtrip_and_fingerprint():
    spec = ModelSpec.from_hf_config(CFG)
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec
    assert spec.kv_spec().bytes_per_token_layer == 2 * 2 * 8 * 4
    from dataclasses import replace

    assert spec.fingerprint() == ModelSpec.from_hf_config(CFG).fingerprint()
    assert replace(spec, weights_id="x").fingerprint() != spec.fingerprint()
    assert spec.with_dtype("bfloat16").fingerprint() != spec.fingerprint()


def test_checkpoint_mismatch_names_the_tensor(tmp_path):
    spec = ModelSpec.from_hf_config(CFG)
    save_pretrained(build_model(spec, None, seed=0), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))
    with pytest.raises(ModelError, match=r"mlp\.down_proj\.weight.*shape \(32, 48\).*\(32, 40\)"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ModelError, match=r"missing 9 tensor\(s\): model\.layers\.2"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(ModelError, match=r"unexpected 9 tensor\(s\): model\.layers\.1"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    assert model.spec.weights_id and model.spec.fingerprint()


@pytest.mark.parametrize("quant,needle", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv_fast"}, "version 'gemv_fast'"),
    ({"quant_method": "hqq", "nbits": 4}, "quant_method 'hqq'"),
    ({"quant_method": "quanto", "weights": "int4"}, "quant_method 'quanto'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
    ({"bits": 4}, "quant_method None"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "format 'marlin-24'"),
])
def test_a_checkpoint_quantized_in_an_unread_format_is_refused_by_name(tmp_path, quant, needle):
    """A checkpoint in a format not read here (Quanto, HQQ, GPTQ repacked for Marlin, AWQ's GEMV layouts)
    would surface as a tensor mismatch far from the cause: the quantization is named instead, before any weight is
    read; random weights need no reading."""
    spec = ModelSpec.from_hf_config(CFG)
    save_pretrained(build_model(spec, None, seed=0), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    with pytest.raises(ModelError, match=needle):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    model, _ = load_model(LlamaModelConfig(path=str(tmp_path), random_init=True), with_tokenizer=False)
    assert model.spec.weights_id.startswith("random:")


@pytest.mark.parametrize("cfg,needle", [
    ({"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm"}, "recurrent state layers .* are not implemented"),
    ({"model_type": "xlstm"}, "recurrent state"),
    ({"architectures": ["Gemma4AssistantForCausalLM"]}, "draft model"),
    ({"architectures": ["Inkling2ForCausalLM"]}, "recurrent state"),
    ({"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama"}, "cross-attention"),
    ({"architectures": ["BertLMHeadModel"], "model_type": "bert"}, "encoder"),
    ({"architectures": ["WhisperForCausalLM"]}, "encoder-decoder"),
    ({"architectures": ["NemotronHOmniForConditionalGeneration"], "model_type": "nemotron_h_omni"}, "recurrent state"),
    ({"architectures": ["XLMRobertaForCausalLM"]}, "encoder"),
    ({"architectures": ["Inkling2ForConditionalGeneration"], "model_type": "inkling2"}, "recurrent state"),
    ({"model_type": "diffusion_gemma"}, "diffusion language model"),
    ({"architectures": ["Florence2ForConditionalGeneration"], "model_type": "florence2"}, "encoder-decoder model"),
    ({"architectures": ["BlipForConditionalGeneration"], "model_type": "blip"}, "encoder-decoder model"),
    ({"architectures": ["Kosmos2ForConditionalGeneration"], "model_type": "kosmos-2"}, "no text-only mode"),
    ({"architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics"}, "cross-attention"),
    ({"architectures": ["MusicgenForCausalLM"], "model_type": "musicgen"}, "audio model"),
    ({"architectures": ["XLNetLMHeadModel"], "model_type": "xlnet"}, "permutation language model"),
    ({"architectures": ["ReformerModelWithLMHead"], "model_type": "reformer"}, "LSH"),
    ({"architectures": ["BltForCausalLM"], "model_type": "blt"}, "byte-level"),
    ({"architectures": ["CpmAntForCausalLM"], "model_type": "cpmant"}, "attends both ways"),
])
def test_families_refused_on_purpose_say_why(cfg, needle):
    with pytest.raises(ModelError, match=needle):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ModelError, match=r"unsupported architecture \['NoSuchForCausalLM'\]; supported"):
        ModelSpec.from_hf_config({"architectures": ["NoSuchForCausalLM"]})


def test_cpmant_is_refused_because_its_input_attends_both_ways():
    """The reason CPM-Ant is refused holds: in transformers' own model the logits of a sequence's first tokens
    change when tokens are appended after them, so their keys and values cannot be cached."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CpmAntForCausalLM"):
        pytest.skip("no CPM-Ant in this transformers")
    cfg = transformers.CpmAntConfig(vocab_size=97, hidden_size=32, num_attention_heads=4, dim_head=8, dim_ff=48,
                                    num_hidden_layers=2, prompt_types=3, prompt_length=4, segment_types=3,
                                    position_bias_num_buckets=32, position_bias_max_distance=64)
    torch.manual_seed(0)
    hf = transformers.CpmAntForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        short = hf(torch.tensor([[5, 6]])).logits[0]
        longer = hf(torch.tensor([[5, 6, 7, 8, 9]])).logits[0, :2]
    assert float((short - longer).abs().max()) > 0.1
    with pytest.raises(ModelError, match="attends both ways"):
        ModelSpec.from_hf_config(cfg.to_dict() | {"architectures": ["CpmAntForCausalLM"]})


@pytest.mark.parametrize("arch", ["MiniMaxM3VLForConditionalGeneration", "ErnieMoeVariantForCausalLM",
                                  "MambaVisionForConditionalGeneration"])
def test_a_family_is_refused_by_name_only_when_its_name_is_that_familys(arch):
    """A refused family's name followed by more than a head's name is another family (MiniMax-M3's attention is
    not MiniMax's linear attention; no ERNIE decoder is BERT-like ERNIE): it is unsupported, with no borrowed
    reason."""
    with pytest.raises(ModelError, match=rf"unsupported architecture \['{arch}'\]; supported"):
        ModelSpec.from_hf_config({"architectures": [arch]})


def test_random_init_is_seeded():
    spec = ModelSpec.from_hf_config(CFG)
    a, b, c = build_model(spec, None, seed=4), build_model(spec, None, seed=4), build_model(spec, None, seed=5)
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, b.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[1].mlp.up_proj.weight, c.model.layers[1].mlp.up_proj.weight)


def test_pool_and_batch_errors():
    spec = ModelSpec.from_hf_config(CFG)
    pool = KVPool(spec.kv_spec(), num_blocks=2, block_tokens=16)
    with pytest.raises(ModelError, match="need 3 blocks.*only 2 of 2"):
        pool.allocate(3)
    with pytest.raises(ModelError, match="block table has 1 blocks but 20 tokens need 2"):
        SeqBatch.build([list(range(20))], [0], [[0]], 16)
    model = build_model(spec, None)
    with pytest.raises(ModelError, match="token id out of range"):
        model(SeqBatch.build([[1, 64]], [0], [[0]], 16), pool.layers)
    state = model.prefill_begin(SeqBatch.build([[1, 2]], [0], [[0]], 16))
    with pytest.raises(ModelError, match="out of order"):
        model.prefill_layer(1, state, pool.layer(1))


@pytest.mark.parametrize("cfg,row_heads", [
    ({"architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon"}, 2),
    ({"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash", "v_head_dim": 8, "n_routed_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 1, "topk_group": 1}, 4),
])
def test_typed_rope_layers_check_order_and_page_rows(cfg, row_heads):
    """A per-layer-type RoPE decoder's layer-wise step refuses a layer run out of order, and pages whose rows are
    not its own (``row_heads`` heads: the KV heads, or twice them for MiMo-V2-Flash's sliding layers)."""
    spec = ModelSpec.from_hf_config({**cfg, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "head_dim": 8})
    model = build_model(spec, None)
    pool = KVPool(spec.kv_spec(), num_blocks=2, block_tokens=16)
    assert pool.layer(0).shape[3] == row_heads
    state = model.prefill_begin(SeqBatch.build([[1, 2]], [0], [[0]], 16))
    with pytest.raises(ModelError, match="layer 1 run out of order"):
        model.prefill_layer(1, state, pool.layer(1))
    with pytest.raises(ModelError, match=rf"layer 0: KV tensor shape .*expected \[num_blocks, \(16, 2, {row_heads}, 8\)\]"):
        model.prefill_layer(0, state, pool.layer(0)[:, :, :, :1])
    model.prefill_layer(0, state, pool.layer(0))
    assert state.next_layer == 1


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's LlamaModel.permute (HF half-split RoPE rows -> interleaved pairs)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(path, src, arch: str, rope_freqs: np.ndarray | None = None) -> None:
    """Write ``src`` as llama.cpp's converter would (its tensor names; Q/K rows permuted for ``llama`` only)."""
    import gguf

    spec = src.spec
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.rms_eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_vocab_size(spec.vocab_size)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, p in src.named_parameters(remove_duplicate=True):
        arr = p.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{_GGUF['.'.join(parts[3:-1])]}.weight"
            if arch == "llama" and "q_proj" in name:
                arr = _llama_cpp_permute(arr, spec.n_heads)
            elif arch == "llama" and "k_proj" in name:
                arr = _llama_cpp_permute(arr, spec.n_kv_heads)
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loader_matches_source_weights(tmp_path):
    pytest.importorskip("gguf")
    spec = ModelSpec.from_hf_config({**CFG, "tie_word_embeddings": True})
    src = build_model(spec, None, seed=7)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, src, "llama")
    model, _ = load_model(LlamaModelConfig(path=str(path)), with_tokenizer=False)
    assert model.spec == spec
    for (n1, p1), (_, p2) in zip(src.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def _llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                          old_ctx: int = 8192) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes for Llama 3 (written out here from its formula)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_gguf_llama3_rope_freqs_and_qwen3(tmp_path):
    """Llama 3.x GGUF files carry their RoPE scaling as a rope_freqs tensor; Qwen3's carry q/k norms."""
    pytest.importorskip("gguf")
    cfg = {**CFG, "head_dim": 64, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
           "rope_theta": 500000.0, "tie_word_embeddings": True}
    for factor in (8.0, 32.0):  # Llama 3.1 and 3.2
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
        spec = ModelSpec.from_hf_config({**cfg, "rope_scaling": rs})
        src = build_model(spec, None, seed=3)
        path = tmp_path / f"llama3-{factor}.gguf"
        _write_gguf(path, src, "llama", _llama_cpp_rope_freqs(64, 500000.0, factor))
        model, _ = load_model(LlamaModelConfig(path=str(path)), with_tokenizer=False)
        assert model.spec == spec  # the same llama3 rope_scaling, read back from the tensor
        ids = SeqBatch.build([[1, 5, 9, 33, 2]], [0], [[0]], 16)
        pool = KVPool(spec.kv_spec(), num_blocks=2, block_tokens=16)
        pool2 = KVPool(spec.kv_spec(), num_blocks=2, block_tokens=16)
        torch.testing.assert_close(model(ids, pool.layers), src(ids, pool2.layers))
    bad = tmp_path / "odd-rope.gguf"
    _write_gguf(bad, src, "llama", _llama_cpp_rope_freqs(64, 500000.0, 8.0, high=2.0))
    with pytest.raises(ModelError, match="rope_freqs.weight is not Llama 3's RoPE scaling"):
        load_model(LlamaModelConfig(path=str(bad)), with_tokenizer=False)
    qspec = ModelSpec.from_hf_config({**cfg, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    qsrc = build_model(qspec, None, seed=4)
    with torch.no_grad():
        for n, p in qsrc.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    qpath = tmp_path / "qwen3.gguf"
    _write_gguf(qpath, qsrc, "qwen3")
    qmodel, _ = load_model(LlamaModelConfig(path=str(qpath)), with_tokenizer=False)
    assert qmodel.spec == qspec
    for (n1, p1), (_, p2) in zip(qsrc.named_parameters(), qmodel.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_sliding_window_reads_and_qwen3_roundtrips():
    """A sliding window is applied per layer (tests/model/test_sliding_window_hf.py), so it no longer caps the
    context: the adapter serves the checkpoint's whole ``max_position_embeddings``."""
    from dualpath.engine.model_api import LlamaAdapter

    mistral = ModelSpec.from_hf_config({**CFG, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                        "sliding_window": 64})
    assert (mistral.architecture, mistral.sliding_window, mistral.max_position) == ("llama", 64, 128)
    assert mistral.layer_window(0) == 64
    assert ModelSpec.from_hf_config(mistral.to_hf_config()) == mistral
    assert ModelSpec.from_hf_config({**CFG, "sliding_window": None}).max_position == 128  # null: no window
    qwen = {**CFG, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 32,
            "use_sliding_window": False}
    assert ModelSpec.from_hf_config(qwen).sliding_window is None  # a window that is switched off does not count
    on = ModelSpec.from_hf_config({**qwen, "use_sliding_window": True, "max_window_layers": 0})
    assert (on.sliding_window, on.max_position, on.full_attention_layers) == (32, 128, ())
    with pytest.raises(ModelError, match="sliding_window must be a positive integer"):
        ModelSpec.from_hf_config({**qwen, "use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0})
    model = build_model(mistral, None, seed=0)
    assert LlamaAdapter(model, block_tokens=16, max_context=100, time_model="off").max_context == 100
    assert LlamaAdapter(model, block_tokens=16, time_model="off").max_context == 128
    qwen3 = ModelSpec.from_hf_config({**CFG, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                                      "head_dim": 16})
    assert qwen3.qk_norm and not qwen3.attention_bias and qwen3.head_dim == 16
    assert ModelSpec.from_hf_config(qwen3.to_hf_config()) == qwen3
    names = {n for n, _ in build_model(qwen3, None, seed=0).named_parameters()}
    assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.self_attn.k_norm.weight" in names


class _RunsCode:
    """Pickled as a call of ``pathlib.Path.touch``: what a hostile ``.bin`` would make ``torch.load`` run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoint_loads_and_matches_transformers(tmp_path, shards):
    """Older checkpoints ship ``pytorch_model.bin`` (``torch.save`` of the state dict; sharded with
    ``pytorch_model.bin.index.json``): loaded with weights_only, the logits equal transformers' on the same
    weights; a pickle that would run code is refused and nothing runs."""
    import transformers

    torch.manual_seed(0)
    hf_kw = {k: v for k, v in CFG.items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kw, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(6.0)  # transformers initialises small weights: widen them so that every weight matters
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        names = sorted(sd)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({k: sd[k] for k in part}, tmp_path / fname)
            weight_map.update(dict.fromkeys(part, fname))
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    seq = [3, 17, 42, 5, 9, 33, 60, 1, 2, 8]
    pool = KVPool(model.spec.kv_spec(), num_blocks=4, block_tokens=4)
    table = pool.allocate(3)
    got = model(SeqBatch.build([seq], [0], [table], 4), pool.layers, all_positions=True)
    with torch.no_grad():
        want = hf(torch.tensor([seq])).logits[0].float()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)

    bad = tmp_path / ("pytorch_model.bin" if shards == 1 else "pytorch_model-00002-of-00003.bin")
    marker = tmp_path / "code-ran"
    torch.save({**{k: sd[k] for k in list(sd)[:2]}, "x": _RunsCode(str(marker))}, bad)
    with pytest.raises(ModelError, match=rf"{bad.name}: refused: the pickle holds more than tensors"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    assert not marker.exists()
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=rf"{bad.name}: cannot read a PyTorch state dict"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    for f in tmp_path.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(ModelError, match=r"no weights \(\*\.safetensors, or pytorch_model\*\.bin\)"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)


def test_every_architecture_reads_a_deep_config_without_a_window_key():
    """A config of 40 layers and no window keys, for every architecture: Qwen's ``max_window_layers`` default (28)
    must not make the deep layers of other families slide (it did for GLM-4.5, Seed-OSS and the one-twist Llamas:
    "sliding_window must be a positive integer")."""
    from dualpath.model.spec import _HF_ARCH

    windowed = {"gemma2", "gemma3", "vaultgemma", "cohere2", "cohere2_moe", "gpt_neo", "exaone4", "olmo3", "ministral", "cwm",
                "gpt_oss", "afmoe", "exaone_moe", "granite_swa", "granitemoe_swa", "flint", "kolibri1", "gemma4_text",
                "mimo_v2_flash", "modernbert-decoder", "gemma3n_text", "beam", "muse_glimmer_text",
                "muse_spark_text"}
    # (their config classes slide some layers by default)
    for arch, hf_arch in sorted(_HF_ARCH.items()):
        cfg = {"model_type": arch, "architectures": [hf_arch], "vocab_size": 100, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 40, "num_attention_heads": 4, "num_key_value_heads": 4,
               "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
               "shared_expert_intermediate_size": 32, "ffn_dim": 96, "rotary_dim": 8, "n_shared_experts": 1,
               "d_model": 64, "n_heads": 4, "n_layers": 40}  # (DBRX's and MPT's names)
        if arch == "mimo_v2_flash":  # (its sliding layers have twice the KV heads: they must divide the heads)
            cfg["num_key_value_heads"] = 2
        if arch == "beam":  # (its 4 experts in BeamConfig's default 8 groups would not divide)
            cfg.update(n_group=1, topk_group=1)
        if arch == "mamba2":  # (its heads must tile expand x hidden_size)
            cfg.update(num_heads=8, head_dim=16, n_groups=2)
        if arch == "nemotron_h":  # (its depth is its block list's: num_hidden_layers is ignored, as transformers does)
            cfg["layers_block_type"] = ["linear_attention", "full_attention"] * 20
        if arch == "deepseek_v4":  # (one key/value head, shared)
            cfg["num_key_value_heads"] = 1
        if arch == "zamba2":  # (its block list must name every layer, as transformers checks)
            cfg["layers_block_type"] = ["mamba", "hybrid"] * 20
        if arch == "qwen4_exp_text":  # (its attention layers' QSA indexer: transformers has no default for it)
            cfg.update(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, head_dim=16,
                       indexer_compress_ratio=4)
        if arch == "deepseek_ocr2_text":  # (its MLP per layer: transformers has no default for it)
            cfg["mlp_layer_types"] = ["dense"] + ["sparse"] * 39
        if arch == "cohere_compass_text":  # (its RoPE is keyed by layer type: transformers needs each type's)
            cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        spec = ModelSpec.from_hf_config(cfg)
        # (Dory's and HRM-Text's n_layers count layer passes: Dory's recurrent section once per loop, each HRM stack
        # once per invocation)
        depth = {"dory": lambda s: len(s.module_types), "hrm_text": lambda s: s.per_stack}.get(arch, lambda s: s.n_layers)
        assert depth(spec) == 40, arch
        if arch not in windowed:
            assert spec.sliding_window is None and not spec.full_attention_layers, arch


def test_mistrals_consolidated_file_beside_the_hf_weights_is_not_read(tmp_path):
    """Mistral's repositories ship their own ``consolidated.safetensors`` (its names) beside the Hugging Face
    ``model.safetensors``: the Hugging Face file is read, alone; a directory with only the consolidated file is
    read as it is (and refused by its names)."""
    from safetensors.torch import save_file

    spec = ModelSpec.from_hf_config(CFG)
    src = build_model(spec, None, seed=3)
    save_pretrained(src, tmp_path)
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, str(tmp_path / "consolidated.safetensors"))
    model, _ = load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
    for (n, p1), (_, p2) in zip(src.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n
    for f in tmp_path.glob("model*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="unexpected 1 tensor"):
        load_model(LlamaModelConfig(path=str(tmp_path)), with_tokenizer=False)
