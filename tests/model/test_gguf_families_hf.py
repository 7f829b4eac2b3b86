"""GGUF files of more families (``dualpath.model.gguf``): Qwen2-MoE, Qwen3-MoE, Phi-3 (with LongRoPE and a partial
rotary head), Gemma, Gemma 2, Gemma 3, OLMo 2, Granite, StarCoder 2, Nemotron, StableLM, GPT-2, SmolLM3, Mixtral,
GLM-4.5, Command R, Command R7B, gpt-oss and DeepSeek-V3 / V2 (these two with their own writers below), each written from a random transformers model as llama.cpp's converter writes it
(the ``gguf`` package's own Hugging Face -> GGUF name map, ``gguf.get_tensor_name_map``; stacked experts; Gemma's
norms stored as ``1 + weight``; the metadata keys llama.cpp reads). Two independent checks per family: transformers'
own GGUF reader (``load_gguf_checkpoint``) reads the file back into exactly the source model's tensors, so the file
is what transformers expects of llama.cpp; and our model read from the file gives the source model's logits over
paged KV (batched prefill and decode), in fp32 and, for one family, from Q8_0-quantized tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_random import check_batched_against_hf, two_sequences

from dualpath.errors import ModelError
from dualpath.model.config import LlamaModelConfig
from dualpath.model.loader import load_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

V = 97
BASE = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0}
UNTIED = {"tie_word_embeddings": False}
#: name -> (llama.cpp architecture, config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "qwen2moe": ("qwen2moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, **UNTIED}),
    "qwen3moe": ("qwen3moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
                  "head_dim": 24, **UNTIED}),
    "phi3_longrope": ("phi3", "Phi3Config", "Phi3ForCausalLM",
                      {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 64, **UNTIED,
                       "rope_scaling": {"type": "longrope", "long_factor": [1.0 + 0.25 * i for i in range(6)],
                                        "short_factor": [1.0 + 0.05 * i for i in range(6)]}}),
    "gemma2": ("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "num_hidden_layers": 3}),
    "gemma3": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "num_hidden_layers": 7,
                "rope_theta": 1e6, "rope_local_base_freq": 1e4}),
    "olmo2": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", {**UNTIED}),
    "granite": ("granite", "GraniteConfig", "GraniteForCausalLM",
                {"attention_multiplier": 0.2, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                 "logits_scaling": 2.5, **UNTIED}),
    "starcoder2": ("starcoder2", "Starcoder2Config", "Starcoder2ForCausalLM",
                   {"norm_epsilon": 1e-5, "sliding_window": None, **UNTIED}),
    "nemotron": ("nemotron", "NemotronConfig", "NemotronForCausalLM", {"partial_rotary_factor": 0.5, **UNTIED}),
    "stablelm": ("stablelm", "StableLmConfig", "StableLmForCausalLM",
                 {"partial_rotary_factor": 0.25, "qk_layernorm": True, "use_qkv_bias": True, **UNTIED}),
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "mixtral": ("llama", "MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, **UNTIED}),
    "smollm3": ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", {"num_hidden_layers": 4, **UNTIED}),
    "command_r": ("command-r", "CohereConfig", "CohereForCausalLM",
                  {"logit_scale": 0.25, "use_qk_norm": True, "head_dim": 16}),
    "cohere2": ("cohere2", "Cohere2Config", "Cohere2ForCausalLM",
                {"logit_scale": 0.5, "sliding_window": 6, "num_hidden_layers": 4, "head_dim": 16}),
    "glm4moe": ("glm4moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
                {"moe_intermediate_size": 32, "head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                 "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                 "routed_scaling_factor": 1.5, "use_qk_norm": True, "attention_bias": True,
                 "partial_rotary_factor": 0.25, **UNTIED}),
}
#: llama.cpp's architectures converted as Llama's: q/k rows permuted into interleaved RoPE pairs
PERMUTED = ("granite", "llama", "smollm3")
#: llama.cpp's architectures whose norms it stores as 1 + weight
PLUS_ONE = ("gemma", "gemma2", "gemma3", "nemotron")
LAYER_NORM = ("starcoder2", "nemotron", "stablelm", "gpt2", "command-r", "cohere2")


def _hf_model(name: str) -> Any:
    _, cfg_cls, model_cls, kw = FAMILIES[name]
    base = {k: v for k, v in BASE.items() if k in ("vocab_size", "bos_token_id", "eos_token_id")} \
        if name == "gpt2" else BASE
    cfg = getattr(transformers, cfg_cls)(**{**base, **kw})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):  # (StableLM's per-head q/k norms: ``.norms.{h}.weight``)
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(6.0)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # (transformers starts the router's bias at zero)
                b.copy_(0.1 * torch.randn_like(b))
    return model


def _partial(cfg: Any) -> float:
    """The rotary fraction of a head (transformers 5 keeps it in ``rope_parameters`` for some families)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(getattr(cfg, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0)


def write_gguf(path: Path, model: Any, arch: str, qtype: Any = None, per_expert: bool = False) -> None:
    """``model`` as llama.cpp's converter writes it: names by the gguf package's own map, experts stacked, Gemma's
    norms plus one, its metadata keys; each tensor in ``qtype`` (F32 when None) where it quantizes. ``per_expert``:
    experts one tensor each (``blk.N.ffn_gate.E``), as llama.cpp wrote Mixtral before stacking them."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                              or 4 * cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv)
    if arch in LAYER_NORM:
        w.add_layer_norm_eps(next(getattr(cfg, k) for k in ("norm_epsilon", "norm_eps", "layer_norm_eps",
                                                              "layer_norm_epsilon") if hasattr(cfg, k)))
    else:
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
    if "full_attention" in rope:  # (Gemma 3: one set per layer type)
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    else:
        w.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if arch in ("nemotron", "stablelm", "glm4moe"):
        w.add_rope_dimension_count(int(head_dim * _partial(cfg)))
    if arch == "glm4moe":  # (the sigmoid-routed MoE block, as llama.cpp's GLM-4.5 converter writes it)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    if arch == "granite":
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if arch == "phi3":
        w.add_rope_dimension_count(int(head_dim * _partial(cfg)))
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        scaling = cfg.rope_parameters
        w.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], dtype=np.float32))
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
    elif arch not in ("nemotron", "stablelm", "gpt2"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama" and hasattr(cfg, "num_local_experts"):  # (Mixtral)
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in ("gemma2", "gemma3", "cohere2"):
        w.add_sliding_window(cfg.sliding_window)
    if arch in ("command-r", "cohere2"):
        w.add_logit_scale(cfg.logit_scale)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     cfg.num_hidden_layers)

    def add(name: str, arr: np.ndarray) -> None:
        arr = arr.astype(np.float32)
        if qtype is not None and arr.ndim >= 2 and arr.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    stacked: dict[str, list[np.ndarray]] = {}
    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if arch in ("gemma", "gemma2", "gemma3", "command-r", "cohere2") and hf_name == "lm_head.weight":
            continue  # (tied)
        if arch in PLUS_ONE and hf_name.endswith("norm.weight"):
            arr = arr + 1.0
        if arch in PERMUTED and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else n_kv
            arr = arr.reshape(heads, 2, arr.shape[0] // heads // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        if arch == "gpt2" and arr.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            arr = arr.T  # (llama.cpp stores Conv1D weights as [out, in])
        if hf_name.endswith("mlp.gate.e_score_correction_bias"):
            add(f"blk.{hf_name.split('.')[2]}.exp_probs_b.bias", arr)
            continue
        if "_layernorm.norms." in hf_name:  # (StableLM's per-head norms, stacked [heads, dim] by llama.cpp)
            bid, side = hf_name.split(".")[2], "q" if ".q_layernorm." in hf_name else "k"
            stacked.setdefault(f"blk.{bid}.attn_{side}_norm.weight", []).append(arr)
            continue
        if hf_name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # transformers' packed experts
            bid = hf_name.split(".")[2]
            parts = dict(zip(("gate", "up"), np.split(arr, 2, axis=1), strict=True)) if "gate_up" in hf_name \
                else {"down": arr}
            for proj, stack in parts.items():
                if per_expert:
                    for e in range(stack.shape[0]):
                        add(f"blk.{bid}.ffn_{proj}.{e}.weight", stack[e])
                else:
                    add(f"blk.{bid}.ffn_{proj}_exps.weight", stack)
            continue
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, hf_name
        add(gname, arr)
    for gname, rows in stacked.items():
        add(gname, np.stack(rows))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request: Any, tmp_path_factory: Any) -> tuple[str, Any, Path]:
    name = request.param
    model = _hf_model(name)
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    write_gguf(path, model, FAMILIES[name][0])
    return name, model, path


def test_transformers_reads_the_file_back_as_the_source_tensors(written):
    """The writer is llama.cpp's convention as transformers' own GGUF reader undoes it (not for what transformers
    5.24 does not read back: stacked experts at these sizes, StableLM's per-head norms, OLMo 2 and Granite files)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    name, model, path = written
    if name in ("qwen2moe", "qwen3moe"):
        pytest.skip("transformers 5.24 maps stacked experts to its own packed layout only for its default sizes")
    if name in ("olmo2", "granite", "gemma", "smollm3", "mixtral", "glm4moe", "command_r", "cohere2"):
        pytest.skip(f"transformers 5.24 reads no {name} GGUF file (Mixtral: not its experts)")
    got = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    want = model.state_dict()
    compared = 0
    for k, v in got.items():
        if k in want:
            torch.testing.assert_close(torch.as_tensor(v).float(), want[k].float(), atol=1e-6, rtol=0, msg=k)
            compared += 1
    unread = [k for k in want if "_layernorm.norms." in k]  # (StableLM's per-head norms: transformers skips them)
    assert compared >= len(want) - len(unread) - 1  # (Gemma's tied LM head is not in the file)


def test_gguf_model_gives_the_source_models_logits(written):
    name, model, path = written
    ours = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, model, two_sequences(V))


def test_older_mixtral_files_with_one_tensor_per_expert(tmp_path):
    model = _hf_model("mixtral")
    path = tmp_path / "mixtral-per-expert.gguf"
    write_gguf(path, model, "llama", per_expert=True)
    assert "blk.1.ffn_up.3.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    ours = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, model, two_sequences(V))


def test_gemma2_27b_layer_count_sets_llama_cpps_query_scale(tmp_path):
    """llama.cpp scales Gemma 2 / 3 27B queries by hidden / heads (its 46 / 62 layers), the others by the head
    width; the config read from the file says so."""
    from dualpath.model.gguf import read_gguf

    model = _hf_model("gemma2")
    path = tmp_path / "g.gguf"
    write_gguf(path, model, "gemma2")
    cfg, _ = read_gguf(path)
    assert cfg["query_pre_attn_scalar"] == 32 and cfg["attn_logit_softcapping"] == 50.0
    w = gguf.GGUFWriter(str(tmp_path / "g27.gguf"), "gemma2")
    for add, v in ((w.add_block_count, 46), (w.add_context_length, 64), (w.add_embedding_length, 4608),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 32), (w.add_head_count_kv, 16),
                   (w.add_key_length, 128), (w.add_vocab_size, 8)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((8, 4608), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg27, _ = read_gguf(tmp_path / "g27.gguf")
    assert (cfg27["head_dim"], cfg27["query_pre_attn_scalar"]) == (128, 144)


def test_quantized_moe_gguf_reads_as_its_dequantized_tensors(tmp_path):
    """Q8_0 tensors (stacked experts included) read as gguf's own dequantization of them: the model equals the
    source model with those dequantized weights."""
    model = _hf_model("qwen3moe")
    path = tmp_path / "q8.gguf"
    write_gguf(path, model, "qwen3moe", gguf.GGMLQuantizationType.Q8_0)
    reader = gguf.GGUFReader(str(path))
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and t.name.endswith("_exps.weight")
               for t in reader.tensors)
    deq = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
           for t in reader.tensors}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for proj, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
                getattr(attn, proj).weight.copy_(deq[f"blk.{i}.{g}.weight"])
            layer.mlp.gate.weight.copy_(deq[f"blk.{i}.ffn_gate_inp.weight"])
            layer.mlp.experts.gate_up_proj.copy_(torch.cat((deq[f"blk.{i}.ffn_gate_exps.weight"],
                                                             deq[f"blk.{i}.ffn_up_exps.weight"]), dim=1))
            layer.mlp.experts.down_proj.copy_(deq[f"blk.{i}.ffn_down_exps.weight"])
        model.model.embed_tokens.weight.copy_(deq["token_embd.weight"])
        model.lm_head.weight.copy_(deq["output.weight"])
    ours = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, model, two_sequences(V))


def test_gguf_family_refusals(tmp_path):
    model = _hf_model("qwen2moe")
    path = tmp_path / "m.gguf"
    write_gguf(path, model, "qwen2moe")
    reader_bytes = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "qwen2moe")
    for add, v in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 64),
                   (w.add_feed_forward_length, 64), (w.add_head_count, 4), (w.add_vocab_size, 8)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="GGUF metadata is missing qwen2moe.expert_count"):
        load_model(LlamaModelConfig(path=str(bad)), with_tokenizer=False)
    w = gguf.GGUFWriter(str(bad), "mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="unsupported GGUF architecture 'mamba'"):
        load_model(LlamaModelConfig(path=str(bad)), with_tokenizer=False)
    assert path.read_bytes() == reader_bytes


def test_gguf_tensors_load_into_a_bf16_model_rounded_once(written):
    """Read for a bf16 model, each tensor is its fp32 reading rounded once (Gemma's norms after the minus one)."""
    name, _, path = written
    if name not in ("gemma2", "qwen2moe"):
        pytest.skip("one dense and one MoE family are enough")
    fp32 = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    bf16 = load_model(LlamaModelConfig(path=str(path), dtype="bfloat16", time_model="off"), with_tokenizer=False)[0]
    p16 = dict(bf16.named_parameters())
    for n, p in fp32.named_parameters():
        assert p16[n].dtype == torch.bfloat16 and torch.equal(p16[n], p.to(torch.bfloat16)), n


#: a small DeepSeek-V3 (MLA with a query LoRA, sigmoid router with a correction bias in two groups, a shared expert)
DS_CONFIG = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
             "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 32,
             "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
             "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
             "routed_scaling_factor": 1.8, "first_k_dense_replace": 1, "max_position_embeddings": 256,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def write_deepseek2_gguf(path: Path, model: Any, split_kv_b: bool, mtp: bool = False) -> None:
    """A DeepSeek-V3 model as llama.cpp's converter writes ``deepseek2``: MLA as MQA over the latent (one KV head,
    ``key_length`` = kv_lora + rope, the MLA widths in ``key_length_mla`` / ``value_length_mla``), ``kv_b_proj``
    split into ``attn_k_b`` (each head transposed) and ``attn_v_b`` (or kept whole as older files do), experts
    stacked, the router's correction bias as ``exp_probs_b``, YaRN's ``mscale_all_dim`` as its log multiplier
    (x 0.1); ``mtp``: one multi-token-prediction block past the decoder's, as ``nextn_predict_layers``."""
    cfg = model.config
    v3 = isinstance(cfg, transformers.DeepseekV3Config)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(cfg.num_hidden_layers + int(mtp))
    if mtp:
        w.add_nextn_predict_layers(1)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if split_kv_b:
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:
        w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(bool(getattr(cfg, "norm_topk_prob", False)))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.n_group:
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    heads, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        bid = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("mlp.experts.gate_up_proj"):
            gate, up = np.split(arr, 2, axis=1)
            w.add_tensor(f"blk.{bid}.ffn_gate_exps.weight", gate)
            w.add_tensor(f"blk.{bid}.ffn_up_exps.weight", up)
        elif hf_name.endswith("mlp.experts.down_proj"):
            w.add_tensor(f"blk.{bid}.ffn_down_exps.weight", arr)
        elif hf_name.endswith("e_score_correction_bias"):
            w.add_tensor(f"blk.{bid}.exp_probs_b.bias", arr)
        elif hf_name.endswith("kv_b_proj.weight") and split_kv_b:
            kv_b = arr.reshape(heads, nope + v, -1)
            w.add_tensor(f"blk.{bid}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))
            w.add_tensor(f"blk.{bid}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:]))
        else:
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert gname is not None, hf_name
            w.add_tensor(gname, arr)
            if mtp and bid == str(cfg.num_hidden_layers - 1) and gname.endswith("attn_norm.weight"):
                w.add_tensor(gname.replace(f"blk.{bid}.", f"blk.{cfg.num_hidden_layers}."), arr + 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 0.7, "mscale_all_dim": 0.7, "beta_fast": 32.0, "beta_slow": 1.0}
#: name -> (transformers model / config class, config changes, kv_b_proj split, an MTP block in the file)
DS_VARIANTS = {
    "v3_k_b_v_b_yarn_mtp": ("DeepseekV3", {"rope_parameters": _YARN, "max_position_embeddings": 256}, True, True),
    "v3_kv_b": ("DeepseekV3", {}, False, False),
    "v2_lite_softmax": ("DeepseekV2", {"q_lora_rank": None, "n_group": None, "topk_group": None,
                                       "n_routed_experts": 8, "routed_scaling_factor": 1.0}, False, False),
}


@pytest.mark.parametrize("variant", list(DS_VARIANTS))
def test_deepseek2_gguf_gives_the_source_models_logits(tmp_path, variant):
    """DeepSeek-V3 (and V2-Lite, its softmax router) written as llama.cpp's ``deepseek2`` (the paper's model family):
    multi-turn logits and greedy ids over our paged latent KV equal transformers' on the source model."""
    from hf_random import check_turns_against_hf, random_turns, widen_mla_moe

    family, changes, split_kv_b, mtp = DS_VARIANTS[variant]
    torch.manual_seed(0)
    cfg = {**DS_CONFIG, **changes}
    if family == "DeepseekV2":
        cfg = {k: v for k, v in cfg.items() if k not in ("n_group", "topk_group")}
    hf = widen_mla_moe(getattr(transformers, f"{family}ForCausalLM")(
        getattr(transformers, f"{family}Config")(**cfg)).eval())
    path = tmp_path / "ds.gguf"
    write_deepseek2_gguf(path, hf, split_kv_b, mtp)
    ours = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    assert type(ours).__name__ == "DeepseekV3Model"
    check_turns_against_hf(ours, hf, random_turns(V))


def write_gpt_oss_gguf(path: Path, model: Any, qtype: Any = None) -> None:
    """A gpt-oss model as llama.cpp's converter writes ``gpt-oss``: transformers' packed experts split (gate the
    even columns of ``gate_up_proj``, up the odd ones, each stored ``[E, I, hidden]``; ``down_proj`` stored ``[E,
    hidden, I]``), the sinks as ``attn_sinks.weight``, the router as ``ffn_gate_inp``, YaRN's factor and original
    context; the experts in ``qtype`` (MXFP4, as the published files hold them) when given."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gpt-oss")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(cfg.num_local_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_sliding_window(cfg.sliding_window)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, cfg.num_hidden_layers)

    def add(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype is not None and name.endswith("_exps.weight"):
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        bid = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("experts.gate_up_proj"):
            add(f"blk.{bid}.ffn_gate_exps.weight", arr[..., 0::2].transpose(0, 2, 1))
            add(f"blk.{bid}.ffn_up_exps.weight", arr[..., 1::2].transpose(0, 2, 1))
        elif hf_name.endswith("experts.gate_up_proj_bias"):
            add(f"blk.{bid}.ffn_gate_exps.bias", arr[..., 0::2])
            add(f"blk.{bid}.ffn_up_exps.bias", arr[..., 1::2])
        elif hf_name.endswith("experts.down_proj"):
            add(f"blk.{bid}.ffn_down_exps.weight", arr.transpose(0, 2, 1))
        elif hf_name.endswith("experts.down_proj_bias"):
            add(f"blk.{bid}.ffn_down_exps.bias", arr)
        elif hf_name.endswith("self_attn.sinks"):
            add(f"blk.{bid}.attn_sinks.weight", arr)
        else:
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert gname is not None, hf_name
            add(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GPT_OSS = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
           "num_experts_per_tok": 2, "sliding_window": 8, "max_position_embeddings": 256, "pad_token_id": 0,
           "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("mxfp4", [False, True], ids=["f32", "mxfp4_experts"])
def test_gpt_oss_gguf_gives_the_source_models_logits(tmp_path, mxfp4):
    """gpt-oss written as llama.cpp's ``gpt-oss`` (sinks, alternating windows, YaRN, biased router and experts):
    the logits equal transformers' on the source model; with MXFP4 experts, on the source model holding gguf's own
    dequantization of them."""
    torch.manual_seed(0)
    hf = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT_OSS)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if ("norm" in n or "bias" in n or "sinks" in n) else p.mul_(6.0)
    path = tmp_path / "oss.gguf"
    qtype = gguf.GGMLQuantizationType.MXFP4 if mxfp4 else None
    write_gpt_oss_gguf(path, hf, qtype)
    if mxfp4:  # (the reference holds the experts as gguf dequantizes its MXFP4 blocks)
        deq = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith("_exps.weight")}
        assert any(t.tensor_type == qtype for t in gguf.GGUFReader(str(path)).tensors)
        with torch.no_grad():
            for i, layer in enumerate(hf.model.layers):
                gu = layer.mlp.experts.gate_up_proj
                gu[..., 0::2] = deq[f"blk.{i}.ffn_gate_exps.weight"].transpose(1, 2)
                gu[..., 1::2] = deq[f"blk.{i}.ffn_up_exps.weight"].transpose(1, 2)
                layer.mlp.experts.down_proj.copy_(deq[f"blk.{i}.ffn_down_exps.weight"].transpose(1, 2))
    ours = load_model(LlamaModelConfig(path=str(path), time_model="off"), with_tokenizer=False)[0]
    check_batched_against_hf(ours, hf, two_sequences(V))
